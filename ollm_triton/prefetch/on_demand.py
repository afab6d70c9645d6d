"""`on_demand`: load each decoder layer just before it runs and free it right after (the streaming baseline)."""

from __future__ import annotations

from dataclasses import dataclass

from ollm_triton.prefetch.layer_streaming import StreamingConfig, StreamingPolicy
from ollm_triton.prefetch.store import WeightStore
from ollm_triton.registry import register


@dataclass
class OnDemandConfig(StreamingConfig):
    pass


@register("prefetch", "on_demand", OnDemandConfig)
class OnDemand(StreamingPolicy):
    """Load each layer when it is needed into one device slot and free it after: I/O never overlaps compute."""

    discard_after_use = True

    def __init__(self, cfg: OnDemandConfig | None = None, store: WeightStore | None = None):
        super().__init__(cfg or OnDemandConfig(), store)
        self.distance = 0

    def plan_slots(self, allowed: int) -> int:
        return 1
