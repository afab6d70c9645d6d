"""RMSNorm, optionally fused with the residual add before it, and its PyTorch reference.

    x: [..., H]   residual: [..., H] or None   weight: [H]
    rmsnorm(x, weight, eps)                       -> normed [..., H]
    rmsnorm(x, weight, eps, residual=residual)    -> (normed, x + residual)

A decoder layer ends with `h = h + delta` followed by the next norm; done apart that is three passes over the
hidden state (add, read for the norm, write the norm) and two launches. The fused kernel reads x and the residual
once, writes the new residual and the normed row, one program per row. At decode (one row of 4096) the launch, not
the bytes, is the cost, which is why fusing matters there.

Rounding follows the engine's eager path exactly (ollm_triton.engine.model.RMSNorm): the sum is rounded to the
input dtype (as `h + delta` is), the norm is taken in float32 from that rounded sum, cast back to the input dtype,
and only then multiplied by the weight with one more rounding. Only the reduction order of the mean differs.
"""

# No `from __future__ import annotations`: torch.library.custom_op reads the annotations as types.
import torch
import triton
import triton.language as tl

MAX_HIDDEN = 65536  # one program holds a whole row in registers; wider rows take the reference


@triton.jit
def _rmsnorm_kernel(
    X, R, W, Y, S, stride_x, stride_r, stride_y, stride_s, H, eps,
    HAS_RESIDUAL: tl.constexpr, BLOCK_H: tl.constexpr,
):
    i_r = tl.program_id(0).to(tl.int64)
    o_h = tl.arange(0, BLOCK_H)
    m_h = o_h < H
    b_x = tl.load(X + i_r * stride_x + o_h, mask=m_h, other=0.0)
    # the weight is loaded before the residual store: a load after a store that may alias it waits for it
    b_w = tl.load(W + o_h, mask=m_h, other=0.0)
    if HAS_RESIDUAL:
        b_r = tl.load(R + i_r * stride_r + o_h, mask=m_h, other=0.0)
        # rounded to the input dtype before the norm reads it, as the eager `h + delta` is
        b_x = (b_x.to(tl.float32) + b_r.to(tl.float32)).to(X.dtype.element_ty)
        tl.store(S + i_r * stride_s + o_h, b_x, mask=m_h)
    b_x32 = b_x.to(tl.float32)
    b_rstd = 1.0 / tl.sqrt(tl.sum(b_x32 * b_x32, 0) / H + eps)
    b_n = (b_x32 * b_rstd).to(X.dtype.element_ty)
    b_y = b_n.to(tl.float32) * b_w.to(tl.float32)
    tl.store(Y + i_r * stride_y + o_h, b_y.to(Y.dtype.element_ty), mask=m_h)


def _num_warps(block: int) -> int:
    # Liger's rule of thumb: a warp per ~256-512 elements keeps the row in registers without spilling.
    return 4 if block < 2048 else 8 if block < 8192 else 16


def kernel_supports(x: torch.Tensor) -> bool:
    return x.dtype in (torch.float32, torch.float16, torch.bfloat16) and 0 < x.shape[-1] <= MAX_HIDDEN


def rmsnorm_kernel(x, weight, eps, residual=None, out=None, residual_out=None):
    """The Triton path of `rmsnorm` (any device the kernel runs on; the interpreter on the CPU)."""
    h = x.shape[-1]
    x2 = x.reshape(-1, h)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    rows = x2.shape[0]
    out_dtype = torch.promote_types(x.dtype, weight.dtype)
    y = torch.empty(rows, h, dtype=out_dtype, device=x.device) if out is None else out.view(rows, h)
    weight = weight.contiguous()
    if residual is not None:
        r2 = residual.reshape(-1, h)
        if r2.stride(-1) != 1:
            r2 = r2.contiguous()
        s = torch.empty(rows, h, dtype=x.dtype, device=x.device) if residual_out is None else residual_out.view(rows, h)
    else:
        r2 = s = x2  # unused
    if rows:
        block = triton.next_power_of_2(h)
        _rmsnorm_kernel[(rows,)](
            x2, r2, weight, y, s, x2.stride(0), r2.stride(0), y.stride(0), s.stride(0), h, eps,
            HAS_RESIDUAL=residual is not None, BLOCK_H=block, num_warps=_num_warps(block),
        )
    y = y.view(x.shape)
    return (y, s.view(x.shape)) if residual is not None else y


def rmsnorm_reference(x, weight, eps, residual=None, compute_dtype: torch.dtype | None = None):
    """The eager formula (engine.model.RMSNorm), with the residual add first when given.

    compute_dtype (e.g. float64) runs every step in that dtype without intermediate rounding: the test oracle.
    """
    if compute_dtype is not None:
        s = x.to(compute_dtype) + (residual.to(compute_dtype) if residual is not None else 0)
        y = s * torch.rsqrt(s.pow(2).mean(-1, keepdim=True) + eps) * weight.to(compute_dtype)
        return (y, s) if residual is not None else y
    s = x + residual if residual is not None else x
    s32 = s.float()
    y = weight * (s32 * torch.rsqrt(s32.pow(2).mean(-1, keepdim=True) + eps)).to(s.dtype)
    return (y, s) if residual is not None else y


def rmsnorm(x, weight, eps, residual=None, *, use_kernel: bool | None = None):
    """RMSNorm of x (after adding `residual`, when given) over the last dim, scaled by `weight`.

    x, residual: [..., H]; weight: [H]. Returns normed [..., H], or (normed, x + residual) with a residual.
    use_kernel: None = Triton on CUDA tensors and the reference elsewhere; True/False force one path.
    """
    if weight.shape != (x.shape[-1],):
        raise ValueError(f"rmsnorm weight must be [{x.shape[-1]}] for x {tuple(x.shape)}, got {tuple(weight.shape)}")
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"rmsnorm residual must have x's shape {tuple(x.shape)}, got {tuple(residual.shape)}")
    kernel = x.is_cuda if use_kernel is None else use_kernel
    if kernel and kernel_supports(x):
        return rmsnorm_kernel(x, weight, eps, residual)
    return rmsnorm_reference(x, weight, eps, residual)


# ---- torch.library ops: torch.compile and CUDA-graph capture see these as single opaque nodes ---------------------


@torch.library.custom_op("ollm_triton::rmsnorm", mutates_args=())
def rmsnorm_op(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """`rmsnorm(x, weight, eps)` as a custom op (Triton on CUDA, the reference elsewhere)."""
    return rmsnorm(x, weight, eps)


@rmsnorm_op.register_fake
def _(x, weight, eps):
    return x.new_empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype))


@torch.library.custom_op("ollm_triton::add_rmsnorm", mutates_args=())
def add_rmsnorm_op(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """`rmsnorm(x, weight, eps, residual=residual)` as a custom op: (normed, x + residual)."""
    return rmsnorm(x, weight, eps, residual)


@add_rmsnorm_op.register_fake
def _(x, residual, weight, eps):
    return x.new_empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype)), x.new_empty(x.shape)


__all__ = ["rmsnorm", "rmsnorm_kernel", "rmsnorm_reference", "rmsnorm_op", "add_rmsnorm_op", "kernel_supports"]
