#!/usr/bin/env bash
# Device call 1 of session 2026-11-30c: the GPU tests at the commit last session could not run on the GPU (GEMV plan
# timed as graph replays, split_launch), then the fast-path decode row with the plan's timings of every candidate.
# Carry .whl and .whl_kv. Usage: OLLM_GIT_SHA=<sha> bash experiments/h200-2026-11-30c/verify.sh
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl .whl_kv/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 PYTEST_DISABLE_PLUGIN_AUTOLOAD=1
t0=$(date +%s); stamp() { echo "== $1 ($(( $(date +%s) - t0 )) s)"; }
stamp "gpu tests"
timeout 200 python3 -m pytest -q -p no:cacheprovider -m gpu tests/ > $OUT/gpu_tests.log 2>&1; tail -n 8 $OUT/gpu_tests.log
stamp "bench_fast_path decode"
timeout 150 python3 scripts/bench_fast_path.py --only decode --budget 140 --reserve 0 --out $OUT/bench_fast_path.json > $OUT/bench_fast_path.log 2>&1
tail -n 7 $OUT/bench_fast_path.log; python3 -c "import json;d=json.load(open('$OUT/bench_fast_path.json'));print(json.dumps(d['sections']['decode']['engine_graph'].get('fast_path_matmuls'),indent=1))"
stamp done
