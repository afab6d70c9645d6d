"""End-to-end prefill/decode speed and peak memory: the native engine next to transformers, same weights, one run.

    python scripts/bench_engine.py --model llama3_8b --prompt 512 --new 128 --out $OUT/bench_engine.json

Both models share the engine's random bf16 weights (transformers' modules get the same tensors assigned), so
the comparison is of the decode paths alone. Each side: one warm-up generation, then `--repeats` timed runs
(median), with CUDA-synchronized timers. Prints a GitHub table last.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ollm_triton.engine import load_engine  # noqa: E402
from ollm_triton.registry import registry  # noqa: E402
from ollm_triton.results import git_sha  # noqa: E402


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn):
    sync()
    t0 = time.perf_counter()
    out = fn()
    sync()
    return time.perf_counter() - t0, out


def decode_floor(engine) -> dict:
    """Batch-1 decode cannot beat reading the weights one token touches once: every dense weight, the router and
    the k routed experts of a MoE layer (not the other experts), one row of the embedding table; over the device's
    copy bandwidth (bytes read + written by a 2 GB copy). KV reads are left out (short contexts here)."""
    cfg = engine.config
    moe_layers = sum(cfg.is_moe_layer(i) for i in range(cfg.num_layers))
    unread = moe_layers * (cfg.moe_layer_parameters() - cfg.moe_active_parameters()) if moe_layers else 0
    if not cfg.tie_word_embeddings:  # the table is only gathered from; a tied head reads it whole
        unread += cfg.vocab_size * cfg.hidden_size
    active = (cfg.num_parameters() - unread) * engine.dtype.itemsize
    out = {"active_weight_bytes": active}
    if torch.cuda.is_available():
        from triton.testing import do_bench

        src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
        dst = torch.empty_like(src)
        bw = 2 * (1 << 30) / (do_bench(lambda: dst.copy_(src)) / 1e3)
        out.update(copy_bandwidth_bytes_s=bw, floor_tok_s=bw / active)
    return out


def bench_engine(engine, prompt, new_tokens, repeats):
    greedy = registry.build("decoder", "greedy")
    greedy.generate(engine, prompt, 4)  # warm-up
    runs = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        out = greedy.generate(engine, prompt, new_tokens)
        runs.append(out)
    prefill = statistics.median(r.counters["prefill_s"] for r in runs)
    decode = statistics.median(r.counters["decode_s"] for r in runs)
    n = runs[0].tokens.shape[1]
    return {
        "prefill_s": prefill,
        "prefill_tok_s": prompt.numel() / prefill,
        "decode_tok_s": prompt.shape[0] * (n - 1) / decode,
        "peak_gb": torch.cuda.max_memory_allocated() / 1e9 if torch.cuda.is_available() else float("nan"),
        "tokens": runs[0].tokens,
    }


def bench_transformers(hf_model, prompt, new_tokens, repeats, **gen_kwargs):
    """prefill: one forward of the prompt (logits of the last token); decode: generate() minus that prefill."""
    kwargs = dict(do_sample=False, pad_token_id=0, **gen_kwargs)
    with torch.inference_mode():
        hf_model.generate(prompt, max_new_tokens=4, min_new_tokens=4, **kwargs)  # warm-up
        prefills, decodes, tokens = [], [], None
        for _ in range(repeats):
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            p, _ = timed(lambda: hf_model(prompt, logits_to_keep=1))
            g, out = timed(
                lambda: hf_model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kwargs)
            )
            prefills.append(p)
            decodes.append(g - p)
            tokens = out[:, prompt.shape[1] :]
    prefill, decode = statistics.median(prefills), statistics.median(decodes)
    return {
        "prefill_s": prefill,
        "prefill_tok_s": prompt.numel() / prefill,
        "decode_tok_s": prompt.shape[0] * (new_tokens - 1) / decode,
        "peak_gb": torch.cuda.max_memory_allocated() / 1e9 if torch.cuda.is_available() else float("nan"),
        "tokens": tokens,
    }


# ---- --codec-steps: batch-1 decode steps of the whole captured step over a filled cache, dense beside int4 ----------
# (issue 20 item 1: does int4 beat dense at 32k, and does the gap grow with context as the bytes say?)
#
# The cache is filled with random K/V appended through each codec, layer by layer, as a prefill appends them, and no
# model forward: a 128k prefill of an 8B model would take most of the time budget, and a decode step's time does
# not depend on the values it reads. The decode loop timed is the engine's own (FastDecoder.decode: graph replays,
# the host's per-row window checks and flushes), continued from the cache's length run after run.

CODEC_VARIANTS = {  # label -> (codec, QuantLayer.kernel_options for the static step's varlen kernel)
    "dense": ("dense", {}),
    "int4": ("int4", {}),  # defaults: >= 2 quantized blocks a split, the window in programs of 64 tokens
    "int4, >= 1 block a split": ("int4", {"min_blocks": 1}),
    # on a GPU the default is now the Gluon MMA kernel's varlen entry (kernels/kv_quant_decode_mma.py); this row is
    # the Triton-language varlen kernel that the step ran before, as the baseline in the same call
    "int4, Triton-language varlen kernel": ("int4", {"kernel": "triton"}),
}


def fill_cache(bk, context: int, device, dtype) -> None:
    """Every layer of the bucket's cache holds `context` random tokens (one K and one V tensor for all layers)."""
    bk.reset()
    spec = bk.cache.layers[0].spec
    gen = torch.Generator(device=device).manual_seed(0)
    k, v = (torch.randn(1, spec.kv_heads, context, spec.head_dim, generator=gen, device=device, dtype=dtype)
            for _ in range(2))
    for layer in bk.cache.layers:
        layer.append(k, v)
    bk.cache.position = context


def check_attention(layer, opts: dict, query_heads: int, device, dtype) -> float:
    """Relative L2 error of the static step's attention kernel over layer 0's real storage against its float64
    reference (float32 above 32k keys: the float64 copies of 128k dequantized keys would not fit beside it)."""
    from ollm_triton.kernels.attention_decode_varlen import decode_varlen_kernel, decode_varlen_reference
    from ollm_triton.kernels.kv_quant_decode import quant_decode_varlen, quant_decode_varlen_ref

    n = layer.length
    ref_dtype = torch.float64 if n <= 32768 + 1024 else torch.float32
    q = torch.randn(1, query_heads, 1, layer.spec.head_dim, device=device, dtype=dtype)
    if hasattr(layer, "n_quant"):
        store = (layer.k_codes, layer.k_scale, layer.k_zero, layer.v_codes, layer.v_scale, layer.v_zero, layer.k_res,
                 layer.v_res)
        kw = dict(bits=layer.bits, key_group=layer.group, value_group=layer.value_group)
        nq = torch.tensor([layer.n_quant], device=device)
        if device.type == "cuda":
            got = quant_decode_varlen(q, *store, nq, torch.tensor([n], device=device), block_k=layer.block_k, **kw,
                                      **opts)
        else:  # the CPU smoke run times the reference step: check the interpreter-free reference against itself
            got = quant_decode_varlen_ref(q, *store, [layer.n_quant], [n], **kw)
        want = quant_decode_varlen_ref(q, *store, [layer.n_quant], [n], **kw, compute_dtype=ref_dtype)
    else:
        lengths = torch.tensor([n], device=device)
        got = decode_varlen_kernel(q[:, :, 0], layer.k, layer.v, lengths) if device.type == "cuda" else \
            decode_varlen_reference(q[:, :, 0], layer.k, layer.v, lengths)
        want = decode_varlen_reference(q[:, :, 0], layer.k, layer.v, lengths, compute_dtype=ref_dtype)
    return ((got.double() - want.double()).norm() / want.double().norm()).item()


def time_codec_variant(base, codec, opts: dict, ctx: int, args, mode: str) -> dict:
    """Decode runs of args.new tokens over a cache of `ctx` random tokens through `codec` (an Engine over base's
    weights), the static step's varlen kernel launched with `opts`: median seconds a run, and what ran."""
    from ollm_triton.decoding.greedy import argmax_pick
    from ollm_triton.engine import Engine

    eng = Engine(base.model, attention=base.attention, codec=codec, prefetch=base.prefetch, device=base.device,
                 dtype=base.dtype, fast_decode=mode)
    fast = eng.fast_decoder()
    bk = fast.new_bucket(1, ctx + (args.repeats + 1) * args.new)
    fill_cache(bk, ctx, base.device, base.dtype)
    for layer in bk.cache.layers:
        layer.kernel_options = opts
    fast.ensure_graph(bk, [ctx])
    first = torch.zeros(1, base.config.vocab_size, device=base.device)
    length, times = ctx, []
    for r in range(args.repeats + 1):  # the first run warms up
        sec, _ = timed(lambda n=length: fast.decode(bk, first, [n], args.new, argmax_pick, None, greedy=True))
        length += args.new - 1
        if r:
            times.append(sec)
    layer = bk.cache.layers[0]
    path = f"{'triton' if fast.kernels else 'torch reference'}: {layer.static_kernel}"
    return {"sec": statistics.median(times), "fast_path": str(eng.fast_path), "attention_path": path,
            "attention_rel_error": check_attention(layer, opts, base.config.num_heads, base.device, base.dtype)}


def kernel_rows(args, cfg, device, dtype) -> tuple[list[dict], list[str]]:
    """The static step's attention kernel alone, one layer at batch 1, at each context: dense `decode_varlen` beside
    int4's `quant_decode_varlen` under each CODEC_VARIANTS launch, over the buffers a bucket of that context holds
    (capacity rounded up as the engine's, window of residual + group + DEFER slots). Timed as CUDA-graph replays
    (triton.testing.do_bench_cudagraph); on the CPU (TRITON_INTERPRET=1 only) a median of three calls."""
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return [], ["| (attention kernels: need CUDA or TRITON_INTERPRET=1) | | | | |"]
    results, rows = [], []
    for ctx in args.codec_contexts:
        timings = kernel_context(ctx, cfg, args.new, device, dtype)
        for label, (us, err) in timings.items():
            results.append({"kernel": label, "context": ctx, "us": us, "rel_error": err})
            rows.append(f"| {label} | {ctx:,} | {us:.1f} | {timings['dense'][0] / us:.2f}x | {err:.1e} |")
    return results, rows


def kernel_context(ctx: int, cfg, new: int, device, dtype) -> dict[str, tuple[float, float]]:
    """{kernel: (us a call, relative error against the float64 reference, float32 above 32k)} at one context."""
    from ollm_triton.engine.graphs import round_capacity
    from ollm_triton.kernels import quant as Q
    from ollm_triton.kernels.attention_decode_varlen import decode_varlen_kernel, decode_varlen_reference
    from ollm_triton.kernels.kv_quant_decode import quant_decode_varlen, quant_decode_varlen_ref

    def bench(fn):
        if device.type == "cuda":
            from triton.testing import do_bench_cudagraph

            return do_bench_cudagraph(fn) * 1e3
        return statistics.median(timed(fn)[0] for _ in range(3)) * 1e6

    def rel(got, want):
        return ((got.double() - want.double()).norm() / want.double().norm()).item()

    h, d, r, g = cfg.num_kv_heads, cfg.head_dim, 128, 128
    gen = torch.Generator(device=device).manual_seed(1)
    cap = round_capacity(ctx + new)
    k, v = (torch.randn(1, h, cap, d, generator=gen, device=device, dtype=dtype) for _ in range(2))
    q = torch.randn(1, cfg.num_heads, 1, d, generator=gen, device=device, dtype=dtype)
    ref_dtype = torch.float64 if ctx <= 32768 else torch.float32
    lengths = torch.tensor([ctx], device=device)
    dense = lambda: decode_varlen_kernel(q[:, :, 0], k, v, lengths)  # noqa: E731
    out = {"dense": (bench(dense), rel(dense(), decode_varlen_reference(q[:, :, 0], k, v, lengths,
                                                                         compute_dtype=ref_dtype)))}
    n_quant = max((ctx - 1 - r) // g * g, 0)  # the static step at pos = ctx - 1: quantized_for(pos)
    sdtype = Q.scale_dtype_for(dtype)
    cuda = device.type == "cuda"
    kq = (Q.quantize_keys if cuda else Q.quantize_keys_ref)(k, 4, g, False, sdtype)
    vq = (Q.quantize_values if cuda else Q.quantize_values_ref)(v, 4, d, False, sdtype)
    res_k, res_v = (torch.zeros(1, h, r + g - 1 + 16, d, device=device, dtype=dtype) for _ in range(2))
    res_k[:, :, : ctx - n_quant], res_v[:, :, : ctx - n_quant] = k[:, :, n_quant:ctx], v[:, :, n_quant:ctx]
    store = (*kq, *vq, res_k, res_v)
    kw = dict(bits=4, key_group=g, value_group=d)
    want = quant_decode_varlen_ref(q, *store, [n_quant], [ctx], **kw, compute_dtype=ref_dtype)
    nq = torch.tensor([n_quant], device=device)
    for label, (codec, opts) in CODEC_VARIANTS.items():
        if codec == "int4":
            call = lambda o=opts: quant_decode_varlen(q, *store, nq, lengths, block_k=128, **kw, **o)  # noqa: E731
            out[label] = (bench(call), rel(call(), want))
    return out


def codec_steps(args, arch, device, dtype) -> None:
    mode = "auto" if device.type == "cuda" else "static"
    base = load_engine(arch, device=device, dtype=dtype, seed=0, fast_decode=mode)
    floor = decode_floor(base)
    cfg = base.config
    results, rows, step_ms = [], [], {}
    for ctx in args.codec_contexts:
        for label in args.codecs:
            codec_name, opts = CODEC_VARIANTS[label]
            codec = registry.build("cache", codec_name)
            r = time_codec_variant(base, codec, opts, ctx, args, mode)
            if device.type == "cuda":
                torch.cuda.empty_cache()
            tok_s = (args.new - 1) / r["sec"]
            mid = ctx + (args.repeats + 1) * args.new // 2  # the median run's context, about
            kv_bytes = cfg.num_layers * codec.bytes_for(base.layer_spec(1, mid), mid)
            own_floor = floor["copy_bandwidth_bytes_s"] / (floor["active_weight_bytes"] + kv_bytes) \
                if "copy_bandwidth_bytes_s" in floor else None
            step_ms[(ctx, label)] = 1e3 * r["sec"] / (args.new - 1)
            results.append({"impl": label, "codec": codec_name, "kernel_options": opts, "context": ctx,
                            "decode_tok_s": tok_s, "step_ms": step_ms[(ctx, label)], "kv_bytes_per_step": kv_bytes,
                            "floor_tok_s": own_floor, **{k: v for k, v in r.items() if k != "sec"}})
            vs = f"{step_ms[(ctx, 'dense')] / step_ms[(ctx, label)]:.2f}x" if (ctx, "dense") in step_ms else "-"
            rows.append(f"| {label} | {ctx:,} | {tok_s:.1f} | {step_ms[(ctx, label)]:.3f} | "
                        f"{f'{tok_s / own_floor:.0%}' if own_floor else '-'} | {vs} | "
                        f"{r['attention_rel_error']:.1e} |")

    kernels, kernel_table = ([], ["| (not run: --no-kernel-rows) | | | | |"]) if args.no_kernel_rows else \
        kernel_rows(args, cfg, device, dtype)

    import triton

    record = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.machine(),
        "torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version(),
        "git_sha": git_sha(), "model": args.model, "dtype": str(dtype), "new_tokens": args.new,
        "repeats": args.repeats, "decode_floor": floor, "results": results, "attention_kernels": kernels,
    }
    if args.out:
        Path(args.out).write_text(json.dumps(record, indent=1))
    print(f"\n{record['device']}, torch {record['torch']}, triton {record['triton']}, {args.model} random {dtype}, "
          f"batch 1, {args.new - 1} decode steps a run, median of {args.repeats}, git {record['git_sha']}\n")
    print("| attention kernel, one layer, batch 1 (CUDA graph) | context | us | speed vs dense "
          "| rel. error vs fp64/fp32 |")
    print("| --- | ---: | ---: | ---: | ---: |")
    print("\n".join(kernel_table) + "\n")
    print("| cache (whole captured step) | context | decode tok/s | ms / step | % of its own floor | speed vs dense "
          "| attention rel. error vs fp64/fp32 |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    print("\n".join(rows))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="llama3_8b", help="an ollm_triton/conf/model preset with random weights")
    ap.add_argument("--prompt", type=int, nargs="+", default=[512])
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--out", default=None)
    ap.add_argument("--codec-steps", action="store_true",
                    help="only time decode steps of the whole captured step over a filled dense / int4 cache")
    ap.add_argument("--codec-contexts", type=int, nargs="+", default=[8192, 32768, 131072])
    ap.add_argument("--codecs", nargs="+", default=list(CODEC_VARIANTS), choices=list(CODEC_VARIANTS),
                    metavar="LABEL", help="--codec-steps rows to run (default all): " + "; ".join(CODEC_VARIANTS)
                    + ". At 1M tokens only int4 fits beside the weights: dense KV is 128 GB")
    ap.add_argument("--no-kernel-rows", action="store_true",
                    help="--codec-steps without the one-layer kernel table (it holds a dense K/V of each context)")
    ap.add_argument("--small", action="store_true", help="--codec-steps on a tiny model and contexts (CPU smoke)")
    args = ap.parse_args()
    if args.codec_steps:
        if args.small:
            args.model, args.codec_contexts, args.new, args.repeats = "tiny_random", [300, 700], 8, 1
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        arch = yaml.safe_load((REPO / "ollm_triton" / "conf" / "model" / f"{args.model}.yaml").read_text())["arch"]
        return codec_steps(args, arch, device, getattr(torch, args.dtype if device.type == "cuda" else "float32"))

    import transformers

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    arch = yaml.safe_load((REPO / "ollm_triton" / "conf" / "model" / f"{args.model}.yaml").read_text())["arch"]
    dtype = getattr(torch, args.dtype)
    engine = load_engine(arch, device=device, dtype=dtype, seed=0)
    weights_gb = sum(p.numel() * p.element_size() for p in engine.model.parameters()) / 1e9

    # transformers' model on the meta device, then the engine's tensors assigned: no second copy of the weights
    hf_cfg = transformers.AutoConfig.for_model(**arch)
    with torch.device("meta"):
        try:
            hf_model = transformers.AutoModelForCausalLM.from_config(hf_cfg, dtype=dtype, attn_implementation="sdpa")
        except ValueError:  # a model transformers runs without sdpa (gpt-oss: sinks): its own eager attention
            hf_model = transformers.AutoModelForCausalLM.from_config(hf_cfg, dtype=dtype, attn_implementation="eager")
    missing, unexpected = hf_model.load_state_dict(engine.model.state_dict(), strict=False, assign=True)
    assert not unexpected and all("rotary" in m for m in missing), (missing, unexpected)
    with torch.device(device):  # the rotary buffers were left on meta: rebuild them for real
        hf_model.model.rotary_emb = type(hf_model.model.rotary_emb)(hf_cfg)
    hf_model.eval()

    rows, results = [], []
    floor = decode_floor(engine)
    gen = torch.Generator().manual_seed(0)
    for plen in args.prompt:
        prompt = torch.randint(0, arch["vocab_size"], (1, plen), generator=gen).to(device)
        ours = bench_engine(engine, prompt, args.new, args.repeats)
        theirs = bench_transformers(hf_model, prompt, args.new, args.repeats)
        # Random weights give near-flat logits, so greedy tokens part at the first near-tie in bf16: compare the
        # prefill logits instead (exact fp32 equivalence is tested in tests/test_engine.py).
        with torch.inference_mode():
            a = engine.forward(prompt, engine.new_cache(1, plen), last_only=True)[0, -1]
            b = hf_model(prompt, logits_to_keep=1).logits[0, -1].float()
        agree = ((a - b).norm() / b.norm()).item()
        for name, r in (
            ("ollm_triton engine (sdpa, dense, greedy; eager)", ours),
            ("transformers generate (eager, dynamic cache)", theirs),
        ):
            results.append({"impl": name, "prompt": plen, **{k: v for k, v in r.items() if k != "tokens"}})
            rows.append(
                f"| {name} | {plen} | {r['prefill_tok_s']:.0f} | {r['decode_tok_s']:.1f} | {r['peak_gb']:.2f} |"
            )
        results.append({"prompt": plen, "last_logits_rel_error": agree})
        if "floor_tok_s" in floor:
            rows.append(f"| decode floor: {floor['active_weight_bytes'] / 1e9:.2f} GB read per token at "
                        f"{floor['copy_bandwidth_bytes_s'] / 1e9:.0f} GB/s (ours at "
                        f"{ours['decode_tok_s'] / floor['floor_tok_s']:.0%} of it) | {plen} | | "
                        f"{floor['floor_tok_s']:.1f} | |")
        rows.append(f"| last-token logits, relative L2 difference ({args.dtype}) | {plen} | {agree:.1e} | | |")

    record = {
        "command": " ".join(sys.argv),
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "git_sha": git_sha(),
        "model": args.model,
        "weights_gb": weights_gb,
        "new_tokens": args.new,
        "repeats": args.repeats,
        "results": results,
        "decode_floor": floor,
    }
    if args.out:
        Path(args.out).write_text(json.dumps(record, indent=1))
    print(
        f"\n{record['device']}, torch {record['torch']}, transformers {record['transformers']}, "
        f"{args.model} random {args.dtype} "
        f"({weights_gb:.1f} GB), batch 1, {args.new} new tokens, median of {args.repeats}\n"
    )
    print("| implementation | prompt | prefill tok/s | decode tok/s | peak GB |")
    print("| --- | ---: | ---: | ---: | ---: |")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
