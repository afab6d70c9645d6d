"""scripts/bench_engine.py --codec-steps runs end to end on the CPU (--small): the filled-cache decode rows through the
engine's static step, each with its attention checked against the reference, and --codecs picking rows (the 1M-token
moonshot runs int4 alone: dense KV at 1M is 128 GB)."""

import json
from pathlib import Path

from cli_fork import run_script

REPO = Path(__file__).resolve().parents[1]


def test_codec_steps_small_rows_and_codec_subset(tmp_path):
    out = tmp_path / "steps.json"
    proc = run_script(REPO / "scripts" / "bench_engine.py",
                      ["--codec-steps", "--small", "--codecs", "int4", "--no-kernel-rows", "--out", str(out)],
                      timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]
    record = json.loads(out.read_text())
    rows = record["results"]
    assert [(r["impl"], r["context"]) for r in rows] == [("int4", 300), ("int4", 700)]
    for r in rows:
        assert r["decode_tok_s"] > 0 and r["attention_rel_error"] < 1e-5, r
        assert r["kv_bytes_per_step"] > 0
    assert record["attention_kernels"] == []
    table = [ln for ln in proc.stdout.splitlines() if ln.startswith("| int4 |")]
    assert len(table) == 2 and all("| - |" in ln for ln in table)  # no dense row: no speed against it


def test_codec_steps_rejects_an_unknown_row():
    proc = run_script(REPO / "scripts" / "bench_engine.py", ["--codec-steps", "--small", "--codecs", "int3"],
                      timeout=120)
    assert proc.returncode == 2 and "invalid choice: 'int3'" in proc.stderr
