#!/usr/bin/env bash
# The studies of ollm_triton/conf/experiment/ on one GPU, each study's sweep packed into $OUT for the trip back.
#
#   bash scripts/device_studies.sh [study ...]          (default: memory throughput; then, in a second call,
#                                                         context_scaling)
#
# Per study it runs `python -m ollm_triton.run -m +experiment=<study>` under a time limit, then writes
#   $OUT/<study>.md    the study's table (ollm_triton.results.study_table), device, versions, sha, date, command
#   $OUT/<study>.tgz   the whole multirun directory (every job's metrics.json, run.log, error.log, summary.md,
#                      multirun.yaml and, with wandb installed, the offline W&B runs): the device tool brings back
#                      at most 8 files, two folders deep, so a sweep travels as one archive
# and prints the table (the sweep's own output is sweep.log inside the archive). A study cut off by its limit keeps the jobs that finished (the presets run length by
# length, so every set holds the shorter lengths); the table then lists those only, and the .md says it was cut.
#
# Expected run times on one H100 (memory and throughput measured; the others estimated from experiments/engine, kv_cache and
# prefetch rows; the first study also pays ~30 s of imports and Triton compiles):
#   memory           15 jobs, ~5 min: 14 took 275 s on an H100 (2026-12-07); the streaming sets take 23-44 s each
#   throughput        7 jobs, 146 s on an H100 (2026-12-07)
#   energy            5 jobs, ~1-2 min (not in the default list; the throughput study records tokens/J too)
#   context_scaling  8k, 32k, 128k: ~3-4 min for five sets (14 jobs in 261 s on an H100, 2026-12-07; the sixth,
#                    kv_streaming, came later); 200k adds ~4-5 min; 512k / 1M do not fit a call (1M int4: two
#                    ~15 min prefills a job), so CONTEXT_LENGTHS defaults to 8k..200k under an 8-minute limit;
#                    the 8k-128k rows of five sets are measured: CONTEXT_LENGTHS=200000 runs what is missing first
# So: call 1 `memory throughput` (~8 min), call 2 `context_scaling` (8 min, cut at its limit), or
# `LIMIT_CONTEXT_SCALING_S=390 ... context_scaling energy` to add the energy study to call 2.
# What the memory check should refuse at once (engine/footprint.py's estimate, 90% of free memory usable: ~71 GB on
# an H100, ~129 GB on an H200): dense, attention_window and kv_snapkv at 512k on an H100 (~85 GB) and at 1M on both
# (~155 GB; the estimate counts an eviction codec's KV before it evicts); kv_int4 (~53 GB) and all_combined (~41 GB)
# fit at 1M and would run for tens of minutes.
#
# Environment: OUT (default outputs/device_studies), LIMIT_<STUDY>_S (seconds; defaults: memory 330, throughput
# 200, energy 150, context_scaling 480), CONTEXT_LENGTHS (comma list; default 8192,32768,131072,200000),
# STUDY_OVERRIDES (more Hydra overrides, space-separated: `debug=smoke` checks the script on a CPU in seconds),
# OLLM_GIT_SHA (recorded in every metrics.json; the device tree has no .git), PYTHON (python3).
# Wheels: every `.whl*/` folder at the repository root (hydra-core, omegaconf, antlr4; wandb and its dependencies for
# offline W&B runs, from `bash scripts/fetch_device_wheels.sh` here) is installed with --no-index into /tmp/site
# first, as experiments/device_run.sh does. Back here: `tar xzf <study>.tgz` then
# `python scripts/check_wandb.py <study>` shows the offline W&B runs agree with results.load (group, tags, metrics).
set -uo pipefail
cd "$(dirname "$0")/.."

PY="${PYTHON:-python3}"
OUT="${OUT:-outputs/device_studies}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
[ $# -gt 0 ] || set -- memory throughput
source experiments/device_env.sh  # OLLM_GIT_SHA and the carried wheels
# W&B offline where wandb travelled (its runs land in each job's directory and in the archive), else none
if "$PY" -c "import wandb" 2>/dev/null; then logger=(logger.mode=offline); else logger=(logger=none); fi

declare -A limit=([memory]=330 [throughput]=200 [energy]=150 [context_scaling]=480)
rc_all=0
for study in "$@"; do
  [ -n "${limit[$study]:-}" ] || { echo "unknown study $study; studies: ${!limit[*]}" >&2; exit 2; }
  var="LIMIT_${study^^}_S"
  seconds="${!var:-${limit[$study]}}"
  extra=()
  [ "$study" = context_scaling ] && extra=("task.throughput.prompt_len=${CONTEXT_LENGTHS:-8192,32768,131072,200000}")
  sweep="/tmp/studies/$study"
  rm -rf "$sweep"
  read -ra more <<< "${STUDY_OVERRIDES:-}"  # e.g. debug=smoke: the same script in seconds on a CPU
  cmd=("$PY" -m ollm_triton.run -m "+experiment=$study" "${extra[@]}" "${logger[@]}" "${more[@]}"
       "hydra.sweep.dir=$sweep")
  echo "== $study (limit ${seconds} s, sha ${OLLM_GIT_SHA:-?}): ${cmd[*]}"
  t0=$(date +%s)
  # SIGINT first: the job in flight is lost, the finished ones keep their metrics.json
  timeout -s INT -k 20 "$seconds" "${cmd[@]}" > "$OUT/$study.log" 2>&1
  rc=$?
  took=$(( $(date +%s) - t0 ))
  cut=""; { [ "$rc" = 124 ] || [ "$rc" = 137 ]; } && cut="cut at its ${seconds} s limit: the jobs after the last row did not run"
  tail -n 3 "$OUT/$study.log"
  {
    echo "# $study: \`${cmd[*]}\`"
    echo
    echo "exit $rc after ${took} s${cut:+; $cut}; sha ${OLLM_GIT_SHA:-?}; $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo
    "$PY" - "$sweep" <<'P'
import sys

import torch

from ollm_triton.results import load, markdown_table, study_table

df = load(sys.argv[1])
if df.empty:
    print("no job finished")
    raise SystemExit
env = df.iloc[0]
print(f"device {env.get('env.device_name')}, torch {env.get('env.torch')}, triton {env.get('env.triton')}, "
      f"python {env.get('env.python')}, cuda {torch.version.cuda}\n")
print(markdown_table(study_table(df)))
P
  } > "$OUT/$study.md" 2>&1
  cat "$OUT/$study.md"
  mkdir -p "$sweep" && mv "$OUT/$study.log" "$sweep/sweep.log"  # two files a study: 8 come back at most
  tar czf "$OUT/$study.tgz" -C /tmp/studies "$study"
  case "$rc" in  # 1: a job failed or did not fit (its row says so); 124/137: cut at the limit; else the sweep broke
    0|1|124|137) ;;
    *) rc_all=$rc ;;
  esac
  echo "== $study done: rc=$rc in ${took} s"
done
exit "$rc_all"
