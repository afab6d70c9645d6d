"""The transformers bridge against transformers' own QuantizedCache: perplexity, KL to dense, decode speed, bytes.

Each model decodes the same held-out text through transformers' own forward (attn_implementation="sdpa"): a prompt
of --prompt tokens in one forward (every cache returns its exact K/V there), then --decode tokens one forward each,
so every scored token reads the keys and values as its cache stores them. Scored: the --decode + 1 tokens after
the prompt (the first from the prompt's last logits).

Caches, at equal settings (bits, --group tokens/channels per group, --residual full-precision tokens):
    dynamic          transformers' DynamicCache (the reference: dense KV)
    ours:int8|4|2    ollm_triton.hf.CompressedKVCache("int8"|"int4"|"int2", group_size=G, residual=R) (KIVI: keys per
                     channel over G tokens, values per token over G channels; R..R+G-1 newest tokens exact);
                     also at --extra-residual (0: only the G-token group being filled stays exact, G/2 on
                     average, against quanto's R/2)
    quanto:4|2       QuantizedCache(backend="quanto", nbits, q_group_size=G, residual_length=R) (optimum-quanto has no
                     8-bit KV: nbits 2|4; both axes 0 = per token; the residual is flushed whole every R tokens)
    fp8              QuantizedCache(backend="fp8") where transformers has it (>= 5.25): per-tensor fp8, the only
                     8-bit KV cache transformers ships, beside int8

Models: the embedded tiny-llama (trained) and a Phi-3 of random weights (an architecture the engine does not
serve), --phi3-layers layers, hidden 256, GQA 4/2 heads, head_dim 64, vocab of the tiny-llama tokenizer.
Random weights give near-uniform next-token distributions, so its perplexity barely moves; the KL to the dense
cache (mean over scored tokens, nats) is the quality column that reads on both models.

Bytes: ours from `compression_stats`; quanto and fp8 summed over every tensor their layers hold (packed codes,
scales, shifts, residual), the dense size from DynamicCache. Speed: decode milliseconds per token (the fastest of
the --windows windows, each window's total decode time / --decode, after one untimed warm-up window; every cache
runs once per window, in turn, so a load spike on the shared 2-core machine hits them alike; read differences under
~15% as noise).

    python scripts/bench_hf_bridge.py --out experiments/hf_bridge/results/2026-12-06-cpu-quantized-cache.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ollm_triton.hf import CompressedKVCache
from ollm_triton.results import environment

ASSET = Path(__file__).resolve().parents[1] / "ollm_triton" / "assets" / "tiny-llama"


def models(phi3_layers: int):
    from transformers import AutoConfig, AutoModelForCausalLM

    tiny = AutoModelForCausalLM.from_pretrained(ASSET, dtype=torch.float32, attn_implementation="sdpa").eval()
    yield "tiny-llama (embedded, trained)", tiny
    cfg = AutoConfig.for_model("phi3", vocab_size=tiny.config.vocab_size, hidden_size=256, intermediate_size=512,
                               num_hidden_layers=phi3_layers, num_attention_heads=4, num_key_value_heads=2,
                               max_position_embeddings=4096, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    phi3 = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32, attn_implementation="sdpa").eval()
    yield f"phi3 (random config, {phi3_layers} layers)", phi3


def caches(model, group: int, residual: int, extra_residual: list[int]):
    from transformers import DynamicCache, QuantizedCache

    yield "dynamic", lambda: DynamicCache(config=model.config)
    for bits in (8, 4, 2):
        yield f"ours:int{bits}", lambda b=bits: CompressedKVCache(f"int{b}", group_size=group, residual=residual)
        if bits != 8:
            yield f"quanto:{bits}", lambda b=bits: QuantizedCache(backend="quanto", config=model.config, nbits=b,
                                                                   q_group_size=group, residual_length=residual)
    for r in extra_residual:  # the same codec with a shorter exact window (quanto's holds R/2 tokens on average)
        for bits in (4, 2):
            yield f"ours:int{bits} residual={r}", lambda b=bits, r=r: CompressedKVCache(f"int{b}", group_size=group,
                                                                                        residual=r)
    try:
        QuantizedCache(backend="fp8", config=model.config)
        yield "fp8", lambda: QuantizedCache(backend="fp8", config=model.config)
    except ValueError:  # transformers before 5.25 has no fp8 backend
        pass


def tensor_bytes(obj) -> int:
    """Bytes of every tensor inside obj (tensor subclasses through __tensor_flatten__, tuples, dicts)."""
    if isinstance(obj, torch.Tensor):
        if hasattr(obj, "__tensor_flatten__") and type(obj) is not torch.Tensor:
            names, _ = obj.__tensor_flatten__()
            return sum(tensor_bytes(getattr(obj, n)) for n in names)
        return obj.numel() * obj.element_size()
    if isinstance(obj, (tuple, list)):
        return sum(tensor_bytes(o) for o in obj)
    if isinstance(obj, dict):
        return sum(tensor_bytes(o) for o in obj.values())
    return 0


def held_bytes(cache) -> int:
    if isinstance(cache, CompressedKVCache):
        return cache.compression_stats.compressed_bytes
    total = 0
    for layer in cache.layers:
        for name in ("keys", "values", "_quantized_keys", "_quantized_values"):
            total += tensor_bytes(getattr(layer, name, None))
    return total


@torch.inference_mode()
def run_window(model, cache, ids: torch.Tensor, prompt: int) -> tuple[torch.Tensor, float]:
    """-> (float32 log-probs [decode, V] of the scored tokens, decode seconds)."""
    logits = model(ids[:, :prompt], past_key_values=cache, use_cache=True).logits[:, -1:]
    out = [logits]
    start = time.perf_counter()
    for i in range(prompt, ids.shape[1] - 1):
        out.append(model(ids[:, i : i + 1], past_key_values=cache, use_cache=True).logits)
    seconds = time.perf_counter() - start
    return torch.cat(out, dim=1)[0].float().log_softmax(-1), seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompt", type=int, default=256)
    ap.add_argument("--decode", type=int, default=256)
    ap.add_argument("--windows", type=int, default=3)
    ap.add_argument("--group", type=int, default=64)
    ap.add_argument("--residual", type=int, default=128)
    ap.add_argument("--extra-residual", type=int, nargs="*", default=[0])
    ap.add_argument("--phi3-layers", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import AutoTokenizer

    from ollm_triton.data.corpus import load_eval_text

    text, data_meta = load_eval_text("corpus")
    tok = AutoTokenizer.from_pretrained(ASSET)
    need = args.windows * (args.prompt + args.decode + 1)
    ids = torch.tensor(tok(text[: need * 8])["input_ids"][:need])[None]
    if ids.shape[1] < need:
        raise SystemExit(f"the eval text gave {ids.shape[1]} tokens, {need} needed")
    span = args.prompt + args.decode + 1
    windows = [ids[:, w * span : (w + 1) * span] for w in range(args.windows)]
    targets = [w[0, args.prompt :] for w in windows]  # out[k] predicts token prompt + k

    rows = []
    for model_name, model in models(args.phi3_layers):
        run_window(model, next(caches(model, args.group, args.residual, []))[1](), windows[0], args.prompt)  # warm-up
        made = list(caches(model, args.group, args.residual, args.extra_residual))
        acc = {name: {"nll": [], "kl": [], "secs": [], "ratio": []} for name, _ in made}
        for win, tgt in zip(windows, targets, strict=True):  # caches in turn within each window: load hits all alike
            ref_logp = dense_bytes = None
            for cache_name, make in made:
                cache = make()
                logp, seconds = run_window(model, cache, win, args.prompt)
                if cache_name == "dynamic":
                    ref_logp, dense_bytes = logp, held_bytes(cache)
                a = acc[cache_name]
                a["nll"].append(-logp.gather(1, tgt[:, None]).squeeze(1))
                a["kl"].append(F.kl_div(logp, ref_logp, log_target=True, reduction="none").sum(-1))
                a["secs"].append(seconds / args.decode)
                a["ratio"].append(dense_bytes / held_bytes(cache))
        for cache_name, _ in made:
            a = acc[cache_name]
            nll_all = torch.cat(a["nll"])
            row = {"model": model_name, "cache": cache_name, "ppl": float(nll_all.mean().exp()),
                   "kl_to_dense": float(torch.cat(a["kl"]).mean()),
                   "decode_ms_per_token": 1e3 * min(a["secs"]),
                   "decode_ms_per_token_windows": [1e3 * x for x in a["secs"]],
                   "dense_over_held_bytes": statistics.mean(a["ratio"]), "scored_tokens": int(nll_all.numel())}
            rows.append(row)
            print(json.dumps(row), flush=True)
        base = {r["model"]: r for r in rows if r["cache"] == "dynamic"}
        for r in rows:
            r["ppl_delta_pct"] = 100.0 * (r["ppl"] / base[r["model"]]["ppl"] - 1.0)

    import transformers

    try:
        from importlib.metadata import version

        quanto = version("optimum-quanto")
    except Exception:
        quanto = None
    env = environment(torch.device("cpu"))
    env.update({"transformers": transformers.__version__, "optimum_quanto": quanto, "threads": args.threads})
    result = {"command": "python " + " ".join(__import__("sys").argv), "env": env, "data": data_meta,
              "settings": vars(args) | {"out": str(args.out)}, "rows": rows}
    print()
    print("| model | cache | ppl | Δppl | KL to dense (nats) | decode ms/token | dense / held bytes |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['model']} | {r['cache']} | {r['ppl']:.3f} | {r['ppl_delta_pct']:+.2f}% | {r['kl_to_dense']:.2e} "
              f"| {r['decode_ms_per_token']:.2f} | {r['dense_over_held_bytes']:.2f}x |")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
