"""Time spent encoding (quantizing, scoring, clustering) in a cache layer, without synchronizing the device.

On CUDA each encode is bracketed by two events; the elapsed times are read (and the events synchronized) only when
`seconds` is asked for, so decoding never waits on the timer. On the CPU it is wall time.
"""

from __future__ import annotations

import time
from contextlib import contextmanager

import torch


class EncodeTimer:
    def __init__(self) -> None:
        self._seconds = 0.0
        self._pending: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []

    @contextmanager
    def measure(self, device: torch.device):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            try:
                yield
            finally:
                end.record()
                self._pending.append((start, end))
                if len(self._pending) > 4096:  # bound the list on very long decodes
                    self._resolve()
        else:
            t0 = time.perf_counter()
            try:
                yield
            finally:
                self._seconds += time.perf_counter() - t0

    def _resolve(self) -> None:
        for start, end in self._pending:
            end.synchronize()
            self._seconds += start.elapsed_time(end) / 1000.0
        self._pending.clear()

    @property
    def seconds(self) -> float:
        self._resolve()
        return self._seconds

    @seconds.setter
    def seconds(self, value: float) -> None:
        self._pending.clear()
        self._seconds = float(value)


class TimedLayerMixin:
    """Gives a CacheLayer subclass a `compress_seconds` backed by an EncodeTimer (set `self._timer` first)."""

    @property
    def compress_seconds(self) -> float:
        return self._timer.seconds

    @compress_seconds.setter
    def compress_seconds(self, value: float) -> None:
        self._timer.seconds = value
