"""CUDA-graph capture shared by every static step (the engine's decode step, the speculative strategies' blocks).

`capture(fn, device)` warms `fn` up on a side stream (Triton compiles, cuBLAS picks its kernels, the allocator
fills its pool), then records it into a graph; the caller restores any inputs the warm-up advanced. Capacities
of static buffers are rounded up to CAPACITY_STEP so nearby lengths share buffers and graphs.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import torch

CAPACITY_STEP = 1024
_notified: set[str] = set()


def round_capacity(tokens: int) -> int:
    return -(-tokens // CAPACITY_STEP) * CAPACITY_STEP


def notify_once(message: str) -> None:
    """Print a one-line notice on stderr once per distinct message (a fallback the user should know about)."""
    if message not in _notified:
        _notified.add(message)
        print(message, file=sys.stderr)


def warm_up(fn: Callable[[], None], device: torch.device, times: int = 2) -> None:
    """Run fn `times` times on a side stream, as a capture wants (nothing lazily initialised inside the graph)."""
    stream = torch.cuda.Stream(device=device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for _ in range(times):
            fn()
    torch.cuda.current_stream(device).wait_stream(stream)


def capture(fn: Callable[[], None], device: torch.device) -> torch.cuda.CUDAGraph:
    """Warm fn up, then record one call of it as a CUDA graph."""
    warm_up(fn, device)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


class SegmentRecorder:
    """Records one call of a function as several graphs, cut where the function calls `cut()`: replaying graph 0,
    then the work between, then graph 1, ... equals the call. The graphs share one memory pool and are replayed in
    capture order, so a tensor made in one segment and read in a later one keeps its address."""

    def __init__(self):
        self.graphs: list[torch.cuda.CUDAGraph] = []
        self._ctx = None

    def _begin(self) -> None:
        graph = torch.cuda.CUDAGraph()
        pool = self.graphs[0].pool() if self.graphs else None
        self._ctx = torch.cuda.graph(graph, pool=pool)
        self._ctx.__enter__()
        self.graphs.append(graph)

    def cut(self, *_) -> None:
        self._ctx.__exit__(None, None, None)
        self._begin()

    def record(self, fn: Callable[[], None]) -> list[torch.cuda.CUDAGraph]:
        self._begin()
        try:
            fn()
        finally:
            self._ctx.__exit__(None, None, None)
        return self.graphs


__all__ = ["CAPACITY_STEP", "SegmentRecorder", "capture", "notify_once", "round_capacity", "warm_up"]
