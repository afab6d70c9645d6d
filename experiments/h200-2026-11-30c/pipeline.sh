#!/usr/bin/env bash
# Device call 3 of session 2026-11-30c: the fused quant decode with the hand-pipelined loop and 3 stages:
# its GPU tests and the launch sweep (quantized codecs only).
# Carry .whl and .whl_kv. Usage: OLLM_GIT_SHA=<sha> bash experiments/h200-2026-11-30c/quant.sh
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl .whl_kv/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 PYTEST_DISABLE_PLUGIN_AUTOLOAD=1
t0=$(date +%s); stamp() { echo "== $1 ($(( $(date +%s) - t0 )) s)"; }
stamp "gpu tests (quant)"
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_kernels_quant.py tests/test_cache_quant.py > $OUT/gpu_tests.log 2>&1; tail -n 6 $OUT/gpu_tests.log
stamp "sweep"
timeout 200 python3 experiments/profile/decode_profile.py sweep --quant-only > $OUT/decode_sweep.jsonl 2> $OUT/decode_sweep.err; tail -n 3 $OUT/decode_sweep.err
python3 -c "
import json
for l in open('$OUT/decode_sweep.jsonl'):
    r=json.loads(l); print({k: (round(v,1) if isinstance(v,float) and k=='us' else v) for k,v in r.items() if k!='err'}, 'err=%.1e' % r['err'] if 'err' in r else '')
"
stamp done
