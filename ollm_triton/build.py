"""The one build sequence of a run: a resolved config in, the engine with its plugins (and the monitor) out.

    cfg = compose_config("serve", ["+cache=int4"])       # or the runner's config under @hydra.main
    resolved = resolve_config(cfg)                       # the composed Hydra config as a dict, `???` refused
    run = build_run(resolved, needs={"serve": CacheNeed(256)})
    run.engine, run.built["decoder"], run.monitor, run.footprint, ...

`python -m ollm_triton.run` (run.py, per job), `python -m ollm_triton.serve` (serve/server.py) and
`OptimizedInference` (facade.py) each call `build_run`, so a plugin, a parameter, a model, a seed or a memory cap
means the same in a sweep, in the server and from Python. What differs stays with the caller: the runner's tasks
(what its memory check sizes: `needs`), the server's scheduler and its refusals, the facade's prompt compression.

The sequence, each step refusing bad input in one line before anything loads: plugins validated against their
schemas; the model source resolved; device, `device_memory_gb` cap and dtype checked; the system monitor started
(`monitor.enabled`, `monitor.rate_hz`); the plugins built under the run's seed; the memory check (weights + KV +
activations of the largest cache `needs` declares, engine/footprint.py); the adapter's codec wrap; the engine loaded
(the native engine, or transformers' forward for `model.runtime: transformers`); the adapter attached. A failure
after the monitor started stops it again.

This module sits below the three entry points (they import it, it imports none of them).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from omegaconf.errors import MissingMandatoryValue

from ollm_triton.config_nodes import PLUGIN_GROUPS
from ollm_triton.engine.placement import resolve_device, resolve_dtype
from ollm_triton.monitor import MonitorConfig, SystemMonitor
from ollm_triton.registry import PluginError, registry

ASSETS = Path(__file__).parent / "assets"
CONF = Path(__file__).parent / "conf"
RUNTIMES = ("engine", "transformers")  # model.runtime: the native engine, or transformers' forward (hf_transformers)


class RunError(Exception):
    """A user-facing failure: one line saying what was wrong and what is accepted."""


USER_ERRORS = (RunError, PluginError, ValueError, FileNotFoundError, NotImplementedError)


def compose_config(config_name: str, overrides: Sequence[str] = ()) -> Any:
    """conf/<config_name>.yaml (`config`: the runner's, `serve`: the server's) composed with `overrides` through
    Hydra's compose API: no run directory, no logging changes. Raises Hydra's and OmegaConf's errors as they are
    (run.composition_error makes them the CLI's one line)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():
        GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name=config_name, overrides=list(overrides))


def resolve_config(cfg: Any, see: str = "ollm_triton/conf/ for what it accepts") -> dict[str, Any]:
    """The composed config as a plain dict, interpolations resolved; a mandatory value left `???` is one line."""
    try:
        return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except MissingMandatoryValue as e:
        raise RunError(f"{e.full_key} is required but not set (see {see})") from None


def resolve_plugins(cfg: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """{group: {name, params, default}} for every plugin group, every parameter validated."""
    out = {}
    for group in PLUGIN_GROUPS:  # a plugin group is named after its kind
        section = dict(cfg.get(group) or {})
        name = section.pop("name", None) or registry.baseline(group)
        registry.config(group, name, section)  # raises PluginError naming plugin, field and type
        out[group] = {"name": name, "params": section, "default": group not in cfg}
    return out


def model_source(model: dict[str, Any]) -> tuple[Any, bool]:
    """(what load_engine takes, trained?) from the model group."""
    source = model.get("source")
    if source == "random":
        if not model.get("arch"):
            raise RunError(
                f"model {model.get('name')!r}: source=random needs an `arch` section of Hugging Face config fields"
            )
        return dict(model["arch"]), False
    if isinstance(source, str) and source.startswith("embedded:"):
        path = ASSETS / source.split(":", 1)[1]
        if not (path / "config.json").exists():
            raise RunError(
                f"embedded model {source!r} is not in this checkout ({path}); train it with scripts/train_tiny_lm.py"
            )
        return str(path), True
    if not source:
        raise RunError("model.source is empty; give a checkpoint directory or a hub id (model=hf model.source=...)")
    return str(source), True


def experts_format(resolved: dict[str, Any]) -> str:
    """The run's `experts` option: how a MoE model keeps its routed experts (dense | mxfp4; engine/config.py)."""
    return str(resolved.get("experts") or "dense")


def limit_device_memory(gb: Any, device: torch.device) -> None:
    """device_memory_gb: cap this process's CUDA allocations (a smaller GPU on a big one), so that a run's
    "fits in 8 GB" is tested by the allocator failing, not read off a peak counter afterwards."""
    if gb is None:
        if device.type == "cuda":  # a previous job of the same sweep may have capped it
            torch.cuda.set_per_process_memory_fraction(1.0, device)
        return
    if isinstance(gb, bool) or not isinstance(gb, (int, float)) or gb <= 0:
        raise RunError(f"device_memory_gb={gb!r} is not accepted; accepted: null or a positive number of GB")
    if device.type != "cuda":
        raise RunError(f"device_memory_gb={gb} caps CUDA memory, but this run is on {device}; accepted there: null")
    total = torch.cuda.get_device_properties(device).total_memory
    if gb * 1e9 > total:
        raise RunError(f"device_memory_gb={gb} exceeds {device}'s {total / 1e9:.1f} GB")
    torch.cuda.set_per_process_memory_fraction(gb * 1e9 / total, device)


class CacheNeed:
    """What the memory check asks of a task (Task.footprint): the (batch, tokens) one cache holds; 0 tokens: the
    weights only. The server's need is one request's prefill chunk, the facade's `max_context`."""

    def __init__(self, tokens: int, batch: int = 1):
        self.tokens, self.batch = int(tokens), int(batch)

    def footprint(self, smoke: bool) -> tuple[int, int]:
        return self.batch, self.tokens


def memory_check(resolved: dict[str, Any], source: Any, built: dict[str, Any], tasks: Mapping[str, Any],
                 device: torch.device, dtype: str) -> dict[str, Any] | None:
    """Weights + KV + activations of the largest cache a task declares (Task.footprint) against free memory
    (engine/footprint.py): raises DoesNotFit (a ValueError, one line naming the need, what is free and what to do)
    before anything is built. None where it cannot estimate (a hub id: no local config.json)."""
    try:
        from ollm_triton.engine.footprint import check_fits
        from ollm_triton.engine.mixers import DECODE_MAX_TOKENS
    except ImportError:  # an engine without the estimator: run unchecked
        return None
    if not isinstance(source, dict) and not (Path(str(source)) / "config.json").exists():
        return None
    if resolved["model"].get("runtime") == "transformers":  # estimated from the engine's reading of the config
        from ollm_triton.engine.config import UnsupportedModelError
        from ollm_triton.engine.footprint import model_config

        try:
            model_config(source)
        except UnsupportedModelError:  # an architecture only transformers runs: not estimated
            return None
    smoke = bool(resolved.get("smoke"))
    shapes = [getattr(t, "footprint", lambda s: (1, 0))(smoke) for t in tasks.values()] or [(1, 0)]
    batch, context = max(shapes, key=lambda bc: (bc[0] * bc[1], bc[1]))
    return check_fits(
        source,
        dtype=dtype,
        device=device,
        batch=int(batch),
        context=int(context),
        codec=built["adapt"].planning_codec(built["cache"]) if "adapt" in built else built["cache"],
        prefetch=built["prefetch"],
        device_memory_gb=resolved.get("device_memory_gb"),
        prefill_chunk=int(resolved.get("prefill_chunk") or 0),
        name=str(resolved["model"].get("name") or ""),
        # a forward-only decoder (greedy, sample) keeps no states to roll back to; the others up to a verify block
        state_rollback_tokens=0 if getattr(built.get("decoder"), "forward_only", False) else DECODE_MAX_TOKENS,
        attention=built.get("attention"),
        experts=experts_format(resolved),
    )


def start_monitor(section: dict[str, Any] | None, device: torch.device) -> SystemMonitor | None:
    """The run's system monitor (ollm_triton/monitor.py), started; None when `monitor.enabled` is false."""
    cfg = MonitorConfig(**(section or {}))
    try:
        cfg.check()
    except ValueError as e:
        raise RunError(str(e)) from None
    return SystemMonitor(cfg.rate_hz, device).start() if cfg.enabled else None


def load_bridge(source: Any, plugins: dict[str, Any], built: dict[str, Any], device: torch.device, dtype: str,
                resolved: dict[str, Any]):
    """The run's plugins on transformers' own forward (ollm_triton/hf/engine.py); what it cannot run is refused in
    one line before the model loads."""
    try:
        from ollm_triton.hf.engine import load_transformers_engine
    except ImportError as e:  # transformers missing or outside the bridge's range: the bridge's one line
        raise RunError(f"model runtime transformers: {str(e).splitlines()[0]}") from None
    return load_transformers_engine(
        source,
        attention=plugins["attention"]["name"],
        attention_params=plugins["attention"]["params"],
        codec=built["cache"],
        prefetch=built["prefetch"],
        decoder=built["decoder"],
        device=device,
        dtype=dtype,
        seed=int(resolved.get("seed", 0)),
        prefill_chunk=int(resolved.get("prefill_chunk") or 0),
        fast_decode=str(resolved.get("fast_decode", "auto")),
    )


@dataclass
class BuiltRun:
    """What `build_run` made. `built`: every plugin group's object (`built["cache"]` is the adapter's wrap of the
    run's codec); `needs`: what the memory check sized (the runner's task objects); `started`: perf_counter when
    the monitor started (the job's monitored span begins there); `load_s`: seconds the engine took to load."""

    resolved: dict[str, Any]
    plugins: dict[str, dict[str, Any]]
    source: Any
    trained: bool
    device: torch.device
    dtype: str
    runtime: str
    monitor: SystemMonitor | None
    started: float
    built: dict[str, Any]
    needs: dict[str, Any]
    footprint: dict[str, Any] | None
    engine: Any
    load_s: float
    load_peak: tuple[int, int] | None = None  # CUDA: (allocated, reserved) peak while the engine loaded
    closed: bool = field(default=False, repr=False)

    @property
    def adapter(self):
        return self.built["adapt"]

    @property
    def decoder(self):
        return self.built["decoder"]

    def device_peaks(self) -> dict[str, int]:
        """The device's peak memory so far, split at the end of loading (build_run reset the counters there): the
        job's peak, the load's (a random model is drawn on the device, a streamed one packed from there) and the
        run's since, so a streamed run that stays in its budget is told apart from a load that did not. {} off CUDA."""
        if self.device.type != "cuda" or self.load_peak is None:
            return {}
        run_alloc = int(torch.cuda.max_memory_allocated(self.device))
        run_reserved = int(torch.cuda.max_memory_reserved(self.device))
        return {"device_peak_allocated_bytes": max(self.load_peak[0], run_alloc),
                "device_peak_reserved_bytes": max(self.load_peak[1], run_reserved),
                "device_load_peak_allocated_bytes": self.load_peak[0],
                "device_run_peak_allocated_bytes": run_alloc}

    def close(self) -> None:
        """Stop the monitor; free the model, a decoder's draft model and the adapter's own monitor."""
        if self.monitor is not None:
            self.monitor.stop()
        if self.closed:
            return
        self.closed = True
        _close(self.engine, self.built["decoder"], self.built["adapt"])


def _close(*parts: Any) -> None:
    for part in parts:
        close = getattr(part, "close", None)
        if callable(close):
            close()


def build_run(resolved: dict[str, Any], *, needs: Mapping[str, Any] | Callable[[], Mapping[str, Any]] = (),
              plugins: dict[str, dict[str, Any]] | None = None, job_num: int = 0) -> BuiltRun:
    """The engine and plugins of `resolved` (see the module docstring for the sequence). `needs`: objects with a
    `footprint(smoke) -> (batch, tokens)` the memory check sizes, or a function making them after the plugins are
    built (the runner's tasks); `plugins`: resolve_plugins(resolved) where the caller already validated them;
    `job_num`: a multirun job's number (device=cuda spreads jobs over the GPUs). Raises RunError / PluginError /
    ValueError with one line for bad input, before the model loads."""
    plugins = resolve_plugins(resolved) if plugins is None else plugins
    source, trained = model_source(resolved["model"])
    device = resolve_device(str(resolved.get("device", "auto")), job_num)  # ValueError: the one-line error
    limit_device_memory(resolved.get("device_memory_gb"), device)
    dtype = str(resolved["model"].get("dtype", "auto"))
    resolve_dtype(dtype, device)  # a bad name fails here, before anything loads; load_engine resolves auto itself
    runtime = str(resolved["model"].get("runtime") or "engine")
    monitor = start_monitor(resolved.get("monitor"), device)
    started = time.perf_counter()
    built: dict[str, Any] = {}
    try:
        seed = int(resolved.get("seed", 0))
        torch.manual_seed(seed)
        built = {group: registry.build(group, plugins[group]["name"], plugins[group]["params"])
                 for group in PLUGIN_GROUPS}
        made = dict(needs() if callable(needs) else needs)
        if runtime not in RUNTIMES:
            raise RunError(f"model.runtime={runtime!r} is not accepted; accepted: {', '.join(RUNTIMES)}")
        if runtime == "transformers" and experts_format(resolved) != "dense":
            raise RunError("experts=mxfp4 is the native engine's storage; model.runtime=transformers loads the "
                           "checkpoint its own way (leave experts=dense)")
        footprint = memory_check(resolved, source, built, made, device, dtype)  # refuses in one line, before loading
        adapter = built["adapt"]  # +adapt: the run-time controller (ollm_triton/adapt/base.py)
        built["cache"] = adapter.wrap_codec(built["cache"])  # its clock, and the codec it may switch live

        t0 = time.perf_counter()
        if runtime == "transformers":  # transformers' own forward with the run's plugins (ollm_triton/hf/engine.py)
            engine = load_bridge(source, plugins, built, device, dtype, resolved)
        else:
            from ollm_triton.engine import load_engine

            engine = load_engine(source, attention=built["attention"], codec=built["cache"],
                                 prefetch=built["prefetch"], device=device, dtype=dtype, seed=seed,
                                 prefill_chunk=int(resolved.get("prefill_chunk") or 0),
                                 fast_decode=str(resolved.get("fast_decode", "auto")),
                                 experts=experts_format(resolved))
        load_s = time.perf_counter() - t0
        load_peak = None
        if device.type == "cuda":  # BuiltRun.device_peaks: the load's peak apart from the run's
            load_peak = (int(torch.cuda.max_memory_allocated(device)), int(torch.cuda.max_memory_reserved(device)))
            torch.cuda.reset_peak_memory_stats(device)
        adapter.attach(engine=engine, decoder=built["decoder"], prefetch=built["prefetch"], monitor=monitor,
                       device_memory_gb=resolved.get("device_memory_gb"))
    except BaseException:  # refused or failed: no sampling thread (nor a draft model) outlives the attempt
        if monitor is not None:
            monitor.stop()
        _close(built.get("decoder"), built.get("adapt"))
        raise
    return BuiltRun(resolved=resolved, plugins=plugins, source=source, trained=trained, device=device, dtype=dtype,
                    runtime=runtime, monitor=monitor, started=started, built=built, needs=made, footprint=footprint,
                    engine=engine, load_s=load_s, load_peak=load_peak)


__all__ = ["ASSETS", "CONF", "RUNTIMES", "USER_ERRORS", "BuiltRun", "CacheNeed", "RunError", "build_run",
           "compose_config", "limit_device_memory", "load_bridge", "memory_check", "model_source", "resolve_config",
           "resolve_plugins", "start_monitor"]
