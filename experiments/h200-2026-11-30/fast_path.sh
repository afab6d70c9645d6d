#!/usr/bin/env bash
# Device call 4 of 2026-11-30: issue 7's 100k run under a hard 8 GB allocator cap (device_memory_gb=8), then the
# rows of issue 8's table not measured yet (32k dense/int4, prefill 8k/32k, TTFT at 100k, batch 8/32) and the
# transformers static-cache + torch.compile baseline with a longer time box.
# Carry .whl and .whl_kv. Usage: OLLM_GIT_SHA=<sha> bash experiments/h200-2026-11-30/fast_path.sh
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl .whl_kv/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
t0=$(date +%s); stamp() { echo "== $1 ($(( $(date +%s) - t0 )) s)"; }
stamp "100k under an 8 GB cap"
timeout 130 python3 -m ollm_triton.run model=llama3_8b +prefetch=lookahead prefetch.budget_gb=8 device_memory_gb=8 \
  +cache=int4 cache.store=cpu +attention=flash prefill_chunk=4096 task=throughput task.throughput.prompt_len=100000 \
  task.throughput.new_tokens=8 task.throughput.repeats=1 logger=none hydra.run.dir=/tmp/run100k > $OUT/run_100k_cap8.log 2>&1
echo "rc=$?"; cp /tmp/run100k/metrics.json $OUT/run_100k_cap8_metrics.json
grep -E "status|ttft_s|decode_tok_s|device_peak|Error|error" $OUT/run_100k_cap8.log | head -8
stamp "bench_fast_path"
rem=$(( 575 - ($(date +%s) - t0) ))
timeout $rem python3 scripts/bench_fast_path.py --only decode hf_static_compile long prefill ttft batch \
  --budget $(( rem - 25 )) --reserve 170 --out $OUT/bench_fast_path.json > $OUT/bench_fast_path.log 2>&1
tail -n 40 $OUT/bench_fast_path.log
stamp done
