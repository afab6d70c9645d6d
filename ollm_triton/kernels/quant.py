"""Asymmetric (and symmetric) low-bit quantization of K/V in the KIVI layout, with bit packing.

Keys are quantized per channel in groups of `group` consecutive tokens (one scale and zero point per
(group of tokens, channel)); values per token in groups of `group` consecutive channels (one per (token, group of
channels)). KIVI (Liu et al., 2024) found this pairing keeps attention accurate at 2-4 bits: key outliers live in
fixed channels, value errors average out over tokens.

    x ~= code * scale + zero        code in [0, 2**bits - 1]          (asymmetric: zero = group minimum)
    x ~= (code - 2**(bits-1)) * scale                                 (symmetric: no zero point is stored)

Packing: P = 8 // bits codes per byte, interleaved along the last (channel) axis: byte j holds channels P*j + i
at bits [i*bits, (i+1)*bits). A shift and a mask give plane i (channels i, P + i, 2P + i, ...) of a whole tile
of bytes, read with contiguous loads; the fused decode works plane by plane (kernels/kv_quant_decode.py).

Scales and zero points are stored in float16 for 16-bit models (bfloat16's 8-bit mantissa would put the zero
point of an int8 group off by more than one code step) and in float32 for float32 models. Codes are computed
against the stored (rounded) scale and zero, so the rounding of the scale costs no extra error.

PyTorch reference (`*_ref`, the CPU path) and Triton kernels (`quantize_keys`, `quantize_values`, the CUDA path)
sit side by side; both round half up (floor(y + 0.5)).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BITS = (2, 4, 8)


def codes_per_byte(bits: int) -> int:
    if bits not in BITS:
        raise ValueError(f"bits must be one of {BITS}, got {bits}")
    return 8 // bits


def scale_dtype_for(dtype: torch.dtype) -> torch.dtype:
    """Storage dtype of scales and zero points for a model dtype (see the module docstring)."""
    return torch.float32 if dtype == torch.float32 else torch.float16


def value_group_size(group_size: int, head_dim: int) -> int:
    """Channels per value group: the largest power of two <= min(group_size, head_dim) that divides head_dim
    (head_dim 128, group 128 -> 128: one scale per token; head_dim 96 -> 32)."""
    g = 1
    while g * 2 <= min(group_size, head_dim) and head_dim % (g * 2) == 0:
        g *= 2
    return g


# ----------------------------------------------------------------------------------------------------------------
# PyTorch reference
# ----------------------------------------------------------------------------------------------------------------


def pack_ref(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """codes: [..., n] integers in [0, 2**bits) -> uint8 [..., ceil(n / P)], P = 8 // bits (zero-padded)."""
    p = codes_per_byte(bits)
    n = codes.shape[-1]
    pad = (-n) % p
    c = codes.to(torch.int32)
    if pad:
        c = torch.nn.functional.pad(c, (0, pad))
    c = c.reshape(*c.shape[:-1], c.shape[-1] // p, p)
    shifts = torch.arange(p, device=c.device, dtype=torch.int32) * bits
    return (c << shifts).sum(-1).to(torch.uint8)


def unpack_ref(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """packed: uint8 [..., ceil(n / P)] -> uint8 codes [..., n] (inverse of pack_ref)."""
    p = codes_per_byte(bits)
    shifts = torch.arange(p, device=packed.device, dtype=torch.int32) * bits
    c = (packed.to(torch.int32)[..., None] >> shifts) & ((1 << bits) - 1)
    return c.reshape(*packed.shape[:-1], packed.shape[-1] * p)[..., :n].to(torch.uint8)


def _quantize_groups(x: torch.Tensor, bits: int, symmetric: bool, sdtype: torch.dtype, dim: int):
    """Quantize x (float) with one scale/zero per slice reduced over `dim` (kept as size 1).
    Returns codes uint8 (x's shape), scale, zero (zero None when symmetric), both reduced over dim."""
    x = x.float()
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        half = 2 ** (bits - 1)
        amax = x.abs().amax(dim, keepdim=True)
        scale = (amax / max(qmax, 1)).to(sdtype).float()
        scale = torch.where(scale == 0, torch.ones_like(scale), scale)
        codes = torch.floor(x / scale + 0.5) + half
        codes = codes.clamp(0, 2**bits - 1)
        return codes.to(torch.uint8), scale.to(sdtype), None
    mn = x.amin(dim, keepdim=True).to(sdtype).float()
    mx = x.amax(dim, keepdim=True)
    scale = ((mx - mn) / (2**bits - 1)).to(sdtype).float()
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    codes = torch.floor((x - mn) / scale + 0.5).clamp(0, 2**bits - 1)
    return codes.to(torch.uint8), scale.to(sdtype), mn.to(sdtype)


def _dequantize(codes, scale, zero, bits, symmetric):
    c = codes.float()
    if symmetric:
        return (c - 2 ** (bits - 1)) * scale.float()
    return c * scale.float() + zero.float()


def quantize_keys_ref(k: torch.Tensor, bits: int, group: int, symmetric: bool = False, sdtype=None):
    """Per-channel key quantization in groups of `group` tokens.

    k: [..., T, D] with T % group == 0 -> (packed uint8 [..., T, ceil(D/P)], scale [..., T/group, D],
    zero [..., T/group, D] or None when symmetric).
    """
    t, d = k.shape[-2:]
    if t % group:
        raise ValueError(f"keys are quantized in whole groups: {t} tokens is not a multiple of group {group}")
    sdtype = sdtype or scale_dtype_for(k.dtype)
    x = k.reshape(*k.shape[:-2], t // group, group, d)
    codes, scale, zero = _quantize_groups(x, bits, symmetric, sdtype, dim=-2)
    codes = codes.reshape(k.shape)
    scale = scale.squeeze(-2)
    zero = zero.squeeze(-2) if zero is not None else None
    return pack_ref(codes, bits), scale, zero


def dequantize_keys_ref(packed, scale, zero, bits: int, group: int, head_dim: int, symmetric=False, dtype=None):
    """Inverse of quantize_keys_ref: -> [..., T, D] in `dtype` (float32 if None)."""
    codes = unpack_ref(packed, bits, head_dim)
    t = codes.shape[-2]
    c = codes.reshape(*codes.shape[:-2], t // group, group, head_dim)
    z = zero.unsqueeze(-2) if zero is not None else None
    x = _dequantize(c, scale.unsqueeze(-2), z, bits, symmetric).reshape(codes.shape)
    return x.to(dtype or torch.float32)


def quantize_values_ref(v: torch.Tensor, bits: int, group: int, symmetric: bool = False, sdtype=None):
    """Per-token value quantization in groups of `group` channels (D % group == 0).

    v: [..., T, D] -> (packed uint8 [..., T, ceil(D/P)], scale [..., T, D/group], zero [..., T, D/group] or None).
    """
    t, d = v.shape[-2:]
    if d % group:
        raise ValueError(f"value group {group} must divide head_dim {d}")
    sdtype = sdtype or scale_dtype_for(v.dtype)
    x = v.reshape(*v.shape[:-1], d // group, group)
    codes, scale, zero = _quantize_groups(x, bits, symmetric, sdtype, dim=-1)
    codes = codes.reshape(v.shape)
    scale = scale.squeeze(-1)
    zero = zero.squeeze(-1) if zero is not None else None
    return pack_ref(codes, bits), scale, zero


def dequantize_values_ref(packed, scale, zero, bits: int, group: int, head_dim: int, symmetric=False, dtype=None):
    """Inverse of quantize_values_ref: -> [..., T, D] in `dtype` (float32 if None)."""
    codes = unpack_ref(packed, bits, head_dim)
    c = codes.reshape(*codes.shape[:-1], head_dim // group, group)
    z = zero.unsqueeze(-1) if zero is not None else None
    x = _dequantize(c, scale.unsqueeze(-1), z, bits, symmetric).reshape(codes.shape)
    return x.to(dtype or torch.float32)


# ----------------------------------------------------------------------------------------------------------------
# Triton: quantize and pack
# ----------------------------------------------------------------------------------------------------------------


@triton.jit
def _scale_zero(b_min, b_max, BITS: tl.constexpr, SYMMETRIC: tl.constexpr, SDTYPE: tl.constexpr):
    """Scale and zero (rounded to their storage dtype, returned in float32) from a group's min and max."""
    if SYMMETRIC:
        b_amax = tl.maximum(tl.abs(b_min), tl.abs(b_max))
        b_scale = (b_amax / ((1 << (BITS - 1)) - 1)).to(SDTYPE).to(tl.float32)
        b_scale = tl.where(b_scale == 0.0, 1.0, b_scale)
        b_zero = -b_scale * (1 << (BITS - 1))
    else:
        b_zero = b_min.to(SDTYPE).to(tl.float32)
        b_scale = ((b_max - b_zero) / ((1 << BITS) - 1)).to(SDTYPE).to(tl.float32)
        b_scale = tl.where(b_scale == 0.0, 1.0, b_scale)
    return b_scale, b_zero


@triton.jit
def _codes(b_x, b_scale, b_zero, BITS: tl.constexpr):
    # x = code * scale + zero, for the symmetric case too (zero = -scale * 2**(bits-1))
    b_c = tl.floor((b_x - b_zero) / b_scale + 0.5)
    return tl.minimum(tl.maximum(b_c, 0.0), (1 << BITS) - 1).to(tl.int32)


@triton.jit(do_not_specialize=["n_groups"])
def _quantize_keys_kernel(
    X, C, S, Z,
    stride_x_bh, stride_x_t,
    stride_c_bh, stride_c_t,
    stride_s_bh, stride_s_g,
    n_groups,
    D: tl.constexpr, GROUP: tl.constexpr, BITS: tl.constexpr, BLOCK_J: tl.constexpr,
    SYMMETRIC: tl.constexpr, SDTYPE: tl.constexpr,
):
    """One program: one (batch*head, token group, block of BLOCK_J packed bytes = BLOCK_J*P channels)."""
    P: tl.constexpr = 8 // BITS
    i_bh, i_g, i_j = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    o_t = i_g * GROUP + tl.arange(0, GROUP)
    o_j = i_j * BLOCK_J + tl.arange(0, BLOCK_J)
    o_i = tl.arange(0, P)
    o_d = o_j[:, None] * P + o_i[None, :]  # [BLOCK_J, P] channel of each code slot
    m_d = o_d < D
    p_x = X + i_bh * stride_x_bh + o_t[:, None, None] * stride_x_t + o_d[None, :, :]
    b_x = tl.load(p_x, mask=m_d[None, :, :], other=0.0).to(tl.float32)  # [GROUP, BLOCK_J, P]
    b_scale, b_zero = _scale_zero(tl.min(b_x, 0), tl.max(b_x, 0), BITS, SYMMETRIC, SDTYPE)  # [BLOCK_J, P]
    b_c = _codes(b_x, b_scale[None], b_zero[None], BITS)
    b_packed = tl.sum(b_c << (o_i[None, None, :] * BITS), 2).to(tl.uint8)  # [GROUP, BLOCK_J]
    p_c = C + i_bh * stride_c_bh + o_t[:, None] * stride_c_t + o_j[None, :]
    tl.store(p_c, b_packed, mask=(o_j < D // P)[None, :])
    p_s = i_bh * stride_s_bh + i_g * stride_s_g + o_d
    tl.store(S + p_s, b_scale.to(SDTYPE), mask=m_d)
    if not SYMMETRIC:
        tl.store(Z + p_s, b_zero.to(SDTYPE), mask=m_d)


@triton.jit(do_not_specialize=["n_tokens"])
def _quantize_values_kernel(
    X, C, S, Z,
    stride_x_bh, stride_x_t,
    stride_c_bh, stride_c_t,
    stride_s_bh, stride_s_t,
    n_tokens,
    D: tl.constexpr, GROUP: tl.constexpr, N_GROUPS: tl.constexpr, BITS: tl.constexpr, BLOCK_T: tl.constexpr,
    SYMMETRIC: tl.constexpr, SDTYPE: tl.constexpr,
):
    """One program: BLOCK_T tokens of one batch*head, all D channels as [N_GROUPS, GROUP / P, P] code slots."""
    P: tl.constexpr = 8 // BITS
    JG: tl.constexpr = GROUP // P  # packed bytes per group
    i_bh, i_t = tl.program_id(0), tl.program_id(1)
    o_t = i_t * BLOCK_T + tl.arange(0, BLOCK_T)
    o_g = tl.arange(0, N_GROUPS)
    o_j = tl.arange(0, JG)
    o_i = tl.arange(0, P)
    m_t = o_t < n_tokens
    o_d = o_g[:, None, None] * GROUP + o_j[None, :, None] * P + o_i[None, None, :]  # [N_GROUPS, JG, P]
    m_g = o_g < D // GROUP
    p_x = X + i_bh * stride_x_bh + o_t[:, None, None, None] * stride_x_t + o_d[None]
    m_x = m_t[:, None, None, None] & m_g[None, :, None, None]
    b_x = tl.load(p_x, mask=m_x, other=0.0).to(tl.float32)  # [BLOCK_T, N_GROUPS, JG, P]
    b_min = tl.min(tl.min(b_x, 3), 2)  # [BLOCK_T, N_GROUPS]
    b_max = tl.max(tl.max(b_x, 3), 2)
    b_scale, b_zero = _scale_zero(b_min, b_max, BITS, SYMMETRIC, SDTYPE)
    b_c = _codes(b_x, b_scale[:, :, None, None], b_zero[:, :, None, None], BITS)
    b_packed = tl.sum(b_c << (o_i[None, None, None, :] * BITS), 3).to(tl.uint8)  # [BLOCK_T, N_GROUPS, JG]
    o_byte = o_g[:, None] * JG + o_j[None, :]
    p_c = C + i_bh * stride_c_bh + o_t[:, None, None] * stride_c_t + o_byte[None]
    tl.store(p_c, b_packed, mask=m_t[:, None, None] & m_g[None, :, None])
    p_s = i_bh * stride_s_bh + o_t[:, None] * stride_s_t + o_g[None, :]
    m_s = m_t[:, None] & m_g[None, :]
    tl.store(S + p_s, b_scale.to(SDTYPE), mask=m_s)
    if not SYMMETRIC:
        tl.store(Z + p_s, b_zero.to(SDTYPE), mask=m_s)


_TL_DTYPES = {torch.float16: tl.float16, torch.float32: tl.float32, torch.bfloat16: tl.bfloat16}


def _flat(x: torch.Tensor) -> torch.Tensor:
    """[..., T, D] -> [BH, T, D] with unit stride on the last axis (a view when possible)."""
    x = x.reshape(-1, *x.shape[-2:])
    return x if x.stride(-1) == 1 else x.contiguous()


def quantize_keys(k, bits: int, group: int, symmetric: bool = False, sdtype=None, out=None):
    """Triton twin of quantize_keys_ref. k: [..., T, D], T % group == 0.

    out: optional (packed [..., T, D/P], scale [..., T/group, D], zero or None) to write into (views of the
    cache's buffers); allocated otherwise. Returns that triple.
    """
    p = codes_per_byte(bits)
    *lead, t, d = k.shape
    if t % group or d % p:
        raise ValueError(f"quantize_keys needs T % group == 0 and D % {p} == 0, got T={t}, D={d}, group={group}")
    sdtype = sdtype or scale_dtype_for(k.dtype)
    if out is None:
        out = (
            torch.empty(*lead, t, d // p, dtype=torch.uint8, device=k.device),
            torch.empty(*lead, t // group, d, dtype=sdtype, device=k.device),
            None if symmetric else torch.empty(*lead, t // group, d, dtype=sdtype, device=k.device),
        )
    packed, scale, zero = out
    if t == 0:
        return out
    x, c, s = _flat(k), packed.view(-1, t, d // p), scale.view(-1, t // group, d)
    z = s if zero is None else zero.view(-1, t // group, d)
    block_j = min(triton.next_power_of_2(d // p), max(1, 2048 // (group * p)))
    grid = (x.shape[0], t // group, triton.cdiv(d // p, block_j))
    _quantize_keys_kernel[grid](
        x, c, s, z, x.stride(0), x.stride(1), c.stride(0), c.stride(1), s.stride(0), s.stride(1), t // group,
        D=d, GROUP=group, BITS=bits, BLOCK_J=block_j, SYMMETRIC=symmetric, SDTYPE=_TL_DTYPES[sdtype],
    )
    return out


def quantize_values(v, bits: int, group: int, symmetric: bool = False, sdtype=None, out=None):
    """Triton twin of quantize_values_ref. v: [..., T, D], D % group == 0, group a power of two >= 8 // bits.

    out: optional (packed [..., T, D/P], scale [..., T, D/group], zero or None). Returns that triple.
    """
    p = codes_per_byte(bits)
    *lead, t, d = v.shape
    if d % group or group % p or group & (group - 1):
        raise ValueError(f"quantize_values needs a power-of-two group dividing D and >= {p}, got {group}, D={d}")
    sdtype = sdtype or scale_dtype_for(v.dtype)
    n_groups = d // group
    if out is None:
        out = (
            torch.empty(*lead, t, d // p, dtype=torch.uint8, device=v.device),
            torch.empty(*lead, t, n_groups, dtype=sdtype, device=v.device),
            None if symmetric else torch.empty(*lead, t, n_groups, dtype=sdtype, device=v.device),
        )
    packed, scale, zero = out
    if t == 0:
        return out
    x, c, s = _flat(v), packed.view(-1, t, d // p), scale.view(-1, t, n_groups)
    z = s if zero is None else zero.view(-1, t, n_groups)
    block_t = max(1, min(triton.next_power_of_2(t), 4096 // triton.next_power_of_2(d)))
    grid = (x.shape[0], triton.cdiv(t, block_t))
    _quantize_values_kernel[grid](
        x, c, s, z, x.stride(0), x.stride(1), c.stride(0), c.stride(1), s.stride(0), s.stride(1), t,
        D=d, GROUP=group, N_GROUPS=triton.next_power_of_2(n_groups), BITS=bits, BLOCK_T=block_t,
        SYMMETRIC=symmetric, SDTYPE=_TL_DTYPES[sdtype],
    )
    return out
