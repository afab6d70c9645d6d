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


def main():
    global HQ, HKV, D, DT, DEV
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "bench_prefill.json"))
    ap.add_argument("--sizes", default="8192,32768", help="comma-separated T = S")
    ap.add_argument("--variants", default=",".join(PREFILL_VARIANTS),
                    help=f"comma-separated names from PREFILL_VARIANTS ({', '.join(PREFILL_VARIANTS)})")
    ap.add_argument("--no-flex", action="store_true", help="skip FlexAttention (its compile takes ~30 s)")
    ap.add_argument("--budget-s", type=float, default=150.0, help="skip further variants after this many seconds")
    ap.add_argument("--small", action="store_true", help="CPU interpreter, tiny shapes: checks the script only")
    args = ap.parse_args()
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
    env = {"device": torch.cuda.get_device_name(0) if DEV == "cuda" else "cpu (interpreter, --small)",
           "capability": list(torch.cuda.get_device_capability(0)) if DEV == "cuda" else None,
           "torch": torch.__version__, "triton": triton.__version__, "python": sys.version.split()[0],
           "git_sha": git_sha(), "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
           "command": "python " + " ".join(sys.argv),
           "shape": {"hq": HQ, "hkv": HKV, "d": D, "dtype": str(DT), "batch": 1, "causal": True},
           "variants": {v_: asdict(variant_config(PREFILL_VARIANTS[v_])) for v_ in variants}}
    print(env, flush=True)
    flex_fn = None
    if DEV == "cuda" and not args.no_flex:
        try:
            from torch.nn.attention.flex_attention import create_block_mask, flex_attention

            flex_fn = (torch.compile(flex_attention), create_block_mask)
        except Exception as e:  # keep the other baselines
            print("flex unavailable:", e, flush=True)
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


if __name__ == "__main__":
    main()
