"""The experts of a mixture-of-experts MLP over tokens grouped by expert: two launches for all experts, and the
PyTorch reference beside them.

    moe_experts(x, weights, experts, w_gate_up, w_down, b_gate_up, b_down, layout=, act=, use_kernel=)
        x: [N, H]; weights: [N, k] routing weights; experts: [N, k] long expert ids
        layout "concat":        w_gate_up [E, 2I, H] (gate rows, then up rows), w_down [E, H, I]
        layout "interleaved_t": w_gate_up [E, H, 2I] (gate, up interleaved columns), w_down [E, I, H]
        b_gate_up [E, 2I], b_down [E, H] or None
        or both weights as MXFP4 (kernels/mxfp4.py: uint8 codes [E, rows, K / 32, 16] + scales, row = output, in
        the layout's row order), read as 4.25-bit bytes and decoded in the kernels (`_mx_dot`)
        -> [N, H] = sum over the k slots of weight * down(act(gate, up))

How the kernels see the tokens. The N*k (token, slot) pairs are sorted by expert and each expert's run padded to a
multiple of BLOCK_M rows (`align_pairs`), so every BLOCK_M-row block belongs to one expert (`block_expert`, -1 past
the end). The row count is bounded from the shapes alone (N*k + min(E, N*k) * (BLOCK_M - 1)), so nothing is read
back to the host and the launch can be captured in a CUDA graph; blocks past the last expert's run return at once.
- `_gate_up_kernel`: per (block, I-tile), x rows gathered by token @ that expert's gate and up columns, the
  activation, written to `inter` [rows, I] in the model dtype (the eager path rounds there too);
- `_down_kernel`: per (block, H-tile), inter @ the expert's down matrix, + bias, times the pair's routing weight,
  written to the pair's own row of [N*k, H]; the k rows of a token are then summed in PyTorch (a fixed order, so
  results do not depend on scheduling, unlike atomics).
Each program reads only its block's expert, so a batch-1 decode step reads k experts' weights; one token's k
experts are distinct, so its pairs skip the grouping (`single_token_rows`: block j is pair j, expert ids as routed).
The layouts differ in strides and in where up column n sits, and no weight is copied: "concat" reads gate and up as
two tiles I columns apart; "interleaved_t" (`PAIRED`) reads one contiguous tile of BLOCK_N (gate, up) column pairs
and splits the accumulator into even and odd columns after the loop.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ollm_triton.kernels.mxfp4 import MXFP4

ACTS = ("silu", "clamped_swiglu")
_empty = torch.empty  # every buffer the kernels write is allocated here (tests fill them with NaN)
LAYOUTS = ("concat", "interleaved_t")


# ---- PyTorch reference ----------------------------------------------------------------------------------------------


def expert_activation(gate: torch.Tensor, up: torch.Tensor, act: str, alpha: float = 1.702,
                      limit: float = 7.0) -> torch.Tensor:
    """silu(gate) * up, or gpt-oss' clamped variant (up clamped to +-limit, gate to <= limit,
    (up + 1) * gate * sigmoid(alpha * gate))."""
    if act == "silu":
        return F.silu(gate) * up
    gate, up = gate.clamp(max=limit), up.clamp(min=-limit, max=limit)
    return (up + 1) * (gate * torch.sigmoid(gate * alpha))


def expert_forward(h: torch.Tensor, e: int, w_gate_up, w_down, b_gate_up=None, b_down=None, *, layout="concat",
                   act="silu", alpha=1.702, limit=7.0) -> torch.Tensor:
    """Expert e on its tokens: h [n, H] -> [n, H]."""
    if layout == "concat":
        gate, up = F.linear(h, w_gate_up[e], None if b_gate_up is None else b_gate_up[e]).chunk(2, dim=-1)
    else:
        gate_up = h @ w_gate_up[e]
        if b_gate_up is not None:
            gate_up = gate_up + b_gate_up[e]
        gate, up = gate_up[..., ::2], gate_up[..., 1::2]
    a = expert_activation(gate, up, act, alpha, limit)
    if layout == "concat":
        return F.linear(a, w_down[e], None if b_down is None else b_down[e])
    out = a @ w_down[e]
    return out if b_down is None else out + b_down[e]


def moe_experts_torch(x, weights, experts, w_gate_up, w_down, b_gate_up=None, b_down=None, *, layout="concat",
                      act="silu", alpha=1.702, limit=7.0) -> torch.Tensor:
    """The reference: expert by expert over the tokens that chose it, index_add into [N, H] (transformers' loop).
    MXFP4 weights are dequantized to the layout's dense matrices in x's dtype first."""
    if isinstance(w_gate_up, MXFP4):
        w_gate_up = w_gate_up.dense(x.dtype, transposed=layout == "interleaved_t")
    if isinstance(w_down, MXFP4):
        w_down = w_down.dense(x.dtype, transposed=layout == "interleaved_t")
    out = torch.zeros_like(x)
    for e in experts.unique().tolist():
        token, slot = torch.where(experts == e)
        y = expert_forward(x[token], e, w_gate_up, w_down, b_gate_up, b_down, layout=layout, act=act, alpha=alpha,
                           limit=limit)
        out.index_add_(0, token, y * weights[token, slot, None])
    return out


# ---- Triton ---------------------------------------------------------------------------------------------------------


@triton.jit
def _activation(b_g, b_u, ACT: tl.constexpr, alpha, limit):
    if ACT == 0:
        return b_g / (1.0 + tl.exp(-b_g)) * b_u
    b_g = tl.minimum(b_g, limit)
    b_u = tl.minimum(tl.maximum(b_u, -limit), limit)
    return (b_u + 1.0) * (b_g / (1.0 + tl.exp(-alpha * b_g)))


@triton.jit
def _e2m1(code):
    """FP4 (e2m1) codes 0..15 (int32) -> their values in float32: sign bit 3, then 0, 0.5, 1, 1.5, 2, 3, 4, 6."""
    e = (code >> 1) & 3
    half = (code & 1).to(tl.float32) * 0.5
    mag = tl.where(e == 0, half, (1.0 + half) * tl.where(e == 1, 1.0, tl.where(e == 2, 2.0, 4.0)))
    return tl.where(code >= 8, -mag, mag)


@triton.jit
def _mx_dot(acc, p_x, m_x, p_w, p_s, o_n, m_n, k0, K, s_wn, s_sn, DOT_PREC: tl.constexpr, BLOCK_K: tl.constexpr,
            SWAP: tl.constexpr):
    """acc + x[:, k0:k0+BK] @ W[k0:k0+BK, n] for MXFP4 W (row n of the blocks is output n, kernels/mxfp4.py), one
    32-code group at a time: the group's 16 bytes of each row as one contiguous tile, its low nibbles (even k) and high
    nibbles (odd k) decoded and scaled in registers, and dotted with x's even and odd columns. p_x: [BM] pointers to
    x's rows (m_x their mask). Addressing each code's byte per element instead (k // 2) defeats the compiler's
    contiguity analysis: every byte becomes a lone load (84 GB/s on the gpt-oss layer, moe study 5b).
    SWAP: acc is the transpose, [BN, BM], and the decoded weights are the dot's left operand, W^T @ x^T: on sm_90 the
    left operand of a warpgroup MMA may stay in registers, where the right one goes through shared memory."""
    o_b = tl.arange(0, 16)
    for g in tl.static_range(BLOCK_K // 32):
        k_g = k0 + 32 * g
        m_b = k_g + 2 * o_b < K  # K is a multiple of 32 (ModelConfig.with_experts): a group is all in or all out
        m_s = m_n & (k_g + 0 * o_n < K)
        sc = tl.exp2(tl.load(p_s + o_n * s_sn + k_g // 32, mask=m_s, other=127).to(tl.float32) - 127.0)
        if SWAP:
            b_xe = tl.load(p_x[None, :] + (k_g + 2 * o_b)[:, None], mask=m_b[:, None] & m_x[None, :], other=0.0)
            b_xo = tl.load(p_x[None, :] + (k_g + 1 + 2 * o_b)[:, None], mask=m_b[:, None] & m_x[None, :], other=0.0)
            b = tl.load(p_w + o_n[:, None] * s_wn + (k_g // 2 + o_b)[None, :], mask=m_n[:, None] & m_b[None, :],
                        other=0).to(tl.int32)
            w_lo = (_e2m1(b & 15) * sc[:, None]).to(b_xe.dtype)  # [BN, 16]
            w_hi = (_e2m1(b >> 4) * sc[:, None]).to(b_xe.dtype)
            acc = tl.dot(w_lo, b_xe, acc, input_precision=DOT_PREC)  # [BN, 16] @ [16, BM]
            acc = tl.dot(w_hi, b_xo, acc, input_precision=DOT_PREC)
        else:
            b_xe = tl.load(p_x[:, None] + (k_g + 2 * o_b)[None, :], mask=m_x[:, None] & m_b[None, :], other=0.0)
            b_xo = tl.load(p_x[:, None] + (k_g + 1 + 2 * o_b)[None, :], mask=m_x[:, None] & m_b[None, :], other=0.0)
            b = tl.load(p_w + o_n[None, :] * s_wn + (k_g // 2 + o_b)[:, None], mask=m_b[:, None] & m_n[None, :],
                        other=0).to(tl.int32)
            w_lo = (_e2m1(b & 15) * sc[None, :]).to(b_xe.dtype)  # exact: an e2m1 value times a power of two
            w_hi = (_e2m1(b >> 4) * sc[None, :]).to(b_xe.dtype)
            acc = tl.dot(b_xe, w_lo, acc, input_precision=DOT_PREC)  # [BM, 16] @ [16, BN]
            acc = tl.dot(b_xo, w_hi, acc, input_precision=DOT_PREC)
    return acc


@triton.jit
def _mx_dot_scaled(acc, p_x, m_x, p_w, p_s, o_n, m_n, k0, K, s_wn, s_sn, X_FORMAT: tl.constexpr,
                   BLOCK_K: tl.constexpr):
    """`_mx_dot` through Triton's own microscaled dot (`tl.dot_scaled`, e2m1 weights with e8m0 scales; on sm_90 the
    compiler upcasts them to bf16 itself): x's [BM, BK] tile, the weights' [BK / 2, BN] bytes (two codes a byte
    along K, as the blocks store them) and their [BN, BK / 32] scales, one call per BLOCK_K."""
    o_k = k0 + tl.arange(0, BLOCK_K)
    o_kb = k0 // 2 + tl.arange(0, BLOCK_K // 2)
    o_g = k0 // 32 + tl.arange(0, BLOCK_K // 32)
    b_x = tl.load(p_x[:, None] + o_k[None, :], mask=m_x[:, None] & (o_k < K)[None, :], other=0.0)
    b_w = tl.load(p_w + o_n[None, :] * s_wn + o_kb[:, None], mask=(o_kb < K // 2)[:, None] & m_n[None, :], other=0)
    b_s = tl.load(p_s + o_n[:, None] * s_sn + o_g[None, :], mask=m_n[:, None] & (o_g < K // 32)[None, :], other=127)
    return tl.dot_scaled(b_x, None, X_FORMAT, b_w, b_s, "e2m1", acc)


@triton.jit(do_not_specialize=["NK"])
def _gate_up_kernel(
    X, W, S, B, PAIRS, BLOCK_EXPERT, INTER,
    NK, H, I, alpha, limit,
    s_xn, s_we, s_wn, s_wk, s_se, s_sn, s_be, s_in,
    TOP_K: tl.constexpr, PAIRED: tl.constexpr, HAS_BIAS: tl.constexpr,
    ACT: tl.constexpr, DOT_PREC: tl.constexpr, MX: tl.constexpr, X_FORMAT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    i_m, i_n = tl.program_id(0), tl.program_id(1)
    i_e = tl.load(BLOCK_EXPERT + i_m).to(tl.int64)
    if i_e < 0:
        return
    o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    b_pair = tl.load(PAIRS + o_m)
    m_m = b_pair < NK
    o_tok = (b_pair // TOP_K).to(tl.int64)
    o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_n = o_n < I
    p_w, p_s = W + i_e * s_we, S + i_e * s_se
    if PAIRED:
        # gate n and up n are adjacent columns (gpt-oss): one contiguous [BK, 2BN] tile and one dot, split after the
        # loop. Loading gate and up as two stride-2 tiles instead gives loads the compiler cannot vectorise (2 bytes
        # a thread, no cp.async), on the largest weight a gpt-oss decode step reads.
        o_c = 2 * i_n * BLOCK_N + tl.arange(0, 2 * BLOCK_N)  # columns of the stacked [2I] axis
        m_c = o_c < 2 * I
        acc = tl.zeros((BLOCK_M, 2 * BLOCK_N), dtype=tl.float32)
        if MX == 2:
            acc = tl.zeros((2 * BLOCK_N, BLOCK_M), dtype=tl.float32)
        for k0 in range(0, H, BLOCK_K):
            if MX == 3:
                acc = _mx_dot_scaled(acc, X + o_tok * s_xn, m_m, p_w, p_s, o_c, m_c, k0, H, s_wn, s_sn, X_FORMAT,
                                     BLOCK_K)
            elif MX:
                acc = _mx_dot(acc, X + o_tok * s_xn, m_m, p_w, p_s, o_c, m_c, k0, H, s_wn, s_sn, DOT_PREC, BLOCK_K,
                              MX == 2)
            else:
                o_k = k0 + tl.arange(0, BLOCK_K)
                m_k = o_k < H
                b_x = tl.load(X + o_tok[:, None] * s_xn + o_k[None, :], mask=m_m[:, None] & m_k[None, :], other=0.0)
                b_w = tl.load(p_w + o_c[None, :] * s_wn + o_k[:, None] * s_wk, mask=m_k[:, None] & m_c[None, :],
                              other=0.0)
                acc = tl.dot(b_x, b_w, acc, input_precision=DOT_PREC)  # [BM, BK] @ [BK, 2BN] -> [BM, 2BN]
        if MX == 2:
            acc = tl.trans(acc)
        if HAS_BIAS:
            acc += tl.load(B + i_e * s_be + o_c, mask=m_c, other=0.0).to(tl.float32)[None, :]
        acc_g, acc_u = tl.split(tl.reshape(acc, (BLOCK_M, BLOCK_N, 2)))  # even columns gate, odd up: [BM, BN] each
    else:
        # gate n at column n, up n at column I + n (qwen): two tiles, each contiguous along k
        acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if MX == 2:
            acc_g = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
            acc_u = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        for k0 in range(0, H, BLOCK_K):
            if MX == 3:
                p_x = X + o_tok * s_xn
                acc_g = _mx_dot_scaled(acc_g, p_x, m_m, p_w, p_s, o_n, m_n, k0, H, s_wn, s_sn, X_FORMAT, BLOCK_K)
                acc_u = _mx_dot_scaled(acc_u, p_x, m_m, p_w, p_s, o_n + I, m_n, k0, H, s_wn, s_sn, X_FORMAT, BLOCK_K)
            elif MX:
                p_x = X + o_tok * s_xn
                acc_g = _mx_dot(acc_g, p_x, m_m, p_w, p_s, o_n, m_n, k0, H, s_wn, s_sn, DOT_PREC, BLOCK_K, MX == 2)
                acc_u = _mx_dot(acc_u, p_x, m_m, p_w, p_s, o_n + I, m_n, k0, H, s_wn, s_sn, DOT_PREC, BLOCK_K,
                                MX == 2)
            else:
                o_k = k0 + tl.arange(0, BLOCK_K)
                m_k = o_k < H
                b_x = tl.load(X + o_tok[:, None] * s_xn + o_k[None, :], mask=m_m[:, None] & m_k[None, :], other=0.0)
                m_w = m_k[:, None] & m_n[None, :]
                b_wg = tl.load(p_w + o_n[None, :] * s_wn + o_k[:, None] * s_wk, mask=m_w, other=0.0)
                b_wu = tl.load(p_w + (o_n + I)[None, :] * s_wn + o_k[:, None] * s_wk, mask=m_w, other=0.0)
                acc_g = tl.dot(b_x, b_wg, acc_g, input_precision=DOT_PREC)  # [BM, BK] @ [BK, BN] -> [BM, BN]
                acc_u = tl.dot(b_x, b_wu, acc_u, input_precision=DOT_PREC)  # [BM, BK] @ [BK, BN] -> [BM, BN]
        if MX == 2:
            acc_g, acc_u = tl.trans(acc_g), tl.trans(acc_u)
        if HAS_BIAS:
            p_b = B + i_e * s_be
            acc_g += tl.load(p_b + o_n, mask=m_n, other=0.0).to(tl.float32)[None, :]
            acc_u += tl.load(p_b + o_n + I, mask=m_n, other=0.0).to(tl.float32)[None, :]
    b_a = _activation(acc_g, acc_u, ACT, alpha, limit)
    tl.store(INTER + o_m[:, None].to(tl.int64) * s_in + o_n[None, :], b_a.to(INTER.dtype.element_ty),
             mask=m_m[:, None] & m_n[None, :])


@triton.jit(do_not_specialize=["NK"])
def _down_kernel(
    INTER, W, S, B, PAIRS, BLOCK_EXPERT, ROUTE_W, OUT,
    NK, H, I,
    s_in, s_we, s_wn, s_wk, s_se, s_sn, s_be, s_on,
    HAS_BIAS: tl.constexpr, DOT_PREC: tl.constexpr, MX: tl.constexpr, X_FORMAT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    i_m, i_n = tl.program_id(0), tl.program_id(1)
    i_e = tl.load(BLOCK_EXPERT + i_m).to(tl.int64)
    if i_e < 0:
        return
    o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    b_pair = tl.load(PAIRS + o_m)
    m_m = b_pair < NK
    o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_n = o_n < H
    p_w, p_s = W + i_e * s_we, S + i_e * s_se
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if MX == 2:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for k0 in range(0, I, BLOCK_K):
        if MX == 3:
            acc = _mx_dot_scaled(acc, INTER + o_m.to(tl.int64) * s_in, m_m, p_w, p_s, o_n, m_n, k0, I, s_wn, s_sn,
                                 X_FORMAT, BLOCK_K)
        elif MX:
            acc = _mx_dot(acc, INTER + o_m.to(tl.int64) * s_in, m_m, p_w, p_s, o_n, m_n, k0, I, s_wn, s_sn, DOT_PREC,
                          BLOCK_K, MX == 2)
        else:
            o_k = k0 + tl.arange(0, BLOCK_K)
            m_k = o_k < I
            b_a = tl.load(INTER + o_m[:, None].to(tl.int64) * s_in + o_k[None, :], mask=m_m[:, None] & m_k[None, :],
                          other=0.0)
            b_w = tl.load(p_w + o_n[None, :] * s_wn + o_k[:, None] * s_wk, mask=m_k[:, None] & m_n[None, :], other=0.0)
            acc = tl.dot(b_a, b_w, acc, input_precision=DOT_PREC)  # [BM, BK] @ [BK, BN] -> [BM, BN]
    if MX == 2:
        acc = tl.trans(acc)
    if HAS_BIAS:
        acc += tl.load(B + i_e * s_be + o_n, mask=m_n, other=0.0).to(tl.float32)[None, :]
    b_r = tl.load(ROUTE_W + b_pair, mask=m_m, other=0.0).to(tl.float32)
    acc = acc * b_r[:, None]
    tl.store(OUT + b_pair[:, None].to(tl.int64) * s_on + o_n[None, :], acc.to(OUT.dtype.element_ty),
             mask=m_m[:, None] & m_n[None, :])


def align_pairs(experts: torch.Tensor, num_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The (token, slot) pairs grouped by expert in BLOCK_M-aligned runs, without a host sync.

    experts: [N, k] -> pairs [R] int32 (pair id = token * k + slot, N*k in padding rows), block_expert [R / block_m]
    int32 (the expert of each block, -1 past the last run), R = N*k + min(E, N*k) * (block_m - 1) rounded up.
    """
    flat = experts.reshape(-1)
    nk = flat.numel()
    rows = triton.cdiv(nk + min(num_experts, nk) * (block_m - 1), block_m) * block_m
    # scatter_add, not bincount: CUDA's bincount reads the max back to size its output (a sync; not capturable)
    counts = torch.zeros(num_experts, dtype=torch.int64, device=flat.device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + block_m - 1) // block_m * block_m
    ends = torch.cumsum(padded, 0)
    order = torch.argsort(flat, stable=True)
    sorted_e = flat[order]
    first = torch.cumsum(counts, 0) - counts  # where each expert's run starts in `order`
    dest = (ends - padded)[sorted_e] + torch.arange(nk, device=flat.device) - first[sorted_e]
    pairs = torch.full((rows,), nk, dtype=torch.int32, device=flat.device)
    pairs[dest] = order.to(torch.int32)
    block_start = torch.arange(0, rows, block_m, device=flat.device)
    block_expert = torch.searchsorted(ends, block_start, right=True)
    block_expert = torch.where(block_expert < num_experts, block_expert, -1).to(torch.int32)
    return pairs, block_expert


_SINGLE_TOKEN_ROWS: dict = {}


def single_token_rows(k: int, block_m: int, device) -> torch.Tensor:
    """The pairs of one token, one per BLOCK_M-row block: [k * block_m] int32, pair j first in block j, k (padding)
    elsewhere. A constant, cached per shape: the batch-1 decode step then launches nothing to group its pairs
    (align_pairs is ~10 small launches a layer, about as long as reading a layer's routed experts on an H100).
    Never cached while a CUDA graph is being captured (its ops would be recorded, not run)."""
    key = (k, block_m, str(device))
    rows = _SINGLE_TOKEN_ROWS.get(key)
    if rows is None:
        rows = torch.full((k, block_m), k, dtype=torch.int32, device=device)
        rows[:, 0] = torch.arange(k, dtype=torch.int32, device=device)
        rows = rows.reshape(-1)
        if not (torch.device(device).type == "cuda" and torch.cuda.is_current_stream_capturing()):
            _SINGLE_TOKEN_ROWS[key] = rows
    return rows


def _block_m(num_pairs: int, num_experts: int) -> int:
    """16 rows (tl.dot's minimum) while experts see few tokens each (decode), 64 once runs are long (prefill).
    num_pairs, num_experts: the routing's (tokens x experts a token, the model's experts), not a call's: a row's
    value depends on the tile (the dot's order), so a call over a cache of some experts, or over one routing slot
    at a time (prefetch/experts.py), must tile as the whole routing does to give its bits (issue 18)."""
    return 16 if num_pairs <= 16 * num_experts else 64


def moe_experts_kernel(x, weights, experts, w_gate_up, w_down, b_gate_up=None, b_down=None, *, layout="concat",
                       act="silu", alpha=1.702, limit=7.0, block_m: int | None = None, block_n: int | None = None,
                       block_k: int = 64, num_warps: int = 4, num_stages: int | None = None,
                       routing: tuple[int, int] | None = None, mx_swap: bool | None = None,
                       mx_dot_scaled: bool = False) -> torch.Tensor:
    """The Triton path (shapes in the module docstring). Tiles: BLOCK_M rows by `_block_m`, 64 x 64 (bf16: the
    sweep of scripts/bench_moe.py --sweep found 0-12% in other settings, none best twice, moe study 5a). routing:
    (the model's experts, experts a token) when this call holds part of the routing (a cache's rows, one slot of
    k): BLOCK_M then follows N x k pairs over the model's experts, as the resident call's does; default: this
    call's shapes.
    MXFP4 weights (moe study 5b, gpt-oss's layer on an H100): as the dot's right operand with BLOCK_N 32 while
    BLOCK_M is 16 (decode: 0.20 ms a layer at one token against 0.31 at BLOCK_N 64), as its left operand (`mx_swap`,
    `_mx_dot` SWAP) with BLOCK_N 64 once BLOCK_M is larger (prefill: 2.41 ms at 512 tokens against 4.73); block_n
    and mx_swap given explicitly override that. mx_dot_scaled: Triton's `tl.dot_scaled` instead (bf16 or fp16
    activations), timed beside the others by bench_moe."""
    if layout not in LAYOUTS or act not in ACTS:
        raise ValueError(f"moe_experts: layout {layout!r} / act {act!r}; accepted: {LAYOUTS} / {ACTS}")
    n, h = x.shape
    k = experts.shape[1]
    x = x if x.stride(-1) == 1 else x.contiguous()
    mx = isinstance(w_gate_up, MXFP4)
    if mx != isinstance(w_down, MXFP4):
        raise ValueError("moe_experts: w_gate_up and w_down are both MXFP4 or neither")
    if mx and block_k % 32:
        raise ValueError(f"moe_experts: block_k {block_k} with MXFP4 weights; accepted: multiples of 32 (a group)")
    if mx:  # row n of a matrix is output n along K (kernels/mxfp4.py); the layout says where gate and up rows sit
        for w in (w_gate_up, w_down):
            if w.blocks.dtype != torch.uint8 or w.blocks.stride()[2:] != (16, 1) or w.scales.stride(2) != 1:
                raise ValueError("moe_experts: MXFP4 blocks [E, N, G, 16] and scales [E, N, G], uint8, contiguous "
                                 "within a row")
        e, i = w_gate_up.blocks.shape[0], w_gate_up.blocks.shape[1] // 2
        w_gu, s_gu, w_d, s_d = w_gate_up.blocks, w_gate_up.scales, w_down.blocks, w_down.scales
        gu_strides = (w_gu.stride(0), w_gu.stride(1), 1, s_gu.stride(0), s_gu.stride(1))
        d_strides = (w_d.stride(0), w_d.stride(1), 1, s_d.stride(0), s_d.stride(1))
    else:
        e = w_gate_up.shape[0]
        w_gu, s_gu, w_d, s_d = w_gate_up, w_gate_up, w_down, w_down  # no scales: S is never read
        if layout == "concat":  # [E, 2I, H]: n along dim 1, k along dim 2; gate n at row n, up n at I + n
            i = w_gate_up.shape[1] // 2
            gu_strides = (w_gate_up.stride(0), w_gate_up.stride(1), w_gate_up.stride(2), 0, 0)
            d_strides = (w_down.stride(0), w_down.stride(1), w_down.stride(2), 0, 0)  # [E, H, I]
        else:  # [E, H, 2I]: n along dim 2, k along dim 1; gate n at column 2n, up n at 2n + 1
            i = w_gate_up.shape[2] // 2
            gu_strides = (w_gate_up.stride(0), w_gate_up.stride(2), w_gate_up.stride(1), 0, 0)
            d_strides = (w_down.stride(0), w_down.stride(2), w_down.stride(1), 0, 0)  # [E, I, H]
    nk = n * k
    out = _empty(n, h, dtype=x.dtype, device=x.device)
    if nk == 0:
        return out.zero_()
    bm = block_m or (_block_m(n * routing[1], routing[0]) if routing else _block_m(nk, e))
    if mx and mx_swap is None:
        mx_swap = bm > 16
    if block_n is None:
        block_n = 32 if mx and not mx_swap else 64
    # the kernels' MX: 0 dense, 1 MXFP4, 2 MXFP4 as the left operand, 3 MXFP4 through tl.dot_scaled
    mx_mode = (3 if mx_dot_scaled else 2 if mx_swap else 1) if mx else 0
    x_format = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(x.dtype, "")
    if mx_mode == 3 and not x_format:
        raise ValueError(f"moe_experts: mx_dot_scaled with {x.dtype} activations; accepted: bfloat16, float16")
    if n == 1:  # one token: its k experts differ, so each gets a block of its own and nothing needs sorting
        pairs, block_expert = single_token_rows(k, bm, x.device), experts.reshape(-1)
    else:
        pairs, block_expert = align_pairs(experts, e, bm)
    rows = pairs.numel()
    inter = _empty(rows, i, dtype=x.dtype, device=x.device)
    out_pairs = _empty(nk, h, dtype=x.dtype, device=x.device)
    route_w = weights.reshape(-1).contiguous()
    prec = "ieee" if x.dtype == torch.float32 else "tf32"
    has_bias = b_gate_up is not None
    bn, bk = block_n, block_k
    launch = dict(num_warps=num_warps) if num_stages is None else dict(num_warps=num_warps, num_stages=num_stages)
    _gate_up_kernel[(rows // bm, triton.cdiv(i, bn))](
        x, w_gu, s_gu, b_gate_up if has_bias else x, pairs, block_expert, inter,
        nk, h, i, float(alpha), float(limit),
        x.stride(0), *gu_strides, b_gate_up.stride(0) if has_bias else 0, inter.stride(0),
        TOP_K=k, PAIRED=layout == "interleaved_t", HAS_BIAS=has_bias, ACT=ACTS.index(act),
        DOT_PREC=prec, MX=mx_mode, X_FORMAT=x_format, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, **launch,
    )
    _down_kernel[(rows // bm, triton.cdiv(h, bn))](
        inter, w_d, s_d, b_down if b_down is not None else x, pairs, block_expert, route_w, out_pairs,
        nk, h, i,
        inter.stride(0), *d_strides, b_down.stride(0) if b_down is not None else 0, out_pairs.stride(0),
        HAS_BIAS=b_down is not None, DOT_PREC=prec, MX=mx_mode, X_FORMAT=x_format, BLOCK_M=bm, BLOCK_N=bn,
        BLOCK_K=bk, **launch,
    )
    return torch.sum(out_pairs.view(n, k, h), dim=1, out=out)


def moe_experts(x, weights, experts, w_gate_up, w_down, b_gate_up=None, b_down=None, *, layout="concat",
                act="silu", alpha=1.702, limit=7.0, use_kernel: bool | None = None,
                routing: tuple[int, int] | None = None) -> torch.Tensor:
    """weights * experts(x) summed over the k slots (module docstring). use_kernel: None = Triton on CUDA tensors,
    the reference elsewhere; True/False force one path (True on the CPU: the interpreter). routing: the model's
    (experts, experts a token), which set the kernels' tile (`moe_experts_kernel`)."""
    if use_kernel if use_kernel is not None else x.is_cuda:
        return moe_experts_kernel(x, weights, experts, w_gate_up, w_down, b_gate_up, b_down, layout=layout, act=act,
                                  alpha=alpha, limit=limit, routing=routing)
    return moe_experts_torch(x, weights, experts, w_gate_up, w_down, b_gate_up, b_down, layout=layout, act=act,
                             alpha=alpha, limit=limit)


__all__ = ["ACTS", "LAYOUTS", "align_pairs", "expert_activation", "expert_forward", "moe_experts",
           "moe_experts_kernel", "moe_experts_torch"]
