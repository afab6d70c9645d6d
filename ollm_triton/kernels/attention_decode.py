"""Split-K flash decoding: a few new queries against a long KV cache, and its PyTorch reference.

    q: [B, Hq, T, D] (T small: the newest tokens, positions S - T .. S - 1)   k, v: [B, Hkv, S, D]

Decode is memory-bound: every K/V byte is read once per step. One program serves all GROUP * T query rows of one
KV head (the rows are the M of the dot, padded to 16), so K/V are read once for the whole group, not once per
query head. The visited KV blocks (all of them, or the ascending `block_ids` of a window / sparse pattern) are cut
into contiguous splits so that B * Hkv * splits programs fill the GPU once; each split writes a normalised partial
output and its log-sum-exp, and a second small kernel merges the splits (decode_merge.py).
Element rules inside the visited blocks: causal among the T new queries, and window + sink (as in
attention_schedule: key s visible iff s < sink or s >= floor(max(p - window + 1, 0) / align) * align).
Per-head sink logits (gpt-oss) are not keys: the merge adds exp(sinks[h]) to each head's denominator
(decode_merge.py), so the split kernel is the same with or without them.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ollm_triton.kernels.attention_prefill import LOG2E, check_qkv, check_sinks, dot_precision, kernel_supports
from ollm_triton.kernels.attention_schedule import cdiv, window_start
from ollm_triton.kernels.decode_merge import merge_splits, one_wave_splits

MAX_ROWS = 128  # GROUP * T rows per program; more goes through the prefill kernel


@triton.jit(do_not_specialize=["T", "S", "window", "sink", "window_align", "n_visit", "per_split"])
def _attn_decode_split_kernel(
    Q, K, V, O_PART, L_PART, BLOCK_IDS,
    stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_ks, stride_vb, stride_vh, stride_vs,
    Hkv, T, S, window, sink, window_align, n_visit, per_split, qk_scale,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_IDS: tl.constexpr, HAS_WINDOW: tl.constexpr, DOT_PREC: tl.constexpr,
):
    i_s = tl.program_id(0)
    i_bkv = tl.program_id(1)
    n_split = tl.num_programs(0)
    i_b = i_bkv // Hkv
    i_kvh = i_bkv % Hkv
    rows = GROUP * T

    o_r = tl.arange(0, BLOCK_R)  # row r = g * T + t: query head i_kvh * GROUP + g, new token t
    m_r = o_r < rows
    o_g = o_r // T
    o_t = o_r % T
    o_p = S - T + o_t  # absolute query positions
    o_d = tl.arange(0, HEAD_DIM)
    o_n = tl.arange(0, BLOCK_N)
    p_q = Q + i_b.to(tl.int64) * stride_qb + ((i_kvh * GROUP + o_g) * stride_qh + o_t * stride_qt)[:, None]
    b_q = tl.load(p_q + o_d[None, :], mask=m_r[:, None], other=0.0)
    p_k = K + i_b.to(tl.int64) * stride_kb + i_kvh.to(tl.int64) * stride_kh
    p_v = V + i_b.to(tl.int64) * stride_vb + i_kvh.to(tl.int64) * stride_vh
    if HAS_WINDOW:
        lo = (tl.maximum(o_p - window + 1, 0) // window_align) * window_align

    acc = tl.zeros([BLOCK_R, HEAD_DIM], dtype=tl.float32)
    m_i = tl.full([BLOCK_R], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_R], dtype=tl.float32)
    j_lo = i_s * per_split
    j_hi = tl.minimum(j_lo + per_split, n_visit)
    for j in range(j_lo, j_hi):
        if HAS_IDS:
            i_k = tl.load(BLOCK_IDS + j)
        else:
            i_k = j
        o_s = i_k * BLOCK_N + o_n
        m_s = o_s < S
        b_k = tl.load(p_k + o_s[:, None] * stride_ks + o_d[None, :], mask=m_s[:, None], other=0.0)
        b_v = tl.load(p_v + o_s[:, None] * stride_vs + o_d[None, :], mask=m_s[:, None], other=0.0)
        b_qk = tl.dot(b_q, tl.trans(b_k), input_precision=DOT_PREC) * qk_scale  # [BR, D] @ [D, BN] -> [BR, BN]
        # Masking costs nothing here (the loop waits on memory), so every block applies the rules.
        m_vis = m_s[None, :] & (o_s[None, :] <= o_p[:, None])
        if HAS_WINDOW:
            m_vis = m_vis & ((o_s[None, :] < sink) | (o_s[None, :] >= lo[:, None]))
        b_qk = tl.where(m_vis, b_qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(b_qk, 1))
        alpha = tl.exp2(m_i - m_new)
        b_p = tl.exp2(b_qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(b_p, 1)
        acc = acc * alpha[:, None]
        acc = tl.dot(b_p.to(b_v.dtype), b_v, acc)  # [BR, BN] @ [BN, D] -> [BR, D]
        m_i = m_new

    # Normalised partial output and its log2-sum-exp (-inf for a split that saw no visible key).
    b_lse = tl.where(l_i > 0, m_i + tl.log2(tl.where(l_i > 0, l_i, 1.0)), float("-inf"))
    b_o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    o_part = (i_bkv.to(tl.int64) * n_split + i_s) * rows + o_r
    tl.store(O_PART + o_part[:, None] * HEAD_DIM + o_d[None, :], b_o, mask=m_r[:, None])
    tl.store(L_PART + o_part, b_lse, mask=m_r)


def decode_supports(q: torch.Tensor, k: torch.Tensor) -> bool:
    """Whether the decode kernel takes this call (else use the prefill kernel)."""
    return kernel_supports(q, k) and (q.shape[1] // k.shape[1]) * q.shape[2] <= MAX_ROWS \
        and q.shape[2] <= k.shape[2]


def flash_decode(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    block_ids: torch.Tensor | None = None,
    block_n: int = 64,
    window: int = 0,
    sink: int = 0,
    window_align: int = 1,
    scale: float | None = None,
    num_splits: int | None = None,
    num_warps: int | None = None,
    num_stages: int = 3,  # with one wave of splits, 3 beat 4 at 32k/128k x b=1/8 (experiments/attention, run 3)
    programs_per_sm: int = 2,
    out: torch.Tensor | None = None,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of the T newest queries (positions S - T .. S - 1) over k, v.

    q: [B, Hq, T, D]; k, v: [B, Hkv, S, D] (any strides with a contiguous last dim, e.g. a cache buffer's view);
    block_ids: ascending int32 ids of the `block_n`-key blocks to visit (None = all); window/sink/window_align:
    element rules; sinks: [Hq] logits, exp(sinks[h]) one more term of head h's softmax denominator (gpt-oss).
    num_splits defaults to one wave of `programs_per_sm` programs per SM. Returns [B, Hq, T, D] in q's dtype.
    """
    check_qkv(q, k, v)
    if not decode_supports(q, k):
        raise ValueError(f"the decode kernel takes head_dim in (16, 32, 64, 128), fp16/bf16/fp32 and "
                         f"GROUP * T <= {MAX_ROWS}; got q {tuple(q.shape)} {q.dtype}, k {tuple(k.shape)} {k.dtype}")
    b, hq, t, d = q.shape
    hkv, s = k.shape[1], k.shape[2]
    group = hq // hkv
    sinks = check_sinks(sinks, hq, q.device)
    q = q if q.stride(-1) == 1 else q.contiguous()
    k = k if k.stride(-1) == 1 else k.contiguous()
    v = v if v.stride(-1) == 1 else v.contiguous()
    if block_ids is not None:
        block_ids = block_ids.to(device=q.device, dtype=torch.int32).contiguous()
        n_visit = block_ids.numel()
    else:
        n_visit = cdiv(s, block_n)
    if n_visit == 0:
        raise ValueError("decode visits no KV block: the schedule is empty")
    if num_splits is None:
        # 2 programs an SM: 3 would fit at d=128 with 3 stages (71 KB of shared memory each), but measured slower
        num_splits = one_wave_splits(q.device, b * hkv, n_visit, per_sm=programs_per_sm)
    per_split = cdiv(n_visit, max(1, num_splits))
    n_split = cdiv(n_visit, per_split)
    rows = group * t
    if num_warps is None:  # 128 rows with 4 warps spill (sm_90, d=128); 8 warps take 197 registers
        num_warps = 8 if rows > 64 else 4
    o_part = torch.empty(b * hkv, n_split, rows, d, dtype=torch.float32, device=q.device)
    l_part = torch.empty(b * hkv, n_split, rows, dtype=torch.float32, device=q.device)
    if out is None:
        out = torch.empty_like(q)
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    _attn_decode_split_kernel[(n_split, b * hkv)](
        q, k, v, o_part, l_part, block_ids if block_ids is not None else l_part,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        hkv, t, s, window, sink, window_align, n_visit, per_split, scale * LOG2E,
        GROUP=group, HEAD_DIM=d, BLOCK_R=max(16, triton.next_power_of_2(rows)), BLOCK_N=block_n,
        HAS_IDS=block_ids is not None, HAS_WINDOW=window > 0,
        DOT_PREC=dot_precision(q.dtype), num_warps=num_warps, num_stages=num_stages,
    )
    merge_splits(o_part, l_part, out, kv_heads=hkv, group=group, t=t, n_split=n_split, sinks=sinks)
    return out


def decode_mask(
    q_len: int, kv_len: int, *, block_ids: torch.Tensor | None = None, block_n: int = 64, window: int = 0,
    sink: int = 0, window_align: int = 1, device=None,
) -> torch.Tensor:
    """Bool [T, S]: what `flash_decode` lets query t (position S - T + t) see."""
    p = torch.arange(kv_len - q_len, kv_len, device=device)[:, None]
    s = torch.arange(kv_len, device=device)[None, :]
    mask = s <= p
    if window > 0:
        mask &= (s < sink) | (s >= window_start(p, window, window_align))
    if block_ids is not None:
        blocks = torch.zeros(cdiv(kv_len, block_n), dtype=torch.bool, device=device)
        blocks[block_ids.long().to(device)] = True
        mask &= blocks[torch.div(s, block_n, rounding_mode="floor")]
    return mask


def decode_reference(q, k, v, *, compute_dtype: torch.dtype = torch.float32, sinks: torch.Tensor | None = None,
                     **rules) -> torch.Tensor:
    """`flash_decode` in PyTorch (same arguments as `decode_mask`'s rules, and `sinks`)."""
    from ollm_triton.kernels.attention_prefill import attention_reference

    mask = decode_mask(q.shape[2], k.shape[2], device=q.device, **rules)
    return attention_reference(q, k, v, mask, compute_dtype=compute_dtype, sinks=sinks)


__all__ = ["flash_decode", "decode_reference", "decode_mask", "decode_supports", "MAX_ROWS"]
