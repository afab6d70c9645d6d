"""One decoder layer in one safetensors file, laid out byte for byte as the device slot it is loaded into.

The file is plain safetensors (8-byte little-endian header length, a JSON header, the data section), with two
choices that the format allows and that make loading a single read:
- the JSON header is padded with spaces so that the data section starts on a 4096-byte boundary;
- every tensor starts on a 4096-byte boundary. The format forbids holes between tensors, so each gap is covered by
  a `U8` tensor named `__pad__.<k>` (ordinary readers see an extra small tensor and ignore it).
Reading the data section in one piece into a slot therefore yields every tensor at an aligned offset (so a matmul
sees the same alignment as a freshly allocated weight), and O_DIRECT reads use aligned file offsets.

`__metadata__` holds `format` (FORMAT), `layer` and `crc32`: a JSON map tensor name -> CRC-32 of its bytes (per
tensor, so a mismatch names the tensor and verification can run on several threads; zlib's CRC-32 runs at about
2.5 GB/s per core on this machine against 1.1 GB/s for SHA-256).

Nothing here unpickles anything: the header is parsed as JSON and each tensor is a byte range.
"""

from __future__ import annotations

import errno
import json
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

ALIGN = 4096
FORMAT = "ollm_triton.layer/1"
PAD_PREFIX = "__pad__."
MAX_HEADER_BYTES = 100 << 20  # a layer header is a few kB; anything this large is a corrupt length field
_READ_CHUNK = 1 << 30  # Linux returns at most ~2 GiB per read call; 1 GiB keeps every call whole

DTYPE_CODES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}
CODE_DTYPES = {code: dtype for dtype, code in DTYPE_CODES.items()}


class WeightStoreError(ValueError):
    """A layer file or weight store that cannot be used. The message is one line naming the file at fault."""


def align_up(n: int, align: int = ALIGN) -> int:
    return (n + align - 1) // align * align


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a layer: `name` relative to the layer (`self_attn.q_proj.weight`), its byte range in the slot."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    offset: int
    nbytes: int


@dataclass(frozen=True)
class LayerLayout:
    """Where each tensor of one decoder layer sits inside a flat uint8 slot of `slot_bytes` bytes."""

    entries: tuple[TensorEntry, ...]
    nbytes: int  # end of the last tensor: the length of a layer file's data section

    @classmethod
    def plan(cls, tensors: list[tuple[str, tuple[int, ...], torch.dtype]]) -> LayerLayout:
        """Lay out (name, shape, dtype) in the given order, each tensor at a multiple of ALIGN."""
        entries, offset = [], 0
        for name, shape, dtype in tensors:
            if dtype not in DTYPE_CODES:
                raise WeightStoreError(f"tensor {name!r} has dtype {dtype}, which a layer file cannot hold; "
                                       f"accepted: {', '.join(str(d) for d in DTYPE_CODES)}")
            offset = align_up(offset)
            nbytes = int(np.prod(shape, dtype=np.int64)) * torch.empty((), dtype=dtype).element_size()
            entries.append(TensorEntry(name, tuple(int(s) for s in shape), dtype, offset, nbytes))
            offset += nbytes
        return cls(tuple(entries), offset)

    @classmethod
    def of_module(cls, module: torch.nn.Module) -> LayerLayout:
        """The layout of a module's parameters (its named_parameters order; works on meta modules)."""
        return cls.plan([(n, tuple(p.shape), p.dtype) for n, p in module.named_parameters()])

    @property
    def slot_bytes(self) -> int:
        return align_up(max(self.nbytes, 1))

    def views(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """name -> tensor viewing its bytes in `flat` (uint8 [>= slot_bytes], any device)."""
        return {e.name: flat[e.offset:e.offset + e.nbytes].view(e.dtype).view(e.shape) for e in self.entries}

    def pack(self, tensors: dict[str, torch.Tensor], flat: torch.Tensor) -> None:
        """Copy `tensors` (name -> tensor of this layout's shape and dtype) into the slot image `flat`."""
        views = self.views(flat)
        for e in self.entries:
            views[e.name].copy_(tensors[e.name])

    def same_as(self, other: LayerLayout) -> bool:
        return self.entries == other.entries


def as_bytes(t: torch.Tensor) -> memoryview:
    """A writable byte view of a contiguous CPU tensor (pinned or not), without copying."""
    if t.device.type != "cpu" or not t.is_contiguous():
        raise ValueError("as_bytes needs a contiguous CPU tensor")
    return memoryview(t.view(torch.uint8).reshape(-1).numpy())


def crc32_of(buf: memoryview) -> int:
    # zlib releases the GIL on large buffers, so several layers verify on several threads at once
    return zlib.crc32(buf) & 0xFFFFFFFF


def _header_bytes(layout: LayerLayout, prefix: str, layer: int, crcs: dict[str, int]) -> bytes:
    tensors: dict[str, object] = {}
    end, pads = 0, 0
    for e in layout.entries:
        if e.offset > end:  # the format forbids holes: cover the alignment gap with a small U8 tensor
            tensors[f"{PAD_PREFIX}{pads}"] = {"dtype": "U8", "shape": [e.offset - end], "data_offsets": [end, e.offset]}
            pads += 1
        tensors[prefix + e.name] = {"dtype": DTYPE_CODES[e.dtype], "shape": list(e.shape),
                                    "data_offsets": [e.offset, e.offset + e.nbytes]}
        end = e.offset + e.nbytes
    meta = {"format": FORMAT, "layer": str(layer),
            "crc32": json.dumps({e.name: f"{crcs[e.name]:08x}" for e in layout.entries}, sort_keys=True)}
    text = json.dumps({"__metadata__": meta, **tensors}, separators=(",", ":")).encode()
    padded = align_up(8 + len(text)) - 8  # trailing spaces are valid JSON whitespace
    return struct.pack("<Q", padded) + text + b" " * (padded - len(text))


def write_layer_file(path: Path, layout: LayerLayout, image: torch.Tensor, *, prefix: str, layer: int) -> None:
    """Write one layer's slot image (uint8 CPU [>= layout.nbytes]) as a safetensors file at `path`.

    The file appears under its final name only once complete and fsynced (write to a temporary name, then rename),
    so an interrupted run never leaves a torn file behind. A full disk raises WeightStoreError naming the file.
    """
    data = as_bytes(image)[:layout.nbytes]
    crcs = {e.name: crc32_of(data[e.offset:e.offset + e.nbytes]) for e in layout.entries}
    header = _header_bytes(layout, prefix, layer, crcs)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(header)
            pos = 0
            while pos < len(data):
                pos += f.write(data[pos:pos + _READ_CHUNK])
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        if e.errno == errno.ENOSPC:
            raise WeightStoreError(f"no space left on the device while writing {path} "
                                   f"({len(header) + len(data)} bytes); free space or set cache_dir to a larger "
                                   "disk") from None
        raise WeightStoreError(f"cannot write {path}: {e.strerror or e}") from None


@dataclass(frozen=True)
class LayerFileInfo:
    """What reading a layer file needs from its header: where the data starts, and the expected checksums."""

    path: Path
    data_start: int
    crcs: dict[str, int]


def read_header(path: Path) -> tuple[dict, int, int]:
    """(header JSON, data start offset, file size) of a safetensors file; WeightStoreError naming it if torn."""
    try:
        size = os.stat(path).st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise WeightStoreError(f"{path} is truncated: {size} bytes, shorter than the 8-byte header length")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER_BYTES or 8 + n > size:
                raise WeightStoreError(f"{path} is torn: its header claims {n} bytes but the file holds {size}")
            text = f.read(n)
    except FileNotFoundError:
        raise WeightStoreError(f"layer file {path} is missing; delete its cache directory to rebuild it") from None
    except OSError as e:
        raise WeightStoreError(f"cannot read {path}: {e.strerror or e}") from None
    try:
        header = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise WeightStoreError(f"{path} is torn: its header is not valid JSON") from None
    if not isinstance(header, dict):
        raise WeightStoreError(f"{path} is torn: its header is not a JSON object")
    return header, 8 + n, size


def open_layer_file(path: Path, layout: LayerLayout, *, prefix: str) -> LayerFileInfo:
    """Check a layer file against the layout it must hold (names, dtypes, shapes, offsets, size, format).

    Raises WeightStoreError naming the file and what is wrong: a missing tensor, a different shape or dtype, a
    truncated data section, another format.
    """
    header, data_start, size = read_header(path)
    meta = header.get("__metadata__") or {}
    if meta.get("format") != FORMAT:
        raise WeightStoreError(f"{path} is not an ollm_triton layer file (format {meta.get('format')!r}, "
                               f"expected {FORMAT!r}); delete it to rebuild the cache")
    try:
        crcs = {k: int(v, 16) for k, v in json.loads(meta.get("crc32", "{}")).items()}
    except (ValueError, AttributeError, TypeError):
        raise WeightStoreError(f"{path}: the crc32 entry of its metadata is unreadable") from None
    for e in layout.entries:
        entry = header.get(prefix + e.name)
        if entry is None:
            raise WeightStoreError(f"{path}: tensor {prefix + e.name!r} is missing")
        want = {"dtype": DTYPE_CODES[e.dtype], "shape": list(e.shape), "data_offsets": [e.offset, e.offset + e.nbytes]}
        got = {k: entry.get(k) for k in want}
        if got != want:
            raise WeightStoreError(f"{path}: tensor {prefix + e.name!r} is {got}, the model needs {want}")
        if e.name not in crcs:
            raise WeightStoreError(f"{path}: no checksum recorded for tensor {prefix + e.name!r}")
    if size < data_start + layout.nbytes:
        raise WeightStoreError(f"{path} is truncated: {size} bytes, the header needs {data_start + layout.nbytes}")
    return LayerFileInfo(Path(path), data_start, crcs)


def verify_layer(info: LayerFileInfo, layout: LayerLayout, image: torch.Tensor, *, prefix: str) -> None:
    """Compare each tensor's CRC-32 in `image` (uint8 CPU) with the file's record; WeightStoreError on mismatch."""
    data = as_bytes(image)
    for e in layout.entries:
        got = crc32_of(data[e.offset:e.offset + e.nbytes])
        if got != info.crcs[e.name]:
            raise WeightStoreError(f"{info.path}: checksum mismatch in tensor {prefix + e.name!r} "
                                   f"(crc32 {got:08x}, recorded {info.crcs[e.name]:08x}); the file is corrupt, "
                                   "delete its cache directory to rebuild it")


def read_layer_data(info: LayerFileInfo, layout: LayerLayout, dst: torch.Tensor, *, direct: bool = False) -> bool:
    """Read the data section of a layer file into `dst` (uint8 CPU, >= layout.slot_bytes, ideally pinned).

    direct: bypass the page cache (O_DIRECT when the file system and `dst`'s alignment allow it; otherwise a normal
    read followed by POSIX_FADV_DONTNEED, so the next read comes from the disk again). Returns whether O_DIRECT ran.
    Raises WeightStoreError naming the file if it ends early.
    """
    n = layout.nbytes
    if dst.numel() < layout.slot_bytes:
        raise ValueError(f"destination holds {dst.numel()} bytes, a slot needs {layout.slot_bytes}")
    buf = as_bytes(dst)
    used_direct = False
    fd = -1
    if direct and hasattr(os, "O_DIRECT") and dst.data_ptr() % ALIGN == 0:
        try:
            fd = os.open(info.path, os.O_RDONLY | os.O_DIRECT)
            used_direct = True
        except OSError:  # tmpfs and some overlay file systems refuse O_DIRECT
            fd = -1
    try:
        if fd < 0:
            fd = os.open(info.path, os.O_RDONLY)
        want = align_up(n) if used_direct else n  # O_DIRECT lengths are whole blocks; the tail past EOF reads short
        pos = 0
        while pos < want:
            try:
                got = os.preadv(fd, [buf[pos:min(want, pos + _READ_CHUNK)]], info.data_start + pos)
            except OSError as e:
                if used_direct and e.errno == errno.EINVAL and pos == 0:  # O_DIRECT accepted at open, refused at read
                    os.close(fd)
                    fd, used_direct, want = os.open(info.path, os.O_RDONLY), False, n
                    continue
                raise
            if got == 0:
                break
            pos += got
        if pos < n:
            raise WeightStoreError(f"{info.path} is truncated: read {pos} of {n} data bytes")
        if direct and not used_direct and hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    except FileNotFoundError:
        raise WeightStoreError(f"layer file {info.path} is missing; delete its cache directory to rebuild it") from None
    except OSError as e:
        raise WeightStoreError(f"cannot read {info.path}: {e.strerror or e}") from None
    finally:
        if fd >= 0:
            os.close(fd)
    return used_direct
