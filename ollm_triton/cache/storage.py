"""Storage tiers for any codec's layers: `store=device|cpu|disk` (and `cache_dir` for disk).

With `cpu` or `disk`, each layer's buffers leave the device as soon as the layer is built and again once the layer's
step is done (`observe`, which the engine calls after the layer's attention, or `truncate`), and come back before
its next use. While layer i is in use, layer i + 1 (of the same cache) is fetched on a side stream, so the copy
overlaps layer i's compute.

- `cpu`: the buffers go to pinned host memory (device-to-host on the side stream; the device memory is returned
  to the allocator once the copy is done). On a CPU-only run the layers already live in host memory: no-op.
- `disk`: the buffers are written to one file per layer under `cache_dir` (from a pinned staging copy, by an I/O
  thread) and the host copy is released; a fetch reads the file into pinned memory (the I/O thread) and copies
  it to the device on the side stream. File format: 8 magic bytes, a little-endian uint64 header length, a JSON
  header (per tensor: name, dtype, shape, byte offset, crc32), then the raw bytes. No pickle; the checksum is
  verified on every read. (kvikio is not used: reading straight into device memory would skip the checksum.)

Cost: every offload moves the whole layer (the disk tier rewrites its file), so these tiers trade speed for
device memory; each step of a long context pays about two full copies of the cache over PCIe (or the disk).

The wrapper forwards the CacheLayer interface to the codec's own layer, so stats and fused kernels are the codec's.
"""

from __future__ import annotations

import json
import os
import struct
import threading
import weakref
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from ollm_triton.cache.base import CacheLayer

STORES = ("device", "cpu", "disk")
MAGIC = b"OLLMKV01"


@dataclass
class StoreParams:
    store: str = "device"  # device | cpu | disk: where layers wait between uses
    cache_dir: str = ""  # directory of the disk tier's files (required with store=disk)

    def check(self) -> None:
        if self.store not in STORES:
            raise ValueError(f"store must be one of {', '.join(STORES)}, got {self.store!r}")
        if self.store == "disk" and not self.cache_dir:
            raise ValueError("store=disk needs cache_dir=<directory>")


# the layer attending, its successor being fetched, and the one whose copy out may still be in flight
LAYERS_IN_FLIGHT = 3


class StoredCodec:
    """Mixed into a codec whose layers honour its StoreParams (`new_layer` returns `wrap_store(...)`): with
    store=cpu or disk on a GPU, at most LAYERS_IN_FLIGHT layers' KV are on the device at once (cache/base.py
    `device_layers`); the others wait on the host (store=cpu) or on disk."""

    cfg: StoreParams

    def device_layers(self, num_layers: int, device: torch.device) -> int:
        device = torch.device(device)
        if device.type != "cuda" or stays_in_place(self.cfg, device):
            return num_layers
        return min(num_layers, LAYERS_IN_FLIGHT)


# ------------------------------------------------------------------------------------------------ file format

_DTYPES = {str(dt).removeprefix("torch."): dt for dt in (torch.float32, torch.float16, torch.bfloat16, torch.uint8,
                                                           torch.int8, torch.int16, torch.int32, torch.int64)}


def write_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Raw bytes of CPU tensors with a JSON header and a crc32 per tensor (written to a temp file, then renamed)."""
    entries, blobs, offset = [], [], 0
    for name, t in tensors.items():
        raw = t.contiguous().view(torch.uint8).reshape(-1).numpy().tobytes() if t.numel() else b""
        entries.append({"name": name, "dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape),
                        "offset": offset, "nbytes": len(raw), "crc32": zlib.crc32(raw)})
        blobs.append(raw)
        offset += len(raw)
    header = json.dumps(entries).encode()
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        f.write(MAGIC + struct.pack("<Q", len(header)) + header)
        for raw in blobs:
            f.write(raw)
    os.replace(tmp, path)


def read_tensors(path: Path, pin: bool = False) -> dict[str, torch.Tensor]:
    """Inverse of write_tensors; raises ValueError naming the file and tensor on a bad magic or checksum."""
    with open(path, "rb") as f:
        if f.read(8) != MAGIC:
            raise ValueError(f"{path}: not a KV cache tier file (bad magic)")
        (n,) = struct.unpack("<Q", f.read(8))
        entries = json.loads(f.read(n))
        data = f.read()
    out = {}
    for e in entries:
        raw = data[e["offset"] : e["offset"] + e["nbytes"]]
        if zlib.crc32(raw) != e["crc32"]:
            raise ValueError(f"{path}: checksum mismatch in tensor {e['name']!r}; the file is corrupt")
        dt = _DTYPES[e["dtype"]]
        t = torch.frombuffer(bytearray(raw), dtype=torch.uint8) if raw else torch.empty(0, dtype=torch.uint8)
        t = t.view(dt).reshape(e["shape"])
        out[e["name"]] = t.pin_memory() if pin else t
    return out


# ------------------------------------------------------------------------------------------------ the tier


class StoreTier:
    """Per codec instance: the side stream, the I/O thread, the directory, and the layer groups (one per cache)."""

    def __init__(self, params: StoreParams, device: torch.device):
        self.kind = params.store
        self.device = device
        self.cuda = device.type == "cuda"
        self.stream = torch.cuda.Stream(device) if self.cuda else None
        self.io = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kv-store") if self.kind == "disk" else None
        self.dir = Path(params.cache_dir) if self.kind == "disk" else None
        if self.dir is not None:
            self.dir.mkdir(parents=True, exist_ok=True)
        self._count = 0
        self._lock = threading.Lock()

    def new_path(self) -> Path:
        with self._lock:
            self._count += 1
            return self.dir / f"kv-{os.getpid()}-{id(self):x}-{self._count}.bin"


def stays_in_place(params: StoreParams, device: torch.device) -> bool:
    """Whether a layer's buffers stay where they are built (store=device, or store=cpu on a CPU run)."""
    return params.store == "device" or (params.store == "cpu" and device.type != "cuda")


def wrap_store(layer: CacheLayer, params: StoreParams, tier_holder) -> CacheLayer:
    """The codec's layer as is (store=device, or cpu on a CPU run), else wrapped in a StoredLayer."""
    if stays_in_place(params, layer.spec.device):
        return layer
    tier = getattr(tier_holder, "_store_tier", None)
    if tier is None:
        tier = tier_holder._store_tier = StoreTier(params, layer.spec.device)
    return StoredLayer(layer, tier)


class StoredLayer(CacheLayer):
    """A codec layer whose buffers wait on the host or on disk between uses (see the module docstring)."""

    def __init__(self, inner: CacheLayer, tier: StoreTier):
        self.inner = inner
        self.tier = tier
        self.spec = inner.spec
        self.state = "device"
        self.last_offload: str | None = None
        self._host: dict[str, torch.Tensor] = {}  # cpu tier: pinned copies
        self._pending: Future | None = None  # disk tier: the last write or read
        self._fetched: torch.cuda.Event | None = None
        self._fetched_tensors: dict[str, torch.Tensor] = {}
        self._done: torch.cuda.Event | None = None
        self.path = tier.new_path() if tier.kind == "disk" else None
        # layers of one cache share their LayerSpec object: the group gives each layer its successor to prefetch
        group = inner.spec.__dict__.setdefault("_store_group", [])
        self.index = len(group)
        group.append(weakref.ref(self))
        self._group = group
        if self.path is not None:
            weakref.finalize(self, _remove, self.path)
        # a codec allocates its buffers on the device (a preallocated int4 layer at 128k: ~140 MB); a cache builds
        # all its layers before the first step, so each leaves at once, or all of them would sit there together
        self._offload()
        if self.tier.cuda:
            self.tier.stream.synchronize()  # the copy out has landed: its device memory is free for the next layer

    # -- residency -----------------------------------------------------------------------------------------------

    def _tensor_names(self) -> list[str]:
        return [n for n, t in vars(self.inner).items()
                if isinstance(t, torch.Tensor) and t.device.type == self.spec.device.type]

    def _offload(self) -> None:
        if self.state != "device":
            return
        names = self._tensor_names()
        tensors = {n: getattr(self.inner, n) for n in names}
        if self.tier.cuda:
            ready = torch.cuda.Event()
            ready.record()
            with torch.cuda.stream(self.tier.stream):
                self.tier.stream.wait_event(ready)
                host = {}
                for n, t in tensors.items():
                    buf = self._host.get(n)
                    if buf is None or buf.shape != t.shape or buf.dtype != t.dtype:
                        buf = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
                    buf.copy_(t, non_blocking=True)
                    t.record_stream(self.tier.stream)  # its memory is reused only after the copy
                    host[n] = buf
                done = torch.cuda.Event()
                done.record()
        else:  # a CPU run (disk tier): the buffers themselves go to the file
            host, done = tensors, None
        for n, t in tensors.items():  # placeholders keep shapes and dtypes for stats; any data access fails loudly
            setattr(self.inner, n, torch.empty(t.shape, dtype=t.dtype, device="meta"))
        if self.tier.kind == "cpu":
            self._host, self._done = host, done
            self.state = "cpu"
        else:
            self._host = {}
            self._pending = self.tier.io.submit(_write_after, self.path, host, done)
            self.state = "disk"
        self.last_offload = self.state

    def _start_fetch(self) -> None:
        if self.state not in ("cpu", "disk"):
            return
        if self.state == "cpu":
            self._fetched_tensors, self._fetched = _to_device(self._host, self.tier, self._done)
        else:
            self._pending = self.tier.io.submit(_read_to_device, self.path, self.tier, self._pending)
        self.state = "fetching"

    def _ensure(self) -> None:
        if self.state == "device":
            return
        self._start_fetch()
        if self.tier.kind == "disk":
            self._fetched_tensors, self._fetched = self._pending.result()
        if self._fetched is not None:
            stream = torch.cuda.current_stream()
            stream.wait_event(self._fetched)
            for t in self._fetched_tensors.values():
                t.record_stream(stream)  # allocated on the side stream, used on this one
        for n, t in self._fetched_tensors.items():
            setattr(self.inner, n, t)
        self._fetched_tensors, self._fetched = {}, None
        self.state = "device"
        nxt = self._group[(self.index + 1) % len(self._group)]()
        if nxt is not None and nxt is not self:
            nxt._start_fetch()  # overlap the next layer's copy with this layer's work

    # -- CacheLayer ----------------------------------------------------------------------------------------------

    @property
    def length(self) -> int:
        return self.inner.length

    @property
    def appended(self) -> int:
        return self.inner.appended

    @appended.setter
    def appended(self, value: int) -> None:
        self.inner.appended = value

    @property
    def compress_seconds(self) -> float:
        return self.inner.compress_seconds

    @property
    def compressed_tokens(self) -> int:
        return self.inner.compressed_tokens

    @property
    def evicted_tokens(self) -> int:
        return self.inner.evicted_tokens

    @property
    def last_path(self) -> str:
        return getattr(self.inner, "last_path", "unknown")

    def append(self, k, v):
        self._ensure()
        self.inner.append(k, v)

    def dense(self):
        self._ensure()
        return self.inner.dense()

    def attend(self, q, backend):
        self._ensure()
        return self.inner.attend(q, backend)

    def observe(self, q):
        self._ensure()
        self.inner.observe(q)
        self._offload()  # the engine's last call for this layer in a step

    def truncate(self, length):
        self._ensure()
        self.inner.truncate(length)
        self._offload()

    def positions(self):
        self._ensure()
        return self.inner.positions()

    def stored_bytes(self):
        return self.inner.stored_bytes()

    def original_bytes(self):
        return self.inner.original_bytes()


def _remove(path: Path) -> None:
    try:
        path.unlink()
    except OSError:
        pass


def _write_after(path: Path, host: dict[str, torch.Tensor], done) -> None:
    if done is not None:
        done.synchronize()  # the device-to-host copies have landed
    write_tensors(path, host)


def _to_device(host: dict[str, torch.Tensor], tier: StoreTier, after=None):
    """Host tensors -> device tensors on the side stream; -> (tensors, event) (event None off CUDA)."""
    if not tier.cuda:
        return dict(host), None
    with torch.cuda.stream(tier.stream):
        if after is not None:
            tier.stream.wait_event(after)
        out = {n: t.to(tier.device, non_blocking=True) for n, t in host.items()}
        ev = torch.cuda.Event()
        ev.record()
    return out, ev


def _read_to_device(path: Path, tier: StoreTier, previous: Future | None):
    if previous is not None:
        previous.result()  # the write this read depends on (same I/O thread: already done; re-raises its error)
    host = read_tensors(path, pin=tier.cuda)
    if not tier.cuda:
        return host, None
    with torch.cuda.device(tier.device):  # this runs on the I/O thread
        return _to_device(host, tier)
