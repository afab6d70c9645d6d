#!/usr/bin/env bash
# Device call 4 of session 2026-11-30b: GPU tests with the separate merge kernel back, the decode sweep, the
# attention and KV-codec benchmarks (issues 4 and 5), and the decode step's kernel profile (issue 8).
# Carry .whl and .whl_kv. Usage: OLLM_GIT_SHA=<sha> bash experiments/h200-2026-11-30b/final1.sh
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl .whl_kv/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 PYTEST_DISABLE_PLUGIN_AUTOLOAD=1
t0=$(date +%s); stamp() { echo "== $1 ($(( $(date +%s) - t0 )) s)"; }
stamp "gpu tests"
timeout 170 python3 -m pytest -q -p no:cacheprovider -m gpu tests/ > $OUT/gpu_tests.log 2>&1; tail -n 8 $OUT/gpu_tests.log
stamp "step profile"
timeout 120 python3 experiments/profile/fast_step_profile.py > $OUT/step_profile.txt 2> $OUT/step_profile.err; head -n 30 $OUT/step_profile.txt; tail -n 3 $OUT/step_profile.err
stamp "sweep"
timeout 120 python3 experiments/profile/decode_profile.py sweep > $OUT/decode_sweep.jsonl 2> $OUT/decode_sweep.err; tail -n 3 $OUT/decode_sweep.err
stamp "bench_attention"
timeout 120 python3 scripts/bench_attention.py --out $OUT/bench_attention.json > $OUT/bench_attention.log 2>&1; grep "decode b=" $OUT/bench_attention.log | tail -n 4
stamp "bench_kv_cache"
timeout 100 python3 scripts/bench_kv_cache.py --out $OUT/bench_kv_cache.json > $OUT/bench_kv_cache.log 2>&1; tail -n 22 $OUT/bench_kv_cache.log | head -8
stamp done
