"""The MoE expert MLPs on the GPU: our grouped Triton kernels beside the naive per-expert loop, the engine's eager
grouped path and transformers' own experts module, in one process.

    python scripts/bench_moe.py [--out bench_moe.json] [--tokens 1 16 512] [--model qwen3_moe_30b|gpt_oss_20b]
                                [--sweep]   (our kernels at other tile sizes too)

Shapes: one MoE layer of Qwen3-30B-A3B (hidden 2048, 128 experts of intermediate 768, 8 routed per token) or of
gpt-oss-20b (hidden 2880, 32 experts of 2880, 4 routed, clamped SwiGLU with biases, transposed interleaved layout),
bf16, N tokens (1 = batch-1 decode, 16 = batched decode, 512 = a prefill chunk) routed by a random router (softmax,
top-k, renormalised). Each path's output is checked against the float32 reference on the same bf16 weights (relative
RMS error) before it is timed with triton.testing.do_bench (median, after warm-up); ours also as a CUDA-graph replay
(do_bench_cudagraph: the launch-free number, what the engine's captured decode step sees). The bandwidth column is the
bytes of the experts the tokens chose (each read once) over the time, against the device's copy bandwidth measured
here: a decode step is bound by it. Writes JSON (device, versions, git sha, date, command); prints a GitHub table last.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from functools import partial
from pathlib import Path

import torch
from triton.testing import do_bench, do_bench_cudagraph

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ollm_triton.kernels.moe import moe_experts_kernel, moe_experts_torch  # noqa: E402
from ollm_triton.results import environment  # noqa: E402

SHAPES = {  # hidden, experts, intermediate, top-k, layout, activation, biases
    "qwen3_moe_30b": dict(h=2048, e=128, i=768, k=8, layout="concat", act="silu", bias=False),
    "gpt_oss_20b": dict(h=2880, e=32, i=2880, k=4, layout="interleaved_t", act="clamped_swiglu", bias=True),
}
DT = torch.bfloat16
# (block_m or None = the kernel's choice, block_n, block_k, warps) for --sweep; the first is the default
SWEEP = [(None, 64, 64, 4), (16, 32, 64, 4), (16, 64, 128, 4), (16, 128, 64, 8), (64, 128, 64, 8), (32, 64, 64, 4)]


def rel_rms(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return ((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt().clamp_min(1e-30)).item()


def copy_bandwidth() -> float:
    """Bytes read + written per second by a 2 GB device copy."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    t = do_bench(lambda: dst.copy_(src)) / 1e3
    return 2 * (1 << 30) / t


def make_layer(s: dict, seed: int = 0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    e, h, i = s["e"], s["h"], s["i"]

    def rnd(*shape, std=0.02):
        return (torch.randn(*shape, generator=g, device="cuda") * std).to(DT)

    if s["layout"] == "concat":
        w_gu, w_d = rnd(e, 2 * i, h), rnd(e, h, i)
    else:
        w_gu, w_d = rnd(e, h, 2 * i), rnd(e, i, h)
    b_gu, b_d = (rnd(e, 2 * i), rnd(e, h)) if s["bias"] else (None, None)
    return w_gu, w_d, b_gu, b_d


def route(n: int, s: dict, seed: int = 1):
    g = torch.Generator(device="cuda").manual_seed(seed)
    probs = torch.randn(n, s["e"], generator=g, device="cuda").softmax(-1)
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "bench_moe.json"))
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 16, 512])
    ap.add_argument("--model", choices=sorted(SHAPES), nargs="+", default=["qwen3_moe_30b", "gpt_oss_20b"])
    ap.add_argument("--sweep", action="store_true", help="also time our kernels at other tile sizes (SWEEP)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_moe.py needs a CUDA device")
    env = environment(torch.device("cuda"))
    bw = copy_bandwidth()
    rows = []
    for model in args.model:
        s = SHAPES[model]
        w_gu, w_d, b_gu, b_d = make_layer(s)
        hf = transformers_experts(w_gu, w_d, b_gu, b_d, s)
        per_expert = (w_gu[0].numel() + w_d[0].numel()) * 2 + ((b_gu[0].numel() + b_d[0].numel()) * 2 if s["bias"]
                                                              else 0)
        for n in args.tokens:
            x = (torch.randn(n, s["h"], device="cuda", generator=torch.Generator(device="cuda").manual_seed(n))
                 ).to(DT)
            w, ex = route(n, s)
            read = ex.unique().numel() * per_expert
            ref = moe_experts_torch(x.float(), w.float(), ex, w_gu.float(), w_d.float(),
                                    None if b_gu is None else b_gu.float(), None if b_d is None else b_d.float(),
                                    layout=s["layout"], act=s["act"])
            args_ = (x, w, ex, w_gu, w_d, b_gu, b_d)
            kw = dict(layout=s["layout"], act=s["act"])
            paths = {
                "ours: triton grouped": partial(moe_experts_kernel, *args_, **kw),
                "naive per-expert loop": partial(moe_experts_torch, *args_, **kw),
                "engine eager grouped": grouped_eager(*args_, s),
            }
            if args.sweep:
                for bm, bn, bk, warps in SWEEP[1:]:
                    paths[f"ours: triton bm={bm} bn={bn} bk={bk} w={warps}"] = partial(
                        moe_experts_kernel, *args_, **kw, block_m=bm, block_n=bn, block_k=bk, num_warps=warps)
            for name, mod in hf.items():
                if isinstance(mod, str):
                    rows.append(dict(model=model, tokens=n, path=name, note=mod))
                    continue
                paths[name] = partial(mod, x, ex, w)
            for name, fn in paths.items():
                row = dict(model=model, tokens=n, path=name, expert_bytes=read)
                try:
                    with torch.inference_mode():
                        row["rel_rms_vs_fp32"] = rel_rms(fn(), ref)
                        row["ms"] = do_bench(fn)
                        if name.startswith("ours"):
                            row["ms_cudagraph"] = do_bench_cudagraph(fn)
                    best = min(row["ms"], row.get("ms_cudagraph", row["ms"]))
                    row["GB/s"] = read / (best / 1e3) / 1e9
                    row["of_copy_bw"] = read / (best / 1e3) / bw
                    row["ok"] = row["rel_rms_vs_fp32"] < 2e-2
                except Exception as exc:  # one failing path is a row, not the end of the run
                    row["note"] = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
                    traceback.print_exc()
                rows.append(row)
                print("ROW", json.dumps(row), flush=True)
    payload = {"env": env, "copy_bandwidth_GBps": bw / 1e9, "shapes": SHAPES, "rows": rows,
               "command": " ".join(sys.argv)}
    Path(args.out).write_text(json.dumps(payload, indent=1, default=str))
    print(table(payload))


def table(p: dict) -> str:
    env = p["env"]
    out = [f"MoE experts, bf16 - {env.get('device_name')}, torch {env.get('torch')}, triton {env.get('triton')}, "
           f"transformers {env.get('transformers')}, git {env.get('git_sha')}, {env.get('date')}; copy bandwidth "
           f"{p['copy_bandwidth_GBps']:.0f} GB/s", "",
           "| model | tokens | path | ms | ms (graph) | expert GB/s | of copy bw | rel RMS vs fp32 | ok |",
           "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in p["rows"]:
        if "ms" not in r:
            out.append(f"| {r['model']} | {r['tokens']} | {r['path']} | | | | | | {r.get('note', '')} |")
            continue
        graph = f"{r['ms_cudagraph']:.4f}" if "ms_cudagraph" in r else ""
        out.append(f"| {r['model']} | {r['tokens']} | {r['path']} | {r['ms']:.4f} | {graph} | {r['GB/s']:.0f} | "
                   f"{r['of_copy_bw']:.0%} | {r['rel_rms_vs_fp32']:.1e} | {'yes' if r['ok'] else 'NO'} |")
    return "\n".join(out)


if __name__ == "__main__":
    main()
