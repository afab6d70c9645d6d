"""The attention kernels against float64 references: the interpreter on the CPU (fp32/fp16), bf16 on the GPU."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ollm_triton.kernels.attention_decode import decode_reference, flash_decode
from ollm_triton.kernels.attention_multiscale import flash_multiscale, multiscale_reference
from ollm_triton.kernels.attention_prefill import attention_reference, flash_prefill
from ollm_triton.kernels.attention_schedule import SparsePattern, build_schedule, schedule_to_mask

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}  # relative RMS error vs float64


def rel_rms(out, ref):
    assert not out.isnan().any(), "NaN in the output: an element was left unwritten"
    return ((out.double() - ref.double()).pow(2).mean().sqrt() / ref.double().pow(2).mean().sqrt()).item()


def qkv(b, hq, hkv, t, s, d, dtype, device=DEVICE, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    q = torch.randn(b, hq, t, d, generator=g, device=device, dtype=torch.float32).to(dtype)
    k = torch.randn(b, hkv, s, d, generator=g, device=device, dtype=torch.float32).to(dtype)
    v = torch.randn(b, hkv, s, d, generator=g, device=device, dtype=torch.float32).to(dtype)
    return q, k, v


def run_prefill(q, k, v, sched, poison, tree=None, **kw):
    out = poison(torch.empty_like(q))
    flash_prefill(q, k, v, sched, tree_mask=tree, out=out, **kw)
    ref = attention_reference(q, k, v, schedule_to_mask(sched, tree), compute_dtype=torch.float64)
    return out, ref


# (T, S, q_offset, Hq, Hkv, D, dtype, rules, tiles)
PREFILL_CASES = [
    (1, 1, 0, 1, 1, 64, torch.float32, {}, (16, 16)),
    (63, 63, 0, 4, 1, 64, torch.float32, {}, (32, 32)),
    (129, 129, 0, 8, 1, 128, torch.float16, {}, (64, 32)),
    (1000, 1000, 0, 1, 1, 64, torch.float16, {}, (128, 64)),
    (129, 129, 0, 2, 2, 128, torch.float32, dict(window=33, sink=4), (32, 32)),
    (63, 400, 337, 4, 1, 64, torch.float16, dict(window=100, sink=0), (16, 32)),
    (1, 1000, 999, 4, 4, 32, torch.float32, {}, (16, 64)),
    (100, 300, 150, 2, 1, 16, torch.float32, {}, (32, 16)),  # q_offset + T < S: keys after the queries stay hidden
    (300, 300, 0, 2, 1, 128, torch.float16, dict(window=150, sink=2), (128, 128)),  # the GPU's default tiles
]


@pytest.mark.interpreter
@pytest.mark.parametrize("t, s, q_offset, hq, hkv, d, dtype, rules, tiles", PREFILL_CASES)
def test_prefill_matches_float64(t, s, q_offset, hq, hkv, d, dtype, rules, tiles, poison):
    q, k, v = qkv(1, hq, hkv, t, s, d, dtype)
    sched = build_schedule(t, s, q_offset, *tiles, window=rules.get("window", 0), sink=rules.get("sink", 0))
    out, ref = run_prefill(q, k, v, sched, poison)
    assert rel_rms(out, ref) < TOL[dtype]


@pytest.mark.interpreter
@pytest.mark.parametrize("kind", ["local", "strided", "random", "bigbird"])
def test_prefill_block_sparse(kind, poison):
    t = 333
    q, k, v = qkv(1, 2, 1, t, t, 64, torch.float32, seed=1)
    sched = build_schedule(t, t, 0, 32, 32, pattern=SparsePattern(kind=kind, block_size=32, density=0.3))
    out, ref = run_prefill(q, k, v, sched, poison)
    assert rel_rms(out, ref) < TOL[torch.float32]


@pytest.mark.interpreter
def test_prefill_tree_mask_and_batch(poison):
    t, s = 9, 70
    q, k, v = qkv(2, 4, 2, t, s, 64, torch.float16, seed=2)
    tree = torch.rand(t, t, generator=torch.Generator().manual_seed(0)) < 0.4
    tree |= torch.eye(t, dtype=torch.bool)
    sched = build_schedule(t, s, s - t, 16, 32, tree=True)
    out, ref = run_prefill(q, k, v, sched, poison, tree=tree)
    assert rel_rms(out, ref) < TOL[torch.float16]
    # The tree changes the answer (so the test would notice it being ignored).
    causal = schedule_to_mask(build_schedule(t, s, s - t, 16, 32))
    plain = attention_reference(q, k, v, causal, compute_dtype=torch.float64)
    assert rel_rms(plain, ref) > 1e-2


@pytest.mark.interpreter
def test_prefill_strided_views(poison):
    """K/V as a cache buffer's view (stride over the allocated capacity, not the length)."""
    q, k, v = qkv(1, 4, 2, 40, 300, 64, torch.float32, seed=3)
    k_view, v_view = k[:, :, :250], v[:, :, :250]
    sched = build_schedule(40, 250, 210, 32, 32)
    out, ref = run_prefill(q, k_view, v_view, sched, poison)
    assert rel_rms(out, ref) < TOL[torch.float32]


@pytest.mark.interpreter
@pytest.mark.parametrize("t, s, hq, hkv, d, dtype, rules", [
    (1, 1, 1, 1, 64, torch.float32, {}),
    (1, 1000, 8, 1, 128, torch.float16, {}),
    (1, 129, 4, 4, 64, torch.float32, dict(window=50, sink=4)),
    (4, 500, 8, 2, 64, torch.float16, dict(window=100, sink=2, block_ids=None)),
    (2, 300, 4, 1, 32, torch.float32, dict(block_ids=torch.tensor([0, 2, 3], dtype=torch.int32))),
    (16, 63, 8, 1, 16, torch.float32, {}),  # 128 rows: the largest decode tile
])
def test_decode_matches_float64(t, s, hq, hkv, d, dtype, rules, poison):
    q, k, v = qkv(1, hq, hkv, t, s, d, dtype, seed=4)
    rules = dict(rules)
    if "block_ids" in rules and rules["block_ids"] is None:
        from ollm_triton.kernels.attention_schedule import decode_block_ids

        rules["block_ids"] = decode_block_ids(s, t, 64, window=rules["window"], sink=rules["sink"])
    for splits in (1, 3):
        out = poison(torch.empty_like(q))
        flash_decode(q, k, v, num_splits=splits, out=out, **rules)
        ref = decode_reference(q, k, v, compute_dtype=torch.float64, **rules)
        assert rel_rms(out, ref) < TOL[dtype], splits


@pytest.mark.interpreter
@pytest.mark.parametrize("t, s, q_offset, window, scales, dtype", [
    (200, 200, 0, 40, (16, 64), torch.float32),
    (3, 700, 697, 33, (16,), torch.float16),
    (129, 400, 271, 100, (32, 64, 256), torch.float32),
])
def test_multiscale_matches_float64(t, s, q_offset, window, scales, dtype, poison):
    q, k, v = qkv(1, 4, 2, t, s, 64, dtype, seed=5)
    out = poison(torch.empty_like(q))
    bm = 16 if t <= 16 else 64
    flash_multiscale(q, k, v, q_offset=q_offset, window=window, scales=scales, block_m=bm, block_n=32, out=out)
    ref = multiscale_reference(q, k, v, q_offset=q_offset, window=window, scales=scales)
    assert rel_rms(out, ref) < TOL[dtype]


@pytest.mark.interpreter
@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    t=st.integers(1, 80), extra=st.integers(0, 120), group=st.sampled_from([1, 4, 8]),
    d=st.sampled_from([16, 32, 64]), window=st.sampled_from([0, 1, 20]), sink=st.integers(0, 5),
    tiles=st.sampled_from([(16, 16), (32, 16), (16, 32)]), dtype=st.sampled_from([torch.float32, torch.float16]),
)
def test_prefill_property(t, extra, group, d, window, sink, tiles, dtype, poison):
    s = t + extra
    q, k, v = qkv(1, group, 1, t, s, d, dtype, seed=t * 131 + extra)
    sched = build_schedule(t, s, s - t, *tiles, window=window, sink=sink if window else 0)
    out, ref = run_prefill(q, k, v, sched, poison)
    assert rel_rms(out, ref) < TOL[dtype]


def test_bad_shapes_raise_one_line():
    q, k, v = qkv(1, 3, 2, 4, 4, 64, torch.float32, device="cpu")
    with pytest.raises(ValueError, match="multiple of KV heads"):
        flash_prefill(q, k, v, build_schedule(4, 4, 0, 16, 16))
    q, k, v = qkv(1, 2, 2, 4, 4, 48, torch.float32, device="cpu")
    with pytest.raises(ValueError, match="head_dim"):
        flash_prefill(q, k, v, build_schedule(4, 4, 0, 16, 16))
    q, k, v = qkv(1, 2, 2, 4, 8, 64, torch.float32, device="cpu")
    with pytest.raises(ValueError, match="schedule built for"):
        flash_prefill(q, k, v, build_schedule(4, 4, 0, 16, 16))


# ------------------------------------------------------------------------------------------------------------
# GPU: bf16 at real lengths (a few heads so the float64 reference stays cheap)


@pytest.mark.gpu
@pytest.mark.parametrize("s, rules, tiles", [
    (8192, {}, (128, 128)), (32768, {}, (128, 128)), (32768, dict(window=4096, sink=4), (128, 128)),
    (8192 + 77, dict(window=1000, sink=0), (128, 64)), (8192 + 77, {}, (64, 64)),
])
def test_gpu_prefill_bf16(s, rules, tiles, poison):
    q, k, v = qkv(1, 8, 2, s, s, 128, torch.bfloat16)
    sched = build_schedule(s, s, 0, *tiles, device="cuda", **rules)
    out, ref = run_prefill(q, k, v, sched, poison)
    assert rel_rms(out, ref) < TOL[torch.bfloat16]


@pytest.mark.gpu
def test_gpu_prefill_sparse_chunked_tree_multiscale(poison):
    s = 16384
    q, k, v = qkv(1, 8, 2, s, s, 128, torch.bfloat16, seed=1)
    sched = build_schedule(s, s, 0, 128, 128, device="cuda", pattern=SparsePattern("bigbird", 128, 0.25))
    out, ref = run_prefill(q, k, v, sched, poison)
    assert rel_rms(out, ref) < TOL[torch.bfloat16]
    t = 1000  # a chunk against a cache
    sched = build_schedule(t, s, s - t, 128, 64, device="cuda")
    out, ref = run_prefill(q[:, :, -t:], k, v, sched, poison)
    assert rel_rms(out, ref) < TOL[torch.bfloat16]
    t = 31  # a speculative tree
    tree = torch.rand(t, t, device="cuda") < 0.3
    tree |= torch.eye(t, dtype=torch.bool, device="cuda")
    sched = build_schedule(t, s, s - t, 64, 64, device="cuda", tree=True)
    out, ref = run_prefill(q[:, :, -t:], k, v, sched, poison, tree=tree)
    assert rel_rms(out, ref) < TOL[torch.bfloat16]
    out = poison(torch.empty_like(q))
    flash_multiscale(q, k, v, q_offset=0, window=1024, scales=(64, 1024), block_m=128, block_n=64, out=out)
    ref = multiscale_reference(q, k, v, q_offset=0, window=1024, scales=(64, 1024))
    assert rel_rms(out, ref) < TOL[torch.bfloat16]


@pytest.mark.gpu
@pytest.mark.parametrize("b, s, t, rules", [
    (1, 32768, 1, {}), (8, 32768, 1, {}), (1, 131072, 1, {}), (1, 32768, 4, dict(window=4096, sink=4)),
])
def test_gpu_decode_bf16(b, s, t, rules, poison):
    from ollm_triton.kernels.attention_schedule import decode_block_ids

    q, k, v = qkv(b, 32, 8, t, s, 128, torch.bfloat16, seed=2)
    if rules:
        rules = dict(rules, block_ids=decode_block_ids(s, t, 64, **rules, device="cuda"))
    out = poison(torch.empty_like(q))
    flash_decode(q, k, v, out=out, **rules)
    ref = decode_reference(q, k, v, compute_dtype=torch.float64, **rules)
    assert rel_rms(out, ref) < TOL[torch.bfloat16]
