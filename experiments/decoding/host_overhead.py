"""Host cost of one speculation iteration: the loop's own Python and tensor work, with the model steps made free.

    python experiments/decoding/host_overhead.py --small                      # CPU, ~20 s
    python experiments/decoding/host_overhead.py --device cuda --out $OUT/host_overhead.json

Every strategy runs the real `speculate` / tree loop on the static-buffer path (`fast_path=static` on the CPU; the
CUDA-graph path on CUDA, as `bench_decoding.py` runs it), but each static step's body (decoding/static_steps.py
`StaticModel._body`, the one model step) is replaced by a lookup in a precomputed table: the token at block
position t is table[base + offsets[t] + 1], written as argmax and as one-hot logits. On CUDA the lookup is what
the graph captures, so a step still costs one graph replay (the launch, which is part of the host cost) and almost
no GPU time. What remains of an iteration is host work: drafting bookkeeping, acceptance, syncs, rollback.

The tables come from the real embedded models (tiny-llama target, tiny-llama-draft) on held-out prompts: the target's
table is its own greedy continuation (so the stubbed target *is* greedy with that output, and every strategy must
reproduce it: checked in the same run), the draft's is the draft's teacher-forced argmax along it (the real
acceptance pattern), the layer-skip draft's the target's first k layers'. Prompt lookup sees the real text.

Columns: iteration us = decode seconds / iterations (fastest of --repeats per prompt, summed over prompts);
steps / iter = stubbed model steps per iteration (verify + draft forwards); loop us = iteration us minus the
stand-in steps' own time (measured inside them on the CPU; on CUDA steps x one replay's host time, measured alone):
the loop's own cost; draft / verify / accept us: the loop's phases per iteration (its own device-event marks);
syncs / iter = device-to-host reads per iteration: counted exactly on CUDA (torch.cuda.set_sync_debug_mode), and on
the CPU the calls that would read a device tensor there (tolist, item, cpu, bool/int of a tensor, nonzero,
torch.equal), host-side tensors included. Both counts cover the whole generate call (prefill and timers add ~2-4 per
call, < 0.1 per iteration at 256 tokens).

Writes JSON (device, versions, git sha from OLLM_GIT_SHA, date, command) and prints a GitHub table last.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shlex
import sys
import time
import warnings
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from ollm_triton.decoding.drafters import draft_source  # noqa: E402
from ollm_triton.decoding.static_steps import static_model  # noqa: E402
from ollm_triton.engine import load_engine  # noqa: E402
from ollm_triton.registry import registry  # noqa: E402
from ollm_triton.results import environment  # noqa: E402

_spec = importlib.util.spec_from_file_location("bench_decoding", REPO / "scripts" / "bench_decoding.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)  # one implementation of prompts and strategy specs: the decoding benchmark's

STRATEGIES = [
    "prompt_lookup",
    "speculative:num_candidates=2",
    "speculative:num_candidates=4",
    "tree:depth=4,branching=2,width=3",
    "self_speculative:draft_layers=3",
]
SYNC_CALLS = {"tolist", "item", "cpu", "__bool__", "__int__", "__float__", "__index__", "nonzero", "equal"}


class SyncCounter(TorchFunctionMode):
    """Counts the calls that read a tensor's value on the host (a device sync when the tensor is on CUDA)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in SYNC_CALLS:
            self.count += 1
        return func(*args, **(kwargs or {}))


class StubSteps:
    """Replaces one StaticModel's step body by a table lookup (see the module docstring). `tables` [B, capacity]
    is a static buffer: a new prompt copies its table in, captured graphs keep reading it."""

    def __init__(self, sm, skip_layers: int | None = None):
        self.sm = sm
        self.full = sm.model.config.num_layers
        self.skip_layers = skip_layers
        b, cap, dev = sm.batch, sm.capacity, sm.engine.device
        self.table = torch.zeros(b, cap + 1, dtype=torch.long, device=dev)
        self.skip_table = torch.zeros(b, cap + 1, dtype=torch.long, device=dev)
        self.seconds = 0.0  # time spent in the (uncaptured) body: the model step's stand-in, not loop work
        self.timed = not sm.capture
        sm._body = self.body  # the instance attribute shadows the method: run() and capture() call it

    def load(self, table: torch.Tensor, skip_table: torch.Tensor | None = None) -> None:
        n = min(table.shape[1], self.table.shape[1])
        self.table.zero_()
        self.table[:, :n] = table[:, :n]
        if skip_table is not None:
            self.skip_table.zero_()
            self.skip_table[:, :n] = skip_table[:, :n]

    def body(self, st) -> None:
        t0 = time.perf_counter()
        self.lookup(st)
        if self.timed:
            self.seconds += time.perf_counter() - t0

    def lookup(self, st) -> None:
        table = self.skip_table if st.layers < self.full else self.table
        idx = (st.base[:, None] + st.offsets[None, :] + 1).clamp_(max=table.shape[1] - 1)  # [B, T]
        tok = table.gather(1, idx)
        st.argmax.copy_(tok)
        st.logits.zero_().scatter_(-1, tok[..., None], 1.0)


@torch.inference_mode()
def teacher_forced(engine, seq: torch.Tensor, num_layers: int | None = None) -> torch.Tensor:
    """seq [1, L] -> [1, L]: at p >= 1 the engine's argmax after seq[:, :p] (its greedy pick on the true prefix)."""
    cache = engine.new_cache(1, seq.shape[1] + 1)
    kw = {"num_layers": num_layers} if num_layers else {}
    logits = engine.forward(seq, cache, **kw)[0]
    out = torch.zeros_like(seq)
    out[0, 1:] = logits[:-1, : engine.config.vocab_size].argmax(-1)
    return out


def stub_us(sm, t: int, reps: int = 50) -> float:
    """Host us of one stubbed step of t tokens (a graph replay on CUDA): the fastest of 5 rounds of `reps`."""
    st = sm.step(t)
    st.base.fill_(0)
    sm.prepare(st)
    best = float("inf")
    for _ in range(6):
        t0 = time.perf_counter()
        for _ in range(reps):
            sm.run(st)
        best = min(best, time.perf_counter() - t0)  # the first round warms up; host time, no device sync
    return best / reps * 1e6


def count_syncs(strategy, target, prompt, new_tokens: int) -> tuple[int, int]:
    """(device-to-host reads in one generate call, its iterations)."""
    if target.device.type == "cuda":
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                out = strategy.generate(target, prompt, new_tokens)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        n = sum("synchroniz" in str(w.message) for w in caught)
    else:
        counter = SyncCounter()
        with counter:
            out = strategy.generate(target, prompt, new_tokens)
        n = counter.count
    return n, int(out.counters["iterations"])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto", help="auto: bfloat16 on CUDA, float32 on the CPU")
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--prompts", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=5, help="timed generations per prompt and strategy (fastest)")
    ap.add_argument("--strategies", nargs="+", default=STRATEGIES, help="name[:key=value,...] (no greedy)")
    ap.add_argument("--small", action="store_true", help="CPU smoke size: 1 prompt, 96 new tokens, 3 repeats")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads (0: torch's default)")
    ap.add_argument("--out", default=None, help="JSON path")
    args = ap.parse_args(argv)
    if args.small:
        args.prompts, args.new_tokens, args.repeats = 1, 96, 3
    if args.threads:
        torch.set_num_threads(args.threads)

    source, seed = draft_source("embedded:tiny-llama")
    target = load_engine(source, device=args.device, dtype=args.dtype, seed=seed)
    dsource, dseed = draft_source("embedded:tiny-llama-draft")
    draft = load_engine(dsource, device=target.device, dtype=target.dtype, seed=dseed)
    device = target.device
    cuda = device.type == "cuda"
    fast_path = "auto" if cuda else "static"  # the graph path on CUDA; its uncaptured twin on the CPU
    prompts, names = bench.make_prompts(target, args.prompts, args.prompt_tokens, 0)

    # the real tables, from the real models, before any step is stubbed
    greedy = registry.build("decoder", "greedy")
    tables = []
    skip_layers = {bench.parse_strategy(s)[1].get("draft_layers") for s in args.strategies} - {None}
    for prompt in prompts:
        ref = greedy.generate(target, prompt, args.new_tokens).tokens
        seq = torch.cat((prompt.to(device), ref), 1)
        skips = {k: teacher_forced(target, seq, k) for k in skip_layers}
        tables.append({"ref": ref, "target": seq, "draft": teacher_forced(draft, seq), "skip": skips})

    max_len = args.prompt_tokens + args.new_tokens + 128
    capture = fast_path == "auto" and target.fast_path.captured
    target_stub = StubSteps(static_model(target, 1, max_len, capture))
    draft_stub = StubSteps(static_model(draft, 1, max_len, capture))
    step_cost = {"verify_t3": stub_us(target_stub.sm, 3), "draft_t1": stub_us(draft_stub.sm, 1)}

    labels = list(args.strategies)
    strategies = [bench.build_strategy(n, {**p, "fast_path": fast_path}, draft, "embedded:tiny-llama-draft")
                  for n, p in map(bench.parse_strategy, labels)]
    results = []
    for label, strategy in zip(labels, strategies, strict=True):
        k = bench.parse_strategy(label)[1].get("draft_layers")
        runs, exact, stub_s = [], True, 0.0
        for p_index, prompt in enumerate(prompts):
            t = tables[p_index]
            target_stub.load(t["target"], t["skip"].get(k))
            draft_stub.load(t["draft"])
            strategy.generate(target, prompt, min(32, args.new_tokens))  # warm-up: capture, allocate
            outs = []
            for _ in range(args.repeats):
                before = target_stub.seconds + draft_stub.seconds
                outs.append(strategy.generate(target, prompt, args.new_tokens))
                outs[-1].counters["stub_s"] = target_stub.seconds + draft_stub.seconds - before
            exact &= all(torch.equal(o.tokens, t["ref"]) for o in outs)
            # the fastest run: host work only slows down when something else takes the CPU (a shared machine)
            runs.append(min(outs, key=lambda g: g.counters["decode_s"]).counters)
            stub_s += runs[-1]["stub_s"]
        syncs, sync_iters = count_syncs(strategy, target, prompts[0], args.new_tokens)
        iterations = sum(c["iterations"] for c in runs)
        decode_s = sum(c["decode_s"] for c in runs)
        steps = sum(c["iterations"] + c["draft_forwards"] for c in runs) / iterations
        iter_us = decode_s / iterations * 1e6
        # the stand-in steps' own cost: measured inside them when uncaptured; on CUDA a replay's launch each
        loop_us = iter_us - (stub_s / iterations * 1e6 if not capture else steps * step_cost["draft_t1"])
        results.append({
            "strategy": label, "iterations": iterations, "decode_s": decode_s, "iteration_us": iter_us,
            "steps_per_iteration": steps, "loop_us": loop_us,
            "tokens_per_iteration": sum(c["mean_accepted_length"] * c["iterations"] for c in runs) / iterations,
            "syncs_per_iteration": syncs / max(sync_iters, 1), "syncs_per_call": syncs, "matches_reference": exact,
            "draft_us_per_iteration": sum(c["draft_s"] for c in runs) / iterations * 1e6,
            "verify_us_per_iteration": sum(c["verify_s"] for c in runs) / iterations * 1e6,
            "accept_us_per_iteration": sum(c["accept_s"] for c in runs) / iterations * 1e6,
            "counters": runs,
        })
        print(f"{label:40s} {iter_us:8.1f} us / iteration, loop {loop_us:7.1f} us, "
              f"{syncs / max(sync_iters, 1):.2f} syncs / iteration, = reference: {exact}", flush=True)

    env = environment(device)
    record = {"command": shlex.join([sys.executable.rsplit("/", 1)[-1], *sys.argv]), "env": env, "args": vars(args),
              "fast_path": fast_path, "captured": capture, "prompts": names, "stub_step_us": step_cost,
              "threads": torch.get_num_threads(), "results": results}
    rows = ["| strategy | iteration us | steps / iter | loop us | draft us | verify us | accept us | tokens / iter "
            "| syncs / iter | = reference |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|:---:|"]
    for r in results:
        rows.append(f"| {r['strategy']} | {r['iteration_us']:.1f} | {r['steps_per_iteration']:.2f} "
                    f"| {r['loop_us']:.1f} | {r['draft_us_per_iteration']:.1f} | {r['verify_us_per_iteration']:.1f} "
                    f"| {r['accept_us_per_iteration']:.1f} | {r['tokens_per_iteration']:.2f} "
                    f"| {r['syncs_per_iteration']:.2f} | {'yes' if r['matches_reference'] else '**NO**'} |")
    text = "\n".join(rows)
    head = (f"{env['device_name']} ({env['device']}), torch {env['torch']}, git {env['git_sha']}, {env['date']}; "
            f"path {'graph' if capture else 'static (uncaptured)'}, stubbed step {step_cost['draft_t1']:.1f} us "
            f"(verify T=3: {step_cost['verify_t3']:.1f} us), {args.prompts} prompt(s) x {args.new_tokens} tokens")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(record, indent=1, default=str))
        Path(args.out).with_suffix(".md").write_text(f"{head}\n\n`{record['command']}`\n\n{text}\n")
    print(f"\n{head}\n")
    print(text)


if __name__ == "__main__":
    main()
