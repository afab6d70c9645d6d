"""The evaluation-task interface and what the runner hands every task.

Besides `run`, a task declares the context it needs (`footprint`), so the runner can check that the model, its KV
cache and activations fit before it builds anything (ollm_triton/engine/footprint.py). The helpers below let a task
say whether the plugins it reports on had any effect (`plugin_effect`, `report_no_effect`), watch the caches a
decoder builds (`CacheWatch`), and choose its prompt (`prompt_ids`: held-out text, or seeded random tokens).
"""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from ollm_triton.timing import Timer, synchronize  # noqa: F401  (tasks time their regions with it)

PROMPTS = ("corpus", "random")


class TaskRefused(Exception):
    """A task that would print a meaningless number (perplexity of random weights) refuses with the reason."""


@dataclass
class TimedRegion:
    """A task's timed interval (time.perf_counter seconds, the device synchronized at both ends) and the tokens the
    task generated or scored in it (`counted` says which); the runner summarizes the system monitor over it."""

    t0: float
    t1: float | None = None
    tokens: int = 0
    counted: str = "generated"


@dataclass
class RunContext:
    """engine: the loaded Engine; decoder: the DecoderStrategy; smoke: run a tiny slice (debug=smoke);
    trained: False for random weights; cfg: the full resolved run config (a dict); context: the ContextCompressor
    that shortens prompts before prefill (None: prompts as given); monitor: the run's SystemMonitor
    (ollm_triton/monitor.py) or None; regions: the timed regions the tasks declared (`timed`)."""

    engine: Any
    decoder: Any
    device: torch.device
    smoke: bool = False
    trained: bool = True
    cfg: dict = field(default_factory=dict)
    seed: int = 0
    context: Any = None
    monitor: Any = None
    regions: list[TimedRegion] = field(default_factory=list)

    @contextmanager
    def timed(self, counted: str = "generated"):
        """Declare the task's timed region: `with ctx.timed("scored") as region: ...; region.tokens += n`. The
        monitor samples at both ends, so a region shorter than its sampling period still has readings around it."""
        synchronize(self.device)
        if self.monitor is not None:
            self.monitor.sample_now()
        region = TimedRegion(time.perf_counter(), counted=counted)
        try:
            yield region
        finally:
            synchronize(self.device)
            region.t1 = time.perf_counter()
            if self.monitor is not None:
                self.monitor.sample_now()
            self.regions.append(region)


class Task:
    """Base class of evaluation tasks; `plugin_name` is set by the registry."""

    plugin_name = "base"

    def run(self, ctx: RunContext) -> dict[str, float | int | str]:
        raise NotImplementedError

    def footprint(self, smoke: bool) -> tuple[int, int]:
        """(batch, tokens): the most sequences and the longest context (prompt + new tokens) one of this task's
        caches holds, for the runner's memory check before it builds the model. (1, 0) declares no context: only
        the weights are checked."""
        return 1, 0


# --- did the selected plugins do anything? ---------------------------------------------------------------------

def _baseline(kind: str) -> str:
    from ollm_triton.registry import BASELINES

    return BASELINES[kind]


def _name(plugin: Any) -> str:
    return getattr(plugin, "plugin_name", type(plugin).__name__)


def plugin_effect(engine, *, longest: int, masked: float | None = None, compressed: int | None = None,
                  evicted: int = 0, lossy_scored: int | None = None, unit: str = "tokens scored"
                  ) -> tuple[str, list[str]]:
    """One line saying what the run's attention backend and KV codec did to what a task measured, and the list of
    the selected plugins that provably had none (empty when each did something, or only baselines ran).

    longest: the longest sequence a cache held. masked: the fraction of causally visible (query, key) pairs the
    backend masked (None: not measured). compressed / evicted: the most tokens one layer held lossily / dropped
    when the task read it (None: not measured). lossy_scored: how many of the measured tokens read such storage.
    """
    parts, none = [], []
    attention, codec = engine.attention, engine.codec
    a_name, c_name = _name(attention), _name(codec)
    if a_name != _baseline("attention") and masked is not None:
        if masked > 0:
            parts.append(f"attention {a_name}: {masked:.1%} of keys masked")
        else:
            window = attention.window  # declared by every backend (attention/base.py)
            why = (f"window {window} >= longest sequence {longest}" if window
                   else f"{a_name} masked no keys of sequences up to {longest} tokens")
            none.append(f"attention {a_name}: {why}")
    if c_name != _baseline("cache") and compressed is not None:
        if compressed or evicted:
            held = " and ".join(f"{n} tokens {what}" for n, what in ((compressed, "compressed"), (evicted, "evicted"))
                                if n)
            what = f"{lossy_scored} {unit} against lossy storage (up to {held} per layer)" if lossy_scored is not None \
                else f"up to {held} per layer"
            parts.append(f"cache {c_name}: {what}")
        else:
            residual = getattr(getattr(codec, "cfg", None), "residual", None)
            why = (f" (its full-precision residual of {residual}+ tokens covered every token of sequences up to "
                   f"{longest})" if residual is not None else f" (sequences up to {longest} tokens)")
            none.append(f"cache {c_name}: 0 tokens compressed or evicted{why}")
    if not parts and not none:
        return f"baseline: attention {a_name}, cache {c_name}", []
    return "; ".join([*(f"none: {n}" for n in none), *parts]), none


def report_no_effect(task: str, none: list[str]) -> None:
    """The one stderr line a run prints when a selected plugin had no effect on a task."""
    if none:
        print(f"{task}: selected plugin had no effect: {'; '.join(none)}", file=sys.stderr)


def lossy_tokens(cache) -> tuple[int, int]:
    """(most compressed tokens, most evicted tokens) over a KVCache's layers."""
    return (max((layer.compressed_tokens for layer in cache.layers), default=0),
            max((layer.evicted_tokens for layer in cache.layers), default=0))


class CacheWatch:
    """Records the KV caches `engine.new_cache` builds while active (decoders build their own), so a task can read
    how much of them the codec compressed or evicted after a generation.

    A task that generates several times calls `settle()` after each generation: the caches built so far are read
    at their final state and released. Holding them kept every repeat's cache alive until the task ended: more
    device memory than the memory check's one cache (Qwen3-Next-80B's throughput run, experiments/moe section 4a)."""

    def __init__(self, engine):
        self.engine, self.caches = engine, []
        self._settled: list[tuple[tuple[int, int], int]] = []  # (lossy_tokens, position) of released caches

    def __enter__(self) -> CacheWatch:
        build = getattr(self.engine, "new_cache", None)
        if build is None:  # a stand-in engine that builds no caches
            return self

        def new_cache(*args, **kwargs):
            cache = build(*args, **kwargs)
            self.caches.append(cache)
            return cache

        self.engine.new_cache = new_cache  # an instance attribute shadows the method until __exit__
        return self

    def __exit__(self, *exc) -> None:
        self.engine.__dict__.pop("new_cache", None)

    def settle(self) -> None:
        """After a generation: read the caches built so far at their final state and let them go."""
        self._settled += [(lossy_tokens(c), c.position) for c in self.caches]
        self.caches = []

    def lossy(self) -> tuple[int, int]:
        """(most compressed, most evicted) tokens of one layer over the caches seen, at their final state."""
        seen = [s for s, _ in self._settled] + [lossy_tokens(c) for c in self.caches] or [(0, 0)]
        return max(s[0] for s in seen), max(s[1] for s in seen)

    def longest(self) -> int:
        return max([p for _, p in self._settled] + [c.position for c in self.caches], default=0)


# --- prompts -----------------------------------------------------------------------------------------------------

def compress_prompt(ctx: RunContext, ids: torch.Tensor, *, protect: list[tuple[int, int]] | tuple = (),
                    query: tuple[int, int] | None = None):
    """The run's context compressor (`+context=...`) applied to a prompt ids [B, T] before prefill: (the ids to
    prefill [B, K], the compressor's record `context.base.Compressed`, or None when the run has no compressor)."""
    if ctx.context is None:
        return ids, None
    out = ctx.context.compress(ids, protect=protect, query=query, target=ctx.engine)
    return out.ids, out


def context_metrics(records: list) -> dict[str, float | int | str]:
    """What a task reports about the prompts its compressor shortened (nothing without a compressor)."""
    records = [r for r in records if r is not None]
    if not records:
        return {}
    original = sum(r.original_length for r in records)
    kept = sum(r.length for r in records)
    methods = sorted({r.method for r in records})
    return {"context_method": ",".join(methods), "context_ratio": kept / original if original else 1.0,
            "context_tokens_dropped": original - kept, "context_s": sum(r.seconds for r in records),
            # tokens kept beyond the ratio because protected spans (BOS, the question, keep_last) needed them
            "context_over_budget": sum(r.over_budget for r in records)}


def prompt_ids(engine, kind: str, batch: int, length: int, seed: int) -> tuple[torch.Tensor, str]:
    """[batch, length] prompt ids on the CPU and what they are.

    `corpus`: held-out text as the decoding study (experiments/decoding) prompts it: the first `length` tokens
    (the engine's tokenizer, BOS included when it adds one) of the first `batch` documents of the corpus eval split
    that hold that many, one document a row. `random`: seeded uniform tokens. A model without a tokenizer gets
    random tokens, and the description says so."""
    if kind not in PROMPTS:
        raise ValueError(f"prompt must be one of {', '.join(PROMPTS)}, got {kind!r}")
    if kind == "corpus" and engine.tokenizer is not None:
        from ollm_triton.data.corpus import load_corpus

        corpus = load_corpus()
        rows: list[list[int]] = []
        for doc in corpus.eval_docs:
            ids = list(engine.tokenizer.encode(doc[: 8 * length + 64]))  # 8 characters a token is ample
            if len(ids) >= length:
                rows.append(ids[:length])
                if len(rows) == batch:
                    return torch.tensor(rows, dtype=torch.long), "corpus"
        # more rows than documents that long: consecutive slices of the whole eval text
        need = (batch - len(rows)) * length
        stream = list(engine.tokenizer.encode(corpus.eval_text()[: 8 * need + 64]))
        if len(stream) < need:
            raise ValueError(f"the held-out corpus holds too few tokens for {batch} x {length}; use prompt=random")
        rows += [stream[i * length : (i + 1) * length] for i in range(batch - len(rows))]
        return torch.tensor(rows, dtype=torch.long), "corpus"
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, engine.config.vocab_size, (batch, length), generator=gen)
    return ids, ("random" if kind == "random" else "random (the model has no tokenizer)")
