"""End to end: `python -m ollm_triton.run` as a user types it (each run its own process), metrics.json, W&B offline,
sweeps, and the bad-input contract (one clear line, non-zero exit, no metrics.json that looks like success).

The runs are forked from a server that has already imported torch and Hydra (tests/cli_fork.py: the entry point still
runs fresh as __main__ in its own process, with its own argv, environment, exit status and streams): ~3 s of imports
saved per run, 22 runs here. test_wheel.py starts the real interpreter, `python -m` and the console script."""

import json
import os
from pathlib import Path

import pytest
from cli_fork import run_module

from ollm_triton.results import load

REPO = Path(__file__).resolve().parents[1]
SMOKE = ["model=tiny_random", "task=[throughput,memory]", "debug=smoke"]


def run(*args, env=None):
    env = {**os.environ, "WANDB_MODE": "offline", **(env or {})}
    env.pop("WANDB_SILENT", None)
    return run_module("ollm_triton.run", list(args), env=env, cwd=REPO, timeout=600)


def last_line(proc):
    return proc.stderr.strip().splitlines()[-1]


@pytest.mark.slow
def test_single_run_writes_metrics_and_offline_wandb(tmp_path):
    proc = run(*SMOKE, f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr
    record = json.loads((tmp_path / "metrics.json").read_text())
    assert record["status"] == "ok"
    assert record["plugins"]["attention"] == {"name": "sdpa", "params": {}, "default": True}
    assert record["plugins"]["cache"]["name"] == "dense" and record["plugins"]["cache"]["default"]
    m = record["metrics"]
    assert m["throughput/decode_tok_s"] > 0 and m["memory/kv_stored_bytes"] > 0
    assert m["memory/kv_tokens_kept"] == m["memory/context_len"]
    for key in ("torch", "triton", "transformers", "git_sha", "device_name", "python", "date"):
        assert key in record["env"]
    assert (tmp_path / "resolved_config.yaml").exists()
    assert list((tmp_path / "wandb").glob("offline-run-*")), "no offline W&B run written"
    # no decode step ran through a static step here: the plugin's own path is what decoding ran
    assert m["decode_attention_path"] == m["attention_path"] == "torch.sdpa"


@pytest.mark.slow
def test_metrics_name_the_attention_the_static_decode_step_ran(tmp_path):
    """Under the static (graph-capturable) step, decode attention is the step's own varlen kernel, not the plugin's
    SDPA that prefill ran: metrics.json says which ran where."""
    proc = run("model=tiny_random", "task=throughput", "debug=smoke", "fast_decode=static", "logger=none",
               f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr
    record = json.loads((tmp_path / "metrics.json").read_text())
    m, model = record["metrics"], record["model"]
    assert m["attention_path"] == "torch.sdpa"
    assert m["decode_attention_path"] == "torch.decode_varlen_reference (static step)"
    assert model["fast_path"] == "static" and model["fast_path_mode"] == "graph" and not model["fast_path_captured"]


@pytest.mark.slow
def test_multirun_over_decoders_with_a_failing_job(tmp_path):
    # the third job has an invalid temperature: it is recorded as failed, the sweep goes on, the exit is non-zero
    proc = run(
        "-m", *SMOKE, "logger=none", "+decoder=sample", "decoder.temperature=0.7,1.3,-1", f"hydra.sweep.dir={tmp_path}"
    )
    assert proc.returncode == 1, proc.stderr
    df = load(tmp_path).sort_values("decoder.temperature", na_position="last")
    assert len(df) == 3
    ok = df[df.status == "ok"]
    assert sorted(ok["decoder.temperature"]) == [0.7, 1.3]
    failed = df[df.status == "failed"]
    assert len(failed) == 1 and "temperature must be > 0" in failed.error.iloc[0]
    assert "1 job(s) failed" in proc.stderr


@pytest.mark.slow
def test_multirun_shares_wandb_group(tmp_path):
    proc = run("-m", *SMOKE, "task=memory", "+decoder=greedy,sample", f"hydra.sweep.dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr
    runs = sorted(tmp_path.glob("*/wandb/offline-run-*"))
    assert len(runs) == 2
    df = load(tmp_path)
    assert sorted(df.decoder) == ["greedy", "sample"] and (df.status == "ok").all()


BAD_INPUTS = [
        (["+attention=nope"], ["attention", "nope"]),
        (["+decoder=sample", "decoder.top_k=many"], ["decoder 'sample'", "'top_k'", "expects int"]),
        (["+decoder=sample", "+decoder.warmth=3"], ["unknown parameter 'warmth'"]),
        (["device=cuda"], ["device=cuda", "CUDA is not available", "accepted"]),
        (["model=hf", "model.source=/no/such/checkpoint"], ["/no/such/checkpoint"]),
        (["model=hf"], ["model.source"]),
        (["model=tiny_random", "task=perplexity"], ["perplexity", "random weights"]),
        (["device=cpu", "device_memory_gb=8"], ["device_memory_gb=8", "caps CUDA memory", "accepted"]),
        (["device_memory_gb=-1"], ["device_memory_gb=-1", "positive number"]),
        (["+cahce=int4"], ["unknown config key 'cahce'", "accepted groups: +attention=, +cache=", "keys: device"]),
        (["cahce=int4"], ["'cahce'", "+cahce=int4"]),
        (["cache=int4"], ["+cache=int4"]),
        (["+cache=int4", "cache.residul=64"], ["cache 'int4'", "unknown parameter 'residul'", "accepted: "]),
        (["+cache=int4", "cache.residual=abc"], ["cache 'int4'", "'residual'", "expects int", "'abc'"]),
        (["task.memory.batch=x"], ["task 'memory'", "'batch'", "expects int"]),
        (["+cache=nope"], ["cache/nope", "Available options in 'cache': cluster, dense"]),
        (["model.dtype=fp8"], ["dtype='fp8'", "accepted: auto"]),
]


@pytest.fixture(scope="module")
def bad_input_runs(tmp_path_factory):
    """Every bad input as its own `python -m ollm_triton.run` process, three at a time (most fail while Hydra
    composes, in a fraction of a second; the pool overlaps the few that load a model): args -> (finished process, its
    run dir)."""
    from concurrent.futures import ThreadPoolExecutor

    def one(args):
        out = tmp_path_factory.mktemp("bad")
        base = [a for a in ("model=tiny_random", "task=memory")
                if not any(x.startswith(a.split("=")[0] + "=") for x in args)]
        return tuple(args), (run(*base, *args, "logger=none", "debug=smoke", f"hydra.run.dir={out}"), out)

    with ThreadPoolExecutor(3) as pool:
        return dict(pool.map(one, [args for args, _ in BAD_INPUTS if args != ["device=cuda"] or not _has_cuda()]))


@pytest.mark.parametrize(
    "args, words",
    BAD_INPUTS,
    ids=["unknown-plugin", "bad-type", "unknown-param", "no-cuda", "missing-path", "no-source", "refused-task",
         "memory-cap-on-cpu", "memory-cap-negative", "misspelt-group", "misspelt-group-no-plus", "group-without-plus",
         "misspelt-field", "field-type", "task-field-type", "unknown-option", "bad-dtype"],
)
def test_bad_input_one_clear_line(bad_input_runs, args, words):
    if args == ["device=cuda"] and _has_cuda():
        pytest.skip("CUDA is available here")
    proc, tmp_path = bad_input_runs[tuple(args)]
    assert proc.returncode != 0
    line = last_line(proc)
    for w in words:
        assert w in proc.stderr, (w, proc.stderr[-1500:])
    assert "Traceback" not in proc.stderr, proc.stderr[-1500:]
    assert line.startswith("error: ") and "HYDRA_FULL_ERROR" not in proc.stderr, proc.stderr[-1500:]
    metrics = tmp_path / "metrics.json"
    if metrics.exists():
        record = json.loads(metrics.read_text())
        assert record["status"] == "failed" and "load_s" not in record.get("metrics", {})


def _has_cuda():
    import torch

    return torch.cuda.is_available()


def test_help_teaches_appending_plugin_groups():
    proc = run("--help")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "APPENDED with a leading +" in out and "`cache=int4` without + fails" in out
    assert "python -m ollm_triton.plugins" in out
    assert "cache: cluster, dense, h2o" in out and "attention: adaptive, flash" in out  # groups and their options
    assert "task: idle, memory, multikey, passkey, perplexity, throughput" in out
    assert "Powered by Hydra" not in out  # our help, not Hydra's default


def test_memory_check_refuses_before_building(monkeypatch):
    """run_job asks engine/footprint.py before load_engine: a model that cannot fit is refused in one line."""
    footprint = pytest.importorskip("ollm_triton.engine.footprint")
    import torch
    from omegaconf import OmegaConf

    from ollm_triton.registry import registry
    from ollm_triton.run import CONF, memory_check, model_source

    model = OmegaConf.to_container(OmegaConf.load(CONF / "model" / "llama3_8b.yaml"))
    source, _ = model_source(model)
    built = {"cache": registry.build("cache", "dense"), "prefetch": registry.build("prefetch", "resident")}
    tasks = {"throughput": registry.build("task", "throughput")}
    resolved = {"model": model, "smoke": False}
    monkeypatch.setattr(footprint, "free_memory", lambda *a, **k: (8 * 10**9, 8 * 10**9))
    with pytest.raises(ValueError, match="llama3_8b does not fit") as e:
        memory_check(resolved, source, built, tasks, torch.device("cpu"), "auto")
    assert "\n" not in str(e.value)
    monkeypatch.setattr(footprint, "free_memory", lambda *a, **k: (10**12, 10**12))
    assert memory_check(resolved, source, built, tasks, torch.device("cpu"), "auto")["fits"]
