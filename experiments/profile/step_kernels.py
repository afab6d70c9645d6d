"""Candidates for the batch-1 decode step's small costs, timed as the step runs them (H200 only).

    python experiments/profile/step_kernels.py        # prints JSON lines

1. The one-shot Triton GEMV (kernels/gemv.py: each program loads BLOCK_N whole weight rows at once) against
   cuBLAS (`F.linear`) at llama3_8b's batch-1 shapes. Each timing is one CUDA graph over 8 different weight copies
   (so nothing is served from the 50 MB L2 that a single replayed weight would sit in), divided by 8.
2. The fused residual-add + RMSNorm kernel at 4096 wide with 4, 8 and 16 warps, each run after a GEMV of a cold
   weight as in the step (graph of 8 x [GEMV, norm] minus the graph of the 8 GEMVs alone).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from ollm_triton.kernels import gemv as K  # noqa: E402
from ollm_triton.kernels import norm as N  # noqa: E402

COPIES = 8


def gemv(x, w, y, block_n, warps):
    K.gemv(x, w, block_n=block_n, num_warps=warps, out=y)


def graph_us(fn, reps=20) -> float:
    """Median over reps of one replay of a graph capturing fn(), in microseconds."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    for _ in range(3):
        g.replay()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1000)
    return sorted(times)[len(times) // 2]


def main():
    dt = torch.bfloat16
    x = torch.randn(1, 14336, device="cuda", dtype=dt)
    for name, (n, k) in {"qkv": (6144, 4096), "o_proj": (4096, 4096), "down": (4096, 14336),
                         "gate_up": (28672, 4096)}.items():
        ws = [torch.randn(n, k, device="cuda", dtype=dt) * 0.02 for _ in range(COPIES)]
        xk = x[:, :k].contiguous()
        ys = [torch.empty(1, n, device="cuda", dtype=dt) for _ in range(COPIES)]
        ref = F.linear(xk.double(), ws[0].double()).float()
        t = graph_us(lambda: [F.linear(xk, w) for w in ws]) / COPIES  # noqa: B023
        nbytes = n * k * 2
        print(json.dumps({"shape": name, "impl": "cublas", "us": round(t, 2), "TBps": round(nbytes / t / 1e6, 3)}),
              flush=True)
        for bn, warps in ((1, 4), (2, 4), (2, 8), (4, 4), (4, 8), (8, 8)):
            if bn * triton.next_power_of_2(k) * 2 // (warps * 32) > 512:  # > 256 registers of weights a thread
                continue
            row = {"shape": name, "impl": f"oneshot bn{bn} w{warps}"}
            try:
                gemv(xk, ws[0], ys[0], bn, warps)
                row["err"] = ((ys[0].float() - ref).norm() / ref.norm()).item()

                def run_all(bn=bn, warps=warps, ws=ws, ys=ys, xk=xk):
                    for w, y in zip(ws, ys, strict=True):
                        gemv(xk, w, y, bn, warps)

                row["us"] = round(graph_us(run_all) / COPIES, 2)
                row["TBps"] = round(nbytes / row["us"] / 1e6, 3)
            except Exception as e:  # noqa: BLE001 - a config that does not compile or fit is a finding
                row["error"] = repr(e)[:160]
            print(json.dumps(row), flush=True)
        ws = ys = None
        torch.cuda.empty_cache()

    # the norm after a cold GEMV, as in the step
    h = 4096
    ws = [torch.randn(h, h, device="cuda", dtype=dt) * 0.02 for _ in range(COPIES)]
    nw = [torch.rand(h, device="cuda", dtype=dt) + 0.5 for _ in range(COPIES)]
    xh = torch.randn(1, h, device="cuda", dtype=dt)
    res = torch.randn(1, h, device="cuda", dtype=dt)
    outs = [torch.empty(1, h, device="cuda", dtype=dt) for _ in range(COPIES)]
    base = graph_us(lambda: [F.linear(xh, w) for w in ws])
    orig = N._num_warps
    for warps in (4, 8, 16):
        N._num_warps = lambda block, w=warps: w  # noqa: E731
        def step():
            for w, g, o in zip(ws, nw, outs, strict=True):
                d = F.linear(xh, w)
                N.rmsnorm_kernel(d, g, 1e-5, residual=res, out=o)
        t = (graph_us(step) - base) / COPIES
        print(json.dumps({"kernel": "add_rmsnorm 4096", "warps": warps, "us_after_gemv": round(t, 2)}), flush=True)
    N._num_warps = orig


if __name__ == "__main__":
    main()
