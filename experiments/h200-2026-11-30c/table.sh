#!/usr/bin/env bash
# Device call 7 of session 2026-11-30c: issue 8's whole fast-path table in one run, with the one-shot GEMV step
# (every section, the torch.compile baseline included).
# Carry .whl and .whl_kv. Usage: OLLM_GIT_SHA=<sha> bash experiments/h200-2026-11-30c/table.sh
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl .whl_kv/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 PYTEST_DISABLE_PLUGIN_AUTOLOAD=1
timeout 470 python3 scripts/bench_fast_path.py --only decode hf_static_compile long prefill ttft batch --budget 440 \
  --reserve 170 --out $OUT/bench_fast_path.json > $OUT/bench_fast_path.log 2>&1
tail -n 26 $OUT/bench_fast_path.log
