"""Fused decode over packed KIVI codes with hand-laid-out tensor-core operands (Gluon, GPU only).

Why a second kernel: the Triton-language kernel (kv_quant_decode.py) leaves register layouts to the compiler. Its
code tiles are staged through shared memory into the MMA operand layout (byte-wise loads for 8-bit data feeding a
16-bit MMA), the 4 query heads of a KV head are padded to 16 rows in both dots, and its warps share one softmax
through cross-warp reductions: about 1,300 instructions a warp per 128 keys, which capped it near 1.2x SDPA at 128k
(experiments/kv_cache/README.md, section 6). Here, in Gluon (Triton's layout-explicit dialect), every layout is
chosen so that the packed words land in registers exactly where `mma.sync` wants them (2.30x SDPA for int4 and
1.60x for int8 at 128k keys on the H200, section 7):

- Keys, S = Q' @ K^T (query rows on M, keys on N): a lane of the B operand holds one key and 32 channel slots. The
  order of channels inside a dot is free, so each lane loads its key's 16 contiguous bytes (one 128-bit load for
  int4) and `lop3` turns two codes at a time into fp16 operands in place: no shared memory, no shuffles.
- Values, O^T = V^T @ P'^T (channels on M, the 8 query rows on N): the score accumulator's registers are already the
  B operand of this product (the flash-attention register reuse), so P never moves. A lane of the A operand holds
  pairs of keys of one channel: `prmt` pairs the two keys' bytes, `lop3` extracts.
- Dequantization is folded away. A code's fp16 is 0x6400 | (c << s) = 1024 + c 2^s (one lop3 for two codes), less
  1024 (one sub.f16x2, exact) = c 2^s. For keys (scale s_d, zero z_d per channel of the group) the query absorbs
  the scale and 2^-s: q'_d = q_d s_d 2^-s, and q . k_n = q' . (c 2^s)_n + q . z. For values (scale s_n, zero z_n
  per token) the probabilities absorb the scale: p'_n = p_n s_n, and
      sum_n p_n v_nd = 2^-s sum_n p'_n (c_nd 2^s) + sum_n p_n z_n.
  (Leaving the 1024 in the codes and taking it back afterwards saves the sub but carries an offset 100-700x the
  signal through the accumulators: for the values, whose accumulator spans every block of a split, that lost up to
  0.3 relative error at 128k keys on the H200: experiments/kv_cache/README.md section 7.)
- One warp a program: each warp owns its keys and its softmax, so nothing crosses warps; splits of the visit list
  are merged by the shared merge kernel (decode_merge.py). The default launch is one wave at the occupancy its
  registers and shared memory allow.
- Loads, two pipelines (`STAGES`). 1: the next step's words are loaded into registers while the current one is
  computed. What bounds that at 128k keys (int4, read from the kernel and its sm_90 build, Triton 3.6): 220
  registers -> 8 one-warp programs an SM, 2 a scheduler; one 64-key step (8.25 KB) in flight a program, ~66 KB an
  SM at best and nothing once it lands; and at every key group (128 keys) the group's scales and zeros (512 bytes,
  first touch: DRAM) and the query (L1) are loaded and waited for in full. The step itself is ~1,570 SASS
  instructions a warp with the group's prologue (the loop body), ~24 us of issue for the whole 128k at 2 warps a
  scheduler against ~35 us of DRAM time at SDPA's bandwidth: latency, not issue or bandwidth, sets the 56 us
  measured (ncu: 1.9 warps a scheduler, 0.64 eligible, top stall the global loads). >= 2: a ring of STAGES
  shared-memory stages filled by cp.async, STAGES - 1 steps in flight, the key group's rows in the ring too; no
  prefetch registers, so 162-168 registers (12 programs an SM at 2 stages of 64 keys, 17.9 KB; 8 at 3 stages,
  26.9 KB, smem-bound; 12 at 3 stages of 32 keys). The ring adds ~100 instructions a step (copies, shared loads, a
  barrier). Which wins is measured by `scripts/bench_kv_cache.py --mma-sweep`; DEFAULTS holds the choice.
- Varlen (`VARLEN`, the static decode step): each row's quantized tokens and length are read on the device, the
  grid is fixed by the buffers' capacity, and a layer's sliding window skips the quantized blocks wholly before it.

Covered: 8-, 4- and 2-bit codes with one value group per token, head_dim * bits >= 256 (head_dim 128 at every
width, 64 at int4/int8), up to 8 query rows per KV head (GQA group x new tokens), fp16/bf16 queries, the
attention schedule's block list and sliding window. The residual tail (full-precision newest tokens) is attended
in the same launch, one block a split, with fp16 MMAs over the model-dtype buffers. Gluon does not run under the
CPU interpreter: the CPU tests check this kernel's channel bookkeeping with a numpy mirror of its data flow
(tests/test_kernels_quant_mma.py), and the GPU tests check the kernel itself against the float64 reference.
"""

from __future__ import annotations

import numpy as np
import torch

from ollm_triton.kernels.decode_merge import num_sms

try:  # Gluon ships with Triton >= 3.5
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.ampere import async_copy
    HAVE_GLUON = True
    # the same builtins under Triton 3.6's names (the device) and 3.9's (this repo's CPU machine, for AOT compiles)
    _async_load = getattr(async_copy, "async_load", None) or async_copy.async_copy_global_to_shared
    _barrier = getattr(gl, "thread_barrier", None) or gl.barrier
except ImportError:  # pragma: no cover - older Triton
    HAVE_GLUON = False


def supported(bits: int, d: int, rows: int, value_groups: int, dtype: torch.dtype) -> bool:
    """Shapes this kernel serves (the Triton-language kernel serves the rest)."""
    return (HAVE_GLUON and bits in (2, 4, 8) and d in (64, 128, 256) and d * bits >= 256 and rows <= 8
            and value_groups == 1 and dtype in (torch.float16, torch.bfloat16))


def layout_sizes(bits: int, d: int) -> dict:
    """Per-lane word counts of the two code layouts. K: a lane holds WK 32-bit words of a key, each unpacked into
    UK fp16 pairs. V: a lane holds VW words of each of its keys, a pair of keys' words unpacked into UV pairs."""
    p = 8 // bits
    return dict(P=p, WK=d * bits // 128, UK=16 // bits, VW=d * bits // 256, UV=4 * p)


def key_channels(bits: int, d: int) -> np.ndarray:
    """Channel of each k slot of the key operand (the order the kernel's reshapes give the unpacked words).
    Word W = WK t + w of a key holds bytes 4W..4W+3; output u of its unpack is plane u // 2 of bytes
    (u % 2, u % 2 + 2) in its two halves h; byte j holds channels P j + plane. The kernel lays the outputs as
    [t, (w, u), h] and then puts t inside (w, u): slot k = ((w UK + u) 4 + t) 2 + h."""
    s = layout_sizes(bits, d)
    t, w, u, h = np.meshgrid(np.arange(4), np.arange(s["WK"]), np.arange(s["UK"]), np.arange(2), indexing="ij")
    ch = s["P"] * (4 * (s["WK"] * t + w) + u % 2 + 2 * h) + u // 2  # [t, w, u, h]
    return ch.transpose(1, 2, 0, 3).reshape(-1).astype(np.int32)   # [(w, u), t, h] -> k


def value_channels(bits: int, d: int) -> np.ndarray:
    """Channel of each row of the value operand: row = (vw UV + u) 8 + g, lane group g holds words VW g + vw of
    each key, and output u of a key pair's unpack is plane u // 4 of byte u % 4."""
    s = layout_sizes(bits, d)
    vw, u, g = np.meshgrid(np.arange(s["VW"]), np.arange(s["UV"]), np.arange(8), indexing="ij")
    ch = s["P"] * (4 * (s["VW"] * g + vw) + u % 4) + u // 4
    return ch.reshape(-1).astype(np.int32)


def _lop3(dst: str, src: str, mask: int) -> str:
    return f"lop3.b32 {dst}, {src}, {mask | mask << 16:#010x}, 0x64006400, 0xea;\n"  # (src & mask) | 0x6400 each half


def key_unpack_asm(bits: int, exact: bool = False) -> str:
    """One word of 32 // bits codes -> 16 // bits f16x2 registers; output u = 2 plane + (bytes 1,3 ? 1 : 0).
    Each holds 1024 + c 2^s (the kernel's bias takes the 1024 back), or with `exact` c 2^s (one sub.f16x2 more)."""
    u_n = 16 // bits
    body = f"{{ .reg .b32 s, t, m;\nmov.b32 m, 0x64006400;\nshr.b32 s, ${u_n}, 8;\n"
    for u in range(u_n):
        src, mask = "s" if u % 2 else f"${u_n}", ((1 << bits) - 1) << (bits * (u // 2))
        body += _lop3("t", src, mask) + f"sub.f16x2 ${u}, t, m;\n" if exact else _lop3(f"${u}", src, mask)
    return body + "}"


def value_unpack_asm(bits: int) -> str:
    """The same word of two keys (a = $UV, b = $UV+1) -> 4 * (8 // bits) f16x2 registers, each holding one
    channel of key a (low half) and key b (high half) as c 2^s exactly; output u = 4 plane + byte. Unlike the keys,
    the values subtract the 1024 here (one sub.f16x2 a pair): folded into the output, the offset would ride in the
    O accumulator across every block of a split, and on the H200 that lost 1e-3 of it (errors up to 0.3 at 128k
    keys for int4, growing with the blocks a split attends; experiments/kv_cache/README.md section 7)."""
    u_n = 32 // bits
    a, b = f"${u_n}", f"${u_n + 1}"
    body = ("{ .reg .b32 x0, x1, y0, y1, t, m;\n"
            "mov.b32 m, 0x64006400;\n"
            f"prmt.b32 x0, {a}, {b}, 0x5410;\n"  # bytes a0 a1 b0 b1
            f"prmt.b32 x1, {a}, {b}, 0x7632;\n"  # bytes a2 a3 b2 b3
            "shr.b32 y0, x0, 8;\nshr.b32 y1, x1, 8;\n")
    for u in range(u_n):
        body += _lop3("t", ("x0", "y0", "x1", "y1")[u % 4], ((1 << bits) - 1) << (bits * (u // 4)))
        body += f"sub.f16x2 ${u}, t, m;\n"
    return body + "}"


if HAVE_GLUON:
    MMA: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[1, 1], instr_shape=[16, 8])
    A_OP: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=MMA, k_width=2)
    B_OP: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=MMA, k_width=2)
    ROWS: gl.constexpr = gl.SliceLayout(1, MMA)
    COLS: gl.constexpr = gl.SliceLayout(0, MMA)

    @gluon.constexpr_function
    def _axis_layout(layout, d, rank):
        for k in reversed(range(rank)):
            if k != d:
                layout = gl.SliceLayout(k, layout)
        return layout

    @gluon.jit
    def _idx(n: gl.constexpr, d: gl.constexpr, L: gl.constexpr):
        """arange(n) along axis d of a tensor in layout L, with size-1 axes elsewhere (for broadcast offsets)."""
        R: gl.constexpr = len(L.order)
        x = gl.arange(0, n, layout=_axis_layout(L, d, R))
        for k in gl.static_range(R):
            if k != d:
                x = gl.expand_dims(x, k)
        return x

    @gluon.jit
    def _halves(x):
        """int32 [..., N] of f16x2 words -> fp16 [..., N, 2] (low half first); ptxas keeps the registers."""
        xx = gl.join(x, x)
        return gl.inline_asm_elementwise("mov.b32 $0, $1;", "=r,r,r", [xx], dtype=gl.float16, is_pure=True, pack=2)

    @gluon.jit
    def _join_n(u, N: gl.constexpr):
        """Tuple of N tensors -> [..., N] with u[i] at index i (joins interleave: evens, odds, recursively)."""
        if N == 2:
            return gl.join(u[0], u[1])
        elif N == 4:
            return gl.join(gl.join(u[0], u[2]), gl.join(u[1], u[3]))
        elif N == 8:
            return gl.join(gl.join(gl.join(u[0], u[4]), gl.join(u[2], u[6])),
                           gl.join(gl.join(u[1], u[5]), gl.join(u[3], u[7])))
        else:
            return gl.join(
                gl.join(gl.join(gl.join(u[0], u[8]), gl.join(u[4], u[12])),
                        gl.join(gl.join(u[2], u[10]), gl.join(u[6], u[14]))),
                gl.join(gl.join(gl.join(u[1], u[9]), gl.join(u[5], u[13])),
                        gl.join(gl.join(u[3], u[11]), gl.join(u[7], u[15]))))


    @gluon.constexpr_function
    def _key_row_layout(D, WK, P):
        """[4 t, WK w, 4 b, P i] (channels (t WK + w) 4 P + b P + i): lane t's contiguous quarter of a key-group
        row, replicated over the 8 lane groups (every lane of a quad column needs the same slots)."""
        return gl.BlockedLayout([1, WK, 4, P], [4, 8, 1, 1], [1, 1, 1, 1], [0, 3, 2, 1])

    @gluon.jit
    def _key_row(ROW, D: gl.constexpr, WK: gl.constexpr, P: gl.constexpr, BITS: gl.constexpr, SCALED: gl.constexpr):
        """A per-channel row of a key group (scales or zeros) [D] from global memory: see _key_row_slots."""
        L: gl.constexpr = _key_row_layout(D, WK, P)
        ch = ((_idx(4, 0, L) * WK + _idx(WK, 1, L)) * 4 + _idx(4, 2, L)) * P + _idx(P, 3, L)
        return _key_row_slots(gl.load(ROW + ch), D, WK, P, BITS, SCALED)

    @gluon.jit
    def _key_row_slots(x, D: gl.constexpr, WK: gl.constexpr, P: gl.constexpr, BITS: gl.constexpr,
                       SCALED: gl.constexpr):
        """A per-channel row of a key group x [4, WK, 4, P] (in _key_row_layout), in the slot order of the key
        operand (key_channels), as fp32 SliceLayout(0, A_OP). Lane t's slots are channels [t D/4, (t+1) D/4): it
        holds them as one contiguous run [w, byte b, plane i], and reshapes recast them, register for register,
        into slots ((w UK + u) 4 + t) 2 + h with b = u % 2 + 2 h, i = u // 2. SCALED multiplies by 2^-(bits i),
        which undoes the plane's 2^s in the fp16 code."""
        L: gl.constexpr = _key_row_layout(D, WK, P)
        x = x.to(gl.float32)
        if SCALED:
            x = x * gl.exp2(-(BITS * _idx(P, 3, L)).to(gl.float32))
        x = gl.permute(gl.reshape(x, [4, WK, 2, 2, P]), [1, 4, 3, 0, 2])  # [w, i, u % 2, t, h]
        return gl.convert_layout(gl.reshape(x, [D]), gl.SliceLayout(0, A_OP), assert_trivial=True)

    @gluon.jit
    def _query_rows(Q, i_b, i_h, stride_qb, stride_qh, stride_qt, GQ: gl.constexpr, T: gl.constexpr,
                    D: gl.constexpr, WK: gl.constexpr, P: gl.constexpr):
        """The query rows m = g T + t (head i_h GQ + g, new token t; rows >= GQ T zero) as fp32 [16, D] in the A
        operand's slot order, loaded as _key_row loads a scale row: each lane reads its contiguous channels."""
        L: gl.constexpr = gl.BlockedLayout([1, 1, WK, 4, P], [8, 4, 1, 1, 1], [1, 1, 1, 1, 1], [4, 3, 2, 1, 0])
        m = _idx(16, 0, L)
        ch = ((_idx(4, 1, L) * WK + _idx(WK, 2, L)) * 4 + _idx(4, 3, L)) * P + _idx(P, 4, L)
        p = Q + i_b * stride_qb + (i_h * GQ + m // T) * stride_qh + (m % T) * stride_qt + ch
        x = gl.load(p, mask=(m < GQ * T) & (ch < D), other=0.0).to(gl.float32)
        x = gl.permute(gl.reshape(x, [16, 4, WK, 2, 2, P]), [0, 2, 5, 4, 1, 3])  # [m, w, i, u % 2, t, h]
        return gl.convert_layout(gl.reshape(x, [16, D]), A_OP, assert_trivial=True)


    @gluon.jit
    def _residual_key_operand(KR, n0, n_end, stride_n, BN: gl.constexpr, D: gl.constexpr, WK: gl.constexpr,
                              P: gl.constexpr):
        """Full-precision keys n0..n0+BN of the residual tail (rows >= n_end zero) as the fp16 B operand [D, BN],
        in the key operand's slot order (loaded as _query_rows loads the query)."""
        L: gl.constexpr = gl.BlockedLayout([1, 1, WK, 4, P], [8, 4, 1, 1, 1], [1, 1, 1, 1, 1], [4, 3, 2, 1, 0])
        n = n0 + _idx(BN, 0, L)
        ch = ((_idx(4, 1, L) * WK + _idx(WK, 2, L)) * 4 + _idx(4, 3, L)) * P + _idx(P, 4, L)
        x = gl.load(KR + n * stride_n + ch, mask=(n < n_end) & (ch < D), other=0.0).to(gl.float16)
        x = gl.reshape(gl.permute(gl.reshape(x, [BN, 4, WK, 2, 2, P]), [0, 2, 5, 4, 1, 3]), [BN, D])
        return gl.convert_layout(gl.permute(x, [1, 0]), B_OP, assert_trivial=True)

    @gluon.jit
    def _residual_value_operand(VR, n0, n_end, stride_n, BN: gl.constexpr, D: gl.constexpr, VW: gl.constexpr,
                                P: gl.constexpr):
        """Full-precision values n0..n0+BN (rows >= n_end zero) as the fp16 A operand [D, BN] in value_channels
        row order: lane group g's rows are channels [g D/8, (g+1) D/8), one contiguous run a key."""
        L: gl.constexpr = gl.BlockedLayout([1, 1, 1, 1, 1, VW, 4, P], [1, 1, 4, 1, 8, 1, 1, 1], [1] * 8,
                                           [7, 6, 5, 2, 4, 3, 1, 0])
        n = n0 + _idx(BN // 16, 0, L) * 16 + _idx(2, 1, L) * 8 + _idx(4, 2, L) * 2 + _idx(2, 3, L)
        ch = ((_idx(8, 4, L) * VW + _idx(VW, 5, L)) * 4 + _idx(4, 6, L)) * P + _idx(P, 7, L)
        x = gl.load(VR + n * stride_n + ch, mask=(n < n_end) & (ch < D), other=0.0).to(gl.float16)
        x = gl.reshape(gl.permute(x, [5, 7, 6, 4, 0, 1, 2, 3]), [D, BN])  # rows (vw, plane, byte, g), keys
        return gl.convert_layout(x, A_OP, assert_trivial=True)

    @gluon.jit
    def _visible(b_s, key, q_pos, kv_len, window, sink, HAS_WINDOW: gl.constexpr):
        """Scores of keys a row does not see -> -inf (past kv_len, after the row's position, outside the window)."""
        m_vis = (key[None, :] <= q_pos[:, None]) & (key[None, :] < kv_len)
        if HAS_WINDOW:
            m_vis = m_vis & ((key[None, :] < sink) | (key[None, :] > q_pos[:, None] - window))
        return gl.where(m_vis, b_s, float("-inf"))

    @gluon.jit
    def _key_word_offsets(n0, stride_n, BN: gl.constexpr, WK: gl.constexpr):
        """Offsets of the 32-bit words of keys n0..n0+BN, lane (g, t) holding words WK t.. of keys g + 8 i (16 bytes
        for int4), in _key_word_layout."""
        L: gl.constexpr = gl.BlockedLayout([1, 1, WK], [8, 4, 1], [1, 1, 1], [2, 1, 0])
        return (n0 + _idx(BN, 0, L)) * stride_n + _idx(4, 1, L) * WK + _idx(WK, 2, L)

    @gluon.jit
    def _key_words(KW, n0, stride_n, BN: gl.constexpr, WK: gl.constexpr):
        return gl.load(KW + _key_word_offsets(n0, stride_n, BN, WK))

    @gluon.jit
    def _key_operand(w, BN: gl.constexpr, D: gl.constexpr, WK: gl.constexpr, UK: gl.constexpr,
                     ASM: gl.constexpr, CONS: gl.constexpr):
        """Key words -> the B operand [D, BN] of the score dot (slot order: key_channels), in registers."""
        u = gl.inline_asm_elementwise(ASM, CONS, [w], dtype=(gl.int32,) * UK, is_pure=True, pack=1)
        x = gl.reshape(_join_n(u, UK), [BN, 4, WK * UK])
        x = gl.reshape(gl.permute(x, [0, 2, 1]), [BN, D // 2])
        x = gl.reshape(_halves(x), [BN, D])
        return gl.convert_layout(gl.permute(x, [1, 0]), B_OP, assert_trivial=True)

    @gluon.jit
    def _value_word_offsets(n0, stride_n, BN: gl.constexpr, VW: gl.constexpr):
        """Offsets of the 32-bit words of values n0..n0+BN [BN/16 j, 2 a, 4 t, 2 e, 8 g, VW], lane (g, t) holding
        words VW g.. of keys 16 j + 8 a + 2 t + e."""
        L: gl.constexpr = gl.BlockedLayout([1, 1, 1, 1, 1, VW], [1, 1, 4, 1, 8, 1], [1, 1, 1, 1, 1, 1],
                                           [5, 2, 4, 3, 1, 0])
        key = n0 + _idx(BN // 16, 0, L) * 16 + _idx(2, 1, L) * 8 + _idx(4, 2, L) * 2 + _idx(2, 3, L)
        return key * stride_n + _idx(8, 4, L) * VW + _idx(VW, 5, L)

    @gluon.jit
    def _value_words(VW_, n0, stride_n, BN: gl.constexpr, VW: gl.constexpr):
        return gl.load(VW_ + _value_word_offsets(n0, stride_n, BN, VW))

    @gluon.jit
    def _value_operand(w, BN: gl.constexpr, D: gl.constexpr, VW: gl.constexpr, UV: gl.constexpr,
                       ASM: gl.constexpr, CONS: gl.constexpr):
        """Value words -> the A operand [D, BN] of O^T (row order: value_channels): a pair of keys (e = 0, 1)
        shares each f16x2 register."""
        wa, wb = gl.split(gl.permute(w, [0, 1, 2, 4, 5, 3]))
        u = gl.inline_asm_elementwise(ASM, CONS, [wa, wb], dtype=(gl.int32,) * UV, is_pure=True, pack=1)
        x = gl.reshape(_join_n(u, UV), [BN // 16, 2, 4, 8, VW, UV])
        x = gl.permute(x, [4, 5, 3, 0, 1, 2])  # [VW, UV, g, j, a, t]
        x = gl.reshape(_halves(gl.reshape(x, [D, BN // 2])), [D, BN])
        return gl.convert_layout(x, A_OP, assert_trivial=True)

    @gluon.jit
    def _sub_block_start(BLOCK_IDS, j, sub_blocks, i_lo, n_quant_visit, BLOCK_K: gl.constexpr, BN: gl.constexpr,
                         HAS_BLOCK_IDS: gl.constexpr):
        """First key of sub-block j of a split (clamped to the last quantized visit, for the prefetch past the end)."""
        i = gl.maximum(gl.minimum(i_lo + j // sub_blocks, n_quant_visit - 1), 0)
        if HAS_BLOCK_IDS:
            start = gl.load(BLOCK_IDS + i) * BLOCK_K
        else:
            start = i * BLOCK_K
        return start + (j % sub_blocks) * BN

    @gluon.jit
    def _group_query(Q, b_ks, b_kz, i_b, i_h, stride_qb, stride_qh, stride_qt, qk_scale, GQ: gl.constexpr,
                     T: gl.constexpr, D: gl.constexpr, WK: gl.constexpr, P: gl.constexpr, KEYS_EXACT: gl.constexpr):
        """A new key group's query side: q' = q s 2^-s per slot (the fp16 A operand of the score dot) and the
        scores' bias q . z (- 1024 sum q' for offset codes)."""
        # the query is reloaded (from L1/L2) rather than held: 32 registers fewer
        b_qf = _query_rows(Q, i_b, i_h, stride_qb, stride_qh, stride_qt, GQ, T, D, WK, P) * qk_scale
        b_qs = (b_qf * b_ks[None, :]).to(gl.float16)
        b_sum = gl.sum(b_qf * b_kz[None, :], 1)
        if not KEYS_EXACT:
            b_sum -= 1024.0 * gl.sum(b_qs.to(gl.float32), 1)
        return b_qs, gl.convert_layout(b_sum, ROWS)

    @gluon.jit
    def _step(w_k, w_v, r_vs, r_vz, b_qs, b_bias, n0, q_pos, kv_len, window, sink, b_mx, b_l, b_pz, b_acc,
              BN: gl.constexpr, D: gl.constexpr, BITS: gl.constexpr, SYMMETRIC: gl.constexpr,
              HAS_WINDOW: gl.constexpr, T: gl.constexpr, WK: gl.constexpr, UK: gl.constexpr, VW: gl.constexpr,
              UV: gl.constexpr, K_ASM: gl.constexpr, K_CONS: gl.constexpr, V_ASM: gl.constexpr,
              V_CONS: gl.constexpr):
        """One step of BN quantized keys from their words in registers: scores, online softmax, values."""
        o_n = gl.arange(0, BN, layout=COLS)
        b_s = gl.nvidia.ampere.mma_v2(b_qs, _key_operand(w_k, BN, D, WK, UK, K_ASM, K_CONS),
                                      gl.full([16, BN], 0.0, gl.float32, layout=MMA) + b_bias[:, None])
        if HAS_WINDOW or T > 1:  # quantized keys all lie below kv_len
            b_s = _visible(b_s, n0 + o_n, q_pos, kv_len, window, sink, HAS_WINDOW)
        b_new = gl.maximum(b_mx, gl.max(b_s, 1))
        b_ref = gl.where(b_new == float("-inf"), 0.0, b_new)
        b_alpha = gl.exp2(b_mx - b_ref)
        b_p = gl.exp2(b_s - b_ref[:, None])
        b_vs = r_vs.to(gl.float32)
        if SYMMETRIC:
            b_vz = -b_vs * (1 << (BITS - 1))
        else:
            b_vz = r_vz.to(gl.float32)
        b_pp = (b_p * b_vs[None, :]).to(gl.float16)
        b_l = b_l * b_alpha + gl.sum(b_p, 1)
        b_pz = b_pz * b_alpha + gl.sum(b_p * b_vz[None, :], 1)
        # rows 0..7 of p' [16, BN] are, register for register, the B operand [BN, 8] of O^T
        b_p8, _ = gl.split(gl.permute(gl.reshape(b_pp, [2, 8, BN]), [1, 2, 0]))
        b_pt = gl.convert_layout(gl.permute(b_p8, [1, 0]), B_OP, assert_trivial=True)
        b_a8, _ = gl.split(gl.permute(gl.reshape(b_alpha, [2, 8]), [1, 0]))
        b_acc = b_acc * gl.convert_layout(b_a8, COLS)[None, :]
        b_acc = gl.nvidia.ampere.mma_v2(_value_operand(w_v, BN, D, VW, UV, V_ASM, V_CONS), b_pt, b_acc)
        return b_new, b_l, b_pz, b_acc

    @gluon.jit
    def _stage_copy(s_k, s_v, s_vs, s_vz, s_ks, s_kz, st, j, n_sub, p_kw, p_vw, p_vs, p_vz, p_ks, p_kz, BLOCK_IDS,
                    sub_blocks, i_lo, n_quant_visit, stride_kw_n, stride_vw_n, stride_vs_n, stride_ks_g,
                    BLOCK_K: gl.constexpr, BN: gl.constexpr, D: gl.constexpr, KEY_GROUP: gl.constexpr,
                    WK: gl.constexpr, VW: gl.constexpr, HAS_BLOCK_IDS: gl.constexpr):
        """cp.async of sub-block j's words, value scales and zeros (and, at a key group's first sub-block, the
        group's key scales and zeros) into ring stage st; nothing past the split's last sub-block (masked: no
        traffic). Each lane copies exactly the words it later reads (the same layouts); the key-group and value-
        scale rows use plain row layouts, read across lanes after the barrier."""
        valid = j < n_sub
        n0 = _sub_block_start(BLOCK_IDS, j, sub_blocks, i_lo, n_quant_visit, BLOCK_K, BN, HAS_BLOCK_IDS)
        o_k = _key_word_offsets(n0, stride_kw_n, BN, WK)
        _async_load(s_k.index(st), p_kw + o_k, mask=(o_k >= 0) & valid)
        o_v = _value_word_offsets(n0, stride_vw_n, BN, VW)
        _async_load(s_v.index(st), p_vw + o_v, mask=(o_v >= 0) & valid)
        # >= 4 bytes a lane (cp.async's smallest copy): lanes past the row repeat the first ones
        L_S: gl.constexpr = gl.BlockedLayout([max(BN // 32, 2)], [32], [1], [0])
        o_s = (n0 + gl.arange(0, BN, layout=L_S)) * stride_vs_n
        _async_load(s_vs.index(st), p_vs + o_s, mask=(o_s >= 0) & valid)
        _async_load(s_vz.index(st), p_vz + o_s, mask=(o_s >= 0) & valid)
        L_G: gl.constexpr = gl.BlockedLayout([max(D // 32, 2)], [32], [1], [0])
        o_g = (n0 // KEY_GROUP) * stride_ks_g + gl.arange(0, D, layout=L_G)
        new_group = valid & (j % sub_blocks == 0)
        _async_load(s_ks.index(st), p_ks + o_g, mask=(o_g >= 0) & new_group)
        _async_load(s_kz.index(st), p_kz + o_g, mask=(o_g >= 0) & new_group)

    @gluon.jit(do_not_specialize=["kv_len", "n_quant", "n_quant_visit", "blocks_per_split", "n_split_quant",
                                  "n_split_total", "window", "sink", "sub_blocks"])
    def _quant_decode_mma_kernel(
        Q, KW, KS, KZ, VW_, VS, VZ, KR, VR, BLOCK_IDS, RES_IDS, VCH, O_PART, L_PART, ROW_QUANT, ROW_LEN,
        stride_qb, stride_qh, stride_qt, stride_kw_bh, stride_kw_n, stride_ks_bh, stride_ks_g,
        stride_vw_bh, stride_vw_n, stride_vs_bh, stride_vs_n, stride_r_bh, stride_r_n,
        kv_len, n_quant, n_quant_visit, blocks_per_split, n_split_quant, n_split_total, window, sink, sub_blocks,
        qk_scale,
        H_KV: gl.constexpr, GQ: gl.constexpr, T: gl.constexpr, D: gl.constexpr, BLOCK_K: gl.constexpr,
        BN: gl.constexpr, KEY_GROUP: gl.constexpr, BITS: gl.constexpr, SYMMETRIC: gl.constexpr,
        HAS_BLOCK_IDS: gl.constexpr, HAS_WINDOW: gl.constexpr,
        WK: gl.constexpr, UK: gl.constexpr, VW: gl.constexpr, UV: gl.constexpr,
        K_ASM: gl.constexpr, K_CONS: gl.constexpr, V_ASM: gl.constexpr, V_CONS: gl.constexpr,
        KEYS_EXACT: gl.constexpr, STAGES: gl.constexpr = 1, VARLEN: gl.constexpr = False,
    ):
        """Program (batch * KV head, split). Splits below n_split_quant attend quantized visits [split * per_split,
        ...) of the visit list; each split above attends one BN-key block of the full-precision residual tail
        (block RES_IDS[r] with a schedule, else n_quant / BN + r). Rows m = g T + t of S are query head g of the
        group and new token t; rows >= GQ T are zero padding.

        STAGES: 1 keeps the next step's words in registers (one step in flight); >= 2 runs a ring of STAGES
        shared-memory stages filled by cp.async, STAGES - 1 steps in flight and no prefetch registers (the key
        group's scales and zeros ride in the ring too, instead of a load that waited in full at every group).

        VARLEN (the static decode step, T = 1): row i_b's quantized tokens and length are read from ROW_QUANT and
        ROW_LEN on the device; the launch is fixed by the buffers' capacity. The row's quantized blocks are shared
        by the n_split_quant quantized splits, at least blocks_per_split each (splits past them write an empty
        partial), and residual split r attends window tokens [r BN, (r + 1) BN) (empty past the row's length).
        With HAS_WINDOW (sink tokens 0) the quantized splits share only the blocks that reach the row's window."""
        P: gl.constexpr = 8 // BITS
        i_bh, i_split = gl.program_id(0), gl.program_id(1)
        i_b, i_h = i_bh // H_KV, i_bh % H_KV
        i_first = 0  # the first quantized visit the splits share
        if VARLEN:
            n_quant = gl.load(ROW_QUANT + i_b).to(gl.int32)
            kv_len = gl.load(ROW_LEN + i_b).to(gl.int32)
            n_quant_visit = n_quant // BLOCK_K
            if HAS_WINDOW:  # the row's last `window` keys: blocks wholly before them are not visited
                i_first = gl.minimum(gl.maximum(kv_len - window, 0) // BLOCK_K, n_quant_visit)
            blocks_per_split = gl.maximum(gl.cdiv(n_quant_visit - i_first, n_split_quant), blocks_per_split)

        o_r = gl.arange(0, 16, layout=ROWS)
        o_n = gl.arange(0, BN, layout=COLS)
        q_pos = kv_len - T + o_r % T
        b_mx = gl.full([16], float("-inf"), gl.float32, layout=ROWS)
        b_l = gl.full([16], 0.0, gl.float32, layout=ROWS)
        b_pz = gl.full([16], 0.0, gl.float32, layout=ROWS)  # sum of p z_v
        b_acc = gl.full([D, 8], 0.0, gl.float32, layout=MMA)  # O^T: channels (VCH order) x rows 0..7

        if i_split >= n_split_quant:
            # the residual tail: one block of full-precision keys, fp16 operands, no scales to fold
            if HAS_BLOCK_IDS:
                n0 = gl.load(RES_IDS + i_split - n_split_quant) * BN
            else:
                n0 = n_quant + (i_split - n_split_quant) * BN
            p_r = i_bh * stride_r_bh
            b_q16 = (_query_rows(Q, i_b, i_h, stride_qb, stride_qh, stride_qt, GQ, T, D, WK, P) * qk_scale).to(
                gl.float16)
            b_kt = _residual_key_operand(KR + p_r, n0 - n_quant, kv_len - n_quant, stride_r_n, BN, D, WK, P)
            b_s = gl.nvidia.ampere.mma_v2(b_q16, b_kt, gl.full([16, BN], 0.0, gl.float32, layout=MMA))
            b_s = _visible(b_s, n0 + o_n, q_pos, kv_len, window, sink, HAS_WINDOW)
            b_mx = gl.max(b_s, 1)
            b_p = gl.exp2(b_s - gl.where(b_mx == float("-inf"), 0.0, b_mx)[:, None])
            b_l = gl.sum(b_p, 1)
            b_p8, _ = gl.split(gl.permute(gl.reshape(b_p.to(gl.float16), [2, 8, BN]), [1, 2, 0]))
            b_pt = gl.convert_layout(gl.permute(b_p8, [1, 0]), B_OP, assert_trivial=True)
            b_vt = _residual_value_operand(VR + p_r, n0 - n_quant, kv_len - n_quant, stride_r_n, BN, D, VW, P)
            b_acc = gl.nvidia.ampere.mma_v2(b_vt, b_pt, b_acc)
        else:
            p_kw = KW + i_bh * stride_kw_bh
            p_vw = VW_ + i_bh * stride_vw_bh
            p_vs = VS + i_bh * stride_vs_bh
            p_vz = VZ + i_bh * stride_vs_bh
            p_ks = KS + i_bh * stride_ks_bh
            p_kz = KZ + i_bh * stride_ks_bh
            i_lo = i_first + i_split * blocks_per_split
            n_sub = (gl.minimum(i_lo + blocks_per_split, n_quant_visit) - i_lo) * sub_blocks  # <= 0: nothing
            b_qs = gl.full([16, D], 0.0, gl.float16, layout=A_OP)
            b_bias = gl.full([16], 0.0, gl.float32, layout=ROWS)
            if STAGES == 1:
                # software pipelining in registers: sub-block j + 1's words are in flight while j is computed (each
                # load otherwise waited in full, twice a sub-block: the value loads were issued after the score dots)
                n0 = _sub_block_start(BLOCK_IDS, 0, sub_blocks, i_lo, n_quant_visit, BLOCK_K, BN, HAS_BLOCK_IDS)
                w_k = _key_words(p_kw, n0, stride_kw_n, BN, WK)
                w_v = _value_words(p_vw, n0, stride_vw_n, BN, VW)
                r_vs = gl.load(p_vs + (n0 + o_n) * stride_vs_n)
                r_vz = gl.load(p_vz + (n0 + o_n) * stride_vs_n)
                for j in range(0, n_sub):
                    n1 = _sub_block_start(BLOCK_IDS, j + 1, sub_blocks, i_lo, n_quant_visit, BLOCK_K, BN,
                                          HAS_BLOCK_IDS)
                    w_k1 = _key_words(p_kw, n1, stride_kw_n, BN, WK)
                    w_v1 = _value_words(p_vw, n1, stride_vw_n, BN, VW)
                    r_vs1 = gl.load(p_vs + (n1 + o_n) * stride_vs_n)
                    r_vz1 = gl.load(p_vz + (n1 + o_n) * stride_vs_n)
                    if j % sub_blocks == 0:  # a new key group
                        p_row = (n0 // KEY_GROUP) * stride_ks_g
                        b_ks = _key_row(p_ks + p_row, D, WK, P, BITS, True)
                        if SYMMETRIC:
                            b_kz = -_key_row(p_ks + p_row, D, WK, P, BITS, False) * (1 << (BITS - 1))
                        else:
                            b_kz = _key_row(p_kz + p_row, D, WK, P, BITS, False)
                        b_qs, b_bias = _group_query(Q, b_ks, b_kz, i_b, i_h, stride_qb, stride_qh, stride_qt,
                                                    qk_scale, GQ, T, D, WK, P, KEYS_EXACT)
                    b_mx, b_l, b_pz, b_acc = _step(w_k, w_v, r_vs, r_vz, b_qs, b_bias, n0, q_pos, kv_len, window,
                                                   sink, b_mx, b_l, b_pz, b_acc, BN, D, BITS, SYMMETRIC, HAS_WINDOW,
                                                   T, WK, UK, VW, UV, K_ASM, K_CONS, V_ASM, V_CONS)
                    n0, w_k, w_v, r_vs, r_vz = n1, w_k1, w_v1, r_vs1, r_vz1
            else:
                # the ring: stage j % STAGES holds sub-block j; STAGES - 1 sub-blocks are in flight while one is
                # computed. Natural (unswizzled) order except the value words, stored [.., t, e, g, VW] -> lanes
                # (t, g) of one read take 32 consecutive runs of VW words (the keys' order would hit every bank 4x)
                # (the layouts describe one stage; the leading stage axis is outermost)
                SH3: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [2, 1, 0])
                SH1: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [0])
                SHV: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [5, 4, 2, 3, 1, 0])
                s_k = gl.allocate_shared_memory(gl.int32, [STAGES, BN, 4, WK], SH3)
                s_v = gl.allocate_shared_memory(gl.int32, [STAGES, BN // 16, 2, 4, 2, 8, VW], SHV)
                s_vs = gl.allocate_shared_memory(VS.dtype.element_ty, [STAGES, BN], SH1)
                s_vz = gl.allocate_shared_memory(VZ.dtype.element_ty, [STAGES, BN], SH1)
                s_ks = gl.allocate_shared_memory(KS.dtype.element_ty, [STAGES, D], SH1)
                s_kz = gl.allocate_shared_memory(KZ.dtype.element_ty, [STAGES, D], SH1)
                L_K: gl.constexpr = gl.BlockedLayout([1, 1, WK], [8, 4, 1], [1, 1, 1], [2, 1, 0])
                L_V: gl.constexpr = gl.BlockedLayout([1, 1, 1, 1, 1, VW], [1, 1, 4, 1, 8, 1], [1, 1, 1, 1, 1, 1],
                                                     [5, 2, 4, 3, 1, 0])
                L_R: gl.constexpr = _key_row_layout(D, WK, P)
                for jj in gl.static_range(STAGES - 1):
                    _stage_copy(s_k, s_v, s_vs, s_vz, s_ks, s_kz, jj, jj, n_sub, p_kw, p_vw, p_vs, p_vz, p_ks, p_kz,
                                BLOCK_IDS, sub_blocks, i_lo, n_quant_visit, stride_kw_n, stride_vw_n, stride_vs_n,
                                stride_ks_g, BLOCK_K, BN, D, KEY_GROUP, WK, VW, HAS_BLOCK_IDS)
                    async_copy.commit_group()
                for j in range(0, n_sub):
                    # the stage read at j - 1 is refilled with sub-block j + STAGES - 1 before waiting for j, so
                    # STAGES - 1 sub-blocks stay in flight through the wait (the first barrier: every lane's reads
                    # of it are done); then sub-block j has landed (in-order groups: at most STAGES - 1 newer ones
                    # pending) and, after the second barrier, every lane's copies of it are visible
                    _barrier()
                    _stage_copy(s_k, s_v, s_vs, s_vz, s_ks, s_kz, (j + STAGES - 1) % STAGES, j + STAGES - 1, n_sub,
                                p_kw, p_vw, p_vs, p_vz, p_ks, p_kz, BLOCK_IDS, sub_blocks, i_lo, n_quant_visit,
                                stride_kw_n, stride_vw_n, stride_vs_n, stride_ks_g, BLOCK_K, BN, D, KEY_GROUP, WK, VW,
                                HAS_BLOCK_IDS)
                    async_copy.commit_group()
                    async_copy.wait_group(STAGES - 1)
                    _barrier()
                    st = j % STAGES
                    n0 = _sub_block_start(BLOCK_IDS, j, sub_blocks, i_lo, n_quant_visit, BLOCK_K, BN, HAS_BLOCK_IDS)
                    if j % sub_blocks == 0:  # a new key group: its rows came with this stage
                        x_s = s_ks.index(st).reshape([4, WK, 4, P]).load(L_R)
                        b_ks = _key_row_slots(x_s, D, WK, P, BITS, True)
                        if SYMMETRIC:
                            b_kz = -_key_row_slots(x_s, D, WK, P, BITS, False) * (1 << (BITS - 1))
                        else:
                            b_kz = _key_row_slots(s_kz.index(st).reshape([4, WK, 4, P]).load(L_R), D, WK, P, BITS,
                                                  False)
                        b_qs, b_bias = _group_query(Q, b_ks, b_kz, i_b, i_h, stride_qb, stride_qh, stride_qt,
                                                    qk_scale, GQ, T, D, WK, P, KEYS_EXACT)
                    w_k = s_k.index(st).load(L_K)
                    w_v = s_v.index(st).load(L_V)
                    r_vs = s_vs.index(st).load(COLS)
                    r_vz = s_vz.index(st).load(COLS)
                    b_mx, b_l, b_pz, b_acc = _step(w_k, w_v, r_vs, r_vz, b_qs, b_bias, n0, q_pos, kv_len, window,
                                                   sink, b_mx, b_l, b_pz, b_acc, BN, D, BITS, SYMMETRIC, HAS_WINDOW,
                                                   T, WK, UK, VW, UV, K_ASM, K_CONS, V_ASM, V_CONS)
                async_copy.wait_group(0)  # no copy outlives the program (the masked ones past the end included)

        # O[m, VCH[r]] = (2^-s acc[r, m] + pz[m]) / l[m]; the partial is normalised for the merge
        b_l8, _ = gl.split(gl.permute(gl.reshape(b_l, [2, 8]), [1, 0]))
        b_pz8, _ = gl.split(gl.permute(gl.reshape(b_pz, [2, 8]), [1, 0]))
        b_mx8, _ = gl.split(gl.permute(gl.reshape(b_mx, [2, 8]), [1, 0]))
        b_l8 = gl.convert_layout(b_l8, COLS)
        b_pz8, b_mx8 = gl.convert_layout(b_pz8, COLS), gl.convert_layout(b_mx8, COLS)
        v_ch = gl.load(VCH + gl.arange(0, D, layout=ROWS))
        v_fac = gl.exp2(-(BITS * (v_ch % P)).to(gl.float32))  # undoes the plane's 2^s (codes only)
        v_fac = gl.where(i_split >= n_split_quant, 1.0, v_fac)
        b_l_safe = gl.where(b_l8 > 0, b_l8, 1.0)
        b_o = (b_acc * v_fac[:, None] + b_pz8[None, :]) / b_l_safe[None, :]
        o_h = gl.arange(0, 8, layout=COLS)
        o_part = (i_bh.to(gl.int64) * n_split_total + i_split) * (GQ * T) + o_h
        gl.store(O_PART + o_part[None, :] * D + v_ch[:, None], b_o, mask=(o_h < GQ * T)[None, :])
        b_lse = gl.where(b_l8 > 0, b_mx8 + gl.log2(b_l_safe), float("-inf"))
        gl.store(L_PART + o_part, b_lse, mask=o_h < GQ * T)


# key codes as c 2^s (a sub.f16x2 a pair), or as 1024 + c 2^s with the 1024 taken back in the scores' bias: the same
# instruction count in the sm_90 build (the bias then needs a sum of q' a block), and no offset to cancel
KEYS_EXACT = True
_CHANNELS: dict = {}
_PER_SM: dict = {}


def _value_channel_table(bits: int, d: int, device: torch.device) -> torch.Tensor:
    """value_channels on the device, where the kernel scatters each output row to its channel. (The key side needs
    no table: every per-channel row, the query included, is loaded in slot order by reshapes; key_channels is the
    bookkeeping the CPU tests check them against.)"""
    key = (bits, d, device)
    if key not in _CHANNELS:
        _CHANNELS[key] = torch.from_numpy(value_channels(bits, d)).to(device)
    return _CHANNELS[key]


# default (keys a step, register cap, ring stages) per bit width: the fastest of the 128k-key launch sweep on the
# H200 (experiments/kv_cache/README.md section 7):
# int4 64 keys (55.7 us; 57.3 at 32, 58.2 at 32 under a 168-register cap that fits 12 programs an SM instead of 8),
# int2 64 keys (50.9 us), int8 32 keys (80.7 us; 89.6 at 64); no cap: capped, the kernel spilled and was no faster.
# Stages 1: the next step's words in registers. The cp.async ring (stages >= 2) is a launch option until a sweep
# on the device (scripts/bench_kv_cache.py --mma-sweep) has timed it.
DEFAULTS = {8: (32, None, 1), 4: (64, None, 1), 2: (64, None, 1)}
SMEM_PER_SM = 233472  # bytes of shared memory an SM gives its blocks (sm_90: 228 KB), 1 KB of it reserved a block


def launch_defaults(bits: int, block_n: int | None = None, maxnreg: int | None = None,
                    stages: int | None = None) -> tuple[int, int | None, int]:
    """(keys a program attends per step, register cap, ring stages) of an MMA launch: the arguments, else
    DEFAULTS (an explicit block_n alone runs uncapped)."""
    bn, cap, st = DEFAULTS[bits]
    return (block_n or bn, maxnreg if maxnreg is not None or block_n is not None else cap,
            stages if stages is not None else st)


def check_stages(stages: int, bn: int) -> None:
    if stages < 1 or (stages > 1 and bn < 32):
        raise ValueError(f"mma stages must be 1 (registers) or >= 2 (a cp.async ring, steps of >= 32 keys), got "
                         f"stages={stages} with {bn}-key steps")


def ring_fits(*scales: torch.Tensor | None) -> bool:
    """Whether the ring's copies of the 2-byte scale and zero rows can be 4 bytes or wider, which cp.async needs:
    the JIT proves it only from 16-byte aligned bases and strides divisible by 16 or unit (flattened [B*Hkv, ...]
    scales and zeros; otherwise the sm_90 build fails: checked AOT with the strides unhinted)."""
    return all(x is None or (x.data_ptr() % 16 == 0 and all(st % 16 == 0 or st == 1 for st in x.stride()))
               for x in scales)


def pick_stages(stages: int, explicit: bool, *scales: torch.Tensor | None) -> int:
    """The ring's depth for this storage: as asked where it fits; a default ring falls back to the register
    pipeline where it does not; an explicit one is refused in one line."""
    if stages == 1 or ring_fits(*scales):
        return stages
    if explicit:
        raise ValueError(f"mma_stages={stages} needs the scales and zeros 16-byte aligned with strides divisible by 16 "
                         f"(got strides {[tuple(x.stride()) for x in scales if x is not None]}); use mma_stages=1")
    return 1


def _call(grid, warmup: bool, q, kc, ks, kz, vc, vs, vz, kr, vr, block_ids, res_ids, o_part, l_part, *, kv_len,
          n_quant, n_quant_visit, per_split, n_split_quant, n_split_total, window, sink, qk_scale, hkv, gq, block_k,
          key_group, bits, has_block_ids, bn, maxnreg, stages=1, row_quant=None, row_len=None):
    b, _, t, d = q.shape
    s = layout_sizes(bits, d)
    kw, vw = kc.view(torch.int32), vc.view(torch.int32)
    vch = _value_channel_table(bits, d, q.device)
    ku, vu = s["UK"], s["UV"]
    varlen = row_quant is not None
    fn = _quant_decode_mma_kernel.warmup if warmup else _quant_decode_mma_kernel[grid]
    return fn(
        q, kw, ks, kz if kz is not None else ks, vw, vs, vz if vz is not None else vs, kr, vr, block_ids, res_ids,
        vch, o_part, l_part, row_quant if varlen else vch, row_len if varlen else vch,
        q.stride(0), q.stride(1), q.stride(2), kw.stride(0), kw.stride(1), ks.stride(0), ks.stride(1),
        vw.stride(0), vw.stride(1), vs.stride(0), vs.stride(1), kr.stride(0), kr.stride(1),
        kv_len, n_quant, n_quant_visit, per_split, n_split_quant, n_split_total, window, sink, block_k // bn,
        qk_scale,
        H_KV=hkv, GQ=gq, T=t, D=d, BLOCK_K=block_k, BN=bn, KEY_GROUP=key_group, BITS=bits,
        SYMMETRIC=kz is None, HAS_BLOCK_IDS=has_block_ids, HAS_WINDOW=window > 0,
        WK=s["WK"], UK=ku, VW=s["VW"], UV=vu,
        K_ASM=key_unpack_asm(bits, KEYS_EXACT), K_CONS=",".join(["=r"] * ku + ["r"]),
        V_ASM=value_unpack_asm(bits), V_CONS=",".join(["=r"] * vu + ["r", "r"]), KEYS_EXACT=KEYS_EXACT,
        STAGES=stages, VARLEN=varlen,
        num_warps=1, **({"grid": grid} if warmup else {}), **({"maxnreg": maxnreg} if maxnreg else {}),
    )


def occupancy(n_regs: int, shared: int) -> int:
    """One-warp programs an SM holds at n_regs registers a thread and `shared` bytes of shared memory a program.
    Registers are allocated per warp in units of 8 a thread, from each of the 4 schedulers' 16,384: 168 registers
    give 3 warps a scheduler (12 an SM), 169-224 (and up to 256) give 2 (8). Shared memory: SMEM_PER_SM, 1 KB of it
    reserved a block. At most 32 resident blocks an SM (sm_90)."""
    regs = -(-n_regs // 8) * 8
    by_regs = 4 * (16384 // (32 * regs))
    by_smem = SMEM_PER_SM // (shared + 1024) if shared else 32
    return max(1, min(32, by_regs, by_smem))


def programs_per_sm(q, kc, ks, kz, vc, vs, vz, kr, vr, block_ids, res_ids, **kw) -> int:
    """One-warp programs an SM holds at this specialization's registers and shared memory (compiled ahead, once).
    Asking for more than fit leaves a second, partial wave, which was slower on the H200 (experiments/kv_cache/
    README.md section 7)."""
    key = (q.dtype, q.shape[2], q.shape[3], kz is None, block_ids is not None, kw["window"] > 0, kw["hkv"], kw["gq"],
           kw["block_k"], kw["key_group"], kw["bits"], kw["bn"], kw["maxnreg"], kw.get("stages", 1),
           kw.get("row_quant") is not None, q.device)
    if key not in _PER_SM:
        part = torch.empty(16, dtype=torch.float32, device=q.device)
        compiled = _call((1,), True, q, kc, ks, kz, vc, vs, vz, kr, vr, block_ids, res_ids, part, part, per_split=1,
                         n_split_quant=1, n_split_total=1, **kw)
        compiled._init_handles()
        _PER_SM[key] = occupancy(compiled.n_regs, compiled.metadata.shared)
    return _PER_SM[key]


def split_launch(q, kc, ks, kz, vc, vs, vz, kr, vr, block_ids, res_ids, n_visit: int, *, res_blocks: int = 0,
                 num_splits: int | None = None, per_sm: int | None = None, **kw) -> tuple[int, int]:
    """(splits, visits per split) over n_visit quantized visits: by default as many one-warp programs an SM as its
    registers and shared memory allow, in one wave together with the res_blocks residual programs of every head."""
    if num_splits is None:
        per_sm = per_sm or programs_per_sm(q, kc, ks, kz, vc, vs, vz, kr, vr, block_ids, res_ids, **kw)
        heads = q.shape[0] * kw["hkv"]
        slots = per_sm * num_sms(q.device) - heads * res_blocks
        num_splits = max(1, min(slots // heads, n_visit // 2))
    per_split = max(1, -(-n_visit // max(num_splits, 1)))
    return max(1, -(-n_visit // per_split)), per_split


def launch(q, kc, ks, kz, vc, vs, vz, kr, vr, block_ids, res_ids, o_part, l_part, **kw) -> None:
    """Attend the quantized visits into splits [0, n_split_quant) of o_part / l_part and the residual tail's blocks
    (res_ids, or every block from n_quant on) into the rest, up to n_split_total: one launch (flattened
    [B*Hkv, ...] codes, scales, zeros and residual buffers as quant_decode prepares them; kz / vz None when
    symmetric). With row_quant / row_len ([B] device tensors) each row's lengths are read on the device (VARLEN):
    kv_len, n_quant and n_quant_visit are then ignored and per_split is the fewest quantized blocks a split takes."""
    _call((q.shape[0] * kw["hkv"], kw["n_split_total"]), False, q, kc, ks, kz, vc, vs, vz, kr, vr, block_ids, res_ids,
          o_part, l_part, **kw)
