"""The fast path end to end (issue 8), every row side by side with its baselines in one run, same weights.

    python3 scripts/bench_fast_path.py --out $OUT/bench_fast_path.json      # H200: llama3_8b random bf16, ~5 min
    python scripts/bench_fast_path.py --small --out /tmp/fast.json          # CPU smoke test of every section

Sections (each guarded: a failure is recorded in the JSON and the run goes on; a global time budget skips what
would not fit, saying so):
  bandwidth  device copy bandwidth (read + write) -> the weight-bandwidth floor: tok/s if a decode step only read
             the weights it needs (all but the embedding table) and its KV cache once at that bandwidth
  decode     batch 1, prompt 512, 256 new tokens: engine graph-captured decode, engine eager, transformers
             `generate` (eager, dynamic cache), transformers `generate` with cache_implementation="static" +
             torch.compile (a time-boxed subprocess on the same seeded weights, failure reported as such)
  long       32k context: engine graph (dense), engine eager (dense), engine int4 (fast_decode=auto: the whole
             step on a GPU, eager on the CPU), engine int4 on the piecewise step, and transformers eager
  codec_contexts  batch-1 decode at 8k / 32k / 128k: dense, int8, int4 on the whole captured step, int4 piecewise
  prefill    prefill tok/s at 8k and 32k (engine unchunked and chunked with peak memory, transformers)
  ttft       time to first token at 100k, chunked (flash attention), with peak memory
  batch      batch 8 and 32 decode throughput (tok/s summed over sequences): engine graph, transformers eager
  fold       (only when named in --only) batch-1 decode at --prompt and --long with the RMSNorm folded into the
             GEMVs' prologue (the GPU default), with the SwiGLU gate folded into the down GEMV too (fold_silu), and
             with both apart (FastDecoder(fold_norm=False)), same weights, two alternating rounds, each against the
             floor; the folded kernels against float64 at the model's shapes, and the steps' logits against the
             unfolded step's. On the CPU it needs TRITON_INTERPRET=1:
                 TRITON_INTERPRET=1 python scripts/bench_fast_path.py --small --only fold
Decode tok/s counts the tokens after the first (which comes from the prefill) over the time after it; medians over
--repeats runs after a warm-up, CUDA-synchronized. JSON: device, versions, git sha (OLLM_GIT_SHA overrides), date,
command; a GitHub table is printed last.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ollm_triton.cache.base import LayerSpec  # noqa: E402
from ollm_triton.decoding.greedy import decode_loop  # noqa: E402
from ollm_triton.engine import Engine, load_engine  # noqa: E402
from ollm_triton.engine.fast_decode import FastDecoder  # noqa: E402
from ollm_triton.kernels.gemv import (  # noqa: E402
    add_rmsnorm_gemv,
    add_rmsnorm_gemv_reference,
    decode_linear,
    silu_mul_gemv,
    silu_mul_gemv_reference,
)
from ollm_triton.registry import registry  # noqa: E402
from ollm_triton.results import git_sha  # noqa: E402

SMALL_ARCH = dict(model_type="llama", vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096, rms_norm_eps=1e-5)
CUDA = torch.cuda.is_available()


def sync():
    if CUDA:
        torch.cuda.synchronize()


def now():
    sync()
    return time.perf_counter()


def peak_reset():
    if CUDA:
        torch.cuda.reset_peak_memory_stats()


def peak_gb():
    return torch.cuda.max_memory_allocated() / 1e9 if CUDA else float("nan")


# ---- measurements -------------------------------------------------------------------------------------------------


def copy_bandwidth(small: bool) -> float:
    """Bytes per second of a device-to-device copy, read + write counted (median)."""
    n = (64 << 20) if small else (2 << 30)
    src = torch.empty(n, dtype=torch.uint8, device="cuda" if CUDA else "cpu").fill_(1)
    dst = torch.empty_like(src)
    if CUDA:
        import triton.testing

        ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=25, rep=200, return_mode="median")
        return 2 * n / (ms / 1e3)
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - t0)
    return 2 * n / statistics.median(times)


def engine_generate(engine, prompt, new, repeats, warm_new=4):
    """Greedy through the engine's decode loop (graph-captured when engine.fast_path says so)."""
    greedy = registry.build("decoder", "greedy")
    greedy.generate(engine, prompt, warm_new)  # warm-up: Triton compiles, the bucket's graph is captured
    runs = []
    for _ in range(repeats):
        peak_reset()
        runs.append(greedy.generate(engine, prompt, new))
    decode = statistics.median(r.counters["decode_s"] for r in runs)
    prefill = statistics.median(r.counters["prefill_s"] for r in runs)
    n = runs[0].tokens.shape[1]
    return {"prefill_s": prefill, "prefill_tok_s": prompt.numel() / prefill,
            "decode_tok_s": prompt.shape[0] * (n - 1) / decode, "peak_gb": peak_gb(),
            "fast_path": str(engine.fast_path), "fused_kernels": engine.describe()["fused_kernels"],
            "graph_capture_s": sum(r.counters.get("graph_capture_s", 0.0) for r in runs)}, runs[0].tokens


def kv_ratio(engine, context: int) -> float:
    """Stored over dense bytes of the engine's codec holding `context` tokens (one layer, random K/V, measured)."""
    cfg = engine.config
    spec = LayerSpec(batch=1, kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim, dtype=engine.dtype,
                     device=engine.device, max_len=context)
    layer = engine.codec.new_layer(spec)
    kv = torch.randn(1, cfg.num_kv_heads, context, cfg.head_dim, device=engine.device, dtype=engine.dtype)
    layer.append(kv, kv)
    return layer.stored_bytes() / layer.original_bytes()


def hf_model_from(engine, arch, dtype, device):
    """transformers' model on the meta device with the engine's tensors assigned (no second copy of weights)."""
    import transformers

    cfg = transformers.AutoConfig.for_model(**arch)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation="sdpa")
    _, unexpected = model.load_state_dict(engine.model.state_dict(), strict=False, assign=True)
    assert not unexpected, unexpected
    with torch.device(device):  # the rotary buffers were left on meta
        model.model.rotary_emb = type(model.model.rotary_emb)(cfg)
    return model.eval()


def hf_generate(model, prompt, new, repeats, warm_new=4, **kw):
    """transformers generate: time to the first token and the decode time after it (a stopping criterion notes
    when the first token exists), medians over `repeats`."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    class FirstTokenClock(StoppingCriteria):
        def __init__(self):
            self.t = None

        def __call__(self, input_ids, scores, **_):
            if self.t is None:
                self.t = now()
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    args = dict(do_sample=False, pad_token_id=0, **kw)
    with torch.inference_mode():
        t0 = now()
        model.generate(prompt, max_new_tokens=warm_new, min_new_tokens=warm_new, **args)
        warmup_s = now() - t0
        ttft, decode, tokens = [], [], None
        for _ in range(repeats):
            peak_reset()
            clock = FirstTokenClock()
            t0 = now()
            out = model.generate(prompt, max_new_tokens=new, min_new_tokens=new,
                                 stopping_criteria=StoppingCriteriaList([clock]), **args)
            t1 = now()
            ttft.append(clock.t - t0)
            decode.append(t1 - clock.t)
            tokens = out[:, prompt.shape[1]:]
    return {"ttft_s": statistics.median(ttft), "decode_tok_s": prompt.shape[0] * (new - 1) / statistics.median(decode),
            "peak_gb": peak_gb(), "warmup_s": warmup_s}, tokens


def matmul_ceiling(model, batch: int = 1, linear=None) -> float:
    """Seconds per decode step if it were only its weight matmuls (every layer's q/k/v, o, gate/up and down, and
    the LM head, at `batch` rows), replayed as one CUDA graph: what the GEMMs alone allow, for reading the gap
    between a measured step and the bandwidth floor. linear: the matmul (default cuBLAS through F.linear)."""
    import torch.nn.functional as F
    import triton.testing

    linear = linear or F.linear

    cfg = model.config
    dev, dt = model.lm_head.weight.device, model.lm_head.weight.dtype
    h = torch.randn(batch, cfg.hidden_size, device=dev, dtype=dt)
    a = torch.randn(batch, cfg.num_heads * cfg.head_dim, device=dev, dtype=dt)
    m = torch.randn(batch, cfg.intermediate_size, device=dev, dtype=dt)
    weights = []
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        qkv = [attn.qkv_weight] if attn.qkv_weight is not None else [attn.q_proj.weight, attn.k_proj.weight,
                                                                       attn.v_proj.weight]
        gu = [mlp.gate_up_weight] if mlp.gate_up_weight is not None else [mlp.gate_proj.weight, mlp.up_proj.weight]
        weights += [(h, w) for w in qkv] + [(a, attn.o_proj.weight)]
        weights += [(h, w) for w in gu] + [(m, mlp.down_proj.weight)]
    weights.append((h, model.lm_head.weight))

    def step():
        for x, w in weights:
            linear(x, w)

    with torch.inference_mode(), torch.cuda.stream(torch.cuda.Stream()):  # some Triton versions refuse to
        return triton.testing.do_bench_cudagraph(step, rep=200, return_mode="median") / 1e3  # capture on default


def fold_kernel_check(cfg, device, dtype, small: bool) -> dict:
    """The folded kernel at the model's batch-1 shapes (q/k/v, gate/up, LM head) against float64: relative RMS
    error of y and the largest error of the written residual, in the run's dtype."""
    shapes = {"qkv": (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim, "gate_up": 2 * cfg.intermediate_size,
              "lm_head": cfg.vocab_size if small else 8192}  # the head's rows are alike: 8192 of them suffice
    k, g = cfg.hidden_size, torch.Generator(device=device).manual_seed(0)
    out = {}

    def rel(y, y_ref):
        return ((y.double() - y_ref).pow(2).mean().sqrt() / y_ref.pow(2).mean().sqrt()).item()

    for name, n in shapes.items():
        r, d = (torch.randn(1, k, device=device, generator=g, dtype=dtype) for _ in range(2))
        nw = 1 + 0.2 * torch.randn(k, device=device, generator=g, dtype=dtype)
        w = torch.randn(n, k, device=device, generator=g, dtype=dtype) / k**0.5
        y, s = add_rmsnorm_gemv(d, r, nw, 1e-5, w)
        y_ref, s_ref = add_rmsnorm_gemv_reference(d, r, nw, 1e-5, w)
        out[name] = {"y_rel_rms": rel(y, y_ref), "residual_max_abs_err": (s.double() - s_ref).abs().max().item()}
    m = cfg.intermediate_size  # the SiLU gate folded into the down GEMV
    gate_up = 2 * torch.randn(1, 2 * m, device=device, generator=g, dtype=dtype)
    w = torch.randn(k, m, device=device, generator=g, dtype=dtype) / m**0.5
    out["down_silu"] = {"y_rel_rms": rel(silu_mul_gemv(gate_up, w), silu_mul_gemv_reference(gate_up, w))}
    return out


def timed_prefill(fn, repeats):
    times, peaks = [], []
    for _ in range(repeats):
        peak_reset()
        t0 = now()
        fn()
        times.append(now() - t0)
        peaks.append(peak_gb())
    return statistics.median(times), max(peaks)


# ---- the transformers static-cache + torch.compile worker (own process: compile can hang or blow up) ---------------


def compile_worker(args) -> None:
    """Rebuild the same seeded weights, then generate with a static cache compiled by torch.compile."""
    out = {"ok": False}
    try:
        from transformers.generation import CompileConfig

        arch, dtype, device = model_arch(args), getattr(torch, args.dtype), "cuda" if CUDA else "cpu"
        engine = load_engine(arch, device=device, dtype=dtype, seed=0, fast_decode="off")
        model = hf_model_from(engine, arch, dtype, device)
        prompt = make_prompt(arch, 1, args.prompt, device)
        config = CompileConfig(fullgraph=False, mode="reduce-overhead") if CUDA else CompileConfig(backend="eager")
        if not CUDA:  # the CPU smoke test checks the code path with the no-codegen backend
            config._compile_all_devices = True
        model.generation_config.compile_config = config
        # the warm-up has the timed runs' shape: a static cache of another length would compile again
        res, _ = hf_generate(model, prompt, args.new, args.repeats, warm_new=args.new, cache_implementation="static")
        out = {"ok": True, **res, "backend": config.backend, "mode": config.mode}
    except Exception as e:  # reported, never hidden
        out = {"ok": False, "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
               "trace": traceback.format_exc()[-1500:]}
    Path(args.worker_out).write_text(json.dumps(out))


def run_compile_worker(args, timeout: float) -> dict:
    out = Path(args.out or "/tmp/bench_fast_path.json").with_suffix(".compile.json")
    cmd = [sys.executable, __file__, "--compile-worker", "--worker-out", str(out), "--prompt", str(args.prompt),
           "--new", str(args.new), "--repeats", str(args.repeats), "--dtype", args.dtype, "--model", args.model]
    if args.small:
        cmd.append("--small")
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"timed out after {timeout:.0f} s (compile + warm-up + {args.repeats} runs)"}
    if not out.is_file():
        tail = (proc.stderr or proc.stdout or "").strip().splitlines()[-3:]
        return {"ok": False, "error": f"worker exited {proc.returncode} without a result: {' | '.join(tail)}"}
    res = json.loads(out.read_text())
    out.unlink()
    res["wall_s"] = time.perf_counter() - t0
    return res


# ---- the run --------------------------------------------------------------------------------------------------------


def model_arch(args) -> dict:
    if args.small:
        return dict(SMALL_ARCH)
    return yaml.safe_load((REPO / "ollm_triton" / "conf" / "model" / f"{args.model}.yaml").read_text())["arch"]


def make_prompt(arch, batch, length, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, arch["vocab_size"], (batch, length), generator=gen).to(device)


class Bench:
    def __init__(self, args):
        self.args = args
        self.t0 = time.perf_counter()
        self.record = {}
        self.rows = []  # (name, context, batch, prefill tok/s, decode tok/s, % floor, peak GB, notes)

    def left(self) -> float:
        return self.args.budget - (time.perf_counter() - self.t0)

    def section(self, name, need_s, fn, opt_in=False):
        """Run one section unless the budget cannot hold it; record failures instead of stopping. An opt_in
        section runs only when --only names it."""
        if (self.args.only is not None or opt_in) and name not in (self.args.only or ()) and name != "bandwidth":
            return
        if self.left() < need_s:
            self.record[name] = {"skipped": f"time budget: {self.left():.0f} s left, section needs ~{need_s:.0f} s"}
            print(f"[{name}] skipped (time budget)", flush=True)
            return
        t0 = time.perf_counter()
        try:
            self.record[name] = fn()
        except Exception as e:
            self.record[name] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
                                 "trace": traceback.format_exc()[-1500:]}
            print(f"[{name}] FAILED: {self.record[name]['error']}", flush=True)
        if isinstance(self.record[name], dict):
            self.record[name]["section_s"] = time.perf_counter() - t0
        print(f"[{name}] {time.perf_counter() - t0:.1f} s", flush=True)
        self.save()
        if CUDA:
            torch.cuda.empty_cache()

    def row(self, name, context, batch, prefill, decode, floor, peak, notes="", group=None):
        """A table row; `group` orders the printed table (default: the order of the calls)."""
        pct = f"{100 * decode / floor:.0f}%" if decode and floor else ""
        fmt = lambda x, p: f"{x:.{p}f}" if isinstance(x, float) else ("" if x is None else str(x))  # noqa: E731
        self.rows.append((len(self.rows) if group is None else group, f"| {name} | {context} | {batch} | "
                          f"{fmt(prefill, 0)} | {fmt(decode, 1)} | {pct} | {fmt(peak, 2)} | {notes} |"))

    def table(self) -> list[str]:
        return [text for _, text in sorted(self.rows, key=lambda r: r[0])]

    def save(self):
        if self.args.out:
            Path(self.args.out).write_text(json.dumps({**self.header, "sections": self.record, "table": self.table()},
                                                      indent=1, default=str))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="llama3_8b", help="an ollm_triton/conf/model preset with random weights")
    ap.add_argument("--small", action="store_true", help="a tiny model and lengths: the CPU smoke test")
    ap.add_argument("--dtype", default=None, help="default bfloat16 on CUDA, float32 on the CPU")
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--new", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--long", type=int, default=32768)
    ap.add_argument("--long-new", type=int, default=64)
    ap.add_argument("--prefill", type=int, nargs="*", default=[8192, 32768])
    ap.add_argument("--codec-contexts", type=int, nargs="*", default=[8192, 32768, 131072])
    ap.add_argument("--ttft", type=int, default=100_000)
    ap.add_argument("--chunk", type=int, default=8192)
    ap.add_argument("--batches", type=int, nargs="*", default=[8, 32])
    ap.add_argument("--compile-timeout", type=float, default=200.0)
    ap.add_argument("--no-compile", action="store_true", help="skip the transformers static+compile baseline")
    ap.add_argument("--budget", type=float, default=345.0, help="seconds for the whole run; later sections skip")
    ap.add_argument("--reserve", type=float, default=150.0, help="seconds kept for the sections after the compile one")
    ap.add_argument("--only", nargs="*", default=None, help="run only these sections (bandwidth always runs)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--compile-worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.small:
        args.prompt, args.new, args.long, args.long_new = 32, 8, 160, 4
        args.codec_contexts = [160]
        args.prefill, args.ttft, args.chunk, args.batches = [64, 128], 300, 64, [2]
    args.dtype = args.dtype or ("bfloat16" if CUDA else "float32")
    if args.compile_worker:
        return compile_worker(args)

    import transformers
    import triton

    device = torch.device("cuda" if CUDA else "cpu")
    dtype = getattr(torch, args.dtype)
    arch = model_arch(args)
    bench = Bench(args)
    bench.header = {
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name() if CUDA else (platform.processor() or platform.machine()),
        "torch": torch.__version__, "triton": triton.__version__, "transformers": transformers.__version__,
        "python": platform.python_version(), "git_sha": git_sha(), "model": "small" if args.small else args.model,
        "dtype": args.dtype,
    }
    # the graph engine (fast_decode=auto: CUDA graphs on the GPU; on the CPU the same step, uncaptured)
    graph = load_engine(arch, device=device, dtype=dtype, seed=0, fast_decode="auto" if CUDA else "static")
    graph.fast_decoder()  # fuses q/k/v and gate/up weights now, before anything else shares the tensors

    def sibling(**kw):
        """Another Engine over the same weights (other plugins / fast-path setting)."""
        plugins = dict(attention=graph.attention, codec=graph.codec, prefetch=graph.prefetch)
        for kind, key in (("attention", "attention"), ("cache", "codec")):
            if isinstance(kw.get(key), str):
                kw[key] = registry.build(kind, kw[key])
        plugins.update({k: kw.pop(k) for k in ("attention", "codec") if k in kw})
        return Engine(graph.model, **plugins, device=device, dtype=dtype, **kw)

    eager = sibling(fast_decode="off")
    fast_label = "engine, CUDA graph" if str(graph.fast_path) == "graph" else f"engine, {graph.fast_path} step"
    kernels = " (fused kernels)" if CUDA else ""
    hf = hf_model_from(graph, arch, dtype, device)
    cfg = graph.config
    embed = cfg.vocab_size * cfg.hidden_size if not cfg.tie_word_embeddings else 0
    elt = torch.empty((), dtype=dtype).element_size()
    weights_read = (graph.num_parameters() - embed) * elt  # what one decode step must read (one embedding row)
    kv_per_token = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * elt
    bench.header.update(weights_gb=graph.num_parameters() * elt / 1e9, weights_read_per_step_gb=weights_read / 1e9)

    def floor(batch, context, kv_ratio=1.0):
        """tok/s (summed over the batch) if a step read the weights once and each sequence's KV once (kv_ratio: a
        codec's stored bytes over the dense cache's)."""
        bw = bench.record.get("bandwidth", {}).get("copy_bytes_s")
        return batch * bw / (weights_read + batch * kv_ratio * kv_per_token * context) if bw else None

    def bandwidth():
        bw = copy_bandwidth(args.small)
        return {"copy_bytes_s": bw, "copy_tb_s": bw / 1e12,
                "floor_tok_s_b1_512": batch_floor(1, args.prompt + args.new // 2, bw)}

    def batch_floor(batch, context, bw):
        return batch * bw / (weights_read + batch * kv_per_token * context)

    bench.section("bandwidth", 5, bandwidth)

    def decode(hf=hf):
        p = make_prompt(arch, 1, args.prompt, device)
        ctx = args.prompt + args.new // 2
        out = {}
        out["engine_graph"], tok_graph = engine_generate(graph, p, args.new, args.repeats + 1)
        out["engine_eager"], tok_eager = engine_generate(eager, p, args.new, args.repeats)
        out["hf_eager"], _ = hf_generate(hf, p, args.new, args.repeats)
        # Correctness beside the speed: first-step logits of graph vs eager engine, and their tokens (random
        # weights give near-flat logits, so bf16 ties flip tokens after a while; the logits are the check).
        with torch.inference_mode():
            a, b = [], []
            graph.fast_decoder().generate(p, 2, lambda lg: a.append(lg.clone()) or lg.argmax(-1))
            decode_loop(eager, p, 2, lambda lg: b.append(lg.clone()) or lg.argmax(-1), None)
        rel = [((x - y).norm() / y.norm()).item() for x, y in zip(a, b, strict=True)]
        out["graph_vs_eager_step_logits_rel_l2"] = max(rel)
        if CUDA:
            s = matmul_ceiling(graph.model)
            out["matmuls_only_step_ms"] = s * 1e3
            out["matmuls_only_tok_s"] = 1 / s
            s = matmul_ceiling(graph.model, linear=decode_linear)  # the matmul the graph step runs at batch 1
            out["gemv_matmuls_only_step_ms"] = s * 1e3
            out["gemv_matmuls_only_tok_s"] = 1 / s
            out["graph_step_ms"] = 1e3 / out["engine_graph"]["decode_tok_s"]
        same = (tok_graph == tok_eager).int().cumprod(1).sum().item()
        out["graph_vs_eager_identical_prefix_tokens"] = same
        f = floor(1, ctx)
        for key, name in (("engine_graph", f"{fast_label}{kernels}"),
                          ("engine_eager", f"engine, eager{kernels}"),
                          ("hf_eager", "transformers generate, eager, dynamic cache")):
            r = out[key]
            pre = r.get("prefill_tok_s") or (args.prompt / r["ttft_s"] if r.get("ttft_s") else None)
            bench.row(name, args.prompt, 1, pre, r["decode_tok_s"], f, r["peak_gb"], r.get("fast_path", ""))
        if "matmuls_only_tok_s" in out:
            bench.row("(ceiling) the step's weight matmuls alone, one CUDA graph", args.prompt, 1, None,
                      out["matmuls_only_tok_s"], f, None, "what cuBLAS allows before any other kernel")
            bench.row("(ceiling) the same with the one-shot Triton GEMV (what the graph step runs)", args.prompt, 1,
                      None, out["gemv_matmuls_only_tok_s"], f, None, "kernels/gemv.py")
        return out

    bench.section("decode", 60 if not args.small else 1, decode)

    if CUDA:  # the worker rebuilds the weights: give it the memory of ours back
        torch.cuda.empty_cache()
    if not args.no_compile:
        def compiled():
            res = run_compile_worker(args, min(args.compile_timeout, max(60.0, bench.left() - args.reserve)))
            f = floor(1, args.prompt + args.new // 2)
            if res.get("ok"):
                bench.row("transformers generate, static cache + torch.compile", args.prompt, 1,
                          args.prompt / res["ttft_s"], res["decode_tok_s"], f, res["peak_gb"],
                          f"compile + warm-up run {res['warmup_s']:.0f} s ({res['backend']}, {res['mode']})")
            else:
                bench.row("transformers generate, static cache + torch.compile", args.prompt, 1, None, None, f, None,
                          f"FAILED: {res['error'][:100]}")
            return res
        # compiling an 8B model takes minutes: time-boxed to what the budget can spare after reserving the
        # later sections' time
        bench.section("hf_static_compile", 60 if not args.small else 1, compiled)

    del hf

    def long_context():
        p = make_prompt(arch, 1, args.long, device, seed=1)
        ctx = args.long + args.long_new // 2
        out = {}
        out["engine_graph_dense"], _ = engine_generate(graph, p, args.long_new, args.repeats)
        out["engine_eager_dense"], _ = engine_generate(eager, p, max(2, args.long_new // 2), 1)
        int4 = sibling(codec="int4", fast_decode="auto")  # the whole step captured (QuantLayer.static_decode)
        out["engine_int4"], _ = engine_generate(int4, p, args.long_new, args.repeats)
        out["int4_kv_ratio"] = kv_ratio(int4, ctx)  # its own floor reads these KV bytes, not the dense ones
        del int4
        int4_pw = sibling(codec="int4", fast_decode="piecewise")  # the previous path: eager attention between segments
        out["engine_int4_piecewise"], _ = engine_generate(int4_pw, p, args.long_new, args.repeats)
        del int4_pw
        hf_long = hf_model_from(graph, arch, dtype, device)
        out["hf_eager"], _ = hf_generate(hf_long, p, max(2, args.long_new // 2), 1)
        del hf_long
        f = floor(1, ctx)
        for key, name in (("engine_graph_dense", f"{fast_label}, dense cache"),
                          ("engine_eager_dense", "engine, eager, dense cache"),
                          ("engine_int4", "engine, int4 cache (% of its own floor)"),
                          ("engine_int4_piecewise", "engine, int4 cache, piecewise step (% of its own floor)"),
                          ("hf_eager", "transformers generate, eager")):
            r = out[key]
            pre = r.get("prefill_tok_s") or args.long / r["ttft_s"]
            fk = floor(1, ctx, out["int4_kv_ratio"]) if key.startswith("engine_int4") else f
            bench.row(name, args.long, 1, pre, r["decode_tok_s"], fk, r["peak_gb"], r.get("fast_path", ""))
        return out

    bench.section("long", 40 if not args.small else 1, long_context)

    def codec_contexts():
        """Batch-1 decode at each of --codec-contexts with the dense cache and the quantized codecs on the whole
        captured step (and int4 on the piecewise step it replaced), prompts prefilled in chunks of --chunk: does
        the int4 step beat dense, and does the gap grow with context as the bytes say (issue 20, item 1)?"""
        out = {}
        for ctx in args.codec_contexts:
            p = make_prompt(arch, 1, ctx, device, seed=2)
            row = {}
            for key, kw in (("dense", {}), ("int8", dict(codec="int8")), ("int4", dict(codec="int4")),
                            ("int4_piecewise", dict(codec="int4", fast_decode="piecewise"))):
                eng = sibling(prefill_chunk=args.chunk, **kw)
                row[key], _ = engine_generate(eng, p, args.long_new, args.repeats)
                if key != "dense":
                    row[key]["kv_ratio"] = kv_ratio(eng, ctx + args.long_new // 2)
                del eng
                torch.cuda.empty_cache() if CUDA else None
                own_floor = " (% of its own floor)" if key != "dense" else ""
                bench.row(f"engine, {key.replace('_', ' ')} cache" + own_floor,
                          ctx, 1, row[key]["prefill_tok_s"], row[key]["decode_tok_s"],
                          floor(1, ctx + args.long_new // 2, row[key].get("kv_ratio", 1.0)), row[key]["peak_gb"],
                          row[key]["fast_path"], group=1000 + len(out) * 10 + len(row))
            row["int4_over_dense"] = row["int4"]["decode_tok_s"] / row["dense"]["decode_tok_s"]
            out[str(ctx)] = row
        return out

    bench.section("codec_contexts", 60 if not args.small else 1, codec_contexts)

    def prefill():
        out = {}
        chunked = sibling(attention="flash", fast_decode="off")
        for n in args.prefill:
            p = make_prompt(arch, 1, n, device, seed=2)
            r = {}
            with torch.inference_mode():
                graph.prefill(p[:, :64], graph.new_cache(1, 64))  # warm-up
                s, pk = timed_prefill(lambda p=p, n=n: graph.prefill(p, graph.new_cache(1, n), chunk=0), args.repeats)
                r["engine_sdpa_unchunked"] = {"s": s, "tok_s": n / s, "peak_gb": pk}
                m = min(n, 2 * args.chunk)  # Triton compiles for the chunk shapes the timed run has
                chunked.prefill(p[:, :m], chunked.new_cache(1, m), chunk=args.chunk)
                s, pk = timed_prefill(lambda p=p, n=n: chunked.prefill(p, chunked.new_cache(1, n), chunk=args.chunk),
                                      args.repeats)
                r["engine_flash_chunked"] = {"s": s, "tok_s": n / s, "peak_gb": pk, "chunk": args.chunk}
                hf_p = hf_model_from(graph, arch, dtype, device)
                hf_p(p[:, :64], logits_to_keep=1)
                s, pk = timed_prefill(lambda m=hf_p, p=p: m(p, logits_to_keep=1), args.repeats)
                r["hf"] = {"s": s, "tok_s": n / s, "peak_gb": pk}
                del hf_p
            out[n] = r
            bench.row("prefill: engine (sdpa, one shot)", n, 1, r["engine_sdpa_unchunked"]["tok_s"], None, None,
                      r["engine_sdpa_unchunked"]["peak_gb"])
            bench.row(f"prefill: engine (flash, chunks of {args.chunk})", n, 1, r["engine_flash_chunked"]["tok_s"],
                      None, None, r["engine_flash_chunked"]["peak_gb"])
            bench.row("prefill: transformers forward", n, 1, r["hf"]["tok_s"], None, None, r["hf"]["peak_gb"])
        return out

    bench.section("prefill", 30 if not args.small else 1, prefill)

    def ttft():
        n = args.ttft
        chunked = sibling(attention="flash", fast_decode="off", prefill_chunk=args.chunk)
        p = make_prompt(arch, 1, n, device, seed=3)
        with torch.inference_mode():
            m = args.chunk + (n % args.chunk or args.chunk)  # warm-up: a full chunk and the last, shorter one
            chunked.prefill(p[:, :m], chunked.new_cache(1, m))
            cache = chunked.new_cache(1, n)
            kv_gb = sum(layer.k.numel() * 2 * layer.k.element_size() for layer in cache.layers) / 1e9
            peak_reset()
            t0 = now()
            chunked.prefill(p, cache)
            s = now() - t0
        out = {"ttft_s": s, "prefill_tok_s": n / s, "peak_gb": peak_gb(), "kv_cache_gb": kv_gb, "chunk": args.chunk,
               "weights_gb": bench.header["weights_gb"]}
        bench.row(f"time to first token: engine (flash, chunks of {args.chunk}) -> {s:.2f} s", n, 1, n / s, None,
                  None, out["peak_gb"], f"KV cache {kv_gb:.1f} GB")
        return out

    bench.section("ttft", 40 if not args.small else 1, ttft)

    def batches():
        out = {}
        hf_b = hf_model_from(graph, arch, dtype, device)
        for b in args.batches:
            p = make_prompt(arch, b, args.prompt, device, seed=4)
            new = max(2, args.new // 2)
            r = {"engine_graph": engine_generate(graph, p, new, args.repeats)[0]}
            r["hf_eager"] = hf_generate(hf_b, p, new, 1)[0]  # every batch size: the baseline beside each row
            out[b] = r
            f = floor(b, args.prompt + new // 2)
            bench.row(fast_label, args.prompt, b, r["engine_graph"]["prefill_tok_s"],
                      r["engine_graph"]["decode_tok_s"], f, r["engine_graph"]["peak_gb"], "tok/s summed over the batch")
            if "hf_eager" in r:
                bench.row("transformers generate, eager", args.prompt, b, b * args.prompt / r["hf_eager"]["ttft_s"],
                          r["hf_eager"]["decode_tok_s"], f, r["hf_eager"]["peak_gb"], "tok/s summed over the batch")
        del hf_b
        return out

    bench.section("batch", 45 if not args.small else 1, batches)

    def fold():
        """Issue 20 item 4: the step with the RMSNorm (+ residual add) folded into the q/k/v, gate/up and LM-head
        GEMVs (the GPU default), that plus the SwiGLU gate folded into the down GEMV, and the step with both apart,
        batch 1, at --prompt and --long, same weights, two alternating rounds."""
        out = {"kernel_vs_float64": fold_kernel_check(cfg, device, dtype, args.small)}
        variants = {"apart": dict(fold_norm=False), "norm": dict(fold_norm=True),
                    "norm_silu": dict(fold_norm=True, fold_silu=True)}
        labels = {"apart": "norm and SiLU kernels apart (fold_norm=False)",
                  "norm": "RMSNorm folded into the GEMVs (default)",
                  "norm_silu": "RMSNorm and SiLU gate folded (fold_silu=True)"}
        engines = {}
        for key, kw in variants.items():
            eng = sibling(fast_decode="auto" if CUDA else "static")
            eng._fast = FastDecoder(eng, capture=CUDA, use_kernels=eng.kernels, **kw)
            engines[key] = eng
        for ctx, new, seed in ((args.prompt, args.new, 0), (args.long, args.long_new, 1)):
            p = make_prompt(arch, 1, ctx, device, seed=seed)
            row = {key: [] for key in variants}
            for rnd in range(2):
                for key, eng in engines.items():
                    r, _ = engine_generate(eng, p, new, args.repeats if rnd == 0 else 1)
                    row[key].append(r)
                    eng.fast_decoder().buckets.clear()  # one context's KV buffers at a time
                    if CUDA:
                        torch.cuda.empty_cache()
            with torch.inference_mode():  # the first decode step's logits of each, the same prompt
                logits = {}
                for key, eng in engines.items():
                    logits[key] = store = []
                    eng.fast_decoder().generate(p, 2, lambda lg, store=store: store.append(lg.clone()) or lg.argmax(-1))
                    eng.fast_decoder().buckets.clear()
            rel = {key: max(((a - b).norm() / b.norm()).item() for a, b in zip(logits[key], logits["apart"],
                                                                              strict=True)) for key in variants}
            tok = {key: statistics.mean(r["decode_tok_s"] for r in runs) for key, runs in row.items()}
            row.update(step_logits_rel_l2_vs_apart=rel, decode_tok_s=tok,
                       over_apart={key: tok[key] / tok["apart"] for key in variants})
            f = floor(1, ctx + new // 2)
            for i, key in enumerate(variants):
                r = row[key][0]
                bench.row(f"engine, {engines[key].fast_path} step, {labels[key]}", ctx, 1, r["prefill_tok_s"],
                          tok[key], f, r["peak_gb"], f"{tok[key] / tok['apart']:.3f}x apart; step logits vs apart: "
                          f"rel L2 {rel[key]:.1e}", group=2000 + len(out) * 10 + i)
            out[str(ctx)] = row
        return out

    bench.section("fold", 60 if not args.small else 1, fold, opt_in=True)

    bench.header["total_s"] = time.perf_counter() - bench.t0
    bench.save()

    bw = bench.record.get("bandwidth", {}).get("copy_tb_s")
    h = bench.header
    print(f"\n{h['device']}, torch {h['torch']}, triton {h['triton']}, transformers {h['transformers']}, "
          f"{h['model']} random {args.dtype} ({h['weights_gb']:.1f} GB; a decode step reads "
          f"{h['weights_read_per_step_gb']:.1f} GB of weights + its KV cache), copy bandwidth "
          f"{bw:.2f} TB/s; median of {args.repeats}; git {h['git_sha']}; {h['date']}\n" if bw else "")
    print("| implementation | context | batch | prefill tok/s | decode tok/s | % of weight-bandwidth floor | "
          "peak GB | notes |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    print("\n".join(bench.table()))


if __name__ == "__main__":
    main()
