#!/usr/bin/env bash
# Device call 2 of session 2026-11-30b: the GPU tests after the in-kernel split merge, the decode launch sweep,
# then the attention benchmark (issue 4's table) at the new defaults. Carry .whl and .whl_kv.
# Usage: OLLM_GIT_SHA=<sha> bash experiments/h200-2026-11-30b/merge.sh
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl .whl_kv/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 PYTEST_DISABLE_PLUGIN_AUTOLOAD=1
t0=$(date +%s); stamp() { echo "== $1 ($(( $(date +%s) - t0 )) s)"; }
stamp "gpu tests"
timeout 170 python3 -m pytest -q -p no:cacheprovider -m gpu tests/ > $OUT/gpu_tests.log 2>&1; tail -n 8 $OUT/gpu_tests.log
stamp "sweep"
timeout 170 python3 experiments/profile/decode_profile.py sweep > $OUT/decode_sweep.jsonl 2> $OUT/decode_sweep.err; tail -n 3 $OUT/decode_sweep.err
stamp "bench_attention"
rem=$(( 570 - ($(date +%s) - t0) ))
timeout $rem python3 scripts/bench_attention.py --budget-s $(( rem - 90 )) --out $OUT/bench_attention.json > $OUT/bench_attention.log 2>&1
tail -n 30 $OUT/bench_attention.log
stamp done
