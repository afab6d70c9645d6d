"""KV cache codecs on the GPU: fused quantized decode vs SDPA over the dense bf16 cache, and bytes stored.

    python scripts/bench_kv_cache.py [--ctx 131072] [--ratio-ctx 32768] [--sweep] [--out results.json]
    python scripts/bench_kv_cache.py --mma-sweep [--sweep-ctx 8192 32768 131072] [--small]

Llama-3-8B attention shapes (32 query heads, 8 KV heads, head_dim 128), bf16, batch 1, one layer. In one process:
1. the device copy bandwidth (read + write bytes of a 2 GB copy), the ceiling for everything below;
2. decode attention at `--ctx` tokens: SDPA (`enable_gqa`) over the dense bf16 K/V, against each quantized codec's
   `attend` (through the layer as the engine calls it: the Gluon MMA kernel, kv_quant_decode_mma.py, by default on
   a GPU, and the Triton-language kernel beside it), checked against SDPA over the codec's own dequantized K/V;
   effective bandwidth counts the bytes each path actually reads (codes, scales, zeros, residual window, the split
   partials it writes and reads back). `--sweep` also tries launch variants and reports the best next to the
   default;
3. int4 under the sliding_window backend (window 4096) next to the same backend over the dense cache;
4. stored/original bytes (and allocated device bytes, measured) of every codec after a `--ratio-ctx` prompt.
`--mma-sweep` replaces 2-4 with the launch sweep of the Gluon MMA kernel (issue 20 item 2): at each of
`--sweep-ctx` it times SDPA over the dense bf16 cache, the Triton-language kernel and the MMA kernel's variants
(keys a step, register pipeline or cp.async ring of 2-4 stages, programs an SM, hence splits) for int4 and int8,
the merge kernel alone at the default's split count, and the static step's varlen entry on both kernels; every
variant is checked against a float64 reference (the codes dequantized in fp32, attended in float64) in the same
run, and reports GB/s over the bytes it reads and its speed-up over SDPA (CUDA-graph replays). `--small` runs a
tiny version on the CPU's interpreter (Triton kernel only: Gluon needs a GPU) to check the script itself.
Writes JSON (device, versions, git sha, date, command) and prints a GitHub table last. Timings: triton do_bench,
median, after warm-up; the decode rows also replay a CUDA graph of the same call (`do_bench_cudagraph`), which
takes the Python launch overhead out, so the two columns separate host cost from GPU cost.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

if "--small" in sys.argv and not torch.cuda.is_available():  # the interpreter, set before triton is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")
import triton  # noqa: E402
from triton.testing import do_bench, do_bench_cudagraph  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ollm_triton.attention.base import AttentionBackend  # noqa: E402
from ollm_triton.cache.base import LayerSpec  # noqa: E402
from ollm_triton.kernels import kv_quant_decode  # noqa: E402
from ollm_triton.kernels import quant as Q  # noqa: E402
from ollm_triton.kernels.decode_merge import merge_splits  # noqa: E402
from ollm_triton.kernels.kv_quant_decode import quant_decode, quant_decode_varlen  # noqa: E402
from ollm_triton.registry import registry  # noqa: E402

HQ, HKV, D = 32, 8, 128
DT = torch.bfloat16


def git_sha() -> str:
    if os.environ.get("OLLM_GIT_SHA"):
        return os.environ["OLLM_GIT_SHA"]
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, check=True).stdout.strip()
    except Exception:
        return "unknown"


def bench(fn) -> float:
    return do_bench(fn, warmup=50, rep=200, return_mode="median")


def bench_graph(fn) -> float | None:
    try:
        return do_bench_cudagraph(fn, rep=100, return_mode="median")
    except Exception:  # a path with host syncs cannot be captured
        return None


def rel_err(out, ref) -> float:
    out, ref = out.float(), ref.float()
    return ((out - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt()).item()


def copy_bandwidth() -> float:
    x = torch.randint(0, 255, (2 * 1024**3,), dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    ms = bench(lambda: y.copy_(x))
    return 2 * 2 * 1024**3 / ms / 1e9  # TB/s, read + write


def spec(ctx: int, device: str = "cuda") -> LayerSpec:
    return LayerSpec(batch=1, kv_heads=HKV, head_dim=D, dtype=DT, device=torch.device(device), max_len=ctx + 64)


def fill(layer, k, v, decode_steps=5):
    """A prompt in one append (as after prefill), then a few single-token appends (as while decoding)."""
    n = k.shape[2] - decode_steps
    layer.append(k[:, :, :n], v[:, :, :n])
    for i in range(n, k.shape[2]):
        layer.append(k[:, :, i : i + 1], v[:, :, i : i + 1])
    return layer


def fused_bytes(layer, splits_info) -> int:
    """Bytes the fused decode reads: the quantized region's codes, scales, zeros, the residual window, q, plus
    the split partials (4 query rows a KV head, D + 1 floats each) written and read back, plus the output."""
    n, r = layer.n_quant, layer.n_res
    bh = layer.spec.batch * layer.spec.kv_heads
    sb = layer.k_scale.element_size()
    per_scale = 1 if layer.symmetric else 2
    codes = 2 * n * (D // layer.p)
    scales = per_scale * sb * (n // layer.group * D + n * (D // layer.value_group))
    residual = 2 * r * D * 2
    partial = 2 * splits_info * (HQ // HKV) * (D + 1) * 4  # written then read by the merge
    return bh * (codes + scales + residual) + bh * partial + 2 * HQ * D * 2


def decode_section(ctx: int, sweep: bool) -> dict:
    g = torch.Generator(device="cuda").manual_seed(0)
    k = torch.randn(1, HKV, ctx, D, device="cuda", dtype=DT, generator=g)
    v = torch.randn(1, HKV, ctx, D, device="cuda", dtype=DT, generator=g)
    q = torch.randn(1, HQ, 1, D, device="cuda", dtype=DT, generator=g)
    sdpa = AttentionBackend()  # decode_schedule of a dense backend: every block
    res = {}
    ms = bench(lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True))
    ms_graph = bench_graph(lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True))
    dense_bytes = 2 * k.numel() * 2
    res["sdpa_dense_bf16"] = {"ms": ms, "ms_graph": ms_graph, "bytes_read": dense_bytes, "TBps": dense_bytes / ms / 1e9}
    for name in ("int8", "int4", "int2"):
        layer = fill(registry.build("cache", name).new_layer(spec(ctx)), k, v)
        out = layer.attend(q, sdpa)
        assert layer.last_path == "triton.quant_decode", layer.last_path
        kd, vd = layer.dense()
        ref = F.scaled_dot_product_attention(q.float(), kd.float(), vd.float(), enable_gqa=True)
        err = rel_err(out, ref)
        err_vs_dense = rel_err(out, F.scaled_dot_product_attention(q.float(), k.float(), v.float(), enable_gqa=True))
        del kd, vd
        configs = [{}, {"kernel": "triton"}]  # the default (the MMA kernel on a GPU), and the Triton-language one
        if sweep:
            configs += [{"mma_block_n": n} for n in (32, 64)] + [{"mma_block_n": 32, "mma_maxnreg": 168}]
            configs += [{"kernel": "triton", "block_k": 64}, {"kernel": "triton", "num_stages": 2}]
        rows = []
        for cfg in configs:
            layer.block_k = cfg.get("block_k", type(layer).block_k)
            layer.kernel_options = {k2: v2 for k2, v2 in cfg.items() if k2 != "block_k"}
            try:
                o2 = layer.attend(q, sdpa)
                launch = dict(kv_quant_decode.LAST_LAUNCH)
                e2 = rel_err(o2, ref)
                t = bench(lambda: layer.attend(q, sdpa))  # noqa: B023
                t_graph = bench_graph(lambda: layer.attend(q, sdpa))  # noqa: B023
            except Exception as e:  # a config that does not compile (registers, shared memory) is skipped
                rows.append({"config": cfg, "error": repr(e)[:200]})
                continue
            nbytes = fused_bytes(layer, launch["splits"])
            rows.append({"config": cfg, "ms": t, "ms_graph": t_graph, "err_vs_dequant_sdpa": e2, "bytes_read": nbytes,
                         "TBps": nbytes / t / 1e9, "splits": launch["splits"], "kernel": launch["kernel"]})
        ok = [r for r in rows if "ms" in r and r["err_vs_dequant_sdpa"] < 2e-2]
        best = min(ok, key=lambda r: r["ms"]) if ok else None
        res[name] = {"default": rows[0], "triton": rows[1], "best": best, "sweep": rows, "err_vs_dequant_sdpa": err,
                     "err_vs_dense_sdpa": err_vs_dense, "n_quant": layer.n_quant, "n_res": layer.n_res}
        layer = None  # free it before the next codec
        torch.cuda.empty_cache()
    return res


# the MMA kernel's launch variants per codec: (label, quant_decode options). Keys a step, load pipeline (stages 1:
# the next step in registers; 2-4: a cp.async ring), programs an SM (fewer: fewer splits, a cheaper merge). The
# AOT build for sm_90 (Triton 3.6) gives int4: registers 220 -> 8 an SM; ring bn64 s2 162 regs 17.9 KB -> 12; bn64 s3
# 167 / 26.9 KB -> 8; bn32 s3 168 / 14.2 KB -> 12. int8: registers 210 -> 8; bn32 s2 168 / 17.7 KB -> 12; bn32 s3 130 /
# 26.5 KB -> 8.
MMA_VARIANTS = {
    "int4": [("mma", {}), ("mma bn32", {"mma_block_n": 32}),
             ("mma ring bn64 s2", {"mma_block_n": 64, "mma_stages": 2}),
             ("mma ring bn64 s3", {"mma_block_n": 64, "mma_stages": 3}),
             ("mma ring bn32 s3", {"mma_block_n": 32, "mma_stages": 3}),
             ("mma ring bn64 s2 8/SM", {"mma_block_n": 64, "mma_stages": 2, "programs_per_sm": 8})],
    "int8": [("mma", {}), ("mma ring bn32 s2", {"mma_block_n": 32, "mma_stages": 2}),
             ("mma ring bn32 s3", {"mma_block_n": 32, "mma_stages": 3}),
             ("mma ring bn32 s3 6/SM", {"mma_block_n": 32, "mma_stages": 3, "programs_per_sm": 6})],
}
# the static step's entry (one row, its lengths on the device): the Triton-language kernel, the MMA kernel's default
# and one ring
VARLEN_VARIANTS = {"int4": [("varlen mma", {}), ("varlen mma ring bn64 s2", {"mma_block_n": 64, "mma_stages": 2})],
                   "int8": [("varlen mma", {}), ("varlen mma ring bn32 s2", {"mma_block_n": 32, "mma_stages": 2})]}


def _time_us(fn, device: str) -> float:
    """CUDA-graph replays (median) on a GPU; on the CPU (--small) the median of 3 plain calls."""
    if device == "cuda":
        return 1000 * do_bench_cudagraph(fn, rep=40, return_mode="median")
    import time

    ts = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return 1e6 * sorted(ts)[1]


def _reference64(layer, q) -> torch.Tensor:
    """Attention of q over the layer's codes dequantized in fp32 (kernels/quant.py references) and its residual
    window, in float64: what every variant must match."""
    n, g, d = layer.n_quant, layer.group, D
    kz = None if layer.symmetric else layer.k_zero[:, :, : n // g]
    vz = None if layer.symmetric else layer.v_zero[:, :, :n]
    k = Q.dequantize_keys_ref(layer.k_codes[:, :, :n], layer.k_scale[:, :, : n // g], kz, layer.bits, g, d,
                              layer.symmetric).double()
    v = Q.dequantize_values_ref(layer.v_codes[:, :, :n], layer.v_scale[:, :, :n], vz, layer.bits, layer.value_group,
                                d, layer.symmetric).double()
    k = torch.cat((k, layer.k_res[:, :, : layer.n_res].double()), 2).repeat_interleave(HQ // HKV, 1)
    v = torch.cat((v, layer.v_res[:, :, : layer.n_res].double()), 2).repeat_interleave(HQ // HKV, 1)
    return torch.softmax(q.double() @ k.transpose(-1, -2) / D**0.5, -1) @ v


def mma_sweep_section(ctxs: list[int], device: str, rows: list, save, codecs=("int4", "int8")) -> list[dict]:
    """Appends one row per (context, path) to rows, and calls save() after each context: us (CUDA graph), bytes
    read, GB/s, speed-up over SDPA, rel. error against the float64 reference, splits. Variants that fail to compile
    or launch are recorded with their error. (The lambdas below are called within their own iteration.)"""
    for ctx in ctxs:
        g = torch.Generator(device=device).manual_seed(ctx)
        k = torch.randn(1, HKV, ctx, D, device=device, dtype=DT, generator=g)
        v = torch.randn(1, HKV, ctx, D, device=device, dtype=DT, generator=g)
        q = torch.randn(1, HQ, 1, D, device=device, dtype=DT, generator=g)
        sdpa_ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), enable_gqa=True)
        fn = lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True)  # noqa: E731, B023
        sdpa_us = _time_us(fn, device)
        dense_bytes = 2 * k.numel() * 2
        rows.append({"ctx": ctx, "codec": "bf16", "path": "sdpa", "us": sdpa_us, "bytes_read": dense_bytes,
                     "GBps": dense_bytes / sdpa_us / 1e3, "speedup": 1.0, "err": rel_err(fn(), sdpa_ref)})
        print(json.dumps(rows[-1]), flush=True)
        for name in codecs:
            layer = fill(registry.build("cache", name).new_layer(spec(ctx, device)), k, v)
            ref = _reference64(layer, q)
            store = (layer.k_codes, layer.k_scale, layer.k_zero, layer.v_codes, layer.v_scale, layer.v_zero,
                     layer.k_res, layer.v_res)
            kw = dict(n_quant=layer.n_quant, kv_len=layer.length, bits=layer.bits, key_group=layer.group,
                      value_group=layer.value_group, block_k=layer.block_k)
            out = torch.empty_like(q)
            variants = [("triton", {"kernel": "triton"})] + (MMA_VARIANTS[name] if device == "cuda" else [])
            if device == "cuda" and ctx <= 8192:  # short contexts: one block a split (more programs, no new compile)
                variants.append(("mma 1 block/split", {"num_splits": ctx}))
            fns = [(label, opts, lambda opts=opts: quant_decode(q, *store, **kw, **opts, out=out))  # noqa: B023
                   for label, opts in variants]
            rq = torch.tensor([layer.n_quant], device=device)
            ln = torch.tensor([layer.length], device=device)
            vkw = dict(bits=layer.bits, key_group=layer.group, value_group=layer.value_group, block_k=layer.block_k)
            more = [("varlen mma 1 block/split", {"min_blocks": 1})] if device == "cuda" and ctx <= 8192 else []
            for label, opts in [("varlen triton", {"kernel": "triton"})] + (VARLEN_VARIANTS[name] + more
                                                                            if device == "cuda" else []):
                fns.append((label, opts, lambda opts=opts: quant_decode_varlen(q, *store, rq, ln, **vkw, **opts,  # noqa: B023
                                                                               out=out)))  # noqa: B023
            for label, opts, f in fns:
                row = {"ctx": ctx, "codec": name, "path": label, "options": opts}
                try:
                    out.fill_(float("nan"))
                    row["err"] = rel_err(f(), ref)
                    row["kernel"], row["splits"] = kv_quant_decode.LAST_LAUNCH["kernel"], \
                        kv_quant_decode.LAST_LAUNCH["splits"]
                    row["us"] = _time_us(f, device)
                except Exception as e:  # a variant that does not compile or fit is a finding, not the end of the run
                    row["error"] = repr(e)[:300]
                    rows.append(row)
                    print(json.dumps(row), flush=True)
                    continue
                row["bytes_read"] = fused_bytes(layer, row["splits"])
                row["GBps"] = row["bytes_read"] / row["us"] / 1e3
                row["codes_bytes"] = 2 * HKV * layer.n_quant * (D // layer.p)  # the packed K and V codes alone
                row["GBps_codes"] = row["codes_bytes"] / row["us"] / 1e3
                row["speedup"] = sdpa_us / row["us"]
                rows.append(row)
                print(json.dumps(row), flush=True)
                if label == "mma" and device == "cuda":  # the merge alone, at the default's split count
                    n_split = row["splits"]
                    o_part = torch.randn(HKV * n_split * (HQ // HKV) * D, device=device)
                    l_part = torch.randn(HKV * n_split * (HQ // HKV), device=device)
                    o = torch.empty_like(q)
                    t = _time_us(lambda n=n_split, op=o_part, lp=l_part, o=o: merge_splits(
                        op.view(HKV, n, HQ // HKV, D), lp, o, kv_heads=HKV, group=HQ // HKV, t=1, n_split=n), device)
                    rows.append({"ctx": ctx, "codec": name, "path": "merge alone (mma's splits)", "us": t,
                                 "splits": n_split, "share_of_mma": t / row["us"]})
                    print(json.dumps(rows[-1]), flush=True)
            del layer, ref
            if device == "cuda":
                torch.cuda.empty_cache()
        save()
    return rows


def sweep_table(r: dict) -> str:
    lines = [f"Quantized decode attention launch sweep, batch 1, 32 q / 8 KV heads, d=128, bf16 ({r['device']}; copy "
             f"bandwidth {r.get('copy_TBps') or 0:.2f} TB/s); us: CUDA-graph replays, median; err: rel. RMS against "
             "the float64 reference of the same codes", "",
             "| context | codec | path | us | speed-up vs SDPA | GB/s (all bytes) | % of copy | GB/s (codes) | splits "
             "| rel. err |",
             "| ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    cb = r.get("copy_TBps")
    for row in r["mma_sweep"]:
        if "error" in row:
            lines.append(f"| {row['ctx']} | {row['codec']} | {row['path']} | error: {row['error'][:60]} | | | | | | |")
            continue
        if "share_of_mma" in row:
            lines.append(f"| {row['ctx']} | {row['codec']} | {row['path']} | {row['us']:.1f} | | | | | "
                         f"{row['splits']} | {100 * row['share_of_mma']:.0f}% of mma |")
            continue
        pct = f"{100 * row['GBps'] / 1e3 / cb:.0f}%" if cb else "-"
        codes = f"{row['GBps_codes']:.0f}" if "GBps_codes" in row else "-"
        lines.append(f"| {row['ctx']} | {row['codec']} | {row['path']} | {row['us']:.1f} | {row['speedup']:.2f}x | "
                     f"{row['GBps']:.0f} | {pct} | {codes} | {row.get('splits', '-')} | {row['err']:.1e} |")
    # the fastest variant within the kernels' error level (the Triton kernel's 2.8-3.4e-3), per context and codec
    lines += ["", "Fastest correct (rel. err < 1e-2) per context and codec, static and varlen entries:"]
    for ctx in r["ctx"]:
        for codec in ("int4", "int8"):
            for varlen in (False, True):
                ok = [x for x in r["mma_sweep"] if x["ctx"] == ctx and x["codec"] == codec and "us" in x
                      and "err" in x and x["err"] < 1e-2 and x["path"].startswith("varlen") == varlen]
                if ok:
                    best = min(ok, key=lambda x: x["us"])
                    lines.append(f"- {ctx} {codec}{' varlen' if varlen else ''}: {best['path']} {best['options']} "
                                 f"{best['us']:.1f} us, {best['speedup']:.2f}x SDPA")
    bad = [x for x in r["mma_sweep"] if "error" in x or ("err" in x and x["err"] >= 1e-2)]
    lines.append(f"Variants failing (error or rel. err >= 1e-2): {len(bad)}" + "".join(
        f"\n- {x['ctx']} {x['codec']} {x['path']}: {x.get('error') or x['err']}" for x in bad))
    return "\n".join(lines)


def window_section(ctx: int) -> dict:
    try:
        sw = registry.build("attention", "sliding_window", {"window": 4096, "sink": 4})
    except Exception as e:
        return {"skipped": repr(e)}
    g = torch.Generator(device="cuda").manual_seed(1)
    k = torch.randn(1, HKV, ctx, D, device="cuda", dtype=DT, generator=g)
    v = torch.randn(1, HKV, ctx, D, device="cuda", dtype=DT, generator=g)
    q = torch.randn(1, HQ, 1, D, device="cuda", dtype=DT, generator=g)
    out = {}
    dense = fill(registry.build("cache", "dense").new_layer(spec(ctx)), k, v)
    int4 = fill(registry.build("cache", "int4").new_layer(spec(ctx)), k, v)
    o_dense = sw.decode(q, dense)
    out["dense_path"] = sw.last_path
    o_int4 = sw.decode(q, int4)
    out["int4_path"] = sw.last_path
    kd, vd = int4.dense()
    ref = sw.prefill(q, kd, vd, q_offset=kd.shape[2] - 1)
    out["int4_err_vs_dequant_window"] = rel_err(o_int4, ref)
    out["int4_err_vs_dense_window"] = rel_err(o_int4, o_dense)
    out["dense_ms"] = bench(lambda: sw.decode(q, dense))
    out["int4_ms"] = bench(lambda: sw.decode(q, int4))
    return out


def ratio_section(ctx: int) -> dict:
    g = torch.Generator(device="cuda").manual_seed(2)
    k = torch.randn(1, HKV, ctx, D, device="cuda", dtype=DT, generator=g)
    v = torch.randn(1, HKV, ctx, D, device="cuda", dtype=DT, generator=g)
    q = torch.randn(1, HQ, ctx, D, device="cuda", dtype=DT, generator=g)
    res = {}
    for name, params in [("dense", {}), ("int8", {}), ("int4", {}), ("int2", {}), ("cluster", {}),
                         ("streaming", {"ratio": 0.25}), ("h2o", {"ratio": 0.25}), ("snapkv", {"ratio": 0.25})]:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        try:
            layer = registry.build("cache", name, params).new_layer(spec(ctx))
            layer.append(k, v)
            layer.observe(q)
            layer.append(k[:, :, -1:], v[:, :, -1:])  # the eviction owed by the prompt happens here
            layer.observe(q[:, :, -1:])
            torch.cuda.synchronize()
            res[name] = {"params": params, "stored_bytes": layer.stored_bytes(),
                         "original_bytes": layer.original_bytes(),
                         "ratio": layer.stored_bytes() / layer.original_bytes(), "tokens_kept": layer.length,
                         "allocated_bytes": torch.cuda.memory_allocated() - base,
                         "compress_s": layer.compress_seconds}
            del layer
        except Exception as e:
            res[name] = {"error": repr(e)[:300]}
        torch.cuda.empty_cache()
    return res


def _ms(x) -> str:
    return "-" if x is None else f"{x:.4f}"


def _tbps(row: dict) -> str:
    return f"{row['bytes_read'] / row['ms_graph'] / 1e9:.2f}" if row.get("ms_graph") else "-"


def _pct(row: dict, copy_tbps: float) -> str:
    return f"{100 * row['bytes_read'] / row['ms_graph'] / 1e9 / copy_tbps:.0f}%" if row.get("ms_graph") else "-"


def table(r: dict) -> str:
    cb = r["copy_TBps"]
    dec = r["decode"]
    sd = dec["sdpa_dense_bf16"]
    lines = [f"Decode attention, 1 x {r['ctx']} tokens, 32 q / 8 KV heads, d=128, bf16 ({r['device']}; "
             f"copy bandwidth {cb:.2f} TB/s)", "",
             "The plain ms include the Python launch cost of each call (host-bound, noisy); the CUDA-graph columns "
             "are the GPU's time.", "",
             "| path | ms | ms (CUDA graph) | speedup vs SDPA (graph) | bytes read (MB) | TB/s (graph) | "
             "% of copy BW (graph) | rel. err |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |",
             f"| SDPA, dense bf16 | {sd['ms']:.4f} | {_ms(sd.get('ms_graph'))} | 1.00x | "
             f"{sd['bytes_read'] / 1e6:.0f} | {_tbps(sd)} | {_pct(sd, cb)} | - |"]
    for name in ("int8", "int4", "int2"):
        if name not in dec:
            continue
        for label in ("default", "triton", "best"):
            row = dec[name].get(label)
            if not row or "ms" not in row or (label == "best" and row["config"] in ({}, {"kernel": "triton"})):
                continue
            cfg = f" ({row.get('kernel', '?')} kernel)" + ("" if label != "best" else f" best {row['config']}")
            both = row.get("ms_graph") and sd.get("ms_graph")
            speedup = f"{sd['ms_graph'] / row['ms_graph']:.2f}x" if both else "-"
            lines.append(f"| {name} fused{cfg} | {row['ms']:.4f} | {_ms(row.get('ms_graph'))} | {speedup} | "
                         f"{row['bytes_read'] / 1e6:.0f} | {_tbps(row)} | {_pct(row, cb)} | "
                         f"{row['err_vs_dequant_sdpa']:.1e} |")
    w = r.get("window", {})
    if "int4_ms" in w:
        lines += ["", f"sliding_window 4096 at {r['ctx']}: dense cache {w['dense_ms']:.4f} ms ({w['dense_path']}), "
                  f"int4 {w['int4_ms']:.4f} ms ({w['int4_path']}), int4 err vs its dequantized window "
                  f"{w['int4_err_vs_dequant_window']:.1e}"]
    lines += ["", f"Bytes after a {r['ratio_ctx']}-token prompt and one decode step (one layer, 8 KV heads, d=128, "
              "bf16)", "",
              "| codec | stored / original | tokens kept | allocated (MB, measured) | compress ms |",
              "| --- | --- | --- | --- | --- |"]
    for name, row in r["ratios"].items():
        if "error" in row:
            lines.append(f"| {name} | error: {row['error'][:80]} | | | |")
            continue
        lines.append(f"| {name} {row['params'] or ''} | {row['ratio']:.3f} | {row['tokens_kept']} | "
                     f"{row['allocated_bytes'] / 1e6:.1f} | {1000 * row['compress_s']:.1f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ctx", type=int, default=131072)
    ap.add_argument("--ratio-ctx", type=int, default=32768)
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--mma-sweep", action="store_true", help="the MMA kernel's launch sweep at --sweep-ctx instead")
    ap.add_argument("--sweep-ctx", type=int, nargs="+", default=[8192, 32768, 131072])
    ap.add_argument("--small", action="store_true", help="--mma-sweep at tiny contexts (runs on the CPU)")
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "bench_kv_cache.json"))
    a = ap.parse_args()
    if a.mma_sweep:
        return mma_sweep_main(a)
    r = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "git_sha": git_sha(),
        "device": torch.cuda.get_device_name(0),
        "sms": torch.cuda.get_device_properties(0).multi_processor_count,
        "torch": torch.__version__, "triton": triton.__version__, "python": sys.version.split()[0],
        "ctx": a.ctx, "ratio_ctx": a.ratio_ctx,
    }
    r["copy_TBps"] = copy_bandwidth()
    print(f"copy {r['copy_TBps']:.2f} TB/s", flush=True)
    for key, fn in (("decode", lambda: decode_section(a.ctx, a.sweep)), ("window", lambda: window_section(a.ctx)),
                    ("ratios", lambda: ratio_section(a.ratio_ctx))):
        try:
            r[key] = fn()
        except Exception as e:  # keep the other sections' numbers
            import traceback

            r[key] = {"error": repr(e), "trace": traceback.format_exc()[-2000:]}
        print(key, json.dumps(r[key], default=str)[:3000], flush=True)
        Path(a.out).write_text(json.dumps(r, indent=1, default=str))
    print(table(r))


def mma_sweep_main(a) -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    ctxs = [256, 640] if a.small else a.sweep_ctx
    r = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "git_sha": git_sha(),
        "device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu (interpreter)",
        "torch": torch.__version__, "triton": triton.__version__, "python": sys.version.split()[0], "ctx": ctxs,
    }
    r["copy_TBps"] = copy_bandwidth() if device == "cuda" else None
    r["mma_sweep"] = []
    save = lambda: Path(a.out).write_text(json.dumps(r, indent=1, default=str))  # noqa: E731
    mma_sweep_section(ctxs, device, r["mma_sweep"], save)
    print(sweep_table(r))


if __name__ == "__main__":
    main()
