#!/usr/bin/env bash
# Device call 5 of 2026-11-30: issue 7's 100k run under a hard 8 GB allocator cap (device_memory_gb=8), with
# expandable segments (call 4 failed at 7.04 GiB allocated + 0.33 GiB fragmentation under the same cap), once with
# the embeddings and LM head streamed from the host too and once with them on the device.
# Carry .whl and .whl_kv. Usage: OLLM_GIT_SHA=<sha> bash experiments/h200-2026-11-30/run_100k_cap.sh
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl .whl_kv/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
t0=$(date +%s); stamp() { echo "== $1 ($(( $(date +%s) - t0 )) s)"; }
for head in false true; do
  stamp "100k, cap 8 GB, keep_head_on_device=$head"
  timeout 150 python3 -m ollm_triton.run model=llama3_8b +prefetch=lookahead prefetch.budget_gb=8 \
    prefetch.keep_head_on_device=$head device_memory_gb=8 +cache=int4 cache.store=cpu +attention=flash \
    prefill_chunk=4096 task=throughput task.throughput.prompt_len=100000 task.throughput.new_tokens=8 \
    task.throughput.repeats=1 logger=none hydra.run.dir=/tmp/run_$head > $OUT/run_100k_head_$head.log 2>&1
  echo "rc=$?"; cp /tmp/run_$head/metrics.json $OUT/run_100k_head_${head}_metrics.json
  [ -f /tmp/run_$head/error.log ] && cp /tmp/run_$head/error.log $OUT/run_100k_head_${head}_error.log
  grep -E "ttft_s|decode_tok_s|device_peak|^error" $OUT/run_100k_head_$head.log | head -6
done
stamp done
