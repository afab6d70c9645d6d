"""The KV cache-codec interface: the whole contract a codec keeps with the engine and the attention backends.

A `CacheCodec` plugin builds one `CacheLayer` per decoder layer. A layer stores the post-RoPE keys and values of
every token appended so far (or of the tokens an eviction codec kept), in whatever format the codec chooses.

Shapes: k, v: [B, Hkv, T, D]. `dense()` returns [B, Hkv, L, D] in the model dtype, L = tokens held.

What the engine reads, declared here and never inferred from a codec's name:
    CacheCodec.static_buffers   its layers are pre-allocated K/V buffers [B, Hkv, max_len, D] in the model dtype,
                                exposed as `layer.k`, `layer.v`, that the engine's static (CUDA-graph) decode step
                                may write and attend in place, telling the layer its new fill level through
                                `set_length(n)`; such a layer keeps no other state (no scores, no eviction)
    CacheCodec.static_decode    its layers take one new token per row inside the engine's static decode step (the
                                CUDA-graph step of engine/fast_decode.py and the slot rows of continuous batching):
                                `layer.static_decode(q, k, v, cos, sin, pos)` stores and attends with every row's
                                position read on the device (no host value), `row_view(start, stop)` gives rows of the
                                layer that share its storage, `zero_storage()` makes every slot finite
    CacheCodec.static_window_sinks   its `static_decode` also takes the model's own attention rule for the layer:
                                `window` (keys seen back from the newest, 0 = all) and `sinks` ([Hq] logits, one
                                more softmax denominator term per head), as the attention backends' `layer_window` /
                                `sink_logits` do (gpt-oss); without it such a model's step runs piecewise
    CacheCodec.static_sync      such a layer must be told a row's fill level (`set_length`) after each static step
                                whose length `sync_due(length)` flags, not only at the end of a generation: it does
                                host-side work then (quantizing a full residual group); between those it may lag.
                                All layers of a row share its lengths, so the engine asks one layer a row and then
                                tells them all (one check a row and step, not one call a layer)
    CacheCodec.static_form      the codec whose static-step declarations above hold for this codec's layers: itself,
                                or, for a wrapper whose layers may change format (adapt/codec.py), the codec it wraps:
                                its layers then run that codec's static step only for a generation `static_blocker`
                                clears, and the engine's plan reads the wrapped codec's declarations
    CacheCodec.static_blocker(spec, tokens, cache=None)   why a generation that will hold `tokens` in a cache built
                                with `spec` (max_len: its capacity) cannot run the whole static step over this codec's
                                layers (one line), or None (the default); with `cache`, asked again after its prompt
                                was stored there
    CacheCodec.bytes_per_token, bytes_for   what one token (or a sequence of n) costs a layer: the run's memory check
                                before building a model, and the server's admission of requests
    CacheCodec.max_held_tokens(block)   the most tokens a layer holds, however many it has seen, when tokens arrive
                                in blocks of at most `block` (None: every token seen); the server admits inputs
                                longer than the context or the KV memory only for a codec that declares one
    CacheLayer.attend           an optional fused decode kernel over the codec's own storage
    CacheLayer.compressed_tokens, evicted_tokens   tokens held lossily and tokens dropped (tasks report whether the
                                codec had any effect)
    CacheLayer.holds_kv         False for a layer that carries a fixed-size state instead of K/V (cache/state.py
                                `StateLayer`: the linear-attention layers of a hybrid model; no codec applies to
                                them, their `stored_bytes` is the state's); the engine builds those, codecs never
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ollm_triton.timing import Timer


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

    holds_kv = True  # False: a fixed-size state, not K/V (cache/state.py)

    def __init__(self, spec: LayerSpec):
        self.spec = spec
        self.appended = 0  # tokens ever appended minus those truncated; codecs keep it current
        self.encode_timer = Timer(spec.device)  # codecs time their encoding in `encode_timer.region()`

    @property
    def compress_seconds(self) -> float:
        """Seconds spent encoding (quantizing, scoring, clustering), reported by stats()."""
        return self.encode_timer.seconds

    @property
    def length(self) -> int:
        """Tokens held now."""
        raise NotImplementedError

    @property
    def compressed_tokens(self) -> int:
        """Held tokens whose K/V read back inexactly (quantized, clustered); 0 for a lossless layer."""
        return 0

    @property
    def evicted_tokens(self) -> int:
        """Tokens appended and then dropped by the codec."""
        return max(self.appended - self.length, 0)

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        raise NotImplementedError

    def dense(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All held K and V as dense tensors in the model dtype (the generic path)."""
        raise NotImplementedError

    def truncate(self, length: int) -> None:
        """Keep the first `length` tokens and drop the rest (speculative-decoding rollback).
        Codecs that cannot roll back raise NotImplementedError with the reason."""
        raise NotImplementedError(f"{type(self).__name__} cannot truncate")

    def set_length(self, length: int) -> None:
        """Static-buffer layers only (`CacheCodec.static_buffers`): the engine's static step wrote K/V into
        `k`, `v` up to `length` tokens behind the layer's back; take that as the fill level."""
        raise NotImplementedError(f"{type(self).__name__} has no static buffers")

    def sync_due(self, length: int) -> bool:
        """Static-sync layers (`CacheCodec.static_sync`): whether the static step that brought the row to `length`
        tokens left host work for `set_length(length)` (then every layer of the row must be told now; otherwise
        the engine may tell them later, at a due step or before the layer is read). Default: every step."""
        return True

    def attend(self, q: torch.Tensor, backend) -> torch.Tensor | None:
        """A fused decode kernel over this codec's own storage, or None to let the backend use dense()."""
        return None

    # -- the static decode step (layers of codecs that declare `static_decode`) -------------------------------------
    static_kernel = "none"  # what static_decode attends with (metrics.json's decode_attention_path)
    # continuous batching steps idle rows at positions >= scratch_from (past every request's tokens, engine/slots.py):
    # their writes must not land on a slot that holds a token of a row (dense buffers: they land past them), and
    # their output is dropped, so a layer may attend them over one key (at the scratch position, a full-capacity
    # attention would set the step's time: the varlen kernels' work follows each row's length)
    scratch_from: int | None = None

    def static_decode(self, q, k, v, cos, sin, pos, *, kernels: bool, shared: dict | None = None,
                      **layer) -> torch.Tensor:
        """One new token per row: q [B, 1, Hq, D], k, v [B, 1, Hkv, D] (token-major, before RoPE), cos, sin
        [B, 1, D] at the rows' positions, pos [B] long on the device (each row's length before the step). Store
        the new K/V of row b at position pos[b] and attend it over the row's pos[b] + 1 tokens -> [B, Hq, 1, D].
        Capturable: reads no host value. `shared`: one dict for all layers of a step, where a layer may keep what
        it derives from pos alone so that the other layers do not launch it again. `layer`: `window`, `sinks`
        (only for codecs declaring `static_window_sinks`)."""
        raise NotImplementedError(f"{type(self).__name__} has no static decode step")

    def row_view(self, start: int, stop: int) -> CacheLayer:
        """Rows [start, stop) of this layer as a layer of their own that shares this one's storage (empty: fill
        level 0). Continuous batching prefills a request into its row through such a view."""
        raise NotImplementedError(f"{type(self).__name__} has no static decode step")

    def zero_storage(self) -> None:
        """Fill every slot with finite values (masked reference attention multiplies unwritten slots by 0)."""
        raise NotImplementedError(f"{type(self).__name__} has no static decode step")

    def observe(self, q: torch.Tensor) -> None:
        """Called by the engine after each layer's attention step with that step's queries q: [B, Hq, T, D]
        (post-RoPE), whose T tokens were appended just before. Eviction codecs score the held tokens and evict
        here (after the step attended, so a prompt attends to all of itself); other codecs ignore it."""

    def stored_bytes(self) -> int:
        raise NotImplementedError

    def held_bytes(self) -> int:
        """What the layer occupies: `stored_bytes` plus anything kept beside the sequence's entries (a state layer's
        rollback states, cache/state.py)."""
        return self.stored_bytes()

    def original_bytes(self) -> int:
        """What a dense cache in the model dtype would hold for every token appended (not only those kept)."""
        s = self.spec
        elt = torch.empty((), dtype=s.dtype).element_size()
        return 2 * s.batch * s.kv_heads * s.head_dim * self.appended * elt


def once_per_step(shared: dict | None, key, make):
    """make() once per static step: kept in the step's `shared` dict for the other layers (None: no sharing)."""
    if shared is None:
        return make()
    if key not in shared:
        shared[key] = make()
    return shared[key]


class CacheCodec:
    """Base class of cache-codec plugins."""

    plugin_name = "base"
    static_buffers: bool = False
    static_decode: bool = False
    static_window_sinks: bool = False
    static_sync: bool = False

    @property
    def static_form(self) -> CacheCodec:
        return self

    def static_blocker(self, spec: LayerSpec, tokens: int, cache: KVCache | None = None) -> str | None:
        return None

    def new_layer(self, spec: LayerSpec) -> CacheLayer:
        raise NotImplementedError

    def bytes_per_token(self, spec: LayerSpec) -> float:
        """Bytes one token costs one layer of `spec.batch` sequences at long context (an upper bound is fine: the
        run refuses a model that would not fit by it). Default: dense K/V in the model dtype."""
        elt = torch.empty((), dtype=spec.dtype).element_size()
        return 2.0 * spec.batch * spec.kv_heads * spec.head_dim * elt

    def bytes_for(self, spec: LayerSpec, tokens: int) -> float:
        """Bytes a layer holding `tokens` tokens takes at most (a codec with a full-precision window overrides)."""
        return tokens * self.bytes_per_token(spec)

    def device_layers(self, num_layers: int, device: torch.device) -> int:
        """How many of a cache's `num_layers` layers hold their KV on `device` at once; the memory check counts
        those there and the rest in host memory. Default: all (a codec whose layers wait on the host or on disk
        between uses, cache/storage.py `store`, declares fewer)."""
        return num_layers

    def max_held_tokens(self, block: int) -> int | None:
        """The most tokens one layer holds at any time, however many it has seen, when tokens arrive in blocks of at
        most `block` (a prompt chunk, a decode step); None: it holds every token it has seen (the default). Its KV
        then never exceeds `bytes_for(spec, max_held_tokens(block))` (serve/scheduler.py: long inputs)."""
        return None


class KVCache:
    """The per-sequence-batch cache of a model: one CacheLayer per decoder layer plus the position counter.

    `position` counts tokens processed (the RoPE position of the next token); it differs from a layer's
    `length` when a codec evicts tokens.
    """

    def __init__(self, layers: list[CacheLayer]):
        self.layers = layers
        self.position = 0

    @property
    def kv_length(self) -> int:
        return kv_length(self)

    def truncate(self, length: int) -> None:
        for layer in self.layers:
            layer.truncate(length)
        self.position = length

    def stats(self) -> dict[str, float | int]:
        original = sum(layer.original_bytes() for layer in self.layers)
        stored = sum(layer.stored_bytes() for layer in self.layers)
        # token counts from the first layer that holds K/V (a hybrid model's first layers may hold a state)
        first = next((layer for layer in self.layers if layer.holds_kv), self.layers[0] if self.layers else None)
        return {
            "kv_original_bytes": int(original),
            "kv_stored_bytes": int(stored),
            "kv_state_bytes": int(sum(layer.stored_bytes() for layer in self.layers if not layer.holds_kv)),
            "kv_ratio": stored / original if original else 0.0,
            "kv_tokens_kept": first.length if first else 0,
            "kv_tokens_seen": self.position,
            "kv_tokens_compressed": first.compressed_tokens if first else 0,
            "kv_tokens_evicted": first.evicted_tokens if first else 0,
            "kv_compress_seconds": sum(layer.compress_seconds for layer in self.layers),
        }


def kv_length(cache) -> int:
    """Tokens the first K/V-holding layer of `cache` (a KVCache or anything with `layers` and `position`) holds:
    what attention reads. A hybrid model's state layers hold every token seen, so `layers[0]` would not show an
    eviction codec's effect."""
    first = next((layer for layer in cache.layers if getattr(layer, "holds_kv", True)), None)
    return first.length if first is not None else cache.position
