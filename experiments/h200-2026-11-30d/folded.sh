#!/usr/bin/env bash
# Device call 7 of session 2026-11-30d: the residual tail folded into the MMA launch: ncu (int4, 128k), the sweep over
# step sizes (CUDA graphs, SDPA beside), then the quant, merge and cache GPU tests.
# Carry .whl and .whl_kv. Usage: OLLM_GIT_SHA=<sha> bash experiments/h200-2026-11-30d/folded.sh
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl .whl_kv/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 PYTEST_DISABLE_PLUGIN_AUTOLOAD=1
t0=$(date +%s); stamp() { echo "== $1 ($(( $(date +%s) - t0 )) s)"; }
stamp "ncu int4"
timeout 200 ncu --clock-control none --kernel-name regex:"decode|merge" --launch-skip 3 --launch-count 3 \
  --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats --section SchedulerStats \
  --section SourceCounters python3 experiments/profile/decode_profile.py run int4 > $OUT/ncu_int4.txt 2>&1
grep -E "^  _|Duration|Registers Per|Achieved Occupancy|Issue Slots Busy|No Eligible|DRAM Throughput|Warp Cycles Per Issued|Block Limit Reg|Grid Size" $OUT/ncu_int4.txt | head -40
stamp "decode sweep"
timeout 200 python3 experiments/profile/decode_profile.py sweep --quant-only > $OUT/decode_sweep.jsonl 2> $OUT/decode_sweep.err; cut -c1-170 $OUT/decode_sweep.jsonl; tail -n 3 $OUT/decode_sweep.err
stamp "gpu tests"
timeout 280 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_kernels_quant_mma.py tests/test_kernels_quant.py tests/test_cache_quant.py tests/test_decode_merge.py > $OUT/gpu_tests.log 2>&1; tail -n 5 $OUT/gpu_tests.log | cut -c1-300
stamp done
