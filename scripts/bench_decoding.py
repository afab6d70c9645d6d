"""Decoder strategies side by side: decode tok/s and speed-up over `greedy`, with what explains each speed-up.

    python scripts/bench_decoding.py --out experiments/decoding/results/<date>-cpu-bench_decoding.json  # embedded pair
    python scripts/bench_decoding.py --device cuda --out $OUT/decoding_h200.json
    python scripts/bench_decoding.py --target random:tiny_random --draft random:tiny_random --new-tokens 32  # plumbing

Batch 1, `--new-tokens` new tokens after each of `--prompts` held-out prompts (the first `--prompt-tokens` tokens of
the corpus eval documents, ollm_triton.data.corpus), every strategy on every prompt in the same process, greedy
first. Each strategy generates once untimed (kernels compile, caches fill, `adaptive` learns its costs), then
`--repeats` timed generations per prompt, round-robin over the strategies, whose median decode time counts.
Timers are the strategies' own device-synchronized `prefill_s` / `decode_s` (device events split the decode time
into draft / verify / accept).
decode tok/s = sum over prompts of (new tokens - 1) / sum of decode seconds (the first token comes from the
prefill), as the throughput task computes it. Greedy-mode strategies must reproduce greedy's tokens exactly:
the `= greedy` column says whether they did on every prompt.

Writes JSON (device, versions, git sha, date, the command, per-prompt counters) and prints a GitHub table last.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import statistics
import sys
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ollm_triton.decoding.drafters import draft_source  # noqa: E402
from ollm_triton.engine import load_engine  # noqa: E402
from ollm_triton.registry import registry  # noqa: E402
from ollm_triton.results import environment  # noqa: E402

DEFAULT_STRATEGIES = [
    "greedy",
    "speculative:num_candidates=1",
    "speculative:num_candidates=2",
    "speculative:num_candidates=3",
    "speculative:num_candidates=4",
    "speculative:num_candidates=6",
    "adaptive",
    "tree:depth=4,branching=2,width=3",
    "tree:depth=5,branching=2,width=4",
    "prompt_lookup",
    "self_speculative:draft_layers=2",
    "self_speculative:draft_layers=3",
]


def parse_strategy(spec: str) -> tuple[str, dict]:
    """"name:key=value,key=value" -> (name, params); values parsed as YAML scalars (4 -> int, 0.5 -> float)."""
    name, _, rest = spec.partition(":")
    params = {}
    for item in filter(None, rest.split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"strategy {spec!r}: expected name:key=value,key=value")
        params[key.strip()] = yaml.safe_load(value)
    return name, params


def build_strategy(name: str, params: dict, draft_engine, draft_spec: str):
    spec = registry.get("decoder", name)
    fields = {f.name for f in dataclasses.fields(spec.schema)}
    if "draft" in fields:
        params = {"draft": draft_spec, **params}
        return registry.build("decoder", name, params, draft_engine=draft_engine)
    return registry.build("decoder", name, params)


def greedy_mode(strategy) -> bool:
    return getattr(strategy.cfg, "temperature", 0.0) == 0.0 if strategy.cfg is not None else True


def make_prompts(engine, count: int, length: int, seed: int) -> tuple[list[torch.Tensor], list[str]]:
    """Held-out prompts: the first `length` tokens of the first `count` eval documents long enough to hold them.
    A target without a tokenizer (random weights) gets seeded random token ids instead."""
    if engine.tokenizer is None:
        gen = torch.Generator().manual_seed(seed)
        ids = [torch.randint(0, engine.config.vocab_size, (1, length), generator=gen) for _ in range(count)]
        return ids, [f"random:{seed}:{i}" for i in range(count)]
    from ollm_triton.data.corpus import load_corpus

    corpus = load_corpus()
    prompts, names = [], []
    for path, doc in zip(corpus.eval_paths, corpus.eval_docs, strict=False):
        ids = engine.tokenizer.encode(doc)
        if len(ids) >= length:
            prompts.append(torch.tensor([ids[:length]]))
            names.append(path)
        if len(prompts) == count:
            break
    if len(prompts) < count:
        raise SystemExit(f"only {len(prompts)} eval documents hold {length} tokens; lower --prompt-tokens")
    return prompts, names


def aggregate(runs: list[dict]) -> dict:
    """Sums over prompts of the median runs, then rates and means (weighted by what they are per)."""
    total = lambda key: sum(r["counters"].get(key, 0.0) for r in runs)  # noqa: E731
    tokens = sum(r["new_tokens"] for r in runs)
    decode_s, prefill_s = total("decode_s"), total("prefill_s")
    iterations = total("iterations")
    out = {
        "new_tokens": tokens,
        "decode_s": decode_s,
        "prefill_s": prefill_s,
        "decode_tok_s": sum(r["new_tokens"] - 1 for r in runs) / decode_s,
        "e2e_tok_s": tokens / (decode_s + prefill_s),
        "target_forwards_per_token": total("target_forwards") / tokens,
        "matches_greedy": all(r["matches_greedy"] for r in runs if r["matches_greedy"] is not None)
        if any(r["matches_greedy"] is not None for r in runs) else None,
    }
    if iterations:
        drafted = sum(r["counters"]["mean_drafted"] * r["counters"]["iterations"] for r in runs)
        accepted = sum((r["counters"]["mean_accepted_length"] - 1) * r["counters"]["iterations"] for r in runs)
        draft_forwards = total("draft_forwards")
        out.update(
            acceptance_rate=accepted / drafted if drafted else 0.0,
            mean_accepted_length=(accepted + iterations) / iterations,
            mean_drafted=drafted / iterations,
            draft_step_s=total("draft_s") / draft_forwards if draft_forwards else 0.0,
            draft_iteration_s=total("draft_s") / iterations,
            verify_step_s=total("verify_s") / iterations,
            accept_step_s=total("accept_s") / iterations,
            iteration_s=decode_s / iterations,
            draft_share=total("draft_s") / decode_s,
        )
    else:  # greedy: one target forward per token after the first
        out.update(verify_step_s=decode_s / max(sum(r["new_tokens"] - 1 for r in runs), 1))
    for key in ("candidates_mean", "candidates_final", "candidates_changes", "tree_nodes_mean", "lookup_hit_rate"):
        if key in runs[0]["counters"]:
            out[key] = statistics.fmean(r["counters"][key] for r in runs)
    return out


@torch.inference_mode()
def draft_agreement(target, draft, prompts, greedy_tokens) -> dict:
    """How often the draft's top-1 (top-2) next token is the target's greedy token along the greedy outputs: the
    per-draft acceptance probability a that greedy speculation can expect, and E(k) = (1 - a^(k+1)) / (1 - a)
    tokens per target forward if acceptances were independent."""
    top1 = top2 = total = 0
    for prompt, tokens in zip(prompts, greedy_tokens, strict=True):
        seq = torch.cat((prompt.to(draft.device), tokens), dim=1)
        logits = draft.forward(seq, draft.new_cache(1, seq.shape[1] + 1))[0, prompt.shape[1] - 1 : -1]
        want = tokens[0]
        best2 = logits[:, : target.config.vocab_size].topk(2, dim=-1).indices
        top1 += int((best2[:, 0] == want).sum())
        top2 += int((best2 == want[:, None]).any(-1).sum())
        total += want.numel()
    a = top1 / total
    return {"top1": a, "top2": top2 / total, "tokens": total,
            "expected_tokens_per_forward": {k: (1 - a ** (k + 1)) / (1 - a) for k in (1, 2, 3, 4, 6, 8)},
            "bound_infinite_drafts": 1 / (1 - a)}


def table(results: list[dict]) -> str:
    ms = lambda s: f"{1e3 * s:.2f}" if s else "-"  # noqa: E731
    rows = [
        "| strategy | decode tok/s | speed-up | e2e tok/s | acceptance | tokens / target fwd | drafts / iter "
        "| draft step ms | verify ms | iteration ms | = greedy |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|:---:|",
    ]
    for r in results:
        a = r["aggregate"]
        same = {True: "yes", False: "**NO**", None: "n/a"}[a["matches_greedy"]]
        extra = ""
        if "candidates_mean" in a:
            extra = f" (k mean {a['candidates_mean']:.1f})"
        rows.append(
            f"| {r['strategy']}{extra} | {a['decode_tok_s']:.1f} | {a['speedup_ratio']:.2f}x | {a['e2e_tok_s']:.1f} "
            f"| {a.get('acceptance_rate', 0):.2f} | {a.get('mean_accepted_length', 1):.2f} "
            f"| {a.get('mean_drafted', 0):.1f} | {ms(a.get('draft_step_s'))} | {ms(a['verify_step_s'])} "
            f"| {ms(a.get('iteration_s', a['verify_step_s']))} | {same} |"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", default="embedded:tiny-llama",
                    help="embedded:NAME | checkpoint dir | random:<json|preset>")
    ap.add_argument("--draft", default="embedded:tiny-llama-draft")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto", help="auto: bfloat16 on CUDA, float32 on the CPU")
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--prompt-tokens", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=1, help="timed generations per prompt (median)")
    ap.add_argument("--strategies", nargs="+", default=DEFAULT_STRATEGIES, help="name[:key=value,...]; greedy first")
    ap.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="JSON path")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    source, seed = draft_source(args.target)
    target = load_engine(source, device=args.device, dtype=args.dtype, seed=seed)
    device = target.device
    needs_draft = any(
        "draft" in {f.name for f in dataclasses.fields(registry.get("decoder", parse_strategy(s)[0]).schema)}
        for s in args.strategies
    )
    draft = None
    if needs_draft:
        dsource, dseed = draft_source(args.draft)
        draft = load_engine(dsource, device=device, dtype=target.dtype, seed=dseed)
    prompts, prompt_names = make_prompts(target, args.prompts, args.prompt_tokens, args.seed)

    labels = list(args.strategies)
    if labels[0] != "greedy":  # the baseline of every speed-up, and the reference of greedy equivalence
        labels.insert(0, "greedy")
    specs = [parse_strategy(s) for s in labels]
    strategies = [build_strategy(n, p, draft, args.draft) for n, p in specs]
    eos = None  # fixed-length runs: every strategy generates exactly --new-tokens on every prompt

    for strategy in strategies:  # warm-up: compile, allocate, let adaptive measure
        strategy.generate(target, prompts[0], min(32, args.new_tokens), eos_id=eos)

    per_prompt: list[list[dict]] = [[] for _ in strategies]
    greedy_outputs: list[dict] = []
    for p_index, prompt in enumerate(prompts):
        # repeats round-robin over the strategies, so a slow spell of a shared machine hits them all alike
        runs: list[list] = [[] for _ in strategies]
        for _ in range(args.repeats):
            for s_index, strategy in enumerate(strategies):
                runs[s_index].append(strategy.generate(target, prompt, args.new_tokens, eos_id=eos))
        greedy_tokens = runs[0][0].tokens
        greedy_outputs.append({"greedy_tokens": greedy_tokens})
        for s_index, strategy in enumerate(strategies):
            ordered = sorted(runs[s_index], key=lambda g: g.counters["decode_s"])
            out = ordered[len(ordered) // 2]
            matches, diverges_at = None, None
            if s_index and greedy_mode(strategy):
                matches = all(bool(torch.equal(g.tokens, greedy_tokens)) for g in runs[s_index])
                differ = (out.tokens != greedy_tokens).nonzero()
                diverges_at = int(differ[0, 1]) if differ.numel() else None  # a bf16 near-tie flips one argmax
            per_prompt[s_index].append({
                "prompt": prompt_names[p_index], "prompt_tokens": prompt.shape[1], "new_tokens": out.tokens.shape[1],
                "matches_greedy": matches, "first_difference": diverges_at, "counters": out.counters,
                "decode_s_runs": [g.counters["decode_s"] for g in runs[s_index]],
            })
            print(f"[{prompt_names[p_index]}] {labels[s_index]:40s} decode {out.counters['decode_s']:.3f} s"
                  + ("" if matches is None else f"  = greedy: {matches}"), flush=True)

    agreement = draft_agreement(target, draft, prompts, [r["greedy_tokens"] for r in greedy_outputs]) \
        if draft is not None else None

    results = []
    for label, (name, params), runs in zip(labels, specs, per_prompt, strict=False):
        results.append({"strategy": label, "name": name, "params": params, "aggregate": aggregate(runs),
                        "per_prompt": runs})
    base = results[0]["aggregate"]["decode_tok_s"]
    for r in results:
        r["aggregate"]["speedup_ratio"] = r["aggregate"]["decode_tok_s"] / base

    env = environment(device)
    record = {
        "command": shlex.join([sys.executable.rsplit("/", 1)[-1], *sys.argv]),
        "env": env,
        "target": {"source": args.target, **target.describe()},
        "draft": {"source": args.draft, **draft.describe()} if draft is not None else None,
        "args": vars(args),
        "prompts": prompt_names,
        "draft_agreement": agreement,
        "results": results,
        "threads": torch.get_num_threads(),
        "load_average": os.getloadavg(),  # a shared CPU: other processes' load is part of the conditions
    }
    text = table(results)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(record, indent=1, default=str))
        Path(args.out).with_suffix(".md").write_text(
            f"{env['device_name']} ({env['device']}), torch {env['torch']}, {env['date']}, git {env['git_sha']}\n\n"
            f"`{record['command']}`\n\n{text}\n")
    print(f"\n{env['device_name']} ({env['device']}), torch {env['torch']}, git {env['git_sha']}, {env['date']}")
    print(f"target {args.target} ({target.num_parameters():,} params), draft {args.draft}"
          + (f" ({draft.num_parameters():,} params)" if draft is not None else "")
          + f", batch 1, {args.prompts} prompts x {args.prompt_tokens} tokens, {args.new_tokens} new tokens\n")
    if agreement is not None:
        print(f"draft agreement with greedy: top-1 {agreement['top1']:.3f}, top-2 {agreement['top2']:.3f} "
              f"over {agreement['tokens']} tokens; tokens per target forward if independent: "
              + ", ".join(f"k={k}: {v:.2f}" for k, v in agreement["expected_tokens_per_forward"].items())
              + f"; infinite free drafts: {agreement['bound_infinite_drafts']:.2f}\n")
    print(text)


if __name__ == "__main__":
    main()
