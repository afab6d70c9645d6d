"""The quantized decode of the static step (kernels/kv_quant_decode.py `quant_decode_varlen`): one token per row,
each row at its own length, against the float64 reference of the same storage."""

from __future__ import annotations

import pytest
import torch

from ollm_triton.kernels import kv_quant_decode as KQ
from ollm_triton.kernels import quant as Q
from ollm_triton.kernels.kv_quant_decode import quant_decode_varlen, quant_decode_varlen_ref, varlen_launch


def _storage(b, h, d, cap, res_cap, bits, group, value_group, symmetric, dtype, device):
    """Random K/V quantized by the reference quantizers into [B, H, cap, ...] codes, plus a random residual."""
    g = torch.Generator().manual_seed(0)
    k = torch.randn(b, h, cap, d, generator=g).to(dtype)
    v = torch.randn(b, h, cap, d, generator=g).to(dtype)
    sdtype = Q.scale_dtype_for(dtype)
    kc, ks, kz = Q.quantize_keys_ref(k, bits, group, symmetric, sdtype)
    vc, vs, vz = Q.quantize_values_ref(v, bits, value_group, symmetric, sdtype)
    kr = torch.randn(b, h, res_cap, d, generator=g).to(dtype)
    vr = torch.randn(b, h, res_cap, d, generator=g).to(dtype)
    return [x.to(device) if x is not None else None for x in (kc, ks, kz, vc, vs, vz, kr, vr)]


@pytest.mark.interpreter
@pytest.mark.parametrize("bits,symmetric,dtype", [(4, False, torch.float16), (2, True, torch.float16),
                                                  (8, False, torch.float32)])
def test_varlen_rows_match_reference(bits, symmetric, dtype):
    b, hq, h, d, group, block_k, res_cap, cap = 4, 4, 2, 32, 16, 16, 32, 128
    store = _storage(b, h, d, cap, res_cap, bits, group, d, symmetric, dtype, "cpu")
    # rows: empty quantized part, one token; a row inside its first group; group boundaries; the longest row
    row_quant = [0, 16, 64, 128]
    lengths = [1, 16 + 23, 64 + 32, 128 + 1]
    q = torch.randn(b, hq, 1, d, generator=torch.Generator().manual_seed(1)).to(dtype)
    out = torch.full_like(q, float("nan"))  # poisoned: every row must be written
    got = quant_decode_varlen(q, *store, torch.tensor(row_quant), torch.tensor(lengths), bits=bits, key_group=group,
                              value_group=d, block_k=block_k, num_splits=3, out=out)
    want = quant_decode_varlen_ref(q, *store, row_quant, lengths, bits=bits, key_group=group, value_group=d,
                                   compute_dtype=torch.float64)
    tol = 2e-2 if dtype == torch.float16 else 1e-4
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), want.double(), atol=tol, rtol=tol)


@pytest.mark.interpreter
@pytest.mark.parametrize("min_blocks,res_chunk", [(2, 16), (1, 32)])
def test_varlen_work_follows_each_rows_length(monkeypatch, min_blocks, res_chunk):
    """The launch is fixed by the capacity, the work by each row's length: a row's quantized blocks are shared by
    the quantized splits (the ones past them exit at once) and its window by residual splits of res_chunk tokens.
    Rows end mid-split, at a split's last block and past every split's even share; windows of 1 token, of more
    than one chunk and a partial last chunk. The split partials are poisoned: every program, one that exits at
    once included, must write its own; odd head_dim 48 (three value groups a token)."""
    b, hq, h, d, group, block_k, res_cap, cap = 5, 3, 1, 48, 16, 16, 40, 144
    store = _storage(b, h, d, cap, res_cap, 4, group, 16, False, torch.float32, "cpu")
    row_quant = [0, 16, 48, 112, 144]  # 0, 1, 3, 7 and 9 quantized blocks over 3 quantized splits
    lengths = [1, 16 + 1, 48 + 40, 112 + 17, 144 + 33]
    empty = KQ._partials
    monkeypatch.setattr(KQ, "_partials", lambda *a: tuple(x.fill_(float("nan")) for x in empty(*a)))
    q = torch.randn(b, hq, 1, d, generator=torch.Generator().manual_seed(1))
    got = quant_decode_varlen(q, *store, torch.tensor(row_quant), torch.tensor(lengths), bits=4, key_group=group,
                              value_group=16, block_k=block_k, num_splits=3, min_blocks=min_blocks,
                              res_chunk=res_chunk, out=torch.full_like(q, float("nan")))
    assert KQ.LAST_LAUNCH["splits"] == 3 + -(-res_cap // res_chunk)
    want = quant_decode_varlen_ref(q, *store, row_quant, lengths, bits=4, key_group=group, value_group=16,
                                   compute_dtype=torch.float64)
    torch.testing.assert_close(got.double(), want.double(), atol=1e-4, rtol=1e-4)


def test_varlen_launch_fills_one_wave_at_capacity_and_refuses_bad_chunks(monkeypatch):
    """On a 132-SM device int4 runs 3 programs an SM, 49 a KV head at batch 1 with 8 KV heads: the quantized
    splits are the fewest that give a full row its share (32k: 264 blocks of 128 -> 6 a split, 44 splits; 128k:
    1032 -> 22, 47 splits), and at 8k (72 blocks) they keep >= 2 blocks each."""
    monkeypatch.setattr(KQ, "num_sms", lambda device: 132)
    cuda = torch.device("cuda")  # a device object only: nothing runs on it
    assert varlen_launch(4, cuda, 8, 264) == (44, 168)
    assert varlen_launch(4, cuda, 8, 1032) == (47, 168)
    assert varlen_launch(4, cuda, 8, 72) == (36, 168)
    assert varlen_launch(4, cuda, 8, 72, min_blocks=1) == (36, 168)  # one wave: 49 splits would give 2 blocks too
    assert varlen_launch(8, cuda, 8, 264) == (33, None)  # int8: 2 an SM, uncapped
    assert varlen_launch(4, cuda, 8, 264, num_splits=7) == (7, 168)
    q = torch.zeros(1, 2, 1, 32)
    store = _storage(1, 2, 32, 32, 32, 4, 16, 32, False, torch.float32, "cpu")
    with pytest.raises(ValueError, match="res_chunk must be a positive multiple of 16"):
        quant_decode_varlen(q, *store, torch.tensor([0]), torch.tensor([1]), bits=4, key_group=16, value_group=32,
                            block_k=16, res_chunk=24)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("opts", [{}, {"min_blocks": 1, "res_chunk": 32}, {"min_blocks": 4, "res_chunk": 512}])
@pytest.mark.parametrize("kernel", [None, "triton"])  # None: the Gluon MMA kernel on a GPU at these shapes
def test_varlen_rows_match_reference_gpu(bits, opts, kernel):
    b, hq, h, d, group, res_cap, cap = 5, 32, 8, 128, 128, 256, 4096
    store = _storage(b, h, d, cap, res_cap, bits, group, d, False, torch.bfloat16, "cuda")
    row_quant = [0, 128, 1024, 2048, 4096]
    lengths = [1, 128 + 63, 1024 + 129, 2048 + 255, 4096 + 1]
    q = torch.randn(b, hq, 1, d, device="cuda", dtype=torch.bfloat16)
    got = quant_decode_varlen(q, *store, torch.tensor(row_quant, device="cuda"), torch.tensor(lengths, device="cuda"),
                              bits=bits, key_group=group, value_group=d, block_k=128,
                              out=torch.full_like(q, float("nan")), kernel=kernel, **opts)
    assert KQ.LAST_LAUNCH["kernel"] == ("triton.varlen" if kernel else "mma.varlen")
    want = quant_decode_varlen_ref(q, *store, row_quant, lengths, bits=bits, key_group=group, value_group=d,
                                   compute_dtype=torch.float64)
    torch.testing.assert_close(got.double(), want.double(), atol=2e-2, rtol=2e-2)
