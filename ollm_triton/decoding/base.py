"""The decoder-strategy interface: turn a prompt into new tokens with an Engine."""

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


class DecoderStrategy:
    """Base class of decoder strategies; `plugin_name` is set by the registry."""

    plugin_name = "base"

    def generate(
        self, engine, prompt_ids: torch.Tensor, max_new_tokens: int, *, eos_id: int | None = None
    ) -> Generation:
        """prompt_ids: [B, T] on any device. Stops after max_new_tokens, or when every row has produced eos_id."""
        raise NotImplementedError


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

