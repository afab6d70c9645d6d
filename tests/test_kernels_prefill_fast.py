"""The prefill kernel's variants (tensor-descriptor K/V, GQA-packed tiles) against float64 references.

Every variant runs the same schedules as the plain kernel (dense causal, window + sinks, a block-sparse pattern, a
tree mask, summary keys, a chunk against a longer cache) on the CPU interpreter in fp32/fp16 at odd lengths, with
NaN-poisoned outputs. The descriptor path also reads a cache view whose rows past S hold NaN: the kernel must not
let them reach the output. bf16 on the GPU: test_gpu_variants_bf16.
"""

from dataclasses import replace

import pytest
import torch

from ollm_triton.kernels.attention_prefill import (
    PREFILL_VARIANTS,
    PrefillConfig,
    SummaryKeys,
    attention_reference,
    flash_prefill,
    prefill_config,
)
from ollm_triton.kernels.attention_schedule import SparsePattern, build_schedule, schedule_to_mask

# Small tiles so that odd lengths cross several tiles; pack_gqa's block_m is per head (x group 2 = 16 rows).
VARIANTS = {
    "desc": PrefillConfig(16, 16, 4, 2, kv_desc=True),
    "pack": PrefillConfig(8, 16, 4, 2, pack_gqa=True),
    "pack_desc": PrefillConfig(8, 16, 4, 2, kv_desc=True, pack_gqa=True),
}
TOL = {torch.float32: 2e-5, torch.float16: 2e-3}


def rel_rms(a: torch.Tensor, ref: torch.Tensor) -> float:
    a, ref = a.double(), ref.double()
    return float((a - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt().clamp_min(1e-30))


def qkv(b, hq, hkv, t, s, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, hq, t, d, generator=g).to(dtype), torch.randn(b, hkv, s, d, generator=g).to(dtype),
            torch.randn(b, hkv, s, d, generator=g).to(dtype))


def run(q, k, v, cfg, poison, **sched_kw):
    t, s = q.shape[2], k.shape[2]
    tree = sched_kw.pop("tree_mask", None)
    summaries = sched_kw.pop("summaries", None)
    sched = build_schedule(t, s, sched_kw.pop("q_offset", 0), cfg.block_m, cfg.block_n, tree=tree is not None,
                           **sched_kw)
    out = poison(torch.empty_like(q))
    flash_prefill(q, k, v, sched, config=cfg, tree_mask=tree, summaries=summaries, out=out)
    return out, sched


def reference(q, k, v, sched, tree=None):
    return attention_reference(q.double(), k.double(), v.double(), lambda rows: schedule_to_mask(sched, tree, rows),
                               compute_dtype=torch.float64)


@pytest.mark.interpreter
@pytest.mark.parametrize("name, t, s, q_offset, dtype", [
    ("desc", 1, 1, 0, torch.float32), ("desc", 129, 129, 0, torch.float32), ("desc", 29, 100, 71, torch.float16),
    ("pack", 63, 63, 0, torch.float16), ("pack", 1, 40, 39, torch.float32),
    ("pack_desc", 129, 129, 0, torch.float16), ("pack_desc", 29, 100, 71, torch.float32),
])
def test_variant_dense_causal(name, t, s, q_offset, dtype, poison):
    q, k, v = qkv(1, 2, 1, t, s, 16, dtype)  # GQA group 2
    out, sched = run(q, k, v, VARIANTS[name], poison, q_offset=q_offset)
    assert not out.isnan().any()
    assert rel_rms(out, reference(q, k, v, sched)) < TOL[dtype]


@pytest.mark.interpreter
def test_variant_rules(poison):
    """Window + sinks, a block-sparse pattern and a tree over the trailing keys on the descriptor + packed variant
    (the element rules are per row, so the other variants run the same code for them)."""
    cfg = VARIANTS["pack_desc"]
    q, k, v = qkv(1, 4, 2, 29, 61, 16, torch.float32, seed=1)
    for kw in (dict(window=20, sink=3), dict(pattern=SparsePattern(kind="local", block_size=16, density=0.5,
                                                                  num_global=1, seed=0))):
        out, sched = run(q, k, v, cfg, poison, q_offset=32, **kw)
        assert rel_rms(out, reference(q, k, v, sched)) < TOL[torch.float32], kw
    tree = torch.rand(29, 29, generator=torch.Generator().manual_seed(2)) < 0.4
    tree |= torch.eye(29, dtype=torch.bool)
    out, sched = run(q, k, v, cfg, poison, q_offset=32, tree_mask=tree)
    assert rel_rms(out, reference(q, k, v, sched, tree)) < TOL[torch.float32]


@pytest.mark.interpreter
def test_variant_summary_keys(poison):
    """Summary keys (pointer loads) after descriptor tiles, packed: one coarse summary per 8 keys, visible to rows
    whose window starts past it; checked against the reference with the same summaries."""
    q, k, v = qkv(1, 4, 2, 40, 40, 16, torch.float32, seed=3)
    n = 5
    ks, vs = k[:, :, :40].unflatten(2, (n, 8)).mean(3), v[:, :, :40].unflatten(2, (n, 8)).mean(3)
    f = torch.full((n,), 8)
    meta = torch.stack((f, torch.full((n,), 1 << 30), torch.arange(n))).int()
    window = 16
    cfg = VARIANTS["pack_desc"]
    out, sched = run(q, k, v, cfg, poison, window=window, summaries=SummaryKeys(ks, vs, meta))
    p = torch.arange(40)[:, None]
    e = (p - window + 1).clamp(min=0)
    sum_vis = (torch.arange(n)[None, :] + 1) * 8 <= (e // 8) * 8
    bias = torch.full((n,), 8.0).log()
    ref = attention_reference(q.double(), k.double(), v.double(), lambda rows: schedule_to_mask(sched, None, rows),
                              summaries=(ks.double(), vs.double(), lambda rows: sum_vis[rows], bias.double()),
                              compute_dtype=torch.float64)
    assert rel_rms(out, ref) < TOL[torch.float32]


@pytest.mark.interpreter
@pytest.mark.parametrize("name", ["desc", "pack_desc"])
def test_descriptor_cache_view_with_nan_past_s(name, poison):
    """A chunk of 21 queries against the first 50 slots of a 64-slot cache whose unused slots hold NaN: the
    descriptor spans the whole cache, so the last tile reads NaN rows past S; they must stay out of the output."""
    q, _, _ = qkv(1, 4, 2, 21, 50, 16, torch.float32, seed=4)
    cache = torch.full((2, 1, 2, 64, 16), float("nan"))
    cache[:, :, :, :50] = torch.randn(2, 1, 2, 50, 16, generator=torch.Generator().manual_seed(5))
    k, v = cache[0, :, :, :50], cache[1, :, :, :50]
    out, sched = run(q, k, v, VARIANTS[name], poison, q_offset=29)
    assert not out.isnan().any()
    assert rel_rms(out, reference(q, k, v, sched)) < TOL[torch.float32]


@pytest.mark.interpreter
def test_descriptor_falls_back_for_interleaved_heads(poison):
    """[B, S, H, D] storage seen as [B, H, S, D] (head stride not a multiple of the row stride): no single 2-D
    descriptor describes it, so the pointer path runs, and the result is still right."""
    q, k, v = qkv(1, 4, 2, 33, 33, 16, torch.float32, seed=6)
    k, v = k.transpose(1, 2).contiguous().transpose(1, 2), v.transpose(1, 2).contiguous().transpose(1, 2)
    out, sched = run(q, k, v, VARIANTS["desc"], poison)
    assert rel_rms(out, reference(q, k, v, sched)) < TOL[torch.float32]


def test_prefill_config_picks_and_rescales():
    assert prefill_config(128, torch.bfloat16, 8192) == PREFILL_VARIANTS["base"]  # CPU: no descriptors
    assert prefill_config(128, torch.float32, 8192).block_n == 32
    import ollm_triton.kernels.attention_prefill as ap

    old = ap.LONG_PREFILL_VARIANT
    try:
        ap.LONG_PREFILL_VARIANT = "pack_tma"
        cfg = ap.prefill_config(128, torch.bfloat16, 8192, device="cpu", group=4)
        assert cfg == PREFILL_VARIANTS["base"]  # the variant applies on sm_90+ only
    finally:
        ap.LONG_PREFILL_VARIANT = old


def test_config_tiles_must_match_schedule():
    q, k, v = qkv(1, 2, 1, 8, 8, 16, torch.float32)
    with pytest.raises(ValueError, match="config tiles 32x16 differ from the schedule's 16x16"):
        flash_prefill(q, k, v, build_schedule(8, 8, 0, 16, 16), config=PrefillConfig(32, 16, 4, 2))


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(PREFILL_VARIANTS))
def test_gpu_variants_bf16(name, poison):
    """Each bench variant in bf16 at an odd length with GQA 4, against a float64 reference on the last rows."""
    cfg = PREFILL_VARIANTS[name]
    group = 4
    if cfg.pack_gqa:
        cfg = replace(cfg, block_m=128 // group)
    g = torch.Generator(device="cuda").manual_seed(0)
    t = 2049
    q = torch.randn(1, 8, t, 128, device="cuda", dtype=torch.bfloat16, generator=g)
    k = torch.randn(1, 2, t, 128, device="cuda", dtype=torch.bfloat16, generator=g)
    v = torch.randn(1, 2, t, 128, device="cuda", dtype=torch.bfloat16, generator=g)
    sched = build_schedule(t, t, 0, cfg.block_m, cfg.block_n, device="cuda")
    out = poison(torch.empty_like(q))
    flash_prefill(q, k, v, sched, config=cfg, out=out)
    rows = slice(t - 130, t)
    ref = attention_reference(q[:, :, rows].double(), k.double(), v.double(),
                              lambda r: schedule_to_mask(sched, None, slice(rows.start + r.start, rows.start + r.stop)),
                              compute_dtype=torch.float64)
    assert not out.isnan().any()
    assert rel_rms(out[:, :, rows], ref) < 1e-2
