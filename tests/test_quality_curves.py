"""ollm_triton/quality_curves.py: each run's place on the quality-vs-compression axis (an eviction ratio, a
quantizer's bits over 16, a window over the longest context measured, a sparse density), the tables and the plot,
from multirun folders laid out as `python -m ollm_triton.run -m` writes them."""

import json
from pathlib import Path

import pytest

import ollm_triton.quality_curves as Q


def job(root: Path, sweep: str, i: int, kind: str, name: str, params: dict, ppl: float, passkey: float,
        multikey: float) -> None:
    d = root / sweep / str(i)
    d.mkdir(parents=True)
    other = "attention" if kind == "cache" else "cache"
    plugins = {kind: {"name": name, "params": params}, other: {"name": "dense" if other == "cache" else "sdpa",
                                                                 "params": {}}}
    metrics = {"perplexity/ppl": ppl, "passkey/acc": passkey, "passkey/acc@8192": passkey,
               "passkey/acc@16384": passkey, "multikey/acc": multikey, "multikey/acc@16384": multikey}
    (d / "metrics.json").write_text(json.dumps({"status": "ok", "plugins": plugins, "metrics": metrics}))


@pytest.fixture
def root(tmp_path):
    job(tmp_path, "cache_quant", 0, "cache", "dense", {}, 4.0, 1.0, 0.9)
    job(tmp_path, "cache_quant", 1, "cache", "int4", {"residual": 128}, 4.04, 1.0, 0.9)
    job(tmp_path, "cache_quant", 2, "cache", "cluster", {"num_clusters": 256}, 5.0, 0.5, 0.1)
    job(tmp_path, "cache_evict", 0, "cache", "snapkv", {"ratio": 0.25}, 4.4, 0.5, 0.2)
    job(tmp_path, "attention_window", 0, "attention", "sliding_window", {"window": 4096, "sink": 4}, 4.2, 0.0, 0.0)
    job(tmp_path, "attention_sparse", 0, "attention", "sparse", {"pattern": "local", "density": 0.5}, 4.8, 0.0, 0.0)
    return tmp_path


def test_points_place_each_run_on_the_kept_fraction_axis(root):
    points, context = Q.curve_points(root)
    assert context == 16384  # the longest retrieval length measured: a window's denominator
    got = {(p["method"], p["kept"]): p for p in points}
    assert set(got) == {("dense", 1.0), ("quantization (int8 / int4 / int2)", 0.25), ("snapkv", 0.25),
                        ("sliding window (sink 4)", 0.25), ("sparse local", 0.5)}  # cluster has no such axis
    assert got[("snapkv", 0.25)]["dppl"] == pytest.approx(10.0)  # against the dense run's 4.0
    assert got[("quantization (int8 / int4 / int2)", 0.25)]["dppl"] == pytest.approx(1.0)
    assert got[("sliding window (sink 4)", 0.25)]["multikey"] == 0.0


def test_tables_and_plot(root, tmp_path):
    text = Q.tables(root)
    assert "| snapkv | 0.25 | 4.400 | +10.00% |" in text and "### attention_sparse" in text
    out = tmp_path / "curves.png"
    Q.plot(root, out)
    assert out.stat().st_size > 10_000 and out.read_bytes()[:4] == b"\x89PNG"


def test_a_folder_without_sweeps_is_one_line_and_a_failure(tmp_path):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "ollm_triton.quality_curves", str(tmp_path)], capture_output=True,
                          text=True)
    assert proc.returncode != 0 and proc.stdout == ""
    assert proc.stderr.strip().count("\n") == 0 and "none of attention_dense" in proc.stderr
