"""fp8 rows (kernels/fp8_rows.py): the quantizer against a float64 nearest-value search over every e4m3 code, the
round trip's error bound, and the Triton dequantization (interpreter on the CPU, bf16 on a GPU) against its
reference bit for bit, into a NaN-poisoned output, on odd block counts."""

import pytest
import torch

from ollm_triton.kernels.fp8_rows import BLOCK, FP8, dequantize_fp8, dequantize_fp8_ref, fp8_round_trip, quantize_fp8

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


def test_bad_input_refused():
    codes, scales = quantize_fp8(torch.randn(2 * BLOCK))
    with pytest.raises(ValueError, match=r"^dequantize_fp8: 256 codes need 2 scales, got \[3\]$"):
        dequantize_fp8(codes, torch.ones(3), torch.empty(2 * BLOCK))
    with pytest.raises(ValueError, match="takes codes .n. torch.float8_e4m3fn and a contiguous out"):
        dequantize_fp8(codes.float(), scales, torch.empty(2 * BLOCK))
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
