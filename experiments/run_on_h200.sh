#!/usr/bin/env bash
# One device-tool call that checks every GPU test and measures the end-to-end tables of this session.
# Carry .whl (hydra-core, omegaconf, antlr4) and .whl_kv (pytest 8.3.4, whose box copy clashes with a plugin).
# Usage on the H200 box: OLLM_GIT_SHA=<sha> bash experiments/run_on_h200.sh   (writes under $OUT)
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl .whl_kv/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 PYTEST_DISABLE_PLUGIN_AUTOLOAD=1
t0=$(date +%s)
stamp() { echo "== $1 ($(( $(date +%s) - t0 )) s)"; }
stamp "gpu tests"
timeout 130 python3 -m pytest -q -p no:cacheprovider -m gpu --continue-on-collection-errors tests/ > $OUT/gpu_tests.log 2>&1; tail -15 $OUT/gpu_tests.log
stamp "fast path bench"
timeout 200 python3 scripts/bench_fast_path.py --budget 170 --out $OUT/bench_fast_path.json > $OUT/bench_fast_path.log 2>&1; tail -30 $OUT/bench_fast_path.log
stamp "runner on llama3_8b"
timeout 60 python3 -m ollm_triton.run model=llama3_8b task=throughput logger=none hydra.run.dir=/tmp/run 2>&1 | tail -16; cp /tmp/run/metrics.json $OUT/run_llama3_8b_throughput.json
stamp "kv cache bench"
timeout 50 python3 scripts/bench_kv_cache.py --out $OUT/bench_kv_cache.json 2>&1 | tail -14
stamp "decoding bench"
timeout 50 python3 scripts/bench_decoding.py --new-tokens 128 --prompts 2 --repeats 1 --out $OUT/bench_decoding.json 2>&1 | tail -14
stamp "done"
