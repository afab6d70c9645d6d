"""The server composed by Hydra: `compose(overrides)` -> config, `build(cfg)` -> engine + scheduler + app.

The config is ollm_triton/conf/serve.yaml with the runner's groups (model=, +attention=, +cache=, +decoder=,
+prefetch=) and the runner's `monitor` section; the engine is built by the runner's own sequence (build.py build_run:
plugins validated, model resolved, memory checked, the system monitor started), so a plugin, a parameter or a model
means the same in a sweep and in the server, and /metrics carries the monitor's readings (serve/metrics.py). The
decoder group sets the sampling of requests that omit it: left out, OpenAI's defaults (temperature 1);
`+decoder=greedy`, temperature 0; `+decoder=sample`, its temperature, top_k and top_p. Other decoders (speculative,
...) are not served yet: the continuous batch samples one token per request per step.
"""

from __future__ import annotations

import asyncio
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from ollm_triton.build import (
    CONF,
    BuiltRun,
    CacheNeed,
    RunError,
    build_run,
    compose_config,
    resolve_config,
    resolve_plugins,
)
from ollm_triton.config_nodes import PLUGIN_GROUPS  # importing it stores the plugin nodes Hydra composes with
from ollm_triton.registry import registry
from ollm_triton.serve.detokenize import TokenIds
from ollm_triton.serve.scheduler import SamplingParams, Scheduler

SERVED_DECODERS = ("greedy", "sample")
GROUPS = ("model", "monitor")  # serve.yaml's defaults list; the plugin groups are appended with +


@dataclass
class ServeSettings:
    """The `serve` section, checked (types and ranges) with one-line errors. Its defaults live in serve.yaml."""

    host: str
    port: int
    model_name: str | None
    max_batch: int
    max_queue: int
    queue_timeout_s: float
    prefill_chunk: int
    prefill_budget: int | None
    kv_budget_gb: float | None
    prefix_cache_gb: float | None
    shutdown_timeout_s: float
    max_context: int | None
    log_level: str

    @classmethod
    def from_config(cls, section: dict[str, Any]) -> ServeSettings:
        out = cls(**section)  # an unknown key fails at composition already (the config is a struct)

        def need(ok: bool, key: str, accepted: str) -> None:
            if not ok:
                raise RunError(f"serve.{key}={getattr(out, key)!r} is not accepted; accepted: {accepted}")

        def is_int(v: Any) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        def is_num(v: Any) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool)

        need(isinstance(out.host, str) and bool(out.host), "host", "an address to bind (127.0.0.1, 0.0.0.0, ...)")
        need(is_int(out.port) and 0 <= out.port < 65536, "port", "an integer port from 0 (any free port) to 65535")
        need(out.model_name is None or isinstance(out.model_name, str), "model_name", "null or a string")
        need(is_int(out.max_batch) and out.max_batch >= 1, "max_batch", "an integer >= 1")
        need(is_int(out.max_queue) and out.max_queue >= 0, "max_queue", "an integer >= 0")
        need(is_num(out.queue_timeout_s) and out.queue_timeout_s > 0, "queue_timeout_s", "a number of seconds > 0")
        need(is_int(out.prefill_chunk) and out.prefill_chunk >= 1, "prefill_chunk", "an integer >= 1 (tokens)")
        need(out.prefill_budget is None or (is_int(out.prefill_budget) and out.prefill_budget >= 1), "prefill_budget",
             "null (= prefill_chunk) or an integer >= 1 (tokens per step)")
        need(out.kv_budget_gb is None or (is_num(out.kv_budget_gb) and out.kv_budget_gb > 0), "kv_budget_gb",
             "null (no limit) or a number of GB > 0")
        need(out.prefix_cache_gb is None or (is_num(out.prefix_cache_gb) and out.prefix_cache_gb >= 0),
             "prefix_cache_gb", "null (the scheduler's default) or a number of GB >= 0 (0 = off)")
        need(is_num(out.shutdown_timeout_s) and out.shutdown_timeout_s >= 0, "shutdown_timeout_s",
             "a number of seconds >= 0")
        need(out.max_context is None or (is_int(out.max_context) and out.max_context >= 1), "max_context",
             "null (the model's max_position_embeddings) or an integer >= 1 (tokens)")
        levels = ("critical", "error", "warning", "info", "debug", "trace")
        need(out.log_level in levels, "log_level", " | ".join(levels))
        return out


def compose(overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """serve.yaml composed with `overrides` (Hydra's compose API: no run directory, no logging changes).
    Raises Hydra's/OmegaConf's errors (run.composition_error makes them one line) or RunError."""
    cfg = compose_config("serve", overrides)
    check_keys(cfg)
    return cfg


def check_keys(cfg: DictConfig) -> None:
    """Refuse a top-level key serve.yaml does not know (`+cahce=int4` would otherwise serve the dense cache)."""
    keys = [k for k in OmegaConf.load(CONF / "serve.yaml") if k not in ("defaults", "hydra")]
    unknown = [k for k in cfg if k not in (*keys, *GROUPS, *PLUGIN_GROUPS)]
    if unknown:
        groups = ", ".join([*(f"+{g}=" for g in PLUGIN_GROUPS), *(f"{g}=" for g in GROUPS)])
        raise RunError(f"unknown config key {', '.join(repr(k) for k in unknown)}; accepted groups: {groups}; "
                       f"keys: {', '.join(keys)} (see python -m ollm_triton.serve --help)")


@dataclass
class Server:
    """What `build` made: the engine, its scheduler, the app, and the settings to bind with."""

    engine: Any
    scheduler: Scheduler
    app: Any
    settings: ServeSettings
    model_name: str
    plugins: dict[str, str] = field(default_factory=dict)
    run: BuiltRun | None = None  # what build_run made: the monitor, the plugins; close() releases them

    @property
    def monitor(self):
        """The system monitor sampling for /metrics (None: monitor.enabled=false)."""
        return self.run.monitor if self.run is not None else None

    def describe(self) -> str:
        plugins = " ".join(f"{g}={n}" for g, n in self.plugins.items())
        return f"model={self.model_name} {plugins} device={self.engine.device} max_batch={self.settings.max_batch}"

    def bind(self) -> socket.socket:
        """A listening socket on (host, port); port 0 takes a free one (`sock.getsockname()[1]`)."""
        family = socket.AF_INET6 if ":" in self.settings.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.settings.host, self.settings.port))
        except OSError as e:
            sock.close()
            raise RunError(f"cannot listen on {self.settings.host}:{self.settings.port}: {e.strerror}; choose "
                           "another with serve.port=N (0 = any free port)") from None
        sock.listen(2048)
        sock.set_inheritable(True)
        return sock

    def uvicorn_server(self, **overrides: Any):
        """A uvicorn.Server for the app whose shutdown (SIGTERM, SIGINT, `should_exit`) stops accepting, gives the
        running requests serve.shutdown_timeout_s to finish, then cancels the rest in the scheduler: their streams
        end with an error event and `data: [DONE]`, a waiting answer with 503, and the connections close."""
        import uvicorn

        grace = float(self.settings.shutdown_timeout_s)
        scheduler, app = self.scheduler, self.app

        class GracefulServer(uvicorn.Server):
            async def shutdown(self, sockets=None) -> None:
                app.state.status = "shutting_down"  # /health answers 503 from now on
                loop = asyncio.get_running_loop()
                cancel = loop.call_later(grace, lambda: loop.run_in_executor(None, scheduler.shutdown, True))
                try:
                    await super().shutdown(sockets)
                finally:
                    cancel.cancel()

        config = uvicorn.Config(self.app, log_level=self.settings.log_level, lifespan="on",
                                timeout_graceful_shutdown=grace + 5.0, **overrides)
        return GracefulServer(config)

    def close(self) -> None:
        """Cancel what still runs, stop the monitor, free the model (again after a shutdown: a no-op)."""
        self.scheduler.shutdown(cancel=True)
        if self.run is not None:
            self.run.close()
        else:
            self.engine.close()


def sampling_defaults(plugins: dict[str, dict[str, Any]]) -> SamplingParams:
    decoder = plugins["decoder"]
    name = decoder["name"]
    if name not in SERVED_DECODERS:
        raise RunError(f"+decoder={name} is not served: the continuous batch samples one token per request per step; "
                       f"accepted: {', '.join('+decoder=' + d for d in SERVED_DECODERS)} (the sampling defaults of "
                       "requests that omit them)")
    if decoder["default"]:
        return SamplingParams()  # OpenAI's defaults: temperature 1, top_p 1
    if name == "greedy":
        return SamplingParams(temperature=0.0)
    cfg = registry.config("decoder", name, decoder["params"])
    return SamplingParams(temperature=float(cfg.temperature), top_p=float(cfg.top_p), top_k=int(cfg.top_k))


def build(cfg: DictConfig, *, shutdown_cancel: bool = True) -> Server:
    """Validate, load the engine, make the scheduler and the app (not started: the app's lifespan starts it).
    Raises RunError/PluginError/ValueError with one line for bad input, before loading anything."""
    resolved = resolve_config(cfg, see="ollm_triton/conf/serve.yaml")
    settings = ServeSettings.from_config(dict(resolved.get("serve") or {}))
    plugins = resolve_plugins(resolved)
    if not plugins["context"]["default"]:  # accepted and silently ignored would serve uncompressed prompts
        raise RunError(f"+context={plugins['context']['name']} is not applied by the server yet (the runner's tasks "
                       f"and OptimizedInference apply it); accepted here: no +context")
    if "adapt" in plugins and not plugins["adapt"]["default"]:  # the same: the scheduler has no step clock for it
        raise RunError(f"+adapt={plugins['adapt']['name']} is not applied by the server yet (the runner applies it); "
                       f"accepted here: no +adapt")
    runtime = str(resolved["model"].get("runtime") or "engine")
    if runtime != "engine":  # the scheduler drives the native engine's batched step
        raise RunError(f"model.runtime={runtime} is not served (the scheduler batches the native engine's steps); "
                       "accepted here: a model preset of runtime engine")
    defaults = sampling_defaults(plugins)
    # the runner's build sequence (build.py): its memory check before anything loads needs the weights and one
    # request's prefill chunk to fit (model=llama3_8b on a CPU refuses in one line instead of swapping); KV beyond
    # that is the scheduler's admission (serve.kv_budget_gb). The monitor it starts feeds /metrics.
    run = build_run(resolved, plugins=plugins, needs={"serve": CacheNeed(settings.prefill_chunk)})
    try:
        return _serve(run, settings, plugins, defaults, shutdown_cancel)
    except BaseException:  # the scheduler or the app refused: the monitor's thread and the model go with them
        run.close()
        raise


def _serve(run: BuiltRun, settings: ServeSettings, plugins: dict[str, dict[str, Any]], defaults: SamplingParams,
           shutdown_cancel: bool) -> Server:
    """The scheduler and the app over what build_run made."""
    from ollm_triton.engine.checkpoint import resolve_source
    from ollm_triton.serve.app import create_app
    from ollm_triton.serve.chat import load_chat_template

    engine, source, resolved = run.engine, run.source, run.resolved
    # a model without tokenizer.json (random weights): token-id prompts, ids as text (detokenize.TokenIds)
    tokenizer = engine.tokenizer if engine.tokenizer is not None else TokenIds(engine.config.vocab_size)
    template = load_chat_template(resolve_source(source)) if not isinstance(source, dict) else None
    gb = 1e9
    scheduler = Scheduler(
        engine,
        max_batch=settings.max_batch,
        max_queue=settings.max_queue,
        queue_timeout_s=float(settings.queue_timeout_s),
        prefill_chunk=settings.prefill_chunk,
        prefill_budget=settings.prefill_budget,
        kv_budget_bytes=int(settings.kv_budget_gb * gb) if settings.kv_budget_gb is not None else None,
        prefix_cache_bytes=int(settings.prefix_cache_gb * gb) if settings.prefix_cache_gb is not None else None,
        max_context=settings.max_context,
    )
    name = settings.model_name or str(resolved["model"].get("name") or Path(str(source)).name)
    names = {g: p["name"] for g, p in plugins.items()}
    if plugins["decoder"]["default"]:  # no +decoder: each request's own sampling, OpenAI's defaults when omitted
        names["decoder"] = "openai_defaults"
    app = create_app(scheduler, tokenizer, model_name=name, chat_template=template, defaults=defaults,
                     plugins=names, shutdown_cancel=shutdown_cancel, monitor=run.monitor)
    return Server(engine, scheduler, app, settings, name, names, run)
