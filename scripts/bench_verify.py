"""Verify at the cost of one step (issue 20 item 5) and the speculative table's measured + modelled rows (issue 19
item 4), on Llama-3-8B shapes with a Llama-3.2-1B-shaped draft, in one process.

    OLLM_GIT_SHA=<sha> python3 scripts/bench_verify.py --out $OUT/bench_verify.json     # H100/H200: ~2 min
    python scripts/bench_verify.py --small --out /tmp/bench_verify.json                # CPU smoke test (seconds)

Sections (each guarded: a failure is recorded in the JSON and the run goes on; a time budget skips what would not
fit, saying so):
  bandwidth   device copy bandwidth (read + write) -> the floor of a step: weight bytes (+ the KV it must read) /
              bandwidth
  verify      target (--model, random weights): the verify block of T tokens the speculative decoders replay
              (decoding/static_steps.py, one captured graph per T: StaticTarget.verify) at each --contexts, for
              T in --tokens, against greedy's captured decode step (engine/fast_decode.py) at the same context.
              With --kernel, the same blocks with the previous attention too (masked SDPA over the whole static
              buffer, StaticModel.attention_kernel=False) in their own buffers: the in-run baseline of the verify
              kernel (kernels/attention_decode_varlen.py), and the two paths' logits for the same block compared
  check       at each context: a T-token block's logits against T single-token steps fed the same tokens (the
              static T=1 step, and greedy's decode step): relative L2 error in float64 of the logits, argmax
              agreement; and the same check on the embedded target in float32 (the exactness claim)
  draft       draft (--draft-model): its captured single-token step (StaticModelDrafter's per-draft cost), with
              F.linear in place of the GEMV as the in-run baseline of that choice, and greedy's step for reference
  acceptance  a = how often the embedded draft's top-1 is the embedded target's greedy token along the target's
              greedy output on held-out prompts (measured, embedded pair, this device); cross-checked by the
              acceptance speculative k=1 reaches on the same prompts
  model       modelled speed-up over greedy for k = 1..--max-k drafts (Leviathan et al. 2023):
                  E(k) = (1 - a^(k+1)) / (1 - a)            expected tokens per verification
                  S(k) = E(k) / (k * t_draft / t_target + t_verify(k+1) / t_target)
              t_target: greedy's decode step; t_verify(T): the T-token verify block; t_draft: the draft's
              single-token step, all measured above at the same context (acceptance bookkeeping and the draft's
              catch-up step are left out: an upper bound on what the loop gets from these costs)
  lookup      prompt_lookup against greedy end to end on the target, on a prompt that ends with the target's own
              greedy output, which a random-weight model keeps repeating: an upper bound "by construction" (the
              acceptance is measured, nothing forces the drafts)

Timing: CUDA events around --replays calls of a captured step, median of --repeats such runs, after the capture's
own warm-up and one untimed call (perf_counter on the CPU). JSON: device, versions, git sha (OLLM_GIT_SHA
overrides), date, command. GitHub tables are printed last.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from bench_decoding import draft_agreement, make_prompts  # noqa: E402
from bench_fast_path import copy_bandwidth  # noqa: E402

from ollm_triton.decoding.drafters import draft_source  # noqa: E402
from ollm_triton.decoding.static_steps import StaticModel, resolve_fast_path, static_model  # noqa: E402
from ollm_triton.engine import load_engine  # noqa: E402
from ollm_triton.registry import registry  # noqa: E402
from ollm_triton.results import environment  # noqa: E402

SMALL_TARGET = dict(model_type="llama", vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096, rms_norm_eps=1e-5)
SMALL_DRAFT = dict(SMALL_TARGET, hidden_size=64, intermediate_size=128, num_hidden_layers=1)
FORMULA = ("E(k) = (1 - a^(k+1)) / (1 - a); speed-up S(k) = E(k) / (k * t_draft / t_target + "
           "t_verify(k+1) / t_target)  [Leviathan et al. 2023; acceptance bookkeeping and catch-up steps left out]")


# ---- timing -------------------------------------------------------------------------------------------------------


def ms_per_call(fn, device: torch.device, replays: int, repeats: int, reset=None) -> dict:
    """Median milliseconds of one fn() over `repeats` runs of `replays` back-to-back calls (CUDA events on a GPU),
    after one untimed call; reset() runs before each run, outside the timed region."""
    cuda = device.type == "cuda"
    if reset:
        reset()
    fn()
    runs = []
    for _ in range(repeats):
        if reset:
            reset()
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize(device)
            start.record()
            for _ in range(replays):
                fn()
            end.record()
            end.synchronize()
            runs.append(start.elapsed_time(end) / replays)
        else:
            t0 = time.perf_counter()
            for _ in range(replays):
                fn()
            runs.append((time.perf_counter() - t0) * 1e3 / replays)
    return {"ms": statistics.median(runs), "runs_ms": runs}


# ---- the steps under test -------------------------------------------------------------------------------------------


def prompt_ids(vocab: int, length: int, device, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (1, length), generator=gen).to(device)


class Steps:
    """One engine's captured steps at one context: the static T-token blocks (the speculative decoders' verify and
    draft steps) and greedy's decode step, both holding the same `context`-token prompt."""

    def __init__(self, engine, context: int, max_block: int, replays: int, linear=None, attention_kernel=None):
        self.engine, self.context = engine, context
        path = resolve_fast_path("auto", engine)  # what the strategies run: "graph" on CUDA, "static" on the CPU
        if path == "eager":
            raise RuntimeError(f"no static verify step for this engine (fast path: {engine.fast_path})")
        self.captured = path == "graph"
        self.max_len = context + max(max_block, replays) + 8
        max_len = self.max_len
        if linear is None and attention_kernel is None:
            self.sm = static_model(engine, 1, max_len, self.captured)  # the decoders' own (shared) StaticModel
        else:  # a private one with another weight matmul or attention (the in-run baseline of a kernel choice)
            self.sm = StaticModel(engine, 1, max_len, self.captured)
            self.sm.linear = linear or self.sm.linear
            self.sm.attention_kernel = attention_kernel
        self.ids = prompt_ids(engine.config.vocab_size, context, engine.device, seed=context)
        self.sm.prefill(self.ids)
        self.fd, self.bk = None, None

    def block(self, t: int):
        """The T-token chain step at slot `context` (captured here), and a function that runs it."""
        st = self.sm.step(t)
        st.tokens.copy_(prompt_ids(self.engine.config.vocab_size, t, self.engine.device, seed=t))
        st.base.fill_(self.context)
        self.sm.prepare(st)
        return st, lambda: self.sm.run(st)

    def greedy(self, replays: int):
        """Greedy's decode step at `context` (a bucket of the engine's FastDecoder, captured), and a function that
        runs it with a reset that puts the row back at `context` (each step advances it by one)."""
        if self.bk is None:
            self.fd = self.engine.fast_decoder()
            self.bk = self.fd.bucket(1, max(self.max_len, self.context + replays + 8))
            self.bk.reset()
            self.engine.prefill(self.ids, self.bk.cache)
            self.fd.ensure_graph(self.bk, [self.context])
        return (lambda: self.fd.replay(self.bk)), (lambda: self.bk.pos.fill_(self.context))


def rel_l2(a: torch.Tensor, ref: torch.Tensor) -> float:
    a, ref = a.double(), ref.double()
    return float((a - ref).norm() / ref.norm())


@torch.inference_mode()
def block_check(steps: Steps, t: int) -> dict:
    """The T-token block's logits against T single-token steps fed the same tokens: the static T=1 step (the same
    mixer and buffers; run first, so each single step reads only what single steps wrote) and greedy's decode step
    (another mixer, attention kernel and weight matmul). All three hold the same prompt."""
    sm, c, dev = steps.sm, steps.context, steps.engine.device
    tokens = prompt_ids(steps.engine.config.vocab_size, t, dev, seed=1000 + t)
    one = sm.step(1)
    singles = []
    for j in range(t):
        one.tokens.copy_(tokens[:, j : j + 1])
        one.base.fill_(c + j)
        sm.run(one)
        singles.append(one.logits[0, 0].clone())
    singles = torch.stack(singles)
    st = sm.step(t)
    st.tokens.copy_(tokens)
    st.base.fill_(c)
    sm.run(st)
    block = st.logits[0].clone()
    run, reset = steps.greedy(replays=t)
    reset()
    greedy = []
    for j in range(t):
        steps.bk.token.fill_(int(tokens[0, j]))
        run()
        greedy.append(steps.bk.logits[0].clone())
    greedy = torch.stack(greedy)
    top = block.argmax(-1)
    return {"context": c, "tokens": t, "dtype": str(steps.engine.dtype).replace("torch.", ""),
            "rel_l2_vs_static_singles": rel_l2(block, singles), "rel_l2_vs_greedy_steps": rel_l2(block, greedy),
            "rel_l2_static_singles_vs_greedy_steps": rel_l2(singles, greedy),
            "argmax_agree_vs_static_singles": float((top == singles.argmax(-1)).float().mean()),
            "argmax_agree_vs_greedy_steps": float((top == greedy.argmax(-1)).float().mean())}


# ---- the run ------------------------------------------------------------------------------------------------------


def preset_arch(name: str) -> dict:
    path = REPO / "ollm_triton" / "conf" / "model" / f"{name}.yaml"
    if not path.is_file():
        raise SystemExit(f"--model/--draft-model {name!r}: no preset {path.relative_to(REPO)}")
    arch = yaml.safe_load(path.read_text()).get("arch")
    if not arch:
        raise SystemExit(f"conf/model/{name}.yaml has no `arch` (not a random-weight model); pick a random preset")
    return arch


def weight_bytes(engine) -> int:
    """Bytes one decode step must read: every weight but the embedding table (one row), unless it is the LM head."""
    cfg = engine.config
    embed = 0 if cfg.tie_word_embeddings else cfg.vocab_size * cfg.hidden_size
    return (engine.num_parameters() - embed) * engine.model.lm_head.weight.element_size()


def kv_bytes_per_token(engine) -> int:
    cfg = engine.config
    return 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * engine.model.lm_head.weight.element_size()


class Run:
    def __init__(self, args):
        self.args = args
        self.t0 = time.perf_counter()
        self.sections: dict = {}

    def left(self) -> float:
        return self.args.budget - (time.perf_counter() - self.t0)

    def section(self, name: str, need_s: float, fn) -> None:
        if self.left() < need_s:
            self.sections[name] = {"skipped": f"time budget: {self.left():.0f} s left, section needs ~{need_s:.0f} s"}
            print(f"[{name}] skipped (time budget)", flush=True)
            return
        t0 = time.perf_counter()
        try:
            self.sections[name] = fn()
        except Exception as e:
            self.sections[name] = {"error": f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}",
                                   "trace": traceback.format_exc()[-2000:]}
            print(f"[{name}] FAILED: {self.sections[name]['error']}", flush=True)
        self.sections[name]["section_s"] = time.perf_counter() - t0
        print(f"[{name}] {time.perf_counter() - t0:.1f} s", flush=True)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def modelled(a: float, k: int, c: float, v: float) -> dict:
    e = (1 - a ** (k + 1)) / (1 - a) if a < 1 else k + 1.0
    return {"k": k, "expected_tokens": e, "draft_cost": c, "verify_cost": v, "speedup": e / (k * c + v),
            "speedup_if_verify_cost_one_step": e / (k * c + 1.0)}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="llama3_8b", help="target: a random-weight conf/model preset")
    ap.add_argument("--draft-model", default="llama3_1b", help="draft: a random-weight conf/model preset")
    ap.add_argument("--small", action="store_true", help="tiny models and lengths on any device: the smoke test")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default=None, help="default bfloat16 on CUDA, float32 on the CPU")
    ap.add_argument("--contexts", type=int, nargs="+", default=[512, 8192])
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 2, 3, 4, 6, 8, 12, 16],
                    help="verify block lengths T (2..max_k+1 are always added: the model needs them)")
    ap.add_argument("--max-k", type=int, default=8)
    ap.add_argument("--replays", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--pair-target", default="embedded:tiny-llama", help="the pair whose acceptance is measured")
    ap.add_argument("--pair-draft", default="embedded:tiny-llama-draft")
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--prompt-tokens", type=int, default=256)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--lookup-new", type=int, default=128, help="0 skips the prompt_lookup upper bound")
    ap.add_argument("--kernel", action="store_true",
                    help="verify: also time every block with the previous attention (masked SDPA over the buffer)")
    ap.add_argument("--budget", type=float, default=170.0, help="seconds for the whole run; later sections skip")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.small:  # smaller defaults; flags given on the command line still win
        ap.set_defaults(contexts=[24, 72], replays=2, repeats=2, prompts=1, prompt_tokens=32, new_tokens=12,
                        lookup_new=12)
        args = ap.parse_args(argv)
    if args.max_k < 1 or min(args.tokens) < 1 or min(args.contexts) < 1:
        raise SystemExit("--max-k, --tokens and --contexts take positive integers")
    tokens = sorted(set(args.tokens) | set(range(1, args.max_k + 2)))
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    fast = "auto" if device.type == "cuda" else "static"

    run = Run(args)
    header = {**environment(device), "command": " ".join([Path(sys.executable).name, *sys.argv]),
              "model": "small" if args.small else args.model, "draft_model": "small" if args.small
              else args.draft_model, "dtype": str(dtype).replace("torch.", ""), "contexts": args.contexts,
              "tokens": tokens, "formula": FORMULA}
    target = load_engine(SMALL_TARGET if args.small else preset_arch(args.model), device=device, dtype=dtype,
                         seed=0, fast_decode=fast)
    draft = load_engine(SMALL_DRAFT if args.small else preset_arch(args.draft_model), device=device, dtype=dtype,
                        seed=1, fast_decode=fast)
    header.update(target_weight_gb=weight_bytes(target) / 1e9, draft_weight_gb=weight_bytes(draft) / 1e9,
                  fast_path=str(target.fast_path))

    def bandwidth():
        bw = copy_bandwidth(small=args.small or device.type != "cuda")
        return {"copy_bytes_s": bw, "copy_tb_s": bw / 1e12}

    run.section("bandwidth", 5, bandwidth)
    bw = run.sections["bandwidth"].get("copy_bytes_s")

    def floor_ms(engine, context):
        return None if not bw else 1e3 * (weight_bytes(engine) + kv_bytes_per_token(engine) * context) / bw

    def verify():
        out = {}
        for c in args.contexts:
            steps = Steps(target, c, max(tokens), args.replays)
            greedy_run, reset = steps.greedy(args.replays)
            row = {"greedy_step": ms_per_call(greedy_run, device, args.replays, args.repeats, reset),
                   "floor_ms": floor_ms(target, c), "weights_floor_ms": floor_ms(target, 0),
                   "captured": steps.captured, "capacity": steps.sm.capacity, "blocks": {},
                   # the verify kernel reads the held tokens + the block (as greedy's step reads the held tokens);
                   # the masked SDPA it replaced reads the whole static buffer
                   "block_attention": "triton.verify_attention" if steps.sm.kernels else "torch.sdpa (masked buffer)",
                   "kv_read_gb_block": kv_bytes_per_token(target) * (
                       c + max(tokens) if steps.sm.kernels else steps.sm.capacity) / 1e9,
                   "kv_read_gb_block_sdpa": kv_bytes_per_token(target) * steps.sm.capacity / 1e9,
                   "kv_read_gb_greedy": kv_bytes_per_token(target) * c / 1e9}
            for t in tokens:
                _, fn = steps.block(t)
                row["blocks"][t] = ms_per_call(fn, device, args.replays, args.repeats)
            if args.kernel:  # the previous attention in its own buffers, same prompt and block tokens
                base = Steps(target, c, max(tokens), args.replays, attention_kernel=False)
                row["blocks_sdpa"] = {t: ms_per_call(base.block(t)[1], device, args.replays, args.repeats)
                                      for t in tokens}
                (new, _), (old, _) = steps.block(max(tokens)), base.block(max(tokens))
                steps.sm.run(new)
                base.sm.run(old)
                row["check_kernel_vs_sdpa"] = {
                    "tokens": max(tokens), "rel_l2_logits": rel_l2(new.logits, old.logits),
                    "argmax_agree": float((new.argmax == old.argmax).float().mean())}
                del base, new, old
            one, g = row["blocks"][1]["ms"], row["greedy_step"]["ms"]
            for t, r in row["blocks"].items():
                r.update(over_greedy_step=r["ms"] / g, over_block_1=r["ms"] / one)
                if args.kernel:
                    r["sdpa_over_kernel"] = row["blocks_sdpa"][t]["ms"] / r["ms"]
            for r in row.get("blocks_sdpa", {}).values():
                r.update(over_greedy_step=r["ms"] / g, over_block_1=r["ms"] / row["blocks_sdpa"][1]["ms"])
            row["check"] = block_check(steps, max(tokens))
            out[c] = row
            print(f"[verify] context {c}: greedy step {g:.3f} ms; " + ", ".join(
                f"T={t} {r['ms']:.3f}" for t, r in row["blocks"].items()), flush=True)
        return out

    run.section("verify", 20, verify)

    def check_fp32():
        source, seed = draft_source(args.pair_target)
        engine = load_engine(source, device=device, dtype=torch.float32, seed=seed, fast_decode=fast)
        try:
            t = max(tokens)
            return block_check(Steps(engine, args.prompt_tokens, t, t), t)
        finally:
            engine.close()

    run.section("check_fp32", 5, check_fp32)

    def draft_costs():
        out = {}
        for c in args.contexts:
            steps = Steps(draft, c, 2, args.replays)
            base = Steps(draft, c, 1, args.replays, linear=F.linear)
            greedy_run, reset = steps.greedy(args.replays)
            row = {"static_step": ms_per_call(steps.block(1)[1], device, args.replays, args.repeats),
                   "catch_up_2": ms_per_call(steps.block(2)[1], device, args.replays, args.repeats),
                   "static_step_f_linear": ms_per_call(base.block(1)[1], device, args.replays, args.repeats),
                   "greedy_step": ms_per_call(greedy_run, device, args.replays, args.repeats, reset),
                   "floor_ms": floor_ms(draft, c)}
            del base
            out[c] = row
        return out

    run.section("draft", 10, draft_costs)

    def acceptance():
        source, seed = draft_source(args.pair_target)
        pair_t = load_engine(source, device=device, dtype=dtype, seed=seed)
        dsource, dseed = draft_source(args.pair_draft)
        pair_d = load_engine(dsource, device=device, dtype=dtype, seed=dseed)
        prompts, names = make_prompts(pair_t, args.prompts, args.prompt_tokens, seed=0)
        greedy = registry.build("decoder", "greedy")
        outs = [greedy.generate(pair_t, p, args.new_tokens).tokens for p in prompts]
        agree = draft_agreement(pair_t, pair_d, prompts, outs)
        spec = registry.build("decoder", "speculative", {"draft": args.pair_draft, "num_candidates": 1},
                              draft_engine=pair_d)
        drafted = accepted = 0
        same = True
        for p, want in zip(prompts, outs, strict=True):
            g = spec.generate(pair_t, p, args.new_tokens)
            iters = g.counters["iterations"]
            drafted += g.counters["mean_drafted"] * iters
            accepted += (g.counters["mean_accepted_length"] - 1) * iters
            same &= bool(torch.equal(g.tokens, want))
        pair_t.close()
        pair_d.close()
        return {"label": "measured, embedded pair", "a": agree["top1"], "top2": agree["top2"],
                "tokens": agree["tokens"], "prompts": names, "pair": [args.pair_target, args.pair_draft],
                "speculative_k1_acceptance": accepted / drafted if drafted else None,
                "speculative_k1_equals_greedy": same}

    run.section("acceptance", 10, acceptance)

    def model():
        v, d = run.sections.get("verify", {}), run.sections.get("draft", {})
        a = run.sections.get("acceptance", {}).get("a")
        if a is None or not all(c in v and c in d for c in args.contexts):
            return {"error": "needs the verify, draft and acceptance sections"}
        out = {"formula": FORMULA, "a": a, "a_label": "measured, embedded pair", "contexts": {}}
        for c in args.contexts:
            t_target = v[c]["greedy_step"]["ms"]
            cost = d[c]["static_step"]["ms"] / t_target
            rows = [modelled(a, k, cost, v[c]["blocks"][k + 1]["ms"] / t_target) for k in range(1, args.max_k + 1)]
            # what other acceptance rates would give with the same measured costs (assumed a, labelled so)
            assumed = {x: max(modelled(x, k, cost, v[c]["blocks"][k + 1]["ms"] / t_target)["speedup"]
                              for k in range(1, args.max_k + 1)) for x in (0.6, 0.7, 0.8, 0.9)}
            out["contexts"][c] = {"rows": rows, "best": max(rows, key=lambda r: r["speedup"]),
                                  "best_speedup_at_assumed_a": assumed}
        return out

    run.section("model", 0, model)

    def lookup():
        """By construction: the prompt ends with the target's own greedy output; if the model keeps repeating it,
        the lookup's copies are what greedy emits. Acceptance is measured; no draft is forced."""
        greedy = registry.build("decoder", "greedy")
        lookup = registry.build("decoder", "prompt_lookup")
        seedp = prompt_ids(target.config.vocab_size, 32, device, seed=7)
        own = greedy.generate(target, seedp, 2 * args.lookup_new).tokens
        prompt = torch.cat((seedp, own), dim=1)
        res = {}
        for name, strategy in (("greedy", greedy), ("prompt_lookup", lookup)):
            strategy.generate(target, prompt, 8)  # warm-up: captures its graphs
            res[name] = strategy.generate(target, prompt, args.lookup_new)
        g, lk = res["greedy"], res["prompt_lookup"]
        tok_s = {k: (r.tokens.shape[1] - 1) / r.counters["decode_s"] for k, r in res.items()}
        return {"label": "by construction (prompt = seed + the target's own greedy output)",
                "prompt_tokens": prompt.shape[1], "new_tokens": args.lookup_new,
                "greedy_tok_s": tok_s["greedy"], "lookup_tok_s": tok_s["prompt_lookup"],
                "speedup": tok_s["prompt_lookup"] / tok_s["greedy"],
                "acceptance": lk.counters.get("acceptance_rate"),
                "tokens_per_target_forward": lk.counters.get("mean_accepted_length"),
                "equals_greedy": bool(torch.equal(g.tokens, lk.tokens)),
                "first_difference": (lambda d: int(d[0, 1]) if d.numel() else None)((g.tokens != lk.tokens).nonzero())}

    if args.lookup_new > 0:
        run.section("lookup", 15, lookup)

    record = {**header, "sections": run.sections, "wall_s": time.perf_counter() - run.t0}
    lines = tables(record, args.contexts, tokens)
    record["table"] = lines
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(record, indent=1, default=str))
    print("\n".join(lines))
    return record


def tables(record: dict, contexts: list[int], tokens: list[int]) -> list[str]:
    """The GitHub tables: verify cost per T, correctness, draft cost, the modelled speed-up (last)."""
    s = record["sections"]
    f = lambda x, p=3: "" if x is None else f"{x:.{p}f}"  # noqa: E731
    out = [f"{record.get('device_name')}, torch {record.get('torch')}, triton {record.get('triton')}, "
           f"{record['dtype']}, git {record.get('git_sha')}, {record.get('date')}: target {record['model']}, "
           f"draft {record['draft_model']}, fast path {record.get('fast_path')}", ""]
    v = s.get("verify", {})
    if all(c in v for c in contexts):
        head = "| step |" + "".join(f" ms @{c} | x greedy step | x T=1 block |" for c in contexts)
        out += [head, "|---|" + "---:|---:|---:|" * len(contexts)]
        ratio = lambda c: f(v[c]["floor_ms"] / v[c]["greedy_step"]["ms"], 2) if v[c]["floor_ms"] else ""  # noqa: E731
        out.append("| floor: weights + KV at copy bandwidth |" + "".join(
            f" {f(v[c]['floor_ms'])} | {ratio(c)} | |" for c in contexts))
        out.append("| greedy decode step (T=1) |" + "".join(f" {f(v[c]['greedy_step']['ms'])} | 1.00 | |"
                                                             for c in contexts))
        for key, label in (("blocks", f"verify block ({v[contexts[0]].get('block_attention')})"),
                           ("blocks_sdpa", "verify block, masked SDPA over the buffer (before)")):
            if not all(key in v[c] for c in contexts):
                continue
            for t in tokens:
                out.append(f"| {label} T={t} |" + "".join(
                    f" {f(v[c][key][t]['ms'])} | {f(v[c][key][t]['over_greedy_step'], 2)} | "
                    f"{f(v[c][key][t]['over_block_1'], 2)} |" for c in contexts))
        if all("check_kernel_vs_sdpa" in v[c] for c in contexts):
            out.append("| SDPA block / kernel block, per T |" + "".join(
                " " + " / ".join(f(v[c]["blocks"][t]["sdpa_over_kernel"], 2) for t in tokens) + " | | |"
                for c in contexts))
            out.append("| kernel vs SDPA block logits: rel L2, argmax agreement |" + "".join(
                f" {v[c]['check_kernel_vs_sdpa']['rel_l2_logits']:.2e}, "
                f"{v[c]['check_kernel_vs_sdpa']['argmax_agree']:.2f} | | |" for c in contexts))
        out.append("")
        checks = [v[c]["check"] for c in contexts]
        if "error" not in s.get("check_fp32", {"error": 1}):
            checks.append({**s["check_fp32"], "context": f"{s['check_fp32']['context']} (embedded target)"})
        out += ["| check: T-token block vs T single steps | dtype | T | rel L2 vs static T=1 steps | "
                "rel L2 vs greedy steps | static vs greedy steps | argmax = static | argmax = greedy |",
                "|---|---|---:|---:|---:|---:|---:|---:|"]
        out += [f"| context {r['context']} | {r['dtype']} | {r['tokens']} | {r['rel_l2_vs_static_singles']:.2e} | "
                f"{r['rel_l2_vs_greedy_steps']:.2e} | {r['rel_l2_static_singles_vs_greedy_steps']:.2e} | "
                f"{r['argmax_agree_vs_static_singles']:.2f} | {r['argmax_agree_vs_greedy_steps']:.2f} |"
                for r in checks]
        out.append("")
    d = s.get("draft", {})
    if all(c in d for c in contexts):
        out += ["| draft step | " + " | ".join(f"ms @{c}" for c in contexts) + " |",
                "|---|" + "---:|" * len(contexts)]
        for key, label in (("static_step", "draft token: static T=1 step (GEMV on CUDA), what the drafter replays"),
                           ("static_step_f_linear", "the same step with F.linear (before)"),
                           ("catch_up_2", "catch-up step, 2 tokens"), ("greedy_step", "greedy decode step"),
                           ("floor_ms", "floor: weights + KV at copy bandwidth")):
            out.append(f"| {label} | " + " | ".join(
                f(d[c][key] if key == "floor_ms" else d[c][key]["ms"]) for c in contexts) + " |")
        out.append("")
    if "lookup" in s and "error" not in s["lookup"] and "skipped" not in s["lookup"]:
        lk = s["lookup"]
        out += [f"prompt_lookup end to end, {lk['label']}: {lk['lookup_tok_s']:.1f} against greedy "
                f"{lk['greedy_tok_s']:.1f} tok/s = {lk['speedup']:.2f}x; acceptance {f(lk['acceptance'], 2)}, "
                f"{f(lk['tokens_per_target_forward'], 2)} tokens per verification, = greedy: {lk['equals_greedy']}", ""]
    m = s.get("model", {})
    if "contexts" in m:
        acc = s["acceptance"]
        out += [f"Modelled: {FORMULA}. a = {m['a']:.3f} ({m['a_label']}: top-1 agreement over {acc['tokens']} "
                f"greedy tokens; speculative k=1 accepted {f(acc['speculative_k1_acceptance'])}). t_target = greedy "
                "decode step, t_verify and t_draft measured above at the same context.", ""]
        out += ["| k | E(k) |" + "".join(f" t_verify/t_target @{c} | speed-up @{c} | if verify = 1 step @{c} |"
                                         for c in contexts), "|---:|---:|" + "---:|---:|---:|" * len(contexts)]
        for i in range(len(m["contexts"][contexts[0]]["rows"])):
            rows = [m["contexts"][c]["rows"][i] for c in contexts]
            out.append(f"| {rows[0]['k']} | {rows[0]['expected_tokens']:.2f} |" + "".join(
                f" {r['verify_cost']:.2f} | {r['speedup']:.2f}x | {r['speedup_if_verify_cost_one_step']:.2f}x |"
                for r in rows))
        out.append("| t_draft/t_target | |" + "".join(
            f" {m['contexts'][c]['rows'][0]['draft_cost']:.3f} | | |" for c in contexts))
        out.append("| best at assumed a = 0.6 / 0.7 / 0.8 / 0.9 | |" + "".join(
            " | " + " / ".join(f"{x:.2f}x" for x in m["contexts"][c]["best_speedup_at_assumed_a"].values()) + " | |"
            for c in contexts))
    return out


if __name__ == "__main__":
    main()
