"""The one timer of the toolkit: device-aware wall time of code regions, with or without synchronizing.

Kernels run asynchronously, so a host clock alone measures launches, not work. `Timer` offers three uses of one
clock, and everything that reports seconds (tasks, decoders, cache encoders, the speculative loop's phases) uses it:

    with Timer(device) as t:            # synchronized at both ends: the region's wall time, t.seconds
        ...
    timer = Timer(device)
    with timer.region():                # no synchronization: CUDA events, read when `seconds` is asked for
        ...                             # (a cache layer times its encoding without stalling the decode loop)
    i = timer.mark("draft"); timer.mark("verify"); timer.phases()   # a loop split into named phases

On the CPU every reading is `time.perf_counter`. This module imports nothing of the toolkit: every layer may use it.
"""

from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager

import torch

PENDING_LIMIT = 4096  # unresolved event pairs kept before they are read (bounds the list on very long decodes)


def synchronize(device: torch.device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


class Timer:
    """Seconds spent in regions of work on `device` (see the module docstring for the three uses)."""

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self._seconds = 0.0
        self._pending: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self._marks: list[tuple[str, object]] = []

    # ---- synchronized regions --------------------------------------------------------------------------------
    def __enter__(self) -> Timer:
        synchronize(self.device)
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        synchronize(self.device)
        self._seconds += time.perf_counter() - self._t0

    # ---- unsynchronized regions ------------------------------------------------------------------------------
    @contextmanager
    def region(self):
        """Time a region without waiting for the device (CUDA events, read lazily by `seconds`)."""
        if not self.cuda:
            t0 = time.perf_counter()
            try:
                yield
            finally:
                self._seconds += time.perf_counter() - t0
            return
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        try:
            yield
        finally:
            end.record()
            self._pending.append((start, end))
            if len(self._pending) > PENDING_LIMIT:
                self._resolve()

    def _resolve(self) -> None:
        for start, end in self._pending:
            end.synchronize()
            self._seconds += start.elapsed_time(end) / 1e3
        self._pending.clear()

    @property
    def seconds(self) -> float:
        """Total seconds of every region so far (waits for pending CUDA regions to complete)."""
        self._resolve()
        return self._seconds

    def reset(self) -> None:
        self._pending.clear()
        self._seconds = 0.0
        self._marks.clear()

    # ---- phases -----------------------------------------------------------------------------------------------
    def mark(self, phase: str) -> int:
        """Start `phase` (ending the previous one) without a host sync; returns the mark's index."""
        if self.cuda:
            stamp = torch.cuda.Event(enable_timing=True)
            stamp.record()
        else:
            stamp = time.perf_counter()
        self._marks.append((phase, stamp))
        return len(self._marks) - 1

    def phases(self, start: int = 0, stop: int | None = None) -> dict[str, float]:
        """Seconds per phase between marks `start` and `stop` (default: the last mark). On CUDA the marks must have
        completed (read after the loop's own synchronization)."""
        stop = len(self._marks) - 1 if stop is None else stop
        out: dict[str, float] = defaultdict(float)
        pairs = zip(self._marks[start:stop], self._marks[start + 1 : stop + 1], strict=False)
        for (phase, a), (_, b) in pairs:
            out[phase] += a.elapsed_time(b) / 1e3 if self.cuda else b - a
        return dict(out)


__all__ = ["Timer", "synchronize"]
