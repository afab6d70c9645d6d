"""`+adapt=memory`: when the KV cache would not fit, re-encode it live to the next codec of a ladder (int8, int4).

The room the caches may take is `budget_gb` minus what they hold (a simulated device on the CPU, or a KV budget on
a GPU), else the device's free memory under the run's `device_memory_gb`, less what the prompt's chunks need
besides the KV (their activations, estimated from the model's shapes) and `reserve_gb`.

- With a budget: before a cache stores its next tokens, the strategy projects what the current codec would hold
  after them (`bytes_for(held + incoming + lookahead)`, every layer); if that exceeds the room, the cache moves on.
- On a device: the run's own codec is sized, when the cache is built, to the most tokens C for which its bytes,
  the activations of a prompt chunk reading C + chunk keys (the chunk that finds the cache full attends over it
  before it moves) and one layer of the ladder's largest codec at the horizon (the first layer's new storage
  exists before its old one goes) fit the room (`initial_capacity`: a preallocating codec such as dense then holds
  exactly C); when the next append would pass C, the cache moves on. Sizing up front is what makes the switch
  safe: a geometrically growing buffer (dense without preallocation doubles) would ask for twice its size at once.

Why the activations are estimated, not a flat reserve: a later chunk's attention holds what grows with the keys it
reads (engine/footprint.py `chunk_attention_bytes`: the held K/V concatenated with the chunk's, the causal mask
and SDPA's additive copy of it). On Llama-3-8B shapes with 4096-token chunks that is 0.87 GB at 53k keys on top
of the chunk's own 0.55 GB; the flat 1 GB reserve of the first H100 run (24 GB cap, 65,536-token prompt) let
dense take 52.9k tokens and the 10th chunk ran out of memory at 40,960 keys, allocating that additive mask
(4096 x 40,960 bf16 = 320 MiB) with 22.01 GiB held of the 22.35 GiB allowed, before any switch.

Where to: the first codec of the ladder whose bytes for the cache's whole horizon (prompt + new tokens: the
LayerSpec's max_len), plus on a device the activations of a chunk reading the horizon from that codec (it decodes
its K/V to the model dtype to attend them), fit in the room plus what the cache frees; if none does, the last one
(the decision says so). The request's tokens are kept: each layer's stored K/V is appended to the new codec
(adapt/codec.py), and decoding goes on from there; the tokens after the switch are those of a run that moved its
cache at that step.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ollm_triton.adapt.base import Adapter, AdaptParams, Signals, Strategy
from ollm_triton.registry import register

GB = 1e9


@dataclass
class MemoryParams(AdaptParams):
    ladder: list[str] = field(default_factory=lambda: ["int8", "int4"])  # codecs to move to, in order
    budget_gb: float | None = None  # KV bytes the caches may hold (null: the device's free memory)
    reserve_gb: float = 0.25  # device memory kept free beyond the chunk's estimated activations (no budget_gb):
    # the allocator's rounding and cached blocks it cannot reuse (the H100 OOM counted 48 MiB of them)
    lookahead: int = 0  # tokens beyond the incoming ones the projection must also fit (budget_gb)
    residual: int = 128  # the ladder codecs' full-precision window of recent tokens
    group_size: int = 128  # the ladder codecs' quantization group

    def check(self) -> None:
        super().check()
        if not self.ladder:
            raise ValueError("ladder must name at least one cache codec (int8, int4, ...)")
        if self.budget_gb is not None and self.budget_gb <= 0:
            raise ValueError(f"budget_gb must be > 0 or null, got {self.budget_gb}")
        if self.reserve_gb < 0 or self.lookahead < 0:
            raise ValueError(f"reserve_gb and lookahead must be >= 0, got {self.reserve_gb}, {self.lookahead}")


class MemoryStrategy(Strategy):
    """Moves a cache down the codec ladder when its next tokens would not fit."""

    name = "memory"

    def __init__(self, cfg: MemoryParams):
        super().__init__()
        self.cfg = cfg
        self.ladder = [self._build(name) for name in cfg.ladder]
        self.kv_budget = cfg.budget_gb * GB if cfg.budget_gb is not None else None
        self.adapter: Adapter | None = None
        self.exhausted = 0  # caches that needed more than the last codec of the ladder offers

    def _build(self, name: str):
        from ollm_triton.registry import registry

        spec = registry.get("cache", name)  # an unknown name fails here, naming the registered codecs
        fields = {f for f, _, _ in spec.parameters()}
        params = {k: getattr(self.cfg, k) for k in ("residual", "group_size") if k in fields}
        return registry.build("cache", name, params)

    def planning_codec(self, codec):
        """The run's memory check counts the last codec of the ladder: the run re-encodes rather than overflow."""
        return self.ladder[-1]

    def attach(self, run) -> str | None:
        self.setting = None
        engine = run.engine
        if self.kv_budget is None and (engine is None or engine.device.type != "cuda"):
            return "no budget_gb and no CUDA device to read free memory from"
        return None

    def _room(self) -> float | None:
        codec = self.adapter.codec if self.adapter is not None else None
        return None if codec is None else codec.room_bytes()

    def _activations(self, codec, spec, context: int) -> float:
        """Bytes a prompt chunk holds besides the KV when its attention reads `context` keys from `codec`'s
        storage: its own activations and the attention step's (engine/footprint.py), at the engine's
        `prefill_chunk` (0: the whole horizon in one forward). 0 without an engine whose config they read."""
        engine = self.adapter.run.engine if self.adapter is not None else None
        cfg = getattr(engine, "config", None)
        if cfg is None or not hasattr(cfg, "num_kv_heads") or context <= 0:
            return 0.0
        from ollm_triton.engine.footprint import chunk_attention_bytes, forward_activation_bytes

        tokens = min(int(getattr(engine, "prefill_chunk", 0) or 0) or spec.max_len, context)
        kw = dict(dtype=spec.dtype, device=spec.device, batch=spec.batch, tokens=tokens, context=context)
        return float(forward_activation_bytes(cfg, **kw)
                     + chunk_attention_bytes(cfg, codec=codec, attention=getattr(engine, "attention", None), **kw))

    def _chunk(self, spec) -> int:
        engine = self.adapter.run.engine if self.adapter is not None else None
        return int(getattr(engine, "prefill_chunk", 0) or 0) or spec.max_len

    def initial_capacity(self, spec, codec, num_layers: int) -> int | None:
        if self.kv_budget is not None:  # a budget is checked before each append; the codec keeps its own sizing
            return None
        room = self._room()
        if room is None:
            return None
        room -= self.cfg.reserve_gb * GB
        horizon, chunk = spec.max_len, self._chunk(spec)
        if num_layers * codec.bytes_for(spec, horizon) + self._activations(codec, spec, horizon) <= room:
            return None  # the whole horizon fits with its activations: no switch needed
        move = max(c.bytes_for(spec, horizon) for c in self.ladder)  # one layer re-encoded while all dense live

        def fits(tokens: int) -> bool:
            need = num_layers * codec.bytes_for(spec, tokens) + move
            return need + self._activations(codec, spec, min(tokens + chunk, horizon)) <= room

        lo, hi = 0, horizon  # the most tokens that fit: the need grows with them, so bisect
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
        return lo

    def static_blocker(self, spec, tokens: int, codec, num_layers: int) -> str | None:
        """None when a cache of `spec` cannot need a move before it holds `tokens`: with a budget, those tokens (plus
        `lookahead`) fit what is left of it now; on a device, `initial_capacity` sizes the cache for its whole
        capacity (it then never moves). Reads token counts and bytes only, before any cache is built."""
        horizon = tokens
        if self.kv_budget is not None:
            need = num_layers * codec.bytes_for(spec, horizon + self.cfg.lookahead)
            room = self._room()
            if room is None or need <= room:
                return None
            return (f"adapt 'memory': the {horizon}-token horizon needs {need / 1e6:.3f} MB under {codec.plugin_name}, "
                    f"{room / 1e6:.3f} MB of budget_gb={self.cfg.budget_gb} left")
        capacity = self.initial_capacity(spec, codec, num_layers)
        if capacity is None:
            return None
        return f"adapt 'memory': {codec.plugin_name} fits {capacity} of the cache's {spec.max_len} tokens"

    def before_append(self, group, incoming: int):
        if group.stage >= len(self.ladder) and group.stage > 0:
            return None
        held = group.tokens
        layers = group.num_layers
        if self.kv_budget is not None:
            room = self._room()
            grow = layers * (group.codec.bytes_for(group.spec, held + incoming + self.cfg.lookahead)
                             - group.codec.bytes_for(group.spec, held))
            if grow <= room:
                return None
            why = (f"{held} + {incoming} tokens would need {grow / 1e6:.3f} MB more under {group.codec.plugin_name}, "
                   f"{room / 1e6:.3f} MB of budget_gb={self.cfg.budget_gb} left")
            freed = layers * group.codec.bytes_for(group.spec, held)
        else:
            if group.capacity is None or held + incoming <= group.capacity:
                return None
            # read mid-forward: the chunk's activations still held here are counted again in the target's need
            room = self._room() - self.cfg.reserve_gb * GB
            reads = min(group.capacity + self._chunk(group.spec), group.spec.max_len)
            why = (f"{held} + {incoming} tokens pass the {group.capacity} that {group.codec.plugin_name} was sized "
                   f"for (with a chunk's {self._activations(group.codec, group.spec, reads) / 1e6:.3f} MB of "
                   f"activations at {reads} keys; {room / 1e6:.3f} MB free beyond reserve_gb={self.cfg.reserve_gb})")
            freed = layers * group.codec.bytes_for(group.spec, group.capacity)
        return self._move(group, room + freed, why)

    def _move(self, group, room: float, why: str):
        first = group.stage  # ladder index of the next codec: stage 0 is the run's codec, stage s is ladder[s - 1]
        horizon = group.spec.max_len
        need = {}
        target = None
        acts = {}
        for i in range(first, len(self.ladder)):
            # on a device the prompt's remaining chunks read the cache back from the new codec: their activations
            acts[i] = 0.0 if self.kv_budget is not None else self._activations(self.ladder[i], group.spec, horizon)
            need[i] = group.num_layers * self.ladder[i].bytes_for(group.spec, horizon) + acts[i]
            if need[i] <= room:
                target = i
                break
        if target is None:
            if first >= len(self.ladder):
                return None
            target = len(self.ladder) - 1
            self.exhausted += 1
            why += (f"; even {self.ladder[target].plugin_name} needs {need[target] / 1e6:.3f} MB for the "
                    f"{horizon}-token horizon ({room / 1e6:.3f} MB available): moving there anyway")
        else:  # the numbers the choice followed from, in the decision: a surprising target is read, not guessed
            needs = ", ".join(f"{self.ladder[i].plugin_name} {n / 1e6:.3f} MB"
                              + (f" ({acts[i] / 1e6:.3f} MB of it activations)" if acts[i] else "")
                              for i, n in need.items())
            why += f"; the {horizon}-token horizon needs {needs} of {room / 1e6:.3f} MB available"
        old = group.codec.plugin_name
        group.move_to(target + 1, self.ladder[target])
        self.setting = old  # the move's "from", recorded by the controller; apply() sets the new one
        new = self.ladder[target].plugin_name
        return new, f"{why}: {old} -> {new} at {group.tokens} tokens held"

    def effect(self, before: Signals, after: Signals) -> dict:
        out = {}
        if before.kv_bytes is not None and after.kv_bytes is not None:
            out.update(kv_bytes_before=before.kv_bytes, kv_bytes_after=after.kv_bytes)
        if after.kv_room_bytes is not None:
            out["kv_room_bytes_after"] = float(after.kv_room_bytes)
        codec = self.adapter.codec if self.adapter is not None else None
        if codec is not None:  # re-encoding time so far (unsynchronized CUDA events, read here once)
            out["reencode_s"] = sum(layer.switch_timer.seconds for g in codec.live_groups() for layer in g.live())
        return out

    def summary(self) -> str:
        if self.inactive:
            return f"inactive: {self.inactive}"
        tail = f"; {self.exhausted} cache(s) needed more than {self.ladder[-1].plugin_name}" if self.exhausted else ""
        return f"ladder {' -> '.join(c.plugin_name for c in self.ladder)}, last move to {self.setting}{tail}"


@register("adapt", "memory", MemoryParams)
class MemoryAdapter(Adapter):
    """Re-encodes the KV cache live (dense -> int8 -> int4) when free device memory or budget_gb runs low."""

    def build_strategies(self, cfg):
        strategy = MemoryStrategy(cfg)
        strategy.adapter = self
        return [strategy]
