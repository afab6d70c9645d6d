"""Dense causal prefill: every kernel variant of PREFILL_VARIANTS next to cuDNN, SDPA flash and FlexAttention.

    OLLM_GIT_SHA=<sha> python scripts/bench_prefill.py --out $OUT/bench_prefill.json      # GPU, ~3 minutes
    python scripts/bench_prefill.py --small                                               # CPU interpreter check

Shapes (issue 20 item 3): bf16, 32 query / 8 KV heads, head_dim 128, batch 1, causal, T = S = 8k and 32k.
Targets: >= 0.9x cuDNN and >= 1.25x Flex. TFLOP/s counts causal work as 4 n^2 d H / 2 for everyone. cuDNN and
flash get K/V repeated to 32 heads outside the timing; Flex (torch.compile'd, enable_gqa) and ours read 8 KV heads.
Timing: CUDA events around each call after warm-up (the first call compiles), median of as many calls as fit
~0.3 s. Correctness in the same run, on the same inputs: a float64 reference on a slice (the first and last 64
query rows of query heads 0-3, one KV group; max abs error and rel RMS), and the full output against SDPA computed
in fp32 (rel RMS). Writes JSON (device, versions, git sha, date, command) and prints a GitHub table last.
To adopt a winner: set LONG_PREFILL_VARIANT in ollm_triton/kernels/attention_prefill.py to its name.

    OLLM_GIT_SHA=<sha> python scripts/bench_prefill.py --sinks --out $OUT/bench_prefill_sinks.json   # GPU, < 2 min
    python scripts/bench_prefill.py --sinks --small

--sinks: gpt-oss attention instead (issue 18): bf16, 64 query / 8 KV heads, head_dim 64, per-head sink logits, the
sliding layers' 128-key window and the full layers, at a 4096-token prefill chunk over 8192 keys (the memory
study's second chunk of an 8k prompt) and T = S = 8192. Timed side by side: the `flash` backend's Triton prefill
(sinks in the kernel's epilogue), the `sdpa` backend (attend_with_sinks: float32 scores in SINK_SCORES_BYTES query
chunks), the same at the former 1 GiB chunks, and FlexAttention (block mask for the window, its log-sum-exp to add
the sink: out * sigmoid(lse - sink); it compiles per case, and is left out once --budget-s is spent). Each row
also gets its peak memory above the inputs (torch.cuda max allocated during one call, the output included) and,
for sdpa, the footprint's estimate of its transient.
Correctness: float64 from the definition on the first and last 64 query rows of one KV group, and the full output
against the flash backend's float32 reference. TFLOP/s count the visible (query, key) pairs: 4 D Hq per pair.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import statistics
import sys
import time
import traceback
from dataclasses import asdict, replace
from pathlib import Path

if "--small" in sys.argv:  # the interpreter must be chosen before triton is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ollm_triton.kernels.attention_prefill import PREFILL_VARIANTS, PrefillConfig, flash_prefill  # noqa: E402
from ollm_triton.kernels.attention_schedule import build_schedule  # noqa: E402
from ollm_triton.results import git_sha  # noqa: E402

HQ, HKV, D, DT, DEV = 32, 8, 128, torch.bfloat16, "cuda"
T0 = time.time()


def timed_ms(fn, budget_s: float = 0.3) -> float:
    """Median ms of fn after two warm-up calls; CUDA events on the GPU, perf_counter on the CPU."""
    fn()
    fn()
    if DEV != "cuda":
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3
    torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    reps = max(5, min(50, int(budget_s / max(time.perf_counter() - t, 1e-6))))
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for s, e in zip(starts, ends, strict=True):
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends, strict=True))


def slice_reference(q, k, v, rows: slice) -> torch.Tensor:
    """float64 causal attention of query heads 0..group-1 (KV head 0) for the given query rows: [1, G, R, D]."""
    g = HQ // HKV
    qs = q[:, :g, rows].double()
    ks, vs = k[:, :1].double(), v[:, :1].double()
    scores = qs @ ks.transpose(-1, -2) / math.sqrt(q.shape[-1])
    pos = torch.arange(q.shape[2], device=q.device)[rows][:, None]
    scores = scores.masked_fill(torch.arange(k.shape[2], device=q.device)[None, :] > pos, float("-inf"))
    return torch.softmax(scores, -1) @ vs


def errors(out, refs, full_ref) -> dict:
    """Max abs / rel RMS against the float64 slices, rel RMS against the full fp32 output."""
    g = HQ // HKV
    err, num, den = 0.0, 0.0, 0.0
    for rows, ref in refs:
        diff = out[:, :g, rows].double() - ref
        err = max(err, float(diff.abs().max()))
        num += float(diff.pow(2).sum())
        den += float(ref.pow(2).sum())
    full = float((out.float() - full_ref).pow(2).mean().sqrt() / full_ref.pow(2).mean().sqrt())
    return {"slice_f64_max_abs": err, "slice_f64_rel_rms": math.sqrt(num / den), "full_fp32_rel_rms": full}


def sdpa_backend(name):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([{"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
                         "efficient": SDPBackend.EFFICIENT_ATTENTION}[name]])


def variant_config(cfg: PrefillConfig) -> PrefillConfig:
    """Packed variants name block_m per head for a group of 4; scale it to this run's group."""
    return replace(cfg, block_m=128 // (HQ // HKV)) if cfg.pack_gqa else cfg


def case(n: int, variants: list[str], budget_s: float, flex_fn) -> dict:
    g = torch.Generator(device=DEV).manual_seed(n)
    q = torch.randn(1, HQ, n, D, device=DEV, dtype=DT, generator=g)
    k = torch.randn(1, HKV, n, D, device=DEV, dtype=DT, generator=g)
    v = torch.randn(1, HKV, n, D, device=DEV, dtype=DT, generator=g)
    flops = 4 * n * n * D * HQ / 2
    rows = [slice(0, min(64, n)), slice(max(0, n - 64), n)]
    refs = [(r, slice_reference(q, k, v, r)) for r in rows]
    kk, vv = k.repeat_interleave(HQ // HKV, 1), v.repeat_interleave(HQ // HKV, 1)
    if DEV == "cuda":
        with sdpa_backend("efficient"):
            full_ref = F.scaled_dot_product_attention(q.float(), kk.float(), vv.float(), is_causal=True)
    else:
        full_ref = F.scaled_dot_product_attention(q.float(), kk.float(), vv.float(), is_causal=True)
    res: dict = {}

    def record(name, fn, out):
        try:
            out.fill_(float("nan"))
            fn()
            r = errors(out, refs, full_ref)
            r["ms"] = timed_ms(fn)
            r["TFLOPs"] = flops / r["ms"] / 1e9
            res[name] = r
        except Exception as e:  # one failing variant must not lose the others
            res[name] = {"error": repr(e)[:400], "trace": traceback.format_exc()[-1500:]}
        print(name, n, {k_: (round(v_, 4) if isinstance(v_, float) else v_) for k_, v_ in res[name].items()
                        if k_ != "trace"}, flush=True)

    out = torch.empty_like(q)
    for name in variants:
        if time.time() - T0 > budget_s and name != variants[0]:
            res[f"ours_{name}"] = {"skipped": "over --budget-s"}
            continue
        cfg = variant_config(PREFILL_VARIANTS[name])
        sched = build_schedule(n, n, 0, cfg.block_m, cfg.block_n, device=DEV)
        record(f"ours_{name}", lambda cfg=cfg, sched=sched: flash_prefill(q, k, v, sched, config=cfg, out=out), out)
    if DEV == "cuda":
        for name in ("cudnn", "flash"):
            def sdpa(name=name):
                with sdpa_backend(name):
                    out.copy_(F.scaled_dot_product_attention(q, kk, vv, is_causal=True))
            record(f"sdpa_{name}", sdpa, out)
    if flex_fn is not None:
        try:
            fa, create_block_mask = flex_fn
            bmask = create_block_mask(lambda b, h, qi, ki: qi >= ki, None, None, n, n, device=DEV)
            record("flex", lambda: out.copy_(fa(q, k, v, block_mask=bmask, enable_gqa=True)), out)
        except Exception as e:
            res["flex"] = {"error": repr(e)[:400]}
    for r in res.values():  # ratios against the baselines of the same run
        if "TFLOPs" in r:
            for base in ("sdpa_cudnn", "flex"):
                if "TFLOPs" in res.get(base, {}):
                    r[f"x_{base}"] = r["TFLOPs"] / res[base]["TFLOPs"]
    return res


# ---- gpt-oss: sliding window + sink logits --------------------------------------------------------------------------

SINK_CASES = [(4096, 8192, 128), (4096, 8192, 0), (8192, 8192, 128), (8192, 8192, 0)]  # (T, S, window)


def sinks_slice_reference(q, k, v, sinks, rows: slice, q_offset: int, window: int) -> torch.Tensor:
    """float64 from the definition for query heads 0..G-1 (KV head 0), rows `rows`: softmax over [scores of keys
    p - window < s <= p, sink_h], the sink's column dropped. [1, G, R, D]."""
    g = HQ // HKV
    qs, ks, vs = q[:, :g, rows].double(), k[:, :1].double(), v[:, :1].double()
    scores = qs @ ks.transpose(-1, -2) / math.sqrt(q.shape[-1])
    p = torch.arange(q.shape[2], device=q.device)[rows][:, None] + q_offset
    key = torch.arange(k.shape[2], device=q.device)[None, :]
    visible = (key <= p) & ((key > p - window) if window else True)
    scores = scores.masked_fill(~visible, float("-inf"))
    sink = sinks[:g].double().view(1, g, 1, 1).expand(1, g, scores.shape[2], 1)
    return torch.softmax(torch.cat((scores, sink), -1), -1)[..., :-1] @ vs


def visible_pairs(t: int, s: int, window: int) -> int:
    p = torch.arange(s - t, s, dtype=torch.int64)
    return int((torch.minimum(p + 1, torch.tensor(window)) if window else p + 1).sum())


def peak_bytes(fn) -> int | None:
    """Bytes allocated above what was held before one call (its output included): the call's transient."""
    if DEV != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    del out
    return int(peak)


def sinks_case(t: int, s: int, window: int, flex_fn) -> dict:
    from ollm_triton.attention import sdpa as sdpa_module
    from ollm_triton.registry import registry

    g = torch.Generator(device=DEV).manual_seed(t + s + window)
    q = torch.randn(1, HQ, t, D, device=DEV, dtype=DT, generator=g)
    k = torch.randn(1, HKV, s, D, device=DEV, dtype=DT, generator=g)
    v = torch.randn(1, HKV, s, D, device=DEV, dtype=DT, generator=g)
    sinks = (2.0 * torch.randn(HQ, device=DEV, generator=g)).to(DT)  # gpt-oss keeps them in the model dtype
    q_offset = s - t
    flops = 4 * visible_pairs(t, s, window) * D * HQ
    flash, base = registry.build("attention", "flash"), registry.build("attention", "sdpa")
    flash.use_kernels = True  # the interpreter under --small
    rows = [slice(0, min(64, t)), slice(max(0, t - 64), t)]
    refs = [(r, sinks_slice_reference(q, k, v, sinks, r, q_offset, window)) for r in rows]
    full_ref = flash.reference(q, k, v, q_offset=q_offset, window=window, sinks=sinks).float()
    res: dict = {}

    def record(name, fn, **extra):
        try:
            out = fn()
            r = errors(out, refs, full_ref)
            del out
            r["peak_bytes"] = peak_bytes(fn)
            r["ms"] = timed_ms(lambda: fn())
            r["TFLOPs"] = flops / r["ms"] / 1e9
            r.update(extra)
            res[name] = r
        except Exception as e:  # one failing implementation must not lose the others
            res[name] = {"error": repr(e)[:400], "trace": traceback.format_exc()[-1500:]}
        print(name, t, s, window, {k_: (round(v_, 4) if isinstance(v_, float) else v_)
                                   for k_, v_ in res[name].items() if k_ != "trace"}, flush=True)

    layer = dict(window=window, sinks=sinks) if window else dict(sinks=sinks)
    record("ours_flash", lambda: flash.prefill(q, k, v, q_offset=q_offset, **layer))
    assert flash.last_path == "triton.prefill", flash.last_path
    kept = max(0, q_offset - window + 1) if window else 0  # the keys sdpa reads (it drops those no query sees)
    estimate = sdpa_module.sink_attention_bytes(1, HQ, t, s - kept, q.element_size()) + t * (s - kept)
    record("sdpa_sinks", lambda: base.prefill(q, k, v, q_offset=q_offset, **layer), estimate_bytes=estimate,
           chunk_bytes=sdpa_module.SINK_SCORES_BYTES)
    old = sdpa_module.SINK_SCORES_BYTES
    sdpa_module.SINK_SCORES_BYTES = 1 << 30
    try:  # the former chunk size (its copies were gone too: this isolates the chunk's share)
        record("sdpa_sinks_1GiB_chunks", lambda: base.prefill(q, k, v, q_offset=q_offset, **layer),
               chunk_bytes=1 << 30)
    finally:
        sdpa_module.SINK_SCORES_BYTES = old
    if flex_fn is not None:
        try:
            fa, create_block_mask = flex_fn

            def visible(b, h, qi, ki):
                p = qi + q_offset
                return (ki <= p) & (ki > p - window) if window else ki <= p

            bmask = create_block_mask(visible, None, None, t, s, device=DEV)
            sink = sinks.float().view(1, HQ, 1, 1)

            def flex():
                out, lse = fa(q, k, v, block_mask=bmask, enable_gqa=True, return_lse=True)
                return (out.float() * torch.sigmoid(lse.float()[..., None] - sink)).to(q.dtype)

            record("flex_lse_sink", flex)
        except Exception as e:
            res["flex_lse_sink"] = {"error": repr(e)[:400]}
    for r in res.values():  # ratios against the baseline of the same run
        if "TFLOPs" in r and "TFLOPs" in res.get("sdpa_sinks", {}):
            r["x_sdpa_sinks"] = r["TFLOPs"] / res["sdpa_sinks"]["TFLOPs"]
    return res


def sinks_table(env, results) -> str:
    def gb(x):
        return "-" if x is None else f"{x / 1e9:.2f}"

    lines = [f"Device: {env['device']}, torch {env['torch']}, triton {env['triton']}, git {env['git_sha']}, "
             f"{env['date']}", "", f"gpt-oss attention: {DT}, {HQ}/{HKV} heads, d={D}, sink logits per head; peak = "
             "max allocated above the inputs during one call (output included).", "",
             "| case (T x S, window) | impl | ms | TFLOP/s | x sdpa_sinks | peak GB | est. GB | f64 max err | "
             "fp32 rel RMS |", "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for key, res in results.items():
        for name, r in res.items():
            if "ms" not in r:
                lines.append(f"| {key} | {name} | {r.get('error', '-')[:60].replace('|', '/')} | | | | | | |")
                continue
            est = gb(r["estimate_bytes"]) if "estimate_bytes" in r else "-"
            lines.append(f"| {key} | {name} | {r['ms']:.3f} | {r['TFLOPs']:.1f} | {r.get('x_sdpa_sinks', 1):.2f} | "
                         f"{gb(r['peak_bytes'])} | {est} | {r['slice_f64_max_abs']:.1e} | "
                         f"{r['full_fp32_rel_rms']:.1e} |")
    return "\n".join(lines)


def table(env, results, sizes) -> str:
    def size(s):
        return f"{s // 1024}k" if s >= 1024 else str(s)

    lines = [f"Device: {env['device']}, torch {env['torch']}, triton {env['triton']}, git {env['git_sha']}, "
             f"{env['date']}", "", "Targets: >= 0.9x cuDNN and >= 1.25x Flex (bf16, 32/8 heads, d=128, causal).", "",
             "| impl | " + " | ".join(f"{size(s)} TFLOP/s (x cuDNN, x Flex) | {size(s)} f64 max err / fp32 rel RMS"
                                     for s in sizes) + " |",
             "| --- | " + " | ".join("---: | ---:" for _ in sizes) + " |"]
    names = list(dict.fromkeys(name for s in sizes for name in results.get(str(s), {})))
    for name in names:
        cells = []
        for s in sizes:
            r = results.get(str(s), {}).get(name, {})
            if "TFLOPs" not in r:
                cells += [r.get("error", r.get("skipped", "-"))[:60].replace("|", "/"), ""]
                continue
            met = name.startswith("ours") and r.get("x_sdpa_cudnn", 0) >= 0.9 and r.get("x_flex", 0) >= 1.25
            cells.append(f"{r['TFLOPs']:.1f} ({r.get('x_sdpa_cudnn', float('nan')):.2f}x, "
                         f"{r.get('x_flex', float('nan')):.2f}x){' **met**' if met else ''}")
            cells.append(f"{r['slice_f64_max_abs']:.1e} / {r['full_fp32_rel_rms']:.1e}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run_env(shape: dict, **more) -> dict:
    """The run's device, versions, commit, date, command and shape (printed, and the JSON's `env`)."""
    env = {"device": torch.cuda.get_device_name(0) if DEV == "cuda" else "cpu (interpreter, --small)",
           "capability": list(torch.cuda.get_device_capability(0)) if DEV == "cuda" else None,
           "torch": torch.__version__, "triton": triton.__version__, "python": sys.version.split()[0],
           "git_sha": git_sha(), "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
           "command": "python " + " ".join(sys.argv),
           "shape": {"hq": HQ, "hkv": HKV, "d": D, "dtype": str(DT), "batch": 1, **shape}, **more}
    print(env, flush=True)
    return env


def flex_or_none(args):
    """(compiled flex_attention, create_block_mask) on CUDA unless --no-flex; None where Flex is unavailable (the
    other rows still run)."""
    if DEV != "cuda" or args.no_flex:
        return None
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        return torch.compile(flex_attention), create_block_mask
    except Exception as e:  # keep the other baselines
        print("flex unavailable:", e, flush=True)
        return None


def main():
    global HQ, HKV, D, DT, DEV
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "bench_prefill.json"))
    ap.add_argument("--sizes", default="8192,32768", help="comma-separated T = S")
    ap.add_argument("--variants", default=",".join(PREFILL_VARIANTS),
                    help=f"comma-separated names from PREFILL_VARIANTS ({', '.join(PREFILL_VARIANTS)})")
    ap.add_argument("--no-flex", action="store_true", help="skip FlexAttention (its compile takes ~30 s)")
    ap.add_argument("--budget-s", type=float, default=150.0,
                    help="skip further variants (--sinks: Flex) after this many seconds (--sinks: default 75)")
    ap.add_argument("--small", action="store_true", help="CPU interpreter, tiny shapes: checks the script only")
    ap.add_argument("--sinks", action="store_true",
                    help="gpt-oss attention (64/8 heads, d=64, window 128 and full, sink logits): flash vs sdpa")
    args = ap.parse_args()
    if args.sinks:
        return main_sinks(args)
    variants = [x for x in args.variants.split(",") if x]
    unknown = [x for x in variants if x not in PREFILL_VARIANTS]
    if unknown:
        sys.exit(f"unknown --variants {unknown}; accepted: {', '.join(PREFILL_VARIANTS)}")
    sizes = [int(x) for x in args.sizes.split(",")]
    if args.small:
        HQ, HKV, D, DT, DEV = 4, 1, 32, torch.float16, "cpu"
        sizes = [s for s in sizes if s <= 512] or [130]
    elif not torch.cuda.is_available():
        sys.exit("no CUDA device: run on a GPU, or pass --small for the CPU interpreter check")
    env = run_env({"causal": True}, variants={v_: asdict(variant_config(PREFILL_VARIANTS[v_])) for v_ in variants})
    flex_fn = flex_or_none(args)
    results = {}
    for n in sizes:
        t = time.time()
        results[str(n)] = case(n, variants, args.budget_s, flex_fn)
        if DEV == "cuda":
            torch.cuda.empty_cache()  # the inputs of the finished size are freed with case()'s frame
        print(f"[{n}] {time.time() - t:.1f}s", flush=True)
    payload = {"env": env, "results": results, "seconds": round(time.time() - T0, 1)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(payload, indent=1, default=str))
    print(f"wrote {args.out}")
    print(table(env, results, sizes))


def main_sinks(args):
    global HQ, HKV, D, DT, DEV
    HQ, HKV, D, DT, DEV = 64, 8, 64, torch.bfloat16, "cuda"
    cases = SINK_CASES
    if "--budget-s" not in sys.argv:
        args.budget_s = 75.0
    if args.small:
        HQ, HKV, D, DT, DEV = 8, 2, 16, torch.float16, "cpu"
        cases = [(61, 130, 8), (61, 130, 0)]
    elif not torch.cuda.is_available():
        sys.exit("no CUDA device: run on a GPU, or pass --small for the CPU interpreter check")
    out_path = args.out if args.out != os.path.join(os.environ.get("OUT", "."), "bench_prefill.json") \
        else os.path.join(os.environ.get("OUT", "."), "bench_prefill_sinks.json")
    env = run_env({"sinks": True})
    flex_fn = flex_or_none(args)
    results = {}
    for t, s, window in cases:
        key = f"{t} x {s}, {'window ' + str(window) if window else 'full'}"
        late = time.time() - T0 > args.budget_s  # Flex's compiles are what could run long: they go first
        results[key] = sinks_case(t, s, window, None if late else flex_fn)
        if DEV == "cuda":
            torch.cuda.empty_cache()
    payload = {"env": env, "results": results, "seconds": round(time.time() - T0, 1)}
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    Path(out_path).write_text(json.dumps(payload, indent=1, default=str))
    print(f"wrote {out_path}")
    print(sinks_table(env, results))


if __name__ == "__main__":
    main()
