"""`memory_aware`: a lookahead whose cache takes the device memory that is free, and gives it back under pressure.

At setup the slot count is what fits in min(budget, free device memory - `reserve_gb`) (capped by
`max_cache_size`); at the start of every forward free memory is measured again (CUDA: the driver's free memory
plus PyTorch's cached but unused blocks; CPU: the host's available memory): below `reserve_gb` the cache drops
cached layers (least useful first) and returns their memory to the driver; with a slot's worth to spare above the
reserve it grows by one slot, up to the plan. The prefetch distance never exceeds slots - 1, down to plain
on-demand loading with one slot.

Eviction defaults to `next_use`: a cache that holds part of the model keeps the same layers across forwards (LRU
would keep none under the cyclic layer order).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import psutil
import torch

from ollm_triton.prefetch.layer_streaming import EVICTIONS, StreamingConfig, StreamingPolicy
from ollm_triton.prefetch.store import WeightStore
from ollm_triton.registry import register

GB = 1e9


@dataclass
class MemoryAwareConfig(StreamingConfig):
    prefetch_distance: int = 2
    max_cache_size: int | None = None  # slot cap (null: as many as memory and budget allow, up to every layer)
    reserve_gb: float = 1.0  # free device memory to leave for others; below it the cache shrinks
    eviction: str = "next_use"  # lru | next_use

    def check(self) -> None:
        super().check()
        if self.prefetch_distance < 1:
            raise ValueError(f"prefetch_distance must be >= 1, got {self.prefetch_distance}")
        if self.max_cache_size is not None and self.max_cache_size < 1:
            raise ValueError(f"max_cache_size must be >= 1 or null, got {self.max_cache_size}")
        if self.reserve_gb < 0:
            raise ValueError(f"reserve_gb must be >= 0, got {self.reserve_gb}")
        if self.eviction not in EVICTIONS:
            raise ValueError(f"eviction must be one of {', '.join(EVICTIONS)}, got {self.eviction!r}")


@register("prefetch", "memory_aware", MemoryAwareConfig)
class MemoryAware(StreamingPolicy):
    """Cache as many layers as free device memory allows; shrink the cache when free memory runs low."""

    def __init__(self, cfg: MemoryAwareConfig | None = None, store: WeightStore | None = None):
        super().__init__(cfg or MemoryAwareConfig(), store)
        self.distance = self.cfg.prefetch_distance
        self.eviction = self.cfg.eviction
        self.shrinks = self.grows = 0

    def free_bytes(self) -> int:
        """Device memory this process could still take."""
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            return int(free + torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(self.device))
        return int(psutil.virtual_memory().available)

    def min_slots(self) -> int:
        return 1

    def _target(self) -> int:
        cap = self.cfg.max_cache_size or self.num_layers
        return min(cap, self.allowed_slots)

    def plan_slots(self, allowed: int) -> int:
        by_free = int((self.free_bytes() - self.cfg.reserve_gb * GB) // self.slot_bytes)
        return max(1, min(self.cfg.max_cache_size or self.num_layers, allowed, by_free))

    def setup(self, model, device) -> None:
        super().setup(model, device)
        self.distance = min(self.cfg.prefetch_distance, self.pool.num_slots - 1)

    def forward_start(self) -> None:
        free, reserve, slots = self.free_bytes(), self.cfg.reserve_gb * GB, self.pool.num_slots
        if free < reserve and slots > 1:
            want = max(1, slots - math.ceil((reserve - free) / self.slot_bytes))
            self.shrinks += 1
        elif free - reserve >= self.slot_bytes and slots < self._target():
            want = slots + 1
            self.grows += 1
        else:
            return
        slots = self.resize_slots(want)
        self.distance = min(self.cfg.prefetch_distance, slots - 1)

    def stats(self) -> dict[str, float]:
        out = super().stats()
        if out:
            out.update({"shrinks": float(self.shrinks), "grows": float(self.grows)})
        return out
