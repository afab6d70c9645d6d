#!/usr/bin/env bash
# Device call 4 of session 2026-11-30d: ncu of the MMA decode at 128k keys (int4; its residual-tail kernel and the
# merge beside it), then the sweep again at the occupancy-derived default launch.
# Carry .whl and .whl_kv. Usage: OLLM_GIT_SHA=<sha> bash experiments/h200-2026-11-30d/profile.sh
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl .whl_kv/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 PYTEST_DISABLE_PLUGIN_AUTOLOAD=1
t0=$(date +%s); stamp() { echo "== $1 ($(( $(date +%s) - t0 )) s)"; }
stamp "ncu int4"
timeout 200 ncu --clock-control none --kernel-name regex:"decode|merge" --launch-skip 3 --launch-count 3 \
  --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats --section SchedulerStats \
  python3 experiments/profile/decode_profile.py run int4 > $OUT/ncu_int4.txt 2>&1
grep -E "_kernel|Duration|Registers Per|Achieved Occupancy|Theoretical Occupancy|Issue Slots Busy|No Eligible|DRAM Throughput|Memory Throughput|Warp Cycles Per Issued|Stall|Block Limit Reg|Grid Size|Waves Per SM" $OUT/ncu_int4.txt | head -60
stamp "decode sweep"
timeout 200 python3 experiments/profile/decode_profile.py sweep --quant-only > $OUT/decode_sweep.jsonl 2> $OUT/decode_sweep.err; cat $OUT/decode_sweep.jsonl | cut -c1-200; tail -n 3 $OUT/decode_sweep.err
stamp done
