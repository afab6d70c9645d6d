#!/usr/bin/env bash
# Device calls 2-3 of session 2026-11-30d: the Gluon MMA decode over packed codes (kernels/kv_quant_decode_mma.py):
# its GPU tests and the quantized-cache tests, then the quant decode sweep at 128k (CUDA-graph times, SDPA beside).
# Carry .whl and .whl_kv. Usage: OLLM_GIT_SHA=<sha> bash experiments/h200-2026-11-30d/mma.sh
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl .whl_kv/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 PYTEST_DISABLE_PLUGIN_AUTOLOAD=1
t0=$(date +%s); stamp() { echo "== $1 ($(( $(date +%s) - t0 )) s)"; }
stamp "gpu tests"
timeout 300 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_kernels_quant_mma.py tests/test_kernels_quant.py tests/test_cache_quant.py > $OUT/gpu_tests.log 2>&1; tail -n 30 $OUT/gpu_tests.log | cut -c1-300
stamp "decode sweep"
timeout 200 python3 experiments/profile/decode_profile.py sweep --quant-only > $OUT/decode_sweep.jsonl 2> $OUT/decode_sweep.err; cat $OUT/decode_sweep.jsonl; tail -n 5 $OUT/decode_sweep.err
stamp done
