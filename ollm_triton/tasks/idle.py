"""`idle`: the device with the model loaded and nothing launched, for `seconds`, as one timed region.

The system monitor summarizes it like any task's region (`monitor/idle/power_mean_w`, `monitor/idle/energy_j`), so a
sweep that runs `task=[idle,throughput]` measures each job's idle power beside its tokens per joule, on the same
device in the same job: the floor the energy study subtracts (results.study_table: tokens per joule above idle).
Without a monitor (monitor.enabled=false) or without NVML (a CPU run) the region is still timed and the power fields
are absent, as the monitor documents.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from ollm_triton.registry import register
from ollm_triton.tasks.base import RunContext, Task, synchronize


@dataclass
class IdleConfig:
    seconds: float = 10.0  # idle time sampled: NVML's power reading is a ~1 s average on recent GPUs, so several

    def check(self) -> None:
        if not isinstance(self.seconds, (int, float)) or self.seconds <= 0:
            raise ValueError(f"seconds must be a positive number, got {self.seconds!r}")


@register("task", "idle", IdleConfig)
class Idle(Task):
    """Power and energy of the loaded, idle device over `seconds` (the system monitor's samples): the baseline an
    energy figure is read against."""

    def __init__(self, cfg: IdleConfig):
        self.cfg = cfg

    def run(self, ctx: RunContext) -> dict[str, float | int | str]:
        seconds = min(self.cfg.seconds, 0.3) if ctx.smoke else float(self.cfg.seconds)
        synchronize(ctx.device)  # work queued by an earlier task finishes before the idle region starts
        with ctx.timed("none") as region:
            time.sleep(seconds)
        return {"seconds": region.t1 - region.t0, "monitored": int(ctx.monitor is not None)}
