"""The batch-1 GEMV kernel (kernels/gemv.py) against a float64 reference, and the plan that picks it or cuBLAS."""

import pytest
import torch
import torch.nn.functional as F

from ollm_triton.kernels.gemv import CONFIGS, MAX_ROWS, GemvPlan, gemv, gemv_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def rel_rms(out, ref) -> float:
    out, ref = out.double(), ref.double()
    return ((out - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt()).item()


def randn(*shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype).to(DEVICE)


@pytest.mark.interpreter
@pytest.mark.parametrize("rows, n, k", [(1, 1, 1), (1, 63, 129), (3, 129, 63), (2, 200, 1000), (4, 17, 2049)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("bias", [False, True])
def test_gemv_matches_float64(rows, n, k, dtype, bias, poison):
    x, w = randn(rows, k, dtype=dtype, seed=1), randn(n, k, dtype=dtype, seed=2)
    b = randn(n, dtype=dtype, seed=3) if bias else None
    ref = gemv_reference(x, w, b, compute_dtype=torch.float64)
    for bn, bk, warps, prefetch in (CONFIGS[2], CONFIGS[3], (4, 64, 2, True), (16, 32, 1, False)):
        out = poison(torch.empty(rows, n, dtype=dtype, device=DEVICE))
        gemv(x, w, b, block_n=bn, block_k=bk, num_warps=warps, prefetch=prefetch, out=out)
        assert rel_rms(out, ref) < TOL[dtype], (bn, bk, prefetch)


@pytest.mark.interpreter
def test_gemv_keeps_leading_dims_and_reads_strided_rows():
    x = randn(1, 1, 2 * 96, dtype=torch.float32, seed=4)[..., ::2]  # a strided last dim is made contiguous
    w = randn(40, 96, dtype=torch.float32, seed=5)
    out = gemv(x, w)
    assert out.shape == (1, 1, 40)
    assert rel_rms(out, gemv_reference(x, w, compute_dtype=torch.float64)) < 1e-5


def test_gemv_bad_input():
    w = torch.zeros(8, 16)
    with pytest.raises(ValueError, match="gemv takes"):
        gemv(torch.zeros(MAX_ROWS + 1, 16), w)
    with pytest.raises(ValueError, match="gemv takes"):
        gemv(torch.zeros(1, 15), w)
    with pytest.raises(ValueError, match="gemv takes"):
        gemv(torch.zeros(1, 16), w.T.contiguous().T)  # a transposed view: the last dim is not contiguous


def test_plan_without_timings_is_plain_linear():
    plan = GemvPlan()
    x, w = torch.randn(2, 16), torch.randn(8, 16)
    plan.tune(w, None)  # not on a GPU: nothing is timed
    assert plan.choice == {} and torch.equal(plan(x, w), F.linear(x, w))


@pytest.mark.gpu
@pytest.mark.parametrize("n, k", [(6144, 4096), (4096, 4096), (1000, 4097)])
def test_gpu_gemv_bf16_and_plan(n, k, poison):
    x, w = randn(1, k, dtype=torch.bfloat16, seed=6), randn(n, k, dtype=torch.bfloat16, seed=7)
    ref = gemv_reference(x, w, compute_dtype=torch.float64)
    for bn, bk, warps, prefetch in CONFIGS:
        out = poison(torch.empty(1, n, dtype=torch.bfloat16, device="cuda"))
        gemv(x, w, block_n=bn, block_k=bk, num_warps=warps, prefetch=prefetch, out=out)
        assert rel_rms(out, ref) < TOL[torch.bfloat16], (bn, bk, warps, prefetch)
    plan = GemvPlan()
    plan.tune(w, None, rows=1)
    assert GemvPlan.key(1, w) in plan.choice and "cublas" in plan.timings[GemvPlan.key(1, w)]
    assert rel_rms(plan(x, w), ref) < TOL[torch.bfloat16]
