"""`+adapt=power`: hold a GPU power or temperature target by pausing between steps (a duty cycle).

Every `every` steps the strategy reads the monitor's latest sample (`ollm_triton/monitor.py`: NVML power draw and
temperature). Above `max_power_w` or `max_temp_c` it raises the pause share by `pause_step` (up to `max_pause`);
once both are back under the target by `margin` (a share of the target), it lowers it by one step. A pause
share p idles the device for p of the wall time: after each step of t seconds it sleeps t * p / (1 - p). Pausing
is the action a run can take on its own (it must not change clocks or power limits, which are the machine's
settings); a server would rather lower its batch size, which a callback registered with `on_switch` can do.

Each decision's effect is the mean power, peak temperature and tokens per joule between the look that decided
and the one `every` steps later (energy from the GPU's counter where it has one, else power x time).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from ollm_triton.adapt.base import Adapter, AdaptParams, Signals, Strategy
from ollm_triton.registry import register


@dataclass
class PowerParams(AdaptParams):
    max_power_w: float | None = None  # GPU power draw to stay under (null: no power target)
    max_temp_c: float | None = None  # GPU temperature to stay under (null: no temperature target)
    pause_step: float = 0.1  # pause share added or removed per decision
    max_pause: float = 0.8  # the largest share of wall time spent paused
    margin: float = 0.05  # lower the pause only once below the target by this share of it

    def check(self) -> None:
        super().check()
        for name in ("max_power_w", "max_temp_c"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be > 0 or null, got {value}")
        if not 0 < self.pause_step <= self.max_pause < 1:
            raise ValueError(f"need 0 < pause_step <= max_pause < 1, got {self.pause_step}, {self.max_pause}")
        if not 0 <= self.margin < 1:
            raise ValueError(f"margin must be in [0, 1), got {self.margin}")


class PowerStrategy(Strategy):
    """Pause share between steps from the monitor's power and temperature against user targets."""

    name = "power"

    @property
    def needs_monitor(self) -> bool:  # a monitor is started for it only when it has a target to hold
        return self.cfg.max_power_w is not None or self.cfg.max_temp_c is not None

    def __init__(self, cfg: PowerParams):
        self.cfg = cfg
        super().__init__()
        self.setting = 0.0
        self.paused_s = 0.0
        self._step_end: float | None = None

    def attach(self, run) -> str | None:
        self.setting, self.paused_s, self._step_end = 0.0, 0.0, None
        if self.cfg.max_power_w is None and self.cfg.max_temp_c is None:
            return "no target: set adapt.max_power_w and/or adapt.max_temp_c"
        if run.monitor is None:
            return "no system monitor"
        return None

    def _over_under(self, sample) -> tuple[list[str], bool]:
        """(targets exceeded, whether every target is met with the hysteresis margin); unmeasured targets are
        neither."""
        over, calm = [], True
        for value, target, unit in ((sample.gpu_power_w, self.cfg.max_power_w, "W"),
                                    (sample.gpu_temp_c, self.cfg.max_temp_c, "C")):
            if target is None:
                continue
            if value is None:
                calm = False
                continue
            if value > target:
                over.append(f"{value:.0f} {unit} > {target:.0f} {unit}")
            if value > target * (1 - self.cfg.margin):
                calm = False
        return over, calm

    def check(self, signals: Signals):
        sample = signals.sample
        if sample is None:
            return None
        over, calm = self._over_under(sample)
        p = self.setting
        if over and p < self.cfg.max_pause:
            return round(min(p + self.cfg.pause_step, self.cfg.max_pause), 6), f"{', '.join(over)}: pause more"
        if calm and p > 0:
            return round(max(p - self.cfg.pause_step, 0.0), 6), "under every target with margin: pause less"
        return None

    def after_step(self, signals: Signals) -> None:
        now = time.perf_counter()
        if self._step_end is not None and self.setting > 0:
            pause = (now - self._step_end) * self.setting / (1 - self.setting)
            time.sleep(pause)
            self.paused_s += pause
            now = time.perf_counter()
        self._step_end = now

    def effect(self, before: Signals, after: Signals) -> dict:
        out: dict = {}
        a, b = before.sample, after.sample
        if a is None or b is None:
            return out
        if b.gpu_power_w is not None:
            out["power_w_after"] = b.gpu_power_w
        if b.gpu_temp_c is not None:
            out["temp_c_after"] = b.gpu_temp_c
        joules = None
        if a.gpu_energy_j is not None and b.gpu_energy_j is not None:
            joules = b.gpu_energy_j - a.gpu_energy_j
        elif a.gpu_power_w is not None and b.gpu_power_w is not None:
            joules = 0.5 * (a.gpu_power_w + b.gpu_power_w) * max(b.t - a.t, 0.0)
        if joules:
            out["tokens_per_j"] = (after.tokens - before.tokens) / joules
        return out

    def summary(self) -> str:
        if self.inactive:
            return f"inactive: {self.inactive}"
        return f"pause share {self.setting:.2f}, {self.paused_s:.3f} s paused"


@register("adapt", "power", PowerParams)
class PowerAdapter(Adapter):
    """Pauses between steps to keep GPU power or temperature under a user-set target."""

    def build_strategies(self, cfg):
        return [PowerStrategy(cfg)]
