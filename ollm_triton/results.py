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
    row: dict[str, Any] = {"run_dir": run_dir, "status": record.get("status"), "error": record.get("error")}
    for kind, plugin in record.get("plugins", {}).items():
        row[kind] = plugin.get("name")
        for key, value in plugin.get("params", {}).items():
            row[f"{kind}.{key}"] = value if not isinstance(value, (list, dict)) else json.dumps(value)
    model = record.get("model", {})
    row["model"] = model.get("name")
    for key, value in record.get("env", {}).items():
        row[f"env.{key}"] = value
    row.update(record.get("metrics", {}))
    return row
