"""The attention-backend interface.

Shapes (everywhere in the toolkit):
    q: [B, Hq, T, D]      T query tokens, Hq query heads
    k, v: [B, Hkv, S, D]  S keys (cache so far + the new tokens), Hkv KV heads, Hq % Hkv == 0 (GQA)
    out: [B, Hq, T, D]
Query token t sits at absolute position `q_offset + t`; key s at position s. Causality: key s is visible to
query t iff s <= q_offset + t. `q_offset = S - T` for an ordinary forward.

A backend implements `prefill` and may override `decode`. The default `decode` asks the cache layer for a fused
kernel over its own storage format (`layer_cache.attend`) and otherwise attends over `layer_cache.dense()`, so
every (attention, cache) pair runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # cache codecs import this module for DecodeSchedule
    from ollm_triton.cache.base import CacheLayer


@dataclass(frozen=True)
class DecodeSchedule:
    """Keys visited by a decode query: the KV blocks in `block_ids` (int32, ascending; None = all blocks), and
    inside them only keys with position < sink or position > q_pos - window (window 0 = no window)."""

    block_ids: torch.Tensor | None = None
    window: int = 0
    sink: int = 0


class AttentionBackend:
    """Base class of attention backends; `plugin_name` is set by the registry."""

    plugin_name = "base"
    # What the last call ran ("triton", "torch", a fused codec kernel...), recorded by the runner.
    last_path: str = "torch"

    def prefill(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        q_offset: int,
        tree_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Causal attention of T queries over S keys.

        tree_mask: optional bool [T, T] for the trailing T keys (True = visible), used by tree speculation in
        place of the causal triangle among the new tokens; keys before them stay causal-visible.
        """
        raise NotImplementedError

    def decode(
        self, q: torch.Tensor, layer_cache: CacheLayer, *, tree_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Attention of the T (few) newest queries over everything in `layer_cache` (already appended)."""
        if tree_mask is None:
            out = layer_cache.attend(q, self)
            if out is not None:
                self.last_path = f"fused:{layer_cache.__class__.__name__}"
                return out
        k, v = layer_cache.dense()
        return self.prefill(q, k, v, q_offset=k.shape[2] - q.shape[2], tree_mask=tree_mask)

    def decode_schedule(self, kv_len: int, block_k: int) -> DecodeSchedule:
        """Which keys a decode query at position kv_len - 1 visits, for fused codec kernels (the cache's
        `attend`): dense backends visit everything; windowed and sparse backends override this."""
        return DecodeSchedule()

    def describe(self) -> dict:
        """Plugin parameters and runtime choices, for metrics.json."""
        return {"attention_path": self.last_path}


def causal_mask(t: int, s: int, q_offset: int, device, tree_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Bool [T, S]: True where key s is visible to query t (s <= q_offset + t), with an optional tree mask."""
    q_pos = torch.arange(t, device=device)[:, None] + q_offset
    k_pos = torch.arange(s, device=device)[None, :]
    mask = k_pos <= q_pos
    if tree_mask is not None:
        mask[:, s - t :] = tree_mask.to(device)
    return mask
