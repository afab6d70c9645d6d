"""What one graph-replayed decode step of llama3_8b (random bf16 weights, batch 1, 512-token prompt) spends its
GPU time on, kernel by kernel: torch.profiler (CUPTI) over replays of the captured step.

    python experiments/profile/fast_step_profile.py [--prompt 512] [--steps 64] > step_profile.txt

Prints the kernels grouped by name with their total and per-step GPU time, the sum of kernel time per step, and
the wall time per step, whose difference is the gaps between kernels (launch latency inside the graph).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from ollm_triton.engine import load_engine  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--gemv", action="store_true", help="only time llama3_8b's batch-1 matmuls three ways")
    args = ap.parse_args()
    if args.gemv:
        return gemv()
    arch = yaml.safe_load((REPO / "ollm_triton" / "conf" / "model" / "llama3_8b.yaml").read_text())["arch"]
    engine = load_engine(arch, device="cuda", dtype=torch.bfloat16, seed=0, fast_decode="graph")
    fd = engine.fast_decoder()
    prompt = torch.randint(0, arch["vocab_size"], (1, args.prompt), device="cuda")
    with torch.inference_mode():
        fd.generate(prompt, 8, lambda lg: lg.argmax(-1))  # compile, capture
        bk = next(iter(fd.buckets.values()))
        for _ in range(10):
            fd.replay(bk)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(args.steps):
            fd.replay(bk)
        torch.cuda.synchronize()
        wall_us = (time.perf_counter() - t0) / args.steps * 1e6
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(args.steps):
                fd.replay(bk)
            torch.cuda.synchronize()
    rows = {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            name = e.name[:90]
            n, t = rows.get(name, (0, 0.0))
            rows[name] = (n + 1, t + e.device_time)
    total = sum(t for _, t in rows.values()) / args.steps
    print(f"wall per step {wall_us:.1f} us ({1e6 / wall_us:.1f} tok/s); kernel time per step {total:.1f} us; "
          f"gaps {wall_us - total:.1f} us; layers {len(engine.model.model.layers)}")
    print(f"{'us/step':>9} {'calls/step':>10} {'us/call':>8}  kernel")
    for name, (n, t) in sorted(rows.items(), key=lambda kv: -kv[1][1]):
        print(f"{t / args.steps:9.1f} {n / args.steps:10.1f} {t / n:8.2f}  {name}")


def gemv():
    """Each weight shape of a llama3_8b decode step at batch 1: F.linear (what the engine calls), torch.mv and
    W @ x as a column, each replayed from a CUDA graph; GB/s of weight bytes."""
    import torch.nn.functional as F
    from triton.testing import do_bench_cudagraph

    shapes = {"qkv": (6144, 4096), "o_proj": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336),
              "lm_head": (128256, 4096)}
    with torch.inference_mode(), torch.cuda.stream(torch.cuda.Stream()):
        for name, (n, k) in shapes.items():
            w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
            x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
            row = {}
            for how, fn in (("linear", lambda: F.linear(x, w)), ("mv", lambda: torch.mv(w, x[0])),  # noqa: B023
                            ("w@xT", lambda: w @ x.T)):  # noqa: B023
                us = 1000 * do_bench_cudagraph(fn, rep=100, return_mode="median")
                row[how] = f"{us:.2f} us ({w.numel() * 2 / us / 1e3:.0f} GB/s)"
            print(name, n, k, row, flush=True)
            w = None  # free it before the next shape


if __name__ == "__main__":
    main()
