"""`adaptive`: a lookahead that tunes its prefetch distance, and with it its device slots, from what it measures.

After every forward it looks at that forward's stall (time blocked waiting for loads, as a share of the forward's
time) and its misses (late prefetches and demand loads), and moves the distance by one (`DistanceTuner`):
- grow when the stall share exceeds `stall_target` and there were misses; the grow is kept only if the next
  forward's stall time fell by at least `min_gain`, otherwise the distance steps back and stays for `patience`
  forwards (when bandwidth, not lead time, bounds the run, a longer distance buys nothing but memory);
- shrink after `patience` forwards without a miss, handing a slot's memory back.
Slots are always distance + 1, within the budget.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from ollm_triton.prefetch.layer_streaming import EVICTIONS, StreamingConfig, StreamingPolicy
from ollm_triton.prefetch.store import WeightStore
from ollm_triton.registry import register


@dataclass
class AdaptiveConfig(StreamingConfig):
    initial_distance: int = 1
    min_distance: int = 1
    max_distance: int = 8
    stall_target: float = 0.05  # stall share of a forward above which the distance grows
    min_gain: float = 0.1  # a grow must cut the stall time by this share to be kept
    patience: int = 3  # forwards without a miss before shrinking; forwards frozen after a grow that did not pay
    eviction: str = "lru"  # lru | next_use

    def check(self) -> None:
        super().check()
        if not 1 <= self.min_distance <= self.initial_distance <= self.max_distance:
            raise ValueError("need 1 <= min_distance <= initial_distance <= max_distance, got "
                             f"{self.min_distance}, {self.initial_distance}, {self.max_distance}")
        if not 0 <= self.stall_target < 1 or not 0 <= self.min_gain < 1:
            raise ValueError(f"stall_target and min_gain must be in [0, 1), got {self.stall_target}, {self.min_gain}")
        if self.patience < 1:
            raise ValueError(f"patience must be >= 1, got {self.patience}")
        if self.eviction not in EVICTIONS:
            raise ValueError(f"eviction must be one of {', '.join(EVICTIONS)}, got {self.eviction!r}")


class DistanceTuner:
    """The distance rule of `adaptive`, apart from any I/O so that it can be tested on its own."""

    def __init__(self, distance: int, lo: int, hi: int, *, stall_target: float, min_gain: float, patience: int):
        self.distance, self.lo, self.hi = distance, lo, hi
        self.stall_target, self.min_gain, self.patience = stall_target, min_gain, patience
        self._trial: tuple[int, float] | None = None  # (distance before a grow, stall seconds then)
        self._frozen = 0
        self._calm = 0
        self.changes = 0

    def update(self, stall_s: float, forward_s: float, misses: int) -> int:
        share = stall_s / forward_s if forward_s > 0 else 0.0
        before = self.distance
        if self._trial is not None:
            previous, previous_stall = self._trial
            self._trial = None
            if stall_s > previous_stall * (1 - self.min_gain):  # the longer distance did not pay: step back
                self.distance, self._frozen, self._calm = previous, self.patience, 0
                self.changes += self.distance != before
                return self.distance
        if self._frozen > 0:
            self._frozen -= 1
        elif share > self.stall_target and misses > 0:
            self._calm = 0
            if self.distance < self.hi:
                self._trial = (self.distance, stall_s)
                self.distance += 1
        elif misses == 0:
            self._calm += 1
            if self._calm >= self.patience and self.distance > self.lo:
                self.distance -= 1
                self._calm = 0
        else:
            self._calm = 0
        self.changes += self.distance != before
        return self.distance


@register("prefetch", "adaptive", AdaptiveConfig)
class Adaptive(StreamingPolicy):
    """Lookahead whose distance (and slot count) follows the measured stall and miss rates."""

    def __init__(self, cfg: AdaptiveConfig | None = None, store: WeightStore | None = None):
        super().__init__(cfg or AdaptiveConfig(), store)
        self.distance = self.cfg.initial_distance
        self.eviction = self.cfg.eviction
        self._mark = None

    def min_slots(self) -> int:
        return self.cfg.min_distance + 1

    def plan_slots(self, allowed: int) -> int:
        return min(self.distance + 1, allowed)

    def setup(self, model, device) -> None:
        super().setup(model, device)
        hi = max(self.cfg.min_distance, min(self.cfg.max_distance, self.allowed_slots - 1, self.num_layers - 1))
        self.distance = min(self.distance, hi)
        self.tuner = DistanceTuner(self.distance, min(self.cfg.min_distance, hi), hi,
                                   stall_target=self.cfg.stall_target, min_gain=self.cfg.min_gain,
                                   patience=self.cfg.patience)

    def forward_start(self) -> None:
        c = self.stats_.counts
        self._mark = (time.perf_counter(), self.stats_.host_wait_s, c["prefetch_late"] + c["demand_loads"])

    def forward_end(self) -> None:
        if self._mark is None:
            return
        t0, wait0, miss0 = self._mark
        c = self.stats_.counts
        distance = self.tuner.update(self.stats_.host_wait_s - wait0, time.perf_counter() - t0,
                                     c["prefetch_late"] + c["demand_loads"] - miss0)
        if distance != self.distance:
            self.distance = distance
            self.resize_slots(distance + 1)

    def stats(self) -> dict[str, float]:
        out = super().stats()
        if out:
            out["distance_changes"] = float(self.tuner.changes)
        return out
