"""`streaming`: StreamingLLM's cache, the first `sink` tokens (attention sinks) plus the most recent tokens."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ollm_triton.cache.base import CacheLayer, LayerSpec
from ollm_triton.cache.eviction import EvictingCodec, EvictingLayer, EvictionParams
from ollm_triton.cache.storage import wrap_store
from ollm_triton.registry import register


@dataclass
class StreamingConfig(EvictionParams):
    sink: int = 4  # initial tokens never evicted

    def check(self) -> None:
        super().check()
        if self.sink < 0:
            raise ValueError(f"sink must be >= 0, got {self.sink}")
        if self.budget and self.budget <= self.sink:
            raise ValueError(f"budget ({self.budget}) must exceed sink ({self.sink})")


class StreamingLayer(EvictingLayer):
    """Keeps positions [0, sink) and the newest budget - sink. Needs no scores, so it also evicts at the start of
    the next append when the engine does not call `observe`."""

    def __init__(self, spec: LayerSpec, cfg: StreamingConfig):
        super().__init__(spec, cfg, min_budget=cfg.sink + 1)
        self.sink = cfg.sink

    def evict_pending(self) -> None:
        if self.over_budget():
            with self.encode_timer.region():
                self.keep(self.select(self.budget()))

    def select(self, budget: int) -> torch.Tensor:
        s = self.spec
        sink = min(self.sink, self.n)  # the sinks are the first held tokens: they are never evicted
        idx = torch.cat((torch.arange(sink), torch.arange(self.n - (budget - sink), self.n))).to(s.device)
        return idx.expand(s.batch, s.kv_heads, -1)


@register("cache", "streaming", StreamingConfig)
class Streaming(EvictingCodec):
    """StreamingLLM eviction: `sink` first tokens plus a recent window, `budget` tokens or `ratio` of those seen."""

    def __init__(self, cfg: StreamingConfig):
        self.cfg = cfg

    def new_layer(self, spec: LayerSpec) -> CacheLayer:
        return wrap_store(StreamingLayer(spec, self.cfg), self.cfg, self)
