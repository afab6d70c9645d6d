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
    "monitor/tokens_per_j",  # over every task's timed region; only where NVML reads the GPU's energy
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


def notebook_root(cwd: str | Path | None = None) -> Path:
    """Where a notebook puts its sweeps (under `<root>/multirun/`): the repository root when Jupyter started the
    kernel in its `notebooks/` folder, else the working directory."""
    here = Path(cwd or Path.cwd()).resolve()
    return here.parent if here.name == "notebooks" and (here.parent / "pyproject.toml").exists() else here


def run_sweep(overrides: list[str], sweep_dir: str | Path, *, cwd: str | Path | None = None) -> str:
    """`python -m ollm_triton.run -m <overrides> hydra.sweep.dir=<sweep_dir>` in a subprocess, as the notebooks run
    their sweeps -> the tail of what it printed; RuntimeError with the tail of its stderr when it fails."""
    cmd = [sys.executable, "-m", "ollm_triton.run", "-m", *overrides, f"hydra.sweep.dir={sweep_dir}"]
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[1:])} exited {proc.returncode}:\n{proc.stderr[-2000:]}")
    return proc.stdout[-2000:]


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


# --- studies: one table per preset of conf/experiment/ ------------------------------------------------------------

STUDIES = ("memory", "throughput", "context_scaling", "energy")  # conf/experiment/<study>.yaml
SET_GROUP = "experiment/plugins"  # the group a study sweeps: conf/experiment/plugins/<set>.yaml
BASELINE_SET = "baseline"
GB = 1e9
# The length a study sweeps, per study: the task parameter as configured (a smoke run clips it; the task records
# what it ran), so a job that failed before measuring keeps its row.
STUDY_LENGTH = {"memory": "task.memory.context_len", "context_scaling": "task.throughput.prompt_len"}


def override_value(overrides: Any, key: str) -> str | None:
    """The value of `key=...` (also `+key=...`) in a row's space-joined overrides; None when absent."""
    for item in str(overrides or "").split():
        name, _, value = item.lstrip("+~").partition("=")
        if name == key:
            return value
    return None


def plugin_set(row: Any) -> str:
    """The plugin set a run belongs to: its `+experiment/plugins=<set>`, else the plugins it chose that are not
    baselines (`cache=int4 + attention=flash`), else `baseline`."""
    named = override_value(row.get("overrides"), SET_GROUP)
    if named:
        return named
    from ollm_triton.registry import BASELINES

    chosen = [
        f"{kind}={row.get(kind)}"
        for kind, base in BASELINES.items()
        if isinstance(row.get(kind), str) and row.get(kind) != base
    ]
    return " + ".join(chosen) or BASELINE_SET


def outcome(row: Any) -> str:
    """ok | does not fit (the runner's memory check refused before loading) | out of memory (the allocator, during
    the run) | failed (anything else: the row's `error` says what)."""
    if row.get("status") == "ok":
        return "ok"
    error = str(row.get("error") or "")
    if " does not fit: " in error:
        return "does not fit"
    if "OutOfMemoryError" in error or "out of memory" in error.lower():
        return "out of memory"
    return "failed"


def _first(row: Any, *keys: str) -> tuple[Any, str | None]:
    """(the first of `keys` the row holds as a number, its key)."""
    for key in keys:
        value = row.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value == value:
            return value, key
    return None, None


def _peak_gb(row: Any, task: str) -> tuple[float | None, str | None]:
    """Peak memory in GB and what measured it: the device's allocator over the task (memory task) or the job, else
    (a CPU run) the host's resident set."""
    value, key = _first(
        row,
        f"{task}/device_peak_allocated_bytes",
        "device_peak_allocated_bytes",
        f"{task}/host_peak_rss_bytes",
        f"monitor/{task}/rss_peak_bytes",
        "monitor/job_rss_peak_bytes",
    )
    if value is None:
        return None, None
    return value / GB, ("device allocated" if "device" in key else "host RSS")


def study_name(df: Any) -> str:
    """The study of a loaded sweep, from its jobs' `+experiment=<study>` override."""
    names = {override_value(o, "experiment") for o in df.get("overrides", [])} - {None}
    if len(names) != 1:
        raise ValueError(
            f"expected the jobs of one study (+experiment=<study>), found {sorted(names) or 'none'}; "
            f"studies: {', '.join(STUDIES)}"
        )
    return names.pop()


def _ratio(value: Any, base: Any) -> float | None:
    ok = all(isinstance(v, (int, float)) and v == v for v in (value, base))
    return value / base if ok and base else None


def study_table(path_or_df: Any, study: str | None = None):
    """The table of a study's multirun (a directory for `load`, or its DataFrame): one row per plugin set (and
    length, for memory and context_scaling), in sweep order, with the study's columns and each against the
    `baseline` set of the same length (`x_baseline`: this / baseline; for time to first token baseline / this, so
    above 1 is better everywhere). A job that did not finish keeps its row: `status` says does not fit / out of
    memory / failed and `error` has its line. The table's `attrs` say the study, whether it was a smoke run, and
    the device."""
    import pandas as pd

    df = load(path_or_df) if isinstance(path_or_df, (str, Path)) else path_or_df
    if df.empty:
        raise ValueError(f"no metrics.json under {path_or_df}")
    study = study or study_name(df)
    if study not in STUDIES:
        raise ValueError(f"unknown study {study!r}; studies: {', '.join(STUDIES)}")
    df = df.assign(_job=[int(Path(d).name) if Path(d).name.isdigit() else i for i, d in enumerate(df.run_dir)])
    rows = []
    for _, r in df.sort_values("_job").iterrows():
        task = "memory" if study == "memory" else "throughput"
        peak, peak_source = _peak_gb(r, task)
        model = r.get("model") if isinstance(r.get("model"), str) else override_value(r.get("overrides"), "model")
        row: dict[str, Any] = {"model": model, "set": plugin_set(r)}
        if study in STUDY_LENGTH:
            length, _ = _first(r, STUDY_LENGTH[study])
            swept = override_value(r.get("overrides"), STUDY_LENGTH[study])  # a job that failed before composing
            row["context"] = length if length is not None else int(swept) if swept and swept.isdigit() else None
        row["status"] = outcome(r)
        if study == "memory":
            kv = r.get("memory/kv_stored_bytes")
            row.update({"peak_gb": peak, "kv_gb": kv / GB if isinstance(kv, (int, float)) else None})
        else:
            row.update({"ttft_s": r.get("throughput/ttft_s"), "decode_tok_s": r.get("throughput/decode_tok_s")})
            if study in ("throughput", "energy"):
                row["tokens_per_j"] = r.get("monitor/throughput/tokens_per_j")
            if study == "energy":
                idle, _ = _first(r, "monitor/idle/power_mean_w")  # the idle task's region, same job (NVML)
                energy, seconds = r.get("monitor/throughput/energy_j"), r.get("monitor/throughput/seconds")
                tokens = r.get("monitor/throughput/tokens")
                above = (
                    (energy - idle * seconds)
                    if all(isinstance(v, (int, float)) and v == v for v in (idle, energy, seconds))
                    else None
                )
                row.update(
                    {
                        "power_mean_w": r.get("monitor/throughput/power_mean_w"),
                        "energy_j": energy,
                        "idle_power_w": idle,
                        "tokens_per_j_above_idle": tokens / above if above and above > 0 and tokens else None,
                    }
                )
            if study != "energy":
                row["peak_gb"] = peak
        if study != "energy":
            row["peak_source"] = peak_source
        row["error"] = r.get("error") if row["status"] != "ok" else None
        rows.append(row)
    table = pd.DataFrame(rows)
    # each row against the baseline of its model and length (a sweep may add model=a,b on the command line)
    keys = ["model", *(["context"] if "context" in table else [])]
    base = table[(table["set"] == BASELINE_SET) & (table["status"] == "ok")].drop_duplicates(keys)
    base = {tuple(b[k] for k in keys): b for _, b in base.iterrows()}

    def baseline_of(row: Any, column: str) -> Any:
        found = base.get(tuple(row[k] for k in keys))
        return None if found is None else found.get(column)

    against = {
        "memory": ["peak_gb", "kv_gb"],
        "throughput": ["decode_tok_s", "ttft_s", "tokens_per_j"],
        "context_scaling": ["decode_tok_s", "ttft_s", "peak_gb"],
        "energy": ["tokens_per_j", "decode_tok_s"],
    }
    for column in against[study]:
        if column not in table:
            continue
        inverse = column == "ttft_s"  # shorter is better: baseline / this
        table[f"{column}_x_baseline"] = [
            _ratio(baseline_of(row, column), row[column]) if inverse else _ratio(row[column], baseline_of(row, column))
            for _, row in table.iterrows()
        ]
    if table["model"].nunique(dropna=False) == 1:  # one model: said in attrs, not in every row
        table.attrs["model"] = table["model"].iloc[0]
        table = table.drop(columns="model")
    table = table[[c for c in table.columns if c != "error"] + ["error"]]  # the long line last
    smoke = df.get("smoke")
    table.attrs.update(
        {
            "study": study,
            "smoke": bool(smoke.fillna(False).any()) if smoke is not None else False,
            "device": ", ".join(sorted({str(d) for d in df.get("env.device_name", []) if d == d})),
        }
    )
    return table


def markdown_table(table: Any) -> str:
    """A study table (or any DataFrame) as a GitHub table, numbers as the sweep summary prints them."""
    header = [str(c) for c in table.columns]
    out = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    for _, row in table.iterrows():
        out.append("| " + " | ".join(_fmt(v).replace("|", "\\|") for v in row) + " |")
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


if __name__ == "__main__":  # python -m ollm_triton.results <sweep dir>...: each study's table
    for sweep_arg in sys.argv[1:] or ["."]:
        study_df = study_table(sweep_arg)
        print(
            f"## {study_df.attrs['study']}: {sweep_arg} ({study_df.attrs['device'] or 'device unknown'}"
            f"{', smoke' if study_df.attrs['smoke'] else ''})\n\n{markdown_table(study_df)}\n"
        )
