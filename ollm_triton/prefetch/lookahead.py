"""`lookahead`: prefetch the next `prefetch_distance` layers while the current one computes, keep up to
`max_cache_size` layers in device slots.

Eviction is LRU by default, as oLLM-style streamers do. For the cyclic order in which decoder layers run, LRU
always reclaims the layer needed soonest after the window, so with fewer slots than layers nothing survives a whole
forward: the slots beyond the distance only add slack. `eviction: next_use` reclaims the cached layer whose next use
is furthest away (Belady's rule, exact here because the order is known), which keeps `max_cache_size - distance - 1`
layers resident across forwards and cuts the bytes read per token accordingly.
"""

from __future__ import annotations

from dataclasses import dataclass

from ollm_triton.prefetch.layer_streaming import EVICTIONS, StreamingConfig, StreamingPolicy
from ollm_triton.prefetch.store import WeightStore
from ollm_triton.registry import register


@dataclass
class LookaheadConfig(StreamingConfig):
    prefetch_distance: int = 2  # layers loaded ahead of the one computing
    max_cache_size: int = 4  # device slots (layers); at least prefetch_distance + 1
    eviction: str = "lru"  # lru | next_use

    def check(self) -> None:
        super().check()
        if self.prefetch_distance < 1:
            raise ValueError(f"prefetch_distance must be >= 1, got {self.prefetch_distance}")
        if self.max_cache_size < self.prefetch_distance + 1:
            raise ValueError(f"max_cache_size must be >= prefetch_distance + 1 = {self.prefetch_distance + 1}, "
                             f"got {self.max_cache_size}")
        if self.eviction not in EVICTIONS:
            raise ValueError(f"eviction must be one of {', '.join(EVICTIONS)}, got {self.eviction!r}")


@register("prefetch", "lookahead", LookaheadConfig)
class Lookahead(StreamingPolicy):
    """Prefetch prefetch_distance layers ahead on worker threads and a side stream; cache max_cache_size layers."""

    def __init__(self, cfg: LookaheadConfig | None = None, store: WeightStore | None = None):
        super().__init__(cfg or LookaheadConfig(), store)
        self.distance = self.cfg.prefetch_distance
        self.eviction = self.cfg.eviction

    def plan_slots(self, allowed: int) -> int:
        return min(self.cfg.max_cache_size, allowed)

    def setup(self, model, device) -> None:
        super().setup(model, device)
        self.distance = min(self.distance, self.pool.num_slots - 1)
