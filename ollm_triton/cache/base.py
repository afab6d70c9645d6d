"""The KV cache-codec interface.

A `CacheCodec` plugin builds one `CacheLayer` per decoder layer. A layer stores the post-RoPE keys and values of
every token appended so far (or of the tokens an eviction codec kept), in whatever format the codec chooses.

Shapes: k, v: [B, Hkv, T, D]. `dense()` returns [B, Hkv, L, D] in the model dtype, L = tokens held.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LayerSpec:
    """What a cache layer must hold."""

    batch: int
    kv_heads: int
    head_dim: int
    dtype: torch.dtype
    device: torch.device
    max_len: int  # the run's maximum context; codecs may pre-allocate to it


class CacheLayer:
    """One decoder layer's KV storage."""

    def __init__(self, spec: LayerSpec):
        self.spec = spec
        self.appended = 0  # tokens ever appended minus those truncated; codecs keep it current
        self.compress_seconds = 0.0  # time spent encoding, reported by stats()

    @property
    def length(self) -> int:
        """Tokens held now."""
        raise NotImplementedError

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        raise NotImplementedError

    def dense(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All held K and V as dense tensors in the model dtype (the generic path)."""
        raise NotImplementedError

    def truncate(self, length: int) -> None:
        """Keep the first `length` tokens and drop the rest (speculative-decoding rollback).
        Codecs that cannot roll back raise NotImplementedError with the reason."""
        raise NotImplementedError(f"{type(self).__name__} cannot truncate")

    def attend(self, q: torch.Tensor, backend) -> torch.Tensor | None:
        """A fused decode kernel over this codec's own storage, or None to let the backend use dense()."""
        return None

    def observe(self, q: torch.Tensor) -> None:
        """Called by the engine after each layer's attention step with that step's queries q: [B, Hq, T, D]
        (post-RoPE), whose T tokens were appended just before. Eviction codecs score the held tokens and evict
        here (after the step attended, so a prompt attends to all of itself); other codecs ignore it."""

    def stored_bytes(self) -> int:
        raise NotImplementedError

    def original_bytes(self) -> int:
        """What a dense cache in the model dtype would hold for every token appended (not only those kept)."""
        s = self.spec
        elt = torch.empty((), dtype=s.dtype).element_size()
        return 2 * s.batch * s.kv_heads * s.head_dim * self.appended * elt


class CacheCodec:
    """Base class of cache-codec plugins."""

    plugin_name = "base"

    def new_layer(self, spec: LayerSpec) -> CacheLayer:
        raise NotImplementedError


class KVCache:
    """The per-sequence-batch cache of a model: one CacheLayer per decoder layer plus the position counter.

    `position` counts tokens processed (the RoPE position of the next token); it differs from a layer's
    `length` when a codec evicts tokens.
    """

    def __init__(self, layers: list[CacheLayer]):
        self.layers = layers
        self.position = 0

    def truncate(self, length: int) -> None:
        for layer in self.layers:
            layer.truncate(length)
        self.position = length

    def stats(self) -> dict[str, float]:
        original = sum(layer.original_bytes() for layer in self.layers)
        stored = sum(layer.stored_bytes() for layer in self.layers)
        return {
            "kv_original_bytes": original,
            "kv_stored_bytes": stored,
            "kv_ratio": stored / original if original else 0.0,
            "kv_tokens_kept": self.layers[0].length if self.layers else 0,
            "kv_tokens_seen": self.position,
            "kv_compress_seconds": sum(layer.compress_seconds for layer in self.layers),
        }
