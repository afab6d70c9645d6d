"""What one graph-replayed decode step of llama3_8b (random bf16 weights, batch 1, 512-token prompt) spends its
GPU time on, kernel by kernel: torch.profiler (CUPTI) over replays of the captured step.

    python experiments/profile/fast_step_profile.py [--prompt 512] [--steps 64] [--fold off norm silu] > out.txt
    python experiments/profile/fast_step_profile.py --fold-kernels      # the folded GEMV alone, ~1 min on an H100

Prints the kernels grouped by name with their total and per-step GPU time, the sum of kernel time per step, and
the wall time per step, whose difference is the gaps between kernels (launch latency inside the graph).
--fold: which steps to profile, one after the other on the same weights and prompt (default all three): "off" with
the norm and SiLU kernels apart (FastDecoder(fold_norm=False)), "norm" with the RMSNorm folded into the q/k/v,
gate/up and LM-head GEMVs (kernels/gemv.py `add_rmsnorm_gemv`, the GPU default), "silu" with the SwiGLU gate
folded into the down GEMV as well (`silu_mul_gemv`, fold_silu=True); each with its wall time, the ratios last.
--fold-kernels: those three shapes alone over cold weights (a CUDA graph over copies of the weight, as
step_kernels.py): the norm kernel + GEMV apart against the fold at 1-64 rows a program, and the down GEMV with
the SiLU kernel apart against silu_mul_gemv's configs, each checked against float64.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from ollm_triton.engine import load_engine  # noqa: E402
from ollm_triton.engine.fast_decode import FastDecoder  # noqa: E402

FOLDS = {"off": (dict(fold_norm=False), "norm and SiLU kernels apart"),
         "norm": (dict(fold_norm=True), "RMSNorm (+ residual add) folded into the q/k/v, gate/up, LM-head GEMVs"),
         "silu": (dict(fold_norm=True, fold_silu=True), "that, and the SwiGLU gate folded into the down GEMV")}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--gemv", action="store_true", help="only time llama3_8b's batch-1 matmuls three ways")
    ap.add_argument("--fold", nargs="+", choices=FOLDS, default=list(FOLDS),
                    help="steps to profile: norm and SiLU apart (off), the norm folded (norm), norm and SiLU (silu)")
    ap.add_argument("--fold-kernels", action="store_true", help="only time the folded GEMV against norm + GEMV")
    args = ap.parse_args()
    if args.gemv:
        return gemv()
    if args.fold_kernels:
        return fold_kernels()
    arch = yaml.safe_load((REPO / "ollm_triton" / "conf" / "model" / "llama3_8b.yaml").read_text())["arch"]
    engine = load_engine(arch, device="cuda", dtype=torch.bfloat16, seed=0, fast_decode="graph")
    engine.fast_decoder()  # fuses q/k/v and gate/up once
    prompt = torch.randint(0, arch["vocab_size"], (1, args.prompt), device="cuda")
    walls = {}
    for fold in args.fold:
        engine._fast = FastDecoder(engine, capture=True, **FOLDS[fold][0])
        print(f"\n## --fold {fold}: {FOLDS[fold][1]}")
        walls[fold] = profile_step(engine, prompt, args.steps)
        engine._fast.close()
        torch.cuda.empty_cache()
    print()
    for fold, us in walls.items():
        vs = f" ({walls['off'] / us:.3f}x off)" if "off" in walls else ""
        print(f"--fold {fold}: {us:.1f} us a step{vs}")


def profile_step(engine, prompt, steps) -> float:
    """Kernel table of `steps` replays of the engine's captured step; returns the wall time of a step in us."""
    fd = engine.fast_decoder()
    with torch.inference_mode():
        fd.generate(prompt, 8, lambda lg: lg.argmax(-1))  # compile, capture
        bk = next(iter(fd.buckets.values()))
        for _ in range(10):
            fd.replay(bk)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(steps):
            fd.replay(bk)
        torch.cuda.synchronize()
        wall_us = (time.perf_counter() - t0) / steps * 1e6
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                fd.replay(bk)
            torch.cuda.synchronize()
    rows = {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            name = e.name[:90]
            n, t = rows.get(name, (0, 0.0))
            rows[name] = (n + 1, t + e.device_time)
    total = sum(t for _, t in rows.values()) / steps
    print(f"wall per step {wall_us:.1f} us ({1e6 / wall_us:.1f} tok/s); kernel time per step {total:.1f} us; "
          f"gaps {wall_us - total:.1f} us; layers {len(engine.model.model.layers)}")
    print(f"{'us/step':>9} {'calls/step':>10} {'us/call':>8}  kernel")
    for name, (n, t) in sorted(rows.items(), key=lambda kv: -kv[1][1]):
        print(f"{t / steps:9.1f} {n / steps:10.1f} {t / n:8.2f}  {name}")
    return wall_us


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


def time_configs(row: dict, configs, fold, ws, err, graph_us, copies: int) -> None:
    """Each (rows a chunk, warps, chunks a program) config of a folded GEMV: checked on the first weight (err()),
    then timed as one CUDA graph over every copy; a config that does not compile or fit is recorded as a finding."""
    for bn, warps, steps in configs:
        key = f"fold_b{bn}_w{warps}_s{steps}"
        try:
            fold(ws[:1], bn, warps, steps)
            row[key + "_err"] = err()
            row[key + "_us"] = graph_us(lambda bn=bn, warps=warps, steps=steps: fold(ws, bn, warps, steps)) / copies
        except Exception as e:  # noqa: BLE001 - a config that does not compile or fit is a finding
            row[key + "_error"] = repr(e)[:160]


def fold_kernels():
    """llama3_8b's three folded shapes (K = 4096): the fused add + RMSNorm kernel then the one-shot GEMV (what the
    step runs with fold_norm=False) against add_rmsnorm_gemv at several rows a program and warps, each a CUDA graph
    over copies of the weight (>= 400 MB in all, so the weights stream from HBM as in the step), divided by the
    copies; every config checked against float64. JSON lines, then a GitHub table."""
    import triton

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from step_kernels import graph_us

    from ollm_triton.kernels import gemv as G
    from ollm_triton.kernels.norm import rmsnorm_kernel

    dt, k, eps = torch.bfloat16, 4096, 1e-5
    g = torch.Generator(device="cuda").manual_seed(0)
    r, d = (torch.randn(1, k, device="cuda", dtype=dt, generator=g) for _ in range(2))
    nw = 1 + 0.2 * torch.randn(k, device="cuda", dtype=dt, generator=g)
    normed, s = torch.empty(1, k, device="cuda", dtype=dt), torch.empty(1, k, device="cuda", dtype=dt)
    # (rows a chunk, warps, chunks a program): one chunk a program as the plain GEMV; more chunks share a prologue
    configs = [(1, 4, 1), (2, 4, 1), (4, 4, 1), (4, 8, 1), (8, 8, 1), (2, 4, 4), (4, 8, 4), (4, 8, 16)]
    table = []
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}; "
          f"default fold config: {G.FOLD_BLOCK_N} rows, {G.FOLD_NUM_WARPS} warps, {G.FOLD_STEPS} chunks a program")
    with torch.inference_mode():
        for name, n in (("qkv", 6144), ("gate_up", 28672), ("lm_head", 128256)):
            copies = max(2, -(-400_000_000 // (n * k * 2)))
            ws = [torch.randn(n, k, device="cuda", dtype=dt, generator=g) / k**0.5 for _ in range(copies)]
            y = torch.empty(n, device="cuda", dtype=dt)
            y_ref, _ = G.add_rmsnorm_gemv_reference(d, r, nw, eps, ws[0])

            def err(y=y, y_ref=y_ref):
                return ((y.double() - y_ref).pow(2).mean().sqrt() / y_ref.pow(2).mean().sqrt()).item()

            def apart(ws=ws, y=y):  # a list of one weight: the checked call
                for w in ws:
                    rmsnorm_kernel(d, nw, eps, residual=r, out=normed, residual_out=s)
                    G.gemv(normed, w, out=y)

            def gemv_only(ws=ws, y=y):
                for w in ws:
                    G.gemv(normed, w, out=y)

            row = {"shape": name, "n": n, "k": k, "copies": copies}
            apart(ws[:1])
            row["apart_err"] = err()
            row["apart_us"] = graph_us(apart) / copies
            row["gemv_alone_us"] = graph_us(gemv_only) / copies
            def norm_fold(ws, bn, warps, steps, y=y):
                for w in ws:
                    G.add_rmsnorm_gemv(d, r, nw, eps, w, block_n=bn, num_warps=warps, steps=steps, out=y,
                                       residual_out=s)

            time_configs(row, configs, norm_fold, ws, err, graph_us, copies)
            print(json.dumps(row), flush=True)
            table.append(row)
            ws = None
            torch.cuda.empty_cache()
        silu_rows = silu_fold_kernels(graph_us, g)
    fold_table("shape (N x 4096) | norm + GEMV apart", configs, table,
               lambda row: f"{row['shape']} ({row['n']})")
    print("us per call (median graph replay / copies); fold AxB rows: A rows a chunk, B chunks a program; errors "
          "against float64 in the JSON lines above")
    fold_table("shape | SiLU kernel + GEMV apart", SILU_CONFIGS, silu_rows,
               lambda row: f"down ({row['n']} x {row['m']})")


def fold_table(head: str, configs, rows, label) -> None:
    """One GitHub table: the unfolded pair, the GEMV alone and each fold configuration, a row per shape."""
    print(f"\n| {head} | GEMV alone | "
          + " | ".join(f"fold {bn}x{st} rows, {w} warps" for bn, w, st in configs) + " |")
    print("| --- | ---: | ---: | " + " | ".join("---:" for _ in configs) + " |")
    for row in rows:
        cells = [f"{row.get(f'fold_b{bn}_w{w}_s{st}_us', float('nan')):.2f}" for bn, w, st in configs]
        print(f"| {label(row)} | {row['apart_us']:.2f} | {row['gemv_alone_us']:.2f} | " + " | ".join(cells) + " |")


SILU_CONFIGS = [(1, 4, 1), (2, 8, 1), (2, 8, 4), (2, 16, 4), (4, 16, 4), (2, 16, 8)]


def silu_fold_kernels(graph_us, g) -> list[dict]:
    """llama3_8b's down GEMV (4096 x 14336) with the SwiGLU gate apart (silu_mul kernel, then the one-shot GEMV the
    step runs) against silu_mul_gemv's configs, over cold weight copies, each checked against float64."""
    from ollm_triton.kernels import gemv as G
    from ollm_triton.kernels.mlp import silu_mul_kernel

    dt, n, m = torch.bfloat16, 4096, 14336
    copies = max(2, -(-400_000_000 // (n * m * 2)))
    gate_up = 2 * torch.randn(1, 2 * m, device="cuda", dtype=dt, generator=g)
    act = torch.empty(1, m, device="cuda", dtype=dt)
    ws = [torch.randn(n, m, device="cuda", dtype=dt, generator=g) / m**0.5 for _ in range(copies)]
    y = torch.empty(n, device="cuda", dtype=dt)
    y_ref = G.silu_mul_gemv_reference(gate_up, ws[0])

    def err():
        return ((y.double() - y_ref).pow(2).mean().sqrt() / y_ref.pow(2).mean().sqrt()).item()

    def apart(ws=ws):  # a list of one weight: the checked call
        for w in ws:
            silu_mul_kernel(gate_up[:, :m], gate_up[:, m:], out=act)
            G.gemv(act, w, out=y)

    def gemv_only(ws=ws):
        for w in ws:
            G.gemv(act, w, out=y)

    row = {"shape": "down", "n": n, "m": m, "copies": copies}
    with torch.inference_mode():
        apart(ws[:1])
        row["apart_err"] = err()
        row["apart_us"] = graph_us(apart) / copies
        row["gemv_alone_us"] = graph_us(gemv_only) / copies
        def silu_fold(ws, bn, warps, steps):
            for w in ws:
                G.silu_mul_gemv(gate_up, w, block_n=bn, num_warps=warps, steps=steps, out=y)

        time_configs(row, SILU_CONFIGS, silu_fold, ws, err, graph_us, copies)
    print(json.dumps(row), flush=True)
    return [row]


if __name__ == "__main__":
    main()
