"""Do the offline W&B runs of a sweep say what `results.load` says?

    python scripts/check_wandb.py <multirun dir> [--out check.json]

For every job of the sweep (a directory with metrics.json, as `ollm_triton.results.load` finds them) it reads the
job's offline W&B run (`<job>/wandb/offline-run-*/run-*.wandb`, written by `logger.mode=offline`) and checks:

- group: every run of the sweep is in one W&B group, the sweep directory's name (the runner's default);
- tags: the run is tagged `<kind>:<plugin>` for each plugin the job ran (the row's attention, cache, ... columns);
- name: the run's name carries each value the sweep varied (the job's overrides other than plugins and model);
- summary: every metric of the row equals the run summary's value (numbers to 1e-9 relative, text exactly), and
  the summary's `status` is the row's (a failed job logs none); the run's exit code is 0 for an ok job, non-zero
  for a failed one.

It prints one GitHub table row per job and exits 1 when any check fails or a job has no offline run. The `.wandb`
file is read directly (LevelDB log blocks of protobuf `Record`s, the format `wandb sync` uploads), so no W&B
account, network or service process is needed; wandb itself is imported only for its protobuf classes.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import struct
import sys
from pathlib import Path
from typing import Any

BLOCK = 32768  # the LevelDB log's block size: a record never starts in a block's last 6 bytes
HEADER = struct.Struct("<4sHB")  # ":W&B", magic 0xBEE1, version
CHUNK = struct.Struct("<IHB")  # crc32, length, type (1 full, 2 first, 3 middle, 4 last)


def read_records(path: Path) -> list[bytes]:
    """The serialized records of a `.wandb` file, chunks reassembled."""
    raw = path.read_bytes()
    ident, magic, _ = HEADER.unpack_from(raw, 0)
    if ident != b":W&B" or magic != 0xBEE1:
        raise ValueError(f"{path} is not a W&B transaction log (header {raw[:7]!r})")
    out, partial, pos = [], b"", HEADER.size
    while pos + CHUNK.size <= len(raw):
        left = BLOCK - pos % BLOCK
        if left < CHUNK.size:  # block padding
            pos += left
            continue
        _, length, kind = CHUNK.unpack_from(raw, pos)
        if kind == 0 and length == 0:  # zero fill to the block's end
            pos += left
            continue
        data = raw[pos + CHUNK.size : pos + CHUNK.size + length]
        pos += CHUNK.size + length
        if kind == 1:
            out.append(data)
        elif kind == 2:
            partial = data
        elif kind == 3:
            partial += data
        elif kind == 4:
            out.append(partial + data)
            partial = b""
    return out


def read_run(path: Path) -> dict[str, Any]:
    """{id, name, group, tags, summary (the final one: every update and removal applied in order), exit_code}."""
    from wandb.proto import wandb_internal_pb2 as pb

    run: dict[str, Any] = {"file": str(path), "summary": {}, "exit_code": None}
    for data in read_records(path):
        record = pb.Record()
        record.ParseFromString(data)
        kind = record.WhichOneof("record_type")
        if kind == "run":
            r = record.run
            run.update(id=r.run_id, name=r.display_name, group=r.run_group, tags=list(r.tags))
        elif kind == "summary":
            for item in record.summary.update:
                run["summary"][item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
            for item in record.summary.remove:
                run["summary"].pop(item.key or "/".join(item.nested_key), None)
        elif kind == "exit":
            run["exit_code"] = record.exit.exit_code
    return run


def offline_run(job_dir: Path) -> Path | None:
    """The job's offline run file (the newest, should the job have been re-run into the same directory)."""
    found = sorted(job_dir.glob("wandb/offline-run-*/run-*.wandb"))
    return found[-1] if found else None


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=1e-9, abs_tol=0.0)
    return a == b


def check_job(row: Any, run: dict[str, Any], group: str, plugin_kinds: tuple[str, ...],
              metric_columns: list[str]) -> tuple[list[str], int]:
    """(what disagrees, how many metrics were compared) for one row of `results.load` and its W&B run."""
    problems = []
    if run.get("group") != group:
        problems.append(f"group {run.get('group')!r}, expected the sweep's {group!r}")
    tags = set(run.get("tags") or [])
    missing = [f"{k}:{row[k]}" for k in plugin_kinds if isinstance(row.get(k), str) and f"{k}:{row[k]}" not in tags]
    if missing:
        problems.append(f"tags lack {', '.join(missing)}")
    swept = [o.lstrip("+") for o in str(row.get("overrides") or "").split()
             if o.lstrip("+").split("=", 1)[0] not in (*plugin_kinds, "model")]
    absent = [o for o in swept if o not in str(run.get("name"))]
    if absent:
        problems.append(f"name {run.get('name')!r} lacks {', '.join(absent)}")
    summary = run["summary"]
    # a failed job's run is finished with its exit code before anything is logged (run.fail): no status to compare
    if summary.get("status") != row.get("status") and not (row.get("status") != "ok" and "status" not in summary):
        problems.append(f"summary status {summary.get('status')!r}, row {row.get('status')!r}")
    if (run.get("exit_code") == 0) != (row.get("status") == "ok"):
        problems.append(f"exit code {run.get('exit_code')} for a job that is {row.get('status')}")
    compared = 0
    for column in metric_columns:
        value = row.get(column)
        if value is None or (isinstance(value, float) and math.isnan(value)):
            continue  # a metric this job did not report (the row is the union of the sweep's columns)
        compared += 1
        if column not in summary:
            problems.append(f"{column} missing from the summary")
        elif not _same(value, summary[column]):
            problems.append(f"{column}: row {value!r}, W&B {summary[column]!r}")
    return problems, compared


def check_sweep(sweep: Path) -> dict[str, Any]:
    """Every job of the sweep against its offline run: {"jobs": [...], "ok": bool}."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from ollm_triton.registry import BASELINES
    from ollm_triton.results import load, plugin_set

    df = load(sweep)
    if df.empty:
        raise SystemExit(f"no metrics.json under {sweep}")
    kinds = tuple(BASELINES)
    fixed = {"run_dir", "status", "error", "overrides", "smoke", "model", *kinds}
    metric_columns = [c for c in df.columns if c not in fixed and not c.startswith(("env.", "task."))
                      and "." not in c.split("/")[0]]  # metrics (<task>/<name>, load_s, ...), not <kind>.<param>
    jobs = []
    for _, row in df.sort_values("run_dir").iterrows():
        job_dir = Path(row["run_dir"])
        found = offline_run(job_dir)
        if found is None:
            jobs.append({"job": job_dir.name, "set": plugin_set(row), "problems": ["no offline W&B run"],
                         "compared": 0})
            continue
        run = read_run(found)
        problems, compared = check_job(row, run, sweep.name, kinds, metric_columns)
        jobs.append({"job": job_dir.name, "set": plugin_set(row), "run": run.get("id"), "group": run.get("group"),
                     "tags": run.get("tags"), "status": row.get("status"), "compared": compared,
                     "problems": problems})
    return {"sweep": str(sweep), "ok": all(not j["problems"] for j in jobs), "jobs": jobs,
            "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds")}


def markdown(result: dict[str, Any]) -> str:
    lines = ["| job | set | W&B run | group | plugin tags | metrics compared | agrees |",
             "|---|---|---|---|---|---|---|"]
    for j in result["jobs"]:
        tags = " ".join(t for t in j.get("tags") or [] if ":" in t)
        verdict = "yes" if not j["problems"] else "no: " + "; ".join(j["problems"])
        lines.append(f"| {j['job']} | {j['set']} | {j.get('run', '')} | {j.get('group', '')} | {tags} | "
                     f"{j['compared']} | {verdict.replace('|', '/')} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep", type=Path, help="a multirun directory whose jobs ran with logger.mode=offline")
    parser.add_argument("--out", type=Path, help="write the result as JSON here")
    args = parser.parse_args(argv)
    result = check_sweep(args.sweep)
    if args.out:
        args.out.write_text(json.dumps(result, indent=1, default=str))
    print(markdown(result))
    agree = sum(not j["problems"] for j in result["jobs"])
    print(f"\n{agree} of {len(result['jobs'])} job(s) agree with their W&B run")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
