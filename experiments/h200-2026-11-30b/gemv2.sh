#!/usr/bin/env bash
# Device call 8 of session 2026-11-30b (last, ~150 s left): the GEMV plan now times each candidate as CUDA-graph
# replays (call 7 timed with launch cost included and picked cuBLAS everywhere). GPU tests of the GEMV and the fast
# decode, then the fast-path decode row with the plan's timings in its JSON. Carry .whl and .whl_kv.
# Usage: OLLM_GIT_SHA=<sha> bash experiments/h200-2026-11-30b/gemv2.sh
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl .whl_kv/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 PYTEST_DISABLE_PLUGIN_AUTOLOAD=1
t0=$(date +%s); stamp() { echo "== $1 ($(( $(date +%s) - t0 )) s)"; }
stamp "gpu tests"
timeout 40 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_kernels_gemv.py tests/test_fast_decode.py > $OUT/gpu_tests.log 2>&1; tail -n 3 $OUT/gpu_tests.log
stamp "bench_fast_path decode"
timeout 75 python3 scripts/bench_fast_path.py --only decode --repeats 1 --budget 70 --reserve 0 --out $OUT/bench_fast_path.json > $OUT/bench_fast_path.log 2>&1
tail -n 6 $OUT/bench_fast_path.log; python3 -c "import json; d=json.load(open('$OUT/bench_fast_path.json')); print(d['sections']['decode']['engine_graph'].get('fast_path_matmuls'))"
stamp done
