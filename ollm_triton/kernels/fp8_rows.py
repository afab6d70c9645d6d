"""Rows of weights stored as float8 (e4m3) codes with one scale per block of BLOCK consecutive elements.

What prefetch/experts.py keeps on the host with `host_dtype: fp8`: each routed expert's row (its parameters side by
side) as 1-byte codes plus a scale per BLOCK elements in the model dtype, so a copy over the bus moves about half of
the bf16 bytes; the device dequantizes the codes into the cache slot after the copy.

    scale = amax(|x| over the block) / 448  (rounded to the model dtype; 1 for an all-zero block)
    code  = e4m3(clamp(x / scale, -448, 448))         448: e4m3fn's largest finite value
    x    ~= code * scale                              (computed in float32, rounded once to the model dtype)

Codes are computed against the stored (rounded) scale, so rounding the scale costs no extra error; the clamp catches
a scale that rounded down. e4m3 keeps 3 mantissa bits: a weight's relative error is at most 2**-4 (~1/16), uniform
over the block. The per-block scale (not per output row) makes a row's layout irrelevant: gate/up stored [out, in]
or [in, out] quantize alike, and a block never spans two parameters (prefetch/experts.py aligns each to BLOCK).

Dequantization is exact to reproduce: an e4m3 code (4 significant bits) times a bf16/fp16 scale (8/11 bits) is exact
in float32, so the kernel and the reference agree bit for bit in bf16 and fp16 on a GPU (one rounding each, the same);
in float32 both round the one product. The Triton interpreter rounds float32 -> bf16 toward zero (seen with Triton
3.9 on the CPU), so interpreter tests use fp16/fp32 outputs and bf16 is a GPU test.

PyTorch reference (`quantize_fp8`, `dequantize_fp8_ref`: quantization runs where the weights are drawn or read, once
at load) and the Triton dequantization (`dequantize_fp8_rows`: a batch of staged rows into their cache slots from
an index tensor, one launch; `dequantize_fp8`: one row; the CUDA path) side by side.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 128  # elements a scale: 2 bytes per 128 codes in bf16 (1.6% over the codes)
FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0


def scale_count(n: int) -> int:
    """Scales of a row of n elements (n a multiple of BLOCK)."""
    if n % BLOCK:
        raise ValueError(f"an fp8 row holds a multiple of {BLOCK} elements (pad it), got {n}")
    return n // BLOCK


# ----------------------------------------------------------------------------------------------------------------
# PyTorch reference
# ----------------------------------------------------------------------------------------------------------------


def quantize_fp8(x: torch.Tensor, scale_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x: [..., n] (n a multiple of BLOCK) -> (codes [..., n] float8_e4m3fn, scales [..., n / BLOCK] in
    `scale_dtype`, default x's dtype). Runs on x's device."""
    scale_dtype = scale_dtype or x.dtype
    nb = scale_count(x.shape[-1])
    blocks = x.float().reshape(*x.shape[:-1], nb, BLOCK)
    amax = blocks.abs().amax(-1)
    scales = (amax / FP8_MAX).to(scale_dtype)
    scales = torch.where(scales == 0, torch.ones_like(scales), scales)  # an all-zero block (padding, biases)
    codes = (blocks / scales.float()[..., None]).clamp_(-FP8_MAX, FP8_MAX).to(FP8)
    return codes.reshape(x.shape), scales


def dequantize_fp8_ref(codes: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """codes: [..., n] float8_e4m3fn, scales: [..., n / BLOCK] -> [..., n] in `dtype` (a float32 product, rounded
    once)."""
    nb = scale_count(codes.shape[-1])
    blocks = codes.float().reshape(*codes.shape[:-1], nb, BLOCK) * scales.float()[..., None]
    return blocks.reshape(codes.shape).to(dtype)


def fp8_round_trip(x: torch.Tensor) -> torch.Tensor:
    """x: [..., n] -> x as stored in fp8 rows and read back: zero-padded to whole blocks, quantized, dequantized,
    cropped (what a model computes with when its experts are kept as fp8 on the host: the resident reference)."""
    n = x.shape[-1]
    padded = torch.nn.functional.pad(x, (0, -n % BLOCK))
    return dequantize_fp8_ref(*quantize_fp8(padded), x.dtype)[..., :n]


# ----------------------------------------------------------------------------------------------------------------
# Triton
# ----------------------------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["n", "codes_stride", "scales_stride", "out_stride"])
def _dequantize_fp8_kernel(codes_ptr, scales_ptr, index_ptr, out_ptr, n, codes_stride, scales_stride, out_stride,
                           HAS_INDEX: tl.constexpr, BLOCK: tl.constexpr, BLOCK_N: tl.constexpr):
    i_n = tl.program_id(0)
    i_r = tl.program_id(1)  # the staged row; it lands in out row index[i_r] (its cache slot), or i_r
    if HAS_INDEX:
        dst = tl.load(index_ptr + i_r).to(tl.int64)
    else:
        dst = i_r.to(tl.int64)
    o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_n = o_n < n
    b_codes = tl.load(codes_ptr + i_r.to(tl.int64) * codes_stride + o_n, mask=m_n, other=0.0).to(tl.float32)
    b_scales = tl.load(scales_ptr + i_r.to(tl.int64) * scales_stride + o_n // BLOCK, mask=m_n,
                       other=0.0).to(tl.float32)  # one scale per BLOCK codes
    tl.store(out_ptr + dst * out_stride + o_n, (b_codes * b_scales).to(out_ptr.dtype.element_ty), mask=m_n)


def dequantize_fp8_rows(codes: torch.Tensor, scales: torch.Tensor, out: torch.Tensor,
                        index: torch.Tensor | None = None, use_kernel: bool | None = None) -> torch.Tensor:
    """Dequantize R rows in one launch: codes [R, n] float8_e4m3fn and scales [R, n / BLOCK] (each row contiguous,
    rows at any stride: a staging buffer's codes and scales sit side by side in one byte row), written to
    out[index[r]] (out [C, n], rows contiguous, in the model dtype; index [R] integer on out's device, distinct
    values in [0, C), not checked on CUDA: a device read would sync) or out[r] without an index. A layer's misses
    land in arbitrary cache slots with one launch instead of one a row (prefetch/experts.py). The Triton kernel on
    CUDA (1 byte read and 2 written per element), the reference elsewhere; use_kernel=True forces the kernel (the
    interpreter on the CPU)."""
    if codes.dtype != FP8 or codes.dim() != 2 or out.dim() != 2 or out.shape[1] != codes.shape[1] or \
            codes.stride(1) != 1 or out.stride(1) != 1:
        raise ValueError(f"dequantize_fp8_rows takes codes [R, n] {FP8} and out [C, n], rows contiguous, got codes "
                         f"{list(codes.shape)} {codes.dtype}, out {list(out.shape)}")
    r, n = codes.shape
    if scales.shape != (r, scale_count(n)) or scales.stride(-1) != 1:
        raise ValueError(f"dequantize_fp8: {n} codes a row need {n // BLOCK} scales a row ([{r}, {n // BLOCK}], rows "
                         f"contiguous), got {list(scales.shape)}")
    if index is not None and (index.shape != (r,) or index.dtype.is_floating_point or index.device != out.device):
        raise ValueError(f"dequantize_fp8_rows: index must be [{r}] integers on {out.device} (a slot a row), got "
                         f"{list(index.shape)} {index.dtype} on {index.device}")
    if index is None and r > out.shape[0]:
        raise ValueError(f"dequantize_fp8_rows: {r} rows without an index need out of at least {r} rows, got "
                         f"{out.shape[0]}")
    if not (codes.is_cuda if use_kernel is None else use_kernel):
        ref = dequantize_fp8_ref(codes, scales, out.dtype)
        if index is None:
            out[:r].copy_(ref)
        else:
            out.index_copy_(0, index.long(), ref)
        return out
    if r == 0:
        return out
    block_n = 4096  # 32 scales a program: a 3.1 MB Qwen3-Next expert row is 768 programs, several waves on 132 SMs
    _dequantize_fp8_kernel[(triton.cdiv(n, block_n), r)](
        codes, scales, index if index is not None else codes, out, n, codes.stride(0), scales.stride(0),
        out.stride(0), HAS_INDEX=index is not None, BLOCK=BLOCK, BLOCK_N=block_n)
    return out


def dequantize_fp8(codes: torch.Tensor, scales: torch.Tensor, out: torch.Tensor,
                   use_kernel: bool | None = None) -> torch.Tensor:
    """One row: codes [n] float8_e4m3fn, scales [n / BLOCK] (contiguous), out [n] contiguous in the model dtype
    (`dequantize_fp8_rows` with R = 1)."""
    if codes.dtype != FP8 or codes.dim() != 1 or out.shape != codes.shape or not out.is_contiguous():
        raise ValueError(f"dequantize_fp8 takes codes [n] {FP8} and a contiguous out [n], got codes "
                         f"{list(codes.shape)} {codes.dtype}, out {list(out.shape)}")
    if scales.shape != (scale_count(codes.numel()),):
        raise ValueError(f"dequantize_fp8: {codes.numel()} codes need {codes.numel() // BLOCK} scales, got "
                         f"{list(scales.shape)}")
    dequantize_fp8_rows(codes[None], scales[None], out[None], use_kernel=use_kernel)
    return out


__all__ = ["BLOCK", "FP8", "dequantize_fp8", "dequantize_fp8_ref", "dequantize_fp8_rows", "fp8_round_trip",
           "quantize_fp8", "scale_count"]
