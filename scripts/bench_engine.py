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


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="llama3_8b", help="an ollm_triton/conf/model preset with random weights")
    ap.add_argument("--prompt", type=int, nargs="+", default=[512])
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

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
