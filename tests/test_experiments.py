"""The studies of conf/experiment/: every preset composes as its full sweep and as its smoke sweep, every plugin set
composes into the plugins it names, one preset smoke-runs end to end into its table (the others are composed only:
a smoke sweep costs ~10-20 s of this CPU each; notebooks/studies.py runs one more in tests/test_notebooks.py), and
`results.study_table` classifies and compares rows the way the runner writes them."""

import json
import os
import shutil
import time
import types
from pathlib import Path

import pandas as pd
import pytest
import torch
from cli_fork import run_module
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from ollm_triton.registry import BASELINES
from ollm_triton.results import STUDIES, load, markdown_table, outcome, study_table, write_metrics
from ollm_triton.run import CONF, check_top_level_keys, fail, resolve_plugins, resolve_tasks

REPO = Path(__file__).resolve().parents[1]
SETS = sorted(p.stem for p in (CONF / "experiment" / "plugins").glob("*.yaml"))


def sweep_params(*overrides):
    """The preset's hydra.sweeper.params, resolved as the sweeper reads them ({key: comma list})."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=list(overrides), return_hydra_config=True)
    return cfg, {k: str(v) for k, v in OmegaConf.to_container(cfg.hydra.sweeper.params, resolve=True).items()}


@pytest.mark.parametrize("study", STUDIES)
def test_study_sweeps_llama3_8b_and_smoke_sweeps_the_embedded_model(study):
    cfg, full = sweep_params(f"+experiment={study}")
    _, smoke = sweep_params(f"+experiment={study}", "debug=smoke")
    assert full["model"] == "llama3_8b" and smoke["model"] == "tiny"
    sets = full["+experiment/plugins"].split(",")
    assert sets[0] == "baseline" and set(sets) <= set(SETS) and smoke["+experiment/plugins"] == full[
        "+experiment/plugins"]  # smoke keeps every set (each composes and runs), only lengths and model shrink
    lengths = {k: v for k, v in full.items() if k.startswith("task.")}
    if study == "memory":
        assert lengths == {"task.memory.context_len": "8192,32768,131072"}
    if study == "context_scaling":
        assert lengths == {"task.throughput.prompt_len": "8192,32768,131072,200000,524288,1048576"}
    assert all("," not in smoke[k] for k in lengths)  # one tiny length under smoke
    assert list(cfg.task) == {"memory": ["memory"], "energy": ["idle", "throughput"]}.get(study, ["throughput"])
    assert Path(cfg.hydra.sweep.dir).name.startswith(f"{study}_")  # the W&B group names the study


@pytest.mark.parametrize("name", SETS)
def test_every_plugin_set_composes_into_the_plugins_it_names(name):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["+experiment=memory", f"+experiment/plugins={name}",
                                                       "model=llama3_8b"])
    check_top_level_keys(cfg)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    plugins = resolve_plugins(resolved)  # every name registered, every parameter of the right type
    resolve_tasks(resolved)
    chosen = {kind: p["name"] for kind, p in plugins.items() if not p["default"]}
    text = (CONF / "experiment" / "plugins" / f"{name}.yaml").read_text()
    assert chosen == {kind: n for kind, n in chosen.items() if f"/{kind}: {n}" in text}  # what its defaults list says
    if name == "baseline":
        assert not chosen and all(p["name"] == BASELINES[k] for k, p in plugins.items())
    else:
        assert chosen, f"set {name} chose no plugin"
    assert cfg.model.name == "llama3_8b" and cfg.prefill_chunk == 4096


@pytest.fixture(scope="module")
def memory_sweep(tmp_path_factory):
    """The memory study's smoke sweep with offline W&B runs (no account, no network): its multirun directory.
    `python -m ollm_triton.run` in its own process, forked with its imports done (tests/cli_fork.py)."""
    out = tmp_path_factory.mktemp("studies") / "memory"
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(WANDB_SILENT="true", WANDB_DISABLE_CODE="true")
    proc = run_module("ollm_triton.run", ["-m", "+experiment=memory", "debug=smoke", "logger.mode=offline",
                                          f"hydra.sweep.dir={out}"], env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.mark.slow
def test_memory_study_smoke_runs_into_its_table(memory_sweep):
    out = memory_sweep
    table = study_table(out)
    assert table.attrs["study"] == "memory" and table.attrs["smoke"]
    assert list(table["set"]) == ["baseline", "kv_int4", "kv_snapkv", "prefetch", "all_combined"]
    assert (table.status == "ok").all() and (table.context == 64).all()
    # each row ran its plugins: read back from the runs themselves, not from the table
    runs = load(out).sort_values("run_dir")
    assert list(runs.cache) == ["dense", "int4", "snapkv", "dense", "int4"]
    assert list(runs.prefetch) == ["resident", "resident", "resident", "lookahead", "lookahead"]
    # SnapKV keeps a quarter of 66 tokens (+ its positions and scores); at 66 tokens int4 holds all in its window
    dense_kv = runs["memory/kv_original_bytes"].iloc[0]
    snap = table.set_index("set").loc["kv_snapkv"]
    assert snap.kv_gb_x_baseline == pytest.approx(runs["memory/kv_stored_bytes"].iloc[2] / dense_kv)
    assert 0.2 < snap.kv_gb_x_baseline < 0.5
    assert table.set_index("set").loc["baseline"].kv_gb_x_baseline == 1.0
    lines = markdown_table(table).splitlines()
    assert len(lines) == 2 + len(table) and lines[2].startswith("| baseline | 64 | ok | ")


def _job(sweep: Path, num: int, overrides: list[str], metrics: dict | None = None, error: Exception | None = None,
         plugins: dict[str, str] | None = None):
    """A job directory as the runner leaves it: ok with `metrics` (and the plugins it ran, the rest baselines), or
    failed through the runner's own fail()."""
    run_dir = sweep / str(num)
    run_dir.mkdir(parents=True)
    if error is not None:
        hc = types.SimpleNamespace(overrides=types.SimpleNamespace(task=overrides))
        fail(error, run_dir, hc, 0.0, logger=None, multirun=True, cfg=None)
        return
    ran = {kind: {"name": (plugins or {}).get(kind, base), "params": {}, "default": kind not in (plugins or {})}
           for kind, base in BASELINES.items()}
    write_metrics(run_dir, {"status": "ok", "error": None, "overrides": overrides, "metrics": metrics, "plugins": ran,
                            "smoke": False, "env": {"device_name": "test device"}})


def _does_not_fit() -> Exception:
    """The memory check's own refusal: llama3_8b with a 1M-token dense cache on this machine's host memory."""
    from ollm_triton.engine.footprint import DoesNotFit, check_fits
    from ollm_triton.registry import registry

    arch = OmegaConf.to_container(OmegaConf.load(CONF / "model" / "llama3_8b.yaml").arch)
    try:
        check_fits(arch, dtype="bfloat16", device=torch.device("cpu"), batch=1, context=1 << 20,
                   codec=registry.build("cache", "dense", {}), prefetch=registry.build("prefetch", "resident", {}),
                   prefill_chunk=4096, name="llama3_8b")
    except DoesNotFit as e:
        return e
    pytest.skip("this machine holds llama3_8b with 1M tokens of KV")


def test_study_table_compares_each_set_with_the_baseline_of_its_length(tmp_path):
    sweep = tmp_path / "cs"
    common = ["+experiment=context_scaling", "model=llama3_8b"]

    def over(name, n):
        return [f"+experiment/plugins={name}", f"task.throughput.prompt_len={n}", *common]

    def ok(ttft, tok_s, peak):
        return {"throughput/ttft_s": ttft, "throughput/decode_tok_s": tok_s, "device_peak_allocated_bytes": peak}

    _job(sweep, 0, over("baseline", 8192), ok(2.0, 100.0, 20e9))
    _job(sweep, 1, over("baseline", 1 << 20), error=_does_not_fit())
    _job(sweep, 2, over("kv_int4", 8192), ok(4.0, 50.0, 18e9))
    oom = torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity")
    _job(sweep, 3, over("kv_int4", 1 << 20), error=oom)
    for n in range(4):
        (sweep / str(n) / "metrics.json").read_text()  # the runner's records, as written
    table = study_table(sweep)
    assert table.attrs["study"] == "context_scaling"
    assert list(zip(table["set"], table.context, table.status, strict=True)) == [
        ("baseline", 8192, "ok"), ("baseline", 1 << 20, "does not fit"),
        ("kv_int4", 8192, "ok"), ("kv_int4", 1 << 20, "out of memory")]
    int4 = table.iloc[2]
    assert int4.decode_tok_s_x_baseline == pytest.approx(50 / 100)
    assert int4.ttft_s_x_baseline == pytest.approx(2.0 / 4.0)  # baseline / this: above 1 is faster
    assert int4.peak_gb_x_baseline == pytest.approx(18 / 20) and int4.peak_gb == pytest.approx(18.0)
    assert pd.isna(table.iloc[3].decode_tok_s_x_baseline) and "CUDA out of memory" in table.iloc[3].error
    assert " does not fit: " in table.iloc[1].error and pd.isna(table.iloc[1].peak_gb)
    assert outcome({"status": "failed", "error": "ValueError: bad"}) == "failed"


def test_energy_table_subtracts_idle_power_when_the_monitor_measured_it(tmp_path):
    sweep = tmp_path / "energy"
    base = {"throughput/decode_tok_s": 200.0, "monitor/throughput/tokens": 768, "monitor/throughput/seconds": 4.0,
            "monitor/throughput/energy_j": 1600.0, "monitor/throughput/tokens_per_j": 768 / 1600.0,
            "monitor/idle/power_mean_w": 100.0}
    int4 = {**base, "monitor/throughput/energy_j": 1200.0, "monitor/throughput/tokens_per_j": 768 / 1200.0}
    _job(sweep, 0, ["+experiment=energy", "+experiment/plugins=baseline"], base)
    _job(sweep, 1, ["+experiment=energy", "+cache=int4"], {k: v for k, v in int4.items() if "idle" not in k},
         plugins={"cache": "int4"})
    table = study_table(sweep)
    assert list(table["set"]) == ["baseline", "cache=int4"]  # no named set: the plugins that are not baselines
    assert table.iloc[0].tokens_per_j_above_idle == pytest.approx(768 / (1600.0 - 100.0 * 4.0))
    assert table.iloc[1].tokens_per_j_x_baseline == pytest.approx(1600.0 / 1200.0)
    assert pd.isna(table.iloc[1].tokens_per_j_above_idle)  # idle not measured in that job: not invented
    with pytest.raises(ValueError, match="one study"):
        study_table(load(sweep).assign(overrides="+cache=int4"))
    json.dumps(table.to_dict(orient="records"), default=str)  # a table the notebook and a JSON report can carry


def test_idle_task_times_one_region_the_monitor_summarizes():
    from ollm_triton.monitor import SystemMonitor
    from ollm_triton.registry import PluginError, registry
    from ollm_triton.run import task_monitor_summary
    from ollm_triton.tasks.base import RunContext

    task = registry.build("task", "idle", {"seconds": 0.5})
    cpu = torch.device("cpu")
    with SystemMonitor(50, cpu) as monitor:
        ctx = RunContext(engine=None, decoder=None, device=cpu, monitor=monitor)
        t0 = time.perf_counter()
        out = task.run(ctx)
        t1 = time.perf_counter()
    assert len(ctx.regions) == 1 and 0.5 <= out["seconds"] <= t1 - t0 and out["monitored"] == 1
    summary = task_monitor_summary(monitor, ctx.regions, t0, t1)
    assert summary["seconds"] == pytest.approx(out["seconds"]) and summary["samples"] >= 10  # 50 Hz over 0.5 s
    assert summary["tokens"] == 0 and "rss_peak_bytes" in summary
    smoke = task.run(RunContext(engine=None, decoder=None, device=cpu, smoke=True))
    assert smoke["seconds"] < 0.5 and smoke["monitored"] == 0
    with pytest.raises((PluginError, ValueError), match="seconds"):
        registry.config("task", "idle", {"seconds": 0})


@pytest.mark.slow
def test_offline_wandb_runs_agree_with_results_load(memory_sweep, tmp_path, capsys):
    pytest.importorskip("wandb")
    check = _script("check_wandb")
    assert check.main([str(memory_sweep), "--out", str(tmp_path / "check.json")]) == 0
    result = json.loads((tmp_path / "check.json").read_text())
    assert [j["set"] for j in result["jobs"]] == ["baseline", "kv_int4", "kv_snapkv", "prefetch", "all_combined"]
    assert {j["group"] for j in result["jobs"]} == {"memory"}  # one W&B group per sweep: the sweep directory's name
    assert "cache:snapkv" in result["jobs"][2]["tags"] and "prefetch:lookahead" in result["jobs"][4]["tags"]
    assert all(j["compared"] >= 10 for j in result["jobs"])
    # a metrics.json that no longer says what W&B recorded is caught
    tampered = tmp_path / "memory"
    shutil.copytree(memory_sweep, tampered)
    record = json.loads((tampered / "2" / "metrics.json").read_text())
    record["metrics"]["memory/kv_stored_bytes"] += 1
    write_metrics(tampered / "2", record)
    capsys.readouterr()
    assert check.main([str(tampered)]) == 1
    printed = capsys.readouterr().out
    assert "memory/kv_stored_bytes: row" in printed and "4 of 5 job(s) agree" in printed
    # a failed job (the runner finishes its W&B run with exit code 1 and logs nothing) agrees; exit code 0 does not
    failed = {"status": "failed", "overrides": "+experiment/plugins=kv_int4", "cache": "int4"}
    run = {"group": "g", "tags": ["cache:int4"], "name": "x-experiment/plugins=kv_int4", "summary": {}, "exit_code": 1}
    assert check.check_job(failed, run, "g", ("cache",), ["memory/kv_stored_bytes"]) == ([], 0)
    assert "exit code 0" in check.check_job(failed, {**run, "exit_code": 0}, "g", ("cache",), [])[0][0]


def _script(name: str):
    """scripts/<name>.py as a module."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_sweep_over_two_models_compares_each_with_its_own_baseline(tmp_path):
    sweep = tmp_path / "throughput"
    for num, (model, name, tok_s) in enumerate([("llama3_8b", "baseline", 200.0), ("llama3_8b", "kv_int4", 150.0),
                                                 ("qwen3_8b", "baseline", 100.0), ("qwen3_8b", "kv_int4", 90.0)]):
        _job(sweep, num, ["+experiment=throughput", f"+experiment/plugins={name}", f"model={model}"],
             {"throughput/decode_tok_s": tok_s, "throughput/ttft_s": 1.0})
    table = study_table(sweep)
    assert list(table.model) == ["llama3_8b", "llama3_8b", "qwen3_8b", "qwen3_8b"]
    assert list(table.decode_tok_s_x_baseline) == pytest.approx([1.0, 0.75, 1.0, 0.9])
    runs = load(sweep)
    one = study_table(runs[runs.overrides.str.contains("model=llama3_8b")])
    assert "model" not in one and one.attrs["model"] == "llama3_8b"
