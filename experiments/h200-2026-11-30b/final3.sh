#!/usr/bin/env bash
# Device call 6 of session 2026-11-30b (last): GPU tests at the final kernel code (decode default 3 stages), the
# attention benchmark (issue 4's table), and the fast-path rows decode / 32k / batch (issue 8's table).
# Carry .whl and .whl_kv. Usage: OLLM_GIT_SHA=<sha> bash experiments/h200-2026-11-30b/final3.sh
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl .whl_kv/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 PYTEST_DISABLE_PLUGIN_AUTOLOAD=1
t0=$(date +%s); stamp() { echo "== $1 ($(( $(date +%s) - t0 )) s)"; }
stamp "gpu tests"
timeout 150 python3 -m pytest -q -p no:cacheprovider -m gpu tests/ > $OUT/gpu_tests.log 2>&1; tail -n 4 $OUT/gpu_tests.log
stamp "bench_attention"
timeout 110 python3 scripts/bench_attention.py --out $OUT/bench_attention.json > $OUT/bench_attention.log 2>&1; grep "decode b=" $OUT/bench_attention.log | tail -n 4
stamp "bench_fast_path decode long batch"
rem=$(( 400 - ($(date +%s) - t0) ))
timeout $rem python3 scripts/bench_fast_path.py --only decode long batch --no-compile --budget $(( rem - 15 )) --reserve 0 --out $OUT/bench_fast_path.json > $OUT/bench_fast_path.log 2>&1
tail -n 12 $OUT/bench_fast_path.log
stamp done
