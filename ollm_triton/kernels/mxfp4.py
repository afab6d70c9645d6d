"""MXFP4 (OCP microscaling) weights as gpt-oss checkpoints store their experts: 32 FP4 (e2m1) codes share one
power-of-two scale (e8m0, exponent bias 127); a byte holds two codes, the low nibble first. Code -> value: sign bit 3,
then 0, 0.5, 1, 1.5, 2, 3, 4, 6.

    MXFP4(blocks, scales): blocks uint8 [E, N, K / 32, 16], scales uint8 [E, N, K / 32] (row n: output n, along K)
    dequantize_mxfp4(blocks, scales, dtype) -> [..., K]: the PyTorch reference (exact in bf16 and wider)

The expert kernels (kernels/moe.py) read these bytes directly (`_mx_dot`): 4.25 bits a weight from memory instead of
16, decoded in registers before the dot.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

FP4_E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
GROUP = 32  # codes per scale


class MXFP4(NamedTuple):
    """A stack of MXFP4 matrices: row n of matrix e is output n; `dense(layout)` is the matrix the kernels read."""

    blocks: torch.Tensor  # uint8 [E, N, K / 32, 16]
    scales: torch.Tensor  # uint8 [E, N, K / 32]

    @property
    def shape_nk(self) -> tuple[int, int, int]:
        e, n, g, _ = self.blocks.shape
        return e, n, g * GROUP

    def dense(self, dtype: torch.dtype, transposed: bool) -> torch.Tensor:
        """[E, N, K] (transposed False: the "concat" layout) or [E, K, N] (True: "interleaved_t") in `dtype`."""
        w = dequantize_mxfp4(self.blocks, self.scales, dtype)
        return w.transpose(1, 2) if transposed else w


def stored_bytes(weights: int) -> int:
    """Bytes of `weights` weights as MXFP4: half a byte each plus one scale byte per GROUP."""
    return weights // 2 + weights // GROUP


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """blocks: uint8 [..., G, 16] (32 FP4 codes per group), scales: uint8 [..., G] -> [..., G * 32] in `dtype`.

    Exact in bf16 and wider: every value is an e2m1 number times a power of two (ldexp in float32, then cast)."""
    if blocks.shape[:-1] != scales.shape or blocks.shape[-1] != 16:
        raise ValueError(f"MXFP4 blocks {list(blocks.shape)} and scales {list(scales.shape)} do not pair "
                         "(blocks [..., G, 16] uint8, scales [..., G] uint8)")
    table = torch.tensor(FP4_E2M1, dtype=torch.float32, device=blocks.device)
    codes = torch.stack((blocks & 0x0F, blocks >> 4), dim=-1).flatten(-2).long()  # [..., G, 32], low nibble first
    values = torch.ldexp(table[codes], (scales.to(torch.int32) - 127)[..., None].float())
    return values.flatten(-2).to(dtype)


def quantize_mxfp4(w: torch.Tensor) -> MXFP4:
    """[E, N, K] (K a multiple of 32) -> MXFP4: each group's scale the smallest power of two that puts its largest
    magnitude within 6, each value rounded to the nearest e2m1 code. For random presets and tests; checkpoints
    arrive quantized."""
    e, n, k = w.shape
    if k % GROUP:
        raise ValueError(f"MXFP4 needs K a multiple of {GROUP}, got {k}")
    g = w.float().reshape(e, n, k // GROUP, GROUP)
    amax = g.abs().amax(dim=-1).clamp_min(2.0 ** -126)
    exp = torch.ceil(torch.log2(amax / 6.0)).clamp(-127, 127)
    scaled = g / torch.exp2(exp)[..., None]
    table = torch.tensor(FP4_E2M1[:8], dtype=torch.float32, device=w.device)
    code = (scaled.abs()[..., None] - table).abs().argmin(dim=-1) + 8 * (scaled < 0)  # nearest magnitude, then sign
    code = code.to(torch.uint8).reshape(e, n, k // GROUP, 16, 2)
    blocks = code[..., 0] | (code[..., 1] << 4)
    return MXFP4(blocks.contiguous(), (exp + 127).to(torch.uint8).contiguous())


__all__ = ["FP4_E2M1", "GROUP", "MXFP4", "dequantize_mxfp4", "quantize_mxfp4", "stored_bytes"]
