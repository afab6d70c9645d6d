#!/usr/bin/env bash
# Device call 9 of session 2026-11-30d: every GPU test at the final kernel code, then the committed kv_cache table
# (scripts/bench_kv_cache.py: SDPA, the MMA kernel and the Triton-language kernel side by side, CUDA-graph times).
# Carry .whl and .whl_kv. Usage: OLLM_GIT_SHA=<sha> bash experiments/h200-2026-11-30d/final.sh
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl .whl_kv/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 PYTEST_DISABLE_PLUGIN_AUTOLOAD=1
t0=$(date +%s); stamp() { echo "== $1 ($(( $(date +%s) - t0 )) s)"; }
stamp "bench_kv_cache"
timeout 200 python3 scripts/bench_kv_cache.py --out $OUT/bench_kv_cache.json > $OUT/bench_kv_cache.log 2>&1; tail -n 30 $OUT/bench_kv_cache.log | cut -c1-220
stamp "gpu tests"
timeout 250 python3 -m pytest -q -p no:cacheprovider -m gpu tests/ > $OUT/gpu_tests.log 2>&1; tail -n 6 $OUT/gpu_tests.log | cut -c1-300
stamp done
