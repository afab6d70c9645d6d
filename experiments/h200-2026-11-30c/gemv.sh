#!/usr/bin/env bash
# Device call 5 of session 2026-11-30c: the one-shot GEMV in the fast decode step. Its GPU tests and those of the
# fast paths, the fast-path decode row, the step profile.
# Carry .whl and .whl_kv. Usage: OLLM_GIT_SHA=<sha> bash experiments/h200-2026-11-30c/gemv.sh
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl .whl_kv/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 PYTEST_DISABLE_PLUGIN_AUTOLOAD=1
t0=$(date +%s); stamp() { echo "== $1 ($(( $(date +%s) - t0 )) s)"; }
stamp "gpu tests"
timeout 120 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_kernels_gemv.py tests/test_fast_decode.py tests/test_batched.py tests/test_speculative.py > $OUT/gpu_tests.log 2>&1; tail -n 4 $OUT/gpu_tests.log
stamp "bench_fast_path decode"
timeout 120 python3 scripts/bench_fast_path.py --only decode --budget 110 --reserve 0 --out $OUT/bench_fast_path.json > $OUT/bench_fast_path.log 2>&1; tail -n 7 $OUT/bench_fast_path.log
stamp "step profile"
timeout 80 python3 experiments/profile/fast_step_profile.py 2> $OUT/step_profile.err | head -n 16 > $OUT/step_profile.txt; cat $OUT/step_profile.txt; tail -n 2 $OUT/step_profile.err
stamp done
