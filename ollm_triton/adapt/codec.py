"""The KV wrapper an adapter puts around the run's codec: the controller's clock, and a codec that can change live.

`AdaptCodec(base, adapter)` builds `AdaptLayer`s, each delegating to an inner layer of the codec its cache is at
now. The layers of one KVCache (one per decoder layer, built in order by `Engine.new_cache`) share a `CacheGroup`:
the stage (0 = the run's codec, then the memory strategy's ladder: int8, int4), the LayerSpec each stage was built
with, and a generation counter. The first layer's append is the cache's step: it asks the adapter (memory first,
so an append that would not fit never reaches the old codec), then ticks the clock. When the group's stage moved,
each layer re-encodes what it holds at its own next append (dense() of the old layer appended to a new layer of
the new codec, then the old storage is dropped), so every layer changes in the same forward and peak memory grows
by one layer's worth, not the cache's.

The wrapper declares no static step of its own (`static_decode`, `static_buffers` False: the static verify blocks
and batched rows, which ask nothing per generation, never write its layers behind the clock). Its `static_form` is
the wrapped codec: the fast decoder asks `static_blocker` before a generation, and when no strategy can act on that
cache (the memory strategy: its whole horizon fits), the layers run the wrapped codec's static step, delegated to
the inner layers; after the step the adapter counts the tokens (`set_length`). A cache that moved, or one sized
short of its horizon, is refused after the prompt, and that generation runs piecewise.
"""

from __future__ import annotations

import weakref
from dataclasses import replace

import torch

from ollm_triton.cache.base import CacheCodec, CacheLayer, LayerSpec
from ollm_triton.timing import Timer


class CacheGroup:
    """The adapter's view of one KVCache: its layers, its codec stage, the spec that stage was sized with."""

    def __init__(self, spec: LayerSpec, codec: CacheCodec, num_layers: int, capacity: int | None):
        self.spec = spec  # the request's spec: max_len is the cache's whole horizon (prompt + new tokens)
        self.codec = codec
        self.stage = 0
        self.generation = 0
        self.num_layers = num_layers
        self.capacity = capacity  # tokens the current stage's layers were sized for (None: spec.max_len)
        self.layers: list[weakref.ref] = []

    @property
    def stage_spec(self) -> LayerSpec:
        return self.spec if self.capacity is None else replace(self.spec, max_len=max(1, self.capacity))

    def live(self) -> list[AdaptLayer]:
        return [layer for ref in self.layers if (layer := ref()) is not None]

    @property
    def tokens(self) -> int:
        """Tokens the first layer holds (the cache's length)."""
        layers = self.live()
        return layers[0].inner.length if layers else 0

    def held_bytes(self) -> int:
        return sum(layer.stored_bytes() for layer in self.live())

    def move_to(self, stage: int, codec: CacheCodec, capacity: int | None = None) -> None:
        """From the next append on, every layer re-encodes into `codec` (sized for `capacity`, None = the horizon)."""
        self.stage, self.codec, self.capacity = stage, codec, capacity
        self.generation += 1


class AdaptLayer(CacheLayer):
    """A CacheLayer that delegates to the layer of its cache's current codec and re-encodes when that changes."""

    def __init__(self, spec: LayerSpec, group: CacheGroup, index: int, adapter):
        super().__init__(spec)
        self.group, self.index, self.adapter = group, index, adapter
        self.inner: CacheLayer = group.codec.new_layer(group.stage_spec)
        self.generation = group.generation
        self.switch_timer = Timer(spec.device)  # re-encoding time (unsynchronized CUDA events, like encode_timer)
        self._spent = 0.0  # encode seconds of the layers this one replaced

    def __getattr__(self, name: str):  # anything a codec's layer exposes beyond the contract (last_path, ...)
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    def _reencode(self) -> None:
        g = self.group
        old = self.inner
        with self.switch_timer.region():
            k, v = old.dense()
            new = g.codec.new_layer(g.stage_spec)
            if k.shape[2]:
                new.append(k, v)
        self._spent += old.compress_seconds
        self.inner = new
        self.generation = g.generation
        del old, k, v  # the old storage goes now, before this layer's new tokens are stored

    # -- CacheLayer ----------------------------------------------------------------------------------------------
    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        t = k.shape[2]
        if self.index == 0 and t:
            self.adapter.before_append(self.group, t)
        if self.generation != self.group.generation:
            self._reencode()
        self.inner.append(k, v)
        self.appended += t

    @property
    def length(self) -> int:
        return self.inner.length

    @property
    def compressed_tokens(self) -> int:
        return self.inner.compressed_tokens

    @property
    def evicted_tokens(self) -> int:
        return max(self.appended - self.inner.length, 0)

    @property
    def compress_seconds(self) -> float:
        return self._spent + self.inner.compress_seconds + self.switch_timer.seconds

    def dense(self):
        return self.inner.dense()

    def truncate(self, length: int) -> None:
        self.inner.truncate(length)
        self.appended = length

    def attend(self, q, backend):
        return self.inner.attend(q, backend)

    # -- the wrapped codec's static step, for a generation no strategy can act in (AdaptCodec.static_blocker) -------
    @property
    def static_kernel(self) -> str:
        return self.inner.static_kernel

    def static_decode(self, q, k, v, cos, sin, pos, **kw) -> torch.Tensor:
        return self.inner.static_decode(q, k, v, cos, sin, pos, **kw)

    def zero_storage(self) -> None:
        self.inner.zero_storage()

    def sync_due(self, length: int) -> bool:
        return self.inner.sync_due(length)

    def set_length(self, length: int) -> None:
        if self.index == 0 and length > self.inner.length:
            self.adapter.count_static(length - self.inner.length)
        self.inner.set_length(length)
        self.appended = length

    def row_view(self, start: int, stop: int) -> CacheLayer:
        raise NotImplementedError("rows of a cache under +adapt share no storage: the adapter sees a cache through its "
                                  "appends; run batched rows of different lengths without +adapt")

    def observe(self, q) -> None:
        self.inner.observe(q)

    def stored_bytes(self) -> int:
        return self.inner.stored_bytes()


class AdaptCodec(CacheCodec):
    """The run's codec under an adapter (module docstring). Named after the codec it starts from."""

    static_buffers = False

    def __init__(self, base: CacheCodec, adapter):
        self.base = base
        self.adapter = adapter
        self.plugin_name = base.plugin_name
        self.cfg = getattr(base, "cfg", None)
        self.groups: weakref.WeakSet = weakref.WeakSet()
        self._group: CacheGroup | None = None
        self._made = 0

    @property
    def static_form(self) -> CacheCodec:
        return self.base

    def static_blocker(self, spec: LayerSpec, tokens: int, cache=None) -> str | None:
        """Before a generation (cache None): whether a strategy may act on a cache of `spec` before it holds `tokens`
        (spec.max_len: the capacity it is built with). After its prompt: that
        the cache is still at the codec it was built with, sized for its whole horizon (no strategy moved it)."""
        if not self.base.static_decode:
            return f"cache '{self.plugin_name}' declares no static decode step"
        if cache is None:
            return self.adapter.static_blocker(spec, tokens, self.base, self.layers_per_cache)
        group = next((layer.group for layer in cache.layers if isinstance(layer, AdaptLayer)), None)
        if group is None:
            return None
        if group.stage or any(layer.generation != group.generation for layer in group.live()):
            return f"adapt moved the cache to {group.codec.plugin_name} during the prompt"
        if group.capacity is not None:
            return f"adapt sized the cache for {group.capacity} of its {group.spec.max_len} tokens"
        return None

    def bytes_per_token(self, spec: LayerSpec) -> float:
        return self.base.bytes_per_token(spec)

    def bytes_for(self, spec: LayerSpec, tokens: int) -> float:
        return self.base.bytes_for(spec, tokens)

    @property
    def layers_per_cache(self) -> int:
        """Codec layers in one KVCache: every decoder layer but the linear-attention ones (they hold a state)."""
        engine = self.adapter.run.engine
        if engine is None:
            return 1
        cfg = engine.config
        kind = getattr(cfg, "layer_type", None)
        return sum(1 for i in range(cfg.num_layers) if kind is None or kind(i) != "linear_attention")

    def new_layer(self, spec: LayerSpec) -> CacheLayer:
        per_cache = self.layers_per_cache
        index = self._made % per_cache
        if index == 0:  # Engine.new_cache builds a cache's layers in order: a new group starts here
            capacity = self.adapter.initial_capacity(spec, self.base, per_cache)
            self._group = CacheGroup(spec, self.base, per_cache, capacity)
            self.groups.add(self._group)
        self._made += 1
        layer = AdaptLayer(spec, self._group, index, self.adapter)
        self._group.layers.append(weakref.ref(layer))
        return layer

    # -- what the controller reads -------------------------------------------------------------------------------
    def live_groups(self) -> list[CacheGroup]:
        return [g for g in list(self.groups) if g.live()]

    def held_bytes(self) -> int:
        return sum(g.held_bytes() for g in self.live_groups())

    def room_bytes(self) -> float | None:
        return self.adapter.kv_room(self.held_bytes())


__all__ = ["AdaptCodec", "AdaptLayer", "CacheGroup"]
