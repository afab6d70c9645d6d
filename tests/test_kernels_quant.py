"""Quantize/pack references against float64, Triton quantize and fused quantized decode against the references."""

import pytest
import torch

from ollm_triton.kernels import quant as Q
from ollm_triton.kernels.kv_quant_decode import quant_decode, quant_decode_ref, visible_mask

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def rel_rms(ref: torch.Tensor, out: torch.Tensor) -> float:
    ref, out = ref.double(), out.double()
    return ((ref - out).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt()).item()


# ---------------------------------------------------------------------------------------------- packing


@pytest.mark.parametrize("bits", Q.BITS)
@pytest.mark.parametrize("n", [1, 3, 63, 129])
def test_pack_unpack_roundtrip_odd_lengths(bits, n):
    g = torch.Generator().manual_seed(n)
    codes = torch.randint(0, 2**bits, (2, 5, n), generator=g, dtype=torch.uint8)
    packed = Q.pack_ref(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape[-1] == -(-n // (8 // bits))
    assert torch.equal(Q.unpack_ref(packed, bits, n), codes)


def test_pack_layout_is_low_bits_first():
    codes = torch.tensor([[1, 2, 3, 0, 3]], dtype=torch.uint8)
    assert Q.pack_ref(codes, 2).tolist() == [[1 | 2 << 2 | 3 << 4, 3]]
    assert Q.pack_ref(torch.tensor([[5, 9, 15]], dtype=torch.uint8), 4).tolist() == [[5 | 9 << 4, 15]]


# ---------------------------------------------------------------------------------------------- references vs float64


def _step_bound(scale, bits, symmetric):
    # half a code step, plus float32 rounding of the arithmetic
    return scale.double() * 0.5 * (1 + 1e-3) + 1e-6


@pytest.mark.parametrize("bits", Q.BITS)
@pytest.mark.parametrize("group", [16, 32, 64, 128])
@pytest.mark.parametrize("symmetric", [False, True])
def test_keys_roundtrip_error_vs_float64(bits, group, symmetric):
    g = torch.Generator().manual_seed(bits * group)
    k = torch.randn(1, 2, 3 * group, 64, generator=g, dtype=torch.float64) * 3 + 1
    packed, scale, zero = Q.quantize_keys_ref(k, bits, group, symmetric, sdtype=torch.float32)
    assert packed.shape == (1, 2, 3 * group, 64 // (8 // bits)) and scale.shape == (1, 2, 3, 64)
    assert (zero is None) == symmetric
    deq = Q.dequantize_keys_ref(packed, scale, zero, bits, group, 64, symmetric, torch.float64)
    bound = _step_bound(scale, bits, symmetric).repeat_interleave(group, dim=2)
    assert ((deq - k).abs() <= bound).all()
    # the error is really bounded by the step: 2 bits must be much worse than 8
    err = rel_rms(k, deq)
    assert err < {8: 0.01, 4: 0.15, 2: 0.8 if symmetric else 0.5}[bits]


@pytest.mark.parametrize("bits", Q.BITS)
@pytest.mark.parametrize("group", [16, 32, 64])
@pytest.mark.parametrize("tokens", [1, 63, 129])
@pytest.mark.parametrize("symmetric", [False, True])
def test_values_roundtrip_error_vs_float64(bits, group, tokens, symmetric):
    g = torch.Generator().manual_seed(bits + tokens)
    v = torch.randn(2, 1, tokens, 64, generator=g, dtype=torch.float64)
    packed, scale, zero = Q.quantize_values_ref(v, bits, group, symmetric, sdtype=torch.float32)
    assert scale.shape == (2, 1, tokens, 64 // group)
    deq = Q.dequantize_values_ref(packed, scale, zero, bits, group, 64, symmetric, torch.float64)
    bound = _step_bound(scale, bits, symmetric).repeat_interleave(group, dim=3)
    assert ((deq - v).abs() <= bound).all()


def test_constant_group_and_fp16_scales():
    k = torch.full((1, 1, 32, 16), 0.3, dtype=torch.float16)  # zero range: scale falls back to 1
    packed, scale, zero = Q.quantize_keys_ref(k, 4, 32)
    assert scale.dtype == torch.float16
    deq = Q.dequantize_keys_ref(packed, scale, zero, 4, 32, 16)
    assert (deq - k.float()).abs().max() < 1e-3


def test_value_group_size():
    assert Q.value_group_size(128, 128) == 128
    assert Q.value_group_size(32, 128) == 32
    assert Q.value_group_size(128, 96) == 32
    assert Q.value_group_size(128, 80) == 16


# ---------------------------------------------------------------------------------------------- Triton quantize


def _check_same_quantization(ref, tri, deq, bits):
    """Codes may differ by one step where a value sits on a rounding tie (division vs reciprocal)."""
    (p_r, s_r, z_r), (p_t, s_t, z_t) = ref, tri
    torch.testing.assert_close(s_t, s_r, rtol=0, atol=0)
    if z_r is not None:
        torch.testing.assert_close(z_t, z_r, rtol=0, atol=0)
    d_r, d_t = deq(p_r, s_r, z_r), deq(p_t, s_t, z_t)
    # at most 1% of the codes, or one where there are fewer than 100 (96 codes at one token: a single tie is 1.04%,
    # which failed once on the H200 under the old "< 1%" rule)
    assert (p_t != p_r).sum() <= max(1, 0.01 * p_t.numel())
    step = (d_r - d_t).abs().max()
    assert step <= s_r.float().max() * 1.001


def _poisoned_out(poison, shapes, dtypes, device):
    pairs = zip(shapes, dtypes, strict=True)
    return tuple(None if s is None else poison(torch.empty(s, dtype=dt, device=device)) for s, dt in pairs)


@pytest.mark.interpreter
@pytest.mark.parametrize("bits", Q.BITS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("symmetric", [False, True])
def test_quantize_keys_triton_matches_ref(bits, dtype, symmetric, poison):
    group, d = 32, 48  # 48 channels: a partial channel block
    k = (torch.randn(2, 3, 2 * group, d, generator=torch.Generator().manual_seed(bits)) * 2).to(dtype).to(DEVICE)
    sd = Q.scale_dtype_for(dtype)
    p = 8 // bits
    out = _poisoned_out(poison, [(2, 3, 2 * group, d // p), (2, 3, 2, d), None if symmetric else (2, 3, 2, d)],
                        [torch.uint8, sd, sd], DEVICE)
    tri = Q.quantize_keys(k, bits, group, symmetric, out=out)
    ref = Q.quantize_keys_ref(k, bits, group, symmetric)
    deq = lambda pk, s, z: Q.dequantize_keys_ref(pk, s, z, bits, group, d, symmetric)  # noqa: E731
    _check_same_quantization(ref, tri, deq, bits)


@pytest.mark.interpreter
@pytest.mark.parametrize("bits", Q.BITS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("tokens", [1, 63, 129])
def test_quantize_values_triton_matches_ref(bits, dtype, tokens, poison):
    group, d, symmetric = 16, 48, bits == 8  # 3 groups (padded to 4 in the kernel)
    v = torch.randn(1, 2, tokens, d, generator=torch.Generator().manual_seed(bits + tokens)).to(dtype).to(DEVICE)
    sd = Q.scale_dtype_for(dtype)
    out = _poisoned_out(poison, [(1, 2, tokens, d // (8 // bits)), (1, 2, tokens, 3), None if symmetric else
                                 (1, 2, tokens, 3)], [torch.uint8, sd, sd], DEVICE)
    tri = Q.quantize_values(v, bits, group, symmetric, out=out)
    ref = Q.quantize_values_ref(v, bits, group, symmetric)
    deq = lambda pk, s, z: Q.dequantize_values_ref(pk, s, z, bits, group, d, symmetric)  # noqa: E731
    _check_same_quantization(ref, tri, deq, bits)


# ---------------------------------------------------------------------------------------------- fused decode


def _quantized_cache(b, h, d, n_quant, n_res, bits, group, value_group, symmetric, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(b, h, n_quant + n_res, d, generator=g) * 2
    v = torch.randn(b, h, n_quant + n_res, d, generator=g)
    k, v = k.to(dtype).to(device), v.to(dtype).to(device)
    kq = Q.quantize_keys_ref(k[:, :, :n_quant], bits, group, symmetric)
    vq = Q.quantize_values_ref(v[:, :, :n_quant], bits, value_group, symmetric)
    # the residual buffers are larger than what is held, as in the cache
    k_res = torch.zeros(b, h, n_res + 7, d, dtype=dtype, device=device)
    v_res = torch.zeros_like(k_res)
    k_res[:, :, :n_res], v_res[:, :, :n_res] = k[:, :, n_quant:], v[:, :, n_quant:]
    k_deq = torch.cat((Q.dequantize_keys_ref(*kq, bits, group, d, symmetric), k[:, :, n_quant:].float()), 2)
    v_deq = torch.cat((Q.dequantize_values_ref(*vq, bits, value_group, d, symmetric), v[:, :, n_quant:].float()), 2)
    return (kq[0], kq[1], kq[2], vq[0], vq[1], vq[2], k_res, v_res), k_deq, v_deq


DECODE_CASES = [
    # bits, group, value_group, n_quant, n_res, T, symmetric, window, sink, blocks, splits
    (4, 32, 32, 64, 17, 1, False, 0, 0, None, None),
    (2, 32, 32, 96, 0, 1, False, 0, 0, None, 3),
    (8, 32, 16, 32, 33, 3, False, 0, 0, None, None),  # two value groups, three new tokens
    (4, 16, 16, 48, 15, 1, True, 0, 0, None, 1),
    (4, 32, 32, 128, 1, 1, False, 40, 4, [0, 5, 6, 7, 8], None),  # sliding window over packed blocks
    (2, 16, 16, 0, 63, 1, True, 0, 0, None, None),  # nothing quantized yet
    (2, 16, 8, 32, 5, 2, False, 0, 0, None, 2),  # four planes, four value groups per token
]


@pytest.mark.interpreter
@pytest.mark.parametrize("case", DECODE_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fused_decode_matches_dequantize_then_attend(case, dtype, poison):
    bits, group, vg, n_quant, n_res, t, symmetric, window, sink, blocks, splits = case
    b, hkv, gq, d, block_k = 2, 2, 4, 32, 16
    store, k_deq, v_deq = _quantized_cache(b, hkv, d, n_quant, n_res, bits, group, vg, symmetric, dtype, DEVICE)
    q = torch.randn(b, hkv * gq, t, d).to(dtype).to(DEVICE)
    kv_len = n_quant + n_res
    block_ids = torch.tensor(blocks, dtype=torch.int32) if blocks is not None else None
    out = poison(torch.empty_like(q))
    quant_decode(q, *store, n_quant=n_quant, kv_len=kv_len, bits=bits, key_group=group, value_group=vg,
                 block_ids=block_ids, window=window, sink=sink, block_k=block_k, num_splits=splits, out=out)
    mask = visible_mask(t, kv_len, block_ids=block_ids, window=window, sink=sink, block_k=block_k)
    ref = quant_decode_ref(q, k_deq, v_deq, mask)
    assert not out.isnan().any()
    # float32 dots run as tf32 on a GPU
    assert rel_rms(ref, out) < {torch.float32: 1e-5 if DEVICE == "cpu" else 3e-3, torch.float16: 2e-3}[dtype]


@pytest.mark.interpreter
def test_fused_decode_really_reads_the_codes():
    """Corrupting one packed byte in a visible block must change the output (guards against a path that ignores
    the quantized region)."""
    store, _, _ = _quantized_cache(1, 1, 16, 32, 4, 4, 32, 16, False, torch.float32, DEVICE)
    q = torch.randn(1, 4, 1, 16, device=DEVICE)
    kw = dict(n_quant=32, kv_len=36, bits=4, key_group=32, value_group=16, block_k=16)
    before = quant_decode(q, *store, **kw)
    store[3][0, 0, 5, 2] ^= 0xFF  # v_codes
    after = quant_decode(q, *store, **kw)
    assert (before - after).abs().max() > 1e-4


def test_fused_decode_unpack_modes_checked():
    store, _, _ = _quantized_cache(1, 1, 16, 32, 4, 4, 32, 16, False, torch.float16, "cpu")
    q = torch.randn(1, 4, 1, 16, dtype=torch.float16)
    kw = dict(n_quant=32, kv_len=36, bits=4, key_group=32, value_group=16, block_k=16)
    with pytest.raises(ValueError, match="unpack must be one of"):
        quant_decode(q, *store, unpack="fast", **kw)
    with pytest.raises(ValueError, match="unpack must be one of"):
        quant_decode(q.float(), *store, unpack="magic", **kw)
    with pytest.raises(ValueError, match="needs a GPU"):
        quant_decode(q, *store, unpack="asm", **kw)


@pytest.mark.gpu
@pytest.mark.parametrize("bits", Q.BITS)
@pytest.mark.parametrize("unpack", ["asm", "magic"])
@pytest.mark.parametrize("n_quant,n_res", [(4096, 100), (128, 1), (1024 + 256, 63), (0, 129)])
def test_fused_decode_bf16_gpu(bits, unpack, n_quant, n_res):
    b, hkv, gq, d, group = 1, 8, 4, 128, 128
    store, k_deq, v_deq = _quantized_cache(b, hkv, d, n_quant, n_res, bits, group, 128, False, torch.bfloat16,
                                           "cuda")
    q = torch.randn(b, hkv * gq, 1, d, device="cuda", dtype=torch.bfloat16)
    out = torch.full_like(q, float("nan"))
    kv_len = n_quant + n_res
    quant_decode(q, *store, n_quant=n_quant, kv_len=kv_len, bits=bits, key_group=group, value_group=128,
                 block_k=128, unpack=unpack, kernel="triton", out=out)  # the MMA kernel: test_kernels_quant_mma.py
    ref = quant_decode_ref(q, k_deq, v_deq, visible_mask(1, kv_len, device="cuda"))
    assert rel_rms(ref, out) < 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("bits", Q.BITS)
def test_quantize_triton_bf16_gpu(bits):
    k = torch.randn(2, 8, 512, 128, device="cuda", dtype=torch.bfloat16)
    ref, tri = Q.quantize_keys_ref(k, bits, 128), Q.quantize_keys(k, bits, 128)
    _check_same_quantization(ref, tri, lambda p, s, z: Q.dequantize_keys_ref(p, s, z, bits, 128, 128), bits)
    ref, tri = Q.quantize_values_ref(k, bits, 128), Q.quantize_values(k, bits, 128)
    _check_same_quantization(ref, tri, lambda p, s, z: Q.dequantize_values_ref(p, s, z, bits, 128, 128), bits)
