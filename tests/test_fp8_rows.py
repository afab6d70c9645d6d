"""fp8 rows (kernels/fp8_rows.py): the quantizer against a float64 nearest-value search over every e4m3 code, the
round trip's error bound, and the Triton dequantization (interpreter on the CPU, bf16 on a GPU) against its
reference bit for bit, into a NaN-poisoned output, on odd block counts."""

import pytest
import torch

from ollm_triton.kernels.fp8_rows import (
    BLOCK,
    FP8,
    dequantize_fp8,
    dequantize_fp8_ref,
    dequantize_fp8_rows,
    fp8_round_trip,
    quantize_fp8,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def e4m3_grid() -> torch.Tensor:
    """Every finite e4m3fn value, float64, sorted (independent of torch's float -> e4m3 cast)."""
    values = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(FP8).double()
    return values[values.isfinite()].unique()


def sample(rows: int, blocks: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, blocks * BLOCK, generator=g, dtype=torch.float64)
    x[:, :BLOCK] *= 1e-3  # a block of small weights: its own scale, not its neighbours'
    x[:, BLOCK // 2] = 40.0  # an outlier sets its block's scale
    if blocks > 2:
        x[:, 2 * BLOCK:3 * BLOCK] = 0.0  # an all-zero block (padding): scale 1, codes 0
    return x


@pytest.mark.parametrize("rows,blocks", [(1, 1), (3, 63), (2, 129)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantize_matches_float64_nearest_code(rows, blocks, dtype):
    x = sample(rows, blocks, rows * blocks).to(dtype)
    codes, scales = quantize_fp8(x)
    assert codes.dtype == FP8 and codes.shape == x.shape and scales.shape == (rows, blocks) and scales.dtype == dtype
    xb = x.double().reshape(rows, blocks, BLOCK)
    amax = xb.abs().amax(-1)
    want_scale = torch.where(amax > 0, (amax / 448).to(dtype).double(), torch.ones_like(amax))
    assert torch.equal(scales.double(), want_scale)
    y = (xb / want_scale[..., None]).clamp(-448, 448).reshape(-1)
    grid = e4m3_grid()
    dist = (y[:, None] - grid[None, :]).abs()
    near = grid[dist.argmin(-1)]
    tie = (dist <= dist.min(-1, keepdim=True).values + 1e-12).sum(-1) > 1  # y halfway between two codes
    got = codes.reshape(-1)
    assert torch.equal(got.double()[~tie], near[~tie])
    assert (got.view(torch.uint8)[tie] & 1 == 0).all()  # a tie goes to the even code (mantissa bit 0 clear)
    assert ((got.double()[tie] - y[tie]).abs() == (near[tie] - y[tie]).abs()).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_round_trip_error_bound(dtype):
    """|x - code * scale| <= scale * max(|y| 2^-4, 2^-10) (half an e4m3 step, normal or subnormal), plus the output's
    own rounding; the relative RMS error of Gaussian weights stays near 2%."""
    x = sample(4, 33, 7).to(dtype)
    codes, scales = quantize_fp8(x)
    back = dequantize_fp8_ref(codes, scales, dtype).double()
    s = scales.double().repeat_interleave(BLOCK, dim=-1)
    y = x.double() / s
    bound = s * torch.maximum(y.abs() * 2.0**-4, torch.full_like(y, 2.0**-10)) + back.abs() * torch.finfo(dtype).eps
    assert ((x.double() - back).abs() <= bound * (1 + 1e-9)).all()
    rel = (x.double() - back).pow(2).mean().sqrt() / x.double().pow(2).mean().sqrt()
    assert 0.005 < rel < 0.04


@pytest.mark.interpreter
@pytest.mark.parametrize("blocks", [1, 63, 129])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_dequantize_kernel_equals_reference(blocks, dtype, poison):
    x = sample(1, blocks, blocks).to(dtype).reshape(-1)
    codes, scales = quantize_fp8(x)
    out = poison(torch.empty_like(x))
    dequantize_fp8(codes, scales, out, use_kernel=True)
    assert torch.equal(out, dequantize_fp8_ref(codes, scales, dtype))


@pytest.mark.gpu
@pytest.mark.parametrize("blocks", [1, 63, 24576])  # 24576 blocks: one Qwen3-Next expert row (3.1 M weights)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_dequantize_kernel_on_cuda(blocks, dtype, poison):
    x = sample(1, blocks, blocks).to(dtype).reshape(-1).cuda()
    codes, scales = quantize_fp8(x)
    out = poison(torch.empty_like(x))
    dequantize_fp8(codes, scales, out)
    assert torch.equal(out, dequantize_fp8_ref(codes, scales, dtype))


def staged(rows: int, blocks: int, dtype: torch.dtype, device=DEVICE):
    """rows fp8 rows packed as prefetch/experts.py stages them: one byte row each, the codes then the scales, so
    codes and scales are strided views of one buffer; plus the float64 dequantization of each row."""
    x = sample(rows, blocks, rows + blocks).to(dtype)
    codes, scales = quantize_fp8(x)
    n = x.shape[1]
    buf = torch.empty(rows, n + scales.shape[1] * scales.element_size(), dtype=torch.uint8)
    buf[:, :n] = codes.view(torch.uint8)
    buf[:, n:] = scales.view(torch.uint8)
    buf = buf.to(device)
    want = (codes.double().reshape(rows, -1, BLOCK) * scales.double()[..., None]).reshape(rows, n)
    return buf[:, :n].view(FP8), buf[:, n:].view(dtype), want


@pytest.mark.interpreter
@pytest.mark.parametrize("rows,blocks", [(1, 1), (5, 63), (3, 129)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_dequantize_rows_into_indexed_slots(rows, blocks, dtype, poison):
    """One launch for a batch of staged rows: row r lands in slot index[r] (slots out of order, rows between them
    untouched), equal to the reference and to float64 rounded once; every written slot was NaN before."""
    codes, scales, want = staged(rows, blocks, dtype, device="cpu")
    slots = 2 * rows + 1
    index = torch.randperm(slots, generator=torch.Generator().manual_seed(rows))[:rows]
    out = poison(torch.empty(slots, codes.shape[1], dtype=dtype))
    dequantize_fp8_rows(codes, scales, out, index, use_kernel=True)
    assert torch.equal(out[index], dequantize_fp8_ref(codes, scales, dtype))
    assert torch.equal(out[index], want.to(dtype))
    untouched = torch.ones(slots, dtype=torch.bool)
    untouched[index] = False
    assert out[untouched].isnan().all()
    ref = poison(torch.empty_like(out))
    dequantize_fp8_rows(codes, scales, ref, index, use_kernel=False)
    assert torch.equal(ref.nan_to_num(), out.nan_to_num())  # the CPU path writes the same rows


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_dequantize_rows_on_cuda(dtype, poison):
    codes, scales, want = staged(4, 24576, dtype)  # four Qwen3-Next expert rows
    index = torch.tensor([6, 0, 3, 5], device="cuda")
    out = poison(torch.empty(7, codes.shape[1], dtype=dtype, device="cuda"))
    dequantize_fp8_rows(codes, scales, out, index)
    assert torch.equal(out[index].cpu(), want.to(dtype)) and out[[1, 2, 4]].isnan().all()


def test_bad_input_refused():
    codes, scales = quantize_fp8(torch.randn(2 * BLOCK))
    with pytest.raises(ValueError, match=r"^dequantize_fp8: 256 codes need 2 scales, got \[3\]$"):
        dequantize_fp8(codes, torch.ones(3), torch.empty(2 * BLOCK))
    with pytest.raises(ValueError, match="takes codes .n. torch.float8_e4m3fn and a contiguous out"):
        dequantize_fp8(codes.float(), scales, torch.empty(2 * BLOCK))
    rows = codes.view(1, -1)
    with pytest.raises(ValueError, match=r"^dequantize_fp8_rows: index must be \[1\] integers on cpu \(a slot a "
                                         r"row\), got \[1\] torch.float32 on cpu$"):
        dequantize_fp8_rows(rows, scales.view(1, -1), torch.empty(3, 2 * BLOCK), torch.zeros(1))
    with pytest.raises(ValueError, match=r"^dequantize_fp8_rows: 1 rows without an index need out of at least 1"):
        dequantize_fp8_rows(rows, scales.view(1, -1), torch.empty(0, 2 * BLOCK))
    with pytest.raises(ValueError, match=r"^an fp8 row holds a multiple of 128 elements \(pad it\), got 100$"):
        quantize_fp8(torch.randn(100))


def test_round_trip_pads_to_whole_blocks():
    """129 weights: the last block holds one weight and 127 zeros, its own scale (the first block's outlier does not
    reach it)."""
    x = torch.randn(2, 129, dtype=torch.float64)
    x[:, 0] = 1000.0
    back = fp8_round_trip(x)
    assert back.shape == x.shape and torch.equal(back[:, :128], dequantize_fp8_ref(*quantize_fp8(x[:, :128]),
                                                                                    torch.float64))
    assert torch.allclose(back[:, 128], x[:, 128], rtol=2**-4, atol=0)  # alone in its block: |y| = 448, 3 bits
