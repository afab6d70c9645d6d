"""`sliding_window`: each query sees the `sink` first tokens and the last `window` tokens (StreamingLLM-style)."""

from __future__ import annotations

from dataclasses import dataclass

from ollm_triton.attention.scheduled import ScheduledAttention
from ollm_triton.registry import register


@dataclass
class SlidingWindowConfig:
    window: int = 4096  # keys p - window < s <= p are visible to the query at position p
    sink: int = 4  # the first `sink` keys stay visible to every query

    def check(self) -> None:
        if self.window < 1:
            raise ValueError(f"window must be >= 1, got {self.window}")
        if self.sink < 0:
            raise ValueError(f"sink must be >= 0, got {self.sink}")


@register("attention", "sliding_window", SlidingWindowConfig)
class SlidingWindow(ScheduledAttention):
    """Attend to `sink` initial tokens plus the last `window` tokens, in prefill and in decode."""

    def __init__(self, cfg: SlidingWindowConfig | None = None):
        cfg = cfg or SlidingWindowConfig()
        super().__init__(cfg)
        self.window, self.sink = cfg.window, cfg.sink
