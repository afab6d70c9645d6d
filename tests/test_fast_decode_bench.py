"""scripts/bench_fast_path.py runs end to end on the CPU (--small): every section, the compile worker included. The
script runs forked with its imports done (tests/cli_fork.py); its compile worker is a real interpreter start."""

import json
from pathlib import Path

import pytest
from cli_fork import run_script

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_bench_fast_path_small_runs_every_section(tmp_path):
    out = tmp_path / "fast.json"
    proc = run_script(REPO / "scripts" / "bench_fast_path.py", ["--small", "--repeats", "1", "--out", str(out)],
                      timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]
    record = json.loads(out.read_text())
    for key in ("command", "date", "device", "torch", "triton", "transformers", "git_sha"):
        assert record[key], key
    sections = record["sections"]
    assert set(sections) == {"bandwidth", "decode", "long", "codec_contexts", "prefill", "ttft", "batch",
                             "hf_static_compile"}
    failed = {k: v.get("error") for k, v in sections.items() if "error" in v or "skipped" in v}
    assert not failed, failed
    assert sections["hf_static_compile"]["ok"], sections["hf_static_compile"]
    decode = sections["decode"]
    assert decode["engine_graph"]["fast_path"] == "static" and decode["engine_eager"]["fast_path"].startswith("eager")
    assert decode["graph_vs_eager_step_logits_rel_l2"] < 1e-5  # fp32: the static step equals the eager forward
    assert sections["long"]["engine_int4"]["fast_path"].startswith("eager (")  # auto on the CPU
    assert sections["long"]["int4_kv_ratio"] == 1.0  # 162 tokens: all still in int4's full-precision window
    assert set(sections["codec_contexts"]["160"]) == {"dense", "int8", "int4", "int4_piecewise", "int4_over_dense"}
    assert sections["ttft"]["ttft_s"] > 0 and len(record["table"]) == 22
    # the GitHub table is printed last
    lines = proc.stdout.strip().splitlines()
    assert lines[-23].startswith("| --- |") and lines[-1].startswith("| ")
