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
  http      the server over HTTP beside its Python API, on one model and one serve config (`--http-model`, a model
            preset; the embedded `tiny` with --small): first the in-process API (`build(compose(...))` in this
            process, `Scheduler.submit` + `Request.stream`, every request submitted at once), then
            `python -m ollm_triton.serve` with the same overrides as a subprocess driven by N concurrent `openai`
            async clients (`completions`, stream=true); at the client of each: generated tok/s end to end, TTFT and
            the time between streamed chunks (one per token unless the detokenizer holds back an incomplete
            character) p50/p99. `--url` drives a server already running instead of starting one.
  http_mixed  the same for the mixed lengths (prompts 128..8k, outputs 32..512)
Prints a GitHub table last and writes JSON with device, versions, git sha, date and command.

    python3 scripts/bench_serve.py --only http http_mixed --out $OUT/bench_serve_http.json    # GPU: llama3_8b
    python scripts/bench_serve.py --small --only http http_mixed                               # CPU smoke test
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import gc
import json
import os
import platform
import random
import socket
import subprocess
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


# ---- the server over HTTP, beside its Python API ---------------------------------------------------------------------

def latency_summary(runs: list[tuple[float, list[float], int]], wall: float) -> dict:
    """runs: per request (start, arrival time of each streamed token or chunk, tokens generated)."""
    ttft = [times[0] - start for start, times, _ in runs if times]
    gaps = [b - a for _, times, _ in runs for a, b in zip(times, times[1:], strict=False)]
    generated = sum(n for _, _, n in runs)
    pct = lambda xs, q: sorted(xs)[min(len(xs) - 1, int(q * len(xs)))] if xs else None  # noqa: E731
    return {"requests": len(runs), "generated": generated, "wall_s": wall, "e2e_tok_s": generated / wall,
            "ttft_s_p50": pct(ttft, 0.5), "ttft_s_p99": pct(ttft, 0.99), "itl_s_p50": pct(gaps, 0.5),
            "itl_s_p99": pct(gaps, 0.99)}


async def drive_api(scheduler, reqs) -> dict:
    """Every request submitted at once to the scheduler (its loop thread running); token times at the consumer."""
    async def one(prompt, new):
        start = time.perf_counter()
        req = scheduler.submit(prompt, new, GREEDY)
        times = []
        async for event in req.stream():
            if event.token_id is not None:
                times.append(time.perf_counter())
            if event.error:
                raise RuntimeError(f"request failed: {event.error}")
        return start, times, len(times)

    t0 = time.perf_counter()
    runs = await asyncio.gather(*(one(p, g) for p, g in reqs))
    return latency_summary(list(runs), time.perf_counter() - t0)


async def drive_http(url: str, model: str, reqs, concurrency: int) -> dict:
    """`concurrency` openai async clients streaming completions (token-id prompts, greedy, max_tokens each)."""
    import httpx
    import openai

    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    client = openai.AsyncOpenAI(base_url=url, api_key="unused", max_retries=0, timeout=3600.0,
                                http_client=httpx.AsyncClient(limits=limits, timeout=3600.0))
    gate = asyncio.Semaphore(concurrency)

    async def one(prompt, new):
        async with gate:
            start = time.perf_counter()
            times, usage = [], None
            stream = await client.completions.create(model=model, prompt=prompt, max_tokens=new, temperature=0,
                                                     stream=True, stream_options={"include_usage": True})
            async for chunk in stream:
                if chunk.choices and chunk.choices[0].text:
                    times.append(time.perf_counter())
                if chunk.usage is not None:
                    usage = chunk.usage.completion_tokens
            return start, times, usage if usage is not None else len(times)

    try:
        t0 = time.perf_counter()
        runs = await asyncio.gather(*(one(p, g) for p, g in reqs))
        return latency_summary(list(runs), time.perf_counter() - t0)
    finally:
        await client.close()


def serve_overrides(args, n: int, max_context: int) -> list[str]:
    model = "tiny" if args.small else args.http_model
    return [f"model={model}", f"serve.max_batch={n}", f"serve.max_queue={n + 8}", f"serve.max_context={max_context}",
            "serve.prefill_chunk=2048", "serve.prefill_budget=8192", "serve.prefix_cache_gb=0",
            "serve.queue_timeout_s=3600", "+decoder=greedy", "serve.log_level=warning", *args.serve_override]


def served_vocab(overrides: list[str]) -> int:
    """The vocabulary of the model a serve config names, from its config alone (nothing loads)."""
    from omegaconf import OmegaConf

    from ollm_triton.engine.checkpoint import read_config, resolve_source
    from ollm_triton.run import model_source
    from ollm_triton.serve.server import compose

    source, _ = model_source(OmegaConf.to_container(compose(overrides).model, resolve=True))
    return int(source["vocab_size"] if isinstance(source, dict) else read_config(resolve_source(source))["vocab_size"])


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_healthy(url: str, proc, timeout: float) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode} before it was healthy")
        try:
            if httpx.get(url.removesuffix("/v1") + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} was not healthy within {timeout} s")


def http_section(args, reqs_for, n: int) -> dict:
    """HTTP, then the in-process API, on one serve config (see the module docstring)."""
    from ollm_triton.serve.server import build, compose

    out: dict = {}
    vocab = args.vocab if args.url is not None and not args.api else served_vocab(serve_overrides(args, n, 1))
    reqs = reqs_for(vocab)
    max_context = max(len(p) + g for p, g in reqs)
    overrides = serve_overrides(args, n, max_context)
    warm = [(p[:16], 3) for p, _ in reqs]
    out["overrides"] = overrides
    # HTTP first: the server is its own process, so all it held is freed when it exits; the in-process server
    # after it is built in this process (its memory is given back only as far as gc and empty_cache can)
    url, proc, log = args.url, None, None
    if url is None:
        port = free_port()
        log = open(Path(args.server_log or os.devnull), "w")  # noqa: SIM115
        proc = subprocess.Popen([sys.executable, "-m", "ollm_triton.serve", *overrides, f"serve.port={port}"],
                                cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}/v1"
    try:
        wait_healthy(url, proc, args.server_start_s)
        import httpx

        model = httpx.get(url + "/models", timeout=10).json()["data"][0]["id"]
        asyncio.run(drive_http(url, model, warm, len(warm)))
        out["http"] = {**asyncio.run(drive_http(url, model, reqs, args.clients or len(reqs))), "url": url,
                       "clients": args.clients or len(reqs)}
    finally:
        if proc is not None:
            proc.terminate()  # SIGTERM: the server drains and exits
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
            log.close()
    if args.url is None or args.api:
        server = build(compose(overrides))
        server.scheduler.start()
        try:
            asyncio.run(drive_api(server.scheduler, warm))  # captures the buckets' graphs, compiles kernels
            sync()
            out["api"] = {**asyncio.run(drive_api(server.scheduler, reqs)), "kv_layout": server.scheduler.rows.kind}
        finally:
            server.close()  # the scheduler, the monitor's sampler and the model
            del server
            gc.collect()  # graphs and caches in reference cycles
            if CUDA:
                torch.cuda.empty_cache()
    if "api" in out:
        out["http_over_api_itl_p50"] = out["http"]["itl_s_p50"] / max(out["api"]["itl_s_p50"] or 1e-12, 1e-12)
    return out


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
    ap.add_argument("--http-model", default="llama3_8b", help="http sections: the server's model preset")
    ap.add_argument("--url", default=None, help="http sections: drive this running server (.../v1) instead")
    ap.add_argument("--api", action="store_true", help="with --url: still time the in-process API (same model)")
    ap.add_argument("--clients", type=int, default=None, help="concurrent HTTP clients (default: one a request)")
    ap.add_argument("--serve-override", nargs="*", default=[], help="more serve overrides, e.g. +cache=int4")
    ap.add_argument("--server-log", default=None, help="the started server's output (default: discarded)")
    ap.add_argument("--server-start-s", type=float, default=600.0)
    ap.add_argument("--vocab", type=int, default=128256, help="with --url alone: the served model's vocabulary")
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
    nm = args.mixed_requests if not args.small else n

    def uniform(vocab):
        return [(q, g) for q in prompts(n, [p] * n, vocab)]

    def mixed_lengths(vocab):
        rng = random.Random(0)
        mixed_p = [rng.randint(128, 8192) if not args.small else rng.randint(8, 200) for _ in range(nm)]
        return [(q, rng.randint(32, 512) if not args.small else rng.randint(2, 20))
                for q in prompts(nm, mixed_p, vocab, seed=1)]

    reqs, mixed = uniform(arch["vocab_size"]), mixed_lengths(arch["vocab_size"])
    if any(want(name) for name in ("static", "serve", "mixed")):
        engine = load_engine(arch, device=device, dtype=dtype, seed=0, fast_decode=fast)
        section("static", lambda: static_batch(engine, n, p, g))
        section("serve", lambda: serve(engine, reqs, max_batch=n, max_context=p + g))
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
    section("http", lambda: http_section(args, uniform, n))
    section("http_mixed", lambda: http_section(args, mixed_lengths, nm))
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
    mixed_label = "mixed 8-200 + 2-20" if args.small else "mixed 128-8k + 32-512"
    for key, label in (("http", f"{p} + {g}"), ("http_mixed", mixed_label)):
        r = s.get(key, {})
        for side, how in (("api", "server's Python API (in-process)"), ("http", "server over HTTP, openai clients")):
            if side not in r:
                continue
            x = r[side]
            ms = lambda v: f"{1e3 * v:.1f}" if v is not None else ""  # noqa: E731
            sec = lambda v: f"{v:.3f}" if v is not None else ""  # noqa: E731
            rows.append(f"| {how}, {label} | {x['requests']} | {x['e2e_tok_s']:.1f} |  | {sec(x['ttft_s_p50'])} / "
                        f"{sec(x['ttft_s_p99'])} | {ms(x['itl_s_p50'])} / {ms(x['itl_s_p99'])} | "
                        f"{x.get('kv_layout') or 'clients: ' + str(x.get('clients'))} |")
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
