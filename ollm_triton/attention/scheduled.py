"""The shared machinery of the block-schedule backends (flash, sliding_window, sparse, multiscale).

A subclass says which keys a query sees by setting `window`, `sink`, `window_align` and `pattern`; this class
turns that into block schedules for the prefill kernel, visited-block lists for the decode kernel and for fused
codec kernels (`decode_schedule`), and dense masks for the PyTorch reference. CUDA tensors take the Triton path,
anything else (the CPU runs) the reference; `last_path` says which ran.

A subclass that declares `layer_window` / `sink_logits` (flash) takes the model's own rule per call (gpt-oss): a
`window` becomes the schedule's window (keys p - window < s <= p, no token sinks; such a backend has no window of
its own), `sinks` [Hq] go to the kernels' epilogue (prefill) or split merge (decode) as one more softmax
denominator term per head. The others refuse either in one line (the engine refuses such a model before that).
"""

from __future__ import annotations

from collections import OrderedDict

import torch

from ollm_triton.attention.base import AttentionBackend, DecodeSchedule, causal_mask, causal_pairs
from ollm_triton.cache.base import CacheLayer
from ollm_triton.kernels.attention_decode import decode_supports, flash_decode
from ollm_triton.kernels.attention_prefill import (
    attention_reference,
    check_qkv,
    flash_prefill,
    kernel_supports,
    prefill_config,
)
from ollm_triton.kernels.attention_schedule import (
    BlockPattern,
    BlockSchedule,
    build_schedule,
    decode_block_ids,
    schedule_to_mask,
)

DECODE_BLOCK = 64  # keys per block of the decode kernel (and of decode_schedule's default)
REFERENCE_TILE = 64
REFERENCE_GATHER_SCORES = 1 << 20  # queries x keys up to which the reference gathers the visible keys first


class ScheduledAttention(AttentionBackend):
    """Base of the Triton block-schedule backends (not a plugin itself)."""

    window: int = 0
    sink: int = 0
    window_align: int = 1
    pattern: BlockPattern | None = None
    # None: Triton on CUDA tensors, the reference elsewhere. True forces the kernels (the interpreter on the CPU,
    # for tests); False forces the reference.
    use_kernels: bool | None = None

    @property
    def dense_causal(self) -> bool:
        """Plain causal attention over every key (flash with no window and no pattern)."""
        return self.window == 0 and self.pattern is None

    def __init__(self, cfg=None):
        self.cfg = cfg
        self.last_path = "none"
        self._schedules: OrderedDict[tuple, BlockSchedule] = OrderedDict()
        self._decode_ids: OrderedDict[tuple, torch.Tensor | None] = OrderedDict()

    # ---- schedules --------------------------------------------------------------------------------------------
    def tiles(self, head_dim: int, dtype: torch.dtype, q_len: int) -> tuple[int, int]:
        """(block_m, block_n) for the prefill kernel; a sparse pattern's block must be a multiple of both."""
        cfg = prefill_config(head_dim, dtype, q_len)
        bm, bn = cfg.block_m, cfg.block_n
        if self.pattern is not None:
            bm, bn = min(bm, self.pattern.block_size), min(bn, self.pattern.block_size)
        return bm, bn

    def prefill_mask_bytes(self, q_len: int, kv_len: int, element_size: int, device: torch.device) -> int:
        """The kernels read a block schedule, not a mask (a few bytes a block); the reference path masks densely."""
        kernels = torch.device(device).type == "cuda" if self.use_kernels is None else self.use_kernels
        return 0 if kernels else super().prefill_mask_bytes(q_len, kv_len, element_size, device)

    def rule(self, window: int = 0) -> tuple[int, int, int]:
        """(window, sink, window_align) of a call: the backend's own, or the model's per-layer `window` (a backend
        declaring `layer_window` has none of its own: check_layer_rule)."""
        return (window, 0, 1) if window else (self.window, self.sink, self.window_align)

    def check_layer_rule(self, window: int, sinks: torch.Tensor | None) -> None:
        """One-line ValueError for a per-layer window or sink logits this backend does not declare."""
        name = getattr(self, "plugin_name", type(self).__name__)
        if window < 0:
            raise ValueError(f"attention '{name}': window must be >= 0 keys (0 = none), got {window}")
        if (window and not self.layer_window) or (sinks is not None and not self.sink_logits):
            what = "a per-layer window" if window and not self.layer_window else "sink logits"
            raise ValueError(f"attention '{name}' does not honour {what} (it declares layer_window="
                             f"{self.layer_window}, sink_logits={self.sink_logits}); use attention=flash or sdpa")
        if window and self.window:
            raise ValueError(f"attention '{name}' has a window of its own ({self.window}); a per-layer window "
                             f"({window}) needs a backend without one")

    def schedule(self, q_len: int, kv_len: int, q_offset: int, block_m: int, block_n: int, device,
                 tree: bool = False, window: int = 0) -> BlockSchedule:
        """The block schedule of one call (`window`: the model's per-layer window, 0 = the backend's own rule); the
        last few are kept (every layer of a forward asks for the same)."""
        key = (q_len, kv_len, q_offset, block_m, block_n, str(device), tree, window)
        hit = self._schedules.get(key)
        if hit is not None:
            self._schedules.move_to_end(key)
            return hit
        w, sink, align = self.rule(window)
        sched = build_schedule(q_len, kv_len, q_offset, block_m, block_n, device=device, window=w, sink=sink,
                               window_align=align, tree=tree, pattern=self.pattern)
        self._schedules[key] = sched
        if len(self._schedules) > 12:  # gpt-oss alternates windowed and full layers: both kept
            self._schedules.popitem(last=False)
        return sched

    def mask(self, q_len: int, kv_len: int, q_offset: int, tree_mask: torch.Tensor | None = None, device=None,
             window: int = 0):
        """A function rows -> bool [rows, S]: the dense mask of this backend (what the reference applies). Under a
        tree mask a per-layer window follows base.causal_mask (block tokens at their depths' positions)."""
        tile = min(REFERENCE_TILE, self.pattern.block_size) if self.pattern is not None else REFERENCE_TILE
        tree = tree_mask is not None
        sched = self.schedule(q_len, kv_len, q_offset, tile, tile, device, tree, 0 if tree else window)
        if not (tree and window):
            return lambda rows: schedule_to_mask(sched, tree_mask, rows)
        windowed = causal_mask(q_len, kv_len, q_offset, device, tree_mask, window=window)
        return lambda rows: schedule_to_mask(sched, tree_mask, rows) & windowed[rows]

    # ---- prefill ----------------------------------------------------------------------------------------------
    def prefill(self, q, k, v, *, q_offset, tree_mask=None, window: int = 0, sinks: torch.Tensor | None = None):
        """`window`, `sinks`: the model's per-layer rule (attention/base.py), for backends that declare it."""
        check_qkv(q, k, v)
        self.check_layer_rule(window, sinks)
        t = q.shape[2]
        if tree_mask is not None and tuple(tree_mask.shape) != (t, t):
            raise ValueError(f"tree_mask must be bool [T, T] = [{t}, {t}], got {tuple(tree_mask.shape)}")
        layer = layer_rule(window, sinks)
        # A tree under a per-layer window places block tokens at their depths' positions, which the kernel's
        # per-row rule does not know: those (few-query) verify calls take the reference.
        if self._kernels(q) and kernel_supports(q, k) and not (window and tree_mask is not None):
            self.last_path = "triton.prefill"
            return self.kernel_prefill(q, k, v, q_offset, tree_mask, **layer)
        self.last_path = "torch.reference"
        return self.reference(q, k, v, q_offset=q_offset, tree_mask=tree_mask, **layer)

    def _kernels(self, q: torch.Tensor) -> bool:
        return q.is_cuda if self.use_kernels is None else self.use_kernels

    def kernel_prefill(self, q, k, v, q_offset, tree_mask, window: int = 0, sinks: torch.Tensor | None = None):
        bm, bn = self.tiles(q.shape[3], q.dtype, q.shape[2])
        sched = self.schedule(q.shape[2], k.shape[2], q_offset, bm, bn, q.device, tree_mask is not None, window)
        return flash_prefill(q, k, v, sched, tree_mask=tree_mask, sinks=sinks)

    def reference(self, q, k, v, *, q_offset, tree_mask=None, compute_dtype=None, window: int = 0,
                  sinks: torch.Tensor | None = None):
        """The PyTorch path: softmax attention under this backend's dense mask (and the model's per-layer window
        and sinks), in float32 (or compute_dtype)."""
        t, s = q.shape[2], k.shape[2]
        mask = self.mask(t, s, q_offset, tree_mask, q.device, window)
        if t * s <= REFERENCE_GATHER_SCORES:
            # a few queries (decode, chunked scoring): attend over the keys some query sees, not all s -- a window
            # of 1024 in an 8k cache reads an eighth of it. The dropped columns were masked: same softmax.
            mask = mask(slice(0, t))  # built once, whether or not the keys are gathered
            cols = mask.any(0).nonzero().flatten()
            if cols.numel() < s // 2:
                k, v, mask = k.index_select(2, cols), v.index_select(2, cols), mask.index_select(1, cols)
        return attention_reference(q, k, v, mask, compute_dtype=compute_dtype or torch.float32, sinks=sinks)

    # ---- decode -----------------------------------------------------------------------------------------------
    def decode(self, q, layer_cache: CacheLayer, *, tree_mask=None, window: int = 0,
               sinks: torch.Tensor | None = None):
        """With the model's per-layer rule (`window`, `sinks`) a codec's fused kernel is not asked (it follows this
        backend's schedule, not the layer's sinks): the split-K kernel reads dense() under the layer's window and
        its merge adds the sinks."""
        self.check_layer_rule(window, sinks)
        layer = layer_rule(window, sinks)
        out = None if layer else self.codec_decode(q, layer_cache, tree_mask)
        if out is not None:
            return out
        k, v = layer_cache.dense()
        t, s = q.shape[2], k.shape[2]
        if tree_mask is None and self._kernels(q) and decode_supports(q, k) and self.decode_kernel_fits(t, s):
            block = self.decode_block()
            ids = self.decode_ids(s, t, block, q.device, window)
            w, sink, align = self.rule(window)
            self.last_path = "triton.decode"
            return flash_decode(q, k, v, block_ids=ids, block_n=block, window=w, sink=sink, window_align=align,
                                sinks=sinks)
        return self.prefill(q, k, v, q_offset=s - t, tree_mask=tree_mask, **layer)

    def decode_ids(self, kv_len: int, q_len: int, block: int, device, window: int = 0) -> torch.Tensor | None:
        """decode_block_ids for this backend (or the model's per-layer `window`), kept for the last few lengths:
        every layer of a decode step asks for the same ones (building them costs ~1 ms on the host for a sparse
        pattern)."""
        key = (kv_len, q_len, block, str(device), window)
        if key not in self._decode_ids:
            w, sink, align = self.rule(window)
            self._decode_ids[key] = decode_block_ids(kv_len, q_len, block, window=w, sink=sink, window_align=align,
                                                     pattern=self.pattern, device=device)
            if len(self._decode_ids) > 8:
                self._decode_ids.popitem(last=False)
        return self._decode_ids[key]

    def decode_block(self) -> int:
        return min(DECODE_BLOCK, self.pattern.block_size) if self.pattern is not None else DECODE_BLOCK

    def decode_kernel_fits(self, q_len: int, kv_len: int) -> bool:
        """The decode kernel has one block list for all T queries: with a sparse pattern they must share a row."""
        if self.pattern is None:
            return True
        bs = self.pattern.block_size
        return (kv_len - q_len) // bs == (kv_len - 1) // bs

    def decode_schedule(self, kv_len: int, block_k: int, *, num_queries: int = 1,
                        device=None) -> DecodeSchedule | None:
        """Keys the newest `num_queries` queries (the last at position kv_len - 1) visit, in `block_k`-key blocks:
        ascending int32 block ids (None = all) on `device` (default CPU), plus the window/sink element rules.
        Raises ValueError when the queries span rows of a sparse pattern (no one block list serves them)."""
        if self.window_align != 1:
            return None  # an aligned window (multiscale) is not a rule the codec kernels know
        ids = decode_block_ids(kv_len, num_queries, block_k, window=self.window, sink=self.sink,
                               pattern=self.pattern, device=device)
        return DecodeSchedule(block_ids=ids, window=self.window, sink=self.sink)

    def visible_fraction(self, q_len: int, kv_len: int, q_offset: int) -> float:
        """Counted on this backend's dense mask, a tile of rows at a time."""
        total = causal_pairs(q_len, kv_len, q_offset)
        if total == 0 or self.dense_causal:
            return 1.0
        mask = self.mask(q_len, kv_len, q_offset)
        seen = sum(int(mask(slice(r, min(r + 256, q_len))).sum()) for r in range(0, q_len, 256))
        return seen / total

    def describe(self) -> dict:
        info = {"attention_path": self.last_path}
        if self.cfg is not None and hasattr(self.cfg, "__dataclass_fields__"):
            info.update({f"attention_{k}": getattr(self.cfg, k) for k in self.cfg.__dataclass_fields__})
        return info


def layer_rule(window: int, sinks: torch.Tensor | None) -> dict:
    """The per-layer keyword arguments to pass on: {} for plain causal attention (so backends whose kernel_prefill
    and reference take none, multiscale, are called as before)."""
    layer = {}
    if window:
        layer["window"] = window
    if sinks is not None:
        layer["sinks"] = sinks
    return layer
