#!/usr/bin/env bash
# Device call 8 of session 2026-11-30c: all GPU tests at the final code (fast_path_matmul in metrics), and the quant
# decode sweep at the final defaults (int8 with the 168-register cap and 3 programs an SM, untried so far).
# Carry .whl and .whl_kv. Usage: OLLM_GIT_SHA=<sha> bash experiments/h200-2026-11-30c/last.sh
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl .whl_kv/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 PYTEST_DISABLE_PLUGIN_AUTOLOAD=1
t0=$(date +%s); stamp() { echo "== $1 ($(( $(date +%s) - t0 )) s)"; }
stamp "gpu tests"
timeout 130 python3 -m pytest -q -p no:cacheprovider -m gpu tests/ > $OUT/gpu_tests.log 2>&1; tail -n 4 $OUT/gpu_tests.log
stamp "sweep"
timeout 120 python3 experiments/profile/decode_profile.py sweep --quant-only > $OUT/decode_sweep.jsonl 2> $OUT/decode_sweep.err; tail -n 2 $OUT/decode_sweep.err
python3 -c "
import json
for l in open('$OUT/decode_sweep.jsonl'):
    r=json.loads(l); print({k: (round(v,1) if isinstance(v,float) and k=='us' else v) for k,v in r.items() if k not in ('err','TBps')})
"
stamp done
