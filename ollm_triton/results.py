"""Run results: metrics.json in the run directory, the W&B run, and `load()` across runs for notebooks."""

from __future__ import annotations

import datetime as _dt
import glob
import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

METRICS_FILE = "metrics.json"
SUMMARY_FILE = "summary.md"  # a sweep's table, beside multirun.yaml
# The metric a reader looks at first, per task (a sweep's summary shows those any job reported).
HEADLINE = (
    "perplexity/ppl",
    "passkey/acc",
    "throughput/decode_tok_s",
    "throughput/prefill_tok_s",
    "memory/kv_stored_bytes",
    "memory/host_peak_rss_bytes",
    "device_peak_allocated_bytes",
)


def environment(device) -> dict[str, Any]:
    """Device name and versions, recorded with every result."""
    import torch

    env: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device)
        if getattr(device, "type", "") == "cuda"
        else platform.processor() or platform.machine(),
        "hostname": platform.node(),
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "git_sha": git_sha(),
        "argv": " ".join(sys.argv),
    }
    for name in ("triton", "transformers", "hydra", "omegaconf"):
        try:
            env[name] = __import__(name).__version__
        except Exception:  # an absent optional package is recorded as absent, not an error
            env[name] = None
    return env


def git_sha() -> str | None:
    """The checkout's commit (+"-dirty"); OLLM_GIT_SHA overrides it where the tree travels without .git."""
    if os.environ.get("OLLM_GIT_SHA"):
        return os.environ["OLLM_GIT_SHA"]
    root = Path(__file__).resolve().parents[1]
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=5,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if sha.returncode != 0 or len(sha.stdout.strip()) != 40:
        return None
    return sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def write_metrics(run_dir: str | Path, record: dict[str, Any]) -> Path:
    """Write metrics.json atomically (a crash mid-write never leaves a half file that parses)."""
    path = Path(run_dir) / METRICS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=1, sort_keys=True, default=str))
    os.replace(tmp, path)
    return path


class WandbLogger:
    """One W&B run per job. wandb is imported only when logging is on."""

    def __init__(
        self, cfg: dict[str, Any], run_dir: str | Path, *, config: dict, tags: list[str], group: str | None, name: str
    ):
        self.run = None
        self.mode = cfg.get("mode", "offline")
        if self.mode == "disabled":
            return
        if self.mode not in ("online", "offline"):
            raise ValueError(f"logger.mode must be online, offline or disabled, got {self.mode!r}")
        import wandb

        if wandb.run is not None:  # a previous job of this process left its run open: close it
            wandb.finish()
        self.run = wandb.init(
            project=cfg.get("project", "ollm-triton"),
            entity=cfg.get("entity"),
            group=cfg.get("group") or group,
            tags=[*tags, *cfg.get("tags", [])],
            name=name,
            config=config,
            dir=str(run_dir),
            mode=self.mode,
            settings=wandb.Settings(silent=True),  # the runner prints its own summary; W&B's would bury it
        )

    def log(self, metrics: dict[str, Any], status: str) -> None:
        if self.run is None:
            return
        numbers = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
        self.run.log(numbers)
        self.run.summary.update({**metrics, "status": status})

    def finish(self, exit_code: int = 0) -> None:
        if self.run is not None:
            self.run.finish(exit_code=exit_code)
            self.run = None


def load(path_or_glob: str | Path, include_failed: bool = True):
    """A pandas DataFrame with one row per run found under a run dir, a multirun dir, or a glob of them.

    Columns: run_dir, status, error, the plugin names (attention, cache, decoder, prefetch, model), their
    parameters as `<kind>.<param>`, every metric as `<task>/<metric>`, and env fields as `env.<field>`.
    """
    import pandas as pd

    paths: list[Path] = []
    for root in sorted(glob.glob(str(path_or_glob))) or [str(path_or_glob)]:
        p = Path(root)
        if p.is_file() and p.name == METRICS_FILE:
            paths.append(p)
        elif p.is_dir():
            paths.extend(sorted(p.rglob(METRICS_FILE)))
    rows = []
    for p in paths:
        record = json.loads(p.read_text())
        if not include_failed and record.get("status") != "ok":
            continue
        rows.append(flatten_record(record, run_dir=str(p.parent)))
    return pd.DataFrame(rows)


def flatten_record(record: dict[str, Any], run_dir: str = "") -> dict[str, Any]:
    """One row: status, error, the overrides the job ran with, `smoke`, plugin names and `<kind>.<param>`,
    `task.<name>.<param>`, the model, `env.<field>` and every metric. Failed runs carry all but the metrics."""
    row: dict[str, Any] = {
        "run_dir": run_dir,
        "status": record.get("status"),
        "error": record.get("error"),
        "overrides": " ".join(record.get("overrides") or []),
        "smoke": record.get("smoke"),
    }
    for kind, plugin in (record.get("plugins") or {}).items():
        row[kind] = plugin.get("name")
        for key, value in (plugin.get("params") or {}).items():
            row[f"{kind}.{key}"] = _cell(value)
    for task, params in (record.get("tasks") or {}).items():
        for key, value in (params or {}).items():
            row[f"task.{task}.{key}"] = _cell(value)
    model = record.get("model") or {}
    row["model"] = model.get("name")
    for key, value in (record.get("env") or {}).items():
        row[f"env.{key}"] = value
    row.update(record.get("metrics") or {})
    return row


def _cell(value: Any) -> Any:
    return value if not isinstance(value, (list, dict, tuple)) else json.dumps(value)


def _fmt(value: Any) -> str:
    if value is None or value != value:  # None, NaN
        return ""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int) or float(value).is_integer() and abs(value) >= 1000:
        return f"{int(value):,}"
    return f"{value:.4g}"


def summary_table(sweep_dir: str | Path) -> str:
    """A sweep as a markdown table: one row per job (its number, the overrides it ran with, the headline metrics,
    ok or the failure's one-line error), in job order."""
    sweep = Path(sweep_dir)
    jobs = []
    for path in sweep.glob(f"*/{METRICS_FILE}"):
        record = json.loads(path.read_text())
        key = (0, int(path.parent.name), "") if path.parent.name.isdigit() else (1, 0, path.parent.name)
        jobs.append((key, path.parent.name, record))
    jobs.sort(key=lambda j: j[0])
    if not jobs:
        return f"no job of {sweep} wrote {METRICS_FILE}"
    overrides = [dict(o.split("=", 1) for o in r.get("overrides") or [] if "=" in o) for _, _, r in jobs]
    keys = list(dict.fromkeys(k for o in overrides for k in o))
    fixed = [k for k in keys if len(jobs) > 1 and len({o.get(k) for o in overrides}) == 1]
    keys = [k for k in keys if k not in fixed]  # columns for what the sweep varied; the rest on one line above
    metrics = [m for m in HEADLINE if any(m in (r.get("metrics") or {}) for _, _, r in jobs)]
    header = ["job", *keys, *metrics, "status"]
    rows = []
    for (_, name, record), over in zip(jobs, overrides, strict=True):
        m = record.get("metrics") or {}
        status = "ok" if record.get("status") == "ok" else f"failed: {record.get('error') or ''}"
        rows.append([name, *(over.get(k, "") for k in keys), *(_fmt(m.get(k)) for k in metrics), status])
    out = [f"every job: {' '.join(f'{k}={overrides[0][k]}' for k in fixed)}", ""] if fixed else []
    out += ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    out += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    failed = sum(1 for _, _, r in jobs if r.get("status") != "ok")
    out.append(f"\n{len(jobs)} job(s), {failed} failed; rows: `ollm_triton.results.load({str(sweep)!r})`")
    return "\n".join(out)


try:  # Hydra's callback base class (hydra-core >= 1.1); the summary is written by the parent process of a sweep
    from hydra.experimental.callback import Callback as _Callback
except ImportError:  # pragma: no cover
    _Callback = object


class SweepSummary(_Callback):
    """Registered in config.yaml's hydra.callbacks: at the end of `-m`, print the sweep's table and write it to
    summary.md beside multirun.yaml."""

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        sweep = Path(str(config.hydra.sweep.dir))
        table = summary_table(sweep)
        (sweep / SUMMARY_FILE).write_text(table + "\n")
        print(f"\nsweep summary ({sweep / SUMMARY_FILE}):\n{table}")
