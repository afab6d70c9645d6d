"""Sweeps a researcher can read: the summary table at the end of -m (and summary.md beside multirun.yaml), failed
jobs that keep their overrides, plugins and task parameters in results.load, swept values in each run's header and
W&B name, run.log holding what was printed, and host peak memory measured per job."""

import json
import os
from pathlib import Path

import pytest
from cli_fork import run_module

from ollm_triton.results import load, summary_table, write_metrics
from ollm_triton.run import reset_host_peak, run_name

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """One small sweep with a failing third job: (the finished process, the sweep directory). `python -m
    ollm_triton.run -m` in its own process, forked with its imports done (tests/cli_fork.py)."""
    out = tmp_path_factory.mktemp("sweep")
    env = {**os.environ, "WANDB_MODE": "disabled"}
    env.pop("HYDRA_FULL_ERROR", None)
    proc = run_module("ollm_triton.run", ["-m", "model=tiny_random", "task=memory", "debug=smoke", "logger=none",
                                          "+cache=streaming", "cache.ratio=0.25,0.75,-1", f"hydra.sweep.dir={out}"],
                      env=env, cwd=REPO)
    return proc, out


@pytest.mark.slow
def test_summary_table_printed_and_written_beside_multirun_yaml(sweep):
    proc, out = sweep
    assert proc.returncode == 1, proc.stderr[-2000:]  # one job failed: the sweep went on, the exit says so
    assert (out / "multirun.yaml").exists()
    table = (out / "summary.md").read_text()
    assert table.strip() in proc.stdout  # printed at the end of -m as written
    lines = [line for line in table.splitlines() if line.startswith("| ")]
    header, rows = lines[0], lines[2:]  # [1]: the separator
    assert "cache.ratio" in header and "memory/kv_stored_bytes" in header
    assert "| model |" not in header and "every job: model=tiny_random" in table  # only swept values as columns
    assert [r.split("|")[1].strip() for r in rows] == ["0", "1", "2"]
    assert "| 0.25 |" in rows[0] and rows[0].rstrip(" |").endswith("ok")
    assert "| -1 |" in rows[2] and "failed: cache 'streaming': ratio must be in (0, 1]" in rows[2]


@pytest.mark.slow
def test_failed_runs_keep_their_overrides_plugins_and_task_parameters(sweep):
    _, out = sweep
    df = load(out).sort_values("run_dir")
    assert list(df.status) == ["ok", "ok", "failed"]
    failed = df.iloc[2]
    assert "cache.ratio=-1" in failed.overrides and failed.cache == "streaming" and failed["cache.ratio"] == -1
    assert failed.attention == "sdpa" and failed["task.memory.context_len"] == df.iloc[0]["task.memory.context_len"]
    assert bool(failed.smoke) and failed.model == "tiny_random"
    assert list(df["cache.ratio"]) == [0.25, 0.75, -1]


@pytest.mark.slow
def test_each_job_logs_its_output_and_header_names_the_swept_value(sweep):
    proc, out = sweep
    for job, value in (("0", "0.25"), ("1", "0.75")):
        log = (out / job / "run.log").read_text()
        assert f"cache.ratio={value}" in log and "memory/kv_stored_bytes" in log and "metrics:" in log
        assert "overrides: " in log
    assert "error: cache 'streaming'" in (out / "2" / "run.log").read_text()
    assert proc.stdout.count("overrides: ") == 2  # each finished run's header carries its overrides
    assert proc.stdout.count("memory/kv_stored_bytes   ") == 2  # printed once each (the log is file-only)


def test_wandb_run_name_carries_swept_values():
    plugins = {"attention": "sdpa", "cache": "snapkv", "decoder": "greedy", "prefetch": "resident"}
    a = run_name("tiny", plugins, ["+cache=snapkv", "cache.ratio=0.3", "model=tiny"])
    b = run_name("tiny", plugins, ["+cache=snapkv", "cache.ratio=0.6", "model=tiny"])
    assert a == "tiny-sdpa-snapkv-greedy-resident-cache.ratio=0.3" and a != b


def test_summary_of_an_empty_or_partial_sweep(tmp_path):
    assert "no job" in summary_table(tmp_path)
    write_metrics(tmp_path / "0", {"status": "failed", "error": "boom", "overrides": ["+cache=int4"]})
    write_metrics(tmp_path / "1", {"status": "ok", "overrides": ["+cache=int8"], "metrics": {"perplexity/ppl": 12.5}})
    table = summary_table(tmp_path)
    assert "| 0 | int4 |  | failed: boom |" in table and "| 1 | int8 | 12.5 | ok |" in table


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="VmHWM reset is Linux-only")
def test_host_peak_is_reset_per_job():
    def hwm():
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024

    block = bytearray(300 * 2**20)  # touch 300 MB, then free it: the peak stays until reset
    block[:: 4096] = b"x" * len(block[:: 4096])
    del block
    before = hwm()
    if not reset_host_peak():
        pytest.skip("this kernel refuses /proc/self/clear_refs")
    assert hwm() < before - 200 * 2**20


def test_metrics_json_counts_are_integers(tmp_path):
    """What results.write_metrics writes keeps ints as ints (json), so load() does not turn counts into floats."""
    write_metrics(tmp_path, {"status": "ok", "metrics": {"memory/kv_tokens_kept": 66, "x/ratio": 0.5}})
    record = json.loads((tmp_path / "metrics.json").read_text())
    assert isinstance(record["metrics"]["memory/kv_tokens_kept"], int)
    assert load(tmp_path)["memory/kv_tokens_kept"].dtype.kind == "i"
