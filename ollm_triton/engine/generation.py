"""What a generation produces, and the pieces of a decode loop every decoder shares (the engine's fast decoder,
ragged batches, and the strategies in ollm_triton/decoding all use them)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Generation:
    """tokens: [B, N] new tokens (prompt excluded). counters: strategy statistics (acceptance rate, forwards...).

    Every strategy reports `prefill_s` (prompt forward to first-token logits) and `decode_s` (everything after,
    drafting and verification included), measured with device-synchronized timers: throughput is derived from them.
    """

    tokens: torch.Tensor
    counters: dict[str, float] = field(default_factory=dict)


def argmax_pick(logits: torch.Tensor) -> torch.Tensor:
    """Greedy's pick: logits [B, V] -> tokens [B]."""
    return logits.argmax(-1)


def emit_step(out: torch.Tensor, n: int, token: torch.Tensor, done: torch.Tensor,
              eos_id: int | None) -> tuple[torch.Tensor, bool]:
    """Write decode step n's tokens [B] into out[:, n - 1]. Rows that already emitted eos keep emitting it (`done`
    is updated in place). Returns (the tokens written, whether every row is done)."""
    if eos_id is None:
        out[:, n - 1] = token
        return token, False
    token = torch.where(done, torch.full_like(token, eos_id), token)
    done |= token == eos_id
    out[:, n - 1] = token
    return token, bool(done.all())


__all__ = ["Generation", "argmax_pick", "emit_step"]
