"""Qwen3-Next-80B-A3B shapes on the GPU, layer-reduced: decode tok/s and prefill time with flash-linear-attention's
gated-delta kernels against the PyTorch reference (kernels/gated_delta.py), correctness in the same run.

    python scripts/bench_qwen3_next.py [--layers 4 8] [--prompt 512] [--decode 64] [--prefill 4096]
                                       [--out bench_qwen3_next.json]

The model is model=qwen3_next_80b's config (hidden 2048, 512 experts of 512, 10 routed + a shared one, 16 q / 2 kv
heads of 256 with the output gate and RoPE on a quarter of each head, Gated DeltaNet with 16 key / 32 value heads of
128) with `num_hidden_layers` cut to L (a multiple of 4, so the 3:1 ratio of linear to full attention layers is the
real one): random bf16 weights drawn on the GPU, the engine's eager decode (its static CUDA-graph step refuses a
model with recurrent state), batch 1. The full 48-layer model (~160 GB in bf16) fits no single device here; what
scales with depth is the per-layer cost, so the script runs two depths and reports (t(L2) - t(L1)) / (L2 - L1) per
layer and t(L1) + (48 - L1) x that per layer as the 48-layer extrapolation (the embedding and LM head counted once).

Correctness, in the same process, before anything is timed:
- kernel: `gated_delta` through fla against the float64 chunked reference at the model's head shapes (T = 1 with a
  random state, and T = --prefill from zero), relative RMS error of outputs and final states;
- model: the same engine with fla and with the reference path on one prompt + 16 teacher-forced decode steps:
  relative RMS error between their logits and how often their argmax agrees.
Timing: decode = wall time of --decode greedy steps after 8 warm-up steps (device-synchronised); prefill = one
--prefill-token prompt on an empty cache, median of 3 after a warm-up. Writes JSON (device, versions, git sha, date,
command) and prints a GitHub table last.
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
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ollm_triton.engine import load_engine  # noqa: E402
from ollm_triton.engine.linear_attention import GatedDeltaNet  # noqa: E402
from ollm_triton.kernels.gated_delta import fla_available, gated_delta, gated_delta_chunked  # noqa: E402
from ollm_triton.results import environment  # noqa: E402

FULL_LAYERS = 48
PRESET = ROOT / "ollm_triton/conf/model/qwen3_next_80b.yaml"


def rel_rms(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt().clamp_min(1e-30)).item()


DEVICE = torch.device("cuda")
TINY = dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
            linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=16,
            num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=32,
            vocab_size=512)  # --tiny: the script's plumbing on the CPU (tests/test_models_qwen3_next.py)


def sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def kernel_check(arch: dict, t: int, with_state: bool) -> dict:
    """fla's gated_delta vs the float64 chunked reference at the model's linear-attention head shapes, bf16."""
    hk, hv = arch["linear_num_key_heads"], arch["linear_num_value_heads"]
    dk, dv = arch["linear_key_head_dim"], arch["linear_value_head_dim"]
    g = torch.Generator(device="cuda").manual_seed(0)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, device="cuda")

    q, k, v = rnd(1, t, hk, dk).bfloat16(), rnd(1, t, hk, dk).bfloat16(), rnd(1, t, hv, dv).bfloat16()
    decay = -torch.rand(1, t, hv, generator=g, device="cuda") * 0.5  # e^-0.5..1 per token
    beta = torch.rand(1, t, hv, generator=g, device="cuda").bfloat16()
    s0 = rnd(1, hv, dk, dv) * 0.1 if with_state else None
    o, s = gated_delta(q, k, v, decay, beta, s0, use_fla=True)
    o_ref, s_ref = gated_delta_chunked(q.double(), k.double(), v.double(), decay.double(), beta.double(),
                                       None if s0 is None else s0.double())
    return {"tokens": t, "out_rel_rms": rel_rms(o, o_ref), "state_rel_rms": rel_rms(s, s_ref)}


def mixer_step_ms(arch: dict, use_fla: bool) -> float:
    """One decode step of the gated delta rule alone (T = 1, state carried), all value heads: ms (do_bench)."""
    from triton.testing import do_bench

    hk, hv = arch["linear_num_key_heads"], arch["linear_num_value_heads"]
    dk, dv = arch["linear_key_head_dim"], arch["linear_value_head_dim"]
    q, k = torch.randn(1, 1, hk, dk, device="cuda").bfloat16(), torch.randn(1, 1, hk, dk, device="cuda").bfloat16()
    v = torch.randn(1, 1, hv, dv, device="cuda").bfloat16()
    decay, beta = -torch.rand(1, 1, hv, device="cuda"), torch.rand(1, 1, hv, device="cuda").bfloat16()
    s0 = torch.randn(1, hv, dk, dv, device="cuda") * 0.1
    return do_bench(lambda: gated_delta(q, k, v, decay, beta, s0, use_fla=use_fla))


def teacher_forced_logits(engine, ids: torch.Tensor, prompt: int) -> torch.Tensor:
    cache = engine.new_cache(1, ids.shape[1] + 1)
    out = [engine.forward(ids[:, :prompt], cache, last_only=True)]
    out += [engine.forward(ids[:, i : i + 1], cache) for i in range(prompt, ids.shape[1])]
    return torch.cat(out, dim=1)


def decode_tok_s(engine, prompt_ids: torch.Tensor, steps: int) -> tuple[float, float]:
    """(tok/s over `steps` greedy steps after 8 warm-up steps, peak memory GB)."""
    if DEVICE.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    cache = engine.new_cache(1, prompt_ids.shape[1] + steps + 16)
    token = engine.forward(prompt_ids, cache, last_only=True)[:, -1].argmax(-1)
    for _ in range(8):
        token = engine.forward(token[:, None], cache)[:, -1].argmax(-1)
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        token = engine.forward(token[:, None], cache)[:, -1].argmax(-1)
    sync()
    peak = torch.cuda.max_memory_allocated() / 1e9 if DEVICE.type == "cuda" else 0.0
    return steps / (time.perf_counter() - t0), peak


def prefill_s(engine, ids: torch.Tensor) -> float:
    times = []
    for _ in range(4):  # the first is the warm-up (Triton compiles, allocator grows)
        cache = engine.new_cache(1, ids.shape[1] + 1)
        sync()
        t0 = time.perf_counter()
        engine.forward(ids, cache, last_only=True)
        sync()
        times.append(time.perf_counter() - t0)
        del cache
    return statistics.median(times[1:])


def main() -> None:  # noqa: C901 (one study, top to bottom)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--decode", type=int, default=64)
    ap.add_argument("--prefill", type=int, default=4096)
    ap.add_argument("--out", default="bench_qwen3_next.json")
    ap.add_argument("--tiny", action="store_true",
                    help="a tiny config on the CPU: checks the script, times nothing real")
    args = ap.parse_args()
    global DEVICE
    if args.tiny:
        DEVICE = torch.device("cpu")
    elif not torch.cuda.is_available():
        sys.exit("bench_qwen3_next needs a CUDA device (or --tiny for the CPU plumbing check)")
    if any(n % 4 or n < 4 for n in args.layers):
        sys.exit(f"--layers must be multiples of 4 (3 linear : 1 full attention), got {args.layers}")
    arch = yaml.safe_load(PRESET.read_text())["arch"]
    if args.tiny:
        arch.update(TINY)
    has_fla = fla_available(DEVICE)
    paths = (["fla"] if has_fla else []) + ["reference"]
    env = environment(DEVICE)
    try:
        import fla

        env["fla"] = getattr(fla, "__version__", "installed")
    except ImportError:
        env["fla"] = None
    payload = {"env": env, "args": vars(args), "kernel_checks": [], "mixer_step_ms": {}, "rows": []}

    if has_fla:
        for t, st in ((1, True), (args.prefill, False)):
            try:
                payload["kernel_checks"].append(kernel_check(arch, t, st))
            except Exception as e:
                payload["kernel_checks"].append({"tokens": t, "error": f"{type(e).__name__}: {e}"})
                traceback.print_exc()
            print("CHECK", json.dumps(payload["kernel_checks"][-1]), flush=True)
    for path in paths if DEVICE.type == "cuda" else ():
        payload["mixer_step_ms"][path] = mixer_step_ms(arch, path == "fla")

    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, arch["vocab_size"], (1, args.prompt + 16), generator=gen).to(DEVICE)
    long_ids = torch.randint(0, arch["vocab_size"], (1, args.prefill), generator=gen).to(DEVICE)
    for n in args.layers:
        engine = load_engine({**arch, "num_hidden_layers": n}, device=DEVICE,
                             dtype=torch.float32 if args.tiny else torch.bfloat16, fast_decode="off")
        row = {"layers": n, "linear_layers": engine.config.linear_layers, "fast_path": str(engine.fast_path),
               "params_b": engine.num_parameters() / 1e9}
        logits = {}
        for path in paths:
            GatedDeltaNet.use_fla = path == "fla"
            try:
                with torch.inference_mode():
                    logits[path] = teacher_forced_logits(engine, ids, args.prompt)
                    tok_s, peak = decode_tok_s(engine, ids[:, : args.prompt], args.decode)
                    pre = prefill_s(engine, long_ids)
                row[path] = {"decode_tok_s": tok_s, "ms_per_token": 1e3 / tok_s, "peak_gb": peak,
                             "prefill_s": pre, "prefill_tok_s": args.prefill / pre}
            except Exception as e:
                row[path] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
                traceback.print_exc()
        if "fla" in logits and "reference" in logits:
            a, b = logits["fla"], logits["reference"]
            row["logits_rel_rms_fla_vs_reference"] = rel_rms(a, b)
            row["argmax_agree"] = (a.argmax(-1) == b.argmax(-1)).float().mean().item()
        GatedDeltaNet.use_fla = None
        payload["rows"].append(row)
        print("ROW", json.dumps(row), flush=True)
        engine.close()
        del engine
        if DEVICE.type == "cuda":
            torch.cuda.empty_cache()

    rows = payload["rows"]
    if len(rows) >= 2:
        lo, hi = rows[0], rows[-1]
        for path in paths:
            if "ms_per_token" in lo.get(path, {}) and "ms_per_token" in hi.get(path, {}):
                per_layer = (hi[path]["ms_per_token"] - lo[path]["ms_per_token"]) / (hi["layers"] - lo["layers"])
                full = lo[path]["ms_per_token"] + (FULL_LAYERS - lo["layers"]) * per_layer
                payload.setdefault("scaling", {})[path] = {"ms_per_layer": per_layer, "ms_per_token_48": full,
                                                           "tok_s_48": 1e3 / full}
    Path(args.out).write_text(json.dumps(payload, indent=1, default=str))
    print(table(payload))


def table(p: dict) -> str:
    env = p["env"]
    out = [f"Qwen3-Next-80B-A3B shapes, layer-reduced, bf16, batch 1, eager decode; {env['device_name']}, torch "
           f"{env['torch']}, triton {env['triton']}, fla {env['fla']}, git {env['git_sha']}, {env['date']}", ""]
    for c in p["kernel_checks"]:
        err = c.get("error") or f"out rel RMS {c['out_rel_rms']:.2e}, state {c['state_rel_rms']:.2e}"
        out.append(f"- fla gated_delta vs float64 reference, T={c['tokens']}: {err}")
    for path, ms in p["mixer_step_ms"].items():
        out.append(f"- one decode step of the gated delta rule alone ({path}): {ms * 1e3:.1f} us")
    out += ["", "| layers (linear) | path | decode tok/s | ms/token | prefill tok/s | peak GB | logits rel RMS fla vs "
            "ref | argmax agree |", "|---|---|---|---|---|---|---|---|"]
    for r in p["rows"]:
        for path in ("fla", "reference"):
            if path not in r:
                continue
            m = r[path]
            if "error" in m:
                out.append(f"| {r['layers']} ({r['linear_layers']}) | {path} | {m['error']} | | | | | |")
                continue
            out.append(f"| {r['layers']} ({r['linear_layers']}) | {path} | {m['decode_tok_s']:.1f} | "
                       f"{m['ms_per_token']:.2f} | {m['prefill_tok_s']:.0f} | {m['peak_gb']:.1f} | "
                       f"{r.get('logits_rel_rms_fla_vs_reference', float('nan')):.2e} | "
                       f"{r.get('argmax_agree', float('nan')):.3f} |")
    for path, s in p.get("scaling", {}).items():
        out.append(f"\n{path}: {s['ms_per_layer']:.3f} ms per layer (from the depth difference) -> 48 layers "
                   f"{s['ms_per_token_48']:.1f} ms/token = {s['tok_s_48']:.1f} tok/s if every layer were resident")
    return "\n".join(out)


if __name__ == "__main__":
    main()
