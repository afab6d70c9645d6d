"""The run-time adaptation interface: the whole contract a controller keeps with the runner, the engine and plugins.

An `Adapter` plugin (`+adapt=memory|prefetch|speculative|power|all`; baseline `none`) holds registered strategies.
Every `every` steps it gathers `Signals` (the monitor's latest sample, KV bytes held and the room left for them,
the prefetch policy's stall time, speculative acceptance) and asks each strategy whether to move; a strategy that
moves calls its `on_switch(old, new, reason)` callbacks, and the controller records a `Decision` (step, time, why)
whose measured `effect` is filled in `every` steps later (the signals before against after, as the strategy reads
them). `report()` is what metrics.json carries: `adapt/decisions`, the full list, and one line per strategy.

A step is one forward of a model sequence (a prompt chunk, a decode step, a verify block): the controller sees it
through the KV cache, whose layers it wraps (`wrap_codec`, adapt/codec.py), so it ticks on every decode path that
appends through the plugins (eager, piecewise, batched rows). Only a generation in which some strategy may act
needs that clock: the wrapper names the codec it wraps as its `static_form`, and before each generation the fast
decoder asks it (`static_blocker`) whether one may (`Adapter.static_blocker`: each active strategy's own answer for
that cache and horizon). When none may, the generation runs the wrapped codec's whole captured step, as a run
without the adapter does; otherwise the piecewise step, whose appends tick the clock.

What the runner reads, declared here and never inferred from a plugin's name:
    Adapter.active          False for `none`: the runner leaves the codec unwrapped (no cost, same fast path)
    Adapter.wrap_codec(c)   the codec the engine is built with (unwrapped unless a strategy `needs_clock`)
    Adapter.planning_codec(c)  the codec the run's memory check counts (memory: the most compressed of its ladder,
                            since it re-encodes the cache rather than run out of memory)
    Adapter.attach(...)     after the engine is built: the engine, decoder, prefetch policy, monitor, memory cap
    Adapter.report()        {"adapt/...": ...} for metrics.json

A strategy declares:
    Strategy.name           its key in the report
    Strategy.setting        its current choice (a codec name, a distance, a draft length, a pause share)
    Strategy.attach(run)    None when it can act on this run, else the reason it cannot (reported, never fatal)
    Strategy.check(signals) (new setting, reason) to move, or None
    Strategy.apply(new)     make the move
    Strategy.effect(before, after)  what the move measurably did
    Strategy.static_blocker(spec, tokens, codec, num_layers)  why it may act during a generation that will hold
                            `tokens` in a cache built with `codec` and `spec` (max_len: its capacity), or None when
                            it cannot (the generation may then run the whole captured step, behind the clock's back)
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

SwitchCallback = Callable[[Any, Any, str], None]


@dataclass
class AdaptParams:
    """Parameters every adapter shares."""

    every: int = 8  # steps (forwards of a sequence) between two looks at the signals

    def check(self) -> None:
        if self.every < 1:
            raise ValueError(f"every must be >= 1 step, got {self.every}")


@dataclass(frozen=True)
class Signals:
    """What the controller sees at a step. None: not measured on this run (no monitor, no streaming policy...).

    kv_bytes: KV bytes the run's caches hold now; kv_room_bytes: what they may still take (the configured budget
    minus kv_bytes, or the device's free memory under the run's cap). tokens: tokens processed so far (all
    sequences). prefetch_stall_s / prefetch_misses: the policy's cumulative blocked time and late or demand loads.
    acceptance: the speculative controller's acceptance estimate."""

    step: int
    t: float
    tokens: int = 0
    sample: Any = None
    kv_bytes: int | None = None
    kv_room_bytes: float | None = None
    prefetch_stall_s: float | None = None
    prefetch_misses: int | None = None
    acceptance: float | None = None


@dataclass
class Decision:
    strategy: str
    step: int
    t: float
    old: Any
    new: Any
    reason: str
    effect: dict = field(default_factory=dict)

    def record(self) -> dict:
        return {"strategy": self.strategy, "step": self.step, "t_s": round(self.t, 6), "from": _plain(self.old),
                "to": _plain(self.new), "reason": self.reason, "effect": self.effect}


def _plain(value: Any) -> Any:
    return value if isinstance(value, (int, float, str, bool)) or value is None else str(value)


@dataclass
class RunHandles:
    """What a strategy may act on, handed over by `Adapter.attach`."""

    engine: Any = None
    decoder: Any = None
    prefetch: Any = None
    monitor: Any = None
    device_memory_gb: float | None = None


class Strategy:
    """One adaptation rule. Subclasses set `name` and implement check/apply (see the module docstring)."""

    name = "base"
    needs_monitor = False  # the controller starts a SystemMonitor for it when the run has none
    needs_clock = True  # it acts on the step clock, so the codec is wrapped (a strategy its own loop drives: False)

    def __init__(self) -> None:
        self.setting: Any = None
        self.callbacks: list[SwitchCallback] = []
        self.inactive: str | None = None  # why this strategy cannot act on this run

    def on_switch(self, callback: SwitchCallback) -> SwitchCallback:
        """Register callback(old, new, reason), called after every move (usable as a decorator)."""
        self.callbacks.append(callback)
        return callback

    def attach(self, run: RunHandles) -> str | None:
        return None

    def check(self, signals: Signals) -> tuple[Any, str] | None:
        return None

    def apply(self, new: Any) -> None:
        self.setting = new

    def before_append(self, group, incoming: int) -> tuple[Any, str] | None:
        """A cache (adapt/codec.py CacheGroup) is about to store `incoming` tokens per layer: checked at every step,
        before the codec allocates (the memory strategy re-encodes the cache here). Returns a move to record."""
        return None

    def initial_capacity(self, spec, codec, num_layers: int) -> int | None:
        """Tokens a new cache's first codec is sized for (None: its whole horizon, spec.max_len)."""
        return None

    def static_blocker(self, spec, tokens: int, codec, num_layers: int) -> str | None:
        """Default: a strategy on the step clock may act at any step (a pause, a stall reading)."""
        return f"adapt '{self.name}' acts on the step clock" if self.needs_clock else None

    def after_step(self, signals: Signals) -> None:
        """Called at every step (not only every `every`): strategies whose action is per step (a pause)."""

    def effect(self, before: Signals, after: Signals) -> dict:
        return {}

    def summary(self) -> str:
        return self.inactive and f"inactive: {self.inactive}" or f"setting {self.setting}"


class Adapter:
    """Base of adapt plugins: the controller over its strategies."""

    plugin_name = "base"
    active = True

    def __init__(self, cfg: AdaptParams | None = None):
        self.cfg = cfg or AdaptParams()
        self.strategies: list[Strategy] = self.build_strategies(self.cfg)
        self.decisions: list[Decision] = []
        self._pending: list[tuple[Decision, Strategy, Signals, int]] = []  # effects measured `every` steps later
        self.steps = 0
        self.tokens = 0
        self.run = RunHandles()
        self.t0 = time.perf_counter()
        self.codec = None  # the AdaptCodec once wrap_codec ran: KV bytes held and room for them
        self._own_monitor = None

    # -- what a preset builds ------------------------------------------------------------------------------------
    def build_strategies(self, cfg: Any) -> list[Strategy]:
        return []

    def strategy(self, name: str) -> Strategy | None:
        return next((s for s in self.strategies if s.name == name), None)

    # -- the runner's hooks --------------------------------------------------------------------------------------
    def wrap_codec(self, codec):
        if not self.active or not any(s.needs_clock for s in self.strategies):
            return codec
        from ollm_triton.adapt.codec import AdaptCodec

        self.codec = AdaptCodec(codec, self)
        return self.codec

    def planning_codec(self, codec):
        for s in self.strategies:
            plan = getattr(s, "planning_codec", None)
            if plan is not None:
                codec = plan(codec)
        return codec

    def attach(self, *, engine=None, decoder=None, prefetch=None, monitor=None,
               device_memory_gb: float | None = None) -> None:
        self.run = RunHandles(engine=engine, decoder=decoder, prefetch=prefetch, monitor=monitor,
                              device_memory_gb=device_memory_gb)
        if monitor is None and any(s.needs_monitor for s in self.strategies) and engine is not None:
            from ollm_triton.monitor import SystemMonitor

            self._own_monitor = SystemMonitor(device=engine.device)
            self._own_monitor.start()
            self.run.monitor = self._own_monitor
        for s in self.strategies:
            s.inactive = s.attach(self.run)
        self.t0 = time.perf_counter()

    def close(self) -> None:
        if self._own_monitor is not None:
            self._own_monitor.stop()
            self._own_monitor = None

    # -- the clock -----------------------------------------------------------------------------------------------
    def signals(self) -> Signals:
        monitor = self.run.monitor
        prefetch = self.run.prefetch
        stall = misses = None
        counters = getattr(prefetch, "stats_", None)  # a streaming policy's live counters (prefetch/stats.py)
        if counters is not None:
            stall = float(counters.host_wait_s)
            misses = int(counters.counts["prefetch_late"] + counters.counts["demand_loads"])
        spec = self.strategy("speculative")
        return Signals(
            step=self.steps,
            t=time.perf_counter() - self.t0,
            tokens=self.tokens,
            sample=monitor.latest() if monitor is not None else None,
            kv_bytes=self.codec.held_bytes() if self.codec is not None else None,
            kv_room_bytes=self.codec.room_bytes() if self.codec is not None else None,
            prefetch_stall_s=stall,
            prefetch_misses=misses,
            acceptance=getattr(spec, "alpha", None) if spec is not None else None,
        )

    def _periodic(self) -> None:
        per_step = [s for s in self.strategies if not s.inactive and type(s).after_step is not Strategy.after_step]
        due = self.steps % self.cfg.every == 0
        if not due and not per_step and not self._pending:
            return
        signals = self.signals()
        for s in per_step:
            s.after_step(signals)
        self._measure(signals)
        if due:
            for s in self.strategies:
                if s.inactive:
                    continue
                move = s.check(signals)
                if move is not None:
                    self.switch(s, move[0], move[1], signals)

    def before_append(self, group, incoming: int) -> None:
        """The first layer of a cache is about to store `incoming` new tokens: one step of that sequence."""
        self.steps += 1
        self.tokens += incoming
        for s in self.strategies:
            if not s.inactive:
                move = s.before_append(group, incoming)
                if move is not None:
                    self.switch(s, move[0], move[1])
        self._periodic()

    def static_blocker(self, spec, tokens: int, codec, num_layers: int) -> str | None:
        """Why a strategy may act during a generation that will hold `tokens` in a cache of `spec` (one line), or
        None: none can."""
        return next((why for s in self.strategies if not s.inactive
                     and (why := s.static_blocker(spec, tokens, codec, num_layers)) is not None), None)

    def count_static(self, tokens: int) -> None:
        """Decode steps that ran inside the whole captured step (one token each): counted, no strategy asked."""
        self.steps += tokens
        self.tokens += tokens

    def initial_capacity(self, spec, codec, num_layers: int) -> int | None:
        caps = [c for s in self.strategies if not s.inactive
                and (c := s.initial_capacity(spec, codec, num_layers)) is not None]
        return min(caps) if caps else None

    def kv_room(self, held: int) -> float | None:
        """Bytes the KV caches may still take: a strategy's budget (`kv_budget`) minus what they hold, else the
        device's free memory under the run's cap; None on a host device without a budget."""
        for s in self.strategies:
            budget = getattr(s, "kv_budget", None)
            if budget is not None:
                return budget - held
        return self.device_room()

    def device_room(self) -> float | None:
        """Bytes the device's allocator may still hand out: the free memory plus its cached blocks, under the run's
        `device_memory_gb` cap; None on a host device. The cap is read as the allocator applies it
        (set_per_process_memory_fraction: 24e9 B is the "22.35 GiB allowed" of its OOM message) against what
        tensors hold; the cached blocks it frees before failing count as room. (CPU tests replace this with a
        simulated device.)"""
        engine = self.run.engine
        if engine is None or engine.device.type != "cuda":
            return None
        device = engine.device
        allocated = torch.cuda.memory_allocated(device)
        free, _ = torch.cuda.mem_get_info(device)
        room = free + torch.cuda.memory_reserved(device) - allocated  # the allocator's cached blocks are reusable
        if self.run.device_memory_gb is not None:
            room = min(room, self.run.device_memory_gb * 1e9 - allocated)
        return float(room)

    def switch(self, strategy: Strategy, new: Any, reason: str, signals: Signals | None = None) -> Decision:
        """Apply a move, call its callbacks, record it (its effect is measured `every` steps later)."""
        signals = signals or self.signals()
        old = strategy.setting
        strategy.apply(new)
        for callback in strategy.callbacks:
            callback(old, new, reason)
        decision = Decision(strategy.name, signals.step, signals.t, old, new, reason)
        self.decisions.append(decision)
        self._pending.append((decision, strategy, signals, self.steps + self.cfg.every))
        return decision

    def _measure(self, signals: Signals) -> None:
        keep = []
        for decision, strategy, before, at in self._pending:
            if self.steps >= at:
                decision.effect = {"after_steps": self.steps - before.step, **strategy.effect(before, signals)}
            else:
                keep.append((decision, strategy, before, at))
        self._pending = keep

    # -- the record ----------------------------------------------------------------------------------------------
    def report(self) -> dict[str, Any]:
        if self._pending:  # the run ended before `every` more steps: measure against its end
            signals = self.signals()
            for decision, strategy, before, _ in self._pending:
                decision.effect = {"after_steps": self.steps - before.step, **strategy.effect(before, signals)}
            self._pending = []
        out: dict[str, Any] = {"adapt/steps": self.steps, "adapt/switches": len(self.decisions),
                               "adapt/decisions": [d.record() for d in self.decisions]}
        for s in self.strategies:
            out[f"adapt/{s.name}"] = s.summary()
        return out


__all__ = ["AdaptParams", "Adapter", "Decision", "RunHandles", "Signals", "Strategy"]
