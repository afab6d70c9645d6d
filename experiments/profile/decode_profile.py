"""Where the decode kernels spend their time: a launch-config sweep (CUDA-graph timed) and a target for `ncu`.

    python experiments/profile/decode_profile.py sweep [--ctx 131072] [--dense-ctx 32768] [--quant-only]  # JSON lines
    ncu --clock-control none --kernel-name regex:'decode' python experiments/profile/decode_profile.py run int4
    ncu --profile-from-start off --clock-control none --set full -o $OUT/int4_ring \
        python experiments/profile/decode_profile.py run int4 --calls 1 --opts '{"mma_stages": 2}' [--varlen]

`sweep` times the dense flash decode (batch 1 and 8, at --dense-ctx and --ctx) and the fused quantized decode
(int4/int8/int2 at --ctx, batch 1) over a few launch configurations, each replayed from a CUDA graph (no launch
overhead), next to SDPA on the same dense cache and the device copy bandwidth.
`run X` calls one path a few times so that `ncu` can read its counters: the calls are warmed up (compiled) first,
and only the last `--calls` run between cudaProfilerStart/Stop, so `ncu --profile-from-start off` sees the decode
and its merge and nothing of the setup (the K/V fill, the quantization, the compiles). `--opts` passes quant_decode
launch options as JSON (kernel, mma_block_n, mma_stages, programs_per_sm, num_splits, ...); `--varlen` runs the
static step's entry (quant_decode_varlen, one row, lengths on the device) instead of the layer's attend.
Llama-3-8B attention shapes, bf16, batch 1, random normal K/V.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from triton.testing import do_bench, do_bench_cudagraph

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from ollm_triton.attention.base import AttentionBackend  # noqa: E402
from ollm_triton.cache.base import LayerSpec  # noqa: E402
from ollm_triton.kernels import kv_quant_decode  # noqa: E402
from ollm_triton.kernels.attention_decode import flash_decode  # noqa: E402
from ollm_triton.kernels.kv_quant_decode import quant_decode_varlen  # noqa: E402
from ollm_triton.registry import registry  # noqa: E402

HQ, HKV, D = 32, 8, 128
DT = torch.bfloat16


def kv(ctx: int, seed: int = 0, batch: int = 1):
    g = torch.Generator(device="cuda").manual_seed(seed)
    k = torch.randn(batch, HKV, ctx, D, device="cuda", dtype=DT, generator=g)
    v = torch.randn(batch, HKV, ctx, D, device="cuda", dtype=DT, generator=g)
    q = torch.randn(batch, HQ, 1, D, device="cuda", dtype=DT, generator=g)
    return q, k, v


def quant_layer(name: str, k, v):
    ctx = k.shape[2]
    spec = LayerSpec(batch=1, kv_heads=HKV, head_dim=D, dtype=DT, device=torch.device("cuda"), max_len=ctx + 64)
    layer = registry.build("cache", name).new_layer(spec)
    layer.append(k[:, :, : ctx - 3], v[:, :, : ctx - 3])
    for i in range(ctx - 3, ctx):  # a few decode appends, so the residual window is not empty
        layer.append(k[:, :, i : i + 1], v[:, :, i : i + 1])
    return layer


# (block_k, launch options) of the fused quantized decode to time; {} is the default launch
QUANT_CONFIGS = (
    (128, {}), (128, {"kernel": "triton"}), (128, {"kernel": "mma", "mma_block_n": 32}),
    (128, {"kernel": "mma", "mma_block_n": 32, "mma_maxnreg": 168}), (128, {"kernel": "mma", "mma_block_n": 64}),
    (128, {"kernel": "mma", "mma_block_n": 64, "mma_maxnreg": 168}),
    (128, {"kernel": "mma", "mma_block_n": 64, "mma_stages": 2}), (128, {"kernel": "mma", "mma_block_n": 32,
                                                                         "mma_stages": 3}),
)


def us(fn) -> float:
    return 1000 * do_bench_cudagraph(fn, rep=100, return_mode="median")


def rel(a, b) -> float:
    a, b = a.float(), b.float()
    return ((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt()).item()


def sweep(ctx: int, dense_ctx: int, quant_only: bool = False) -> None:
    x = torch.randint(0, 255, (2 * 1024**3,), dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    t = 1000 * do_bench(lambda: y.copy_(x), warmup=50, rep=200, return_mode="median")
    print(json.dumps({"path": "copy_2GB", "us": t, "TBps": 2 * x.numel() / t / 1e6}), flush=True)
    x = y = None  # free the 4 GB before the decode cases
    for b, n in () if quant_only else ((1, dense_ctx), (8, dense_ctx), (1, ctx), (8, ctx)):
        q, k, v = kv(n, batch=b)
        bytes_kv = 2 * k.numel() * k.element_size()
        ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), enable_gqa=True)
        t = us(lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True))  # noqa: B023
        print(json.dumps({"path": "sdpa", "b": b, "ctx": n, "us": t, "TBps": bytes_kv / t / 1e6}), flush=True)
        for cfg in ({}, {"num_stages": 3, "programs_per_sm": 3}, {"num_stages": 3}, {"num_stages": 3, "block_n": 128},
                    {"num_splits": 64}):
            row = {"path": "flash_decode", "b": b, "ctx": n} | cfg
            try:
                fn = lambda: flash_decode(q, k, v, **cfg)  # noqa: E731,B023
                row["err"] = rel(fn(), ref)
                row["us"] = us(fn)
                row["TBps"] = bytes_kv / row["us"] / 1e6
            except Exception as e:
                row["error"] = repr(e)[:160]
            print(json.dumps(row), flush=True)
        del q, k, v, ref
        torch.cuda.empty_cache()
    q, k, v = kv(ctx)
    t = us(lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True))
    print(json.dumps({"path": "sdpa", "b": 1, "ctx": ctx, "us": t}), flush=True)
    backend = AttentionBackend()
    for name in ("int4", "int8", "int2"):
        layer = quant_layer(name, k, v)
        kd, vd = layer.dense()
        ref = F.scaled_dot_product_attention(q.float(), kd.float(), vd.float(), enable_gqa=True)
        del kd, vd
        for bk, opts in QUANT_CONFIGS:
            layer.block_k = bk
            layer.kernel_options = opts
            row = {"path": name, "ctx": ctx, "block_k": bk} | opts
            try:
                row["err"] = rel(layer.attend(q, backend), ref)
                row["us"] = us(lambda: layer.attend(q, backend))  # noqa: B023
            except Exception as e:  # a config that does not fit (registers, shared memory)
                row["error"] = repr(e)[:160]
            print(json.dumps(row), flush=True)
        layer = None  # free it before the next codec
        torch.cuda.empty_cache()


def run(what: str, ctx: int, dense_ctx: int, calls: int = 5, opts: dict | None = None, varlen: bool = False) -> None:
    """Warm up, then `calls` calls of one path inside a profiler range (ncu --profile-from-start off)."""
    opts = opts or {}
    if what == "dense":
        q, k, v = kv(dense_ctx)
        fn = lambda: flash_decode(q, k, v, **opts)  # noqa: E731
    else:
        q, k, v = kv(ctx)
        layer = quant_layer(what, k, v)
        if varlen:
            store = (layer.k_codes, layer.k_scale, layer.k_zero, layer.v_codes, layer.v_scale, layer.v_zero,
                     layer.k_res, layer.v_res)
            rq = torch.tensor([layer.n_quant], device="cuda")
            ln = torch.tensor([layer.length], device="cuda")
            fn = lambda: quant_decode_varlen(q, *store, rq, ln, bits=layer.bits, key_group=layer.group,  # noqa: E731
                                             value_group=layer.value_group, block_k=layer.block_k, **opts)
        else:
            layer.kernel_options = opts
            fn = lambda: layer.attend(q, AttentionBackend())  # noqa: E731
    for _ in range(2):  # compiles, the occupancy probe, the allocator
        fn()
    torch.cuda.synchronize()
    torch.cuda.profiler.start()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    torch.cuda.profiler.stop()
    launch = dict(kv_quant_decode.LAST_LAUNCH) if what != "dense" else {}
    print(json.dumps({"path": what, "ctx": ctx if what != "dense" else dense_ctx, "varlen": varlen, "opts": opts,
                      "calls": calls} | launch), flush=True)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["sweep", "run"])
    ap.add_argument("what", nargs="?", default="int4", help="run: int8 | int4 | int2 | dense")
    ap.add_argument("--ctx", type=int, default=131072)
    ap.add_argument("--dense-ctx", type=int, default=32768)
    ap.add_argument("--quant-only", action="store_true", help="sweep: skip the dense decode cases")
    ap.add_argument("--calls", type=int, default=5, help="run: calls inside the profiler range")
    ap.add_argument("--opts", type=json.loads, default={}, help="run: launch options as JSON")
    ap.add_argument("--varlen", action="store_true", help="run: the static step's quant_decode_varlen")
    a = ap.parse_args()
    if a.mode == "sweep":
        sweep(a.ctx, a.dense_ctx, a.quant_only)
    else:
        run(a.what, a.ctx, a.dense_ctx, a.calls, a.opts, a.varlen)
