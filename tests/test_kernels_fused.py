"""The fused decode-path kernels (RMSNorm + residual, RoPE + cache write, SiLU-gate, decode over a static buffer
with device lengths) against float64 references: the interpreter on the CPU (fp32/fp16), bf16 on the GPU."""

import pytest
import torch
import torch.nn.functional as F

from ollm_triton.kernels.attention_decode_varlen import (
    decode_varlen,
    decode_varlen_kernel,
    decode_varlen_op,
    decode_varlen_reference,
)
from ollm_triton.kernels.mlp import silu_mul, silu_mul_kernel, silu_mul_op, silu_mul_reference
from ollm_triton.kernels.norm import add_rmsnorm_op, rmsnorm, rmsnorm_kernel, rmsnorm_op, rmsnorm_reference
from ollm_triton.kernels.rope import (
    rope_kernel,
    rope_qk,
    rope_qk_op,
    rope_qk_reference,
    rope_write_kv,
    rope_write_kv_op,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}  # relative RMS error vs float64


def rel_rms(out, ref):
    assert not out.isnan().any(), "NaN in the output: an element was left unwritten"
    return ((out.double() - ref.double()).pow(2).mean().sqrt() / ref.double().pow(2).mean().sqrt()).item()


def randn(*shape, dtype=torch.float32, seed=0, device=DEVICE):
    g = torch.Generator(device=device).manual_seed(seed)
    return torch.randn(*shape, generator=g, device=device, dtype=torch.float32).to(dtype)


def tables(positions, d, dtype, device=DEVICE, theta=10000.0):
    inv = 1.0 / theta ** (torch.arange(0, d, 2, device=device).float() / d)
    ang = positions.float().to(device)[..., None] * inv
    ang = torch.cat((ang, ang), dim=-1)
    return ang.cos().to(dtype), ang.sin().to(dtype)


# ---- RMSNorm (+ residual) -------------------------------------------------------------------------------------

NORM_CASES = [(1, 64, torch.float32), (63, 37, torch.float32), (129, 200, torch.float16), (7, 1000, torch.float16),
              (2, 1, torch.float32)]


@pytest.mark.interpreter
@pytest.mark.parametrize("rows, hidden, dtype", NORM_CASES)
@pytest.mark.parametrize("with_residual", [False, True])
def test_rmsnorm_matches_float64(rows, hidden, dtype, with_residual, poison):
    x = randn(rows, hidden, dtype=dtype, seed=1)
    res = randn(rows, hidden, dtype=dtype, seed=2) if with_residual else None
    w = (1 + 0.1 * randn(hidden, seed=3)).to(dtype)
    out = poison(torch.empty(rows, hidden, dtype=dtype, device=DEVICE))
    summed = poison(torch.empty(rows, hidden, dtype=dtype, device=DEVICE))
    got = rmsnorm_kernel(x, w, 1e-5, res, out=out, residual_out=summed if with_residual else None)
    ref = rmsnorm_reference(x, w, 1e-5, res, compute_dtype=torch.float64)
    if with_residual:
        assert got[0] is not None and rel_rms(out, ref[0]) < TOL[dtype] and rel_rms(summed, ref[1]) < TOL[dtype]
        # the new residual is exactly the dtype sum, as the eager `h + delta`
        assert torch.equal(summed, x + res)
    else:
        assert rel_rms(out, ref) < TOL[dtype]
    # the eager formula (what the CPU runs) agrees with the kernel to rounding
    eager = rmsnorm_reference(x, w, 1e-5, res)
    eager = eager[0] if with_residual else eager
    assert rel_rms(out, eager.double()) < TOL[dtype]


@pytest.mark.interpreter
def test_rmsnorm_3d_and_bad_weight():
    x = randn(2, 5, 48, seed=4)
    w = 1 + 0.1 * randn(48, seed=5)
    y = rmsnorm(x, w, 1e-6, use_kernel=True)
    assert y.shape == x.shape and rel_rms(y, rmsnorm_reference(x, w, 1e-6, compute_dtype=torch.float64)) < 1e-5
    with pytest.raises(ValueError, match=r"weight must be \[48\]"):
        rmsnorm(x, w[:10], 1e-6)
    with pytest.raises(ValueError, match="residual must have"):
        rmsnorm(x, w, 1e-6, residual=x[:, :2])


# ---- RoPE (+ cache write) ------------------------------------------------------------------------------------

# (B, T, Hq, Hkv, D, dtype, per-sequence positions)
ROPE_CASES = [
    (1, 1, 4, 2, 64, torch.float32, False),
    (2, 63, 3, 1, 16, torch.float32, True),
    (1, 129, 8, 8, 128, torch.float16, False),
    (3, 5, 2, 1, 10, torch.float16, True),  # half = 5: masked lanes
]


@pytest.mark.interpreter
@pytest.mark.parametrize("b, t, hq, hkv, d, dtype, per_seq", ROPE_CASES)
def test_rope_qk_matches_float64(b, t, hq, hkv, d, dtype, per_seq):
    q, k = randn(b, t, hq, d, dtype=dtype, seed=6), randn(b, t, hkv, d, dtype=dtype, seed=7)
    pos = (torch.arange(t)[None] + 17 * torch.arange(b)[:, None]) if per_seq else torch.arange(5, 5 + t)
    cos, sin = tables(pos, d, dtype)
    q_rot, k_rot = rope_kernel(q, k, cos, sin)
    rq, rk = rope_qk_reference(q, k, cos, sin, compute_dtype=torch.float64)
    assert q_rot.shape == (b, hq, t, d) and k_rot.shape == (b, hkv, t, d)
    assert rel_rms(q_rot, rq) < TOL[dtype] and rel_rms(k_rot, rk) < TOL[dtype]
    eq, ek = rope_qk_reference(q, k, cos, sin)
    assert rel_rms(q_rot, eq.double()) < TOL[dtype] and rel_rms(k_rot, ek.double()) < TOL[dtype]
    # rotation changes the input (a kernel that copied would fail above, but make it explicit)
    assert rel_rms(q_rot, q.transpose(1, 2).double()) > 1e-2


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rope_write_kv_writes_only_its_slots(dtype, poison):
    b, t, hq, hkv, d, cap = 3, 4, 4, 2, 32, 70
    q, k, v = (randn(b, t, h, d, dtype=dtype, seed=s) for s, h in ((8, hq), (9, hkv), (10, hkv)))
    slots = torch.tensor([0, 33, 66], device=DEVICE)  # the last row runs past cap: those writes are dropped
    pos = slots.cpu()[:, None] + torch.arange(t)[None]
    cos, sin = tables(pos, d, dtype)
    kc = poison(torch.empty(b, hkv, cap, d, dtype=dtype, device=DEVICE))
    vc = poison(torch.empty(b, hkv, cap, d, dtype=dtype, device=DEVICE))
    q_rot = rope_write_kv(q, k, v, cos, sin, kc, vc, slots, use_kernel=True)
    rq, rk = rope_qk_reference(q, k, cos, sin, compute_dtype=torch.float64)
    assert rel_rms(q_rot, rq) < TOL[dtype]
    for i, s in enumerate(slots.tolist()):
        n = min(t, cap - s)
        assert rel_rms(kc[i, :, s : s + n], rk[i, :, :n]) < TOL[dtype]
        assert torch.equal(vc[i, :, s : s + n], v[i, :n].transpose(0, 1))
        written = torch.zeros(cap, dtype=torch.bool)
        written[s : s + n] = True
        assert kc[i][:, ~written].isnan().all() and vc[i][:, ~written].isnan().all(), "wrote outside its slots"
    # the reference path writes the same values
    kr, vr = torch.zeros_like(kc), torch.zeros_like(vc)
    ok = torch.tensor([0, 33, 50], device=DEVICE)  # in range for the reference's index_put
    rope_write_kv(q, k, v, *tables(ok.cpu()[:, None] + torch.arange(t)[None], d, dtype), kr, vr, ok, use_kernel=False)
    kk, vk = torch.zeros_like(kc), torch.zeros_like(vc)
    rope_write_kv(q, k, v, *tables(ok.cpu()[:, None] + torch.arange(t)[None], d, dtype), kk, vk, ok, use_kernel=True)
    assert rel_rms(kk, kr.double()) < TOL[dtype] and torch.equal(vk, vr)


def test_rope_bad_input_is_one_line():
    q, k = torch.zeros(1, 3, 4, 8), torch.zeros(1, 3, 2, 8)
    with pytest.raises(ValueError, match=r"cos must be \[T, D\]"):
        rope_qk(q, k, torch.zeros(4, 8), torch.zeros(4, 8))
    with pytest.raises(ValueError, match="even head_dim"):
        rope_qk(torch.zeros(1, 3, 4, 7), torch.zeros(1, 3, 2, 7), torch.zeros(3, 7), torch.zeros(3, 7))
    with pytest.raises(ValueError, match=r"slots must be \[B\]"):
        rope_write_kv(q, k, k, torch.zeros(3, 8), torch.zeros(3, 8), torch.zeros(1, 2, 9, 8), torch.zeros(1, 2, 9, 8),
                      torch.zeros(2, dtype=torch.long))


# ---- SiLU gate ---------------------------------------------------------------------------------------------------


@pytest.mark.interpreter
@pytest.mark.parametrize("rows, m, dtype", [(1, 37, torch.float32), (63, 1500, torch.float16),
                                            (129, 100, torch.float32)])
@pytest.mark.parametrize("fused", [True, False])
def test_silu_mul_matches_float64(rows, m, dtype, fused, poison):
    gu = randn(rows, 2 * m, dtype=dtype, seed=11) * 3
    gate, up = (gu, None) if fused else (gu[:, :m].contiguous(), gu[:, m:].contiguous())
    out = poison(torch.empty(rows, m, dtype=dtype, device=DEVICE))
    g, u = (gu[:, :m], gu[:, m:]) if fused else (gate, up)  # views of one [2M] output, or two tensors
    silu_mul_kernel(g, u, out=out)
    ref = silu_mul_reference(gate, up, compute_dtype=torch.float64)
    assert rel_rms(out, ref) < TOL[dtype]
    assert rel_rms(silu_mul(gate, up, use_kernel=True), F.silu(g) * u) < TOL[dtype]
    with pytest.raises(ValueError, match="even last dim"):
        silu_mul(gu[:, :3])


# ---- decode over a static buffer with device lengths --------------------------------------------------------------

# (lengths, cap, Hq, Hkv, D, dtype)
VARLEN_CASES = [
    ([1, 63, 129], 150, 8, 2, 64, torch.float32),
    ([129], 129, 4, 4, 128, torch.float16),
    ([5, 1, 200, 64], 257, 6, 3, 16, torch.float16),
    ([40], 1000, 4, 1, 32, torch.float32),  # mostly empty buffer: most splits see nothing
]


@pytest.mark.interpreter
@pytest.mark.parametrize("lengths, cap, hq, hkv, d, dtype", VARLEN_CASES)
def test_decode_varlen_matches_float64(lengths, cap, hq, hkv, d, dtype, poison):
    b = len(lengths)
    q = randn(b, hq, d, dtype=dtype, seed=12)
    k, v = randn(b, hkv, cap, d, dtype=dtype, seed=13), randn(b, hkv, cap, d, dtype=dtype, seed=14)
    lens = torch.tensor(lengths, device=DEVICE, dtype=torch.int32)
    ref = decode_varlen_reference(q, k, v, lens, compute_dtype=torch.float64)
    for i, n in enumerate(lengths):  # the kernel must never read past a sequence's length
        k[i, :, n:] = float("nan")
        v[i, :, n:] = float("nan")
    out = poison(torch.empty_like(q))
    decode_varlen_kernel(q, k, v, lens, out=out)
    assert rel_rms(out, ref) < TOL[dtype]
    # each row equals plain softmax attention over its own keys only
    for i, n in enumerate(lengths):
        qi = q[i].double().reshape(hkv, hq // hkv, d)
        p = torch.softmax(qi @ k[i, :, :n].double().transpose(-1, -2) / d**0.5, -1)
        assert rel_rms(out[i], (p @ v[i, :, :n].double()).reshape(hq, d)) < TOL[dtype]


def test_decode_varlen_bad_input():
    with pytest.raises(ValueError, match=r"lengths must be \[B\]"):
        decode_varlen(torch.zeros(2, 4, 16), torch.zeros(2, 2, 8, 16), torch.zeros(2, 2, 8, 16), torch.ones(3))
    with pytest.raises(ValueError, match="does not fit the cache"):
        decode_varlen(torch.zeros(2, 3, 16), torch.zeros(2, 2, 8, 16), torch.zeros(2, 2, 8, 16), torch.ones(2))


# ---- torch.library: fake tensors, schema, and compile sees through -------------------------------------------------


def test_custom_ops_opcheck_and_compile():
    x, r, w = torch.randn(3, 32), torch.randn(3, 32), torch.rand(32) + 0.5
    q, k, v = torch.randn(2, 1, 4, 16), torch.randn(2, 1, 2, 16), torch.randn(2, 1, 2, 16)
    cos, sin = tables(torch.tensor([[3], [5]]), 16, torch.float32, device="cpu")
    kc, vc = torch.zeros(2, 2, 8, 16), torch.zeros(2, 2, 8, 16)
    slots, lens = torch.tensor([3, 5]), torch.tensor([4, 6])
    cases = [(rmsnorm_op, (x, w, 1e-5)), (add_rmsnorm_op, (x, r, w, 1e-5)), (silu_mul_op, (x, r)),
             (rope_qk_op, (q, k, cos, sin)), (rope_write_kv_op, (q, k, v, cos, sin, kc, vc, slots)),
             (decode_varlen_op, (q[:, 0], kc, vc, lens))]
    for op, args in cases:
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))

    def step(x, r, w, q, k, v, cos, sin, kc, vc, slots, lens):
        normed, summed = add_rmsnorm_op(x, r, w, 1e-5)
        q_rot = rope_write_kv_op(q, k, v, cos, sin, kc, vc, slots)
        att = decode_varlen_op(q_rot[:, :, 0], kc, vc, lens)
        return silu_mul_op(normed, summed) + rmsnorm_op(x, w, 1e-5), att

    args = (x, r, w, q, k, v, cos, sin, kc.clone(), vc.clone(), slots, lens)
    eager = step(*args)
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)(x, r, w, q, k, v, cos, sin, kc.clone(),
                                                                        vc.clone(), slots, lens)
    assert all(torch.allclose(a, b_, atol=1e-6) for a, b_ in zip(eager, compiled, strict=True))


# ---- GPU: bf16 at the engine's sizes -----------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("rows", [1, 63, 129])
def test_gpu_bf16_norm_silu_rope(rows, poison):
    dt = torch.bfloat16
    h, m = 4096, 14336
    x, r = randn(rows, h, dtype=dt, seed=1), randn(rows, h, dtype=dt, seed=2)
    w = (1 + 0.1 * randn(h, seed=3)).to(dt)
    y, s = rmsnorm(x, w, 1e-5, residual=r)
    ref = rmsnorm_reference(x, w, 1e-5, r, compute_dtype=torch.float64)
    assert rel_rms(y, ref[0]) < TOL[dt] and torch.equal(s, x + r)
    eager = rmsnorm_reference(x, w, 1e-5, r)[0]
    assert (y.float() - eager.float()).abs().max().item() <= 2 ** -6 * eager.float().abs().max().item()
    gu = randn(rows, 2 * m, dtype=dt, seed=4)
    out = silu_mul(gu)
    assert rel_rms(out, silu_mul_reference(gu, compute_dtype=torch.float64)) < TOL[dt]
    # same rounding points as eager; Triton's exp/div approximations may move a value by one bf16 step
    eager = (F.silu(gu[:, :m]) * gu[:, m:]).float()
    assert ((out.float() - eager).abs() <= 2**-7 * eager.abs() + 1e-30).float().mean().item() > 0.999
    q = randn(1, rows, 32, 128, dtype=dt, seed=5)
    k, v = randn(1, rows, 8, 128, dtype=dt, seed=6), randn(1, rows, 8, 128, dtype=dt, seed=7)
    cos, sin = tables(torch.arange(1000, 1000 + rows), 128, dt)
    kc = poison(torch.empty(1, 8, 2048, 128, dtype=dt, device=DEVICE))
    vc = poison(torch.empty_like(kc))
    q_rot = rope_write_kv(q, k, v, cos, sin, kc, vc, torch.tensor([1000], device=DEVICE))
    rq, rk = rope_qk_reference(q, k, cos, sin, compute_dtype=torch.float64)
    assert rel_rms(q_rot, rq) < TOL[dt] and rel_rms(kc[:, :, 1000 : 1000 + rows], rk) < TOL[dt]
    assert torch.equal(vc[:, :, 1000 : 1000 + rows], v.transpose(1, 2))


@pytest.mark.gpu
@pytest.mark.parametrize("lengths", [[1], [63, 4096, 129, 2000], [32768]])
def test_gpu_bf16_decode_varlen(lengths, poison):
    dt, cap = torch.bfloat16, max(lengths)
    b = len(lengths)
    q = randn(b, 32, 128, dtype=dt, seed=8)
    k, v = randn(b, 8, cap, 128, dtype=dt, seed=9), randn(b, 8, cap, 128, dtype=dt, seed=10)
    lens = torch.tensor(lengths, device=DEVICE)
    out = poison(torch.empty_like(q))
    decode_varlen_kernel(q, k, v, lens, out=out)
    assert rel_rms(out, decode_varlen_reference(q, k, v, lens, compute_dtype=torch.float64)) < TOL[dt]
