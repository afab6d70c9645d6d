"""Counters and clocks of a streaming policy, summarised by `stats()`.

Every layer access is exactly one of: a cache hit (the layer's bytes were still in a slot from an earlier use), a
prefetch hit (a prefetch had finished loading it), a late prefetch (in flight: the run waited), or a demand load
(nothing under way: the run waited for a full load). hits = cache + prefetch hits, misses = late + demand, and
hits + misses = accesses.

Time:
- `stall_s`: how long the device sat idle between decoder layers (the end of layer i-1, or of the embedding, to
  the start of layer i): waiting for weights plus the hooks' own overhead. On CUDA from events on the compute
  stream, on the CPU from the host clock.
- `host_wait_s`: how long the Python thread blocked in before_layer waiting for a load.
- `io_busy_s`: wall time during which at least one load was running (the union of load intervals), so concurrent
  loads are not double counted; `overlap_efficiency` = 1 - stall_s / io_busy_s, the share of I/O time hidden
  behind compute (0 when every load was waited for, 1 when none was).
- GB/s per stage: bytes over the union of that stage's intervals (`disk` reads, `copy` host-to-device or the
  host memcpy on the CPU, `load` end to end).
"""

from __future__ import annotations

import threading
import time
from collections import Counter, defaultdict

import torch


def union_seconds(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total


class LayerTimeline:
    """Marks around every decoder layer on the compute stream: idle gaps between layers and compute time."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self._prev = None  # marker of the last end (embedding or layer)
        self._start = None
        self._pending: list[tuple[object, object, object]] = []  # (prev end, start, end)
        self.stall_s = 0.0
        self.compute_s = 0.0
        self.layers_timed = 0

    def _marker(self):
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def forward_start(self) -> None:
        """The embedding has been issued: the gap to the first layer's start counts as stall."""
        self._prev = self._marker()

    def layer_start(self) -> None:
        self._start = self._marker()

    def layer_end(self) -> None:
        end = self._marker()
        if self._start is not None:
            self._pending.append((self._prev, self._start, end))
        self._prev, self._start = end, None
        if self.cuda and len(self._pending) >= 256:
            self.resolve(block=False)
        elif not self.cuda:
            self.resolve()

    def resolve(self, block: bool = False) -> None:
        """Fold finished markers into the totals (CUDA events only once they have run; `block` waits)."""
        keep = []
        for prev, start, end in self._pending:
            if self.cuda:
                if not block and not end.query():
                    keep.append((prev, start, end))
                    continue
                end.synchronize()
                gap = prev.elapsed_time(start) / 1e3 if prev is not None else 0.0
                comp = start.elapsed_time(end) / 1e3
            else:
                gap = start - prev if prev is not None else 0.0
                comp = end - start
            self.stall_s += max(gap, 0.0)
            self.compute_s += max(comp, 0.0)
            self.layers_timed += 1
        self._pending = keep


class PrefetchStats:
    """Thread-safe counters, byte totals and load intervals of one policy."""

    ACCESS_KINDS = ("cache_hits", "prefetch_hits", "prefetch_late", "demand_loads")

    def __init__(self, device: torch.device):
        self.counts: Counter[str] = Counter()
        self.bytes: Counter[str] = Counter()
        self.intervals: dict[str, list[tuple[float, float]]] = defaultdict(list)
        self.host_wait_s = 0.0
        self.timeline = LayerTimeline(device)
        self._lock = threading.Lock()

    def access(self, kind: str) -> None:
        assert kind in self.ACCESS_KINDS, kind
        self.counts["accesses"] += 1
        self.counts[kind] += 1

    def count(self, key: str, n: int = 1) -> None:
        with self._lock:
            self.counts[key] += n

    def io(self, stage: str, nbytes: int, t0: float, t1: float) -> None:
        with self._lock:
            self.bytes[stage] += nbytes
            self.intervals[stage].append((t0, t1))

    def summary(self) -> dict[str, float]:
        self.timeline.resolve(block=True)
        with self._lock:
            c = Counter(self.counts)
            spans = {k: union_seconds(v) for k, v in self.intervals.items()}
            nbytes = Counter(self.bytes)
        accesses = c["accesses"]
        hits = c["cache_hits"] + c["prefetch_hits"]
        misses = c["prefetch_late"] + c["demand_loads"]
        io_busy = spans.get("load", 0.0)
        stall = self.timeline.stall_s
        out = {
            "accesses": float(accesses),
            "hits": float(hits),
            "misses": float(misses),
            "hit_rate": hits / accesses if accesses else 0.0,
            "cache_hits": float(c["cache_hits"]),
            "cache_hit_rate": c["cache_hits"] / accesses if accesses else 0.0,
            "prefetch_hits": float(c["prefetch_hits"]),
            "prefetch_misses": float(misses),
            "prefetch_late": float(c["prefetch_late"]),
            "demand_loads": float(c["demand_loads"]),
            "prefetch_issued": float(c["prefetch_issued"]),
            "loads": float(c["loads"]),
            "stall_s": stall,
            "host_wait_s": self.host_wait_s,
            "compute_s": self.timeline.compute_s,
            "io_busy_s": io_busy,
            "bytes_read": float(nbytes["load"]),
            "bytes_disk": float(nbytes["disk"]),
            "bytes_copied": float(nbytes["copy"]),
            "bytes_head": float(nbytes["head"]),
            "overlap_efficiency": min(1.0, max(0.0, 1.0 - stall / io_busy)) if io_busy > 0 else 0.0,
        }
        for stage in ("disk", "copy", "load"):
            span = spans.get(stage, 0.0)
            out[f"gbps_{stage}"] = nbytes[stage] / span / 1e9 if span > 0 else 0.0
        return out
