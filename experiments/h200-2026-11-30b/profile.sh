#!/usr/bin/env bash
# Device call 1 of session 2026-11-30b: every GPU test (first run of the decode_varlen/emit_step/schema commits on
# the H200), then the decode kernels' launch-config sweep and an ncu profile of the int4 fused decode at 128k and
# of the dense flash decode at 32k. Carry .whl and .whl_kv.
# Usage: OLLM_GIT_SHA=<sha> bash experiments/h200-2026-11-30b/profile.sh
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl .whl_kv/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 PYTEST_DISABLE_PLUGIN_AUTOLOAD=1
t0=$(date +%s); stamp() { echo "== $1 ($(( $(date +%s) - t0 )) s)"; }
stamp "gpu tests"
timeout 150 python3 -m pytest -q -p no:cacheprovider -m gpu tests/ > $OUT/gpu_tests.log 2>&1; tail -n 6 $OUT/gpu_tests.log
stamp "sweep"
timeout 200 python3 experiments/profile/decode_profile.py sweep > $OUT/decode_sweep.jsonl 2> $OUT/decode_sweep.err; tail -n 3 $OUT/decode_sweep.err
stamp "ncu int4"
S="--section SpeedOfLight --section WarpStateStats --section MemoryWorkloadAnalysis --section Occupancy --section LaunchStats --section SchedulerStats --section ComputeWorkloadAnalysis"
timeout 90 ncu --clock-control none --kernel-name regex:'quant_decode|merge' --launch-skip 4 --launch-count 2 $S \
  python3 experiments/profile/decode_profile.py run int4 > $OUT/ncu_int4.txt 2>&1; tail -n 3 $OUT/ncu_int4.txt
stamp "ncu dense"
timeout 60 ncu --clock-control none --kernel-name regex:'attn_decode' --launch-skip 4 --launch-count 2 $S \
  python3 experiments/profile/decode_profile.py run dense > $OUT/ncu_dense.txt 2>&1; tail -n 3 $OUT/ncu_dense.txt
stamp done
