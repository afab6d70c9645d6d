#!/usr/bin/env bash
# Device call 9 of session 2026-11-30c: the piecewise step (segments captured, attention eager between them) for
# plugins the whole graph cannot hold: its GPU tests and the fast decode's, then the 32k rows (dense graph, dense
# eager, int4 through auto = piecewise, transformers eager).
# Carry .whl and .whl_kv. Usage: OLLM_GIT_SHA=<sha> bash experiments/h200-2026-11-30c/piecewise.sh
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl .whl_kv/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 PYTEST_DISABLE_PLUGIN_AUTOLOAD=1
t0=$(date +%s); stamp() { echo "== $1 ($(( $(date +%s) - t0 )) s)"; }
stamp "gpu tests"
timeout 70 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_fast_decode.py tests/test_batched.py > $OUT/gpu_tests.log 2>&1; tail -n 4 $OUT/gpu_tests.log
stamp "bench_fast_path long"
timeout 120 python3 scripts/bench_fast_path.py --only long --budget 110 --reserve 0 --out $OUT/bench_fast_path.json > $OUT/bench_fast_path.log 2>&1; tail -n 7 $OUT/bench_fast_path.log
stamp done
