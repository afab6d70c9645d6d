"""The MoE expert MLPs on the GPU: our grouped Triton kernels beside the naive per-expert loop, the engine's eager
grouped path and transformers' own experts module, in one process; and where a gpt-oss-20b decode step spends its
time (issue 18: 64.4 tok/s on an H100, 15% of its active-weight floor).

    OLLM_GIT_SHA=$(git rev-parse --short HEAD) python scripts/bench_moe.py --out $OUT/bench_moe.json   # H100, ~2 min
    python scripts/bench_moe.py --small --out /tmp/bench_moe.json      # CPU smoke test (interpreter, tiny shapes)
    [--tokens 1 16 512] [--model qwen3_moe_30b gpt_oss_20b] [--sweep] [--no-step] [--no-experts] [--layers L]
    [--transformers [--prompt 512] [--new 64] [--repeats 2] [--no-compile] [--compile-timeout 100]]
    # the engine beside transformers, one model a call (each < 3 min on an H100):
    python scripts/bench_moe.py --transformers --no-experts --no-step --model gpt_oss_20b --out $OUT/bench_moe_hf.json

Section "experts". One MoE layer of Qwen3-30B-A3B (hidden 2048, 128 experts of intermediate 768, 8 routed per
token) or of gpt-oss-20b (hidden 2880, 32 experts of 2880, 4 routed, clamped SwiGLU with biases, transposed
interleaved layout), bf16, N tokens (1 = batch-1 decode, 16 = batched decode, 512 = a prefill chunk) routed by a
random router (softmax, top-k, renormalised). Each path's output is checked against the float32 reference on the
same bf16 weights (relative RMS error) before it is timed with triton.testing.do_bench (median, L2 flushed, after
warm-up); ours also as a CUDA-graph replay (do_bench_cudagraph: the launch-free number, what the engine's captured
decode step sees). The bandwidth column is the bytes of the experts the tokens chose (each read once) over the time,
against the device's copy bandwidth measured here; beside it the time that reading the routed experts, and every
expert of the layer, would take at that bandwidth. gpt-oss adds a row with the same layer quantized to MXFP4 (its
checkpoints' format) and read as bytes by the same kernels (kernels/mxfp4.py): checked against the float32
reference on the dequantized weights, its bandwidth on the 4.25-bit bytes it reads (the floor columns stay bf16's).

Section "step" (gpt-oss-20b, the runner's `model=gpt_oss_20b task=throughput`: random bf16 weights at the preset's
shapes, batch 1, a 512-token random prompt, 64 new tokens). The engine picks the whole captured step for gpt-oss
(its varlen kernel takes each layer's window, its merge the sinks); before that it took the *piecewise* step: L + 1
captured segments with each layer's attention run eagerly through the sdpa backend between them. The rows:
  - the runner's path (decode tok/s as the runner counts it), and the other of the two paths beside it;
  - one step replayed (wall, and the host's time to return from the calls);
  - the captured segments alone (everything but attention: projections, router, experts, norms, LM head);
  - the eager attention calls alone (L of them, as the step makes them), and the same calls captured as one graph
    (their device time without the host);
  - the expert kernels of all L layers alone as one graph, and the naive routed-only loop;
  - the whole step captured with every layer's window and sinks switched off: a timing projection of the step if
    the static step's kernel honoured them (plain causal attention, so NOT gpt-oss's output; its logits are checked
    against the eager engine on the same switched-off model);
  - the floor: the bytes a token reads (attention, router, the k routed experts, norms, LM head; not the embedding
    table) over the copy bandwidth.
Correctness in the same run: the step's first decode logits against the eager engine's (relative L2, bf16); the
expert kernels against a float32 reference.

Section "transformers" (--transformers; issue 18's "against transformers in the same run"). For each --model, the
preset's random bf16 weights (seed 0, drawn on the GPU), batch 1, a --prompt-token random prompt, --new tokens,
greedy, one model at a time:
  - the engine's runner path (FastDecoder.generate, what `task=throughput` times: the captured step where the model
    allows it), decode ms a token over the second of two generations;
  - transformers' own GptOssForCausalLM / Qwen3MoeForCausalLM `generate` (eager, its default dynamic cache; its
    default attention and experts implementations, named in the row), medians over --repeats after a warm-up, the
    decode time after the first token (scripts/bench_fast_path.py's timer). transformers' model is built on the meta
    device and handed the engine's tensors (the engine's parameter names are transformers 5's): ONE copy of the
    weights for both, since gpt-oss (~42 GB) or Qwen3-MoE (~61 GB) fits an 80 GB H100 once, not twice;
  - transformers `generate` with a static cache and its torch.compile (reduce-overhead) in a subprocess, after this
    process freed the model, within --compile-timeout seconds (a run over it, or one that fails, is a row saying so;
    a generate that fell back to the uncompiled call says NOT COMPILED).
Checked in the same run: transformers' prefill logits and its first decode step's (fed the engine's token) against
the eager engine's (relative L2; ~1e-7 in float32 on the CPU, bf16 rounding on the GPU), the runner path's first
step likewise, and the compiled run's tokens against transformers eager's.

Writes JSON (device, versions, git sha, date, command); prints GitHub tables last.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import statistics
import sys
import time
import traceback
from functools import partial
from pathlib import Path

if "--small" in sys.argv:  # the CPU smoke test runs the Triton kernels through the interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
import yaml  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ollm_triton.kernels.moe import moe_experts_kernel, moe_experts_torch  # noqa: E402
from ollm_triton.kernels.mxfp4 import quantize_mxfp4  # noqa: E402
from ollm_triton.results import environment  # noqa: E402

SHAPES = {  # hidden, experts, intermediate, top-k, layout, activation, biases
    "qwen3_moe_30b": dict(h=2048, e=128, i=768, k=8, layout="concat", act="silu", bias=False),
    "gpt_oss_20b": dict(h=2880, e=32, i=2880, k=4, layout="interleaved_t", act="clamped_swiglu", bias=True),
}
SMALL_SHAPES = {  # --small: the same layouts at interpreter sizes (odd widths: partial tiles)
    "qwen3_moe_30b": dict(h=72, e=8, i=40, k=2, layout="concat", act="silu", bias=False),
    "gpt_oss_20b": dict(h=96, e=8, i=32, k=2, layout="interleaved_t", act="clamped_swiglu", bias=True),  # MXFP4: 32s
}
SMALL_GPT_OSS = dict(model_type="gpt_oss", vocab_size=512, hidden_size=64, intermediate_size=40, num_hidden_layers=2,
                     num_attention_heads=8, num_key_value_heads=2, head_dim=16, num_local_experts=8,
                     num_experts_per_tok=2, sliding_window=8, layer_types=["sliding_attention", "full_attention"],
                     max_position_embeddings=4096, attention_bias=True, rms_norm_eps=1e-5,
                     rope_parameters={"rope_type": "yarn", "factor": 8.0, "beta_fast": 32.0, "beta_slow": 1.0,
                                      "truncate": False, "original_max_position_embeddings": 512,
                                      "rope_theta": 150000.0})
SMALL_QWEN3_MOE = dict(model_type="qwen3_moe", vocab_size=512, hidden_size=64, intermediate_size=96,
                       moe_intermediate_size=40, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       head_dim=16, num_experts=8, num_experts_per_tok=2, norm_topk_prob=True,
                       max_position_embeddings=4096)
SMALL_ARCHS = {"qwen3_moe_30b": SMALL_QWEN3_MOE, "gpt_oss_20b": SMALL_GPT_OSS}  # --small: the presets' stand-ins
# (block_m or None = the kernel's choice, block_n, block_k, warps, stages or None = Triton's) for --sweep; the first
# is the default
SWEEP = [(None, 64, 64, 4, None), (16, 32, 64, 4, None), (16, 64, 128, 4, None), (16, 128, 64, 8, None),
         (64, 128, 64, 8, None), (32, 64, 64, 4, None), (None, 64, 64, 4, 4), (None, 64, 128, 4, 4),
         (None, 128, 64, 4, 4), (None, 128, 128, 8, 3), (None, 32, 128, 4, 4), (64, 128, 64, 4, 4),
         (128, 128, 64, 8, 3)]
DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DT = torch.bfloat16


def sync() -> None:
    if DEV.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, graph: bool = False) -> float:
    """Milliseconds a call: do_bench (median, L2 flushed) or do_bench_cudagraph on CUDA; on the CPU the median of
    three calls after one (no meaning beyond the plumbing)."""
    if DEV.type == "cuda":
        from triton.testing import do_bench, do_bench_cudagraph

        return (do_bench_cudagraph if graph else do_bench)(fn)
    fn()
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def rel_rms(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return ((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt().clamp_min(1e-30)).item()


def copy_bandwidth() -> float:
    """Bytes read + written per second by a 2 GB device copy (64 MB on the CPU)."""
    src = torch.empty((1 << 30) if DEV.type == "cuda" else (32 << 20), dtype=torch.uint8, device=DEV)
    dst = torch.empty_like(src)
    t = timed(lambda: dst.copy_(src)) / 1e3
    return 2 * src.numel() / t


def make_layer(s: dict, seed: int = 0):
    g = torch.Generator(device=DEV).manual_seed(seed)
    e, h, i = s["e"], s["h"], s["i"]

    def rnd(*shape, std=0.02):
        return (torch.randn(*shape, generator=g, device=DEV) * std).to(DT)

    if s["layout"] == "concat":
        w_gu, w_d = rnd(e, 2 * i, h), rnd(e, h, i)
    else:
        w_gu, w_d = rnd(e, h, 2 * i), rnd(e, i, h)
    b_gu, b_d = (rnd(e, 2 * i), rnd(e, h)) if s["bias"] else (None, None)
    return w_gu, w_d, b_gu, b_d


def route(n: int, s: dict, seed: int = 1):
    g = torch.Generator(device=DEV).manual_seed(seed)
    probs = torch.randn(n, s["e"], generator=g, device=DEV).softmax(-1)
    w, ex = torch.topk(probs, s["k"], dim=-1)
    return (w / w.sum(-1, keepdim=True)).to(DT), ex


def grouped_eager(x, w, ex, w_gu, w_d, b_gu, b_d, s):
    """The engine's eager grouped path (engine/moe.py Experts.grouped) on these tensors."""
    from ollm_triton.engine.config import ModelConfig
    from ollm_triton.engine.moe import Experts

    cfg = ModelConfig(model_type="bench", vocab_size=1, hidden_size=s["h"], intermediate_size=1, num_layers=1,
                      num_heads=1, num_kv_heads=1, head_dim=1, num_experts=s["e"], num_experts_per_tok=s["k"],
                      moe_intermediate_size=s["i"], expert_bias=s["bias"], expert_act=s["act"],
                      expert_layout=s["layout"])
    with torch.device("meta"):
        experts = Experts(cfg)
    experts.gate_up_proj, experts.down_proj = torch.nn.Parameter(w_gu), torch.nn.Parameter(w_d)
    if s["bias"]:
        experts.gate_up_proj_bias, experts.down_proj_bias = torch.nn.Parameter(b_gu), torch.nn.Parameter(b_d)
    return lambda: experts.grouped(x, w, ex)


def transformers_experts(w_gu, w_d, b_gu, b_d, s):
    """transformers' own experts module for this model, one per experts implementation it offers: name -> module."""
    import transformers

    out = {}
    for impl in ("eager", "grouped_mm", "batched_mm"):
        try:
            if s["layout"] == "concat":
                cfg = transformers.Qwen3MoeConfig(hidden_size=s["h"], moe_intermediate_size=s["i"],
                                                  num_experts=s["e"], num_experts_per_tok=s["k"])
                from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts as Cls
            else:
                cfg = transformers.GptOssConfig(hidden_size=s["h"], intermediate_size=s["i"],
                                                num_local_experts=s["e"], num_experts_per_tok=s["k"])
                from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts as Cls
            cfg._experts_implementation_internal = impl
            got = getattr(cfg, "_experts_implementation", None)  # what the module will dispatch on
            if got != impl and not (impl == "eager" and got is None):  # else a row would be mislabelled
                raise ValueError(f"this transformers reads _experts_implementation={got!r}, not {impl!r}")
            with torch.device("meta"):
                mod = Cls(cfg)
            mod.config = cfg
            mod.gate_up_proj, mod.down_proj = torch.nn.Parameter(w_gu), torch.nn.Parameter(w_d)
            if s["bias"]:
                mod.gate_up_proj_bias, mod.down_proj_bias = torch.nn.Parameter(b_gu), torch.nn.Parameter(b_d)
            out[f"transformers {impl}"] = mod
        except Exception as exc:  # an implementation this transformers version lacks is reported, not fatal
            out[f"transformers {impl}"] = f"unavailable: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
    return out


# ---- section "experts" --------------------------------------------------------------------------------------------


def expert_rows(args, shapes: dict, bw: float) -> list[dict]:
    rows = []
    for model in args.model:
        s = shapes[model]
        w_gu, w_d, b_gu, b_d = make_layer(s)
        hf = transformers_experts(w_gu, w_d, b_gu, b_d, s)
        elt = w_gu.element_size()
        per_expert = (w_gu[0].numel() + w_d[0].numel() + (b_gu[0].numel() + b_d[0].numel() if s["bias"] else 0)) * elt
        mx = mx_per_expert = None
        if s["layout"] == "interleaved_t":  # gpt-oss: its rows along K, as the checkpoints store them
            mx = tuple(quantize_mxfp4(t.transpose(1, 2)) for t in (w_gu, w_d))
            mx_per_expert = sum(m.blocks[0].numel() + m.scales[0].numel() for m in mx) + (
                (b_gu[0].numel() + b_d[0].numel()) * elt if s["bias"] else 0)
        for n in args.tokens:
            x = torch.randn(n, s["h"], device=DEV, generator=torch.Generator(device=DEV).manual_seed(n)).to(DT)
            w, ex = route(n, s)
            read = ex.unique().numel() * per_expert
            floors = dict(floor_ms_routed=read / bw * 1e3, floor_ms_all_experts=s["e"] * per_expert / bw * 1e3)
            ref = moe_experts_torch(x.float(), w.float(), ex, w_gu.float(), w_d.float(),
                                    None if b_gu is None else b_gu.float(), None if b_d is None else b_d.float(),
                                    layout=s["layout"], act=s["act"])
            if mx is not None:
                mx_ref = moe_experts_torch(x.float(), w.float(), ex, *mx, None if b_gu is None else b_gu.float(),
                                           None if b_d is None else b_d.float(), layout=s["layout"], act=s["act"])
            args_ = (x, w, ex, w_gu, w_d, b_gu, b_d)
            kw = dict(layout=s["layout"], act=s["act"])
            paths = {
                "ours: triton grouped": partial(moe_experts_kernel, *args_, **kw),
                "naive per-expert loop (routed only)": partial(moe_experts_torch, *args_, **kw),
                "engine eager grouped": grouped_eager(*args_, s),
            }
            if args.sweep:
                for bm, bn, bk, warps, stages in SWEEP[1:]:
                    paths[f"ours: triton bm={bm} bn={bn} bk={bk} w={warps} s={stages}"] = partial(
                        moe_experts_kernel, *args_, **kw, block_m=bm, block_n=bn, block_k=bk, num_warps=warps,
                        num_stages=stages)
            for name, mod in hf.items():
                if isinstance(mod, str):
                    rows.append(dict(model=model, tokens=n, path=name, note=mod))
                    continue
                paths[name] = partial(mod, x, ex, w)
            own = {}  # path -> (its reference, the bytes it reads) where they are not the bf16 layer's
            if mx is not None:  # gpt-oss checkpoints store MXFP4: the same layer quantized, read as bytes
                mx_paths = {  # name -> the kernel's options beside the layer's
                    "ours: triton grouped, MXFP4 weights read directly": {},
                    "ours: MXFP4 through tl.dot_scaled": dict(mx_dot_scaled=True),
                    "ours: MXFP4 through tl.dot_scaled, BLOCK_N 32": dict(mx_dot_scaled=True, block_n=32),
                    "ours: triton grouped, MXFP4, weights as the left operand": dict(mx_swap=True),
                }
                for bm, bn, bk, warps, stages in SWEEP[1:] if args.sweep else ():
                    mx_paths[f"ours: MXFP4 bm={bm} bn={bn} bk={bk} w={warps} s={stages}"] = dict(
                        block_m=bm, block_n=bn, block_k=bk, num_warps=warps, num_stages=stages, mx_swap=False)
                for name, opts in mx_paths.items():
                    paths[name] = partial(moe_experts_kernel, x, w, ex, *mx, b_gu, b_d, **kw, **opts)
                    own[name] = (mx_ref, ex.unique().numel() * mx_per_expert)
            for name, fn in paths.items():
                ref_, read_ = own.get(name, (ref, read))
                row = dict(model=model, tokens=n, path=name, expert_bytes=read_, **floors)
                try:
                    with torch.inference_mode():
                        row["rel_rms_vs_fp32"] = rel_rms(fn(), ref_)
                        row["ms"] = timed(fn)
                        if name.startswith("ours") and DEV.type == "cuda":
                            row["ms_cudagraph"] = timed(fn, graph=True)
                    best = min(row["ms"], row.get("ms_cudagraph", row["ms"]))
                    row["GB/s"] = read_ / (best / 1e3) / 1e9
                    row["of_copy_bw"] = read_ / (best / 1e3) / bw
                    row["ok"] = row["rel_rms_vs_fp32"] < 2e-2
                except Exception as exc:  # one failing path is a row, not the end of the run
                    row["note"] = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
                    traceback.print_exc()
                rows.append(row)
                print("ROW", json.dumps(row), flush=True)
        del w_gu, w_d, b_gu, b_d, hf
    return rows


# ---- section "step" -----------------------------------------------------------------------------------------------


def preset_arch(model: str, args) -> dict:
    """The model preset's arch (conf/model/<model>.yaml), or its tiny stand-in with --small."""
    if args.small:
        return copy.deepcopy(SMALL_ARCHS[model])
    arch = yaml.safe_load((ROOT / "ollm_triton" / "conf" / "model" / f"{model}.yaml").read_text())["arch"]
    if args.layers:  # a layer-reduced model: the per-layer rows scale, the LM head does not
        arch["num_hidden_layers"] = args.layers
        if "layer_types" in arch:
            arch["layer_types"] = arch["layer_types"][: args.layers]
    return arch


def active_bytes(engine) -> int:
    """Bytes one decode token reads: every parameter but the embedding table, the stacked experts at k / E."""
    cfg = engine.config
    total = 0
    for name, p in engine.model.named_parameters():
        if "embed_tokens" in name:
            continue
        share = cfg.num_experts_per_tok / cfg.num_experts if ".experts." in name else 1.0
        total += p.numel() * p.element_size() * share
    return int(total)


def per_call(fn, reps: int) -> tuple[float, float]:
    """(wall ms, host ms) per call over `reps` calls: host = until the calls returned (launches, Python), wall =
    until the device finished them."""
    sync()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    t1 = time.perf_counter()
    sync()
    t2 = time.perf_counter()
    return (t2 - t0) / reps * 1e3, (t1 - t0) / reps * 1e3


def first_step_logits(decoder, ids) -> torch.Tensor:
    """The logits of the first decode step (after the prompt) through a FastDecoder: [1, V] float32."""
    seen = []

    def pick(logits):
        seen.append(logits.float().clone())
        return logits.argmax(-1)

    decoder.generate(ids, 2, pick)
    return seen[1]


def eager_first_steps(engine, ids, token: torch.Tensor | None = None):
    """Through the eager engine: (the prefill's last logits [1, V], the token fed next [1]: their argmax unless
    given, the first decode step's logits [1, V])."""
    cache = engine.new_cache(batch=1, max_len=ids.shape[1] + 2)
    prefill = engine.forward(ids, cache, last_only=True)[:, -1]
    token = prefill.argmax(-1) if token is None else token
    return prefill, token, engine.forward(token[:, None], cache)[:, -1]


def eager_first_step_logits(engine, ids) -> torch.Tensor:
    return eager_first_steps(engine, ids)[2]


def decoder_ms(decoder, ids, new: int) -> tuple[float, torch.Tensor]:
    """The runner's way of counting a decoder: (decode ms a target forward over the second of two generations of
    `new` tokens, the first one warm-up and capture; its first decode step's logits [1, V])."""
    got = first_step_logits(decoder, ids)
    c = [decoder.generate(ids, new) for _ in range(2)][-1].counters
    return c["decode_s"] / max(c["target_forwards"] - 1, 1) * 1e3, got


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def step_rows(args, bw: float) -> tuple[list[dict], dict]:
    from ollm_triton.engine import load_engine
    from ollm_triton.engine.fast_decode import FastDecoder

    dtype = torch.float32 if args.small else DT
    prompt, new, reps = (24, 6, 2) if args.small else (512, 64, 20)
    arch = preset_arch("gpt_oss_20b", args)
    t0 = time.perf_counter()
    engine = load_engine(arch, device=DEV, dtype=dtype, seed=0,
                         fast_decode="auto" if DEV.type == "cuda" else "piecewise")
    info = dict(layers=engine.config.num_layers, load_s=time.perf_counter() - t0, fast_path=str(engine.fast_path),
                prompt=prompt, new_tokens=new, reps=reps, active_bytes=active_bytes(engine))
    floor_ms = info["active_bytes"] / bw * 1e3
    info["floor_ms"] = floor_ms
    layers = engine.model.model.layers
    n_layers = len(layers)
    ids = torch.randint(0, arch["vocab_size"], (1, prompt), generator=torch.Generator().manual_seed(0)).to(DEV)
    rows: list[dict] = []

    def row(name, ms, **kw):
        r = dict(row=name, ms=ms, tok_s=1e3 / ms if ms else None, of_floor=floor_ms / ms if ms else None, **kw)
        rows.append(r)
        print("STEP", json.dumps(r), flush=True)

    def guarded(name, fn):
        try:
            fn()
        except Exception as exc:  # one failing row is reported, the others still run
            traceback.print_exc()
            rows.append(dict(row=name, note=f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}"))

    def decode_row(name, decoder, ref):
        """The runner's way of counting a decoder: its first step's logits against `ref`, then two generations (the
        second warm), decode ms a target forward."""
        ms, got = decoder_ms(decoder, ids, new)
        row(name, ms, logits_rel_l2_vs_eager=rel_l2(got, ref))

    fd = engine.fast_decoder()
    with torch.inference_mode():
        # 1. the runner's path: FastDecoder.generate (prefill, capture once, then the decode timer); the second run
        # is warm
        ref = eager_first_step_logits(engine, ids)
        decode_row(f"runner's path: {fd.mode} step (decode tok/s as the runner counts it)", fd, ref)

        def other_path():  # the whole step with windows and sinks (issue 18) beside the piecewise one, both ways
            other = FastDecoder(engine, capture=DEV.type == "cuda", use_kernels=fd.kernels, piecewise=not fd.piecewise)
            decode_row(f"the other path: {other.mode} step", other, ref)
            other.close()

        guarded("the other path", other_path)
        bk = next(iter(fd.buckets.values()))

        # 2. the step replayed, then taken apart on the same bucket (after the decode above: the cache holds
        # prompt + new tokens, well inside the bucket's capacity; each row below advances it by `reps` at most)
        wall, host = per_call(lambda: fd.replay(bk), reps)
        row("one step replayed", wall, host_ms=host)
        if bk.io is not None:  # piecewise
            if bk.graphs is not None:
                wall, host = per_call(lambda: [g.replay() for g in bk.graphs], reps)
                row(f"captured segments alone ({len(bk.graphs)} graphs; no attention between)", wall, host_ms=host)
            else:
                wall, host = per_call(lambda: fd.step(bk, cut=lambda i: None), reps)
                row("segments alone, uncaptured (no attention between)", wall, host_ms=host)
            attend_all = lambda: [fd.attend(bk, i) for i in range(n_layers)]  # noqa: E731
            wall, host = per_call(attend_all, reps)
            row(f"eager attention calls alone ({n_layers}, sdpa with windows and sinks)", wall, host_ms=host)

            def attention_graph():
                from ollm_triton.engine.graphs import capture

                held = [layer.length for layer in bk.cache.layers]
                graph = capture(attend_all, DEV)  # warm-up on a side stream, then one recorded call
                for layer, n in zip(bk.cache.layers, held, strict=True):  # those calls appended 3 tokens a layer
                    layer.truncate(n)
                wall, host = per_call(graph.replay, reps)
                row("the same attention calls captured as one graph (their device time)", wall, host_ms=host)

            if DEV.type == "cuda":
                guarded("attention calls as one graph", attention_graph)

        # 3. the expert kernels of every layer alone, and the naive routed-only loop, at N = 1 with each layer's own
        # router on a random hidden state
        x = torch.randn(1, engine.config.hidden_size, device=DEV, dtype=dtype,
                        generator=torch.Generator(device=DEV).manual_seed(3))
        routed = []
        for layer in layers:
            router = getattr(layer.mlp, layer.mlp.router_name)
            routed.append(router(x))

        def experts(path):
            return [getattr(layer.mlp.experts, path)(x, w, ex) for layer, (w, ex) in zip(layers, routed, strict=True)]

        e0 = layers[0].mlp.experts
        want = moe_experts_torch(x.float(), routed[0][0].float(), routed[0][1], *(
            None if t is None else t.float() for t in e0._tensors()), **e0._options())
        err = rel_rms(experts("kernel")[0], want)
        graph = " (one graph)" if DEV.type == "cuda" else ""
        row(f"expert kernels alone, {n_layers} layers{graph}", timed(lambda: experts("kernel"), graph=True),
            rel_rms_vs_fp32=err)
        row(f"naive routed-only expert loop, {n_layers} layers (eager)", timed(lambda: experts("naive")))

        # 4. the projection: the whole step captured, every layer's window and sinks off (plain causal attention)
        def whole_step():
            saved = [(layer.self_attn.window, layer.self_attn.sinks) for layer in layers]
            try:
                for layer in layers:
                    layer.self_attn.window, layer.self_attn.sinks = 0, None
                whole = FastDecoder(engine, capture=DEV.type == "cuda", use_kernels=fd.kernels)
                decode_row(f"PROJECTION: whole {whole.mode} step, windows and sinks off (not gpt-oss's attention)",
                           whole, eager_first_step_logits(engine, ids))
                whole.close()
            finally:
                for layer, (window, sinks) in zip(layers, saved, strict=True):
                    layer.self_attn.window, layer.self_attn.sinks = window, sinks

        guarded("whole step projection", whole_step)
    row(f"floor: {info['active_bytes'] / 1e9:.2f} GB a token at the copy bandwidth", floor_ms)
    fd.close()
    engine.close()
    return rows, info


# ---- section "transformers" ---------------------------------------------------------------------------------------


def fast_path_bench():
    """scripts/bench_fast_path.py as a module: its transformers `generate` timer (hf_generate), so that this table and
    the dense engine study count transformers' decode tok/s the same way."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_fast_path", ROOT / "scripts" / "bench_fast_path.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def hf_from_engine(engine, arch: dict):
    """transformers' own class for `arch` (GptOssForCausalLM, Qwen3MoeForCausalLM), built on the meta device with
    the engine's tensors assigned: one copy of the weights serves both (in bf16 gpt-oss is ~42 GB and Qwen3-MoE
    ~61 GB; an 80 GB H100 holds one copy, not two). The engine's parameter names are transformers 5's, so its state
    dict fills the model as it is; a tensor missing or left over is an error. Attention and experts run as the
    class's defaults (the row names them)."""
    import transformers

    cfg = transformers.AutoConfig.for_model(**arch)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=engine.dtype)
    missing, unexpected = model.load_state_dict(engine.model.state_dict(), strict=False, assign=True)
    if missing or unexpected:
        raise RuntimeError(f"the engine's state dict does not fill {type(model).__name__}: missing {missing[:4]}, "
                           f"unexpected {unexpected[:4]}")
    with torch.device(engine.device):  # the rotary buffers are not in the state dict: built where they are used
        model.model.rotary_emb = type(model.model.rotary_emb)(model.config)
    return model.eval()


def hf_first_steps(model, ids, token):
    """transformers' (prefill's last logits [1, V], first decode step's logits [1, V] after `token` [1])."""
    out = model(ids, use_cache=True, logits_to_keep=1)
    step = model(token[:, None], past_key_values=out.past_key_values, use_cache=True)
    return out.logits[:, -1], step.logits[:, -1]


def hf_lengths(args) -> tuple[int, int, int]:
    """(prompt, new tokens, timed repeats) of the transformers section."""
    return (24, 6, 1) if args.small else (args.prompt, args.new, args.repeats)


def hf_prompt(arch: dict, prompt: int) -> torch.Tensor:
    return torch.randint(0, arch["vocab_size"], (1, prompt), generator=torch.Generator().manual_seed(0)).to(DEV)


def peak_gb() -> float | None:
    return torch.cuda.max_memory_allocated() / 1e9 if DEV.type == "cuda" else None


def hf_model_rows(model: str, args, rows: list[dict]) -> list[int]:
    """One model: the engine's runner path, then transformers `generate` (eager, dynamic cache) on the same tensors,
    appended to `rows` as they finish. Returns transformers' generated tokens (the compiled run is compared with
    them; empty when transformers did not run)."""
    from ollm_triton.engine import load_engine

    prompt, new, repeats = hf_lengths(args)
    arch = preset_arch(model, args)
    t0 = time.perf_counter()
    engine = load_engine(arch, device=DEV, dtype=torch.float32 if args.small else DT, seed=0,
                         fast_decode="auto" if DEV.type == "cuda" else "piecewise")
    base = dict(model=model, layers=engine.config.num_layers, prompt=prompt, new_tokens=new,
                load_s=time.perf_counter() - t0)
    ids = hf_prompt(arch, prompt)
    tokens: list[int] = []

    def add(row: dict) -> None:
        rows.append(row)
        print("HF", json.dumps(row), flush=True)

    try:
        with torch.inference_mode():
            # the reference of both checks: the eager engine's prefill, the token it picks, and the step after it
            pre_ref, token, step_ref = eager_first_steps(engine, ids)
            fd = engine.fast_decoder()
            if DEV.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            ms, got = decoder_ms(fd, ids, new)
            add(dict(base, path=f"engine: the runner's path ({fd.mode} step)", ms=ms, tok_s=1e3 / ms, peak_gb=peak_gb(),
                     step_rel_l2=rel_l2(got, step_ref), note=str(engine.fast_path)))
            fd.close()
            path = "transformers generate, eager, dynamic cache"
            try:
                hf = hf_from_engine(engine, arch)
                pre, step = hf_first_steps(hf, ids, token)
                res, out = fast_path_bench().hf_generate(hf, ids, new, repeats)
                tokens = out[0].tolist()
                impl = (f"attention {hf.config._attn_implementation}, experts "
                        f"{getattr(hf.config, '_experts_implementation', None) or 'eager'}")
                del hf
                add(dict(base, path=path, ms=1e3 / res["decode_tok_s"], tok_s=res["decode_tok_s"],
                         peak_gb=res["peak_gb"] if DEV.type == "cuda" else None, prefill_rel_l2=rel_l2(pre, pre_ref),
                         step_rel_l2=rel_l2(step, step_ref), note=impl))
            except Exception as exc:  # transformers failing (out of memory, a missing tensor) is its row
                traceback.print_exc()
                add(dict(base, path=path, note=f"failed: {type(exc).__name__}: "
                                               f"{(str(exc).splitlines() or [''])[0][:160]}"))
    finally:
        engine.close()
        del engine
    return tokens


def compile_worker(args) -> None:
    """In its own process (torch.compile can take minutes or fail): the same seeded weights rebuilt, transformers
    `generate` with a static cache and its auto-compile (torch.compile mode reduce-overhead; on the CPU the eager
    backend, which checks the plumbing only). Writes {ok, decode_tok_s, ..., tokens, compiled} to --worker-out."""
    from ollm_triton.engine import load_engine

    try:
        from transformers.generation import CompileConfig

        model, (prompt, new, repeats) = args.model[0], hf_lengths(args)
        arch = preset_arch(model, args)
        engine = load_engine(arch, device=DEV, dtype=torch.float32 if args.small else DT, seed=0, fast_decode="off")
        hf = hf_from_engine(engine, arch)
        config = CompileConfig(fullgraph=False, mode="reduce-overhead") if DEV.type == "cuda" else \
            CompileConfig(backend="eager")
        if DEV.type != "cuda":  # transformers compiles on CUDA only unless told otherwise
            config._compile_all_devices = True
        hf.generation_config.compile_config = config
        # the warm-up has the timed runs' length: a static cache of another length would compile again
        res, tokens = fast_path_bench().hf_generate(hf, hf_prompt(arch, prompt), new, repeats, warm_new=new,
                                                    cache_implementation="static")
        # transformers falls back to the uncompiled call when its criteria fail: say which ran
        out = {"ok": True, **res, "tokens": tokens[0].tolist(), "compiled": hasattr(hf, "_compiled_call"),
               "backend": config.backend, "mode": config.mode}
    except Exception as exc:  # reported in the parent's row, never hidden
        out = {"ok": False, "error": f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:200]}",
               "trace": traceback.format_exc()[-1500:]}
    Path(args.worker_out).write_text(json.dumps(out))


def compile_row(model: str, args, eager_tokens: list[int]) -> dict:
    """Runs compile_worker for `model` within --compile-timeout seconds: its row (or why there is none)."""
    import subprocess

    prompt, new, _ = hf_lengths(args)
    out = Path(args.out).with_suffix(f".{model}.compile.json")
    cmd = [sys.executable, __file__, "--compile-worker", "--worker-out", str(out), "--model", model,
           "--prompt", str(args.prompt), "--new", str(args.new), "--repeats", str(args.repeats)]
    cmd += ["--small"] if args.small else []
    cmd += ["--layers", str(args.layers)] if args.layers else []
    row = dict(model=model, path="transformers generate, static cache + torch.compile", prompt=prompt, new_tokens=new)
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.compile_timeout)
    except subprocess.TimeoutExpired:
        return dict(row, note=f"not measured: over the {args.compile_timeout:.0f} s time box (rebuild + compile + "
                              "warm-up + runs)")
    row["wall_s"] = time.perf_counter() - t0
    if not out.is_file():
        tail = (proc.stderr or proc.stdout or "").strip().splitlines()[-3:]
        return dict(row, note=f"failed: worker exited {proc.returncode} without a result: {' | '.join(tail)[:200]}")
    res = json.loads(out.read_text())
    out.unlink()
    if not res["ok"]:
        return dict(row, note=f"failed: {res['error']}")
    same = next((i for i, (a, b) in enumerate(zip(res["tokens"], eager_tokens, strict=False)) if a != b),
                min(len(res["tokens"]), len(eager_tokens)))
    note = (f"{res['backend']}, {res['mode']}; compile + warm-up {res['warmup_s']:.0f} s; first {same} of "
            f"{len(eager_tokens)} tokens as transformers eager")
    if not res["compiled"]:
        note = f"NOT COMPILED (transformers fell back to its eager call); {note}"
    return dict(row, ms=1e3 / res["decode_tok_s"], tok_s=res["decode_tok_s"],
                peak_gb=res["peak_gb"] if DEV.type == "cuda" else None, note=note)


def hf_rows(args) -> list[dict]:
    """Section "transformers": each model's engine beside transformers' own implementation, one model at a time
    (the first model's tensors are freed before the next is built, and before the compile worker rebuilds them)."""
    rows: list[dict] = []
    for model in args.model:
        tokens: list[int] = []
        try:
            tokens = hf_model_rows(model, args, rows)
        except Exception as exc:  # one model failing is a row, not the end of the run
            traceback.print_exc()
            rows.append(dict(model=model, path="engine and transformers eager",
                             note=f"failed: {type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:160]}"))
        gc.collect()
        if DEV.type == "cuda":
            torch.cuda.empty_cache()
        if not args.no_compile:
            rows.append(compile_row(model, args, tokens))
            print("HF", json.dumps(rows[-1]), flush=True)
    return rows


# ---- main ---------------------------------------------------------------------------------------------------------


def main() -> None:
    global DT
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "bench_moe.json"))
    ap.add_argument("--tokens", type=int, nargs="+", default=None, help="default 1 16 512 (1 5 with --small)")
    ap.add_argument("--model", choices=sorted(SHAPES), nargs="+", default=["qwen3_moe_30b", "gpt_oss_20b"])
    ap.add_argument("--sweep", action="store_true", help="also time our kernels at other tile sizes (SWEEP)")
    ap.add_argument("--no-step", action="store_true", help="skip the gpt-oss-20b decode step section")
    ap.add_argument("--no-experts", action="store_true", help="skip the expert-kernel section")
    ap.add_argument("--transformers", action="store_true",
                    help="add the transformers section: each --model's engine beside transformers' own generate")
    ap.add_argument("--prompt", type=int, default=512, help="transformers section: prompt tokens (24 with --small)")
    ap.add_argument("--new", type=int, default=64, help="transformers section: new tokens (6 with --small)")
    ap.add_argument("--repeats", type=int, default=2, help="transformers section: timed generations (median)")
    ap.add_argument("--no-compile", action="store_true",
                    help="transformers section: skip the static cache + torch.compile subprocess")
    ap.add_argument("--compile-timeout", type=float, default=100.0,
                    help="transformers section: seconds for the compile subprocess (rebuild, compile, runs)")
    ap.add_argument("--layers", type=int, default=0,
                    help="step and transformers sections: a layer-reduced model (0 = the preset's depth)")
    ap.add_argument("--small", action="store_true", help="tiny shapes on the CPU (interpreter): the plumbing only")
    ap.add_argument("--compile-worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if DEV.type != "cuda" and not args.small:
        sys.exit("bench_moe.py needs a CUDA device (or --small: tiny shapes on the CPU, the plumbing only)")
    if args.small:
        DT = torch.float32  # the interpreter multiplies bf16 bit patterns in tl.dot
    if args.compile_worker:
        compile_worker(args)
        return
    args.tokens = args.tokens or ([1, 5] if args.small else [1, 16, 512])
    t_start = time.perf_counter()
    env = environment(DEV)
    bw = copy_bandwidth()
    shapes = SMALL_SHAPES if args.small else SHAPES
    payload = {"env": env, "copy_bandwidth_GBps": bw / 1e9, "shapes": shapes, "small": args.small,
               "command": " ".join(sys.argv), "rows": [], "step_rows": [], "step": None, "hf_rows": [],
               "seconds": {}}
    if not args.no_experts:
        payload["rows"] = expert_rows(args, shapes, bw)
        payload["seconds"]["experts"] = time.perf_counter() - t_start
    if DEV.type == "cuda":
        torch.cuda.empty_cache()
    if args.transformers:  # before the step section: its engine is closed, so each model here has the whole device
        t0 = time.perf_counter()
        payload["hf_rows"] = hf_rows(args)
        payload["seconds"]["transformers"] = time.perf_counter() - t0
    if not args.no_step:
        t0 = time.perf_counter()
        try:
            payload["step_rows"], payload["step"] = step_rows(args, bw)
        except Exception as exc:  # recorded, and the expert table still printed
            traceback.print_exc()
            payload["step"] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"}
        payload["seconds"]["step"] = time.perf_counter() - t0
    payload["seconds"]["total"] = time.perf_counter() - t_start
    Path(args.out).write_text(json.dumps(payload, indent=1, default=str))
    print(table(payload))


def _f(v, fmt) -> str:
    return "" if v is None else format(v, fmt)


def table(p: dict) -> str:
    env = p["env"]
    small = " (--small: tiny fp32 shapes, CPU: plumbing only)" if p["small"] else ""
    head = (f"{env.get('device_name')}, torch {env.get('torch')}, triton {env.get('triton')}, transformers "
            f"{env.get('transformers')}, git {env.get('git_sha')}, {env.get('date')}; copy bandwidth "
            f"{p['copy_bandwidth_GBps']:.0f} GB/s{small}")
    out = [f"MoE experts, {'fp32' if p['small'] else 'bf16'} - {head}", "",
           "| model | tokens | path | ms | ms (graph) | expert GB/s | of copy bw | floor ms (routed / every expert) "
           "| rel RMS vs fp32 | ok |",
           "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"] if p["rows"] else []
    for r in p["rows"]:
        if "ms" not in r:
            out.append(f"| {r['model']} | {r['tokens']} | {r['path']} | | | | | | | {r.get('note', '')} |")
            continue
        graph = f"{r['ms_cudagraph']:.4f}" if "ms_cudagraph" in r else ""
        out.append(f"| {r['model']} | {r['tokens']} | {r['path']} | {r['ms']:.4f} | {graph} | {r['GB/s']:.0f} | "
                   f"{r['of_copy_bw']:.0%} | {r['floor_ms_routed']:.4f} / {r['floor_ms_all_experts']:.4f} | "
                   f"{r['rel_rms_vs_fp32']:.1e} | {'yes' if r['ok'] else 'NO'} |")
    step = p.get("step")
    if step:
        out += ["", f"gpt-oss-20b batch-1 decode step, taken apart - {head}"]
        if "error" in step:
            out.append(f"failed: {step['error']}")
        else:
            out += [f"{step['layers']} layers, fast path: {step['fast_path']}; prompt {step['prompt']}, "
                    f"{step['new_tokens']} new tokens; rows below the first: ms a call over {step['reps']} calls", "",
                    "| row | ms | host ms | tok/s | of floor | check |", "| --- | ---: | ---: | ---: | ---: | --- |"]
            for r in p["step_rows"]:
                if "ms" not in r:
                    out.append(f"| {r['row']} | | | | | {r.get('note', '')} |")
                    continue
                check = (f"logits rel L2 vs eager {r['logits_rel_l2_vs_eager']:.1e}" if "logits_rel_l2_vs_eager" in r
                         else f"rel RMS vs fp32 {r['rel_rms_vs_fp32']:.1e}" if "rel_rms_vs_fp32" in r else "")
                out.append(f"| {r['row']} | {r['ms']:.3f} | {_f(r.get('host_ms'), '.3f')} | {_f(r['tok_s'], '.1f')} | "
                           f"{_f(r['of_floor'], '.0%')} | {check} |")
    out += hf_table(p, head)
    out.append("")
    out.append("seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in p["seconds"].items()))
    return "\n".join(out)



def hf_table(p: dict, head: str) -> list[str]:
    """The transformers section: decode tok/s of each path, the engine's over each, first-step logits checks."""
    if not p.get("hf_rows"):
        return []
    engine = {r["model"]: r["tok_s"] for r in p["hf_rows"] if r["path"].startswith("engine") and "tok_s" in r}
    out = ["", f"The engine beside transformers, batch 1, same weights, {'fp32' if p['small'] else 'bf16'} - {head}",
           "", "| model | layers | path | prompt + new | decode tok/s | ms/token | engine x | peak GB | "
           "prefill logits rel L2 | step logits rel L2 | note |",
           "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in p["hf_rows"]:
        tok_s = r.get("tok_s")
        times = engine.get(r["model"]) / tok_s if tok_s and engine.get(r["model"]) else None
        out.append(f"| {r['model']} | {r.get('layers', '')} | {r['path']} | {r.get('prompt', '')} + "
                   f"{r.get('new_tokens', '')} | {_f(tok_s, '.1f')} | {_f(r.get('ms'), '.2f')} | {_f(times, '.2f')} | "
                   f"{_f(r.get('peak_gb'), '.1f')} | {_f(r.get('prefill_rel_l2'), '.1e')} | "
                   f"{_f(r.get('step_rel_l2'), '.1e')} | {r.get('note', '')} |")
    out += ["", "Logits rel L2: against the eager engine's on the same prompt and the same fed token (the engine's "
            "runner path: its first decode step; transformers: its prefill and first decode step)."]
    return out


if __name__ == "__main__":
    main()
