"""scripts/bench_kv_capacity.py --small: the search brackets the largest context that fits a (pretend) device.

One decode step per trial (--steps 1; the script's default 4 is for the GPU run): a trial's fit is decided on the
bytes the cache stores before decoding (the --small limit), and one step already runs every layer's codec decode
path over all N tokens, which is what the steps are there to exercise; the three more cost ~25 s here. The script
runs forked with its imports done (tests/cli_fork.py)."""

import json
from pathlib import Path

import pytest
from cli_fork import run_script

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_capacity_search_brackets_the_limit(tmp_path):
    proc = run_script(REPO / "scripts" / "bench_kv_capacity.py", ["--small", "--steps", "1", "--out", str(tmp_path)],
                      timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]
    record = json.loads((tmp_path / "bench_kv_capacity.json").read_text())
    assert record["meta"]["steps"] == 1
    res = record["meta"]["resolution"]
    found = {}
    for name, r in record["codecs"].items():
        best, trials = r["max_tokens"], r["trials"]
        fits = {t["tokens"] for t in trials if t["fits"]}
        fails = {t["tokens"] for t in trials if not t["fits"]}
        assert best in fits and best == max(fits), name
        # something just above it did not fit: the answer is the limit, not a guess below it
        assert min(n for n in fails if n > best) <= best * (1 + res) + 128, (name, sorted(fails))
        limit, weights = 8 * 2**20, r["weights_gb"] * 1e9
        stored = next(t["kv_stored_gb"] for t in trials if t["tokens"] == best) * 1e9
        assert stored + weights <= limit, name
        if name == "dense":  # exact arithmetic: 2 layers x K,V x 2 heads x 32 dims x 4 bytes per token
            assert r["bytes_per_token"] == 1024
            assert (limit - weights) / 1024 * (1 - res) <= best <= (limit - weights) / 1024
        found[name] = best
    assert found["dense"] < found["int4"] < found["int2"]
