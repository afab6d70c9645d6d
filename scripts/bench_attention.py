"""Attention kernels on the GPU, side by side with SDPA (flash, cuDNN) and FlexAttention in one process.

    python scripts/bench_attention.py [--out bench_attention.json] [--quick]

Shapes: bf16, 32 query heads, 8 KV heads, head_dim 128, batch 1 unless stated (Llama-3-8B attention).
1. device copy bandwidth (bytes read + written by a 2 GB copy): the decode ceiling;
2. dense causal prefill at 8k and 32k: TFLOP/s (4 n^2 d H / 2) of our kernel (default tiles, plus a few
   alternative tile configs), SDPA flash and cuDNN (K/V repeated to 32 heads outside the timing, as the anchors
   did), FlexAttention (torch.compile'd, enable_gqa); target >= 1.1x Flex and >= 0.8x cuDNN;
3. sliding window 4096 (+4 sinks) at 32k: ours vs FlexAttention with the same mask; target faster than Flex;
4. block-sparse (local and bigbird, 128-token blocks) at density 1/2, 1/4, 1/8 at 32k vs our dense time;
   target time <= 1.2 x d x dense (d = visited fraction of the causal tiles, measured), Flex on the same blocks;
5. decode (one new token) at 32k and 128k, batch 1 and 8: effective bandwidth (K+V bytes / time) vs the copy
   bandwidth (target >= 85%) and vs SDPA (enable_gqa) on the same cache; timed plainly and as CUDA-graph replays
   (the launch-free number), plus a few kernel variants; sliding-window decode on the same cache.
Every case checks our output against SDPA/reference on the GPU before timing. Timings: triton.testing.do_bench
(median) after warm-up. Writes JSON (device, versions, git sha, date, command) and prints a GitHub table last.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench, do_bench_cudagraph

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ollm_triton.kernels.attention_decode import flash_decode  # noqa: E402
from ollm_triton.kernels.attention_prefill import flash_prefill, prefill_config  # noqa: E402
from ollm_triton.kernels.attention_schedule import SparsePattern, build_schedule, decode_block_ids  # noqa: E402

HQ, HKV, D = 32, 8, 128
DT = torch.bfloat16
DEV = "cuda"
SIZES = {"prefill": (8192, 32768), "long": 32768, "window": 4096,
         "decode": ((1, 32768), (1, 131072), (8, 32768), (8, 131072))}
PREFILL_CONFIGS = [  # (block_m, block_n, warps, stages); the first is the kernels' default
    (128, 128, 8, 2), (128, 64, 8, 3), (128, 128, 8, 3),
]
T0 = time.time()
BUDGET_S = 240.0  # optional parts (sweeps, Flex on sparse blocks) are skipped past this many seconds


def have_time() -> bool:
    return time.time() - T0 < BUDGET_S
ROWS: list[dict] = []
RESULTS: dict = {}


def ms(fn) -> float:
    if DEV != "cuda":  # --smoke on a CPU (the interpreter): one timed call, only to exercise the script
        fn()
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3
    return do_bench(fn, warmup=25, rep=100, return_mode="median")


def ms_graph(fn) -> float:
    return do_bench_cudagraph(fn, rep=50, return_mode="median") if DEV == "cuda" else ms(fn)


def rel_rms(a, b) -> float:
    a, b = a.float(), b.float()
    return float((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt())


def section(name):
    def deco(fn):
        t = time.time()
        try:
            RESULTS[name] = fn()
        except Exception as e:  # one failed section must not lose the others
            RESULTS[name] = {"error": repr(e)[:500], "trace": traceback.format_exc()[-2000:]}
            print(f"[{name}] FAILED: {e!r}", flush=True)
        RESULTS[name + "_seconds"] = round(time.time() - t, 1)
        print(f"[{name}] {time.time() - t:.1f}s", flush=True)
        return fn
    return deco


def row(case, ours, unit, baselines, target, met, note=""):
    ROWS.append({"case": case, "ours": ours, "unit": unit, "baselines": baselines, "target": target,
                 "met": met, "note": note})
    print("ROW", json.dumps(ROWS[-1]), flush=True)


def qkv(b, t, s, seed=0):
    g = torch.Generator(device=DEV).manual_seed(seed)
    q = torch.randn(b, HQ, t, D, device=DEV, dtype=DT, generator=g)
    k = torch.randn(b, HKV, s, D, device=DEV, dtype=DT, generator=g)
    v = torch.randn(b, HKV, s, D, device=DEV, dtype=DT, generator=g)
    return q, k, v


def flex():
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    return torch.compile(flex_attention), create_block_mask


def sdpa_backend(name):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([{"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}[name]])


def main():
    global BUDGET_S, DEV, HQ, HKV, DT
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "bench_attention.json"))
    ap.add_argument("--quick", action="store_true", help="skip the config sweeps and Flex on sparse blocks")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU interpreter: checks the script only")
    ap.add_argument("--budget-s", type=float, default=BUDGET_S, help="skip optional parts after this many seconds")
    args = ap.parse_args()
    BUDGET_S = args.budget_s
    quick = args.quick
    if args.smoke:
        DEV, HQ, HKV, DT, quick = "cpu", 4, 1, torch.float16, True
        SIZES.update(prefill=(256, 512), long=512, window=64, decode=((1, 1024), (2, 512)))
    dense_ms: dict[int, float] = {}
    copy = {}

    @section("env")
    def _():
        cuda = DEV == "cuda"
        env = {"device": torch.cuda.get_device_name(0) if cuda else "cpu (interpreter smoke run)",
               "torch": torch.__version__, "triton": triton.__version__, "python": sys.version.split()[0],
               "sms": torch.cuda.get_device_properties(0).multi_processor_count if cuda else 0,
               "git_sha": git_sha(), "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
               "command": "python " + " ".join(sys.argv)}
        print(env, flush=True)
        return env

    @section("copy_bandwidth")
    def _():
        x = torch.empty(2 * 1024**3 if DEV == "cuda" else 1 << 24, dtype=torch.uint8, device=DEV).random_(0, 255)
        y = torch.empty_like(x)
        t = ms(lambda: y.copy_(x))
        copy["TBps"] = 2 * x.numel() / t / 1e9
        return {"TBps": round(copy["TBps"], 3), "ms": t}

    fa = create_block_mask = None
    try:
        if DEV == "cuda":
            fa, create_block_mask = flex()
    except Exception as e:  # keep the other baselines
        print("flex unavailable:", e)

    def prefill_case(n):
        q, k, v = qkv(1, n, n)
        flops = 4 * n * n * D * HQ / 2
        out = torch.empty_like(q)
        res = {}
        kk, vv = k.repeat_interleave(HQ // HKV, 1), v.repeat_interleave(HQ // HKV, 1)
        with sdpa_backend("cudnn") if DEV == "cuda" else contextlib.nullcontext():
            ref = F.scaled_dot_product_attention(q, kk, vv, is_causal=True)
        configs = PREFILL_CONFIGS[:1] if quick else PREFILL_CONFIGS
        for i, (bm, bn, w, st) in enumerate(configs):
            if i and not have_time():
                break
            try:
                sched = build_schedule(n, n, 0, bm, bn, device=DEV)
                out.fill_(float("nan"))
                flash_prefill(q, k, v, sched, num_warps=w, num_stages=st, out=out)
                err = rel_rms(out, ref)
                t = ms(lambda: flash_prefill(q, k, v, sched, num_warps=w, num_stages=st, out=out))  # noqa: B023 (called at once)
                res[f"ours_{bm}x{bn}_w{w}_s{st}"] = {"ms": t, "TFLOPs": flops / t / 1e9, "rel_rms_vs_cudnn": err}
            except Exception as e:
                res[f"ours_{bm}x{bn}_w{w}_s{st}"] = {"error": repr(e)[:300]}
        for name in ("flash", "cudnn"):
            try:
                with sdpa_backend(name):
                    t = ms(lambda: F.scaled_dot_product_attention(q, kk, vv, is_causal=True))
                res[f"sdpa_{name}"] = {"ms": t, "TFLOPs": flops / t / 1e9}
            except Exception as e:
                res[f"sdpa_{name}"] = {"error": repr(e)[:300]}
        if fa is not None:
            try:
                bmask = create_block_mask(lambda b, h, qi, ki: qi >= ki, None, None, n, n, device=DEV)
                o = fa(q, k, v, block_mask=bmask, enable_gqa=True)
                t = ms(lambda: fa(q, k, v, block_mask=bmask, enable_gqa=True))
                res["flex"] = {"ms": t, "TFLOPs": flops / t / 1e9, "rel_rms_vs_cudnn": rel_rms(o, ref)}
            except Exception as e:
                res["flex"] = {"error": repr(e)[:300]}
        ours = {k_: v_ for k_, v_ in res.items() if k_.startswith("ours") and "ms" in v_}
        bm0, bn0, w0, s0 = PREFILL_CONFIGS[0]
        default = res.get(f"ours_{bm0}x{bn0}_w{w0}_s{s0}", {})
        best_name = min(ours, key=lambda k_: ours[k_]["ms"]) if ours else None
        dense_ms[n] = default.get("ms", float("nan"))
        tf = default.get("TFLOPs", 0.0)
        base = {k_: round(res[k_]["TFLOPs"], 1) for k_ in ("sdpa_flash", "sdpa_cudnn", "flex")
                if "TFLOPs" in res.get(k_, {})}
        need = max(1.1 * base.get("flex", 0), 0.8 * base.get("sdpa_cudnn", 0))
        note = f"best config {best_name}: {ours[best_name]['TFLOPs']:.0f} TFLOP/s" if best_name else ""
        if "rel_rms_vs_cudnn" in default:
            note += f"; rel RMS vs cuDNN {default['rel_rms_vs_cudnn']:.1e}"
        row(f"causal prefill {n // 1024}k (TFLOP/s)", round(tf, 1), "TFLOP/s", base,
            f">= 1.1x Flex, >= 0.8x cuDNN ({need:.0f})", bool(tf >= need), note)
        return res

    for size in SIZES["prefill"]:
        section(f"prefill_{size // 1024}k" if size >= 1024 else f"prefill_{size}")(lambda size=size: prefill_case(size))

    n = SIZES["long"]

    @section("sliding_window_32k")
    def _():
        q, k, v = qkv(1, n, n, seed=1)
        window, sink = SIZES["window"], 4
        cfg = prefill_config(D, DT, n)
        sched = build_schedule(n, n, 0, cfg.block_m, cfg.block_n, device=DEV, window=window, sink=sink)
        out = torch.empty_like(q).fill_(float("nan"))
        flash_prefill(q, k, v, sched, out=out)
        res = {"tiles": [cfg.block_m, cfg.block_n], "visited_tiles": sched.visited_tiles()}
        res["ours_ms"] = t_ours = ms(lambda: flash_prefill(q, k, v, sched, out=out))
        if not quick:  # the other tile width, for the record
            s64 = build_schedule(n, n, 0, 128, 64, device=DEV, window=window, sink=sink)
            res["ours_128x64_ms"] = ms(lambda: flash_prefill(q, k, v, s64, out=out))
        base = {}
        if fa is not None:
            def sw(b, h, qi, ki):
                return (qi >= ki) & ((qi - ki < window) | (ki < sink))
            bmask = create_block_mask(sw, None, None, n, n, device=DEV)
            o = fa(q, k, v, block_mask=bmask, enable_gqa=True)
            res["rel_rms_vs_flex"] = rel_rms(out, o)
            res["flex_ms"] = t_flex = ms(lambda: fa(q, k, v, block_mask=bmask, enable_gqa=True))
            base["flex ms"] = round(t_flex, 3)
        row(f"sliding window {window}+4 sinks, {n // 1024}k (ms)", round(t_ours, 3), "ms", base, "< Flex",
            bool(base and t_ours < base["flex ms"]),
            f"rel RMS vs Flex {res.get('rel_rms_vs_flex', float('nan')):.1e}; dense {dense_ms.get(n, 0):.2f} ms")
        return res

    @section("block_sparse_32k")
    def _():
        q, k, v = qkv(1, n, n, seed=2)
        out = torch.empty_like(q)
        cfg = prefill_config(D, DT, n)
        dense_tiles = build_schedule(n, n, 0, cfg.block_m, cfg.block_n).visited_tiles()
        res = {}
        for kind in ("local", "bigbird"):
            for d in (0.5, 0.25, 0.125):
                pat = SparsePattern(kind=kind, block_size=128, density=d, num_global=1, seed=0)
                sched = build_schedule(n, n, 0, cfg.block_m, cfg.block_n, device=DEV, pattern=pat)
                got = sched.visited_tiles() / dense_tiles
                out.fill_(float("nan"))
                flash_prefill(q, k, v, sched, out=out)
                t = ms(lambda: flash_prefill(q, k, v, sched, out=out))  # noqa: B023 (called at once)
                r = {"density": got, "ms": t, "ratio_to_dense": t / dense_ms.get(n, float("nan"))}
                base = {}
                if fa is not None and kind == "bigbird" and d == 0.25 and not quick and have_time():
                    try:
                        blocks = pat.rows(torch.arange(n // 128), n // 128).to(DEV)

                        def mm(b, h, qi, ki, blocks=blocks):
                            return blocks[qi // 128, ki // 128] & (qi >= ki)
                        bmask = create_block_mask(mm, None, None, n, n, device=DEV)
                        o = fa(q, k, v, block_mask=bmask, enable_gqa=True)
                        r["rel_rms_vs_flex"] = rel_rms(out, o)
                        r["flex_ms"] = ms(lambda: fa(q, k, v, block_mask=bmask, enable_gqa=True))  # noqa: B023 (called at once)
                        base["flex ms"] = round(r["flex_ms"], 3)
                    except Exception as e:
                        r["flex_error"] = repr(e)[:300]
                res[f"{kind}_{d}"] = r
                limit = 1.2 * d * dense_ms.get(n, float("nan"))
                row(f"{kind} density {d} (got {got:.3f}), {n // 1024}k (ms)", round(t, 3), "ms", base,
                    f"<= 1.2 x d x dense = {limit:.2f}", bool(t <= limit),
                    f"{t / dense_ms.get(n, float('nan')):.3f} of dense")
        return res

    @section("decode")
    def _():
        res = {}
        for b, ctx in SIZES["decode"]:
            q, k, v = qkv(b, 1, ctx, seed=3)
            kv_bytes = 2 * k.numel() * k.element_size()
            ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), enable_gqa=True).to(DT)
            out = torch.empty_like(q).fill_(float("nan"))
            flash_decode(q, k, v, out=out)
            r = {"kv_GB": kv_bytes / 1e9, "rel_rms_vs_sdpa": rel_rms(out, ref)}
            r["ours_ms"] = ms(lambda: flash_decode(q, k, v, out=out))  # noqa: B023 (called at once)
            r["ours_graph_ms"] = ms_graph(lambda: flash_decode(q, k, v, out=out))  # noqa: B023 (called at once)
            r["sdpa_ms"] = ms(lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True))  # noqa: B023 (called at once)
            r["sdpa_graph_ms"] = ms_graph(lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True))  # noqa: B023 (called at once)
            variants = [] if quick or not have_time() else [dict(num_stages=3), dict(num_splits=128),
                                                            dict(num_splits=32)]
            for var in variants:
                name = "_".join(f"{a}{b_}" for a, b_ in var.items())
                try:
                    flash_decode(q, k, v, out=out, **var)
                    r[f"var_{name}_graph_ms"] = ms_graph(lambda var=var: flash_decode(q, k, v, out=out, **var))  # noqa: B023 (called at once)
                except Exception as e:
                    r[f"var_{name}"] = repr(e)[:200]
            if b == 1:  # the window schedule on the same cache: sinks + last 4096 keys
                w = SIZES["window"]
                ids = decode_block_ids(ctx, 1, 64, window=w, sink=4, device=DEV)
                r[f"window{w}_graph_ms"] = ms_graph(
                    lambda: flash_decode(q, k, v, block_ids=ids, window=w, sink=4, out=out))  # noqa: B023 (called at once)
            res[f"b{b}_{ctx // 1024}k"] = r
            bw = kv_bytes / r["ours_graph_ms"] / 1e9
            frac = bw / copy.get("TBps", float("nan"))
            best_var = min((v_ for k_, v_ in r.items() if k_.startswith("var_") and isinstance(v_, float)),
                           default=None)
            row(f"decode b={b} {ctx // 1024}k (TB/s, graph)", round(bw, 2), "TB/s",
                {"SDPA TB/s": round(kv_bytes / r["sdpa_graph_ms"] / 1e9, 2),
                 "copy TB/s": round(copy.get("TBps", 0), 2)},
                ">= 85% of copy, faster than SDPA", bool(frac >= 0.85 and r["ours_graph_ms"] < r["sdpa_graph_ms"]),
                f"{frac:.0%} of copy; ours {r['ours_graph_ms'] * 1e3:.1f} us graph / {r['ours_ms'] * 1e3:.1f} us "
                f"plain, SDPA {r['sdpa_graph_ms'] * 1e3:.1f} / {r['sdpa_ms'] * 1e3:.1f} us"
                + (f"; best variant {best_var * 1e3:.1f} us" if best_var else "")
                + f"; rel RMS {r['rel_rms_vs_sdpa']:.1e}")
            torch.cuda.empty_cache()
        return res

    payload = {"rows": ROWS, "results": RESULTS}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(payload, indent=1, default=str))
    print(f"wrote {args.out}")
    print(table(RESULTS.get("env", {})))


def table(env) -> str:
    lines = [f"Device: {env.get('device')}, torch {env.get('torch')}, triton {env.get('triton')}, "
             f"git {env.get('git_sha')}, {env.get('date')}", "",
             "| case | ours | baselines | target | met | notes |", "| --- | ---: | --- | --- | --- | --- |"]
    for r in ROWS:
        base = ", ".join(f"{k} {v}" for k, v in r["baselines"].items())
        lines.append(f"| {r['case']} | {r['ours']} | {base} | {r['target']} | {'yes' if r['met'] else 'MISSED'} "
                     f"| {r['note']} |")
    return "\n".join(lines)


def git_sha() -> str | None:
    if os.environ.get("OLLM_GIT_SHA"):
        return os.environ["OLLM_GIT_SHA"]
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


if __name__ == "__main__":
    main()
