#!/usr/bin/env bash
# Device call 2 of 2026-11-30: re-check the GPU tests fixed after call 1, the prefetch benchmark (issue 7), and the
# llama3_8b 100k-context run within an 8 GB budget (layer streaming + int4 KV on the host, chunked prefill).
# Carry .whl and .whl_kv. Usage: OLLM_GIT_SHA=<sha> bash experiments/h200-2026-11-30/prefetch.sh
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl .whl_kv/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 PYTEST_DISABLE_PLUGIN_AUTOLOAD=1
t0=$(date +%s); stamp() { echo "== $1 ($(( $(date +%s) - t0 )) s)"; }
stamp "gpu tests (prefetch, speculative graph path)"
timeout 100 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_prefetch_gpu.py tests/test_speculative.py > $OUT/gpu_tests.log 2>&1; tail -4 $OUT/gpu_tests.log
stamp "100k context, 8 GB budget"
timeout 240 python3 -m ollm_triton.run model=llama3_8b +prefetch=lookahead prefetch.budget_gb=8 \
  +cache=int4 cache.store=cpu +attention=flash prefill_chunk=8192 task=[throughput,memory] \
  task.throughput.prompt_len=100000 task.throughput.new_tokens=8 task.throughput.repeats=1 \
  task.memory.context_len=100000 task.memory.new_tokens=4 logger=none hydra.run.dir=/tmp/run100k > $OUT/run_100k.log 2>&1
tail -n 25 $OUT/run_100k.log; cp /tmp/run100k/metrics.json $OUT/run_100k_metrics.json
stamp "bench_prefetch"
rem=$(( 585 - ($(date +%s) - t0) ))
timeout $rem python3 scripts/bench_prefetch.py --time-limit $(( rem - 45 )) --out $OUT > $OUT/bench_prefetch.log 2>&1; tail -n 30 $OUT/bench_prefetch.log
stamp done
