"""Where continuous batching keeps each request's KV, and how one decode step runs over every running request.

Two layouts, chosen from what the plugins declare (the engine's `fast_path`):

- `CacheRows` (any codec, any backend): each request owns a KVCache of the run's codec, sized to it and freed with
  it, so a compressing codec directly raises how many requests fit. A decode step is `Engine.decode_rows`: one
  model step over the running rows, the matmuls batched, attention through the plugins over each row's own cache.
- `SlotRows` (when the whole static decode step applies: a dense-causal backend, a codec with a static decode step
  (`CacheCodec.static_decode`: dense, or the quantized codecs), resident weights): `max_batch` slot rows of one
  pre-allocated cache of the run's codec. A request takes a free slot and is prefilled into that row (a row view
  of the codec's storage); a decode step replays the captured static step (engine/fast_decode.py) of the smallest
  bucket size n in 1, 2, 4, ... covering the highest slot in use, over rows 0..n-1 of the shared buffers (each
  row at its own position, its own length read on the device). Rows inside the bucket that are not decoding (free,
  or still being prefilled) are computed at a scratch position past every request's tokens (the last two slots,
  which admission keeps free: a capture's warm-up steps twice) and ignored: `padding_rows` counts them. A codec that
  declares `static_sync` (quantized: a full residual window is quantized on the host) is told a running row's
  length after the steps its first layer's `sync_due` flags (one host check a row and step; the layers of a row
  that filled its window are told then), and at release.

Both hand out a per-request `KVCache` (its `position` = tokens it holds) and give logits [B, V] for a step.
"""

from __future__ import annotations

import torch

from ollm_triton.cache.base import KVCache
from ollm_triton.engine.fast_decode import sync_layers


class CacheRows:
    """Each request its own KVCache of the run's codec (see the module docstring)."""

    kind = "codec caches"
    # a linear-attention layer keeps one earlier state, not a verify block's 16: the scheduler rolls a row back one
    # decode step when a batched step fails part-way (serve/scheduler.py `_rollback`); 16 would hold 1.24 GB more a
    # request on Qwen3-Next-80B. Admission counts the one (Scheduler.kv_bytes).
    rollback_tokens = 1

    def __init__(self, engine):
        self.engine = engine
        self.padding_rows = 0

    def allocate(self, tokens: int) -> KVCache:
        return self.engine.new_cache(batch=1, max_len=tokens, rollback_tokens=self.rollback_tokens)

    def release(self, cache: KVCache) -> KVCache:
        return cache  # the cache itself can serve a later prefix hit

    def free(self, cache: KVCache) -> None:
        pass  # dropped with the request

    def adopt(self, cache: KVCache, prefix: KVCache) -> KVCache:
        return prefix  # a prefix-cache hit is this layout's own cache: use it as is

    def prefill(self, caches: list[KVCache], ids: torch.Tensor) -> torch.Tensor:
        """ids: [B, T], one row a cache -> float32 logits [B, V] of each row's last token; appends to the caches."""
        return self.engine.forward_rows(ids, caches, last_only=True)[:, -1]

    def decode(self, caches: list[KVCache], tokens: torch.Tensor, greedy: list[bool]) -> tuple[torch.Tensor, None]:
        """tokens [B] -> (float32 logits [B, V], None: no in-step argmax)."""
        return self.engine.decode_rows(tokens, caches), None

    def bytes_held(self, caches: list[KVCache]) -> int:
        return sum(layer.held_bytes() for c in caches for layer in c.layers)


class SlotRows:
    """Slot rows of one static cache of the run's codec, decoded by the captured static step (see the module
    docstring)."""

    kind = "static slots"
    rollback_tokens = 0  # no state layers: hybrid models have no static step (ModelConfig.static_step_blocker)

    def __init__(self, engine, max_batch: int, max_context: int):
        self.engine = engine
        self.fast = engine.fast_decoder()
        if self.fast is None or self.fast.piecewise:
            raise ValueError(f"slot rows need the whole static decode step; this engine runs {engine.fast_path}")
        self.full = self.fast.new_bucket(max_batch, max_context + 2)
        self.capacity = max_context  # tokens a request may hold
        self.scratch = self.full.capacity - 2
        for layer in self.full.cache.layers:  # the views of the decode buckets inherit it
            layer.scratch_from = self.scratch
        self.free_slots = list(range(max_batch))  # the lowest free slot first keeps the bucket small
        self.slot_of: dict[int, int] = {}  # id(cache) -> slot
        self.views = {}
        self.padding_rows = 0
        self.sync = engine.codec.static_sync
        self._spec = engine.layer_spec(1, max_context)

    def allocate(self, tokens: int) -> KVCache:
        if tokens > self.capacity:
            raise ValueError(f"a request of {tokens} tokens exceeds the slot capacity {self.capacity}")
        slot = self.free_slots.pop(0)
        cache = self.full.row_cache(slot)
        self.slot_of[id(cache)] = slot
        return cache

    def release(self, cache: KVCache) -> KVCache | None:
        """Free the slot; a copy of the row's K/V (for the prefix cache) in the run's codec."""
        n = cache.position
        copy = None
        if n > 0:
            copy = self.engine.new_cache(batch=1, max_len=n)
            if self.sync:  # told only at due steps so far (sync_due)
                sync_layers(cache, n)
            for row, dst in zip(cache.layers, copy.layers, strict=True):
                if not self.sync:  # the static step wrote this row's K/V behind the layer's back
                    row.set_length(n)
                dst.append(*row.dense())
            copy.position = n
        self.free(cache)
        return copy

    def free(self, cache: KVCache) -> None:
        slot = self.slot_of.pop(id(cache), None)
        if slot is not None:
            self.free_slots.append(slot)
            self.free_slots.sort()

    def adopt(self, cache: KVCache, prefix: KVCache) -> KVCache:
        """Copy a prefix cache's K/V into this request's row."""
        for layer, src in zip(cache.layers, prefix.layers, strict=True):
            k, v = src.dense()
            layer.append(k, v)
        cache.position = prefix.position
        return cache

    def prefill(self, caches: list[KVCache], ids: torch.Tensor) -> torch.Tensor:
        return self.engine.forward_rows(ids, caches, last_only=True)[:, -1]

    def _view(self, n: int):
        size = 1
        while size < n:
            size *= 2
        size = min(size, self.full.batch)
        if size not in self.views:
            self.views[size] = self.full.rows(size)
        return self.views[size]

    def decode(self, caches: list[KVCache], tokens: torch.Tensor, greedy: list[bool]):
        """One replay of the static step over the bucket covering the slots in use. Returns (logits [B, V], argmax
        [B] computed inside the step) in the order of `caches`."""
        slots = [self.slot_of[id(c)] for c in caches]
        bk = self._view(max(slots) + 1)
        dev = self.engine.device
        pos = torch.full((bk.batch,), self.scratch, dtype=torch.long)
        tok = torch.zeros(bk.batch, dtype=torch.long)
        index = torch.tensor(slots, dtype=torch.long)
        pos[index] = torch.tensor([c.position for c in caches], dtype=torch.long)
        tok[index] = tokens.cpu()
        bk.pos.copy_(pos.to(dev))
        bk.token.copy_(tok.to(dev))
        self.fast.replay(bk)
        for c in caches:
            c.position += 1
            if self.sync and c.layers[0].sync_due(c.position):  # one host check a row; all layers only when due
                sync_layers(c, c.position)
        self.padding_rows += bk.batch - len(caches)
        index = index.to(dev)
        return bk.logits.index_select(0, index), bk.token.index_select(0, index)

    def bytes_held(self, caches: list[KVCache]) -> int:
        per_layer = sum(self.engine.codec.bytes_for(self._spec, c.position) for c in caches)
        return int(per_layer * self.engine.config.num_layers)


__all__ = ["CacheRows", "SlotRows"]
