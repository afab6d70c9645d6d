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

`add_rmsnorm_gemv` folds the RMSNorm before a matmul (and the residual add before the norm) into the GEMV's
prologue: y = norm(residual + delta) W^T (+ b), and residual + delta. Every program loads the whole input row
(K <= MAX_K, served from L2 after the first program), adds the delta, takes the rms, scales by the norm weight and
dots the result with its weight rows; program 0 writes the new residual stream (into a fresh buffer: the others
are still reading the old one). At batch-1 decode this removes the norm kernel before q/k/v, before gate/up and
before the LM head (65 launches of ~1.9 us on the H200 for llama3_8b, experiments/engine/README.md section 6).
What it costs: every program repeats the norm (~10 instructions an input element), so a program holds
FOLD_BLOCK_N weight rows to share it (and optionally FOLD_STEPS chunks of them in a loop, whose next loads the
compiler may pipeline); with one row a program the LM head's 128,256 programs would issue about as many
instructions as its weight stream takes to arrive. Rounding follows engine.model.RMSNorm, as kernels/norm.py
does, so the fold changes only the reduction order of the mean against the unfolded norm + GEMV.
`decode_add_norm_linear` is the fast step's entry: the fold when the shapes fit, None otherwise (the caller then
runs the norm and the matmul apart). `silu_mul_gemv` (`decode_silu_linear`) folds SwiGLU's silu(gate) * up into the
down GEMV's prologue the same way; its prologue is dearer (special-function units), so a program shares it over
SILU_BLOCK_N x SILU_STEPS rows.
"""

# No `from __future__ import annotations`: kept like the other kernel modules (custom ops read annotations).
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

MAX_K = 16384  # one program holds BLOCK_N rows of K weights in registers: 16384 bf16 over 128 threads is 64 regs
BLOCK_N = 1  # rows a program; 1 was the fastest of 1, 2, 4 and 8 at three of the four llama3_8b shapes
NUM_WARPS = 4
# the folded norm's programs: rows a program and warps, chosen by instruction count, not yet timed on a GPU
# (experiments/profile/fast_step_profile.py --fold-kernels times 1-64 rows against the norm kernel + GEMV). Compiled
# for sm_90 by Triton 3.6 at K = 4096: 4 rows over 8 warps take 73 registers, no spills, and issue ~700 warp
# instructions a weight row against the plain GEMV's ~640; 1 row over 4 warps issues ~1,400 (the prologue per row)
FOLD_BLOCK_N = 4  # at K <= 4096; wider rows take fewer (fold_block_n), so a thread holds as many weights
FOLD_NUM_WARPS = 8
FOLD_STEPS = 1  # chunks of FOLD_BLOCK_N rows a program walks after one prologue (1: no loop)
# the SiLU-gate fold into the down GEMV (K = 14336 for llama3_8b): its prologue costs an exponential and a
# reciprocal an input element on the special-function units, so a program shares it over many rows (4096 programs
# of one row would be 117M such operations a layer, ~28 us on an H200's 132 x 16 units a clock, against the
# GEMV's 30 us); untimed on a GPU, like the norm fold's choice. At M = 14336 (sm_90, Triton 3.6): 2 rows x 4 steps
# over 16 warps take 123 registers, no spills, ~16M special-function operations a layer (~4 us of the units'
# time, under the GEMV's 30); 4 rows x 4 steps spill (408 bytes of stack), 2 x 4 over 8 warps takes 222 registers
SILU_BLOCK_N = 2
SILU_NUM_WARPS = 16
SILU_STEPS = 4


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


@triton.jit
def _add_rmsnorm_gemv_kernel(D, R, G, W, B, Y, S, N, K, stride_wn, eps, offset, HAS_DELTA: tl.constexpr,
                             HAS_BIAS: tl.constexpr, OFFSET: tl.constexpr, BLOCK_N: tl.constexpr,
                             BLOCK_K: tl.constexpr, STEPS: tl.constexpr):
    i_p = tl.program_id(0)
    o_n = i_p * (BLOCK_N * STEPS) + tl.arange(0, BLOCK_N)
    m_n = o_n < N
    o_k = tl.arange(0, BLOCK_K)
    m_k = o_k < K
    # the first weight rows before the prologue: their HBM stream is in flight while it reads the L2-resident row
    b_w = tl.load(W + o_n[:, None].to(tl.int64) * stride_wn + o_k[None, :], mask=m_n[:, None] & m_k[None, :],
                  other=0.0)
    b_g = tl.load(G + o_k, mask=m_k, other=0.0).to(tl.float32)
    b_s = tl.load(R + o_k, mask=m_k, other=0.0)
    if HAS_DELTA:
        b_d = tl.load(D + o_k, mask=m_k, other=0.0)
        # rounded to the stream's dtype before the norm reads it, as the eager `residual + delta` is
        b_s = (b_s.to(tl.float32) + b_d.to(tl.float32)).to(R.dtype.element_ty)
        if i_p == 0:  # every program computed the same sum; one writes it (S is not R: the others still read R)
            tl.store(S + o_k, b_s, mask=m_k)
    b_s32 = b_s.to(tl.float32)
    b_rstd = 1.0 / tl.sqrt(tl.sum(b_s32 * b_s32, 0) / K + eps)
    if OFFSET:  # zero-centred weights: x / rms(x) * (offset + w) in float32, one rounding at the end
        b_x = (b_s32 * b_rstd * (offset + b_g)).to(W.dtype.element_ty)
    else:  # rounded before the weight, and after it, as the eager RMSNorm and the unfolded norm kernel
        b_x = ((b_s32 * b_rstd).to(R.dtype.element_ty).to(tl.float32) * b_g).to(W.dtype.element_ty)
    _dot_rows(W, B, Y, b_w, b_x.to(tl.float32), i_p, N, stride_wn, o_k, m_k, HAS_BIAS, BLOCK_N, STEPS)


@triton.jit
def _silu_mul_gemv_kernel(GU, W, B, Y, N, M, stride_wn, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr,
                          BLOCK_K: tl.constexpr, STEPS: tl.constexpr):
    i_p = tl.program_id(0)
    o_n = i_p * (BLOCK_N * STEPS) + tl.arange(0, BLOCK_N)
    o_k = tl.arange(0, BLOCK_K)
    m_k = o_k < M
    b_w = tl.load(W + o_n[:, None].to(tl.int64) * stride_wn + o_k[None, :], mask=(o_n < N)[:, None] & m_k[None, :],
                  other=0.0)
    b_g = tl.load(GU + o_k, mask=m_k, other=0.0).to(tl.float32)
    b_u = tl.load(GU + M + o_k, mask=m_k, other=0.0).to(tl.float32)
    # silu rounded to the input dtype, then the product rounded, as kernels/mlp.py and the eager F.silu(g) * u
    b_s = (b_g / (1.0 + tl.exp(-b_g))).to(GU.dtype.element_ty).to(tl.float32)
    b_x = (b_s * b_u).to(GU.dtype.element_ty).to(tl.float32)
    _dot_rows(W, B, Y, b_w, b_x, i_p, N, stride_wn, o_k, m_k, HAS_BIAS, BLOCK_N, STEPS)


@triton.jit
def _dot_rows(W, B, Y, b_w, b_x, i_p, N, stride_wn, o_k, m_k, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr,
              STEPS: tl.constexpr):
    """Y[rows] = W[rows] . b_x (+ B) for program i_p's STEPS chunks of BLOCK_N rows; b_w: the first chunk, loaded
    by the caller before its prologue."""
    o_end = tl.minimum(N, (i_p + 1) * (BLOCK_N * STEPS))  # this program's rows end here
    for i_s in tl.range(0, STEPS):  # the program's chunks of rows share the prologue's b_x
        o_n = i_p * (BLOCK_N * STEPS) + i_s * BLOCK_N + tl.arange(0, BLOCK_N)
        m_n = o_n < o_end
        if STEPS > 1:  # the next chunk's rows in flight before this chunk's store (a load after a store that may
            # alias it waits for it)
            b_w_next = tl.load(W + (o_n + BLOCK_N)[:, None].to(tl.int64) * stride_wn + o_k[None, :],
                               mask=((o_n + BLOCK_N) < o_end)[:, None] & m_k[None, :], other=0.0)
        # [BLOCK_N, BLOCK_K] * [1, BLOCK_K] -> sum over K -> [BLOCK_N]
        b_y = tl.sum(b_w.to(tl.float32) * b_x[None, :], 1)
        if HAS_BIAS:
            b_y += tl.load(B + o_n, mask=m_n, other=0.0).to(tl.float32)
        tl.store(Y + o_n, b_y.to(Y.dtype.element_ty), mask=m_n)
        if STEPS > 1:
            b_w = b_w_next

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


def fold_block_n(k: int) -> int:
    """Weight rows a folded-norm program takes at input width k: FOLD_BLOCK_N up to 4096, halved per doubling
    (at 8192 over 8 warps, 2 rows: the registers of 4 rows at 4096; 4 rows there compile to 192 registers)."""
    return max(1, FOLD_BLOCK_N * 4096 // max(4096, triton.next_power_of_2(k)))


def add_rmsnorm_gemv(delta: torch.Tensor | None, residual: torch.Tensor, norm_weight: torch.Tensor, eps: float,
                     w: torch.Tensor, b: torch.Tensor | None = None, *, offset: float = 0.0,
                     block_n: int | None = None, num_warps: int = FOLD_NUM_WARPS, steps: int = FOLD_STEPS,
                     out: torch.Tensor | None = None, residual_out: torch.Tensor | None = None,
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """(norm(residual + delta) w^T + b, residual + delta) for one row, in one kernel.

    delta, residual: [..., K] (one row; delta None: the norm of residual itself, which is returned as is)
    norm_weight: [K]   w: [N, K] with a contiguous last dim   b: [N] or None   -> y [..., N], residual [..., K]
    norm: s / rms(s) * norm_weight (offset 0, rounded as engine.model.RMSNorm) or s / rms(s) * (offset +
    norm_weight) (zero-centred weights). residual_out must not alias residual or delta. A program computes the
    norm once and dots it with `steps` chunks of `block_n` weight rows (None: `fold_block_n(K)`).
    """
    k, n = residual.shape[-1], w.shape[0]
    if residual.numel() != k or (delta is not None and delta.shape != residual.shape) or norm_weight.shape != (k,) \
            or w.dim() != 2 or w.shape[1] != k or w.stride(1) != 1 or k > MAX_K or (b is not None and b.shape != (n,)):
        got = (f"delta {None if delta is None else tuple(delta.shape)}, residual {tuple(residual.shape)}, norm weight "
               f"{tuple(norm_weight.shape)}, w {tuple(w.shape)}, b {None if b is None else tuple(b.shape)}")
        raise ValueError(f"add_rmsnorm_gemv takes one row residual [..., K] (delta None or its shape) with K <= "
                         f"{MAX_K}, norm weight [K], w [N, K] with a contiguous last dim and b [N]; got {got}")
    r1 = residual.reshape(k).contiguous()
    d1 = delta.reshape(k).contiguous() if delta is not None else r1
    if delta is None:
        s = residual
    else:
        s = torch.empty_like(r1) if residual_out is None else residual_out.view(k)
        if s.data_ptr() in (r1.data_ptr(), d1.data_ptr()):
            raise ValueError("add_rmsnorm_gemv's residual_out must not alias residual or delta: program 0 writes it "
                             "while the others read them")
    y = torch.empty(n, dtype=w.dtype, device=w.device) if out is None else out.view(n)
    block_n = fold_block_n(k) if block_n is None else block_n
    _add_rmsnorm_gemv_kernel[(triton.cdiv(n, block_n * steps),)](
        d1, r1, norm_weight.contiguous(), w, b if b is not None else w, y, s if delta is not None else r1, n, k,
        w.stride(0), eps, float(offset), HAS_DELTA=delta is not None, HAS_BIAS=b is not None, OFFSET=bool(offset),
        BLOCK_N=block_n, BLOCK_K=triton.next_power_of_2(k), STEPS=steps, num_warps=num_warps,
    )
    return y.view(*residual.shape[:-1], n), s.view(residual.shape) if delta is not None else residual


def add_rmsnorm_gemv_reference(delta: torch.Tensor | None, residual: torch.Tensor, norm_weight: torch.Tensor,
                               eps: float, w: torch.Tensor, b: torch.Tensor | None = None, *, offset: float = 0.0,
                               compute_dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """The fold without intermediate rounding, every step in compute_dtype (float64 for tests)."""
    s = residual.to(compute_dtype) + (delta.to(compute_dtype) if delta is not None else 0)
    x = s * torch.rsqrt(s.pow(2).mean(-1, keepdim=True) + eps) * (offset + norm_weight.to(compute_dtype))
    return gemv_reference(x, w, b, compute_dtype), s


def silu_mul_gemv(gate_up: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None, *,
                  block_n: int = SILU_BLOCK_N, num_warps: int = SILU_NUM_WARPS, steps: int = SILU_STEPS,
                  out: torch.Tensor | None = None) -> torch.Tensor:
    """(silu(gate) * up) w^T + b for one row, the SwiGLU gate computed in the GEMV's prologue.

    gate_up: [..., 2M] (one row: gate, then up, as the fused gate/up projection writes them)   w: [N, M] with a
    contiguous last dim   b: [N] or None   -> [..., N] in w's dtype
    """
    m2, n = gate_up.shape[-1], w.shape[0]
    m = m2 // 2
    if gate_up.numel() != m2 or m2 % 2 or w.dim() != 2 or w.shape[1] != m or w.stride(1) != 1 or m > MAX_K or (
            b is not None and b.shape != (n,)):
        got = f"gate_up {tuple(gate_up.shape)}, w {tuple(w.shape)}, b {None if b is None else tuple(b.shape)}"
        raise ValueError(f"silu_mul_gemv takes one row gate_up [..., 2M] with M <= {MAX_K}, w [N, M] with a "
                         f"contiguous last dim and b [N]; got {got}")
    gu = gate_up.reshape(m2).contiguous()
    y = torch.empty(n, dtype=w.dtype, device=w.device) if out is None else out.view(n)
    _silu_mul_gemv_kernel[(triton.cdiv(n, block_n * steps),)](
        gu, w, b if b is not None else w, y, n, m, w.stride(0), HAS_BIAS=b is not None, BLOCK_N=block_n,
        BLOCK_K=triton.next_power_of_2(m), STEPS=steps, num_warps=num_warps,
    )
    return y.view(*gate_up.shape[:-1], n)


def silu_mul_gemv_reference(gate_up: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None,
                            compute_dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """(silu(gate) * up) w^T + b without intermediate rounding, in compute_dtype (float64 for tests)."""
    gate, up = gate_up.to(compute_dtype).chunk(2, dim=-1)
    return gemv_reference(F.silu(gate) * up, w, b, compute_dtype)


def decode_linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear for the fast decode step: the one-shot GEMV for a single row on a GPU, F.linear otherwise."""
    if x.is_cuda and x.numel() == x.shape[-1] and x.shape[-1] <= MAX_K and w.stride(-1) == 1 and w.dtype == x.dtype:
        return gemv(x, w, b)
    return F.linear(x, w, b)




def decode_add_norm_linear(delta: torch.Tensor | None, residual: torch.Tensor, norm_weight: torch.Tensor, eps: float,
                           offset: float, w: torch.Tensor, b: torch.Tensor | None = None,
                           ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The fast step's folded norm + matmul (engine.model `add_norm_project`): `add_rmsnorm_gemv` when the shapes
    fit (one row, K <= MAX_K, one dtype for the stream, norm weight and w, w's last dim contiguous), else None and
    the caller runs the norm and the matmul apart. By shape only, like decode_linear, so captured and uncaptured
    steps run the same kernels; the device choice is the caller's (FastDecoder.fold_norm)."""
    k = residual.shape[-1]
    if residual.numel() != k or k > MAX_K or w.stride(-1) != 1 or not (
            residual.dtype == norm_weight.dtype == w.dtype) or (delta is not None and delta.dtype != residual.dtype):
        return None
    return add_rmsnorm_gemv(delta, residual, norm_weight, eps, w, b, offset=offset)


def decode_silu_linear(gate_up: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor | None:
    """The fast step's SwiGLU gate folded into the down matmul (engine.model MLP): `silu_mul_gemv` when the shapes
    fit (one row, M <= MAX_K, one dtype, w's last dim contiguous), else None (silu_mul, then the matmul). By
    shape only; the device choice is the caller's (FastDecoder.fold_silu)."""
    m2 = gate_up.shape[-1]
    if gate_up.numel() != m2 or m2 % 2 or m2 // 2 > MAX_K or w.stride(-1) != 1 or gate_up.dtype != w.dtype:
        return None
    return silu_mul_gemv(gate_up, w, b)


__all__ = ["gemv", "gemv_reference", "decode_linear", "add_rmsnorm_gemv", "add_rmsnorm_gemv_reference",
           "decode_add_norm_linear", "silu_mul_gemv", "silu_mul_gemv_reference", "decode_silu_linear", "MAX_K"]
