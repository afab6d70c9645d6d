"""Loaders: move one decoder layer from a WeightStore into a device slot, on worker threads.

Three ways, one interface (`submit(i, slot, after) -> Future[Completion]`; the future is done once the layer's
bytes are in the slot):
- `copy` (cpu and device tiers): one copy of the layer's image into the slot; on CUDA on a side stream, so it
  overlaps the compute stream, from page-locked memory so that it is asynchronous and runs at full bus speed.
- `staged` (disk tier): read the file into a reusable page-locked staging buffer (several workers read several
  layers at once), then copy to the slot on the side stream; the staging buffer is reused once the copy's event
  has completed.
- `kvikio` (disk tier, CUDA, kvikio importable): kvikio reads the file straight into the device slot (GPUDirect
  Storage, or kvikio's own bounce buffers in compat mode). Checksums are verified through a host read the first
  time a file is used (verify="once"); verify="always" therefore selects `staged`. `auto` picks kvikio only when
  GDS is active: in compat mode kvikio is a POSIX read plus a copy, and on the H200 VM (no GDS) it decoded 27%
  slower than `staged` (experiments/prefetch/README.md); `loader=kvikio` still forces it.

A slot may still be read by the compute stream for its previous layer: `after` is that layer's compute-done event,
and the side stream waits for it before overwriting the slot (kvikio, which writes outside any stream, waits on
the host). On the CPU the same code runs with the host as the device: the copy is a memcpy on the worker thread
and nothing needs an event.
"""

from __future__ import annotations

import itertools
import time
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from ollm_triton.prefetch.pool import MemoryManager
from ollm_triton.prefetch.stats import PrefetchStats
from ollm_triton.prefetch.store import WeightStore

LOADERS = ("auto", "staged", "kvikio")


class Completion:
    """The layer's bytes are in the slot once `event` (a CUDA event on the copy stream) has run; None: already."""

    __slots__ = ("event",)

    def __init__(self, event: torch.cuda.Event | None = None):
        self.event = event

    def wait_on_current_stream(self) -> None:
        if self.event is not None:
            torch.cuda.current_stream().wait_event(self.event)

    def synchronize(self) -> None:
        if self.event is not None:
            self.event.synchronize()


def kvikio_available() -> bool:
    try:
        import kvikio  # noqa: F401
    except Exception:
        return False
    return torch.cuda.is_available()


def kvikio_gds_active() -> bool:
    """Whether kvikio would use GPUDirect Storage rather than its POSIX compat mode (False without kvikio)."""
    if not kvikio_available():
        return False
    import kvikio.defaults as defaults

    preferred = getattr(defaults, "is_compat_mode_preferred", None)  # kvikio >= 24.x
    if preferred is None:
        preferred = getattr(defaults, "compat_mode", None)  # older kvikio
    try:
        return preferred is not None and not bool(preferred())
    except Exception:
        return False


class LayerLoader:
    """Loads layers of `store` into slots on `device` with `workers` threads."""

    def __init__(self, store: WeightStore, device: torch.device, *, workers: int, stats: PrefetchStats,
                 kind: str = "auto", direct_io: bool = False):
        if kind not in LOADERS:
            raise ValueError(f"unknown loader {kind!r}; accepted: {', '.join(LOADERS)}")
        self.store, self.device, self.stats = store, device, stats
        self.cuda = device.type == "cuda"
        self.direct_io = direct_io
        if store.tier != "disk":
            self.kind = "copy"
        elif kind == "kvikio" or (kind == "auto" and self.cuda and kvikio_gds_active() and store.verify != "always"):
            if not (self.cuda and kvikio_available()):
                raise ValueError("loader=kvikio needs CUDA and the kvikio package; accepted here: auto, staged")
            self.kind = "kvikio"
        else:
            self.kind = "staged"
        self.stream = torch.cuda.Stream(device) if self.cuda else None
        self.staging: MemoryManager | None = None
        if self.kind == "staged":
            # one staging buffer per worker: a worker holds at most one at a time, so none ever waits for another
            self.staging = MemoryManager("cpu")
            self.staging.add_pool("staging", store.slot_bytes, workers, pin=self.cuda)
        self._files = {}  # kvikio CuFile handles, opened once per layer
        self._ids = itertools.count()
        self.executor = ThreadPoolExecutor(max(1, workers), thread_name_prefix="ollm-prefetch")

    def submit(self, i: int, slot: torch.Tensor, after: Completion | None) -> Future:
        """Start loading layer i into `slot` (uint8 [>= slot bytes]) once `after` has completed."""
        self.stats.count("loads")
        return self.executor.submit(self._load_in_inference_mode, i, slot, after)

    def _load_in_inference_mode(self, i: int, slot: torch.Tensor, after: Completion | None) -> Completion:
        # the slot may be a view taken under the engine's inference mode, which may only be written inside it
        with torch.inference_mode():
            return self._load(i, slot, after)

    def _load(self, i: int, slot: torch.Tensor, after: Completion | None) -> Completion:
        n = self.store.layer_bytes(i)
        t0 = time.perf_counter()
        if self.kind == "copy":
            done = self._copy(slot[:n], self.store.image(i)[:n], after)
        elif self.kind == "staged":
            name = f"stage.{next(self._ids)}"
            stage = self.staging.allocate(name, (self.store.slot_bytes,), torch.uint8, pool="staging").tensor
            try:
                self.store.read_into(i, stage, direct=self.direct_io)
                t1 = time.perf_counter()
                self.stats.io("disk", n, t0, t1)
                done = self._copy(slot[:n], stage[:n], after)
            finally:
                self.staging.release(name, keep=False)
        else:
            done = self._kvikio(i, slot[:n], after, t0)
        self.stats.io("load", n, t0, time.perf_counter())
        return done

    def _copy(self, dst: torch.Tensor, src: torch.Tensor, after: Completion | None) -> Completion:
        t0 = time.perf_counter()
        if not self.cuda:
            dst.copy_(src)
            self.stats.io("copy", dst.numel(), t0, time.perf_counter())
            return Completion()
        with torch.cuda.stream(self.stream):
            if after is not None and after.event is not None:
                self.stream.wait_event(after.event)
            dst.copy_(src, non_blocking=True)
            event = torch.cuda.Event()
            event.record(self.stream)
        # the worker (not the compute thread) waits: the staging buffer is free after this, and the copy's end is
        # timed on the host clock, comparable with the disk reads
        event.synchronize()
        self.stats.io("copy", dst.numel(), t0, time.perf_counter())
        return Completion(event)

    def _kvikio(self, i: int, dst: torch.Tensor, after: Completion | None, t0: float) -> Completion:
        import kvikio

        if self.store.needs_verify(i):
            self.store.verify_file(i)
        if after is not None:
            after.synchronize()  # kvikio writes outside any stream: the slot's previous layer must be done
        handle = self._files.get(i)
        if handle is None:
            handle = self._files[i] = kvikio.CuFile(str(self.store.path(i)), "r")
        info = self.store.files[i]
        got = handle.pread(dst, dst.numel(), file_offset=info.data_start).get()
        if got != dst.numel():
            from ollm_triton.prefetch.layer_file import WeightStoreError

            raise WeightStoreError(f"{info.path} is truncated: read {got} of {dst.numel()} data bytes")
        self.stats.io("disk", dst.numel(), t0, time.perf_counter())
        return Completion()

    def close(self) -> None:
        self.executor.shutdown(wait=True, cancel_futures=True)
        for handle in self._files.values():
            handle.close()
        self._files = {}
        if self.staging is not None:
            self.staging.close()
