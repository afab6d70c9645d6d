#!/usr/bin/env bash
# Device call 5 of session 2026-11-30b: GPU tests, the decode step's kernel profile after the small-kernel fixes
# (two-pass argmax, loads before stores in RMSNorm and RoPE, single-block varlen splits), the batch-1 matmul
# three ways, and the fast-path decode row. Carry .whl and .whl_kv.
# Usage: OLLM_GIT_SHA=<sha> bash experiments/h200-2026-11-30b/final2.sh
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl .whl_kv/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 PYTEST_DISABLE_PLUGIN_AUTOLOAD=1
t0=$(date +%s); stamp() { echo "== $1 ($(( $(date +%s) - t0 )) s)"; }
stamp "gpu tests"
timeout 170 python3 -m pytest -q -p no:cacheprovider -m gpu tests/ > $OUT/gpu_tests.log 2>&1; tail -n 8 $OUT/gpu_tests.log
timeout 60 python3 -m pytest -q -p no:cacheprovider tests/test_fast_decode.py -k argmax > $OUT/argmax_tests.log 2>&1; tail -n 2 $OUT/argmax_tests.log
stamp "step profile"
timeout 120 python3 experiments/profile/fast_step_profile.py 2> $OUT/step_profile.err | head -n 24 > $OUT/step_profile.txt; cat $OUT/step_profile.txt; tail -n 3 $OUT/step_profile.err
stamp "gemv"
timeout 60 python3 experiments/profile/fast_step_profile.py --gemv > $OUT/gemv.txt 2>&1; cat $OUT/gemv.txt
stamp "bench_fast_path decode"
rem=$(( 540 - ($(date +%s) - t0) ))
timeout $rem python3 scripts/bench_fast_path.py --only decode --budget $(( rem - 20 )) --reserve 0 --out $OUT/bench_fast_path.json > $OUT/bench_fast_path.log 2>&1
tail -n 8 $OUT/bench_fast_path.log
stamp done
