"""`OptimizedInference`: the toolkit from Python, text in and text out, configured as the runner is.

    from ollm_triton import OptimizedInference
    llm = OptimizedInference("tiny", cache="int4", attention={"name": "sliding_window", "window": 256})
    llm.generate("def fibonacci(n):", max_new_tokens=32)      # -> str
    for piece in llm.stream("Once upon a time"): ...           # text pieces as tokens come
    llm.chat([{"role": "user", "content": "hi"}]); llm.stats(); llm.memory_report()

How arguments map onto the runner's Hydra config (one form each, so a call reads like a command line):
- `model`: a preset of ollm_triton/conf/model/ (`tiny`, the embedded default; `llama3_8b`: random weights of those
  shapes) or a checkpoint directory (`model=hf model.source=<dir>`).
- `profile`: a preset of conf/profile/ (`memory_optimized`, ...).
- `attention`, `cache`, `decoder`, `prefetch`, `context`, `adapt` (any plugin group): a plugin name (`"int4"`), or a
  dict with its `name` and parameters (`{"name": "int4", "residual": 64}`); a dict without `name` sets parameters of
  the plugin the profile chose. These become `+cache=int4 cache.residual=64` (or `cache=int4` where the profile
  already added the group).
- `overrides`: any other Hydra override strings, as on the command line (`["prefill_chunk=1024", "seed=3"]`).
- `device`: auto | cpu | cuda | cuda:N.

The composed config is validated exactly as `python -m ollm_triton.run` validates it (the same schema, the same
one-line errors, raised as `RunError`/`PluginError`/`ValueError` before anything loads), and the engine is built by
the runner's own sequence (build.py `build_run`: plugins, memory check, monitor, `load_engine` or the transformers
bridge, the adapter). `generate` runs the configured decoder
strategy (decoding/); `stream` runs one request through the server's scheduler (serve/scheduler.py, token by token)
when the decoder is greedy or sample, and otherwise (speculative decoders emit blocks) yields the strategy's
tokens after it finished. Nothing here is another generation loop.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ollm_triton.build import CacheNeed, RunError, build_run, compose_config, resolve_config, resolve_plugins
from ollm_triton.config_nodes import PLUGIN_GROUPS
from ollm_triton.registry import registry
from ollm_triton.run import check_top_level_keys, composition_error

STREAMED_DECODERS = ("greedy", "sample")  # what the scheduler samples itself, one token per step


def _value(v: Any) -> str:
    """A Python value as a Hydra override value."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(_value(x) for x in v) + "]"
    if isinstance(v, Mapping):
        return "{" + ",".join(f"{k}:{_value(x)}" for k, x in v.items()) + "}"
    text = str(v)
    if re.fullmatch(r"[A-Za-z_/.][\w/.\-:]*", text) and text.lower() not in ("true", "false", "null", "nan", "inf"):
        return text  # as a user types it on the command line (an error message then quotes the same text)
    text = text.replace("\\", "\\\\").replace("'", "\\'")
    return f"'{text}'"


def model_overrides(model: str | os.PathLike) -> list[str]:
    """`model=hf model.source=<dir>` for a checkpoint directory, else `model=<preset>` (a name of conf/model/: an
    unknown one fails at composition with the CLI's line, which lists the presets)."""
    text = str(model)
    if Path(text).is_dir():
        return ["model=hf", f"model.source={_value(str(Path(text).resolve()))}"]
    return [f"model={text}"]


def plugin_overrides(group: str, value: Any, appended: bool) -> list[str]:
    """`+group=name group.k=v ...` (or `group=name` when the profile already added the group)."""
    if isinstance(value, str):
        name, params = value, {}
    elif isinstance(value, Mapping):
        params = dict(value)
        name = params.pop("name", None)
        if name is None and not appended:
            raise RunError(f"{group}={dict(value)!r} names no plugin; give {{'name': ..., <parameters>}} (registered: "
                           f"{', '.join(registry.names(group))})")
    else:
        raise RunError(f"{group}={value!r} is not accepted; accepted: a plugin name or a dict with its 'name' and "
                       "parameters")
    out = [] if name is None else [f"{'' if appended else '+'}{group}={name}"]
    return out + [f"{group}.{k}={_value(v)}" for k, v in params.items()]


def compose(overrides: Sequence[str]):
    """The runner's config (ollm_triton/conf/config.yaml) composed with `overrides`; a config that does not compose
    raises RunError with the line the CLI prints."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        cfg = compose_config("config", overrides)
    except (HydraException, OmegaConfBaseException) as e:
        raise RunError(composition_error(e)) from None
    check_top_level_keys(cfg)
    return cfg


class OptimizedInference:
    """A loaded model with the run's plugins (see the module docstring for the arguments)."""

    def __init__(self, model: str | os.PathLike = "tiny", *, profile: str | None = None,
                 attention: Any = None, cache: Any = None, decoder: Any = None, prefetch: Any = None,
                 context: Any = None, adapt: Any = None, overrides: Sequence[str] = (), device: str | None = None):
        chosen = {"attention": attention, "cache": cache, "decoder": decoder, "prefetch": prefetch,
                  "context": context, "adapt": adapt}
        unknown = [g for g, v in chosen.items() if v is not None and g not in PLUGIN_GROUPS]
        if unknown:
            raise RunError(f"plugin group {unknown[0]!r} does not exist here; groups: {', '.join(PLUGIN_GROUPS)}")
        base = [*model_overrides(model), *([f"profile={profile}"] if profile else []),
                *([f"device={device}"] if device else []), *overrides]
        profiled = compose(base)  # which groups the profile (or an override) already added: those take group=name
        plugins = [o for g, v in chosen.items() if v is not None for o in plugin_overrides(g, v, g in profiled)]
        self.overrides = [*base, *plugins]
        cfg = compose(self.overrides)
        self.config = resolved = resolve_config(cfg)
        self.plugins = resolve_plugins(resolved)  # every parameter validated, as the runner does
        # the runner's build sequence (build.py), the memory check sized to max_context (0: the weights only)
        self._built_run = run = build_run(resolved, plugins=self.plugins,
                                   needs={"facade": CacheNeed(int(resolved.get("max_context") or 0))})
        self.engine, self.monitor, self.device, self.source = run.engine, run.monitor, run.device, run.source
        self.trained, self.footprint, self.built = run.trained, run.footprint, run.built
        self.decoder, self.adapter = run.decoder, run.adapter
        baseline = self.plugins["context"]["name"] == registry.baseline("context")
        self.compressor = None if baseline else self.built["context"]  # the baseline keeps every token: skip the
        if self.compressor is not None:  # call, as the tasks do
            self.compressor.prepare(self.engine)
        self._template = None
        self._scheduler = None
        self._last: dict[str, Any] = {}
        self._cache_stats: list[dict[str, Any]] = []  # the last decoder call's target cache, read when it ended

    # ---- prompts ------------------------------------------------------------------------------------------------
    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def _ids(self, prompt: str | Sequence[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError(f"model {self.config['model'].get('name')!r} has no tokenizer (random weights): "
                                 "give the prompt as a list of token ids")
            return list(self.tokenizer.encode(prompt))
        ids = [int(t) for t in prompt]
        vocab = self.engine.config.vocab_size
        if not ids or min(ids) < 0 or max(ids) >= vocab:
            raise ValueError(f"a prompt of token ids must be non-empty, each in [0, {vocab})")
        return ids

    def _compress(self, ids: list[int]) -> tuple[list[int], dict[str, Any]]:
        if self.compressor is None:
            return ids, {}
        out = self.compressor.compress(torch.tensor([ids], dtype=torch.long), target=self.engine)
        return out.ids[0].tolist(), {f"context_{k}": v for k, v in out.record().items()}

    def _detokenizer(self, prompt: list[int], stop: Sequence[str] | None):
        from ollm_triton.serve.detokenize import Detokenizer, TokenIds

        tok = self.tokenizer if self.tokenizer is not None else TokenIds(self.engine.config.vocab_size)
        eos = set(getattr(tok, "eos_token_ids", None) or [])
        return Detokenizer(tok, stop=list(stop or []), skip_ids=eos, context_ids=prompt), eos

    # ---- generation ---------------------------------------------------------------------------------------------
    def generate(self, prompt: str | Sequence[int], max_new_tokens: int = 64, *,
                 stop: Sequence[str] | None = None) -> str:
        """The answer to `prompt` (text, or token ids) from the configured decoder strategy: at most
        max_new_tokens tokens, ending at EOS or before the first stop string."""
        return "".join(self._run(prompt, max_new_tokens, stop, streamed=False))

    def stream(self, prompt: str | Sequence[int], max_new_tokens: int = 64, *,
               stop: Sequence[str] | None = None) -> Iterator[str]:
        """The answer as text pieces while it is produced (greedy, sample: token by token through the scheduler;
        other decoders: after the strategy finished). "".join(stream(p)) == generate(p) for greedy."""
        return self._run(prompt, max_new_tokens, stop, streamed=True)

    def chat(self, messages: list[dict[str, Any]], max_new_tokens: int = 128, *,
             stop: Sequence[str] | None = None) -> str:
        """The assistant's reply to `messages` ([{"role", "content"}, ...]) through the checkpoint's chat template,
        rendered as the server renders it (serve/chat.py)."""
        from ollm_triton.engine.checkpoint import resolve_source
        from ollm_triton.serve.chat import load_chat_template

        if self._template is None:
            template = None if isinstance(self.source, dict) else load_chat_template(resolve_source(self.source))
            if template is None:
                raise ValueError(f"model {self.config['model'].get('name')!r} has no chat template "
                                 "(tokenizer_config.json chat_template); use generate(text)")
            self._template = template
        return self.generate(self._template.encode(self.tokenizer, messages), max_new_tokens, stop=stop)

    def _run(self, prompt, max_new_tokens: int, stop, streamed: bool) -> Iterator[str]:
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
        original = self._ids(prompt)
        ids, context = self._compress(original)
        detok, eos = self._detokenizer(ids, stop)
        name = self.plugins["decoder"]["name"]
        if streamed and name in STREAMED_DECODERS:
            return self._scheduled(ids, max_new_tokens, detok, context, len(original))
        return self._strategy(ids, max_new_tokens, detok, eos, context, len(original))

    def _strategy(self, ids, max_new_tokens, detok, eos, context, original_len) -> Iterator[str]:
        """The decoder strategy's generate (decoding/); pieces come after it returns."""
        from ollm_triton.tasks.base import CacheWatch

        t0 = self._mark()
        with CacheWatch(self.engine) as watch:
            # the strategy stops at the tokenizer's first EOS; any other EOS id ends the answer below
            out = self.decoder.generate(self.engine, torch.tensor([ids], dtype=torch.long), max_new_tokens,
                                        eos_id=getattr(self.tokenizer, "eos_token_id", None))
        t1 = self._mark()
        self._cache_stats = [c.stats() for c in watch.caches[-1:]]  # read now: the caches themselves are let go
        pieces, n = [], 0
        for token in out.tokens[0].tolist():
            n += 1
            pieces.append(detok.add(token))
            if token in eos or detok.stopped:
                break
        pieces.append(detok.finish())
        self._record(t0, t1, len(ids), n, out.counters, context, original_len, "decoder strategy")
        yield from (p for p in pieces if p)

    def _scheduled(self, ids, max_new_tokens, detok, context, original_len) -> Iterator[str]:
        """One request through the server's scheduler, stepped here: a piece per token as it is sampled."""
        from ollm_triton.serve.scheduler import Scheduler

        sampling = self._sampling()
        need = len(ids) + max_new_tokens
        if self._scheduler is None or self._scheduler.max_context < need:
            size = max(2048, 1 << (need - 1).bit_length())  # a new scheduler (slot buffers) only when it must grow
            size = min(size, int(self.engine.config.max_position_embeddings))
            self._scheduler = Scheduler(self.engine, max_batch=1, max_context=max(size, need),
                                        prefill_chunk=self.engine.prefill_chunk or 256, prefix_cache_bytes=0)
        sched = self._scheduler
        self._cache_stats = []  # the request's cache belongs to the scheduler: memory_report reads the declared bytes
        t0 = self._mark()
        req = sched.submit(ids, max_new_tokens, sampling)
        seen, first = 0, None
        try:
            while not req.finished:
                sched.step()
                events = req.events[seen:]
                seen += len(events)
                for event in events:
                    if event.token_id is None:
                        continue
                    first = first if first is not None else time.perf_counter()
                    piece = detok.add(event.token_id)
                    if piece:
                        yield piece
                if detok.stopped and not req.finished:
                    req.cancel()
            if req.events and req.events[-1].finish_reason == "error":
                raise RuntimeError(f"generation failed: {req.events[-1].error}")
            rest = detok.finish()
            if rest:
                yield rest
        finally:
            if not req.finished:
                req.cancel()
                sched.step()
            t1 = self._mark()
            n = len(req.generated)
            prefill_s = (first - t0) if first is not None else t1 - t0
            counters = {"prefill_s": prefill_s, "decode_s": t1 - (first or t1)}
            self._record(t0, t1, len(ids), n, counters, context, original_len, "scheduler (token by token)")

    def _sampling(self):
        from ollm_triton.serve.scheduler import SamplingParams

        decoder = self.plugins["decoder"]
        if decoder["name"] == "greedy":
            return SamplingParams(temperature=0.0)
        cfg = registry.config("decoder", decoder["name"], decoder["params"])
        return SamplingParams(temperature=float(cfg.temperature), top_p=float(cfg.top_p), top_k=int(cfg.top_k),
                              seed=int(cfg.seed))

    def _mark(self) -> float:
        from ollm_triton.timing import synchronize

        synchronize(self.device)
        if self.monitor is not None:
            self.monitor.sample_now()
        return time.perf_counter()

    def _record(self, t0, t1, prompt_len, n, counters, context, original_len, path) -> None:
        prefill_s, decode_s = float(counters.get("prefill_s", 0.0)), float(counters.get("decode_s", 0.0))
        last: dict[str, Any] = {
            "path": path,
            "decoder": self.plugins["decoder"]["name"],
            "prompt_tokens": original_len,
            "prefilled_tokens": prompt_len,
            "new_tokens": n,
            "seconds": t1 - t0,
            "ttft_s": prefill_s,
            "prefill_tok_s": prompt_len / prefill_s if prefill_s > 0 else None,
            "decode_s": decode_s,
            "decode_tok_s": (n - 1) / decode_s if n > 1 and decode_s > 0 else None,  # the first came from prefill
            "e2e_tok_s": n / (t1 - t0) if t1 > t0 else None,
            **context,
        }
        if self.monitor is not None:
            summary = self.monitor.summary(t0, t1, tokens=n)
            last.update({f"monitor/{k}": v for k, v in summary.items()})
        self._last = last

    # ---- what happened ------------------------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        """The last call: tokens, seconds, time to first token, decode and end-to-end tok/s, what ran, and the
        monitor's summary over it (monitor/energy_j, monitor/tokens_per_j on a GPU with NVML). Empty before any."""
        return dict(self._last)

    def memory_report(self) -> dict[str, Any]:
        """Weights, the last call's KV cache (bytes as stored, tokens held, compressed, evicted), device and host
        memory now and at peak, and the memory check the constructor passed (footprint)."""
        from ollm_triton.tasks.memory import host_peak_rss_bytes

        engine = self.engine
        out: dict[str, Any] = {
            "weights_bytes": int(sum(p.numel() * p.element_size() for p in engine.model.parameters())),
            "weights_device": str(next(engine.model.parameters()).device),
            "kv_bytes": 0,
            "kv_codec": self.plugins["cache"]["name"],
        }
        for stats in self._cache_stats:  # the target's cache of the last decoder call
            out.update({k: v for k, v in stats.items()})
            out["kv_bytes"] = int(stats.get("kv_stored_bytes", 0))
            out["kv_bytes_source"] = "the cache's stored bytes"
        if self._scheduler is not None and not self._cache_stats and self._last:  # the last call was stream()
            out["kv_bytes"] = int(self._scheduler.kv_bytes(self._last["prefilled_tokens"] + self._last["new_tokens"]))
            out["kv_bytes_source"] = "the codec's declared bytes per token (the scheduler freed the cache)"
        if self.device.type == "cuda":
            out["device_allocated_bytes"] = int(torch.cuda.memory_allocated(self.device))
            out.update(self._built_run.device_peaks())
        import psutil

        out["host_rss_bytes"] = int(psutil.Process().memory_info().rss)
        out["host_peak_rss_bytes"] = host_peak_rss_bytes()[0]
        out["footprint"] = self.footprint
        return out

    def describe(self) -> dict[str, Any]:
        """The model, the plugins with their parameters, and the overrides they were composed from."""
        return {"model": self.config["model"].get("name"), "plugins": self.plugins, "overrides": self.overrides,
                "device": str(self.device), "engine": self.engine.describe()}

    # ---- lifetime -----------------------------------------------------------------------------------------------
    def close(self) -> None:
        """Stop the monitor, free the model (and a decoder's draft model)."""
        if self._scheduler is not None:
            self._scheduler.shutdown(cancel=True)
            self._scheduler = None
        self._built_run.close()

    def __enter__(self) -> OptimizedInference:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        names = ", ".join(f"{g}={p['name']}" for g, p in self.plugins.items())
        return f"OptimizedInference(model={self.config['model'].get('name')!r}, {names}, device={self.device})"


__all__ = ["OptimizedInference", "compose", "model_overrides", "plugin_overrides"]
