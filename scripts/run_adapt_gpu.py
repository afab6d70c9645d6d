"""The done-when run of `+adapt=memory` on a GPU: a Llama-3-8B-shaped long prompt that dense KV alone does not fit
under `device_memory_gb`, finished by re-encoding the cache live, with the switch in metrics.json.

    python scripts/run_adapt_gpu.py --out $OUT/adapt            # defaults below: N = 24 GB, 65536-token prompt

The memory arithmetic (bf16, Llama-3-8B: 32 layers, 8 KV heads of 128):
- weights: 8.03e9 parameters x 2 B = 16.06 GB (random, drawn on the device);
- dense KV: 32 x 2 x 8 x 128 x 2 B = 131,072 B a token, so 65,536 + 32 tokens = 8.6 GB: 24.7 GB with the weights,
  more than 24 GB before any activation: dense alone does not fit (the runner's memory check refuses it; case 1);
- int8 KV (codes + per-group scales): ~2.2 KB a layer-token, 4.6 GB at 65.6k; int4 ~1.2 KB, 2.4 GB;
- under +adapt=memory the cache starts dense, sized to the most tokens C whose KV, plus the activations of a
  4096-token chunk reading C + 4096 keys (engine/footprint.py: 0.55 GB of its own, and what grows with the keys:
  the concatenated K/V and the causal mask with SDPA's bf16 copy, 16 KB a key), plus one int8 layer, fit in the
  room after the weights less `reserve_gb` (0.25 GB): C = 47,039 tokens (6.17 GB), so the switch comes during
  prefill when the 12th chunk arrives (45,056 tokens held), to the first ladder codec whose bytes for the
  horizon plus its chunk's activations (it decodes its K/V to attend them: 2.08 GB at 66,560 keys) fit: int8,
  4.51 + 2.08 GB of the ~7.2 GB left once dense is freed. The first run (git 8dfa974) kept a flat 1 GB instead:
  dense took 52.9k tokens and the 10th chunk ran out of memory allocating SDPA's additive mask, 4096 x 40,960
  bf16 = 320 MiB, with 22.01 GiB held of the 22.35 GiB (24e9 B) allowed, before any switch.
Case 2 must finish with `adapt/decisions` naming dense -> int8 (or int4); case 3 is a dense run of the same shape at a
length that fits (16k), for the throughput cost of the adapted run's piecewise decode against the dense graph.

Prints a GitHub table and writes adapt_gpu.json (device, versions, git sha, date, the three records).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run(name: str, overrides: list[str], out: Path) -> dict:
    run_dir = out / name
    cmd = [sys.executable, "-m", "ollm_triton.run", *overrides, "logger=none", f"hydra.run.dir={run_dir}"]
    env = {**os.environ, "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    metrics_file = run_dir / "metrics.json"
    record = json.loads(metrics_file.read_text()) if metrics_file.exists() else {}
    tail = proc.stderr.strip().splitlines()[-3:]
    print(f"[{name}] rc={proc.returncode} {wall:.0f} s: {' '.join(cmd[3:])}", flush=True)
    for line in tail:
        print(f"    {line}", flush=True)
    return {"name": name, "command": "python -m ollm_triton.run " + " ".join(cmd[3:]), "rc": proc.returncode,
            "wall_s": wall, "stderr_tail": tail, "record": record}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "outputs")) / "adapt")
    ap.add_argument("--memory-gb", type=float, default=24.0)
    ap.add_argument("--prompt-len", type=int, default=65536)
    ap.add_argument("--fits-len", type=int, default=16384, help="a length dense fits, for the speed comparison")
    ap.add_argument("--new-tokens", type=int, default=32)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    common = ["model=llama3_8b", "task=throughput", f"task.throughput.new_tokens={args.new_tokens}",
              "task.throughput.repeats=1", "task.throughput.prompt=random", "prefill_chunk=4096",
              f"device_memory_gb={args.memory_gb}"]
    cases = [
        run("dense_long", [*common, f"task.throughput.prompt_len={args.prompt_len}"], args.out),
        run("adapt_memory_long", [*common, f"task.throughput.prompt_len={args.prompt_len}", "+adapt=memory"],
            args.out),
        run("dense_fits", [*common, f"task.throughput.prompt_len={args.fits_len}"], args.out),
        run("adapt_memory_fits", [*common, f"task.throughput.prompt_len={args.fits_len}", "+adapt=memory"], args.out),
    ]
    rows = []
    for case in cases:
        m = case["record"].get("metrics", {})
        decisions = m.get("adapt/decisions", [])
        moves = "; ".join(f"step {d['step']}: {d['from']}->{d['to']} ({d['effect'].get('kv_bytes_before', 0) / 1e9:.2f}"
                          f"->{d['effect'].get('kv_bytes_after', 0) / 1e9:.2f} GB)" for d in decisions) or "-"
        rows.append((case["name"], case["rc"], case["record"].get("status", "none"),
                     m.get("throughput/prefill_tok_s"), m.get("throughput/decode_tok_s"),
                     m.get("device_peak_allocated_bytes"), moves, case["record"].get("error") or ""))
    env = next((c["record"]["env"] for c in cases if c["record"].get("env")), {})
    summary = {"script": "scripts/run_adapt_gpu.py", "args": {k: str(v) for k, v in vars(args).items()},
               "env": env, "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "cases": cases}
    (args.out / "adapt_gpu.json").write_text(json.dumps(summary, indent=1, default=str))

    def fmt(v, scale=1.0, spec=".1f"):
        return "-" if v is None else format(v / scale, spec)

    print(f"\ndevice {env.get('device_name', '?')}, torch {env.get('torch', '?')}, triton {env.get('triton', '?')}, "
          f"git {env.get('git_sha', '?')}, device_memory_gb={args.memory_gb}")
    print("| case | rc | status | prefill tok/s | decode tok/s | peak alloc GB | switches | error |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, rc, status, pre, dec, peak, moves, err in rows:
        print(f"| {name} | {rc} | {status} | {fmt(pre)} | {fmt(dec)} | {fmt(peak, 1e9, '.2f')} | {moves} | {err} |")
    ok = cases[1]["rc"] == 0 and any(d["strategy"] == "memory"
                                      for d in cases[1]["record"].get("metrics", {}).get("adapt/decisions", []))
    print(f"\ndone-when: dense_long {'failed as expected' if cases[0]['rc'] else 'FIT (raise --prompt-len)'}; "
          f"adapt_memory_long {'finished with the switch in metrics.json' if ok else 'DID NOT FINISH WITH A SWITCH'}")
    return 0 if ok and cases[0]["rc"] != 0 else 1


if __name__ == "__main__":
    sys.exit(main())
