#!/usr/bin/env bash
# Device call 6 of 2026-11-30: every GPU test at the session's final code, and the decoding table with the
# retrained embedded models (3 timed runs per prompt). Carry .whl and .whl_kv.
# Usage: OLLM_GIT_SHA=<sha> bash experiments/h200-2026-11-30/final_checks.sh
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl .whl_kv/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 PYTEST_DISABLE_PLUGIN_AUTOLOAD=1
t0=$(date +%s); stamp() { echo "== $1 ($(( $(date +%s) - t0 )) s)"; }
stamp "gpu tests"
timeout 150 python3 -m pytest -q -p no:cacheprovider -m gpu tests/ > $OUT/gpu_tests_final.log 2>&1; tail -n 6 $OUT/gpu_tests_final.log
stamp "decoding bench"
timeout 150 python3 scripts/bench_decoding.py --device cuda --new-tokens 256 --prompts 4 --prompt-tokens 256 --repeats 3 \
  --out $OUT/bench_decoding.json > $OUT/bench_decoding.log 2>&1; tail -n 16 $OUT/bench_decoding.log
stamp done
