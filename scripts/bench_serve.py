"""Continuous batching through the in-process scheduler (ollm_triton/serve/scheduler.py), beside its baselines.

    python3 scripts/bench_serve.py --out $OUT/bench_serve.json               # GPU: llama3_8b random bf16
    python scripts/bench_serve.py --small --out /tmp/serve.json              # CPU smoke test of every section

Sections, every one timed in this process after a warm-up, CUDA-synchronized:
  static    the engine's static batch of N same-length prompts (greedy, CUDA-graph decode): the ceiling of the
            steady state (decode tok/s summed over the batch)
  serve     N requests (prompt P, G new tokens, greedy) submitted at once to the scheduler: generated tok/s end
            to end (prefill included) and in the steady state (the decode steps with every request running),
            TTFT and inter-token latency p50/p99, padding ratio, KV layout
  mixed     N requests with prompts drawn from 128..8k and outputs from 32..512 (seeded)
  codecs    the same KV budget for 8k-context requests with the dense cache and with int4: how many run at once,
            and their inter-token latency
  hf        transformers' own continuous batching (`generate_batch`, attn_implementation="paged|sdpa") on the
            same N x (P + G), end to end
Prints a GitHub table last and writes JSON with device, versions, git sha, date and command.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import random
import sys
import time
import traceback
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ollm_triton.engine import load_engine  # noqa: E402
from ollm_triton.registry import registry  # noqa: E402
from ollm_triton.results import git_sha  # noqa: E402
from ollm_triton.serve.scheduler import SamplingParams, Scheduler  # noqa: E402

CUDA = torch.cuda.is_available()
SMALL_ARCH = dict(model_type="llama", vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096, rms_norm_eps=1e-5)
GREEDY = SamplingParams(temperature=0)


def sync():
    if CUDA:
        torch.cuda.synchronize()


def prompts(n, lengths, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (length,), generator=g).tolist() for length in lengths[:n]]


def static_batch(engine, n, p, g):
    greedy = registry.build("decoder", "greedy")
    ids = torch.tensor(prompts(n, [p] * n, engine.config.vocab_size))
    greedy.generate(engine, ids, 4)
    out = greedy.generate(engine, ids, g)
    return {"decode_tok_s": n * (out.tokens.shape[1] - 1) / out.counters["decode_s"], "requests": n,
            "fast_path": str(engine.fast_path)}


def serve(engine, reqs, *, max_batch, max_context, kv_budget_bytes=None, warm=True):
    """Submit every (prompt, max_tokens) at once; wall time to the last token, steady-state decode rate."""
    sched = Scheduler(engine, max_batch=max_batch, max_queue=len(reqs) + 1, prefill_chunk=2048, prefill_budget=8192,
                      max_context=max_context, kv_budget_bytes=kv_budget_bytes, prefix_cache_bytes=0)
    if warm:  # captures the buckets' graphs and compiles kernels outside the timed run
        for b in (1, 2, 4, 8, 16, 32, 64, 128):
            if b > max_batch:
                break
            warm_reqs = [sched.submit(p[:16], 3, GREEDY) for p, _ in reqs[:b]]
            while not all(r.finished for r in warm_reqs):
                sched.step()
    sched.counts.update({k: 0 for k in sched.counts})
    sched._ttft.clear()
    sched._itl.clear()
    sync()
    t0 = time.perf_counter()
    handles = [sched.submit(p, g, GREEDY) for p, g in reqs]
    steady_tokens, steady_s, peak_running = 0, 0.0, 0
    while not all(h.finished for h in handles):
        full = len(sched._running) == min(max_batch, len(handles)) and not any(r.pending for r in sched._running) \
            and not sched._queue
        before = sched.counts["generated_tokens"]
        s0 = time.perf_counter()
        sched.step()
        if full:
            sync()
            steady_s += time.perf_counter() - s0
            steady_tokens += sched.counts["generated_tokens"] - before
        peak_running = max(peak_running, len(sched._running))
    sync()
    wall = time.perf_counter() - t0
    st = sched.stats()
    generated = sum(len(h.generated) for h in handles)
    return {"requests": len(reqs), "generated": generated, "wall_s": wall, "e2e_tok_s": generated / wall,
            "steady_tok_s": steady_tokens / steady_s if steady_s else None, "peak_running": peak_running,
            "ttft_s_p50": st["ttft_s_p50"], "ttft_s_p99": st["ttft_s_p99"], "itl_s_p50": st["itl_s_p50"],
            "itl_s_p99": st["itl_s_p99"], "padding_ratio": st["padding_ratio"], "kv_layout": sched.rows.kind}


def hf_continuous(arch, reqs, dtype):
    import transformers
    from transformers.generation import GenerationConfig

    cfg = transformers.AutoConfig.for_model(**arch)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation="paged|sdpa")
    model.eval()
    g = max(m for _, m in reqs)
    gc = GenerationConfig(max_new_tokens=g, min_new_tokens=g, do_sample=False, eos_token_id=-1, pad_token_id=0)
    inputs = [p for p, _ in reqs]
    model.generate_batch(inputs=inputs[:4], generation_config=gc, progress_bar=False)  # warm-up
    sync()
    t0 = time.perf_counter()
    out = model.generate_batch(inputs=inputs, generation_config=gc, progress_bar=False)
    sync()
    wall = time.perf_counter() - t0
    generated = sum(len(o.generated_tokens) for o in out.values())
    del model
    return {"requests": len(inputs), "generated": generated, "wall_s": wall, "e2e_tok_s": generated / wall}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="llama3_8b")
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--mixed-requests", type=int, default=32, help="slots are sized to the longest (8k) request")
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--codec-context", type=int, default=8192)
    ap.add_argument("--codec-budget-gb", type=float, default=8.0)
    ap.add_argument("--codec-new", type=int, default=32)
    ap.add_argument("--only", nargs="*", default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.small:
        arch, dtype, device = SMALL_ARCH, torch.float32, "cpu"
        args.requests, args.prompt, args.new, args.codec_context, args.codec_new = 6, 40, 8, 256, 4
        args.codec_budget_gb = 0.002
    else:
        arch = yaml.safe_load((REPO / "ollm_triton" / "conf" / "model" / f"{args.model}.yaml").read_text())["arch"]
        dtype, device = torch.bfloat16, "cuda"
    fast = "static" if not CUDA else "auto"
    date = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    record = {"command": " ".join(["python3", *sys.argv]), "date": date,
              "device": torch.cuda.get_device_name() if CUDA else platform.processor() or platform.machine(),
              "torch": torch.__version__, "git_sha": git_sha(), "model": args.model if not args.small else "small",
              "sections": {}}
    for name in ("triton", "transformers"):
        record[name] = getattr(__import__(name), "__version__", None)
    rows = []
    want = lambda s: args.only is None or s in args.only  # noqa: E731

    def section(name, fn):
        if not want(name):
            return
        t0 = time.perf_counter()
        try:
            record["sections"][name] = fn()
        except Exception as e:  # recorded, the run goes on
            record["sections"][name] = {"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()}
        print(f"[{name}] {time.perf_counter() - t0:.1f} s {json.dumps(record['sections'][name])[:400]}", flush=True)

    n, p, g = args.requests, args.prompt, args.new
    reqs = [(q, g) for q in prompts(n, [p] * n, arch["vocab_size"])]
    engine = load_engine(arch, device=device, dtype=dtype, seed=0, fast_decode=fast)
    section("static", lambda: static_batch(engine, n, p, g))
    section("serve", lambda: serve(engine, reqs, max_batch=n, max_context=p + g))
    rng = random.Random(0)
    nm = args.mixed_requests if not args.small else n
    mixed_p = [rng.randint(128, 8192) if not args.small else rng.randint(8, 200) for _ in range(nm)]
    mixed = [(q, rng.randint(32, 512) if not args.small else rng.randint(2, 20))
             for q in prompts(nm, mixed_p, arch["vocab_size"], seed=1)]
    section("mixed", lambda: serve(engine, mixed, max_batch=nm, max_context=max(len(q) + m for q, m in mixed)))
    engine.close()

    def codecs():
        out = {}
        ctx, budget = args.codec_context, int(args.codec_budget_gb * 1e9)
        for codec in ("dense", "int4"):
            # each codec on its own best path: dense on slot rows and the captured step, int4 in its own caches
            eng = load_engine(arch, device=device, dtype=dtype, seed=0, codec=codec, fast_decode=fast)
            per = Scheduler(eng, max_context=ctx + args.codec_new).kv_bytes(ctx + args.codec_new)
            fits = max(int(budget // per), 1)
            batch = [(q, args.codec_new) for q in prompts(fits, [ctx] * fits, arch["vocab_size"], seed=2)]
            out[codec] = {"fits": fits, **serve(eng, batch, max_batch=fits, max_context=ctx + args.codec_new,
                                                kv_budget_bytes=budget, warm=False)}
            eng.close()
        out["int4_over_dense_requests"] = out["int4"]["fits"] / out["dense"]["fits"]
        out["int4_over_dense_itl"] = out["int4"]["itl_s_p50"] / max(out["dense"]["itl_s_p50"], 1e-12)
        return out

    section("codecs", codecs)
    if CUDA:
        section("hf", lambda: hf_continuous(arch, reqs, dtype))
    s = record["sections"]
    rows.append("| implementation | requests | generated tok/s end to end | steady decode tok/s | TTFT p50 / p99 s | "
                "ITL p50 / p99 ms | notes |")
    rows.append("| --- | ---: | ---: | ---: | ---: | ---: | --- |")
    if "static" in s and "error" not in s["static"]:
        rows.append(f"| engine, static batch (ceiling) | {n} |  | {s['static']['decode_tok_s']:.1f} |  |  | "
                    f"{s['static']['fast_path']} |")
    for key, label in (("serve", f"scheduler, {p} + {g}"), ("mixed", "scheduler, mixed 128-8k + 32-512")):
        r = s.get(key, {})
        if "error" in r or not r:
            continue
        steady = f"{r['steady_tok_s']:.1f}" if r["steady_tok_s"] else ""
        rows.append(f"| {label} | {r['requests']} | {r['e2e_tok_s']:.1f} | {steady} | {r['ttft_s_p50']:.3f} / "
                    f"{r['ttft_s_p99']:.3f} | {1e3 * r['itl_s_p50']:.1f} / {1e3 * r['itl_s_p99']:.1f} | "
                    f"{r['kv_layout']}, padding {r['padding_ratio']:.2f} |")
    if "hf" in s and "error" not in s["hf"]:
        rows.append(f"| transformers generate_batch (paged\\|sdpa) | {n} | {s['hf']['e2e_tok_s']:.1f} |  |  |  |  |")
    c = s.get("codecs", {})
    for codec in ("dense", "int4"):
        if codec in c:
            r = c[codec]
            rows.append(f"| {codec}, {args.codec_context}-token contexts in {args.codec_budget_gb} GB of KV | "
                        f"{r['fits']} | {r['e2e_tok_s']:.1f} |  | {r['ttft_s_p50']:.2f} / {r['ttft_s_p99']:.2f} | "
                        f"{1e3 * r['itl_s_p50']:.1f} / {1e3 * r['itl_s_p99']:.1f} | {r['kv_layout']} |")
    record["table"] = rows
    print(f"\n{record['device']}, torch {record['torch']}, triton {record['triton']}, transformers "
          f"{record['transformers']}, git {record['git_sha']}, {record['date']}\n")
    print("\n".join(rows))
    if args.out:
        Path(args.out).write_text(json.dumps(record, indent=1, default=str))


if __name__ == "__main__":
    main()
