#!/usr/bin/env bash
# Device call 3 of 2026-11-30: issue 5's memory rows (peak device memory of a real 32k run of llama3_8b per codec;
# the longest context that fits per codec) and issue 7's 100k run again with 4096-token prefill chunks.
# Carry .whl and .whl_kv. Usage: OLLM_GIT_SHA=<sha> bash experiments/h200-2026-11-30/memory.sh
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl .whl_kv/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
t0=$(date +%s); stamp() { echo "== $1 ($(( $(date +%s) - t0 )) s)"; }
stamp "32k memory runs: dense, int4, int2"
timeout 150 python3 -m ollm_triton.run -m model=llama3_8b +cache=dense,int4,int2 +attention=flash prefill_chunk=4096 \
  task=memory task.memory.context_len=32768 logger=none hydra.sweep.dir=/tmp/m32 > $OUT/run_32k_memory.log 2>&1
python3 - <<'P' > $OUT/run_32k_memory.json
import json, glob
rows = []
for f in sorted(glob.glob("/tmp/m32/*/metrics.json")):
    m = json.load(open(f))
    rows.append({"cache": m["plugins"]["cache"]["name"], "status": m["status"], "error": m["error"],
                 "metrics": m["metrics"], "env": m["env"], "model": m["model"]})
print(json.dumps(rows, indent=1))
P
python3 -c "
import json; rows = json.load(open('$OUT/run_32k_memory.json'))
for r in rows: m = r['metrics']; print(r['cache'], r['status'], m.get('memory/device_peak_allocated_bytes'), m.get('memory/kv_stored_bytes'))"
stamp "longest context per codec"
timeout 240 python3 scripts/bench_kv_capacity.py --out $OUT > $OUT/bench_kv_capacity.log 2>&1; tail -n 9 $OUT/bench_kv_capacity.log
stamp "100k, 8 GB budget, 4096-token chunks"
timeout 150 python3 -m ollm_triton.run model=llama3_8b +prefetch=lookahead prefetch.budget_gb=8 \
  +cache=int4 cache.store=cpu +attention=flash prefill_chunk=4096 task=memory \
  task.memory.context_len=100000 task.memory.new_tokens=4 logger=none hydra.run.dir=/tmp/run100k > $OUT/run_100k_c4096.log 2>&1
cp /tmp/run100k/metrics.json $OUT/run_100k_c4096_metrics.json; grep -E "device_peak|status" $OUT/run_100k_c4096.log
stamp done
