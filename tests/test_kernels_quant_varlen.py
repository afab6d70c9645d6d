"""The quantized decode of the static step (kernels/kv_quant_decode.py `quant_decode_varlen`): one token per row,
each row at its own length, against the float64 reference of the same storage."""

from __future__ import annotations

import pytest
import torch

from ollm_triton.kernels import quant as Q
from ollm_triton.kernels.kv_quant_decode import quant_decode_varlen, quant_decode_varlen_ref


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


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("bits", [8, 4, 2])
def test_varlen_rows_match_reference_gpu(bits):
    b, hq, h, d, group, res_cap, cap = 5, 32, 8, 128, 128, 256, 4096
    store = _storage(b, h, d, cap, res_cap, bits, group, d, False, torch.bfloat16, "cuda")
    row_quant = [0, 128, 1024, 2048, 4096]
    lengths = [1, 128 + 63, 1024 + 129, 2048 + 255, 4096 + 1]
    q = torch.randn(b, hq, 1, d, device="cuda", dtype=torch.bfloat16)
    got = quant_decode_varlen(q, *store, torch.tensor(row_quant, device="cuda"), torch.tensor(lengths, device="cuda"),
                              bits=bits, key_group=group, value_group=d, block_k=128,
                              out=torch.full_like(q, float("nan")))
    want = quant_decode_varlen_ref(q, *store, row_quant, lengths, bits=bits, key_group=group, value_group=d,
                                   compute_dtype=torch.float64)
    torch.testing.assert_close(got.double(), want.double(), atol=2e-2, rtol=2e-2)
