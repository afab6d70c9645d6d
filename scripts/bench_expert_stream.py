"""Streaming by expert against streaming by layer, within an 8 GB device budget: batch-1 decode of a layer-reduced
Qwen3-Next-80B (or Qwen3-30B-A3B) with random bf16 weights at the real layer shapes.

    python scripts/bench_expert_stream.py [--model qwen3_next_80b] [--layers 4 8] [--budget-gb 8] [--prompt 64]
                                          [--decode 16] [--host-dtype fp8] [--max-seconds 140]
                                          [--out bench_expert_stream.json]
    python scripts/bench_expert_stream.py --small      # a tiny config on the CPU: the plumbing, no real timing

What runs, for each depth L (the preset with `num_hidden_layers` cut to L; a multiple of 4 keeps qwen3_next's 3:1
linear to full attention):
- resident: every weight on the device (the correctness reference, and the compute-only speed: no copies);
- experts (predict none / router, eviction lru / lfu): prefetch/experts.py, one engine, `forget()` between them;
- with --host-dtype fp8, beside them: experts (none / router, lru) with `host_dtype: fp8` (e4m3 codes + a bf16 scale
  per 128 on the host, dequantized into the cache slot after the copy): the same cache slots (the cache stays bf16),
  about half the bytes a miss moves, so half the I/O floor's time;
- on_demand: layer streaming, one layer slot (what 8 GB holds of Qwen3-Next's 3.3 GB layers after the head);
- lookahead: layer streaming with prefetch distance 1 (2 slots), at the budget it needs (8.4 GB on Qwen3-Next).
Layer streaming moves whole layers, whatever L, so its budget is the full model's 8 GB. The expert cache is scaled
with depth: the full model's cache at --budget-gb (budget - headroom - the 48-layer dense part, in experts) per
layer, times L; budget_gb(L) = headroom + dense(L) + that cache, so every layer gets the full model's share of slots.

Timing: a --prompt-token prefill, 4 warm-up steps, then --decode greedy steps, device-synchronised wall time; peak
device memory per variant. Expert streaming also reports, per token, the copy stream's time in host-to-device copies
and in fp8 dequantization (CUDA events around each batch's copies and its one dequant launch; they overlap the
compute, so they are not the stall) and the copy calls and batches (a layer's misses move as one batch: one copy
per run of consecutive host rows, fp8 through a k-row staging buffer and one dequant launch). Copy bandwidth: a 1 GB
pinned host-to-device copy, median of 5. I/O floor: the tok/s if
each token's bytes moved (the policy's own counter) were the only cost, at that bandwidth. Scaling to 48 layers
(the full model fits neither this GPU nor its host): ms/token = t(L1) + (48 - L1) x per-layer, per-layer =
(t(L2) - t(L1)) / (L2 - L1); bytes/token the same way.

Correctness, in the same run, every engine on the same eager path (fast_decode off; the Triton expert kernels on a
GPU): each streamed variant's (and each expert setting's, from a cold cache) teacher-forced logits (prompt + 8 steps)
against the resident run's, max abs difference and argmax agreement. 0 is expected: the streamed bytes are the
weights' own bytes, and the --prompt prefill, which routes to more experts than the cache holds (the `prefill
rounds` column, summed over the MoE layers: more than one a layer), keeps each (token, expert) pair's value through
its rounds (issue 18: summing whole rounds moved the bf16 logits by 0.45 at 4 layers, 1.84 at 8, on an H100). An
fp8 variant is checked against the resident run with its experts through the same fp8 round trip (kernels/fp8_rows.py
`fp8_round_trip`, applied in place after the resident timing: 0 expected), and its relative RMS error against the
bf16 resident logits is what fp8 storage costs.
The noise floor beside them: the resident run again with its experts on another valid path (the eager grouped path
instead of the kernels), i.e. the same weights with the bf16 sums in another order: how far these random-weight
logits move for that alone (random routers' top-k are near-tied, so one flipped expert compounds with depth). And
the Triton expert kernels at BLOCK_M 16 against 64 on one layer (a streamed call over the cache's rows may tile
otherwise than the resident call over E on longer prompts before the tile followed the routing: what that moved).

Time: the table and the JSON are written after each depth (the JSON after each row), so a run cut short keeps what
ran; a variant expected, from its time at the previous depth, to end past --max-seconds (default 140) is skipped
and named in the table.

Writes JSON (device, versions, git sha from OLLM_GIT_SHA, date, command) and prints a GitHub table last.
"""

from __future__ import annotations

import argparse
import gc
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

from ollm_triton.engine import ModelConfig, load_engine  # noqa: E402
from ollm_triton.kernels.fp8_rows import fp8_round_trip  # noqa: E402
from ollm_triton.registry import registry  # noqa: E402
from ollm_triton.results import environment  # noqa: E402

FULL_LAYERS = 48
GB = 1e9
HEADROOM_GB = 0.5
TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16,
            linear_value_head_dim=16, num_experts=16, num_experts_per_tok=4, moe_intermediate_size=32,
            shared_expert_intermediate_size=32)
DEVICE = torch.device("cuda")


def sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def split_bytes(arch: dict, layers: int, elt: int) -> dict:
    """Bytes of the model at `layers` layers: total, routed experts, the dense rest, one expert, the head, a layer."""
    cfg = ModelConfig.from_hf({**arch, "num_hidden_layers": layers})
    total = cfg.num_parameters() * elt
    expert = 3 * cfg.hidden_size * cfg.moe_intermediate_size * elt
    experts = sum(cfg.is_moe_layer(i) for i in range(layers)) * cfg.num_experts * expert
    head = cfg.vocab_size * cfg.hidden_size * elt * (1 if cfg.tie_word_embeddings else 2)
    return {"total": total, "experts": experts, "dense": total - experts, "expert": expert, "head": head,
            "layer": (total - head) / layers, "num_experts": cfg.num_experts}


def copy_gbps() -> float:
    """Pinned host-to-device copy bandwidth, GB/s (median of 5 copies of 1 GB)."""
    if DEVICE.type != "cuda":
        return 0.0
    src = torch.empty(int(GB), dtype=torch.uint8, pin_memory=True)
    dst = torch.empty_like(src, device=DEVICE)
    times = []
    for _ in range(6):
        sync()
        t0 = time.perf_counter()
        dst.copy_(src, non_blocking=True)
        sync()
        times.append(time.perf_counter() - t0)
    return GB / statistics.median(times[1:]) / 1e9


def teacher_forced(engine, ids: torch.Tensor, prompt: int) -> tuple[torch.Tensor, float | None]:
    """Logits of a prompt prefill (last position) and one step per later token; the rounds the prefill took (expert
    streaming: more than one a MoE layer where the prompt routes to more experts than the cache holds)."""
    cache = engine.new_cache(1, ids.shape[1] + 1)
    before = engine.prefetch.stats().get("rounds")
    out = [engine.forward(ids[:, :prompt], cache, last_only=True)]
    rounds = None if before is None else engine.prefetch.stats()["rounds"] - before
    out += [engine.forward(ids[:, i : i + 1], cache) for i in range(prompt, ids.shape[1])]
    return torch.cat(out, dim=1), rounds


def moe_blocks(engine) -> list:
    return [layer.mlp for layer in engine.model.model.layers if hasattr(layer.mlp, "experts")]


def noise_floor(engine, ids: torch.Tensor, prompt: int, ref: torch.Tensor) -> dict:
    """The resident run again with its experts on another valid path (the eager grouped path where the Triton
    kernels ran, the naive loop where grouped ran): same weights, the bf16 sums in another order. How far these
    random-weight logits move for that alone, beside the streamed rows (0 expected: the same path as resident)."""
    alt = "grouped" if engine.use_kernels() else "naive"
    for block in moe_blocks(engine):
        block.path = alt  # an instance attribute over the class default "auto"
    try:
        logits, _ = teacher_forced(engine, ids, prompt)
    finally:
        for block in moe_blocks(engine):
            del block.path
    return {"paths": f"{'kernel' if engine.use_kernels() else 'grouped'} vs {alt}",
            **compare(logits, ref), "logits_rel_rms": rel_rms(logits, ref)}


def block_m_check(engine) -> float | None:
    """The Triton expert kernels at BLOCK_M 16 and 64 (kernels/moe.py picks it from the routing's N x k pairs over
    the model's E, so a streamed call over C cache rows tiles as the resident call does; before, it counted the
    cache's rows and could tile otherwise on long prompts: this is what that would move) on one MoE layer's weights:
    64 tokens of N(0, 1), routed by the layer's router; the max abs difference of the outputs (CUDA only)."""
    if DEVICE.type != "cuda":
        return None
    from ollm_triton.kernels.moe import moe_experts_kernel

    block = moe_blocks(engine)[0]
    ex, router = block.experts, getattr(block, block.router_name)
    x = torch.randn(64, router.weight.shape[1], generator=torch.Generator(device=DEVICE).manual_seed(1), device=DEVICE,
                    dtype=ex.gate_up_proj.dtype)
    weights, experts = router(x)
    out = [moe_experts_kernel(x, weights, experts, ex.gate_up_proj, ex.down_proj, ex.gate_up_proj_bias,
                              ex.down_proj_bias, layout=ex.layout, act=ex.act, alpha=ex.alpha, limit=ex.limit,
                              block_m=bm) for bm in (16, 64)]
    return (out[0].float() - out[1].float()).abs().max().item()


def decode(engine, prompt_ids: torch.Tensor, steps: int, warmup: int = 4, head_bytes: float = 0.0) -> dict:
    """tok/s over `steps` greedy steps after a prefill and `warmup` steps, peak device GB, and the policy's
    counters over the timed steps only (head_bytes: the embeddings/head a layer-streaming policy keeps resident)."""
    if DEVICE.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    cache = engine.new_cache(1, prompt_ids.shape[1] + warmup + steps + 1)
    token = engine.forward(prompt_ids, cache, last_only=True)[:, -1].argmax(-1)
    for _ in range(warmup):
        token = engine.forward(token[:, None], cache)[:, -1].argmax(-1)
    sync()
    before = engine.prefetch.stats()
    t0 = time.perf_counter()
    for _ in range(steps):
        token = engine.forward(token[:, None], cache)[:, -1].argmax(-1)
    sync()
    dt = time.perf_counter() - t0
    after = engine.prefetch.stats()
    peak = torch.cuda.max_memory_allocated() / GB if DEVICE.type == "cuda" else 0.0
    row = {"tok_s": steps / dt, "ms_per_token": 1e3 * dt / steps, "peak_gb": peak}
    if "bytes_moved" in after:  # expert streaming
        d = {k: after[k] - before.get(k, 0.0) for k in ("bytes_moved", "accesses", "cache_hits", "prefetch_hits",
                                                         "prefetch_late", "prefetch_issued", "stall_s", "copy_s",
                                                         "dequant_s", "copy_batches", "memcpys")}
        # the copy stream's time (CUDA events around each batch's copies, then its fp8 dequantization): where a
        # miss's time goes; it overlaps the compute, so it is not the stall
        row.update(copy_ms_per_token=1e3 * d["copy_s"] / steps, dequant_ms_per_token=1e3 * d["dequant_s"] / steps,
                   copy_batches_per_token=d["copy_batches"] / steps, memcpys_per_token=d["memcpys"] / steps)
        row.update(bytes_per_token=d["bytes_moved"] / steps, stall_ms_per_token=1e3 * d["stall_s"] / steps,
                   hit_rate=(d["cache_hits"] + d["prefetch_hits"]) / max(d["accesses"], 1),
                   prefetch_accuracy=(d["prefetch_hits"] + d["prefetch_late"]) / d["prefetch_issued"]
                   if d["prefetch_issued"] else None, cache_slots=after["cache_slots"],
                   device_weight_gb=after["device_weight_bytes"] / GB)
    elif "bytes_read" in after:  # layer streaming
        d = {k: after[k] - before.get(k, 0.0) for k in ("bytes_read", "hits", "accesses", "stall_s")}
        row.update(bytes_per_token=d["bytes_read"] / steps, hit_rate=d["hits"] / max(d["accesses"], 1),
                   stall_ms_per_token=1e3 * d["stall_s"] / steps, slots=after["slots"],
                   device_weight_gb=(head_bytes + after["slots"] * after["layer_bytes"]) / GB)
    else:
        row["device_weight_gb"] = engine.num_parameters() * next(engine.model.parameters()).element_size() / GB
    return row


def compare(logits: torch.Tensor, ref: torch.Tensor) -> dict:
    return {"max_abs_diff_vs_resident": (logits - ref).abs().max().item(),
            "argmax_agree": (logits.argmax(-1) == ref.argmax(-1)).float().mean().item()}


def rel_rms(logits: torch.Tensor, ref: torch.Tensor) -> float:
    ref, logits = ref.double(), logits.double()
    return ((logits - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt()).item()


def round_trip_experts(engine) -> None:
    """The resident engine's routed experts through fp8 and back, in place: the reference of host_dtype=fp8."""
    for layer in engine.model.model.layers:
        if hasattr(layer.mlp, "experts"):
            for p in layer.mlp.experts.parameters():
                for e in range(p.shape[0]):  # an expert at a time: no float32 copy of a whole layer's experts
                    p.data[e] = fp8_round_trip(p.data[e].reshape(1, -1)).reshape(p.shape[1:])


def main() -> None:  # noqa: C901 (one study, top to bottom)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="qwen3_next_80b", choices=["qwen3_next_80b", "qwen3_moe_30b"])
    ap.add_argument("--layers", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--budget-gb", type=float, default=8.0, help="the full 48-layer model's device budget")
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--decode", type=int, default=16)
    ap.add_argument("--layer-decode", type=int, default=4, help="decode steps for the layer-streaming variants")
    ap.add_argument("--out", default="bench_expert_stream.json")
    ap.add_argument("--host-dtype", choices=["model", "fp8"], default="model",
                    help="fp8: also expert streaming from fp8 host rows, beside the model dtype's (bf16)")
    ap.add_argument("--max-seconds", type=float, default=140.0,
                    help="skip a variant expected (from the previous depth) to end past this many seconds of run")
    ap.add_argument("--small", action="store_true", help="a tiny config on the CPU: checks the script only")
    args = ap.parse_args()
    global DEVICE
    if args.small:
        DEVICE = torch.device("cpu")
    elif not torch.cuda.is_available():
        sys.exit("bench_expert_stream needs a CUDA device (or --small for the CPU plumbing check)")
    arch = yaml.safe_load((ROOT / f"ollm_triton/conf/model/{args.model}.yaml").read_text())["arch"]
    real = split_bytes(arch, FULL_LAYERS, 2)  # the real model in bf16 decides the cache's share of the experts
    if args.small:
        arch.update(TINY)
    if arch["model_type"] == "qwen3_next" and any(n % 4 for n in args.layers):
        sys.exit(f"--layers must be multiples of 4 for qwen3_next (3 linear : 1 full attention), got {args.layers}")
    dtype = torch.float32 if args.small else torch.bfloat16
    elt = 4 if args.small else 2
    full = split_bytes(arch, FULL_LAYERS, elt)
    cache_full = args.budget_gb * GB - HEADROOM_GB * GB - real["dense"]
    if cache_full < real["expert"]:
        sys.exit(f"--budget-gb {args.budget_gb} leaves no expert cache after the {real['dense'] / GB:.2f} GB dense "
                 f"part of {args.model}")
    share = cache_full / real["expert"] / FULL_LAYERS / real["num_experts"]  # of each layer's experts
    slots_per_layer = share * full["num_experts"]
    env = environment(DEVICE)
    env["command"] = " ".join([Path(sys.executable).name, *sys.argv])
    gbps = copy_gbps()
    payload = {"env": env, "args": vars(args), "copy_gbps": gbps, "full_model": full,
               "expert_slots_per_layer": slots_per_layer,
               "cache_share_of_experts": share, "rows": []}
    print("PLAN", json.dumps({k: payload[k] for k in ("copy_gbps", "expert_slots_per_layer",
                                                     "cache_share_of_experts")}), flush=True)

    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, arch["vocab_size"], (1, args.prompt + 8), generator=gen).to(DEVICE)
    t_start, wall = time.perf_counter(), {}  # wall: (layers, label) -> seconds the variant took

    def emit(row: dict) -> None:
        payload["rows"].append(row)
        print("ROW", json.dumps(row, default=str), flush=True)
        Path(args.out).write_text(json.dumps(payload, indent=1, default=str))  # what ran survives a cut run

    for depth, n in enumerate(args.layers):
        part = split_bytes(arch, n, elt)
        layer_arch = {**arch, "num_hidden_layers": n}
        expert_budget = HEADROOM_GB * GB + part["dense"] + slots_per_layer * n * full["expert"]
        two_slots = part["head"] + HEADROOM_GB * GB + 2.02 * part["layer"]  # + a little for the slot alignment
        variants = [
            ("resident", None, {}),
            ("experts", "experts", {"budget_gb": expert_budget / GB}),
            *([("experts fp8", "experts", {"budget_gb": expert_budget / GB,
                                           "host_dtype": "fp8"})] if args.host_dtype == "fp8" else []),
            ("on_demand", "on_demand", {"budget_gb": args.budget_gb}),
            ("lookahead", "lookahead", {"budget_gb": max(args.budget_gb, two_slots / GB), "prefetch_distance": 1,
                                        "max_cache_size": 2}),
        ]
        if args.small:  # the tiny model's bytes are far below any budget in GB: size the caches by count instead
            slots = max(2 * arch["num_experts_per_tok"], round(slots_per_layer * n))  # room left to prefetch into
            for i, (label, name, params) in enumerate(variants):
                if name == "experts":
                    params = {**params, "max_cached_experts": slots, "headroom_gb": 0.0}
                    params.pop("budget_gb")
                elif name is not None:
                    params = {"prefetch_distance": 1, "max_cache_size": 2} if name == "lookahead" else {}
                variants[i] = (label, name, params)
        ref = ref_fp8 = None
        for label, name, params in variants:
            row = {"layers": n, "policy": label, "params": params}
            prev = args.layers[depth - 1] if depth else None
            expected = wall[(prev, label)] * n / prev if (prev, label) in wall else 0.0  # from the last depth
            if name is not None and ref is None:  # the resident run did not finish: nothing to check against
                row["skipped"] = "no resident reference at this depth"
                emit(row)
                continue
            if time.perf_counter() - t_start + expected > args.max_seconds:
                row["skipped"] = f"--max-seconds {args.max_seconds:g}: expected to end at " \
                                 f"{time.perf_counter() - t_start + expected:.0f} s"
                emit(row)
                continue
            t_variant = time.perf_counter()
            engine = None
            try:
                prefetch = registry.build("prefetch", name, params) if name else None
                t0 = time.perf_counter()
                engine = load_engine(layer_arch, prefetch=prefetch, device=DEVICE, dtype=dtype, fast_decode="off")
                row["build_s"] = time.perf_counter() - t0
                with torch.inference_mode():
                    fp8 = params.get("host_dtype") == "fp8"
                    steps = args.decode if label in ("resident", "experts", "experts fp8") else args.layer_decode
                    if name == "experts":  # one engine, each setting from a cold cache, each checked on its own
                        settings = (("none", "lru"), ("router", "lru")) if fp8 else \
                            (("none", "lru"), ("router", "lru"), ("router", "lfu"))
                        for predict, eviction in settings:
                            engine.prefetch.cfg.predict, engine.prefetch.cfg.eviction = predict, eviction
                            engine.prefetch.forget()
                            logits, rounds = teacher_forced(engine, ids, args.prompt)
                            sub = {**compare(logits, ref_fp8 if fp8 else ref), "prefill_rounds": rounds,
                                   "logits_rel_rms_vs_bf16_resident": rel_rms(logits, ref)}
                            engine.prefetch.forget()
                            sub.update(decode(engine, ids[:, : args.prompt], steps))
                            sub["io_floor_tok_s"] = gbps * GB / sub["bytes_per_token"] if sub["bytes_per_token"] \
                                and gbps else None
                            what = f"{predict}, {eviction}, fp8" if fp8 else f"{predict}, {eviction}"
                            emit({**row, "policy": f"experts ({what})",
                                  "params": {**params, "predict": predict, "eviction": eviction}, **sub})
                        continue
                    logits, _ = teacher_forced(engine, ids, args.prompt)
                    if ref is None:
                        ref = logits
                        row["noise_floor"] = noise_floor(engine, ids, args.prompt, ref)
                        if depth == 0:
                            payload["block_m_16_vs_64_max_abs_diff"] = block_m_check(engine)
                    else:
                        row.update(compare(logits, ref))
                        row["logits_rel_rms_vs_bf16_resident"] = rel_rms(logits, ref)
                    row.update(decode(engine, ids[:, : args.prompt], steps, warmup=1 if name else 4,
                                      head_bytes=part["head"]))
                    if name is None and args.host_dtype == "fp8":  # after its timing: the fp8 variants' reference
                        round_trip_experts(engine)
                        ref_fp8, _ = teacher_forced(engine, ids, args.prompt)
                        row["logits_rel_rms_fp8_round_trip_vs_bf16"] = rel_rms(ref_fp8, ref)
                    if row.get("bytes_per_token") and gbps:
                        row["io_floor_tok_s"] = gbps * GB / row["bytes_per_token"]
            except Exception as e:
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                traceback.print_exc()
            finally:
                if engine is not None:
                    engine.close()
                del engine
                gc.collect()
                if DEVICE.type == "cuda":
                    torch.cuda.empty_cache()
                wall[(n, label)] = time.perf_counter() - t_variant
            if name != "experts" or "error" in row:
                emit(row)
        # after each depth: the scaling so far, the JSON and the table (the last one printed is the final table)
        scale(payload, args.layers[: depth + 1])
        payload["wall_s"] = time.perf_counter() - t_start
        Path(args.out).write_text(json.dumps(payload, indent=1, default=str))
        print(table(payload), flush=True)


def scale(payload: dict, layers: list[int]) -> None:
    """Per-layer ms and bytes from the two depths, extrapolated to the 48-layer model."""
    if len(layers) < 2:
        return
    lo, hi = min(layers), max(layers)
    by = {(r["layers"], r["policy"]): r for r in payload["rows"] if "ms_per_token" in r}
    for policy in dict.fromkeys(r["policy"] for r in payload["rows"]):
        a, b = by.get((lo, policy)), by.get((hi, policy))
        if a is None or b is None:
            continue
        per_layer = (b["ms_per_token"] - a["ms_per_token"]) / (hi - lo)
        ms48 = a["ms_per_token"] + (FULL_LAYERS - lo) * per_layer
        out = {"ms_per_layer": per_layer, "ms_per_token_48": ms48, "tok_s_48": 1e3 / ms48 if ms48 > 0 else None}
        if a.get("bytes_per_token") is not None and b.get("bytes_per_token") is not None:
            bpl = (b["bytes_per_token"] - a["bytes_per_token"]) / (hi - lo)
            out["bytes_per_token_48"] = a["bytes_per_token"] + (FULL_LAYERS - lo) * bpl
            if payload["copy_gbps"] and out["bytes_per_token_48"] > 0:
                out["io_floor_tok_s_48"] = payload["copy_gbps"] * GB / out["bytes_per_token_48"]
        payload.setdefault("scaling", {})[policy] = out


def _f(v, fmt: str) -> str:
    return "" if v is None else format(v, fmt)


def copies(r: dict) -> str:
    """Host-to-device copy calls a token (the batches they came in), expert streaming only."""
    if r.get("memcpys_per_token") is None:
        return ""
    return f"{r['memcpys_per_token']:.1f} ({r['copy_batches_per_token']:.1f})"


def table(p: dict) -> str:
    env, a = p["env"], p["args"]
    out = [f"{a['model']} shapes, layer-reduced, {'fp32 tiny (--small)' if a['small'] else 'bf16'}, batch-1 decode, "
           f"budget {a['budget_gb']} GB for 48 layers ({p['expert_slots_per_layer']:.1f} expert slots per layer, "
           f"{100 * p['cache_share_of_experts']:.1f}% of the experts); host-to-device copy {p['copy_gbps']:.1f} "
           f"GB/s; {env.get('device_name')}, torch {env.get('torch')}, triton {env.get('triton')}, git "
           f"{env.get('git_sha')}, {env.get('date')}", f"command: {env.get('command')}", "",
           "| layers | policy | tok/s | ms/token | hit rate | prefetch acc. | MB moved/token | I/O floor tok/s | "
           "stall ms/token | copy ms/token | dequant ms/token | copies/token (batches) | device weights GB | "
           "peak GB | build s | prefill rounds | max abs diff vs resident (fp8: its round trip) | argmax agree | "
           "logits rel. RMS vs bf16 resident (resident: its fp8 round trip) |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in p["rows"]:
        if "error" in r or "skipped" in r:
            out.append(f"| {r['layers']} | {r['policy']} | {r.get('error') or 'skipped: ' + r['skipped']} |"
                       + " |" * 16)
            continue
        rms = r.get("logits_rel_rms_vs_bf16_resident", r.get("logits_rel_rms_fp8_round_trip_vs_bf16"))
        mb = r.get("bytes_per_token")
        out.append(f"| {r['layers']} | {r['policy']} | {r['tok_s']:.2f} | {r['ms_per_token']:.1f} | "
                   f"{_f(r.get('hit_rate'), '.3f')} | {_f(r.get('prefetch_accuracy'), '.3f')} | "
                   f"{_f(None if mb is None else mb / 1e6, '.1f')} | {_f(r.get('io_floor_tok_s'), '.2f')} | "
                   f"{_f(r.get('stall_ms_per_token'), '.2f')} | {_f(r.get('copy_ms_per_token'), '.2f')} | "
                   f"{_f(r.get('dequant_ms_per_token'), '.2f')} | {copies(r)} | "
                   f"{_f(r.get('device_weight_gb'), '.2f')} | "
                   f"{r['peak_gb']:.2f} | {_f(r.get('build_s'), '.1f')} | {_f(r.get('prefill_rounds'), '.0f')} | "
                   f"{_f(r.get('max_abs_diff_vs_resident'), '.2e')} | {_f(r.get('argmax_agree'), '.3f')} | "
                   f"{_f(rms, '.2e')} |")
    floors = [(r["layers"], r["noise_floor"]) for r in p["rows"] if "noise_floor" in r]
    if floors:
        out += ["", "Noise floor: the resident run again with its experts on another valid path (same weights, the "
                "bf16 sums in another order), against the resident logits; the streamed rows run the resident's own "
                "path, so their difference is 0 unless streaming changed a value:", "",
                "| layers | paths | max abs diff | argmax agree | logits rel. RMS |", "|---|---|---|---|---|"]
        out += [f"| {n} | {f['paths']} | {f['max_abs_diff_vs_resident']:.2e} | {f['argmax_agree']:.3f} | "
                f"{f['logits_rel_rms']:.2e} |" for n, f in floors]
    if p.get("block_m_16_vs_64_max_abs_diff") is not None:
        out += ["", "Triton expert kernels at BLOCK_M 16 against 64 on one layer (64 tokens): what a tile change would "
                "move; streamed calls now tile by the routing (N x k over E), as the resident one does: max abs diff "
                f"{p['block_m_16_vs_64_max_abs_diff']:.2e}"]
    if p.get("scaling"):
        out += ["", "Scaled to 48 layers (t(L1) + (48 - L1) x per-layer, from the two depths; resident: the compute "
                "alone, which does not fit one GPU):", "",
                "| policy | ms/layer | ms/token (48) | tok/s (48) | MB moved/token (48) | I/O floor tok/s (48) |",
                "|---|---|---|---|---|---|"]
        for policy, s in p["scaling"].items():
            mb = s.get("bytes_per_token_48")
            out.append(f"| {policy} | {s['ms_per_layer']:.2f} | {s['ms_per_token_48']:.1f} | "
                       f"{_f(s.get('tok_s_48'), '.2f')} | {_f(None if mb is None else mb / 1e6, '.0f')} | "
                       f"{_f(s.get('io_floor_tok_s_48'), '.2f')} |")
    out.append(f"wall {p.get('wall_s', 0.0):.0f} s")
    return "\n".join(out)


if __name__ == "__main__":
    main()
