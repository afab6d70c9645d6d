"""The decoder-strategy interface: turn a prompt into new tokens with an Engine; and the Drafter interface the
speculative strategies share (ollm_triton/decoding/speculation.py runs the draft-then-verify loop over a Drafter).

A strategy returns a `Generation` (engine/generation.py): tokens [B, N] and counters, with `prefill_s` and
`decode_s` from device-synchronized timers.
"""

from __future__ import annotations

import torch

from ollm_triton.engine.generation import Generation


class DecoderStrategy:
    """Base class of decoder strategies; `plugin_name` is set by the registry."""

    plugin_name = "base"
    # Generates through `engine.new_cache`, `engine.prefill`, `engine.forward(ids, cache)` and `fast_decoder()`
    # only (no static steps, tree masks, early exits or draft models): runs on any engine-shaped model, such as
    # transformers' own forward under the bridge (ollm_triton/hf/engine.py), which refuses the others.
    forward_only: bool = False

    def generate(
        self, engine, prompt_ids: torch.Tensor, max_new_tokens: int, *, eos_id: int | None = None
    ) -> Generation:
        """prompt_ids: [B, T] on any device. Stops after max_new_tokens, or when every row has produced eos_id."""
        raise NotImplementedError


class Drafter:
    """Proposes draft tokens for the speculative loop. `propose` may return fewer than asked (prompt lookup finds
    no match)."""

    prefill_s = 0.0
    forwards = 0  # draft forwards in the decode loop (prompt prefill excluded)
    capture_s = 0.0  # seconds spent capturing CUDA graphs (static drafters)
    # True: drafts from a host copy of the sequence fed by `extend` (prompt lookup): `propose` returns host lists and
    # never reads `seq`, so the loop's one device-to-host read per iteration is all the drafter needs
    host_tokens = False

    def start(self, prompt: torch.Tensor, target, max_len: int, gen: torch.Generator | None) -> None:
        """After the target's prefill (target: an EagerTarget or StaticTarget): prompt [B, P] on the device."""

    def prepare(self) -> None:
        """Capture the draft's graphs before the decode timer starts (static drafters)."""

    def propose(self, seq: torch.Tensor, seq_len: int, m: int, gen: torch.Generator | None):
        """seq: [B, >= seq_len] tokens so far (seq[:, seq_len-1] is pending). -> (drafts [B, m'] long, q [B, m', V]
        or None when the drafts are deterministic), m' <= m; host_tokens drafters return drafts as B host lists of
        m' ints and None for q, or (None, None) when they have none."""
        raise NotImplementedError

    def commit(self, valid_len: int) -> None:
        """seq[:, :valid_len] is now final: roll back any draft state past it."""

    def extend(self, tokens: list[list[int]]) -> None:
        """host_tokens drafters only: the tokens appended to the sequence, per row (first the prompt and the first
        new token, then each iteration's emitted tokens); they are final, never rolled back."""

    def counters(self) -> dict[str, float]:
        return {}


__all__ = ["DecoderStrategy", "Drafter", "Generation"]
