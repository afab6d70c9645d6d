"""`WeightStore`: where the decoder layers' weights live between uses: the device, pinned host memory, or disk.

Every layer is kept as one flat byte image laid out by a `LayerLayout` (see layer_file.py), so moving a layer is
one copy (or one read) into a slot of the same layout:
- tier "device": images on the device (no streaming; a reference point);
- tier "cpu": images in host memory, page-locked when CUDA exists (asynchronous host-to-device copies need it);
- tier "disk": one safetensors file per layer in a cache directory (default ~/.cache/ollm_triton/<model hash>,
  $OLLM_TRITON_CACHE overrides the root), written once from the loaded model or by scripts/shard_layers.py from a
  checkpoint, and read back by byte range with a CRC-32 per tensor checked on read.

The cache directory holds `manifest.json`, written last: a directory without it is incomplete and is rewritten;
one with it must belong to the same model (its hash covers the config, the dtype, every tensor's name and shape,
and bytes sampled across every tensor), or the store refuses it, naming the directory.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, is_dataclass
from pathlib import Path

import torch

from ollm_triton.prefetch.layer_file import (
    FORMAT,
    LayerFileInfo,
    LayerLayout,
    WeightStoreError,
    open_layer_file,
    read_layer_data,
    verify_layer,
    write_layer_file,
)
from ollm_triton.prefetch.pool import aligned_empty

TIERS = ("device", "cpu", "disk")
VERIFY = ("always", "once", "never")
LAYER_PREFIX = "model.layers.{}."
MANIFEST = "manifest.json"
_SAMPLES, _SAMPLE_BYTES = 64, 64  # per tensor: 64 windows of 64 bytes spread evenly


def cache_root() -> Path:
    root = os.environ.get("OLLM_TRITON_CACHE")
    if root:
        return Path(root).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "ollm_triton"


def layer_file_name(i: int) -> str:
    return f"layer_{i:03d}.safetensors"


class ModelHasher:
    """The cache key of a model's decoder layers: config, dtype, tensor names and shapes, and sampled bytes.

    Sampling (not hashing every byte) keeps the key cheap for an 8B model; it separates different checkpoints,
    seeds and dtypes. Weights edited in place at a few positions would need a fresh cache_dir.
    """

    def __init__(self, config, dtype: torch.dtype):
        cfg = asdict(config) if is_dataclass(config) else dict(config or {})
        self._h = hashlib.sha256(json.dumps({"config": cfg, "dtype": str(dtype), "format": FORMAT},
                                            sort_keys=True, default=str).encode())

    def add_layer(self, index: int, tensors: dict[str, torch.Tensor]) -> None:
        for name, t in tensors.items():
            self._h.update(f"{index}:{name}:{list(t.shape)}:{t.dtype}".encode())
            flat = t.detach().contiguous().reshape(-1).view(torch.uint8)
            n = flat.numel()
            if n == 0:
                continue
            if n <= _SAMPLES * _SAMPLE_BYTES:
                sample = flat
            else:
                starts = torch.linspace(0, n - _SAMPLE_BYTES, _SAMPLES, device=flat.device).long()
                sample = flat[(starts[:, None] + torch.arange(_SAMPLE_BYTES, device=flat.device)).reshape(-1)]
            self._h.update(sample.cpu().numpy().tobytes())

    def hexdigest(self) -> str:
        return self._h.hexdigest()[:20]


def layer_tensors(layer: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p for n, p in layer.named_parameters()}


def _register_pinned(t: torch.Tensor) -> bool:
    """Page-lock a host tensor in place (cudaHostRegister): no copy, no rounding of its size."""
    try:
        err = torch.cuda.cudart().cudaHostRegister(t.data_ptr(), t.numel() * t.element_size(), 0)
    except Exception:
        return False
    return int(getattr(err, "value", err)) == 0


def _unregister_pinned(t: torch.Tensor) -> None:
    try:
        torch.cuda.cudart().cudaHostUnregister(t.data_ptr())
    except Exception:
        pass


class WeightStore:
    """Decoder-layer weights of one model in one tier. Build with `from_layers` or open a shard cache with
    `open_disk`; loaders read a layer with `read_into` (disk) or copy `image(i)` (cpu, device)."""

    def __init__(self, tier: str, layouts: list[LayerLayout], *, images: list[torch.Tensor] | None = None,
                 files: list[LayerFileInfo] | None = None, directory: Path | None = None, verify: str = "once",
                 model_hash: str = "", registered: list[torch.Tensor] | None = None):
        if tier not in TIERS:
            raise ValueError(f"unknown weight-store tier {tier!r}; accepted: {', '.join(TIERS)}")
        if verify not in VERIFY:
            raise ValueError(f"unknown verify mode {verify!r}; accepted: {', '.join(VERIFY)}")
        self.tier = tier
        self.layouts = layouts
        self.images = images
        self.files = files
        self.directory = directory
        self.verify = verify
        self.model_hash = model_hash
        self._registered = registered or []
        self._verified: set[int] = set()
        self._lock = threading.Lock()

    # --- construction --------------------------------------------------------------------------------------
    @classmethod
    def from_layers(cls, layers: list[torch.nn.Module], tier: str, *, config=None, dtype: torch.dtype | None = None,
                    device: torch.device | str = "cpu", cache_dir: str | os.PathLike | None = None, pin: bool = False,
                    verify: str = "once", workers: int = 4) -> WeightStore:
        """Take every layer's current parameters (on any device) into a store of `tier`.

        cpu: host images (page-locked with `pin`). device: images on `device`. disk: layer files under cache_dir
        (default cache_root()/<model hash>), written unless a complete cache of this same model is already there.
        """
        layouts = [LayerLayout.of_module(layer) for layer in layers]
        if tier in ("cpu", "device"):
            images, registered = [], []
            for layer, layout in zip(layers, layouts, strict=True):
                image = cls._new_image(layout, "cpu" if tier == "cpu" else device, pin and tier == "cpu", registered)
                layout.pack(layer_tensors(layer), image)
                images.append(image)
            return cls(tier, layouts, images=images, verify=verify, registered=registered)
        if tier != "disk":
            raise ValueError(f"unknown weight-store tier {tier!r}; accepted: {', '.join(TIERS)}")
        dtype = dtype or next(iter(layer_tensors(layers[0]).values())).dtype
        hasher = ModelHasher(config, dtype)
        for i, layer in enumerate(layers):
            hasher.add_layer(i, layer_tensors(layer))
        model_hash = hasher.hexdigest()
        directory = Path(cache_dir).expanduser() if cache_dir else cache_root() / model_hash
        if not (directory / MANIFEST).is_file():
            items = ((i, layouts[i], layer_tensors(layer)) for i, layer in enumerate(layers))
            write_layer_cache(directory, items, layouts, model_hash=model_hash, config=config, dtype=dtype,
                              workers=workers)
        return cls.open_disk(directory, layouts, model_hash=model_hash, verify=verify)

    @classmethod
    def open_disk(cls, directory: str | os.PathLike, layouts: list[LayerLayout], *, model_hash: str | None = None,
                  verify: str = "once") -> WeightStore:
        """A disk store over an existing cache directory; checks the manifest and every file's header."""
        directory = Path(directory).expanduser()
        manifest_path = directory / MANIFEST
        try:
            manifest = json.loads(manifest_path.read_text())
        except FileNotFoundError:
            raise WeightStoreError(f"{manifest_path} is missing: {directory} is not a complete layer cache") from None
        except (OSError, json.JSONDecodeError) as e:
            raise WeightStoreError(f"{manifest_path} is unreadable ({e}); delete {directory} to rebuild it") from None
        if model_hash is not None and manifest.get("model_hash") != model_hash:
            raise WeightStoreError(f"{directory} holds the layers of another model (hash {manifest.get('model_hash')}, "
                                   f"this one is {model_hash}); pass another cache_dir or delete it")
        if manifest.get("num_layers") != len(layouts):
            raise WeightStoreError(f"{directory} holds {manifest.get('num_layers')} layers, the model has "
                                   f"{len(layouts)}; pass another cache_dir or delete it")
        files = [open_layer_file(directory / layer_file_name(i), layout, prefix=LAYER_PREFIX.format(i))
                 for i, layout in enumerate(layouts)]
        return cls("disk", layouts, files=files, directory=directory, verify=verify,
                   model_hash=manifest.get("model_hash", ""))

    @staticmethod
    def _new_image(layout: LayerLayout, device, pin: bool, registered: list[torch.Tensor]) -> torch.Tensor:
        image = aligned_empty(layout.slot_bytes, device)
        if pin and torch.cuda.is_available():
            if _register_pinned(image):
                registered.append(image)
            else:
                image = aligned_empty(layout.slot_bytes, device, pin=True)
        return image

    # --- access --------------------------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return len(self.layouts)

    @property
    def slot_bytes(self) -> int:
        return max(layout.slot_bytes for layout in self.layouts)

    def layer_bytes(self, i: int) -> int:
        return self.layouts[i].nbytes

    def image(self, i: int) -> torch.Tensor:
        """Layer i's flat image (cpu and device tiers)."""
        if self.images is None:
            raise ValueError(f"the {self.tier} tier keeps no images in memory")
        return self.images[i]

    def is_page_locked(self, i: int) -> bool:
        """Whether layer i's host image is page-locked: from torch's pinned allocator, or registered in place with
        cudaHostRegister (torch's `is_pinned()` only knows its own allocator's blocks on some versions)."""
        image = self.image(i)
        return image.is_pinned() or any(r.data_ptr() == image.data_ptr() for r in self._registered)

    def path(self, i: int) -> Path:
        if self.files is None:
            raise ValueError(f"the {self.tier} tier has no files")
        return self.files[i].path

    def needs_verify(self, i: int) -> bool:
        return self.verify == "always" or (self.verify == "once" and i not in self._verified)

    def read_into(self, i: int, dst: torch.Tensor, *, direct: bool = False) -> bool:
        """Read layer i from its file into `dst` (uint8 CPU, >= slot bytes) and check its checksums as `verify`
        says. Returns whether O_DIRECT ran. WeightStoreError names the file on a short read or a mismatch."""
        info, layout = self.files[i], self.layouts[i]
        used_direct = read_layer_data(info, layout, dst, direct=direct)
        if self.needs_verify(i):
            verify_layer(info, layout, dst, prefix=LAYER_PREFIX.format(i))
            with self._lock:
                self._verified.add(i)
        return used_direct

    def verify_file(self, i: int) -> None:
        """Read layer i into a scratch buffer and check it (for loaders that read around the host, e.g. kvikio)."""
        scratch = aligned_empty(self.layouts[i].slot_bytes, "cpu")
        self.read_into(i, scratch)

    def close(self) -> None:
        """Unpin registered host images (their memory must not be freed while still registered with CUDA)."""
        for t in self._registered:
            _unregister_pinned(t)
        self._registered, self.images = [], None

    def __del__(self):
        if getattr(self, "_registered", None):
            try:
                self.close()
            except Exception:  # interpreter shutdown: CUDA may already be gone
                pass


def write_layer_cache(directory: Path, layers: Iterable[tuple[int, LayerLayout, dict[str, torch.Tensor]]],
                      layouts: list[LayerLayout], *, model_hash: str, config=None, dtype=None,
                      workers: int = 4) -> None:
    """Write one file per layer into `directory`, then manifest.json (the mark of a complete cache).

    `layers` yields (index, layout, name -> tensor) and may be a generator that loads each layer on demand (the
    shard script reads a checkpoint one layer at a time). Checks free space first; ENOSPC during a write still
    raises WeightStoreError naming the file.
    """
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise WeightStoreError(f"cannot create the layer cache directory {directory}: {e.strerror or e}") from None
    need = sum(layout.nbytes + 65536 for layout in layouts)
    free = shutil.disk_usage(directory).free
    if free < need:
        raise WeightStoreError(f"no space left for the layer cache in {directory}: it needs {need / 1e9:.2f} GB, "
                               f"{free / 1e9:.2f} GB are free; set cache_dir to a larger disk")
    local = threading.local()

    def write(i: int, layout: LayerLayout, tensors: dict[str, torch.Tensor]) -> None:
        image = getattr(local, "image", None)
        if image is None or image.numel() < layout.slot_bytes:
            image = local.image = aligned_empty(layout.slot_bytes, "cpu")
        image[layout.nbytes:layout.slot_bytes].zero_()
        layout.pack(tensors, image)
        write_layer_file(directory / layer_file_name(i), layout, image, prefix=LAYER_PREFIX.format(i), layer=i)

    with ThreadPoolExecutor(max(1, workers), thread_name_prefix="ollm-shard") as pool:
        pending = []
        for i, layout, tensors in layers:
            pending.append(pool.submit(write, i, layout, tensors))
            if len(pending) >= 2 * max(1, workers):  # bound what a lazy generator holds in memory
                pending.pop(0).result()
        for f in pending:
            f.result()
    manifest = {"format": FORMAT, "model_hash": model_hash, "num_layers": len(layouts),
                "dtype": str(dtype).replace("torch.", ""), "layer_prefix": LAYER_PREFIX,
                "files": [layer_file_name(i) for i in range(len(layouts))],
                "config": asdict(config) if is_dataclass(config) else None}
    tmp = directory / f".{MANIFEST}.tmp-{os.getpid()}"
    try:
        tmp.write_text(json.dumps(manifest, indent=1, default=str))
        os.replace(tmp, directory / MANIFEST)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise WeightStoreError(f"cannot write {directory / MANIFEST}: {e.strerror or e}") from None
