#!/usr/bin/env bash
# Device call 6 of session 2026-11-30c (the last): all GPU tests, the fast-path table (decode, 32k, batch; no
# torch.compile baseline), the step profile, and the KV-codec benchmark.
# Carry .whl and .whl_kv. Usage: OLLM_GIT_SHA=<sha> bash experiments/h200-2026-11-30c/final.sh
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl .whl_kv/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 PYTEST_DISABLE_PLUGIN_AUTOLOAD=1
t0=$(date +%s); stamp() { echo "== $1 ($(( $(date +%s) - t0 )) s)"; }
stamp "gpu tests"
timeout 150 python3 -m pytest -q -p no:cacheprovider -m gpu tests/ > $OUT/gpu_tests.log 2>&1; tail -n 4 $OUT/gpu_tests.log
stamp "step profile"
timeout 80 python3 experiments/profile/fast_step_profile.py 2> /dev/null | head -n 14 > $OUT/step_profile.txt; cat $OUT/step_profile.txt
stamp "bench_kv_cache"
timeout 100 python3 scripts/bench_kv_cache.py --out $OUT/bench_kv_cache.json > $OUT/bench_kv_cache.log 2>&1; tail -n 22 $OUT/bench_kv_cache.log | head -8
stamp "bench_fast_path decode long batch"
rem=$(( 520 - ($(date +%s) - t0) ))
timeout $rem python3 scripts/bench_fast_path.py --only decode long batch --no-compile --budget $(( rem - 15 )) --reserve 0 --out $OUT/bench_fast_path.json > $OUT/bench_fast_path.log 2>&1
tail -n 13 $OUT/bench_fast_path.log
stamp done
