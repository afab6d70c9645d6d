"""`CompressedKVCache`: any registered cache codec as a transformers `Cache`.

transformers' attention modules call `cache.update(k, v, layer_idx)` with the step's post-RoPE keys and values
(k, v: [B, Hkv, T, D]) and attend over what it returns. Each layer here is a codec `CacheLayer` (cache/base.py),
built at its first update from the shapes it sees, and `update` follows the engine's rule (engine/mixers.py,
`attention_step`), so a transformers forward sees the keys the native engine would:

    nothing held yet (a prompt)      return the exact k, v (the prompt attends to itself at full precision), append
    T <= 16 new tokens (decoding)    append, return what the layer holds (`dense()`: the stored, possibly lossy keys)
    a longer later chunk             return dense() + the chunk's exact k, v, then append

`get_seq_length` counts tokens seen (the RoPE position), which differs from the tokens held once a codec evicts;
`get_mask_sizes` says so to transformers' mask builders through the key offset (held key j sits at position
j + seen - held, which keeps every held key in the past of every new query).

Queries. Codecs that score tokens (h2o, snapkv: a layer's `needs_scores`) need `observe(q)` with the step's
post-RoPE queries, which transformers hands only to the attention function. `update` therefore leaves a note (this
cache, the layer, the step's mode) that the bridged attention functions (`attn_implementation="ollm_*"`,
attention.py) take, attend with, and answer with `observe(q)`. Under any other attention function the note is
still there at the next update: a scoring codec then refuses with one line before it could evict blindly; other
codecs get `observe` with an empty query block, which is their storage tier's signal that the layer's step is done.

Under an `ollm_*` attention function a decoding step's `update` returns only the new tokens, and the backend's
`decode(q, layer)` reads the layer itself: the codec's fused kernel where one exists (int8/int4/int2 on CUDA), its
`dense()` otherwise.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from ollm_triton.cache.base import CacheCodec, CacheLayer, LayerSpec
from ollm_triton.engine.mixers import DECODE_MAX_TOKENS
from ollm_triton.registry import PluginError, registry

# The source document's `compression_method=` spelling -> a codec name (bits picks int8/int4/int2).
METHODS = {"quantization": "quant", "quant": "quant", "clustering": "cluster", "eviction": "h2o", "none": "dense"}
BIT_CODECS = {8: "int8", 4: "int4", 2: "int2"}


def codec_from_spelling(codec: str | None = None, *, compression_method: str | None = None, bits: int | None = None,
                        cache_dir: str | None = None, **params: Any) -> tuple[str, dict[str, Any]]:
    """(codec name, parameters) from either spelling, validated by the codec's schema (the CLI's):
    `("int4", residual=128)` or `(compression_method="quantization", bits=8, cache_dir="./kv")`. cache_dir selects
    the codec's disk tier (`store=disk cache_dir=...`). Raises PluginError with one line."""
    if codec is not None and compression_method is not None:
        raise PluginError(f"give a codec name ({codec!r}) or compression_method ({compression_method!r}), not both")
    name = codec or "dense"
    if compression_method is not None:
        name = METHODS.get(compression_method, compression_method)
        if name not in registry.names("cache"):
            raise PluginError(f"unknown compression_method {compression_method!r}; accepted: "
                              f"{', '.join(sorted(set(METHODS) | set(registry.names('cache'))))}")
    params = dict(params)
    if bits is not None:
        if name == "quant" and bits in BIT_CODECS:
            name = BIT_CODECS[bits]
        elif name == "quant":
            raise PluginError(f"compression_method='quantization' takes bits in {sorted(BIT_CODECS)}, got {bits}")
        else:
            params["bits"] = bits  # let the codec's schema accept or refuse it
    if cache_dir is not None:
        params.setdefault("store", "disk")
        params["cache_dir"] = str(cache_dir)
    registry.config("cache", name, params)
    return name, params


@dataclass(frozen=True)
class CompressionStats:
    """What the cache holds against what a dense cache in the model dtype would hold for every token seen.
    compression_ratio = original / compressed (4.0: a quarter of the bytes); MB are 10**6 bytes."""

    original_bytes: int
    compressed_bytes: int
    tokens_seen: int
    tokens_held: int
    tokens_compressed: int
    tokens_evicted: int

    @property
    def compression_ratio(self) -> float:
        return self.original_bytes / self.compressed_bytes if self.compressed_bytes else 0.0

    @property
    def original_mb(self) -> float:
        return self.original_bytes / 1e6

    @property
    def compressed_mb(self) -> float:
        return self.compressed_bytes / 1e6


# ---------------------------------------------------------------------------------------------------- the handoff


@dataclass
class Note:
    """What `update` leaves for the attention function of the same layer: the codec layer and the step's mode
    (prefill | decode | chunk)."""

    cache: CompressedKVCache
    layer_idx: int
    layer: CacheLayer
    mode: str
    queries: int  # T


_local = threading.local()


def take_note(layer_idx: int) -> Note | None:
    """The note the last `update` left, if it was for `layer_idx` (consumed)."""
    note = getattr(_local, "note", None)
    if note is None or note.layer_idx != layer_idx:
        return None
    _local.note = None
    note.cache.bridged = True
    return note


def _settle_note() -> None:
    """An earlier layer's note nobody took: its attention was not an `ollm_*` function (see the module docstring)."""
    note = getattr(_local, "note", None)
    if note is None:
        return
    _local.note = None
    note.cache._unobserved(note)


def needs_scores(layer: CacheLayer) -> bool:
    """Whether a codec layer scores tokens with the queries (`needs_scores` of the eviction codecs; a storage
    tier's StoredLayer wraps the codec's layer in `inner`)."""
    while not getattr(layer, "needs_scores", False) and hasattr(layer, "inner"):
        layer = layer.inner
    return bool(getattr(layer, "needs_scores", False))


# ---------------------------------------------------------------------------------------------------- the cache


class CodecLayer(CacheLayerMixin):
    """One decoder layer: a codec CacheLayer built at the first update."""

    is_compileable = False
    is_sliding = False
    is_croppable = True

    def __init__(self, owner: CompressedKVCache):
        super().__init__()
        self.owner = owner
        self.inner: CacheLayer | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        b, h, _, d = key_states.shape
        if value_states.shape[-1] != d:
            raise PluginError(f"codec {self.owner.codec_name!r} stores keys and values of one head_dim; this layer has "
                              f"{d} and {value_states.shape[-1]}")
        spec = LayerSpec(batch=b, kv_heads=h, head_dim=d, dtype=key_states.dtype, device=key_states.device,
                         max_len=self.owner.max_len)
        spec.__dict__["_store_group"] = self.owner._store_group  # one storage-tier group per cache (storage.py)
        self.inner = self.owner.codec.new_layer(spec)
        self.device, self.dtype = key_states.device, key_states.dtype
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        return self.owner.update(key_states, value_states, self.owner.layers.index(self))

    def get_seq_length(self) -> int:
        return self.inner.appended if self.inner is not None else 0

    def held(self) -> int:
        return self.inner.length if self.inner is not None else 0

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        held = self.held()
        return held + query_length, self.get_seq_length() - held

    def get_max_length(self) -> int:
        return -1

    def get_max_cache_shape(self) -> int:  # transformers < 5.20 asks for this name
        return -1

    def offload(self):  # the codec's own storage tiers (`store=cpu|disk`) move its buffers
        pass

    def prefetch(self):
        pass

    def reset(self) -> None:
        self.inner = None
        self.is_initialized = False

    def crop(self, tokens_to_remove: int) -> None:
        if self.inner is None:
            return
        seen = self.inner.appended
        keep = seen + tokens_to_remove if tokens_to_remove < 0 else min(tokens_to_remove, seen)
        if keep != seen:
            self.inner.truncate(max(keep, 0))

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise NotImplementedError("CompressedKVCache keeps one sequence order: beam search and batch reordering are "
                                  "not supported (use greedy or sampling)")

    batch_repeat_interleave = batch_select_indices = reorder_cache


class CompressedKVCache(Cache):
    """A transformers Cache that stores K/V with a registered cache codec (see the module docstring).

    CompressedKVCache("int4", residual=128)
    CompressedKVCache(compression_method="quantization", bits=8, cache_dir="./compressed_cache")
    CompressedKVCache(codec_instance)

    max_len: the context the codec may pre-allocate for (its buffers grow past it). Codec parameters are checked by
    the codec's schema, the one the CLI uses; a wrong one raises PluginError with one line.
    """

    def __init__(self, codec: str | CacheCodec | None = None, *, compression_method: str | None = None,
                 bits: int | None = None, cache_dir: str | None = None, max_len: int = 2048, **params: Any):
        if isinstance(codec, CacheCodec):
            if compression_method or bits is not None or cache_dir is not None or params:
                raise PluginError("a codec instance carries its own parameters; pass a codec name to set them")
            self.codec, self.codec_name, self.params = codec, codec.plugin_name, {}
        else:
            self.codec_name, self.params = codec_from_spelling(
                codec, compression_method=compression_method, bits=bits, cache_dir=cache_dir, **params)
            self.codec = registry.build("cache", self.codec_name, self.params)
        if max_len < 1:
            raise PluginError(f"max_len must be >= 1 token, got {max_len}")
        self.max_len = int(max_len)
        self.bridged = False  # an `ollm_*` attention function has taken this cache's notes
        self._store_group: list = []
        super().__init__(layers=[])

    # -- the update rule (module docstring) ----------------------------------------------------------------------

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        _settle_note()
        while len(self.layers) <= layer_idx:
            self.layers.append(CodecLayer(self))
        slot = self.layers[layer_idx]
        if not slot.is_initialized:
            slot.lazy_initialization(key_states, value_states)
        layer, t = slot.inner, key_states.shape[2]
        held = layer.length
        if held == 0:
            mode, out = "prefill", (key_states, value_states)
            layer.append(key_states, value_states)
        elif t <= DECODE_MAX_TOKENS:
            mode = "decode"
            layer.append(key_states, value_states)
            # an ollm_* backend reads the layer itself (fused kernel or dense()); others need the held keys
            out = (key_states, value_states) if self.bridged else layer.dense()
        else:
            mode = "chunk"
            past_k, past_v = layer.dense()
            out = torch.cat((past_k, key_states), dim=2), torch.cat((past_v, value_states), dim=2)
            layer.append(key_states, value_states)
        _local.note = Note(self, layer_idx, layer, mode, t)
        return out

    def _unobserved(self, note: Note) -> None:
        """The attention of `note`'s layer did not take the note: it was not an `ollm_*` function."""
        if self.bridged:
            self.bridged = False
            raise RuntimeError("this CompressedKVCache was filled under an ollm_* attention implementation and is now "
                               "used under another one; build a new cache for that model")
        if needs_scores(note.layer):
            raise PluginError(f"cache {self.codec_name!r} scores tokens with the attention queries, which this "
                              "attention implementation does not hand to the cache; load the model with "
                              "attn_implementation='ollm_fa' (or any ollm_* backend)")
        spec = note.layer.spec
        note.layer.observe(torch.empty(spec.batch, spec.kv_heads, 0, spec.head_dim, dtype=spec.dtype,
                                       device=spec.device))

    # -- what transformers asks ----------------------------------------------------------------------------------

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.layers[layer_idx].get_seq_length() if layer_idx < len(self.layers) else 0

    def get_mask_sizes(self, query_length: int, layer_idx: int) -> tuple[int, int]:
        self._settle_evictions()
        if layer_idx >= len(self.layers):
            return query_length, 0
        return self.layers[layer_idx].get_mask_sizes(query_length)

    def _settle_evictions(self) -> None:
        """An eviction codec evicts what the last step owes at its next append (cache/eviction.py); a mask built
        for several new tokens must count the keys held after it, so pay it now with an empty append (the layer
        is read by nothing in between, so this is the same eviction at the same point of the sequence)."""
        _settle_note()
        for slot in self.layers:
            if slot.inner is not None and slot.inner.length:
                k = torch.empty(slot.inner.spec.batch, slot.inner.spec.kv_heads, 0, slot.inner.spec.head_dim,
                                dtype=slot.dtype, device=slot.device)
                slot.inner.append(k, k)

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1

    def get_max_cache_shape(self, layer_idx: int = 0) -> int:
        return -1

    def reset(self) -> None:
        _local.note = None
        for slot in self.layers:
            slot.reset()
        self.bridged = False

    def crop(self, tokens_to_remove: int) -> None:
        _settle_note()
        for slot in self.layers:
            slot.crop(tokens_to_remove)

    @property
    def is_compileable(self) -> bool:
        return False

    # -- the toolkit's view --------------------------------------------------------------------------------------

    def codec_layers(self) -> list[CacheLayer]:
        return [slot.inner for slot in self.layers if slot.inner is not None]

    @property
    def compression_stats(self) -> CompressionStats:
        _settle_note()
        layers = self.codec_layers()
        first = layers[0] if layers else None
        return CompressionStats(
            original_bytes=int(sum(layer.original_bytes() for layer in layers)),
            compressed_bytes=int(sum(layer.stored_bytes() for layer in layers)),
            tokens_seen=first.appended if first else 0,
            tokens_held=first.length if first else 0,
            tokens_compressed=first.compressed_tokens if first else 0,
            tokens_evicted=first.evicted_tokens if first else 0,
        )

    def __repr__(self) -> str:
        params = "".join(f", {k}={v!r}" for k, v in self.params.items())
        return f"CompressedKVCache({self.codec_name!r}{params}, layers={len(self.layers)})"


__all__ = ["CompressedKVCache", "CompressionStats", "codec_from_spelling", "needs_scores", "take_note"]
