#!/usr/bin/env bash
# One entry point for every measurement committed under experiments/: on the GPU box (the device tool's machine,
# whose tree travels without .git and whose image lacks hydra/omegaconf) and on any other machine.
#
#   OLLM_GIT_SHA=<sha> bash experiments/device_run.sh <what> [args...]
#
#   gpu-tests [pytest args]   every `gpu` test (or the files/args given)             -> $OUT/<tag>.log
#   bench_<name> [args]       scripts/bench_<name>.py with its own arguments          -> $OUT/<tag>.json and .log
#                             (bench_prefetch and bench_kv_capacity take --out as a folder and get $OUT)
#   profile <tool> [args]     experiments/profile/<tool>.py (decode_profile, fast_step_profile, step_kernels)
#                                                                                    -> $OUT/<tag>.txt, .err
#   run [overrides]           python -m ollm_triton.run with Hydra overrides (-m for a sweep);
#                             the run's metrics.json, a sweep's as one archive     -> $OUT/<tag>_metrics.{json,tgz}
#   quality [ROOT]            the CPU quality sweeps of experiments/{attention,kv_cache} (multirun/quality by default);
#                             tables: python experiments/quality_tables.py ROOT
#   quality_long [ROOT [SWEEP...]]  the same sweeps with +experiment=quality_long (8k-32k on tiny-llama-16k, passkey
#                             and multikey); SWEEP picks some of attention_dense attention_window attention_sparse
#                             cache_quant cache_evict (default all); QUALITY_PARALLEL=1 runs the sweeps at once,
#                             the window, sparse and eviction groups one process per part (each sweep's log beside
#                             its folder; the slowest job, window 1024, took 417 s beside the others on an H100);
#                             ROOT archived as $OUT/<tag>.tgz;
#                             tables: python -m ollm_triton.quality_curves ROOT
#   retrain                   retrain the embedded tiny-llama + draft, two variants side by side; needs
#                             .carry3/stdlib.tgz (Python 3.11.7's stdlib *.py, the training corpus)
#                                                                                    -> $OUT/best_*.tgz.part_*
#   train_long [CTX] [args]   continue the shipped pair at context CTX (default 16384; train_tiny_lm.py --long, RoPE
#                             base 1e6, ~6 min of training + ~1 min of evaluation on an H100); needs .carry3/stdlib.tgz
#                             -> $OUT/train_log_<CTX>.json, train_long_<CTX>.txt, long_<CTX>.tgz.part_* (15 MB each)
#   exec CMD...               any command in the same environment, e.g.
#                             exec ncu --clock-control none --kernel-name regex:'quant_decode|merge' --launch-skip 4 \
#                               --launch-count 2 python3 experiments/profile/decode_profile.py run int4
#
# Environment: OUT (default outputs/device_run), TAG (output file stem, default <what>), OLLM_GIT_SHA (recorded in
# every JSON; taken from git when the tree has .git), LIMIT_S (a `timeout` for the command), PYTHON (python3).
# Wheels: every `.whl*/` folder at the repository root (hydra-core, omegaconf, antlr4, and whatever else was carried,
# see DEVICE.md) is installed with --no-index into /tmp/site first. Several steps in one device call: call this
# script once per step with a different TAG; the device tool brings back at most 8 files.
set -uo pipefail
cd "$(dirname "$0")/.."

what="${1:-}"
[ -n "$what" ] || { sed -n '2,37p' "$0"; exit 2; }
shift
PY="${PYTHON:-python3}"
OUT="${OUT:-outputs/device_run}"
TAG="${TAG:-$what}"
mkdir -p "$OUT"
export OUT PYTHONUNBUFFERED=1 PYTEST_DISABLE_PLUGIN_AUTOLOAD=1

source experiments/device_env.sh  # OLLM_GIT_SHA and the carried wheels

limit=()
[ -n "${LIMIT_S:-}" ] && limit=(timeout "$LIMIT_S")
has_out() { for a in "$@"; do case "$a" in --out|--out=*) return 0 ;; esac; done; return 1; }
t0=$(date +%s)
echo "== $what (sha ${OLLM_GIT_SHA:-?}) -> $OUT/$TAG*"

case "$what" in
  gpu-tests)
    [ $# -gt 0 ] || set -- tests/
    "${limit[@]}" "$PY" -m pytest -q -p no:cacheprovider -m gpu "$@" > "$OUT/$TAG.log" 2>&1
    rc=$?; tail -n 8 "$OUT/$TAG.log" ;;
  bench_*)
    script="scripts/$what.py"
    [ -f "$script" ] || { echo "no $script" >&2; exit 2; }
    if ! has_out "$@"; then
      case "$what" in
        bench_prefetch|bench_kv_capacity) set -- "$@" --out "$OUT" ;;
        *) set -- "$@" --out "$OUT/$TAG.json" ;;
      esac
    fi
    "${limit[@]}" "$PY" "$script" "$@" > "$OUT/$TAG.log" 2>&1
    rc=$?; tail -n 40 "$OUT/$TAG.log" ;;
  profile)
    tool="experiments/profile/${1:?profile needs a tool name}.py"; shift
    "${limit[@]}" "$PY" "$tool" "$@" > "$OUT/$TAG.txt" 2> "$OUT/$TAG.err"
    rc=$?; tail -n 20 "$OUT/$TAG.txt"; tail -n 3 "$OUT/$TAG.err" ;;
  run)
    tmp=$(mktemp -d /tmp/ollm_run.XXXX)
    case " $* " in
      *" -m "*|*" --multirun "*) "${limit[@]}" "$PY" -m ollm_triton.run "$@" hydra.sweep.dir="$tmp" ;;
      *) "${limit[@]}" "$PY" -m ollm_triton.run "$@" hydra.run.dir="$tmp" ;;
    esac
    rc=$?
    [ -f "$tmp/metrics.json" ] && cp "$tmp/metrics.json" "$OUT/${TAG}_metrics.json"
    # a sweep's jobs as one archive (<job>/metrics.json): the device tool returns at most 8 files
    jobs=$(cd "$tmp" && ls -d */metrics.json 2>/dev/null)
    [ -n "$jobs" ] && tar czf "$OUT/${TAG}_metrics.tgz" -C "$tmp" $jobs ;;
  quality|quality_long)
    root="${1:-multirun/$what}"; shift || true
    only=" ${*:-attention_dense attention_window attention_sparse cache_quant cache_evict} "
    if [ "$what" = quality ]; then
      common=(logger=none "task=[perplexity,passkey]" task.perplexity.max_length=2048 task.perplexity.stride=1024
              task.perplexity.max_tokens=4096 "task.passkey.lengths=[1024,4096]" "task.passkey.depths=[0.1,0.5,0.9]"
              task.passkey.samples=1)
      windows=256,1024; tables="experiments/quality_tables.py"
    else  # the preset holds the model, tasks and lengths; windows are 1/64 and 1/16 of the trained 16k as 256, 1024
      common=(logger=none +experiment=quality_long)  # were of 4k above; sparse densities and ratios are fractions
      windows=1024,4096; tables="-m ollm_triton.quality_curves"
    fi
    # a sweep's folder is its group (the table's section), or group/part: the longer groups run as parts, so that
    # with QUALITY_PARALLEL each part is its own process (results.load reads a group's parts as one table)
    q() { case "$only" in *" ${1%%/*} "*) ;; *) return 0 ;; esac
          local name=$1; shift; echo "-- sweep $name"
          # QUALITY_EXTRA: more overrides for every sweep (e.g. debug=smoke); a failed job is a row, the sweeps go on
          local cmd=("${limit[@]}" "$PY" -m ollm_triton.run -m "${common[@]}" hydra.sweep.dir="$root/$name" "$@"
                     ${QUALITY_EXTRA:-})
          if [ -n "${QUALITY_PARALLEL:-}" ]; then  # every sweep at once on one GPU: the tiny model leaves it idle
            OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}" "${cmd[@]}" > "$root.${name//\//_}.log" 2>&1 & pids+=($!)
          else
            "${cmd[@]}" || failed=1
          fi; }
    failed=0; pids=()
    # attention backends: prefill and decode follow the backend's pattern
    q attention_dense +attention=sdpa,flash,multiscale,adaptive
    for window in ${windows//,/ }; do
      q "attention_window/$window" +attention=sliding_window attention.window=$window attention.sink=4
    done
    for pattern in local strided bigbird; do
      q "attention_sparse/$pattern" +attention=sparse attention.block_size=64 attention.pattern=$pattern \
        attention.density=0.25,0.5
    done
    # KV codecs: perplexity fed in chunks of 16 tokens, so every token attends over the codec's stored K/V
    q cache_quant task.perplexity.chunk=16 +cache=dense,int8,int4,int2,cluster
    for codec in streaming h2o snapkv; do
      q "cache_evict/$codec" task.perplexity.chunk=16 +cache=$codec cache.ratio=0.5,0.25,0.125
    done
    for p in "${pids[@]}"; do wait "$p" || failed=1; done
    [ ${#pids[@]} -gt 0 ] && mkdir -p "$root" && cp "$root".*.log "$root"/ 2>/dev/null
    # the device tool returns at most 8 files: the sweeps' run folders as one archive
    [ "$what" = quality_long ] && tar czf "$OUT/$TAG.tgz" -C "$root" . && ls -la "$OUT/$TAG.tgz"
    rc=$failed; echo "tables: $PY $tables $root" ;;
  retrain)
    [ -f .carry3/stdlib.tgz ] || { echo "retrain needs .carry3/stdlib.tgz (the corpus)" >&2; exit 2; }
    mkdir -p /tmp/stdlib && tar xzf .carry3/stdlib.tgz -C /tmp/stdlib
    common=(--tokenizer ollm_triton/assets/tiny-llama/tokenizer.json --corpus-root /tmp/stdlib --corpus-python 3.11.7
            --batch-tokens 32768 --short-frac 0.2 --target-steps 3000 --draft-steps 1400
            --passkey-lengths 512,1024,2048,3072,4096,8192 --passkey-samples 40 --eval-tokens 200000)
    for v in A:0.35 B:0.5; do
      "${limit[@]}" "$PY" scripts/train_tiny_lm.py "${common[@]}" --retrieval-frac "${v#*:}" --out "/tmp/v${v%%:*}" \
        --log "$OUT/log_${v%%:*}.json" > "$OUT/train_${v%%:*}.txt" 2>&1 &
    done
    wait
    # keep the variant with the best worst-case passkey up to the trained context (4096), then the lower perplexity
    best=$("$PY" - <<'P'
import json, os
scores = {}
for v in "AB":
    try:
        ev = json.load(open(f"{os.environ['OUT']}/log_{v}.json"))["target"]["eval"]
    except (OSError, KeyError, ValueError):
        continue
    worst = min(a for n, a in ev["passkey"]["by_length"].items() if int(n) <= 4096)
    scores[v] = (worst, -ev["perplexity"]["ppl"])
print(max(scores, key=scores.get) if scores else "")
P
)
    echo "best variant: ${best:-none}"
    [ -n "$best" ] && tar czf /tmp/best.tgz -C "/tmp/v$best" tiny-llama tiny-llama-draft \
      && split -b 15M /tmp/best.tgz "$OUT/best_$best.tgz.part_"
    rc=$? ;;
  train_long)
    ctx="${1:-16384}"; shift || true
    [ -f .carry3/stdlib.tgz ] || { echo "train_long needs .carry3/stdlib.tgz (the corpus)" >&2; exit 2; }
    mkdir -p /tmp/stdlib && tar xzf .carry3/stdlib.tgz -C /tmp/stdlib
    rm -rf /tmp/long && mkdir -p /tmp/long
    # the shipped corpus (Python 3.11.7's stdlib, same split and eval hash as the shipped models' cards)
    "${limit[@]}" "$PY" scripts/train_tiny_lm.py --long "$ctx" --corpus-root /tmp/stdlib --corpus-python 3.11.7 \
      --out /tmp/long --log "$OUT/train_log_$ctx.json" "$@" > "$OUT/train_long_$ctx.txt" 2>&1
    rc=$?; tail -n 12 "$OUT/train_long_$ctx.txt"
    # the checkpoints (bf16 safetensors in 15 MB shards, tokenizer, cards) as 15 MB parts: the tool returns 16 MiB files
    ls /tmp/long/*/config.json > /dev/null 2>&1 && tar czf /tmp/long.tgz -C /tmp/long --exclude=train_log.json . \
      && split -b 15M /tmp/long.tgz "$OUT/long_$ctx.tgz.part_" && ls -la "$OUT" ;;
  exec)
    "${limit[@]}" "$@"
    rc=$? ;;
  *)
    echo "unknown <what>: $what" >&2; sed -n '6,31p' "$0" >&2; exit 2 ;;
esac
echo "== $what done: rc=$rc in $(( $(date +%s) - t0 )) s"
exit "$rc"
