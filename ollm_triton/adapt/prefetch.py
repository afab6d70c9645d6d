"""`+adapt=prefetch`: the prefetch distance of a layer-streaming policy follows its measured stalls.

The rule is the `adaptive` prefetch policy's (`prefetch/adaptive.py` DistanceTuner: grow while the stall share of
the step time is above `stall_target` and there were misses, keep a grow only if it cut the stall by `min_gain`,
shrink after `patience` calm looks), applied every `every` steps to the run's policy from outside: `lookahead`,
`on_demand` or `memory_aware` gain the tuning without being rewritten. Growing the distance past the policy's
slots adds slots (`resize_slots`: distance + 1); the policy never gets fewer slots than it started with, since a
shrink while layers are in flight is the policy's own business. Loader workers are fixed at setup
(`prefetch.workers`); the decision records the stall share that would justify more.

Inputs, read from the policy's live counters (prefetch/stats.py): the seconds the compute thread blocked waiting
for a layer (`host_wait_s`) and the late prefetches plus demand loads, differenced between two looks, against
the wall time between them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from ollm_triton.adapt.base import Adapter, AdaptParams, Signals, Strategy
from ollm_triton.prefetch.adaptive import DistanceTuner
from ollm_triton.registry import register


@dataclass
class PrefetchParams(AdaptParams):
    max_distance: int = 8  # the farthest ahead a layer may be prefetched
    stall_target: float = 0.05  # stall share of the step time above which the distance grows
    min_gain: float = 0.1  # a grow must cut the stall time by this share to be kept
    patience: int = 3  # looks without a miss before shrinking; looks frozen after a grow that did not pay

    def check(self) -> None:
        super().check()
        if self.max_distance < 1:
            raise ValueError(f"max_distance must be >= 1, got {self.max_distance}")
        if not 0 <= self.stall_target < 1 or not 0 <= self.min_gain < 1:
            raise ValueError(f"stall_target and min_gain must be in [0, 1), got {self.stall_target}, {self.min_gain}")
        if self.patience < 1:
            raise ValueError(f"patience must be >= 1, got {self.patience}")


class PrefetchStrategy(Strategy):
    """Moves a streaming policy's prefetch distance by the DistanceTuner rule."""

    name = "prefetch"

    def __init__(self, cfg: PrefetchParams):
        super().__init__()
        self.cfg = cfg
        self.policy = None
        self.tuner: DistanceTuner | None = None
        self._last: tuple[float, float, int] | None = None  # (wall clock, stall s, misses) at the previous look
        self.share = 0.0

    def attach(self, run) -> str | None:
        policy = run.prefetch
        name = getattr(policy, "plugin_name", type(policy).__name__)
        if policy is None or getattr(policy, "stats_", None) is None or not hasattr(policy, "resize_slots"):
            return f"prefetch {name} streams no layers (no stall counters, no distance to move)"
        if getattr(policy, "tuner", None) is not None:
            return f"prefetch {name} tunes its own distance"
        self.policy = policy
        hi = max(1, min(self.cfg.max_distance, policy.num_layers - 1, policy.allowed_slots - 1))
        self.setting = min(max(policy.distance, 1), hi)
        self.tuner = DistanceTuner(self.setting, 1, hi, stall_target=self.cfg.stall_target,
                                   min_gain=self.cfg.min_gain, patience=self.cfg.patience)
        self._last = None
        return None

    def check(self, signals: Signals):
        if signals.prefetch_stall_s is None:
            return None
        now = time.perf_counter()
        if self._last is None:
            self._last = (now, signals.prefetch_stall_s, signals.prefetch_misses or 0)
            return None
        t0, stall0, miss0 = self._last
        self._last = (now, signals.prefetch_stall_s, signals.prefetch_misses or 0)
        stall, misses, wall = signals.prefetch_stall_s - stall0, (signals.prefetch_misses or 0) - miss0, now - t0
        self.share = stall / wall if wall > 0 else 0.0
        before = self.tuner.distance
        after = self.tuner.update(stall, wall, misses)
        if after == before:
            return None
        why = (f"stall {stall * 1e3:.3g} ms of {wall * 1e3:.3g} ms ({self.share:.1%}) with {misses} misses over the "
               f"last {self.cfg.every} steps")
        if after < before:
            why += ": no misses, handing a slot back" if misses == 0 else ": the longer distance did not cut the stall"
        return after, why

    def apply(self, new) -> None:
        self.setting = int(new)
        if self.policy is not None:
            if new + 1 > self.policy.pool.num_slots:
                self.policy.resize_slots(new + 1)
            self.policy.distance = int(new)

    def effect(self, before: Signals, after: Signals) -> dict:
        if before.prefetch_stall_s is None or after.prefetch_stall_s is None or after.t <= before.t:
            return {}
        # the share that decided is in the decision's reason; this is the blocked time per second since
        return {"stall_s_per_s_after": (after.prefetch_stall_s - before.prefetch_stall_s) / (after.t - before.t)}

    def summary(self) -> str:
        if self.inactive:
            return f"inactive: {self.inactive}"
        return f"distance {self.setting}, {self.tuner.changes} changes, last stall share {self.share:.1%}"


@register("adapt", "prefetch", PrefetchParams)
class PrefetchAdapter(Adapter):
    """Prefetch distance (and slots) of a streaming policy from the measured stall time and misses."""

    def build_strategies(self, cfg):
        return [PrefetchStrategy(cfg)]
