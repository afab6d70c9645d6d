#!/usr/bin/env bash
# Device call 7 of 2026-11-30: the kvikio loader on the H200, never run before (the image has no kvikio). Carry
# .whl, .whl_kv and .whl_kvikio (kvikio-cu13 26.10.0, libkvikio-cu13, cuda-pathfinder, rapids-logger,
# nvidia-cufile; cupy is on the image). Runs the prefetch GPU tests (the kvikio one included), then llama3_8b
# layer streaming from page-cached layer files with loader=kvikio and loader=staged, same files, same process order.
# Usage: OLLM_GIT_SHA=<sha> bash experiments/h200-2026-11-30/kvikio.sh
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl .whl_kv/*.whl .whl_kvikio/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 PYTEST_DISABLE_PLUGIN_AUTOLOAD=1
t0=$(date +%s); stamp() { echo "== $1 ($(( $(date +%s) - t0 )) s)"; }
python3 -c "import kvikio, kvikio.defaults as d; print('kvikio', kvikio.__version__, 'compat_mode', d.compat_mode())" 2>&1 | tail -2
stamp "prefetch gpu tests"
timeout 60 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_prefetch_gpu.py > $OUT/gpu_tests_kvikio.log 2>&1; tail -n 4 $OUT/gpu_tests_kvikio.log
for loader in kvikio staged; do
  stamp "llama3_8b, disk tier, loader=$loader"
  timeout 75 python3 -m ollm_triton.run model=llama3_8b +prefetch=lookahead prefetch.tier=disk prefetch.cache_dir=/tmp/layers \
    prefetch.loader=$loader prefetch.budget_gb=8 task=throughput task.throughput.prompt_len=16 task.throughput.new_tokens=4 \
    task.throughput.repeats=1 logger=none hydra.run.dir=/tmp/run_$loader > $OUT/run_disk_$loader.log 2>&1
  echo "rc=$?"; cp /tmp/run_$loader/metrics.json $OUT/run_disk_${loader}_metrics.json
  grep -E "decode_tok_s|prefetch/kvikio|gbps_disk|gbps_load|^error" $OUT/run_disk_$loader.log | head -6
done
stamp done
