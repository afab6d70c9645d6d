"""The Gluon MMA decode over packed codes (kernels/kv_quant_decode_mma.py).

On the CPU: a numpy mirror of the kernel's data flow (the PTX unpack, bit for bit, then the same joins, reshapes and
permutes, whose logical meaning numpy shares) must put the code of channel key_channels()[k] / value_channels()[r]
in each operand slot; this is the bookkeeping the kernel's channel tables rest on. On the GPU: the kernel itself
against the float64 reference, at odd lengths, every width, with and without the residual tail, windows, GQA rows.
"""

import numpy as np
import pytest
import torch
from test_kernels_quant import _quantized_cache, rel_rms

from ollm_triton.kernels import kv_quant_decode_mma as M
from ollm_triton.kernels import quant as Q
from ollm_triton.kernels.kv_quant_decode import quant_decode, quant_decode_ref, visible_mask

SHAPES = [(bits, d) for bits in (2, 4, 8) for d in (64, 128, 256) if d * bits >= 256]


def _lop3(src, mask):
    mask = np.uint32(mask | mask << 16)
    return (src & mask) | np.uint32(0x64006400)


def _codes(n, d, bits, seed):
    """Random codes [n, d] and their bytes [n, d / P] as the cache packs them (quant.pack_ref)."""
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, 1 << bits, size=(n, d), dtype=np.uint32)
    packed = Q.pack_ref(torch.from_numpy(codes.astype(np.uint8)), bits).numpy()
    assert packed.shape == (n, d * bits // 8) and packed.dtype == np.uint8
    return codes, packed


def _expected(codes, channels, bits, offset=1024):
    """offset + c 2^s of each operand slot: the fp16 bits 0x6400 | (c << s) mean 1024 + c 2^s, which the asm
    takes to c 2^s with a sub.f16x2."""
    p = 8 // bits
    c = codes[:, channels].astype(np.float64)  # [n, slots]
    return (offset + c * 2.0 ** (bits * (channels % p))).T  # [slots, n]


@pytest.mark.parametrize("bits,d", SHAPES)
def test_channel_tables_are_permutations(bits, d):
    assert sorted(M.key_channels(bits, d)) == list(range(d))
    assert sorted(M.value_channels(bits, d)) == list(range(d))


@pytest.mark.parametrize("bits,d", SHAPES)
@pytest.mark.parametrize("exact", [True, False])
def test_key_operand_mirror(bits, d, exact):
    """_key_operand: words [BN, 4 t, WK w] -> UK lop3 outputs -> [BN, (w, u), t] -> halves -> [D, BN]."""
    s, bn = M.layout_sizes(bits, d), 16
    codes, packed = _codes(bn, d, bits, seed=bits * d)
    w = packed.view(np.uint32).reshape(bn, 4, s["WK"])
    outs = [_lop3(w >> np.uint32(8) if u % 2 else w, ((1 << bits) - 1) << (bits * (u // 2))) for u in range(s["UK"])]
    x = np.stack(outs, -1).reshape(bn, 4, s["WK"] * s["UK"]).transpose(0, 2, 1).reshape(bn, d // 2)
    kt = np.ascontiguousarray(x).view(np.float16).reshape(bn, d).T.astype(np.float64)  # little-endian: low half first
    if exact:  # the asm's sub.f16x2
        kt -= 1024
        assert M.key_unpack_asm(bits, True).count("sub.f16x2") == s["UK"]
    np.testing.assert_array_equal(kt, _expected(codes, M.key_channels(bits, d), bits, offset=0 if exact else 1024))


@pytest.mark.parametrize("bits,d", SHAPES)
def test_value_operand_mirror(bits, d):
    """_value_operand: lane (g, t) loads words VW g + vw of keys 16 j + 8 a + 2 t + e; prmt pairs keys e = 0, 1."""
    s, bn = M.layout_sizes(bits, d), 32
    codes, packed = _codes(bn, d, bits, seed=7 + bits * d)
    words = packed.view(np.uint32).reshape(bn, 8, s["VW"])  # [key, g, vw]
    w = words.reshape(bn // 16, 2, 4, 2, 8, s["VW"])  # key = 16 j + 8 a + 2 t + e
    wa, wb = np.moveaxis(w, 3, -1)[..., 0], np.moveaxis(w, 3, -1)[..., 1]
    lo, hi = np.uint32(0xFFFF), np.uint32(0xFFFF0000)
    x0 = (wa & lo) | (wb << np.uint32(16))   # prmt 0x5410: bytes a0 a1 b0 b1
    x1 = (wa >> np.uint32(16)) | (wb & hi)   # prmt 0x7632: bytes a2 a3 b2 b3
    srcs = (x0, x0 >> np.uint32(8), x1, x1 >> np.uint32(8))
    outs = [_lop3(srcs[u % 4], ((1 << bits) - 1) << (bits * (u // 4))) for u in range(s["UV"])]
    x = np.stack(outs, -1).transpose(4, 5, 3, 0, 1, 2).reshape(d, bn // 2)
    vt = np.ascontiguousarray(x).view(np.float16).reshape(d, bn).astype(np.float64) - 1024  # the asm's sub.f16x2
    np.testing.assert_array_equal(vt, _expected(codes, M.value_channels(bits, d), bits, offset=0))


def test_asm_matches_the_mirror_masks():
    """The PTX strings use the masks and byte selectors the mirrors above assume."""
    assert "0x000f000f" in M.key_unpack_asm(4) and "0x00f000f0" in M.key_unpack_asm(4)
    assert "shr.b32 s, $4, 8" in M.key_unpack_asm(4)
    v = M.value_unpack_asm(2)
    assert "prmt.b32 x0, $16, $17, 0x5410" in v and "prmt.b32 x1, $16, $17, 0x7632" in v and "0x00c000c0" in v
    assert v.count("sub.f16x2") == 16 and "mov.b32 m, 0x64006400" in v


def test_tail_visits():
    """The residual tail's blocks for the MMA kernel, cut from the schedule's blocks past n_quant."""
    from ollm_triton.kernels.kv_quant_decode import _tail_visits
    ph = torch.zeros(1)
    assert _tail_visits(None, 128, 1024, 1024 + 70, "cpu", ph, 32)[0::2] == (32, 35)
    assert _tail_visits(None, 128, 1024, 1024 + 70, "cpu", ph, 32)[3] == 32  # blocks 32..34 are the tail
    ids = torch.tensor([0, 7, 8, 9], dtype=torch.int32)
    bk, tail, n, first = _tail_visits(ids, 128, 1024, 1024 + 70, "cpu", ph, 64)
    assert (bk, n, first) == (64, 2, 0) and tail.tolist() == [16, 17]  # block 9 lies past kv_len


def test_mma_kernel_refused_clearly_on_cpu():
    store, _, _ = _quantized_cache(1, 1, 128, 128, 4, 4, 128, 128, False, torch.float16, "cpu")
    q = torch.randn(1, 4, 1, 128, dtype=torch.float16)
    kw = dict(n_quant=128, kv_len=132, bits=4, key_group=128, value_group=128, block_k=128)
    with pytest.raises(ValueError, match="kernel='mma' cannot serve this call: it runs on a GPU only"):
        quant_decode(q, *store, kernel="mma", **kw)
    with pytest.raises(ValueError, match="kernel must be"):
        quant_decode(q, *store, kernel="gluon", **kw)


# ---------------------------------------------------------------------------------------------- GPU

GPU_CASES = [
    # bits, d, gq, t, n_quant, n_res, symmetric, window, sink, blocks
    (4, 128, 4, 1, 4096, 100, False, 0, 0, None),
    (4, 128, 4, 1, 128, 1, False, 0, 0, None),
    (4, 128, 4, 1, 1024 + 256, 0, False, 0, 0, None),  # no residual tail: the MMA kernel writes every split
    (8, 128, 4, 1, 1280, 63, False, 0, 0, None),
    (2, 128, 4, 1, 1280, 129, False, 0, 0, None),
    (4, 128, 4, 1, 640, 5, True, 0, 0, None),
    (8, 128, 4, 1, 384, 17, True, 0, 0, None),
    (4, 64, 4, 1, 512, 33, False, 0, 0, None),
    (8, 64, 8, 1, 512, 3, False, 0, 0, None),  # 8 query rows a KV head
    (4, 128, 4, 2, 1024, 31, False, 0, 0, None),  # two new tokens: causal inside the quantized region's tail
    (4, 128, 4, 1, 2048, 70, False, 600, 4, [0, 10, 11, 12, 13, 14, 15, 16]),  # sliding window over packed blocks
    (2, 256, 2, 1, 256, 9, False, 0, 0, None),
]


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_CASES)
def test_mma_decode_bf16_gpu(case):
    bits, d, gq, t, n_quant, n_res, symmetric, window, sink, blocks = case
    b, hkv, group = 2, 3, 128
    store, k_deq, v_deq = _quantized_cache(b, hkv, d, n_quant, n_res, bits, group, d, symmetric, torch.bfloat16,
                                           "cuda", seed=n_quant + bits)
    q = torch.randn(b, hkv * gq, t, d, device="cuda", dtype=torch.bfloat16)
    kv_len = n_quant + n_res
    block_ids = torch.tensor(blocks, dtype=torch.int32) if blocks is not None else None
    kw = dict(n_quant=n_quant, kv_len=kv_len, bits=bits, key_group=group, value_group=d, block_ids=block_ids,
              window=window, sink=sink, block_k=128)
    out = torch.full_like(q, float("nan"))
    quant_decode(q, *store, kernel="mma", out=out, **kw)
    mask = visible_mask(t, kv_len, block_ids=block_ids, window=window, sink=sink, block_k=128, device="cuda")
    ref = quant_decode_ref(q, k_deq, v_deq, mask)
    assert not out.isnan().any()
    assert rel_rms(ref, out) < 1e-2
    tri = quant_decode(q, *store, kernel="triton", **kw)
    assert rel_rms(tri.float(), out.float()) < 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("bn", [32, 64, 128])
def test_mma_decode_block_n_gpu(bits, bn):
    """Every step size over the same cache, a window schedule included."""
    store, k_deq, v_deq = _quantized_cache(1, 2, 128, 1280, 63, bits, 128, 128, False, torch.bfloat16, "cuda")
    q = torch.randn(1, 8, 1, 128, device="cuda", dtype=torch.bfloat16)
    ids = torch.tensor([0, 4, 5, 6, 7, 8, 9, 10], dtype=torch.int32)
    kw = dict(n_quant=1280, kv_len=1343, bits=bits, key_group=128, value_group=128, block_k=128, kernel="mma",
              mma_block_n=bn)
    for block_ids, window, sink in ((None, 0, 0), (ids, 700, 2)):
        out = quant_decode(q, *store, block_ids=block_ids, window=window, sink=sink, **kw)
        mask = visible_mask(1, 1343, block_ids=block_ids, window=window, sink=sink, block_k=128, device="cuda")
        assert rel_rms(quant_decode_ref(q, k_deq, v_deq, mask), out) < 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("splits", [1, 7, 64])
def test_mma_decode_splits_gpu(splits):
    """Every split count gives the same answer (empty splits, a split per visit)."""
    store, k_deq, v_deq = _quantized_cache(1, 8, 128, 8192, 40, 4, 128, 128, False, torch.bfloat16, "cuda")
    q = torch.randn(1, 32, 1, 128, device="cuda", dtype=torch.bfloat16)
    out = quant_decode(q, *store, n_quant=8192, kv_len=8232, bits=4, key_group=128, value_group=128, block_k=128,
                       kernel="mma", num_splits=splits)
    ref = quant_decode_ref(q, k_deq, v_deq, visible_mask(1, 8232, device="cuda"))
    assert rel_rms(ref, out) < 1e-2


@pytest.mark.gpu
def test_mma_decode_really_reads_the_codes_gpu():
    """Corrupting one byte column of the quantized values, then of the keys, must move the output (a path that
    skipped the codes, or read them from the wrong place, would not)."""
    store, _, _ = _quantized_cache(1, 1, 128, 256, 4, 4, 128, 128, False, torch.bfloat16, "cuda")
    q = torch.randn(1, 4, 1, 128, device="cuda", dtype=torch.bfloat16, generator=torch.Generator("cuda").manual_seed(0))
    kw = dict(n_quant=256, kv_len=260, bits=4, key_group=128, value_group=128, block_k=128, kernel="mma")
    before = quant_decode(q, *store, **kw)
    store[3][0, 0, :256, 7] ^= 0xFF  # channels 14 and 15 of every quantized value
    mid = quant_decode(q, *store, **kw)
    store[0][0, 0, :256, 3] ^= 0xFF  # channels 6 and 7 of every quantized key
    after = quant_decode(q, *store, **kw)
    assert (before - mid)[..., 14:16].abs().min() > 1e-2 and (mid - after).abs().max() > 1e-2
