"""The four profiles against the no-profile baseline, each run as a whole, in one process and one call.

Every job is the runner's own (`ollm_triton.run.run_job` on the composed config, as `python -m ollm_triton.run
profile=<p>` builds it): the profile's attention, KV codec, layer prefetch, decoder and context compressor together,
on the same tasks. The table gives, per profile: quality (perplexity, passkey accuracy), decode and end-to-end tok/s
and time to first token (throughput task), peak memory (the memory task's device peak on a GPU, host peak RSS on the
CPU), the KV bytes the codec stored, and tokens per joule over the throughput task's timed region (the system
monitor, NVML: empty on a machine without it). Writes JSON (device, versions, git sha, date, command) and prints a
GitHub table last.

    python scripts/study_profiles.py                                  # the embedded model (quality means something)
    python scripts/study_profiles.py --smoke                          # seconds: debug=smoke (a check, not a result)
    python scripts/study_profiles.py --model llama3_8b --tasks throughput memory   # 8B shapes, random weights: time
                                                                      # and memory only (quality tasks refuse)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PROFILES = ("none", "memory_optimized", "speed_optimized", "long_context", "balanced")
COLUMNS = (  # (header, metric key, format)
    ("ppl", "perplexity/ppl", "{:.2f}"),
    ("passkey", "passkey/acc", "{:.2f}"),
    ("decode tok/s", "throughput/decode_tok_s", "{:.1f}"),
    ("e2e tok/s", "throughput/e2e_tok_s", "{:.1f}"),
    ("ttft s", "throughput/ttft_s", "{:.3f}"),
    ("peak device MB", "memory/device_peak_allocated_bytes", "mb"),
    ("peak host MB", "memory/host_peak_rss_bytes", "mb"),
    ("KV MB", "memory/kv_stored_bytes", "mb"),
    ("context kept", "memory/context_ratio", "{:.2f}"),
    ("tokens/J", "monitor/throughput/tokens_per_j", "{:.2f}"),
)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--profiles", nargs="+", default=list(PROFILES))
    p.add_argument("--model", default="tiny")
    p.add_argument("--tasks", nargs="+", default=["perplexity", "passkey", "throughput", "memory"])
    p.add_argument("--smoke", action="store_true", help="debug=smoke: every task on a tiny slice")
    p.add_argument("--override", nargs="*", default=[], help="more Hydra overrides for every job (task.x.y=...)")
    p.add_argument("--out", default=str(ROOT / "experiments" / "profiles" / "results.json"))
    args = p.parse_args()
    unknown = [x for x in args.profiles if x not in PROFILES]
    if unknown:
        p.error(f"unknown profile(s) {unknown}; accepted: {', '.join(PROFILES)}")

    import torch
    from hydra import compose, initialize_config_dir

    from ollm_triton.results import environment
    from ollm_triton.run import CONF, clean_state, run_job

    overrides = [f"model={args.model}", f"task=[{','.join(args.tasks)}]", "logger=none", *args.override]
    if args.smoke:
        overrides.append("debug=smoke")
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        configs = {name: compose(config_name="config", overrides=[f"profile={name}", *overrides])
                   for name in args.profiles}
    rows, device = [], None
    for name, cfg in configs.items():
        run_dir = Path(args.out).parent / "runs" / name
        run_dir.mkdir(parents=True, exist_ok=True)
        clean_state()  # the runner's reset between jobs: peaks and the previous model freed
        t0 = time.perf_counter()
        try:
            record = run_job(cfg, run_dir)
            row = {"profile": name, "status": "ok", "metrics": record["metrics"], "plugins": record["plugins"],
                   "refused": record["refused"]}
            device = record["env"]["device"]
        except Exception as e:  # a profile that fails is a row that says why, the others still run
            row = {"profile": name, "status": "failed", "error": f"{type(e).__name__}: {str(e).splitlines()[0]}",
                   "traceback": traceback.format_exc()}
        row["seconds"] = time.perf_counter() - t0
        rows.append(row)
        print(f"{name}: {row['status']} ({row['seconds']:.0f} s)", flush=True)
    env = environment(torch.device(device or "cpu"))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"env": env, "overrides": overrides, "rows": rows}, indent=1, default=str))
    print(f"wrote {out}")
    print(table(rows))
    return 0


def table(rows: list[dict]) -> str:
    lines = ["| profile | plugins | " + " | ".join(h for h, _, _ in COLUMNS) + " |",
             "|" + " --- |" * (len(COLUMNS) + 2)]
    for row in rows:
        if row["status"] != "ok":
            lines.append(f"| {row['profile']} | failed: {row['error']} |" + " |" * len(COLUMNS))
            continue
        m = row["metrics"]
        plugins = ", ".join(p["name"] for p in row["plugins"].values())
        cells = []
        for _, key, fmt in COLUMNS:
            v = m.get(key)
            if not isinstance(v, (int, float)):
                cells.append("")
            else:
                cells.append(f"{v / 1e6:.1f}" if fmt == "mb" else fmt.format(v))
        lines.append(f"| {row['profile']} | {plugins} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
