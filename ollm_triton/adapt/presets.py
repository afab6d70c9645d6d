"""`+adapt=none` (the baseline: nothing adapts) and `+adapt=all` (every strategy, each with its own defaults)."""

from __future__ import annotations

from dataclasses import dataclass

from ollm_triton.adapt.base import Adapter, AdaptParams
from ollm_triton.adapt.memory import MemoryParams, MemoryStrategy
from ollm_triton.adapt.power import PowerParams, PowerStrategy
from ollm_triton.adapt.prefetch import PrefetchParams, PrefetchStrategy
from ollm_triton.adapt.speculative import DraftLengthController, DraftLengthParams, SpeculativeParams
from ollm_triton.registry import register


@register("adapt", "none", AdaptParams)
class NoAdapter(Adapter):
    """No run-time controller: every strategy stays as launched (the codec is not wrapped)."""

    active = False


@dataclass
class AllParams(MemoryParams, PrefetchParams, SpeculativeParams, PowerParams):
    def check(self) -> None:
        for schema in (MemoryParams, PrefetchParams, DraftLengthParams, PowerParams):
            schema.check(self)


@register("adapt", "all", AllParams)
class AllAdapter(Adapter):
    """Every strategy: KV codec under memory pressure, prefetch distance, draft length, power/temperature pause."""

    def build_strategies(self, cfg):
        memory = MemoryStrategy(cfg)
        memory.adapter = self
        return [memory, PrefetchStrategy(cfg), DraftLengthController(cfg, self), PowerStrategy(cfg)]
