#!/usr/bin/env bash
# Device call 7 of session 2026-11-30b (last, ~270 s of device time left): the Triton GEMV for the attention
# projections, picked per shape against cuBLAS by timing. Its GPU tests and the fast decode's, the fast-path decode
# row, then the step profile. Carry .whl and .whl_kv. Usage: OLLM_GIT_SHA=<sha> bash experiments/h200-2026-11-30b/gemv.sh
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl .whl_kv/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 PYTEST_DISABLE_PLUGIN_AUTOLOAD=1
t0=$(date +%s); stamp() { echo "== $1 ($(( $(date +%s) - t0 )) s)"; }
stamp "gpu tests"
timeout 60 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_kernels_gemv.py tests/test_fast_decode.py tests/test_batched.py > $OUT/gpu_tests.log 2>&1; tail -n 4 $OUT/gpu_tests.log
stamp "bench_fast_path decode"
timeout 110 python3 scripts/bench_fast_path.py --only decode --budget 100 --reserve 0 --out $OUT/bench_fast_path.json > $OUT/bench_fast_path.log 2>&1
tail -n 7 $OUT/bench_fast_path.log; grep -o '"fast_path_matmuls": {[^}]*}' $OUT/bench_fast_path.json | head -2
stamp "step profile"
timeout 80 python3 experiments/profile/fast_step_profile.py 2> $OUT/step_profile.err | head -n 14 > $OUT/step_profile.txt; cat $OUT/step_profile.txt
stamp done
