"""The attention-backend interface: the whole contract a backend keeps with the engine and the cache codecs.

Shapes (everywhere in the toolkit):
    q: [B, Hq, T, D]      T query tokens, Hq query heads
    k, v: [B, Hkv, S, D]  S keys (cache so far + the new tokens), Hkv KV heads, Hq % Hkv == 0 (GQA)
    out: [B, Hq, T, D]
Query token t sits at absolute position `q_offset + t`; key s at position s. Causality: key s is visible to
query t iff s <= q_offset + t. `q_offset = S - T` for an ordinary forward.

A backend implements `prefill` and may override `decode`. The default `decode` offers the query to the cache
layer's fused kernel over its own storage (`layer_cache.attend`, when `fused_codec_decode`) and otherwise attends
over `layer_cache.dense()`, so every (attention, cache) pair runs.

What the engine reads, declared here and never inferred from a backend's name:
    dense_causal        decode is plain causal attention over every held key, so the engine's static (CUDA-graph)
                        decode step may attend with its own kernel instead of calling `decode`
    fused_codec_decode  `decode` may hand the query to a codec's fused kernel, which follows `decode_schedule`
    window, sink        the keys a query sees (0 = unbounded): what tasks report as masked
    layer_window        `prefill`/`decode` honour a per-call `window` (the model's own per-layer sliding window,
                        gpt-oss: keys p - window < s <= p), on top of whatever the backend masks itself
    sink_logits         `prefill`/`decode` honour per-head `sinks` logits [Hq] (gpt-oss): each query's softmax
                        has one more column, exp(sinks[h]), that takes probability mass and is dropped
    prefill_mask_bytes  what a prefill of a later prompt chunk (q_offset > 0) holds in masks at once, which the
                        memory check adds to the chunk's other transients (engine/footprint.py)
The engine refuses a model that needs `layer_window` or `sink_logits` (ModelConfig.attention_requirements) with
a backend that does not declare it, in one line.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ollm_triton.kernels.attention_schedule import DecodeSchedule

if TYPE_CHECKING:
    from ollm_triton.cache.base import CacheLayer


class AttentionBackend:
    """Base class of attention backends; `plugin_name` is set by the registry."""

    plugin_name = "base"
    dense_causal: bool = False
    fused_codec_decode: bool = True
    window: int = 0  # keys p - window < s <= p visible to the query at position p (0 = every earlier key)
    sink: int = 0  # the first `sink` keys stay visible under a window
    layer_window: bool = False  # honours the model's per-layer `window=` argument
    sink_logits: bool = False  # honours the model's per-head `sinks=` logits
    # What the last call ran ("triton.prefill", "torch.sdpa", "fused:QuantLayer"...), recorded by the runner.
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
        self, q: torch.Tensor, layer_cache: CacheLayer, *, tree_mask: torch.Tensor | None = None, **layer
    ) -> torch.Tensor:
        """Attention of the T (few) newest queries over everything in `layer_cache` (already appended). `layer`:
        the model's per-layer `window` / `sinks` (only for backends declaring `layer_window` / `sink_logits`), which
        a codec's fused kernel does not follow, so they attend over `dense()`."""
        out = None if layer else self.codec_decode(q, layer_cache, tree_mask)
        if out is not None:
            return out
        k, v = layer_cache.dense()
        return self.prefill(q, k, v, q_offset=k.shape[2] - q.shape[2], tree_mask=tree_mask, **layer)

    def codec_decode(self, q: torch.Tensor, layer_cache: CacheLayer, tree_mask=None) -> torch.Tensor | None:
        """The codec's fused kernel over its own storage when this backend declares `fused_codec_decode` and the
        codec has one (`layer_cache.attend`); None otherwise (the caller attends over `dense()`)."""
        if tree_mask is not None or not self.fused_codec_decode:
            return None
        out = layer_cache.attend(q, self)
        if out is not None:
            self.last_path = f"fused:{layer_cache.__class__.__name__}"
        return out

    def decode_schedule(self, kv_len: int, block_k: int, *, num_queries: int = 1,
                        device: torch.device | None = None) -> DecodeSchedule | None:
        """Which keys the newest `num_queries` queries (the last at position kv_len - 1) visit, in `block_k`-key
        blocks, for a codec's fused kernel; None when this backend has no schedule such a kernel can follow (the
        codec then returns None from `attend` and the backend attends over `dense()`). Dense backends visit
        everything."""
        return DecodeSchedule()

    def prefill_mask_bytes(self, q_len: int, kv_len: int, element_size: int, device: torch.device) -> int:
        """Bytes of masks a `prefill` of q_len queries over kv_len keys with q_offset > 0 holds at once on `device`
        (the memory check's sizing of a later prompt chunk). Default: a bool [q_len, kv_len] mask and the additive
        copy in the model dtype that torch's SDPA makes of it for its memory-efficient kernel (sdpa; 320 MiB at
        4096 x 40,960 in bf16)."""
        return q_len * kv_len * (1 + element_size)

    def visible_fraction(self, q_len: int, kv_len: int, q_offset: int) -> float:
        """The fraction of causally visible (query, key) pairs this backend actually attends to, for T = q_len
        queries at positions q_offset.. over kv_len keys: 1.0 for dense backends. Tasks report 1 minus this as
        the keys the backend masked."""
        return 1.0

    def describe(self) -> dict:
        """Plugin parameters and runtime choices, for metrics.json."""
        return {"attention_path": self.last_path}


def causal_mask(t: int, s: int, q_offset: int, device, tree_mask: torch.Tensor | None = None,
                window: int = 0) -> torch.Tensor:
    """Bool [T, S]: True where key s is visible to query t (s <= q_offset + t, and s > q_offset + t - window when
    `window`), with an optional tree mask among the trailing T keys. Under a tree mask a block token's position is
    q_offset + its depth (its row's ancestors, itself included, less one: t for a chain), the position it would have
    decoded at, and the window applies to held and block keys by those positions."""
    k_pos = torch.arange(s, device=device)[None, :]
    if tree_mask is None:
        q_pos = torch.arange(t, device=device)[:, None] + q_offset
        mask = k_pos <= q_pos
        if window:
            mask &= k_pos > q_pos - window
        return mask
    tree = tree_mask.to(device=device, dtype=torch.bool)
    depth = tree.sum(-1) - 1
    q_pos = q_offset + depth[:, None]
    k_pos = torch.cat((k_pos[:, : s - t], q_offset + depth[None, :]), dim=1)  # block keys at their nodes' positions
    mask = torch.cat((k_pos[:, : s - t] <= q_pos, tree), dim=1)
    if window:
        mask &= k_pos > q_pos - window
    return mask


def causal_pairs(q_len: int, kv_len: int, q_offset: int) -> int:
    """Visible (query, key) pairs under the plain causal rule: the query at position p sees min(p + 1, S) keys."""
    last = max(min(q_offset + q_len, kv_len), q_offset)  # queries q_offset..last-1 see keys 0..p
    inside = last - q_offset
    return inside * (q_offset + 1 + last) // 2 + (q_len - inside) * kv_len


__all__ = ["AttentionBackend", "DecodeSchedule", "causal_mask", "causal_pairs"]
