"""SwiGLU's gate: silu(gate) * up in one pass, and its PyTorch reference.

    silu_mul(gate_up)      gate_up: [..., 2M] (gate in the first half, up in the second: one fused projection)
    silu_mul(gate, up)     gate, up: [..., M]
    -> [..., M]

Eager `F.silu(g) * u` is two kernels and writes silu(g) to memory in between; with gate and up computed by one
[2M, H] matmul (the fast decode path fuses the weights), this kernel reads that output once and writes the M
products. Rounding follows the eager path: silu in float32 rounded to the input dtype, then the product rounded.
"""

# No `from __future__ import annotations`: torch.library.custom_op reads the annotations as types.
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

BLOCK = 1024


@triton.jit
def _silu_mul_kernel(G, U, O, stride_g, stride_u, stride_o, M, BLOCK_M: tl.constexpr):
    i_r = tl.program_id(0).to(tl.int64)
    i_c = tl.program_id(1)
    o_m = i_c * BLOCK_M + tl.arange(0, BLOCK_M)
    m_m = o_m < M
    b_g = tl.load(G + i_r * stride_g + o_m, mask=m_m, other=0.0).to(tl.float32)
    b_u = tl.load(U + i_r * stride_u + o_m, mask=m_m, other=0.0).to(tl.float32)
    # silu rounded to the input dtype first, as F.silu's output is before the eager product
    b_s = (b_g / (1.0 + tl.exp(-b_g))).to(G.dtype.element_ty).to(tl.float32)
    tl.store(O + i_r * stride_o + o_m, (b_s * b_u).to(O.dtype.element_ty), mask=m_m)


def _split(gate, up):
    if up is None:
        if gate.shape[-1] % 2:
            raise ValueError(f"silu_mul(gate_up) needs an even last dim [..., 2M], got {tuple(gate.shape)}")
        m = gate.shape[-1] // 2
        return gate[..., :m], gate[..., m:]
    if gate.shape != up.shape:
        raise ValueError(f"silu_mul(gate, up) needs equal shapes, got {tuple(gate.shape)} and {tuple(up.shape)}")
    return gate, up


def silu_mul_kernel(gate, up, out=None):
    """The Triton path (gate, up: [..., M] views with a contiguous last dim; any row stride)."""
    m = gate.shape[-1]
    shape = gate.shape
    g2 = gate.reshape(-1, m) if gate.stride(-1) == 1 else gate.contiguous().reshape(-1, m)
    u2 = up.reshape(-1, m) if up.stride(-1) == 1 else up.contiguous().reshape(-1, m)
    rows = g2.shape[0]
    dtype = torch.promote_types(gate.dtype, up.dtype)
    o = torch.empty(rows, m, dtype=dtype, device=gate.device) if out is None else out.view(rows, m)
    if rows and m:
        _silu_mul_kernel[(rows, triton.cdiv(m, BLOCK))](g2, u2, o, g2.stride(0), u2.stride(0), o.stride(0), m,
                                                        BLOCK_M=BLOCK, num_warps=4)
    return o.view(shape)


def silu_mul_reference(gate, up=None, compute_dtype: torch.dtype | None = None):
    """F.silu(gate) * up (the eager formula); compute_dtype (float64) for the test oracle."""
    gate, up = _split(gate, up)
    if compute_dtype is not None:
        gate, up = gate.to(compute_dtype), up.to(compute_dtype)
    return F.silu(gate) * up


def silu_mul(gate, up=None, *, use_kernel: bool | None = None):
    """silu(gate) * up. gate_up: [..., 2M] alone, or gate, up: [..., M]. Returns [..., M].

    use_kernel: None = Triton on CUDA tensors, the reference elsewhere; True/False force one path.
    """
    g, u = _split(gate, up)
    if (g.is_cuda if use_kernel is None else use_kernel) and g.dtype in (torch.float32, torch.float16, torch.bfloat16):
        # reshape() of a half-split view copies unless rows are uniformly strided: a [..., 2M] tensor's halves
        # are, so the kernel reads the fused projection output in place.
        return silu_mul_kernel(g, u)
    return F.silu(g) * u


@torch.library.custom_op("ollm_triton::silu_mul", mutates_args=())
def silu_mul_op(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """`silu_mul(gate, up)` as a custom op."""
    return silu_mul(gate, up)


@silu_mul_op.register_fake
def _(gate, up):
    return gate.new_empty(gate.shape, dtype=torch.promote_types(gate.dtype, up.dtype))


__all__ = ["silu_mul", "silu_mul_kernel", "silu_mul_reference", "silu_mul_op"]
