"""The Hydra entry point: `python -m ollm_triton.run [+attention=X] [+cache=Y] [task=...] [-m ...]`.

Composes ollm_triton/conf/config.yaml (plugin nodes generated from the registry's schemas: config_nodes.py), validates
every plugin's parameters and checks the memory it needs before loading anything, builds the engine (build.py's
build_run: the sequence the server and OptimizedInference share), runs the tasks, and writes metrics.json (+ the
resolved config) in the run directory and a W&B run.
"""

from __future__ import annotations

import gc
import logging
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException, ValidationError

from ollm_triton.build import (  # noqa: F401  (ASSETS, RUNTIMES, model_source, ...: imported from here before)
    ASSETS,
    CONF,
    RUNTIMES,
    USER_ERRORS,
    RunError,
    build_run,
    limit_device_memory,
    load_bridge,
    memory_check,
    model_source,
    resolve_config,
    resolve_plugins,
    start_monitor,
)
from ollm_triton.config_nodes import PLUGIN_GROUPS
from ollm_triton.monitor import Sample, SystemMonitor, merge_summaries, wandb_series
from ollm_triton.registry import registry
from ollm_triton.results import WandbLogger, environment, write_metrics
from ollm_triton.tasks.base import RunContext, TaskRefused

# What the runner prints also goes to the job's run.log (hydra/job_logging/ollm: this logger writes only the file,
# so the console shows the printed lines once).
log = logging.getLogger("ollm_triton.run")


def say(message: str, *, err: bool = False) -> None:
    print(message, file=sys.stderr if err else sys.stdout)
    log.info(message)


def config_groups() -> tuple[list[str], list[str]]:
    """The groups a run accepts: (those of the primary defaults list, `group=name`; those appended, `+group=name`)."""
    primary = OmegaConf.load(CONF / "config.yaml")
    listed = [next(iter(d)) for d in primary.get("defaults", []) if isinstance(d, DictConfig)]
    folders = {p.name for p in CONF.iterdir() if p.is_dir() and p.name not in ("hydra", "__pycache__")}
    return listed, [*PLUGIN_GROUPS, *sorted(folders - set(listed) - set(PLUGIN_GROUPS))]


def check_top_level_keys(cfg: DictConfig | dict) -> None:
    """Refuse a key the config does not know (`+cahce=int4` would otherwise run the dense baseline and write a
    metrics.json that looks like an int4 result)."""
    keys = [k for k in OmegaConf.load(CONF / "config.yaml") if k not in ("defaults", "hydra")]
    listed, appended = config_groups()
    unknown = [k for k in cfg if k not in (*keys, *listed, *appended)]
    if unknown:
        groups = ", ".join([*(f"+{g}=" for g in appended), *(f"{g}=" for g in listed)])
        raise RunError(
            f"unknown config key {', '.join(repr(k) for k in unknown)}; accepted groups: {groups}; "
            f"keys: {', '.join(keys)} (see python -m ollm_triton.run --help)"
        )


def resolve_tasks(cfg: dict[str, Any]) -> dict[str, dict[str, Any]]:
    tasks = cfg.get("task") or {}
    if not tasks:
        raise RunError(
            "no task selected; choose with task=<name> or task=[a,b]; registered: " + ", ".join(registry.names("task"))
        )
    for name, params in tasks.items():
        registry.config("task", name, params or {})
    return {name: dict(params or {}) for name, params in tasks.items()}


def monitor_metrics(monitor: SystemMonitor, by_task: dict[str, dict[str, Any]], t0: float, t1: float
                    ) -> dict[str, Any]:
    """monitor/<task>/<key> over each task's timed region; monitor/<key> over all of them together (energy and
    tokens summed); monitor/job_* over the whole job; monitor/gpu says what was sampled or why the GPU was not."""
    out: dict[str, Any] = {"monitor/gpu": monitor.gpu, "monitor/rate_hz": monitor.rate_hz}
    for task, summary in by_task.items():
        out.update({f"monitor/{task}/{k}": v for k, v in summary.items() if k != "gpu"})
    if by_task:
        merged = merge_summaries(list(by_task.values()))
        out.update({f"monitor/{k}": v for k, v in merged.items() if k != "gpu"})
        out["monitor/tokens_counted"] = "; ".join(f"{t}: {s.get('tokens_counted', 'none')}"
                                                  for t, s in by_task.items())
    job = monitor.summary(t0, t1)
    for key in ("seconds", "samples", "energy_j", "power_peak_w", "temp_peak_c", "rss_peak_bytes"):
        if key in job:
            out[f"monitor/job_{key}"] = job[key]
    out["monitor/overhead_s"] = monitor.read_s  # the sampling's own time, on its thread
    return out


def run_job(cfg: DictConfig, run_dir: Path, job_num: int = 0,
            on_samples: Any = None) -> dict[str, Any]:
    """Run one job; returns the metrics.json record. Raises RunError/PluginError/ValueError for bad input.
    on_samples(samples, origin): handed the monitor's samples at the end (the W&B time series)."""
    resolved = resolve_config(cfg)
    plugins = resolve_plugins(resolved)
    tasks = resolve_tasks(resolved)
    run = build_run(resolved, plugins=plugins, job_num=job_num,
                    needs=lambda: {name: registry.build("task", name, params) for name, params in tasks.items()})
    task_objs, engine, built, monitor, device = run.needs, run.engine, run.built, run.monitor, run.device
    adapter, job_t0, load_s, trained, footprint = run.adapter, run.started, run.load_s, run.trained, run.footprint
    ctx = RunContext(
        engine=engine,
        decoder=built["decoder"],
        device=device,
        smoke=bool(resolved.get("smoke")),
        trained=trained,
        cfg=resolved,
        seed=int(resolved.get("seed", 0)),
        context=built["context"],
        monitor=monitor,
    )

    metrics: dict[str, Any] = {"load_s": load_s}
    refused: dict[str, str] = {}
    try:
        by_task: dict[str, dict[str, Any]] = {}
        for name, task in task_objs.items():
            ctx.regions.clear()
            task_t0 = time.perf_counter()
            try:
                out = task.run(ctx)
            except TaskRefused as e:
                refused[name] = str(e)
                say(f"{name}: refused: {e}", err=True)
                continue
            metrics.update({f"{name}/{k}": v for k, v in out.items()})
            if monitor is not None:  # over the region the task timed; a task that declares none: its whole run
                by_task[name] = task_monitor_summary(monitor, ctx.regions, task_t0, time.perf_counter())
        engine_info = engine.describe()
        # what attention ran, per phase: under the captured decode step it is the step's own kernel, not the plugin
        metrics["attention_path"] = engine_info["attention_path"]
        metrics["decode_attention_path"] = engine_info["decode_attention_path"]
        metrics.update(run.device_peaks())  # over the whole job (clean_state reset the counters before it began)
        metrics.update({f"prefetch/{k}": v for k, v in built["prefetch"].stats().items()})
        metrics.update(adapter.report())  # adapt/decisions: every switch, when, why, its measured effect
        if monitor is not None:
            monitor.stop()
            metrics.update(monitor_metrics(monitor, by_task, job_t0, time.perf_counter()))
            if on_samples is not None:
                on_samples(monitor.samples(), job_t0)
    finally:  # free the model (and a decoder's draft model) now, not at the next job's garbage collection
        run.close()
        del engine, ctx, run
    if refused and len(refused) == len(tasks):
        raise RunError("every task refused: " + "; ".join(f"{k}: {v}" for k, v in refused.items()))
    return {
        "status": "ok",
        "error": None,
        "metrics": metrics,
        "refused": refused,
        "plugins": plugins,
        "tasks": tasks,
        "model": {**{k: v for k, v in resolved["model"].items() if k != "arch"}, "trained": trained, **engine_info},
        "env": environment(device),
        "smoke": bool(resolved.get("smoke")),
        "seed": resolved.get("seed"),
        "footprint": footprint,
    }


def task_monitor_summary(monitor: SystemMonitor, regions: list[Any], t0: float, t1: float) -> dict[str, Any]:
    """The monitor's summary over a task's timed regions (tokens summed), or over [t0, t1] when it timed none."""
    if not regions:
        return {**monitor.summary(t0, t1), "region": "whole task (it declared no timed region)"}
    parts = [{**monitor.summary(r.t0, r.t1, tokens=r.tokens), "tokens_counted": r.counted} for r in regions]
    return {**merge_summaries(parts), "region": "timed"}


def clean_state() -> None:
    """Start each job of a multirun from nothing: the previous model freed, CUDA peak statistics and the process's
    peak resident set (VmHWM, which the memory task reads) reset, so no job reports the previous job's peak."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    reset_host_peak()


def reset_host_peak() -> bool:
    """Reset the kernel's peak-RSS counter of this process (Linux: writing 5 to /proc/self/clear_refs resets
    VmHWM to the current RSS). False where the OS has no such counter to reset."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:  # not Linux, or a kernel/sandbox that refuses it: the peak then covers the process's life
        return False
    return True


def run_name(model: str, plugin_names: dict[str, str], overrides: list[str]) -> str:
    """The W&B run name: model, the four plugins, then the job's other overrides (a sweep's swept values), so the
    runs of a sweep over cache.ratio do not share one name."""
    values = [o.lstrip("+") for o in overrides if o.lstrip("+").split("=", 1)[0] not in (*PLUGIN_GROUPS, "model")]
    return "-".join([model, *plugin_names.values(), *values])


def job_overrides(hc: Any) -> list[str]:
    """The command-line overrides of this job (a sweep's job: with its swept values), hydra.* left out."""
    return [o for o in hc.overrides.task if not o.lstrip("+~").startswith("hydra.")]


def plugin_sections(cfg: DictConfig | dict) -> dict[str, dict[str, Any]]:
    """{group: {name, params, default}} as composed, without validation (a failed job's record carries them)."""
    out = {}
    for group in PLUGIN_GROUPS:
        section = cfg.get(group)
        if OmegaConf.is_config(section):
            section = OmegaConf.to_container(section, resolve=False)
        section = dict(section or {})
        name = section.pop("name", None) or registry.baseline(group)
        out[group] = {"name": name, "params": section, "default": cfg.get(group) is None}
    return out


_failed_jobs: list[str] = []


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def hydra_main(cfg: DictConfig) -> float | None:
    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    multirun = hc.mode == RunMode.MULTIRUN
    group = Path(hc.sweep.dir).name if multirun else None
    clean_state()
    (run_dir / "resolved_config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=False))
    logger = None
    started = time.perf_counter()
    try:
        check_top_level_keys(cfg)  # before anything loads or logs
    except RunError as e:
        return fail(e, run_dir, hc, started, logger=None, multirun=multirun, cfg=cfg)
    plugin_names = {g: (cfg.get(g) or {}).get("name", registry.baseline(g)) for g in PLUGIN_GROUPS}
    overrides = job_overrides(hc)
    name = run_name(str(cfg.model.get("name", "model")), plugin_names, overrides)
    try:
        logger = WandbLogger(
            OmegaConf.to_container(cfg.logger, resolve=True),
            run_dir,
            config=OmegaConf.to_container(cfg, resolve=True),
            tags=[f"{g}:{n}" for g, n in plugin_names.items()],
            group=group,
            name=name,
        )
        def series(samples: list[Sample], origin: float) -> None:  # before the metrics: W&B steps only grow
            if logger is not None and logger.run is not None:
                wandb_series(logger.run, samples, origin)

        record = run_job(cfg, run_dir, hc.job.num if multirun else 0, on_samples=series)
        record["overrides"] = overrides
        record["duration_s"] = time.perf_counter() - started
        (run_dir / "resolved_config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
        write_metrics(run_dir, record)
        logger.log(record["metrics"], "ok")
        logger.finish(0)
        print_summary(record, run_dir)
        return None
    except Exception as e:  # recorded as failed; a single run exits non-zero, a sweep goes on
        return fail(e, run_dir, hc, started, logger=logger, multirun=multirun, cfg=cfg)
    finally:
        clean_state()


def fail(
    e: Exception, run_dir: Path, hc: Any, started: float, *, logger: Any, multirun: bool, cfg: DictConfig | None = None
) -> None:
    """Record a failed job (metrics.json with its one-line error), print the line; a single run exits 2."""
    message = str(e).splitlines()[0] if str(e) else type(e).__name__
    if not isinstance(e, USER_ERRORS):
        (run_dir / "error.log").write_text(traceback.format_exc())
        message = f"{type(e).__name__}: {message} (traceback in {run_dir / 'error.log'})"
    record: dict[str, Any] = {
        "status": "failed",
        "error": message,
        "duration_s": time.perf_counter() - started,
        "overrides": job_overrides(hc),
    }
    if cfg is not None:  # what the job was asked to run, so results.load() shows a failure beside its sweep
        try:
            record["plugins"] = plugin_sections(cfg)
            record["tasks"] = OmegaConf.to_container(cfg.get("task") or {}, resolve=False)
            record["model"] = {"name": cfg.model.get("name")} if cfg.get("model") else {}
            record["smoke"] = bool(cfg.get("smoke"))
            record["seed"] = cfg.get("seed")
        except Exception:  # a config too broken to read: the error line and the overrides still say what ran
            pass
    write_metrics(run_dir, record)
    if logger is not None:
        logger.finish(1)
    say(f"error: {message}", err=True)
    _failed_jobs.append(message)
    if not multirun:
        sys.exit(2)
    return None


def composition_error(e: Exception) -> str:
    """One line for an error Hydra or OmegaConf raised while composing the config (before any job ran)."""
    cause = e.__cause__ if isinstance(e.__cause__, OmegaConfBaseException) else e
    node = getattr(cause, "object_type", None)
    key = getattr(cause, "key", None)
    kind, name = getattr(node, "plugin_kind", None), getattr(node, "plugin_name", None)
    if kind and isinstance(key, str):  # a plugin's or a task's node: name the plugin, the field, what it accepts
        spec = registry.get(kind, name)
        params = {p: t for p, t, _ in spec.parameters()}
        where = f"{kind} {name!r}" if kind != "task" else f"task {name!r}"
        override = str(e).rsplit(" ", 1)[-1] if str(e).startswith("Error merging override") else ""
        if key not in params:
            return f"{where}: unknown parameter {key!r}; accepted: {', '.join(params) or 'none'}"
        if isinstance(cause, ValidationError):
            got = f", got {override.split('=', 1)[1]!r}" if "=" in override else ""
            return f"{where}: parameter {key!r} expects {params[key]}{got}"
    pieces: list[str] = []
    for source in (e, cause) if cause is not e else (e,):
        listing = False  # after "Available options in 'cache':" Hydra writes one indented option a line
        for raw in str(source).splitlines():
            line = raw.strip().removesuffix(".")
            if line.startswith("Config search path"):
                break
            if not line or line.startswith(("full_key:", "object_type=", "reference_type=")):
                continue
            if listing and raw[:1].isspace():
                pieces[-1] += (" " if pieces[-1].endswith(":") else ", ") + line
                continue
            pieces.append(line)
            listing = line.endswith(":")
    return "; ".join(pieces) or type(e).__name__


def print_summary(record: dict[str, Any], run_dir: Path) -> None:
    plugins = ", ".join(f"{g}={p['name']}{' (default)' if p['default'] else ''}" for g, p in record["plugins"].items())
    say(f"model={record['model'].get('name')} {plugins}")
    if record.get("overrides"):  # a sweep's swept values (and any other override) in each run's header
        say(f"overrides: {' '.join(record['overrides'])}")
    for key, value in record["metrics"].items():
        if isinstance(value, float):
            say(f"  {key:40s} {value:.6g}")
        else:
            say(f"  {key:40s} {value}")
    say(f"metrics: {run_dir / 'metrics.json'}")


def main() -> None:
    """The console script `ollm-triton` and `python -m ollm_triton.run`. A config that does not compose (a
    misspelt group, field or value) ends here in one line, exit status 2; HYDRA_FULL_ERROR=1 shows the traceback."""
    full_error = os.environ.get("HYDRA_FULL_ERROR")
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra raises instead of printing several lines and exiting 1
    try:
        hydra_main()
    except (HydraException, OmegaConfBaseException) as e:
        if full_error == "1":
            raise
        print(f"error: {composition_error(e)}", file=sys.stderr)
        sys.exit(2)
    finally:
        if full_error is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)
        else:
            os.environ["HYDRA_FULL_ERROR"] = full_error
    if _failed_jobs:
        print(f"{len(_failed_jobs)} job(s) failed", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
