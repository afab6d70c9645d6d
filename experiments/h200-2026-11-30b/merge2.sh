#!/usr/bin/env bash
# Device call 3 of session 2026-11-30b: GPU tests after the row-parallel merge and the int4/int2 register cap,
# the decode sweep, the KV-codec benchmark (issue 5's decode table) and the fast-path decode row (issue 8).
# Carry .whl and .whl_kv. Usage: OLLM_GIT_SHA=<sha> bash experiments/h200-2026-11-30b/merge2.sh
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl .whl_kv/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 PYTEST_DISABLE_PLUGIN_AUTOLOAD=1
t0=$(date +%s); stamp() { echo "== $1 ($(( $(date +%s) - t0 )) s)"; }
stamp "gpu tests"
timeout 170 python3 -m pytest -q -p no:cacheprovider -m gpu tests/ > $OUT/gpu_tests.log 2>&1; tail -n 8 $OUT/gpu_tests.log
stamp "sweep"
timeout 150 python3 experiments/profile/decode_profile.py sweep > $OUT/decode_sweep.jsonl 2> $OUT/decode_sweep.err; tail -n 3 $OUT/decode_sweep.err
stamp "bench_kv_cache"
timeout 120 python3 scripts/bench_kv_cache.py --out $OUT/bench_kv_cache.json > $OUT/bench_kv_cache.log 2>&1; tail -n 22 $OUT/bench_kv_cache.log
stamp "bench_fast_path decode"
rem=$(( 570 - ($(date +%s) - t0) ))
timeout $rem python3 scripts/bench_fast_path.py --only decode --budget $(( rem - 20 )) --reserve 0 --out $OUT/bench_fast_path.json > $OUT/bench_fast_path.log 2>&1
tail -n 14 $OUT/bench_fast_path.log
stamp done
