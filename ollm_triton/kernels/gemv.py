"""y = x W^T (+ b) for one row x: the matrix-vector products of batch-1 decode, and their reference.

    x: [..., K] (one row in all)   W: [N, K] row-major   b: [N] or None   ->   y: [..., N] in x's dtype

Batch-1 decode reads every weight once per token, so each matmul is bound by how fast its weight streams in. Each
program here loads BLOCK_N whole rows of W in one go (no loop over K, so every load of the program is in flight at
once) and reduces them against x in fp32; there is no split-K pass. On the H200 with weights that are not in L2 (as
in the decode step, which streams 16 GB a token), this beat cuBLAS at every llama3_8b shape
(experiments/profile/step_kernels.py, experiments/engine/README.md section 6): qkv 13.8 against 15.5 us, o_proj
10.0 against 13.9, down 30.1 against 31.9, gate_up 53.9 against 56.1. An earlier kernel that looped over K in
steps of 512-2048 lost to cuBLAS by 30-50% and was removed.

`decode_linear` is what the fast decode step calls: this kernel for one row on a GPU when a row of W fits in a
program's registers, `F.linear` otherwise. The choice depends only on shapes and device, never on timing, so the
captured step and its uncaptured twin run the same kernels and round the same way.
"""

# No `from __future__ import annotations`: kept like the other kernel modules (custom ops read annotations).
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

MAX_K = 16384  # one program holds BLOCK_N rows of K weights in registers: 16384 bf16 over 128 threads is 64 regs
BLOCK_N = 1  # rows a program; 1 was the fastest of 1, 2, 4 and 8 at three of the four llama3_8b shapes
NUM_WARPS = 4


@triton.jit
def _gemv_kernel(X, W, B, Y, N, K, stride_wn, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    i_n = tl.program_id(0)
    o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_n = o_n < N
    o_k = tl.arange(0, BLOCK_K)
    m_k = o_k < K
    b_w = tl.load(W + o_n[:, None].to(tl.int64) * stride_wn + o_k[None, :], mask=m_n[:, None] & m_k[None, :],
                  other=0.0)
    b_x = tl.load(X + o_k, mask=m_k, other=0.0)
    b_y = tl.sum(b_w.to(tl.float32) * b_x.to(tl.float32)[None, :], 1)
    if HAS_BIAS:
        b_y += tl.load(B + o_n, mask=m_n, other=0.0).to(tl.float32)
    tl.store(Y + o_n, b_y.to(Y.dtype.element_ty), mask=m_n)


def gemv(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None, *, block_n: int = BLOCK_N,
         num_warps: int = NUM_WARPS, out: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] (one row) times w [N, K]^T (+ b) -> [..., N], through the Triton kernel."""
    k, n = x.shape[-1], w.shape[0]
    if x.numel() != k or w.dim() != 2 or w.shape[1] != k or w.stride(1) != 1 or k > MAX_K or (
            b is not None and b.shape != (n,)):
        got = f"x {tuple(x.shape)}, w {tuple(w.shape)}, b {None if b is None else tuple(b.shape)}"
        raise ValueError(f"gemv takes one row x [..., K] with K <= {MAX_K}, w [N, K] with a contiguous last dim and "
                         f"b [N]; got {got}")
    x1 = x.reshape(k).contiguous()
    y = torch.empty(n, dtype=x.dtype, device=x.device) if out is None else out.view(n)
    _gemv_kernel[(triton.cdiv(n, block_n),)](
        x1, w, b if b is not None else w, y, n, k, w.stride(0),
        HAS_BIAS=b is not None, BLOCK_N=block_n, BLOCK_K=triton.next_power_of_2(k), num_warps=num_warps,
    )
    return y.view(*x.shape[:-1], n)


def gemv_reference(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None,
                   compute_dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """x @ w^T + b computed in compute_dtype (float64 for tests), returned in compute_dtype."""
    y = x.to(compute_dtype) @ w.to(compute_dtype).T
    return y + b.to(compute_dtype) if b is not None else y


def decode_linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear for the fast decode step: the one-shot GEMV for a single row on a GPU, F.linear otherwise."""
    if x.is_cuda and x.numel() == x.shape[-1] and x.shape[-1] <= MAX_K and w.stride(-1) == 1 and w.dtype == x.dtype:
        return gemv(x, w, b)
    return F.linear(x, w, b)


__all__ = ["gemv", "gemv_reference", "decode_linear", "MAX_K"]
