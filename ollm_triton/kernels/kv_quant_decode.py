"""Fused decode attention over a KIVI-quantized KV cache (packed codes + scales/zeros + a full-precision tail).

The cache of one (batch, KV head) holds `n_quant` quantized tokens (a multiple of the key group) followed by
`kv_len - n_quant` residual tokens in the model dtype. One program serves every query head of one KV head (and
every one of the T new tokens): K/V bytes are read once for the whole GQA group, which is what makes decode
bandwidth-bound on the codes rather than on the query count.

Dequantization happens in registers, plane by plane (see the kernel's docstring), and most of it is folded away:
- keys: a block of BLOCK_K tokens lies inside one key group, so its scale s[d] and zero z[d] are per channel:
      q . k_n = sum_d (q_d s_d) c_nd + sum_d q_d z_d
  the query is scaled once per block and the codes go straight into the dot (no per-element multiply);
- values with one group per token (value group == head_dim, the default for head_dim 128):
      sum_n p_n v_nd = sum_n (p_n s_n) c_nd + sum_n p_n z_n
  so the probabilities are scaled instead of the values. Narrower value groups dequantize c*s+z per element.
The codes themselves become fp16 dot operands two at a time in inline PTX on a GPU (`_unpack_asm`); the CPU
interpreter, which cannot run PTX, uses the same bit trick in Triton ops.

The KV blocks visited follow the attention backend's `DecodeSchedule` (block ids in units of BLOCK_K, plus the
sliding-window/sink mask), so `+attention=sliding_window +cache=int4` reads only the window's packed blocks.
The visit list is split over programs (flash-decoding) because at batch 1 there are only Hkv (8) heads to spread
over 132 SMs; a second kernel merges the splits' partials (decode_merge.py).

`quant_decode_ref` is the reference: dequantize everything, then attend with the same visibility mask in float64.
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch
import triton
import triton.language as tl

from ollm_triton.kernels import kv_quant_decode_mma as mma
from ollm_triton.kernels import quant as Q
from ollm_triton.kernels.decode_merge import merge_splits, num_sms, one_wave_splits

_TL = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}
LAST_LAUNCH: dict = {}  # what the last quant_decode call ran ({"kernel", "splits"}), for benchmarks to report


def _unpack_asm(bits: int, i: int) -> str:
    """PTX for plane i of 4 packed bytes (one 32-bit register, $2) -> 4 fp16 codes in two f16x2 registers ($0, $1).

    Each pair of bytes is spread to the two halves of a register (prmt), the plane's bits are masked in place and
    OR-ed under 0x6400 (lop3), which makes the fp16 1024 + c * 2**(bits*i) exactly, and one f16x2 fma scales and
    shifts that to c. Two codes per instruction after the spread: about 1.25 instructions a code for int4, where
    the compiler's own unpack of the same expression takes 2.5-3 (SASS of the sm_90 build)."""
    shift = bits * i
    mask = ((1 << bits) - 1) << shift
    f16 = lambda x: int(np.float16(x).view(np.uint16))  # noqa: E731
    scale, bias = f16(2.0**-shift), f16(-1024.0 * 2.0**-shift)
    return ("{ .reg .b32 t0, t1, a0, a1, s, c;\n"
            "prmt.b32 t0, $2, 0, 0x4140;\n"  # bytes 0 and 1 -> the low bytes of the two halves
            "prmt.b32 t1, $2, 0, 0x4342;\n"  # bytes 2 and 3
            f"lop3.b32 a0, t0, {mask | mask << 16:#x}, 0x64006400, 0xea;\n"  # (t & mask) | 0x6400 in each half
            f"lop3.b32 a1, t1, {mask | mask << 16:#x}, 0x64006400, 0xea;\n"
            f"mov.b32 s, {scale | scale << 16:#x};\n"
            f"mov.b32 c, {bias | bias << 16:#x};\n"
            "fma.rn.f16x2 $0, a0, s, c;\n"
            "fma.rn.f16x2 $1, a1, s, c; }")


# one constexpr string per (bits, plane): jitted code reads module constants only when they are tl.constexpr
_ASM_8_0 = tl.constexpr(_unpack_asm(8, 0))
_ASM_4_0, _ASM_4_1 = tl.constexpr(_unpack_asm(4, 0)), tl.constexpr(_unpack_asm(4, 1))
_ASM_2_0, _ASM_2_1 = tl.constexpr(_unpack_asm(2, 0)), tl.constexpr(_unpack_asm(2, 1))
_ASM_2_2, _ASM_2_3 = tl.constexpr(_unpack_asm(2, 2)), tl.constexpr(_unpack_asm(2, 3))

# how codes become dot operands: integer-to-float conversion, the 0x6400 trick in Triton ops, or the PTX above
UNPACK_MODES = {"cvt": 0, "magic": 1, "asm": 2}


def _interpreted(x: torch.Tensor) -> bool:
    return not x.is_cuda or os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _plane(b_w, I: tl.constexpr, BITS: tl.constexpr, UNPACK: tl.constexpr, DOT: tl.constexpr):
    """Codes of plane I (channels P*j + I) of packed bytes b_w [N, J] -> DOT [N, J].

    UNPACK 1, "magic" (fp16 dots): the fp16 whose bits are 0x6400 | c is exactly 1024 + c: an OR and a subtraction
    instead of an integer-to-float conversion, which runs at a quarter of the ALU rate. UNPACK 2, "asm", does the
    same two codes at a time in PTX (b_w must be uint8 there; the others take int32)."""
    if UNPACK == 2:
        if BITS == 8:
            asm: tl.constexpr = _ASM_8_0
        elif BITS == 4:
            asm: tl.constexpr = _ASM_4_0 if I == 0 else _ASM_4_1
        else:
            asm: tl.constexpr = _ASM_2_0 if I == 0 else _ASM_2_1 if I == 1 else _ASM_2_2 if I == 2 else _ASM_2_3
        return tl.inline_asm_elementwise(asm, "=r,=r,r", [b_w], dtype=tl.float16, is_pure=True, pack=4)
    b_c = (b_w >> (I * BITS)) & ((1 << BITS) - 1)
    if UNPACK == 1:
        b_f = (b_c | 0x6400).to(tl.int16).to(tl.float16, bitcast=True)
        return (b_f - 1024.0).to(tl.float16)
    else:
        return b_c.to(DOT)


@triton.jit
def _key_plane(b_qi, p_s, p_z, m_j, BITS: tl.constexpr, SYMMETRIC: tl.constexpr, DOT: tl.constexpr):
    """Plane i's query side for a block (k = c s + z per channel): (q_i s_i) as a dot operand, and q_i . z_i."""
    b_ks = tl.load(p_s, mask=m_j, other=0.0).to(tl.float32)
    if SYMMETRIC:
        b_kz = -b_ks * (1 << (BITS - 1))
    else:
        b_kz = tl.load(p_z, mask=m_j, other=0.0).to(tl.float32)
    return (b_qi * b_ks[None, :]).to(DOT), tl.sum(b_qi * b_kz[None, :], 1)


@triton.jit
def _block_scores(i, BLOCK_IDS, p_kc0, stride_kc_n, KS, KZ, off_ks, stride_ks_g, o_j, o_k, m_j,
                  b_q0, b_q1, b_q2, b_q3, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, KEY_GROUP: tl.constexpr,
                  P: tl.constexpr, BITS: tl.constexpr, SYMMETRIC: tl.constexpr, HAS_BLOCK_IDS: tl.constexpr,
                  UNPACK: tl.constexpr, DOT: tl.constexpr):
    """Log2-domain scores [BM, BK] of visit i (a quantized block), and the block's first key. (Computing block
    i+1's scores before block i's softmax, software pipelining by hand, was tried on the H200: within 2% either
    way, so it was dropped; experiments/kv_cache/README.md, section 6.)"""
    if HAS_BLOCK_IDS:
        start = tl.load(BLOCK_IDS + i) * BLOCK_K
    else:
        start = i * BLOCK_K
    b_kw = tl.load(p_kc0 + (start + o_k)[:, None] * stride_kc_n, mask=m_j[None, :], other=0)  # uint8 [BK, BJ]
    if UNPACK != 2:
        b_kw = b_kw.to(tl.int32)
    # q . (c s + z) = sum over planes of (q_i s_i) . c_i + q_i . z_i: the biases first, as the dots' initial
    # accumulator, then each plane's dot accumulates in place: [BM, BJ] @ [BJ, BK] -> [BM, BK]
    o_s = off_ks + (start // KEY_GROUP) * stride_ks_g + o_j * P
    b_a0, b_bias = _key_plane(b_q0, KS + o_s, KZ + o_s, m_j, BITS, SYMMETRIC, DOT)
    if P >= 2:
        b_a1, b_bias1 = _key_plane(b_q1, KS + o_s + 1, KZ + o_s + 1, m_j, BITS, SYMMETRIC, DOT)
        b_bias += b_bias1
    if P >= 4:
        b_a2, b_bias2 = _key_plane(b_q2, KS + o_s + 2, KZ + o_s + 2, m_j, BITS, SYMMETRIC, DOT)
        b_a3, b_bias3 = _key_plane(b_q3, KS + o_s + 3, KZ + o_s + 3, m_j, BITS, SYMMETRIC, DOT)
        b_bias += b_bias2 + b_bias3
    b_s = tl.broadcast_to(b_bias[:, None], [BLOCK_M, BLOCK_K])
    b_s = tl.dot(b_a0, tl.trans(_plane(b_kw, 0, BITS, UNPACK, DOT)), b_s)
    if P >= 2:
        b_s = tl.dot(b_a1, tl.trans(_plane(b_kw, 1, BITS, UNPACK, DOT)), b_s)
    if P >= 4:
        b_s = tl.dot(b_a2, tl.trans(_plane(b_kw, 2, BITS, UNPACK, DOT)), b_s)
        b_s = tl.dot(b_a3, tl.trans(_plane(b_kw, 3, BITS, UNPACK, DOT)), b_s)
    return b_s, start


@triton.jit
def _value_plane_grouped(b_p, b_vw, p_vs, p_vz, o_j, m_j, I: tl.constexpr, P: tl.constexpr, V_GROUP: tl.constexpr,
                         BITS: tl.constexpr, SYMMETRIC: tl.constexpr, DOT: tl.constexpr):
    """p @ v for plane I when a token has several value groups: dequantize c*s+z in registers.
    p_vs, p_vz: [BK, 1] pointers to each token's scales/zeros."""
    o_grp = ((o_j * P + I) // V_GROUP)[None, :]
    b_vs = tl.load(p_vs + o_grp, mask=m_j[None, :], other=0.0).to(tl.float32)
    if SYMMETRIC:
        b_vz = -b_vs * (1 << (BITS - 1))
    else:
        b_vz = tl.load(p_vz + o_grp, mask=m_j[None, :], other=0.0).to(tl.float32)
    b_c = ((b_vw.to(tl.int32) >> (I * BITS)) & ((1 << BITS) - 1)).to(tl.float32)
    return tl.dot(b_p.to(DOT), (b_c * b_vs + b_vz).to(DOT))  # [BM, BK] @ [BK, BJ] -> [BM, BJ]


@triton.jit
def _softmax_step(b_s, o_n, q_pos, kv_len, window, sink, b_mx, b_l, HAS_WINDOW: tl.constexpr):
    """Mask the block's log2-domain scores, update the running max and sum; -> (p, alpha, max, sum)."""
    m_vis = (o_n[None, :] < kv_len) & (o_n[None, :] <= q_pos[:, None])
    if HAS_WINDOW:
        m_vis = m_vis & ((o_n[None, :] < sink) | (o_n[None, :] > q_pos[:, None] - window))
    b_s = tl.where(m_vis, b_s, float("-inf"))
    b_mx_new = tl.maximum(b_mx, tl.max(b_s, 1))
    b_ref = tl.where(b_mx_new == float("-inf"), 0.0, b_mx_new)  # a row that has seen nothing yet stays at 0
    b_alpha = tl.exp2(b_mx - b_ref)
    b_p = tl.exp2(b_s - b_ref[:, None])
    return b_p, b_alpha, b_mx_new, b_l * b_alpha + tl.sum(b_p, 1)


@triton.jit
def _residual_keys(o_n, n_quant, n_res, p_kr, p_vr, stride_r_n, b_q, o_d, m_d, o_j, m_j, q_pos, kv_len, window, sink,
                   b_mx, b_l, b_acc0, b_acc1, b_acc2, b_acc3, P: tl.constexpr, HAS_WINDOW: tl.constexpr,
                   DOT: tl.constexpr):
    """Attend the residual keys at positions o_n [BR] (full precision, window slot o_n - n_quant); -> the updated
    plane accumulators, running max and sum."""
    o_r = o_n - n_quant
    m_r = (o_r < n_res)[:, None]
    p_r = o_r[:, None] * stride_r_n
    b_k = tl.load(p_kr + p_r + o_d[None, :], mask=m_r & m_d[None, :], other=0.0).to(DOT)
    b_s = tl.dot(b_q, tl.trans(b_k))  # [BM, BD] @ [BD, BR] -> [BM, BR]
    b_p, b_alpha, b_mx, b_l = _softmax_step(b_s, o_n, q_pos, kv_len, window, sink, b_mx, b_l, HAS_WINDOW)
    b_pd = b_p.to(DOT)
    m_rj = m_r & m_j[None, :]
    # the values, read plane by plane to match the accumulators: [BM, BR] @ [BR, BJ] -> [BM, BJ]
    b_v0 = tl.load(p_vr + p_r + (o_j * P)[None, :], mask=m_rj, other=0.0).to(DOT)
    b_acc0 = tl.dot(b_pd, b_v0, b_acc0 * b_alpha[:, None])
    if P >= 2:
        b_v1 = tl.load(p_vr + p_r + (o_j * P + 1)[None, :], mask=m_rj, other=0.0).to(DOT)
        b_acc1 = tl.dot(b_pd, b_v1, b_acc1 * b_alpha[:, None])
    if P >= 4:
        b_v2 = tl.load(p_vr + p_r + (o_j * P + 2)[None, :], mask=m_rj, other=0.0).to(DOT)
        b_v3 = tl.load(p_vr + p_r + (o_j * P + 3)[None, :], mask=m_rj, other=0.0).to(DOT)
        b_acc2 = tl.dot(b_pd, b_v2, b_acc2 * b_alpha[:, None])
        b_acc3 = tl.dot(b_pd, b_v3, b_acc3 * b_alpha[:, None])
    return b_acc0, b_acc1, b_acc2, b_acc3, b_mx, b_l


@triton.jit(do_not_specialize=["n_quant", "kv_len", "n_visit", "n_quant_visit", "blocks_per_split", "n_rsplit",
                                "window", "sink"])
def _quant_decode_kernel(
    Q, KC, KS, KZ, VC, VS, VZ, KR, VR, BLOCK_IDS, O_PART, L_PART, ROW_QUANT, ROW_LEN,
    stride_qb, stride_qh, stride_qt,
    stride_kc_bh, stride_kc_n, stride_ks_bh, stride_ks_g,
    stride_vc_bh, stride_vc_n, stride_vs_bh, stride_vs_n,
    stride_r_bh, stride_r_n,
    n_quant, kv_len, n_visit, n_quant_visit, blocks_per_split, n_rsplit, window, sink, qk_scale,
    H_KV: tl.constexpr, GQ: tl.constexpr, T: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_J: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    KEY_GROUP: tl.constexpr,
    V_GROUPS: tl.constexpr, V_GROUP: tl.constexpr, BITS: tl.constexpr, SYMMETRIC: tl.constexpr,
    HAS_BLOCK_IDS: tl.constexpr, HAS_WINDOW: tl.constexpr, UNPACK: tl.constexpr, DOT: tl.constexpr,
    VARLEN: tl.constexpr = False, RES_CHUNK: tl.constexpr = 1,
):
    """Program (batch*KV head, split): visits [i_lo, i_hi) of the visit list. The first n_quant_visit visits are
    quantized blocks and the rest residual ones (the list is ascending and the quantized region comes first), so
    two branch-free loops replace a per-block branch that would keep the compiler from pipelining the loads.

    The P = 8 // BITS code planes of a packed byte (channels P*j + i) are never interleaved back into a
    [BLOCK_K, D] tile: the query is split into the same planes, each plane makes its own dot, and each plane has
    its own output accumulator, written back to channels P*j + i at the end. (Interleaving with tl.interleave
    gave wrong results on the H200 for tiles of 16 x 16 codes and smaller, Triton 3.6.)

    VARLEN (the static decode step): each row's n_quant and kv_len are read on the device, the launch is fixed at
    capture, and the work follows the row's length instead: split j < n_rsplit attends the residual window's
    tokens [j RES_CHUNK, (j + 1) RES_CHUNK), so its up to residual + group tokens are walked in parallel, not after
    one split's quantized blocks; the splits after them share the row's quantized blocks evenly, at least
    blocks_per_split each, so a short row keeps few programs busy and the rest exit at once. The residual splits
    come first in launch order: they are short, and a quantized split that finds no free slot in the first wave
    waits for one of them, not for a long quantized split."""
    P: tl.constexpr = 8 // BITS
    i_bh, i_split = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H_KV, i_bh % H_KV
    if VARLEN:  # each row its own lengths, read on the device (the static decode step: no host value)
        n_quant = tl.load(ROW_QUANT + i_b).to(tl.int32)
        kv_len = tl.load(ROW_LEN + i_b).to(tl.int32)
        n_quant_visit = n_quant // BLOCK_K

    # rows m = g * T + t: query head i_h * GQ + g, new token t at position kv_len - T + t
    o_m = tl.arange(0, BLOCK_M)
    o_g, o_t = o_m // T, o_m % T
    m_q = (o_m < GQ * T)[:, None]
    o_d = tl.arange(0, BLOCK_D)
    o_j = tl.arange(0, BLOCK_J)
    o_k = tl.arange(0, BLOCK_K)
    m_d, m_j = o_d < D, o_j < D // P
    p_q = Q + i_b * stride_qb + (i_h * GQ + o_g)[:, None] * stride_qh + o_t[:, None] * stride_qt
    # qk_scale = log2(e) / sqrt(D): scores come out in the log2 domain for exp2
    m_qj = m_q & m_j[None, :]
    b_q0 = tl.load(p_q + (o_j * P)[None, :], mask=m_qj, other=0.0).to(tl.float32) * qk_scale
    b_acc0 = tl.zeros([BLOCK_M, BLOCK_J], tl.float32)
    b_q1, b_q2, b_q3 = b_q0, b_q0, b_q0  # placeholders for the planes a byte does not have (unused)
    # their accumulators: one float each, so that the residual loop, which carries all four, keeps no tile of them
    b_none = tl.zeros([1], tl.float32)
    b_acc1, b_acc2, b_acc3 = b_none, b_none, b_none
    if P >= 2:
        b_q1 = tl.load(p_q + (o_j * P + 1)[None, :], mask=m_qj, other=0.0).to(tl.float32) * qk_scale
        b_acc1 = tl.zeros([BLOCK_M, BLOCK_J], tl.float32)
    if P >= 4:
        b_q2 = tl.load(p_q + (o_j * P + 2)[None, :], mask=m_qj, other=0.0).to(tl.float32) * qk_scale
        b_q3 = tl.load(p_q + (o_j * P + 3)[None, :], mask=m_qj, other=0.0).to(tl.float32) * qk_scale
        b_acc2 = tl.zeros([BLOCK_M, BLOCK_J], tl.float32)
        b_acc3 = tl.zeros([BLOCK_M, BLOCK_J], tl.float32)
    q_pos = kv_len - T + o_t

    b_mx = tl.full([BLOCK_M], float("-inf"), tl.float32)
    b_l = tl.zeros([BLOCK_M], tl.float32)
    n_res = kv_len - n_quant
    p_kc0 = KC + i_bh * stride_kc_bh + o_j[None, :]
    p_vc0 = VC + i_bh * stride_vc_bh + o_j[None, :]

    if VARLEN:  # quantized visits only; a residual split (i_split < n_rsplit) starts past them
        # a window (the layer's last `window` keys) skips the quantized blocks wholly before it: the splits share
        # the blocks [i_first, n_quant_visit) only
        i_first = 0
        if HAS_WINDOW:
            i_first = tl.minimum(tl.maximum(kv_len - window, 0) // BLOCK_K, n_quant_visit)
        per_split = tl.maximum(tl.cdiv(n_quant_visit - i_first, tl.num_programs(1) - n_rsplit), blocks_per_split)
        i_lo = tl.where(i_split >= n_rsplit, i_first + (i_split - n_rsplit) * per_split, n_quant_visit)
        i_hi = tl.minimum(i_lo + per_split, n_quant_visit)
    else:
        i_lo = i_split * blocks_per_split
        i_hi = tl.minimum(i_lo + blocks_per_split, n_visit)
    # quantized blocks: each lies inside one key group (KEY_GROUP % BLOCK_K == 0, n_quant % KEY_GROUP == 0)
    i_q_hi = tl.minimum(i_hi, n_quant_visit)
    for i in range(i_lo, i_q_hi):
        b_s, start = _block_scores(
            i, BLOCK_IDS, p_kc0, stride_kc_n, KS, KZ, i_bh * stride_ks_bh, stride_ks_g, o_j, o_k, m_j,
            b_q0, b_q1, b_q2, b_q3, BLOCK_M, BLOCK_K, KEY_GROUP, P, BITS, SYMMETRIC, HAS_BLOCK_IDS, UNPACK, DOT)
        o_n = start + o_k
        b_p, b_alpha, b_mx, b_l = _softmax_step(b_s, o_n, q_pos, kv_len, window, sink, b_mx, b_l, HAS_WINDOW)

        b_vw = tl.load(p_vc0 + o_n[:, None] * stride_vc_n, mask=m_j[None, :], other=0)  # uint8 [BK, BJ]
        if UNPACK != 2:
            b_vw = b_vw.to(tl.int32)
        if V_GROUPS == 1:  # one scale per token: scale the probabilities, not the values
            b_vs = tl.load(VS + i_bh * stride_vs_bh + o_n * stride_vs_n).to(tl.float32)
            if SYMMETRIC:
                b_vz = -b_vs * (1 << (BITS - 1))
            else:
                b_vz = tl.load(VZ + i_bh * stride_vs_bh + o_n * stride_vs_n).to(tl.float32)
            b_ps = (b_p * b_vs[None, :]).to(DOT)
            b_pz = tl.sum(b_p * b_vz[None, :], 1)[:, None]  # sum_n p_n z_n, the same for every channel
            # [BM, BK] @ [BK, BJ] -> [BM, BJ] per plane
            # rescaled and shifted accumulators, into which each plane's dot accumulates in place
            b_acc0 = tl.dot(b_ps, _plane(b_vw, 0, BITS, UNPACK, DOT), b_acc0 * b_alpha[:, None] + b_pz)
            if P >= 2:
                b_acc1 = tl.dot(b_ps, _plane(b_vw, 1, BITS, UNPACK, DOT), b_acc1 * b_alpha[:, None] + b_pz)
            if P >= 4:
                b_acc2 = tl.dot(b_ps, _plane(b_vw, 2, BITS, UNPACK, DOT), b_acc2 * b_alpha[:, None] + b_pz)
                b_acc3 = tl.dot(b_ps, _plane(b_vw, 3, BITS, UNPACK, DOT), b_acc3 * b_alpha[:, None] + b_pz)
        else:
            p_vs = VS + i_bh * stride_vs_bh + o_n[:, None] * stride_vs_n
            p_vz = VZ + i_bh * stride_vs_bh + o_n[:, None] * stride_vs_n
            b_acc0 = b_acc0 * b_alpha[:, None] + _value_plane_grouped(
                b_p, b_vw, p_vs, p_vz, o_j, m_j, 0, P, V_GROUP, BITS, SYMMETRIC, DOT)
            if P >= 2:
                b_acc1 = b_acc1 * b_alpha[:, None] + _value_plane_grouped(
                    b_p, b_vw, p_vs, p_vz, o_j, m_j, 1, P, V_GROUP, BITS, SYMMETRIC, DOT)
            if P >= 4:
                b_acc2 = b_acc2 * b_alpha[:, None] + _value_plane_grouped(
                    b_p, b_vw, p_vs, p_vz, o_j, m_j, 2, P, V_GROUP, BITS, SYMMETRIC, DOT)
                b_acc3 = b_acc3 * b_alpha[:, None] + _value_plane_grouped(
                    b_p, b_vw, p_vs, p_vz, o_j, m_j, 3, P, V_GROUP, BITS, SYMMETRIC, DOT)

    # residual blocks: the newest tokens, in the model dtype. The full query is loaded only now, and the blocks are
    # walked in sub-blocks of BLOCK_R keys: this loop would otherwise set the kernel's register count (213 against
    # 190 without it, int4 at block 128, sm_90), and the tail is at most residual + group tokens long.
    b_q = tl.load(p_q + o_d[None, :], mask=m_q & m_d[None, :], other=0.0).to(tl.float32) * qk_scale
    b_q = b_q.to(DOT)
    o_rk = tl.arange(0, BLOCK_R)
    p_kr, p_vr = KR + i_bh * stride_r_bh, VR + i_bh * stride_r_bh
    if VARLEN:
        # residual split i_split: tokens [r_lo, r_lo + RES_CHUNK) of the window, in sub-blocks
        r_lo = tl.where(i_split < n_rsplit, i_split * RES_CHUNK, n_res)
        for r in range(r_lo, tl.minimum(r_lo + RES_CHUNK, n_res), BLOCK_R):
            b_acc0, b_acc1, b_acc2, b_acc3, b_mx, b_l = _residual_keys(
                n_quant + r + o_rk, n_quant, n_res, p_kr, p_vr, stride_r_n, b_q, o_d, m_d, o_j, m_j, q_pos, kv_len,
                window, sink, b_mx, b_l, b_acc0, b_acc1, b_acc2, b_acc3, P, HAS_WINDOW, DOT)
    else:
        for i in range(tl.maximum(i_lo, n_quant_visit), i_hi):
            if HAS_BLOCK_IDS:
                start = tl.load(BLOCK_IDS + i) * BLOCK_K
            else:
                start = i * BLOCK_K
            for r in range(0, BLOCK_K, BLOCK_R):
                b_acc0, b_acc1, b_acc2, b_acc3, b_mx, b_l = _residual_keys(
                    start + r + o_rk, n_quant, n_res, p_kr, p_vr, stride_r_n, b_q, o_d, m_d, o_j, m_j, q_pos, kv_len,
                    window, sink, b_mx, b_l, b_acc0, b_acc1, b_acc2, b_acc3, P, HAS_WINDOW, DOT)

    # this split's normalised partial and log2-sum-exp (-inf when it saw no key), for decode_merge
    b_l_safe = tl.where(b_l > 0, b_l, 1.0)
    b_lse = tl.where(b_l > 0, b_mx + tl.log2(b_l_safe), float("-inf"))
    o_part = (i_bh.to(tl.int64) * tl.num_programs(1) + i_split) * (GQ * T) + o_m
    tl.store(L_PART + o_part, b_lse, mask=o_m < GQ * T)
    p_o = O_PART + o_part[:, None] * BLOCK_D + (o_j * P)[None, :]
    tl.store(p_o, b_acc0 / b_l_safe[:, None], mask=m_qj)
    if P >= 2:
        tl.store(p_o + 1, b_acc1 / b_l_safe[:, None], mask=m_qj)
    if P >= 4:
        tl.store(p_o + 2, b_acc2 / b_l_safe[:, None], mask=m_qj)
        tl.store(p_o + 3, b_acc3 / b_l_safe[:, None], mask=m_qj)


def _occupancy(bits: int, device: torch.device, programs_per_sm: int | None, maxnreg: int | None):
    """(programs an SM, register cap) of a fused decode launch: 3 under 168 registers for int4/int2 on a GPU unless
    either is given (see split_launch)."""
    if programs_per_sm is None and maxnreg is None and bits < 8 and device.type == "cuda":
        maxnreg, programs_per_sm = 168, 3
    return programs_per_sm, maxnreg


def split_launch(bits: int, device: torch.device, heads: int, n_visit: int, *, num_splits: int | None = None,
                 programs_per_sm: int | None = None, maxnreg: int | None = None) -> tuple[int, int, int | None]:
    """(splits, blocks per split, maxnreg) of a fused decode launch over n_visit blocks of `heads` (batch, KV head)
    pairs. Defaults: int4 and int2 run 3 programs an SM under a cap of 168 registers (since the PTX unpack and the
    leaner residual loop, int4 at block 128 needs about that many uncapped; before them the cap spilled 136 bytes
    and still paid: 159 -> 128 us at 128k keys on the H200). int8 keeps 2 programs an SM: capped, it was slower
    (151 -> 161 us; experiments/kv_cache/README.md, sections 5 and 6). Splits default to one wave of programs."""
    programs_per_sm, maxnreg = _occupancy(bits, device, programs_per_sm, maxnreg)
    if num_splits is None:
        num_splits = one_wave_splits(device, heads, n_visit, per_sm=programs_per_sm or 2)
    per_split = max(1, triton.cdiv(n_visit, max(num_splits, 1)))
    return max(1, triton.cdiv(n_visit, per_split)), per_split, maxnreg


def quant_decode(
    q: torch.Tensor,
    k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, k_res, v_res,
    *, n_quant: int, kv_len: int, bits: int, key_group: int, value_group: int,
    block_ids: torch.Tensor | None = None, window: int = 0, sink: int = 0,
    block_k: int = 64, num_splits: int | None = None, num_warps: int = 4, num_stages: int = 3,
    maxnreg: int | None = None, programs_per_sm: int | None = None, unpack: str | None = None,
    kernel: str | None = None, mma_block_n: int | None = None, mma_maxnreg: int | None = None,
    mma_stages: int | None = None, out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Decode attention of T new queries over a quantized cache: one launch, plus the split merge.

    q: [B, Hq, T, D]. k_codes, v_codes: uint8 [B, Hkv, >= n_quant, D/P]; k_scale, k_zero: [B, Hkv, >= n_quant/key_group,
    D]; v_scale, v_zero: [B, Hkv, >= n_quant, D/value_group] (zeros None when symmetric); k_res, v_res:
    [B, Hkv, >= kv_len - n_quant, D] in the model dtype. Query t sits at position kv_len - T + t and sees keys
    <= its position, inside the schedule's blocks (units of block_k) and window/sink. Returns [B, Hq, T, D] in q's dtype
    (written into `out` when given).
    Launch: num_splits (default: one wave of `programs_per_sm` programs per SM), num_warps, num_stages, and
    maxnreg (a register cap per thread, to fit more programs on an SM at the price of spills).
    unpack: how codes become fp16 dot operands, "asm" (PTX, the default on a GPU), "magic" (the same trick in
    Triton ops, the default under the CPU interpreter, which cannot run PTX) or "cvt" (the only one for fp32 queries).
    kernel: "mma" (kv_quant_decode_mma.py: Gluon, hand-laid-out tensor-core operands) for the quantized blocks,
    "triton" (this file's kernel for everything), or None: "mma" where it applies. With "mma", num_warps, num_stages,
    maxnreg and unpack apply to the residual tail only, programs_per_sm to the MMA kernel's one-warp programs, and
    mma_block_n sets the keys an MMA program attends per step, mma_maxnreg caps its registers and mma_stages picks
    its load pipeline (1: the next step in registers; >= 2: a cp.async ring of that many shared-memory stages)
    (defaults: mma.DEFAULTS; an explicit mma_block_n alone runs uncapped).
    """
    b, hq, t, d = q.shape
    hkv = k_codes.shape[1]
    if hq % hkv:
        raise ValueError(f"query heads {hq} must be a multiple of KV heads {hkv}")
    if key_group % block_k or n_quant % key_group:
        raise ValueError(f"block_k {block_k} must divide key_group {key_group}, which must divide n_quant {n_quant}")
    p = 8 // bits
    if d % p:
        raise ValueError(f"head_dim {d} must be divisible by {p} for {bits}-bit codes")
    gq = hq // hkv
    symmetric = k_zero is None
    block_m = max(16, triton.next_power_of_2(gq * t))  # tl.dot needs >= 16 rows
    block_d = max(16, triton.next_power_of_2(d))
    block_j = max(16, triton.next_power_of_2(d // p))  # a plane's channels; tl.dot needs >= 16
    if block_ids is not None:
        # visits to quantized blocks come first in the ascending list; counted on the host (a CPU schedule
        # costs no sync; a device one costs one)
        ids_host = block_ids.cpu()
        n_quant_visit = int((ids_host.long() * block_k < n_quant).sum())
        block_ids = block_ids.to(device=q.device, dtype=torch.int32).contiguous()
        n_visit = block_ids.numel()
    else:
        n_visit = triton.cdiv(kv_len, block_k)
        n_quant_visit = n_quant // block_k
    dot, unpack = _dot_and_unpack(q, unpack)
    kc, ks, kz, vc, vs, vz, kr, vr = _flat_storage(b * hkv, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, k_res,
                                                   v_res)
    for name, x in (("k_codes", kc), ("v_codes", vc), ("k_scale", ks), ("v_scale", vs), ("k_res", kr), ("v_res", vr)):
        if x.stride(-1) != 1:
            raise ValueError(f"{name} needs a unit stride on its last axis")
    out = torch.empty_like(q) if out is None else out

    explicit = mma_stages is not None
    bn, mma_maxnreg, mma_stages = mma.launch_defaults(bits, mma_block_n, mma_maxnreg, mma_stages)
    mma.check_stages(mma_stages, bn)
    use_mma = _use_mma(kernel, q, bits, d, gq * t, d // value_group, n_quant_visit, block_k, bn, kc, vc)
    if use_mma:
        mma_stages = mma.pick_stages(mma_stages, explicit, ks, None if symmetric else kz, vs,
                                     None if symmetric else vz)
    ids = block_ids if block_ids is not None else kc
    scale = math.log2(math.e) / math.sqrt(d)
    if use_mma:  # one launch: quantized visits, then the residual tail in blocks of bn keys, one split each
        # the host copy of the schedule: block_ids is on the device by now, and reading it back would sync again
        _, res_ids, n_res_blocks, first_res = _tail_visits(ids_host if block_ids is not None else None, block_k,
                                                           n_quant, kv_len, q.device, kc, bn)
        mma_in = (q, kc, ks, kz if k_zero is not None else None, vc, vs, vz if v_zero is not None else None, kr, vr,
                  ids, res_ids)
        mma_kw = dict(kv_len=kv_len, n_quant=n_quant, n_quant_visit=n_quant_visit, window=window, sink=sink,
                      qk_scale=scale, hkv=hkv, gq=gq, block_k=block_k, key_group=key_group, bits=bits,
                      has_block_ids=block_ids is not None, bn=bn, maxnreg=mma_maxnreg, stages=mma_stages)
        mma_splits, mma_per_split = mma.split_launch(*mma_in, n_quant_visit, res_blocks=n_res_blocks - first_res,
                                                     num_splits=num_splits, per_sm=programs_per_sm, **mma_kw)
        n_split_total = mma_splits + n_res_blocks - first_res
    else:
        num_splits, blocks_per_split, maxnreg = split_launch(bits, q.device, b * hkv, n_visit, num_splits=num_splits,
                                                             programs_per_sm=programs_per_sm, maxnreg=maxnreg)
        n_split_total = num_splits
    l_part = torch.empty(b * hkv * n_split_total * gq * t, dtype=torch.float32, device=q.device)
    o_part = torch.empty(b * hkv * n_split_total * gq * t * block_d, dtype=torch.float32, device=q.device)
    if use_mma:
        mma.launch(*mma_in, o_part, l_part, per_split=mma_per_split, n_split_quant=mma_splits,
                   n_split_total=n_split_total, **mma_kw)
    else:
        _quant_decode_kernel[(b * hkv, num_splits)](
            q, kc, ks, kz, vc, vs, vz, kr, vr, ids, o_part, l_part, ids, ids, *_strides(q, kc, ks, vc, vs, kr),
            n_quant, kv_len, n_visit, n_quant_visit, blocks_per_split, 0, window, sink, scale,
            H_KV=hkv, GQ=gq, T=t, D=d, BLOCK_D=block_d, BLOCK_J=block_j, BLOCK_M=block_m, BLOCK_K=block_k,
            BLOCK_R=min(block_k, 32),
            KEY_GROUP=key_group, V_GROUPS=d // value_group,
            V_GROUP=value_group, BITS=bits, SYMMETRIC=symmetric,
            HAS_BLOCK_IDS=block_ids is not None, HAS_WINDOW=window > 0, UNPACK=unpack, DOT=dot,
            num_warps=num_warps, num_stages=num_stages, **({"maxnreg": maxnreg} if maxnreg else {}),
        )
    merge_splits(o_part.view(b * hkv, n_split_total, gq * t, block_d), l_part, out, kv_heads=hkv, group=gq, t=t,
                 n_split=n_split_total)
    LAST_LAUNCH.update(kernel="mma" if use_mma else "triton", splits=n_split_total)
    return out


RES_CHUNK = 64  # residual-window tokens a varlen split attends: its <= residual + group tokens in a few programs


def varlen_launch(bits: int, device: torch.device, heads: int, max_quant_visit: int, *,
                  num_splits: int | None = None, min_blocks: int = 2, programs_per_sm: int | None = None,
                  maxnreg: int | None = None) -> tuple[int, int | None]:
    """(quantized splits, maxnreg) of a varlen launch over `heads` (batch, KV head) pairs whose buffers hold up to
    max_quant_visit quantized blocks. Default: one wave of programs_per_sm programs an SM (as `split_launch`), at
    most max_quant_visit // min_blocks, and no more than the fewest that give a full row its blocks a split (the
    residual splits are not counted: they are short, and first in launch order)."""
    programs_per_sm, maxnreg = _occupancy(bits, device, programs_per_sm, maxnreg)
    if num_splits is None:
        wave = (programs_per_sm or 2) * num_sms(device) // max(heads, 1)
        num_splits = max(1, min(wave, max_quant_visit // max(min_blocks, 1)))
        num_splits = triton.cdiv(max_quant_visit, triton.cdiv(max_quant_visit, num_splits))
    return max(1, num_splits), maxnreg


def quant_decode_varlen(
    q: torch.Tensor,
    k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, k_res, v_res,
    row_quant: torch.Tensor, lengths: torch.Tensor,
    *, bits: int, key_group: int, value_group: int, block_k: int = 64, num_splits: int | None = None,
    min_blocks: int = 2, res_chunk: int = RES_CHUNK,
    num_warps: int = 4, num_stages: int = 3, maxnreg: int | None = None, programs_per_sm: int | None = None,
    unpack: str | None = None, kernel: str | None = None, mma_block_n: int | None = None,
    mma_maxnreg: int | None = None, mma_stages: int | None = None, window: int = 0,
    sinks: torch.Tensor | None = None, out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Decode attention of one new token per row, each row at its own length (the static decode step).

    q: [B, Hq, 1, D]. Storage as in `quant_decode`, row b holding `row_quant[b]` quantized tokens (a multiple of
    key_group) followed by `lengths[b] - row_quant[b]` residual tokens; the new query sits at `lengths[b] - 1`.
    row_quant, lengths: [B] integer tensors on the device, read by the kernel (no host value: capturable).
    The launch is fixed by the buffers' capacity (a CUDA graph keeps it), the work by each row's length: the row's
    quantized blocks are spread over `num_splits` programs, at least `min_blocks` blocks each (the programs past
    them exit at once and write an empty partial that the merge ignores), and its residual tokens over programs of
    `res_chunk` tokens (a multiple of min(block_k, 32)). Returns [B, Hq, 1, D] in q's dtype.
    window: each row attends its last `window` keys only (0: all; the quantized blocks wholly before them are not
    visited); sinks: None or [Hq] logits, one more softmax denominator term per head (gpt-oss' rule, as
    attention_decode_varlen's `decode_varlen`).
    kernel: as in `quant_decode`: None takes the Gluon MMA kernel where the shapes and device allow (its residual
    programs attend mma_block_n window tokens each instead of res_chunk; mma_* as in `quant_decode`; num_warps,
    num_stages, maxnreg, unpack and res_chunk apply to the Triton-language kernel only), "triton" refuses it.
    """
    b, hq, t, d = q.shape
    if t != 1:
        raise ValueError(f"quant_decode_varlen decodes one token per row, got T = {t}")
    hkv = k_codes.shape[1]
    if hq % hkv:
        raise ValueError(f"query heads {hq} must be a multiple of KV heads {hkv}")
    if key_group % block_k:
        raise ValueError(f"block_k {block_k} must divide key_group {key_group}")
    p = 8 // bits
    if d % p:
        raise ValueError(f"head_dim {d} must be divisible by {p} for {bits}-bit codes")
    if window < 0:
        raise ValueError(f"window must be >= 0 keys (0: every key), got {window}")
    if sinks is not None and (sinks.shape != (hq,) or sinks.stride(0) != 1):
        raise ValueError(f"sinks must be [Hq] = [{hq}] contiguous logits, got {tuple(sinks.shape)}")
    if row_quant.shape != (b,) or lengths.shape != (b,):
        raise ValueError(f"row_quant and lengths must be [B] = [{b}], got {tuple(row_quant.shape)} and "
                         f"{tuple(lengths.shape)}")
    block_r = min(block_k, 32)
    if res_chunk < block_r or res_chunk % block_r or min_blocks < 1:
        raise ValueError(f"res_chunk must be a positive multiple of {block_r} (min(block_k, 32)) and min_blocks >= 1, "
                         f"got res_chunk={res_chunk}, min_blocks={min_blocks}")
    gq = hq // hkv
    symmetric = k_zero is None
    dot, unpack = _dot_and_unpack(q, unpack)
    kc, ks, kz, vc, vs, vz, kr, vr = _flat_storage(b * hkv, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, k_res,
                                                   v_res)
    block_d = max(16, triton.next_power_of_2(d))
    out = torch.empty_like(q) if out is None else out
    explicit = mma_stages is not None
    bn, mma_maxnreg, mma_stages = mma.launch_defaults(bits, mma_block_n, mma_maxnreg, mma_stages)
    mma.check_stages(mma_stages, bn)
    # the capacity's blocks stand for "some quantized visit": the rows' own counts are on the device
    if _use_mma(kernel, q, bits, d, gq, d // value_group, kc.shape[1] // block_k, block_k, bn, kc, vc):
        mma_stages = mma.pick_stages(mma_stages, explicit, ks, None if symmetric else kz, vs,
                                     None if symmetric else vz)
        return _varlen_mma(q, kc, ks, kz, vc, vs, vz, kr, vr, row_quant, lengths, out, hkv=hkv, gq=gq, bits=bits,
                           block_k=block_k, key_group=key_group, symmetric=symmetric, block_d=block_d, bn=bn,
                           maxnreg=mma_maxnreg, stages=mma_stages, num_splits=num_splits, min_blocks=min_blocks,
                           programs_per_sm=programs_per_sm, window=window, sinks=sinks)
    res_splits = triton.cdiv(kr.shape[1], res_chunk)  # the window's capacity, in chunks
    q_splits, maxnreg = varlen_launch(bits, q.device, b * hkv, kc.shape[1] // block_k,
                                      num_splits=num_splits, min_blocks=min_blocks, programs_per_sm=programs_per_sm,
                                      maxnreg=maxnreg)
    n_split = q_splits + res_splits
    o_part, l_part = _partials(b * hkv * n_split * gq, block_d, q.device)
    _quant_decode_kernel[(b * hkv, n_split)](
        q, kc, ks, kz, vc, vs, vz, kr, vr, kc, o_part, l_part, row_quant, lengths, *_strides(q, kc, ks, vc, vs, kr),
        0, 0, 0, 0, min_blocks, res_splits, window, 0, math.log2(math.e) / math.sqrt(d),
        H_KV=hkv, GQ=gq, T=1, D=d, BLOCK_D=block_d, BLOCK_J=max(16, triton.next_power_of_2(d // p)),
        BLOCK_M=max(16, triton.next_power_of_2(gq)), BLOCK_K=block_k, BLOCK_R=block_r,
        KEY_GROUP=key_group, V_GROUPS=d // value_group, V_GROUP=value_group, BITS=bits, SYMMETRIC=symmetric,
        HAS_BLOCK_IDS=False, HAS_WINDOW=window > 0, UNPACK=unpack, DOT=dot, VARLEN=True, RES_CHUNK=res_chunk,
        num_warps=num_warps, num_stages=num_stages, **({"maxnreg": maxnreg} if maxnreg else {}),
    )
    merge_splits(o_part.view(b * hkv, n_split, gq, block_d), l_part, out, kv_heads=hkv, group=gq, t=1,
                 n_split=n_split, sinks=sinks)
    LAST_LAUNCH.update(kernel="triton.varlen", splits=n_split)
    return out


def _varlen_mma(q, kc, ks, kz, vc, vs, vz, kr, vr, row_quant, lengths, out, *, hkv, gq, bits, block_k, key_group,
                symmetric, block_d, bn, maxnreg, stages, num_splits, min_blocks, programs_per_sm, window=0,
                sinks=None) -> torch.Tensor:
    """`quant_decode_varlen` on the Gluon MMA kernel (flattened storage): quantized splits sized as
    `varlen_launch` sizes them, at the MMA kernel's own programs an SM, then one program per bn window tokens of
    the window's capacity; each row's lengths read on the device, the grid fixed by the capacity."""
    b = q.shape[0]
    heads = b * hkv
    res_splits = triton.cdiv(kr.shape[1], bn)
    max_quant_visit = kc.shape[1] // block_k
    mma_in = (q, kc, ks, None if symmetric else kz, vc, vs, None if symmetric else vz, kr, vr, kc, kc)
    mma_kw = dict(kv_len=0, n_quant=0, n_quant_visit=0, window=window, sink=0,
                  qk_scale=math.log2(math.e) / math.sqrt(q.shape[3]), hkv=hkv, gq=gq, block_k=block_k,
                  key_group=key_group, bits=bits, has_block_ids=False, bn=bn,
                  maxnreg=maxnreg, stages=stages, row_quant=row_quant, row_len=lengths)
    if num_splits is None:  # one wave with the residual programs, and no split a full row leaves empty
        per_sm = programs_per_sm or mma.programs_per_sm(*mma_in, **mma_kw)
        wave = (per_sm * num_sms(q.device) - heads * res_splits) // max(heads, 1)
        num_splits = max(1, min(wave, max_quant_visit // max(min_blocks, 1)))
        num_splits = triton.cdiv(max_quant_visit, triton.cdiv(max_quant_visit, num_splits))
    n_split = num_splits + res_splits
    o_part, l_part = _partials(heads * n_split * gq, block_d, q.device)
    mma.launch(*mma_in, o_part, l_part, per_split=min_blocks, n_split_quant=num_splits, n_split_total=n_split,
               **mma_kw)
    merge_splits(o_part.view(heads, n_split, gq, block_d), l_part, out, kv_heads=hkv, group=gq, t=1, n_split=n_split,
                 sinks=sinks)
    LAST_LAUNCH.update(kernel="mma.varlen", splits=n_split)
    return out


def _partials(rows: int, block_d: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Scratch for the split partials: (o_part [rows * block_d], l_part [rows]) float32, `rows` = heads x splits x
    query rows. Left uninitialised: every program writes its own partial, an empty one included."""
    return (torch.empty(rows * block_d, dtype=torch.float32, device=device),
            torch.empty(rows, dtype=torch.float32, device=device))


def _dot_and_unpack(q: torch.Tensor, unpack: str | None):
    """(the dot dtype, the UNPACK code) for queries q: fp16 dots for half queries (codes <= 255 are exact in fp16),
    the PTX unpack on a GPU, its Triton-ops twin under the interpreter, plain conversion for float32 queries."""
    dot = tl.float32 if q.dtype == torch.float32 else tl.float16
    if unpack is None:
        unpack = "cvt" if dot == tl.float32 else "magic" if _interpreted(q) else "asm"
    if unpack not in UNPACK_MODES or (dot == tl.float32 and unpack != "cvt"):
        raise ValueError(f"unpack must be one of {', '.join(UNPACK_MODES)} ('cvt' for float32 queries), got {unpack!r}")
    if unpack == "asm" and _interpreted(q):
        raise ValueError("unpack='asm' runs PTX and needs a GPU without TRITON_INTERPRET; use 'magic' or 'cvt'")
    return dot, UNPACK_MODES[unpack]


def _flat_storage(bh: int, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, k_res, v_res) -> tuple:
    """The storage as [B*Hkv, ...] views (kc, ks, kz, vc, vs, vz, kr, vr); absent zero points stand in as the
    scales (symmetric: the kernel never reads them)."""
    flat = lambda x: x.reshape(bh, *x.shape[2:])  # noqa: E731
    kc, vc, ks, vs, kr, vr = map(flat, (k_codes, v_codes, k_scale, v_scale, k_res, v_res))
    kz = flat(k_zero) if k_zero is not None else ks
    vz = flat(v_zero) if v_zero is not None else vs
    return kc, ks, kz, vc, vs, vz, kr, vr


def _strides(q, kc, ks, vc, vs, kr) -> tuple[int, ...]:
    """The stride arguments of _quant_decode_kernel, in its order."""
    return (q.stride(0), q.stride(1), q.stride(2), kc.stride(0), kc.stride(1), ks.stride(0), ks.stride(1),
            vc.stride(0), vc.stride(1), vs.stride(0), vs.stride(1), kr.stride(0), kr.stride(1))


def quant_decode_varlen_ref(q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, k_res, v_res,
                            row_quant: list[int], lengths: list[int], *, bits: int, key_group: int, value_group: int,
                            compute_dtype: torch.dtype = torch.float32, window: int = 0,
                            sinks: torch.Tensor | None = None) -> torch.Tensor:
    """Reference of `quant_decode_varlen`: row by row, dequantize the row's codes (kernels/quant.py references),
    append its residual tokens and attend in `compute_dtype`, over the row's last `window` keys (0: all) and with
    each head's sink logit as one more softmax term (dropped from the output). row_quant, lengths: host ints.
    -> [B, Hq, 1, D]."""
    b, hq, _, d = q.shape
    symmetric = k_zero is None
    out = torch.empty_like(q)
    for r in range(b):
        nq, n = int(row_quant[r]), int(lengths[r])
        rows = slice(r, r + 1)
        ks, vs = k_res[rows, :, : n - nq], v_res[rows, :, : n - nq]
        if nq:
            g = nq // key_group
            k = Q.dequantize_keys_ref(k_codes[rows, :, :nq], k_scale[rows, :, :g],
                                      None if symmetric else k_zero[rows, :, :g], bits, key_group, d, symmetric,
                                      q.dtype)
            v = Q.dequantize_values_ref(v_codes[rows, :, :nq], v_scale[rows, :, :nq],
                                        None if symmetric else v_zero[rows, :, :nq], bits, value_group, d,
                                        symmetric, q.dtype)
            ks, vs = torch.cat((k, ks), dim=2), torch.cat((v, vs), dim=2)
        hkv = ks.shape[1]
        gq = hq // hkv
        # each KV head against its group of query heads (h // gq), no gq-fold copy: at 1M keys that copy alone
        # would be 16 GB in float32
        kk, vv = ks.to(compute_dtype), vs.to(compute_dtype)
        qg = q[rows].to(compute_dtype).view(1, hkv, gq, d)
        s = qg @ kk.transpose(-1, -2) / math.sqrt(d)  # [1, Hkv, gq, n]
        if window:
            s[..., : max(n - window, 0)] = float("-inf")
        if sinks is not None:  # softmax over [scores, sink], the sink's column dropped
            s = torch.cat((s, sinks.to(device=s.device, dtype=compute_dtype).view(1, hkv, gq, 1)), -1)
            p = torch.softmax(s, -1)[..., :-1]
        else:
            p = torch.softmax(s, -1)
        out[rows] = (p @ vv).view(1, hq, 1, d).to(q.dtype)
    return out


def _tail_visits(block_ids, block_k: int, n_quant: int, kv_len: int, device, placeholder, tail_k: int):
    """The residual tail as blocks of tail_k keys: (tail_k, block ids or a placeholder, blocks, first tail block).
    With a schedule, its blocks past n_quant are cut into the smaller blocks."""
    per, n_blocks = block_k // tail_k, triton.cdiv(kv_len, tail_k)
    if block_ids is None:
        return tail_k, placeholder, n_blocks, n_quant // tail_k
    small = (block_ids.long()[:, None] * per + torch.arange(per)).flatten()  # block_ids: on the host
    small = small[(small * tail_k >= n_quant) & (small < n_blocks)]
    return tail_k, small.to(device=device, dtype=torch.int32), small.numel(), 0


def _use_mma(kernel: str | None, q, bits, d, rows, value_groups, n_quant_visit, block_k, bn, kc, vc) -> bool:
    """Whether the quantized visits go to the MMA kernel: kernel="mma" demands it, "triton" refuses it, None takes
    it where it applies (a GPU, shapes mma.supported covers, at least one quantized visit)."""
    if kernel not in (None, "mma", "triton"):
        raise ValueError(f"kernel must be 'mma', 'triton' or None (automatic), got {kernel!r}")
    if kernel == "triton":
        return False
    why = None
    if _interpreted(q):
        why = "it runs on a GPU only (Gluon has no CPU interpreter)"
    elif not mma.supported(bits, d, rows, value_groups, q.dtype):
        why = (f"it covers 2/4/8-bit codes, head_dim*bits >= 256, <= 8 query rows a KV head, one value group a "
               f"token and fp16/bf16 queries (got {bits} bits, head_dim {d}, {rows} rows, {value_groups} value "
               f"groups, {q.dtype})")
    elif block_k % bn or bn % 16:
        why = f"block_k must be a multiple of the MMA step {bn}, itself a multiple of 16 (got {block_k})"
    elif any(x.stride(1) % 4 or x.stride(0) % 4 or x.data_ptr() % 16 for x in (kc, vc)):
        why = "the codes must be read as 32-bit words (rows a multiple of 4 bytes, 16-byte aligned)"
    if why is not None and kernel == "mma":
        raise ValueError(f"kernel='mma' cannot serve this call: {why}")
    return why is None and n_quant_visit > 0


def visible_mask(t: int, kv_len: int, *, block_ids=None, window: int = 0, sink: int = 0, block_k: int = 64,
                 device=None) -> torch.Tensor:
    """Bool [T, kv_len]: which keys each of the T new queries (positions kv_len - T + t) sees under a schedule."""
    q_pos = torch.arange(kv_len - t, kv_len, device=device)[:, None]
    k_pos = torch.arange(kv_len, device=device)[None, :]
    mask = k_pos <= q_pos
    if window > 0:
        mask &= (k_pos < sink) | (k_pos > q_pos - window)
    if block_ids is not None:
        in_blocks = torch.zeros(kv_len, dtype=torch.bool, device=device)
        for blk in block_ids.tolist():
            in_blocks[blk * block_k : (blk + 1) * block_k] = True
        mask &= in_blocks[None, :]
    return mask


def quant_decode_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Reference: attention of q [B, Hq, T, D] over dequantized k, v [B, Hkv, S, D] under mask [T, S], in float64."""
    b, hq, t, d = q.shape
    gq = hq // k.shape[1]
    k64 = k.double().repeat_interleave(gq, dim=1)
    v64 = v.double().repeat_interleave(gq, dim=1)
    s = q.double() @ k64.transpose(-1, -2) / math.sqrt(d)
    s = s.masked_fill(~mask.to(q.device), float("-inf"))
    return torch.softmax(s, -1) @ v64
