"""Context compression against KV eviction at the same ratio, on the embedded model (CPU is enough).

For each ratio (fraction of the prompt kept) it measures, with the project's own tasks:
- passkey accuracy (tasks/passkey.py): prompts of --lengths tokens, the needle at --depths, --samples each;
- perplexity (tasks/perplexity.py): windows of --window tokens every --stride, so each window's context of
  window - stride tokens is what gets compressed, and its stride tokens are scored after it;
for the context compressors `importance` and `hierarchical` (+context=..., the prompt shortened before prefill) and
the KV-eviction codecs `h2o`, `snapkv`, `streaming` (+cache=..., K/V dropped after the full prompt was read), plus
the uncompressed baseline. Writes experiments/context/results.json (with device, versions, git sha, date, command)
and prints a GitHub table last.

    python scripts/study_context.py                    # the committed table (about 20-40 min on 2 shared cores)
    python scripts/study_context.py --quick            # a minute: one ratio, short prompts (a check, not a result)
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

from ollm_triton.engine import load_engine  # noqa: E402
from ollm_triton.registry import registry  # noqa: E402
from ollm_triton.results import environment  # noqa: E402
from ollm_triton.tasks.base import RunContext  # noqa: E402

MODEL = ROOT / "ollm_triton" / "assets" / "tiny-llama"
CONTEXT = ("importance", "hierarchical")
EVICTION = ("h2o", "snapkv", "streaming")


def run_tasks(engine, context, args) -> dict:
    decoder = registry.build("decoder", "greedy")
    passkey = registry.build("task", "passkey", {"lengths": args.lengths, "depths": args.depths,
                                                 "samples": args.samples})
    ppl = registry.build("task", "perplexity", {"max_length": args.window, "stride": args.stride,
                                                "max_tokens": args.ppl_tokens})
    ctx = RunContext(engine=engine, decoder=decoder, device=engine.device, context=context)
    out = {f"passkey/{k}": v for k, v in passkey.run(ctx).items()}
    out.update({f"perplexity/{k}": v for k, v in ppl.run(ctx).items()})
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ratios", type=float, nargs="+", default=[0.9, 0.7, 0.5, 0.3, 0.1])
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048])
    p.add_argument("--depths", type=float, nargs="+", default=[0.1, 0.5, 0.9])
    p.add_argument("--samples", type=int, default=2)
    p.add_argument("--window", type=int, default=1024)
    p.add_argument("--stride", type=int, default=256)
    p.add_argument("--ppl-tokens", type=int, default=2048)
    p.add_argument("--methods", nargs="+", default=[*CONTEXT, *EVICTION])
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--quick", action="store_true", help="one ratio, short prompts: checks the script runs")
    p.add_argument("--out", default=str(ROOT / "experiments" / "context" / "results.json"))
    args = p.parse_args()
    if args.quick:
        args.ratios, args.lengths, args.depths, args.samples = [0.3], [256], [0.5], 1
        args.window, args.stride, args.ppl_tokens = 256, 64, 512
    if args.threads:
        torch.set_num_threads(args.threads)
    unknown = [m for m in args.methods if m not in (*CONTEXT, *EVICTION)]
    if unknown:
        p.error(f"unknown method(s) {unknown}; accepted: {', '.join((*CONTEXT, *EVICTION))}")

    rows = []
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    setup = {k: getattr(args, k) for k in ("ratios", "lengths", "depths", "samples", "window", "stride",
                                           "ppl_tokens", "methods", "quick")}

    def save(env: dict) -> None:  # after every row, so a long study interrupted still has what it measured
        out.write_text(json.dumps({"env": env, "setup": setup, "rows": rows}, indent=1, default=str))

    def record(method: str, kind: str, ratio: float, engine, context) -> None:
        t0 = time.perf_counter()
        m = run_tasks(engine, context, args)
        row = {"method": method, "kind": kind, "ratio": ratio, "seconds": time.perf_counter() - t0,
               "passkey_acc": m["passkey/acc"], "ppl": m["perplexity/ppl"],
               "passkey_context_ratio": m.get("passkey/context_ratio"),
               "passkey_needle_kept": m.get("passkey/context_needle_kept"),
               "ppl_context_ratio": m.get("perplexity/context_ratio"),
               "context_s_per_prompt": (m["passkey/context_s"] / m["passkey/documents"]
                                        if "passkey/context_s" in m else None),
               "passkey_effect": m["passkey/plugin_effect"], "ppl_effect": m["perplexity/plugin_effect"],
               "metrics": m}
        rows.append(row)
        save(env)
        print(f"{method:13s} ratio {ratio:.1f}: passkey {row['passkey_acc']:.3f}  ppl {row['ppl']:.3f}  "
              f"({row['seconds']:.0f} s)", flush=True)

    dense = load_engine(MODEL)
    env = environment(dense.device)
    env["torch_threads"] = torch.get_num_threads()
    record("none", "baseline", 1.0, dense, None)
    for ratio in args.ratios:
        for method in args.methods:
            if method in CONTEXT:
                compressor = registry.build("context", method, {"ratio": ratio})
                record(method, "context", ratio, dense, compressor)
                compressor.close()
            else:
                engine = load_engine(MODEL, codec=registry.build("cache", method, {"ratio": ratio}))
                record(method, "kv eviction", ratio, engine, None)
                engine.close()

    env["finished"] = environment(dense.device)["date"]
    save(env)
    print(f"wrote {out}")
    print(table(rows, args.ratios))
    return 0


def table(rows: list[dict], ratios: list[float]) -> str:
    """Passkey accuracy / perplexity per method (rows) and ratio (columns), the baseline first."""
    methods = list(dict.fromkeys(r["method"] for r in rows if r["kind"] != "baseline"))
    base = next(r for r in rows if r["kind"] == "baseline")
    head = "| method | kind | " + " | ".join(f"{x:g}" for x in ratios) + " |"
    lines = [head, "|" + " --- |" * (len(ratios) + 2)]
    lines.append("| none (full prompt) | baseline | " + " | ".join(
        f"{base['passkey_acc']:.2f} / {base['ppl']:.2f}" for _ in ratios) + " |")
    for m in methods:
        cells = []
        for x in ratios:
            hit = [r for r in rows if r["method"] == m and r["ratio"] == x]
            cells.append(f"{hit[0]['passkey_acc']:.2f} / {hit[0]['ppl']:.2f}" if hit else "")
        kind = next(r["kind"] for r in rows if r["method"] == m)
        lines.append(f"| {m} | {kind} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
