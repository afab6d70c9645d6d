#!/usr/bin/env bash
# Quality of every attention backend and KV codec on the embedded model (CPU is enough: quality does not depend
# on whether the Triton kernel or the PyTorch reference ran). Writes multirun dirs under $ROOT; the tables are made
# by experiments/quality_tables.py. Usage: bash experiments/quality_sweeps.sh [ROOT]
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="${1:-multirun/quality}"
COMMON=(logger=none "task=[perplexity,passkey]" task.perplexity.max_length=2048 task.perplexity.stride=1024
        task.perplexity.max_tokens=4096 "task.passkey.lengths=[1024,4096]" "task.passkey.depths=[0.1,0.5,0.9]"
        task.passkey.samples=1)

# attention backends: prefill and decode follow the backend's pattern
python -m ollm_triton.run -m "${COMMON[@]}" hydra.sweep.dir="$ROOT/attention_dense" +attention=sdpa,flash,multiscale,adaptive
python -m ollm_triton.run -m "${COMMON[@]}" hydra.sweep.dir="$ROOT/attention_window" +attention=sliding_window attention.window=256,1024 attention.sink=4
python -m ollm_triton.run -m "${COMMON[@]}" hydra.sweep.dir="$ROOT/attention_sparse" +attention=sparse attention.block_size=64 attention.pattern=local,strided,bigbird attention.density=0.25,0.5

# KV codecs: perplexity fed in chunks of 16 tokens, so every token attends over the codec's stored K/V
python -m ollm_triton.run -m "${COMMON[@]}" task.perplexity.chunk=16 hydra.sweep.dir="$ROOT/cache_quant" +cache=dense,int8,int4,int2,cluster
python -m ollm_triton.run -m "${COMMON[@]}" task.perplexity.chunk=16 hydra.sweep.dir="$ROOT/cache_evict" +cache=streaming,h2o,snapkv cache.ratio=0.5,0.25,0.125
