"""The one-shot batch-1 GEMV (kernels/gemv.py) against a float64 reference, and the fast step's dispatch to it."""

import pytest
import torch
import torch.nn.functional as F

from ollm_triton.kernels.gemv import MAX_K, decode_linear, gemv, gemv_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def rel_rms(ref: torch.Tensor, out: torch.Tensor) -> float:
    ref, out = ref.double(), out.double()
    return ((ref - out).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt()).item()


@pytest.mark.interpreter
@pytest.mark.parametrize("n,k", [(1, 1), (63, 129), (129, 63), (37, 1000)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("block_n", [1, 4])
def test_gemv_matches_float64(n, k, dtype, bias, block_n, poison):
    g = torch.Generator().manual_seed(n * k)
    x = torch.randn(1, 1, k, generator=g).to(dtype).to(DEVICE)
    w = (torch.randn(n, k, generator=g) / k**0.5).to(dtype).to(DEVICE)
    b = torch.randn(n, generator=g).to(dtype).to(DEVICE) if bias else None
    out = poison(torch.empty(n, dtype=dtype, device=DEVICE))
    y = gemv(x, w, b, block_n=block_n, out=out)
    assert y.shape == (1, 1, n) and y.data_ptr() == out.data_ptr()
    tol = {torch.float32: 1e-5, torch.float16: 2e-3}[dtype]  # the output is rounded to the input dtype
    assert rel_rms(gemv_reference(x, w, b), y) < tol


@pytest.mark.interpreter
def test_gemv_reads_a_strided_weight_view():
    """Rows of a fused matrix (as the fast path's q/k/v views) have a row stride wider than K."""
    w_full = torch.randn(40, 96, device=DEVICE)
    w = w_full[:, :64]
    x = torch.randn(64, device=DEVICE)
    assert rel_rms(gemv_reference(x, w), gemv(x, w)) < 1e-5


def test_gemv_bad_input():
    w = torch.zeros(8, 16)
    with pytest.raises(ValueError, match="gemv takes one row"):
        gemv(torch.zeros(2, 16), w)
    with pytest.raises(ValueError, match="gemv takes one row"):
        gemv(torch.zeros(1, 15), w)
    with pytest.raises(ValueError, match="gemv takes one row"):
        gemv(torch.zeros(1, 16), w.T.contiguous().T)  # a transposed view: the last dim is not contiguous
    with pytest.raises(ValueError, match="gemv takes one row"):
        gemv(torch.zeros(1, MAX_K + 1), torch.zeros(2, MAX_K + 1))


def test_decode_linear_uses_f_linear_off_the_gpu_and_for_several_rows():
    x, w = torch.randn(3, 1, 16), torch.randn(8, 16)
    assert torch.equal(decode_linear(x, w), F.linear(x, w))
    assert torch.equal(decode_linear(x[:1], w), F.linear(x[:1], w))  # one row, but on the CPU


@pytest.mark.gpu
@pytest.mark.parametrize("n,k", [(6144, 4096), (4096, 14336), (129, 63)])
def test_gpu_gemv_bf16(n, k, poison):
    x = torch.randn(1, 1, k, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k**0.5
    out = poison(torch.empty(n, device="cuda", dtype=torch.bfloat16))
    y = gemv(x, w, out=out)
    ref = gemv_reference(x, w)
    assert not out.isnan().any() and rel_rms(ref, y) < 4e-3  # bf16 output rounding
    assert rel_rms(ref, F.linear(x, w)) < 4e-3  # cuBLAS meets the same bound
    assert torch.equal(decode_linear(x, w), y)  # one row on the GPU: the fast step runs this kernel
