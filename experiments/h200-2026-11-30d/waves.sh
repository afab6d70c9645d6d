#!/usr/bin/env bash
# Device call 8 of session 2026-11-30d: the MMA decode sized to one wave at the per-scheduler register limit, the
# residual programs counted in it: the sweep over step sizes and register caps (CUDA graphs, SDPA beside), then the
# MMA kernel's GPU tests. Carry .whl and .whl_kv. Usage: OLLM_GIT_SHA=<sha> bash experiments/h200-2026-11-30d/waves.sh
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl .whl_kv/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 PYTEST_DISABLE_PLUGIN_AUTOLOAD=1
t0=$(date +%s); stamp() { echo "== $1 ($(( $(date +%s) - t0 )) s)"; }
stamp "decode sweep"
timeout 200 python3 experiments/profile/decode_profile.py sweep --quant-only > $OUT/decode_sweep.jsonl 2> $OUT/decode_sweep.err; cut -c1-170 $OUT/decode_sweep.jsonl; tail -n 3 $OUT/decode_sweep.err
stamp "gpu tests"
timeout 250 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_kernels_quant_mma.py > $OUT/gpu_tests.log 2>&1; tail -n 5 $OUT/gpu_tests.log | cut -c1-300
stamp done
