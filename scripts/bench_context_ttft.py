"""Time to first token with and without context compression, Llama-3-8B shapes at 32k and 100k tokens (GPU).

The target has Llama-3-8B's shapes with random bf16 weights (conf/model/llama3_8b.yaml): the numbers are times only
(what survives compression of random ids means nothing). The scorer is the embedded draft model on the same GPU; the
target's ids are clamped into its 8192-token vocabulary. For each prompt length and each method x ratio, in one
process after a warm-up of each path:

    ttft = compression (scorer forwards + selection) + the target's prefill of the kept tokens (chunked by
           --prefill-chunk, the last token's logits)

against the full prompt's prefill. Checks: the kept length is round(ratio * T), the protected question tail
survives, the logits are finite. Prints a GitHub table last and writes JSON with device, versions, git sha, date.

    python scripts/bench_context_ttft.py                         # 32k and 100k, importance and hierarchical at 0.5, 0.3
    python scripts/bench_context_ttft.py --lengths 4096 --model tiny_random   # a CPU check of the script
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from omegaconf import OmegaConf  # noqa: E402

from ollm_triton.engine import load_engine  # noqa: E402
from ollm_triton.registry import registry  # noqa: E402
from ollm_triton.results import environment  # noqa: E402
from ollm_triton.timing import synchronize  # noqa: E402

QUESTION = 24  # tokens at the prompt's end kept as the question span


def timed(device, fn):
    synchronize(device)
    t0 = time.perf_counter()
    out = fn()
    synchronize(device)
    return out, time.perf_counter() - t0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="llama3_8b", help="a conf/model preset with random weights")
    p.add_argument("--lengths", type=int, nargs="+", default=[32768, 100000])
    p.add_argument("--methods", nargs="+", default=["importance", "hierarchical"])
    p.add_argument("--ratios", type=float, nargs="+", default=[0.5, 0.3])
    p.add_argument("--prefill-chunk", type=int, default=8192)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default=str(ROOT / "experiments" / "context" / "ttft_results.json"))
    args = p.parse_args()

    arch = OmegaConf.to_container(OmegaConf.load(ROOT / "ollm_triton" / "conf" / "model" / f"{args.model}.yaml"))
    if arch.get("source") != "random":
        p.error(f"--model {args.model}: a preset with random weights (source: random) is expected")
    target = load_engine(arch["arch"], device=args.device, dtype="auto", prefill_chunk=args.prefill_chunk)
    device = target.device
    gen = torch.Generator().manual_seed(0)
    rows = []
    compressors = {(m, r): registry.build("context", m, {"ratio": r}) for m in args.methods for r in args.ratios}
    for c in compressors.values():
        c.prepare(target)  # scorer weights on the GPU before anything is timed

    def prefill(ids):
        cache = target.new_cache(1, ids.shape[1])
        logits = target.prefill(ids.to(device), cache)
        assert torch.isfinite(logits).all(), "non-finite logits"
        del cache
        return logits

    for n in args.lengths:
        ids = torch.randint(3, target.config.vocab_size, (1, n), generator=gen)
        query = (n - QUESTION, n)
        prefill(ids[:, : min(n, 2 * args.prefill_chunk)])  # warm-up: kernels, allocator
        _, full_s = timed(device, lambda ids=ids: prefill(ids))
        rows.append({"length": n, "method": "none", "ratio": 1.0, "kept": n, "compress_s": 0.0,
                     "prefill_s": full_s, "ttft_s": full_s})
        print(f"{n} tokens: full prefill {full_s:.3f} s", flush=True)
        for (method, ratio), c in compressors.items():
            w = min(n, 4096)
            c.compress(ids[:, :w], query=(w - QUESTION, w), target=target)  # warm-up of the scorer path
            out, compress_s = timed(device, lambda c=c, ids=ids, q=query: c.compress(ids, query=q, target=target))
            assert out.ids.shape[1] == round(ratio * n), (out.ids.shape, ratio * n)
            assert set(range(*query)) <= set(out.kept[0].tolist()), "the question was dropped"
            _, prefill_s = timed(device, lambda kept=out.ids: prefill(kept))
            row = {"length": n, "method": method, "ratio": ratio, "kept": out.ids.shape[1],
                   "compress_s": compress_s, "prefill_s": prefill_s, "ttft_s": compress_s + prefill_s,
                   "saved_s": full_s - compress_s - prefill_s}
            rows.append(row)
            print(f"{n} tokens: {method} {ratio}: compress {compress_s:.3f} s + prefill {prefill_s:.3f} s "
                  f"(saved {row['saved_s']:.3f} s)", flush=True)
        torch.cuda.empty_cache() if device.type == "cuda" else None

    env = environment(device)
    env["weights"] = f"random ({args.model} shapes): times only"
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps({"env": env, "args": vars(args), "rows": rows}, indent=1))
    print(f"wrote {out_path}")
    print("| tokens | method | ratio | kept | compress s | prefill s | ttft s | saved vs full |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        full = next(x["ttft_s"] for x in rows if x["length"] == r["length"] and x["method"] == "none")
        print(f"| {r['length']} | {r['method']} | {r['ratio']:g} | {r['kept']} | {r['compress_s']:.3f} | "
              f"{r['prefill_s']:.3f} | {r['ttft_s']:.3f} | {1 - r['ttft_s'] / full:+.0%} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
