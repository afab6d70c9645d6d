"""Decode attention over a static KV buffer whose per-sequence lengths live in a device tensor, and its reference;
and the same kernel with a block of T new queries per sequence (speculative and tree verify).

    decode_varlen      q: [B, Hq, D] (one new token per sequence)   k_cache, v_cache: [B, Hkv, cap, D]   lengths: [B]
                       out[b] = softmax(q[b] k[b, :, lo:lengths[b]]^T / sqrt(D)) v[b, :, lo:lengths[b]]
                       lo = max(0, lengths[b] - window) with a sliding `window` (0: lo = 0); with `sinks` [Hq]
                       head h's softmax has one more term exp(sinks[h]) in its denominator (gpt-oss)
    verify_attention   q: [B, Hq, T, D], held: [B], block_mask: [T, T] bool; the block's own K/V at slots
                       held[b] .. held[b] + T - 1. New token t sees every held slot and new token j iff mask[t, j]
                       (chain: causal; tree: its ancestors); with `window` only the keys of positions
                       p - window < s <= p, p = held[b] + depth(t) its position (depth = mask row sum - 1: t for a
                       chain, the tree depth for a tree, so a tree path sees what it would decoded token by
                       token); `sinks` as above

`attention_decode.flash_decode` takes the key count as a host integer, so every step would change a launch
argument and a CUDA graph could not replay it. Here the lengths are read on the device: the launch depends only on
the buffer's capacity, one captured graph serves every step, and each sequence of a batch reads its own keys only
(no padding waste for sequences of different lengths). The split-K layout is the same as flash_decode's: the
GROUP query heads of one KV head (times the T new tokens of a verify block: rows g * T + t) share the K/V reads
(rows of the dot, padded to 16), the blocks of each sequence are cut into `n_split` contiguous ranges (fixed by the
capacity, sized at launch from the SM count; a split past the sequence's last block exits at once), each writes a
normalised partial and its log2-sum-exp, and a merge kernel combines them (decode_merge.py).

A sliding window is a launch constant of the layer (not of the step): the first key, max(0, length - window), is
computed on the device from the length, so one captured graph stays valid as the context grows, and the splits
share only the blocks from that key's block on (a 128-key window over 32k keys reads 2-3 blocks, not 512). Sinks
are one more term of each head's softmax denominator, added where the splits are merged.

A verify block reads held + T keys, not the whole buffer: the masked SDPA it replaces (the reference below) reads
every slot of the capacity, 1.21 GB of K/V a step at 8k held in a 9k buffer on Llama-3-8B shapes (32 layers x 8 KV
heads x 128) against 1.07 GB for the held tokens, and 4.3 GB in a 32k buffer whatever the context.
"""

# No `from __future__ import annotations`: torch.library.custom_op reads the annotations as types.
import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ollm_triton.kernels.attention_prefill import LOG2E
from ollm_triton.kernels.decode_merge import merge_splits, one_wave_splits

BLOCK_N = 64
MAX_ROWS = 128  # GROUP * T query rows a program (acc [128, 128] fp32 at 8 warps)
MAX_BLOCK_T = 32  # new tokens of a verify block: a row's mask is one int32 of bits in the kernel


@triton.jit
def _decode_varlen_split_kernel(
    Q, K, V, LENS, BLOCK_MASK, O_PART, L_PART,
    stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_ks, stride_vb, stride_vh, stride_vs, stride_mt,
    Hkv, qk_scale, WINDOW,
    GROUP: tl.constexpr, T: tl.constexpr, IN_BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """Split i_s of (sequence, KV head) i_bkv. Keys below LENS[b] are seen by every row; with IN_BLOCK the T keys
    after them are the block's own, key LENS[b] + j seen by new token t iff BLOCK_MASK[t, j]. WINDOW > 0: the row
    at position p sees keys of positions > p - WINDOW only (decode: p = LENS[b] - 1; verify: p = LENS[b] + depth
    of token t, a block key's position LENS[b] + its depth), and the blocks before the first seen key not read."""
    i_s = tl.program_id(0)
    i_bkv = tl.program_id(1)
    n_split = tl.num_programs(0)
    i_b = i_bkv // Hkv
    i_kvh = i_bkv % Hkv

    o_r = tl.arange(0, BLOCK_R)  # row r: query head i_kvh * GROUP + r // T, new token r % T
    m_r = o_r < GROUP * T
    o_t = o_r % T
    o_d = tl.arange(0, BLOCK_D)
    m_d = o_d < HEAD_DIM
    o_n = tl.arange(0, BLOCK_N)
    p_q = Q + i_b.to(tl.int64) * stride_qb + (i_kvh * GROUP + o_r // T)[:, None] * stride_qh \
        + o_t[:, None] * stride_qt + o_d[None, :]
    b_q = tl.load(p_q, mask=m_r[:, None] & m_d[None, :], other=0.0)
    p_k = K + i_b.to(tl.int64) * stride_kb + i_kvh.to(tl.int64) * stride_kh
    p_v = V + i_b.to(tl.int64) * stride_vb + i_kvh.to(tl.int64) * stride_vh

    # Row r's mask row as the bits of one int32 (bit j: sees new token j, so T <= 32), loaded once: gathering a
    # [rows, 64] tile of the mask in the tail tiles instead took 254 registers at 32 rows and spilled at 64 (sm_90
    # AOT, Triton 3.9); with the bits 132 at 32 rows and 217 at 64, no spills (the one-token decode path keeps its 78).
    kv_len = tl.load(LENS + i_b).to(tl.int32)
    if IN_BLOCK:
        o_bt = tl.arange(0, BLOCK_T)
        m_bt = o_bt < T
        b_row = tl.load(BLOCK_MASK + o_t[:, None] * stride_mt + o_bt[None, :], mask=m_r[:, None] & m_bt[None, :],
                        other=0)
        # A token's depth is its mask row's count less itself (chain: t; tree: ancestors), its position kv_len +
        # depth: what it would have had decoded token by token. The window drops the ancestors WINDOW or more
        # positions back from the row's bits, and the held keys below the row's own first key (b_lo).
        b_depth = tl.sum(b_row.to(tl.int32), 1) - 1  # [BR]
        b_mt = tl.load(BLOCK_MASK + o_bt[None, :] * stride_mt + o_bt[:, None], mask=m_bt[:, None] & m_bt[None, :],
                       other=0)  # [BT, BT]: element (c, j) = mask[j, c], so the column sums lie along the keys' axis
        b_key_depth = tl.sum(b_mt.to(tl.int32), 0) - 1  # [BT]: depth of new token j
        b_near = ((b_depth[:, None] - b_key_depth[None, :]) < WINDOW) | (WINDOW <= 0)  # [BR, BT]
        b_row = tl.where(b_near, b_row, 0)
        b_bits = tl.sum(b_row.to(tl.int32) << o_bt[None, :], 1)  # [BR]: distinct bits, the sum is their OR
        b_lo = tl.where(WINDOW > 0, tl.maximum(kv_len + b_depth + 1 - WINDOW, 0), 0)  # [BR]

    # This sequence's blocks (held keys, then the verify block's own), split evenly over the grid's first axis.
    n_keys = kv_len + T if IN_BLOCK else kv_len
    n_blocks = tl.cdiv(n_keys, BLOCK_N)
    # the first key any row sees (sliding window): decode's one row is at kv_len - 1, a block's first at kv_len
    key_lo = tl.where(WINDOW > 0, tl.maximum(kv_len - WINDOW + (1 if IN_BLOCK else 0), 0), 0)
    j_first = key_lo // BLOCK_N  # the splits share the blocks from the first seen key's on
    per_split = tl.cdiv(n_blocks - j_first, n_split)
    j_lo = j_first + i_s * per_split
    j_hi = tl.minimum(j_lo + per_split, n_blocks)

    acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
    m_i = tl.full([BLOCK_R], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_R], dtype=tl.float32)
    for j in range(j_lo, j_hi):
        o_s = j * BLOCK_N + o_n
        m_kv = (o_s < n_keys)[:, None] & m_d[None, :]
        b_k = tl.load(p_k + o_s[:, None].to(tl.int64) * stride_ks + o_d[None, :], mask=m_kv, other=0.0)
        b_v = tl.load(p_v + o_s[:, None].to(tl.int64) * stride_vs + o_d[None, :], mask=m_kv, other=0.0)
        b_s = tl.dot(b_q, tl.trans(b_k), input_precision=DOT_PREC) * qk_scale  # [BR, BD] @ [BD, BN] -> [BR, BN]
        if IN_BLOCK:
            b_qk = tl.where((o_s < kv_len)[None, :] & (o_s[None, :] >= b_lo[:, None]), b_s, float("-inf"))
        else:
            b_qk = tl.where(((o_s < kv_len) & (o_s >= key_lo))[None, :], b_s, float("-inf"))
        if IN_BLOCK:
            if j * BLOCK_N + BLOCK_N > kv_len:  # only the last one or two tiles reach the new tokens
                o_j = o_s - kv_len  # key s is new token o_j
                m_j = (o_j >= 0) & (o_j < T)
                b_see = ((b_bits[:, None] >> tl.where(m_j, o_j, 0)[None, :]) & 1) != 0
                b_qk = tl.where(m_j[None, :] & b_see, b_s, b_qk)
        m_new = tl.maximum(m_i, tl.max(b_qk, 1))
        alpha = tl.exp2(m_i - m_new)
        b_p = tl.exp2(b_qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(b_p, 1)
        acc = acc * alpha[:, None]
        acc = tl.dot(b_p.to(b_v.dtype), b_v, acc, input_precision=DOT_PREC)  # [BR, BN] @ [BN, BD] -> [BR, BD]
        m_i = m_new

    # A split past the sequence's last block saw nothing: lse -inf, output 0, weight 0 in the merge.
    b_lse = tl.where(l_i > 0, m_i + tl.log2(tl.where(l_i > 0, l_i, 1.0)), float("-inf"))
    b_o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    o_part = (i_bkv.to(tl.int64) * n_split + i_s) * (GROUP * T) + o_r
    tl.store(O_PART + o_part[:, None] * BLOCK_D + o_d[None, :], b_o, mask=m_r[:, None])
    tl.store(L_PART + o_part, b_lse, mask=m_r)


def num_splits_for(batch: int, kv_heads: int, capacity: int, device: torch.device) -> int:
    """Splits per (sequence, KV head): one wave of programs at full capacity, <= 64. A split may hold a single
    block: at short context (a 512-token prompt in a 1024-slot buffer) 4 blocks a split left 32 programs on 132
    SMs, each walking its blocks one after another (5.8 us a layer on the H200 against 3.9 us at one block a split,
    of ~0.7 us of K/V bytes; experiments/engine/README.md section 5)."""
    return min(one_wave_splits(device, batch * kv_heads, triton.cdiv(capacity, BLOCK_N), min_blocks=1), 64)


def check_varlen(q, k_cache, v_cache, lengths):
    if q.dim() != 3 or k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(f"decode_varlen takes q [B, Hq, D] and k_cache = v_cache [B, Hkv, cap, D]; got q "
                         f"{tuple(q.shape)}, k {tuple(k_cache.shape)}, v {tuple(v_cache.shape)}")
    b, hq, d = q.shape
    if k_cache.shape[0] != b or k_cache.shape[3] != d or hq % k_cache.shape[1]:
        raise ValueError(f"decode_varlen: q {tuple(q.shape)} does not fit the cache {tuple(k_cache.shape)} "
                         "(same B and D, Hq a multiple of Hkv)")
    if lengths.shape != (b,):
        raise ValueError(f"decode_varlen lengths must be [B] = [{b}], got {tuple(lengths.shape)}")


def kernel_supports(q: torch.Tensor, k_cache: torch.Tensor, t: int = 1) -> bool:
    """q: [B, Hq, D] or [B, Hq, T, D] with t = T: GROUP * T rows share one program's K/V reads."""
    group = q.shape[1] // k_cache.shape[1]
    return q.dtype in (torch.float32, torch.float16, torch.bfloat16) and q.dtype == k_cache.dtype \
        and group * t <= MAX_ROWS and t <= MAX_BLOCK_T and 16 <= q.shape[-1] <= 256


def _split_attention(q, k_cache, v_cache, lengths, out, *, t, stride_qt, stride_ot, block_mask, scale, num_splits,
                     window: int = 0, sinks: torch.Tensor | None = None):
    """Launch the split kernel and the merge: q and out [B, Hq, (T,) D] with token strides stride_qt, stride_ot
    (0 for one token), block_mask None (decode: lengths[b] keys) or [T, T] (verify: lengths[b] held keys + T);
    window and sinks [Hq] as in `decode_varlen` / `verify_attention`."""
    b, hq, d = q.shape[0], q.shape[1], q.shape[-1]
    hkv, cap = k_cache.shape[1], k_cache.shape[2]
    group = hq // hkv
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("decode_varlen needs cache buffers with a contiguous last dim")
    n_split = num_splits or num_splits_for(b, hkv, cap, q.device)
    block_d = max(16, triton.next_power_of_2(d))
    block_r = max(16, triton.next_power_of_2(group * t))
    o_part = torch.empty(b * hkv, n_split, group * t, block_d, dtype=torch.float32, device=q.device)
    l_part = torch.empty(b * hkv, n_split, group * t, dtype=torch.float32, device=q.device)
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    in_block = block_mask is not None
    _decode_varlen_split_kernel[(n_split, b * hkv)](
        # the mask as bytes: a bool tensor's pointer would be Triton's *i1
        q, k_cache, v_cache, lengths, block_mask.view(torch.uint8) if in_block else lengths, o_part, l_part,
        q.stride(0), q.stride(1), stride_qt, k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), block_mask.stride(0) if in_block else 0,
        hkv, scale * LOG2E, window,
        GROUP=group, T=t, IN_BLOCK=in_block, HEAD_DIM=d, BLOCK_D=block_d, BLOCK_R=block_r, BLOCK_N=BLOCK_N,
        BLOCK_T=max(2, triton.next_power_of_2(t)),
        DOT_PREC="ieee" if q.dtype == torch.float32 else "tf32", num_warps=4 if block_r <= 64 else 8, num_stages=3,
    )
    merge_splits(o_part, l_part, out, kv_heads=hkv, group=group, t=t, n_split=n_split, stride_ot=stride_ot,
                 sinks=sinks)
    return out


def decode_varlen_kernel(q, k_cache, v_cache, lengths, *, scale=None, num_splits=None, out=None, window: int = 0,
                         sinks: torch.Tensor | None = None):
    """The Triton path of `decode_varlen` (the interpreter on the CPU)."""
    q = q if q.stride(-1) == 1 else q.contiguous()
    out = torch.empty_like(q, memory_format=torch.contiguous_format) if out is None else out
    # one new token per sequence: T = 1, no token stride
    return _split_attention(q, k_cache, v_cache, lengths, out, t=1, stride_qt=0, stride_ot=0, block_mask=None,
                            scale=scale, num_splits=num_splits, window=window, sinks=sinks)


def decode_varlen_reference(q, k_cache, v_cache, lengths, *, compute_dtype: torch.dtype = torch.float32,
                            window: int = 0, sinks: torch.Tensor | None = None):
    """Softmax attention over each sequence's keys [max(0, lengths[b] - window), lengths[b]) (window 0: from 0),
    with sinks [Hq] as one more softmax column dropped before the values, over the whole buffer with a mask (static
    shapes: no host sync, so it is graph-capturable too). Keys outside must be finite (0 * inf is NaN): the fast
    decode path zero-fills its buffers once."""
    b, hq, d = q.shape
    hkv, cap = k_cache.shape[1], k_cache.shape[2]
    g = hq // hkv
    qg = q.reshape(b, hkv, g, d).to(compute_dtype)  # the GROUP heads of a KV head share its keys
    scores = qg @ k_cache.to(compute_dtype).transpose(-1, -2) / math.sqrt(d)  # [B, Hkv, G, cap]
    slot, lengths = torch.arange(cap, device=q.device)[None, :], lengths.to(q.device)[:, None]
    visible = slot < lengths  # [B, cap]
    if window:
        visible = visible & (slot >= lengths - window)
    scores = scores.masked_fill(~visible[:, None, None, :], float("-inf"))
    if sinks is not None:  # [B, Hkv, G, cap + 1]: the sink's column takes its share of the softmax, then is dropped
        sink = sinks.to(compute_dtype).view(1, hkv, g, 1).expand(b, hkv, g, 1)
        probs = torch.softmax(torch.cat((scores, sink), dim=-1), dim=-1)[..., :-1]
    else:
        probs = torch.softmax(scores, dim=-1)
    out = probs @ v_cache.to(compute_dtype)
    out = out.reshape(b, hq, d)
    return out if compute_dtype == torch.float64 else out.to(q.dtype)


def decode_varlen(q, k_cache, v_cache, lengths, *, use_kernel: bool | None = None, window: int = 0,
                  sinks: torch.Tensor | None = None):
    """Attention of one new query per sequence over its first lengths[b] cached keys, or its last `window` of them.

    q: [B, Hq, D]; k_cache, v_cache: [B, Hkv, cap, D]; lengths: [B] int on q's device (1 <= lengths[b] <= cap);
    window: keys seen back from the newest (0: all; a per-layer constant, lengths may change between calls);
    sinks: [Hq] logits on q's device, exp(sinks[h]) added to head h's softmax denominator (None: none).
    Returns [B, Hq, D] in q's dtype. use_kernel: None = Triton on CUDA, the reference elsewhere.
    """
    check_varlen(q, k_cache, v_cache, lengths)
    if window < 0:
        raise ValueError(f"decode_varlen window must be >= 0 keys (0: no window), got {window}")
    if sinks is not None and sinks.shape != (q.shape[1],):
        raise ValueError(f"decode_varlen sinks must be [Hq] = [{q.shape[1]}] logits, got {tuple(sinks.shape)}")
    if (q.is_cuda if use_kernel is None else use_kernel) and kernel_supports(q, k_cache):
        return decode_varlen_kernel(q, k_cache, v_cache, lengths, window=window, sinks=sinks)
    return decode_varlen_reference(q, k_cache, v_cache, lengths, window=window, sinks=sinks)


# ---- T new tokens per sequence: the verify block -----------------------------------------------------------------


def check_verify(q, k_cache, v_cache, held, block_mask, window: int = 0, sinks: torch.Tensor | None = None):
    if q.dim() != 4 or k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(f"verify_attention takes q [B, Hq, T, D] and k_cache = v_cache [B, Hkv, cap, D]; got q "
                         f"{tuple(q.shape)}, k {tuple(k_cache.shape)}, v {tuple(v_cache.shape)}")
    b, hq, t, d = q.shape
    if k_cache.shape[0] != b or k_cache.shape[3] != d or hq % k_cache.shape[1] or t > k_cache.shape[2]:
        raise ValueError(f"verify_attention: q {tuple(q.shape)} does not fit the cache {tuple(k_cache.shape)} "
                         "(same B and D, Hq a multiple of Hkv, T <= cap)")
    if held.shape != (b,):
        raise ValueError(f"verify_attention held must be [B] = [{b}], got {tuple(held.shape)}")
    if block_mask.shape != (t, t) or block_mask.dtype != torch.bool:
        raise ValueError(f"verify_attention block_mask must be bool [T, T] = [{t}, {t}], got {block_mask.dtype} "
                         f"{tuple(block_mask.shape)}")
    if window < 0:
        raise ValueError(f"verify_attention window must be >= 0 keys (0: no window), got {window}")
    if sinks is not None and sinks.shape != (hq,):
        raise ValueError(f"verify_attention sinks must be [Hq] = [{hq}] logits, got {tuple(sinks.shape)}")


def verify_attention_kernel(q, k_cache, v_cache, held, block_mask, *, scale=None, num_splits=None, out=None,
                            window: int = 0, sinks: torch.Tensor | None = None):
    """The Triton path of `verify_attention` (the interpreter on the CPU): the decode kernel with GROUP * T rows a
    program; it reads held[b] + T keys of each sequence (from the window's first block on), the launch depends on
    the capacity only."""
    q = q if q.stride(-1) == 1 else q.contiguous()
    block_mask = block_mask if block_mask.stride(-1) == 1 else block_mask.contiguous()
    out = torch.empty_like(q, memory_format=torch.contiguous_format) if out is None else out
    return _split_attention(q, k_cache, v_cache, held, out, t=q.shape[2], stride_qt=q.stride(2), stride_ot=None,
                            block_mask=block_mask, scale=scale, num_splits=num_splits, window=window, sinks=sinks)


def block_visibility(held, block_mask, capacity: int, group: int, window: int = 0) -> torch.Tensor:
    """[B, 1, G*T, capacity] bool: row g*T + t (query head g of a KV head, new token t) sees slot s iff
    s < held[b] or (s = held[b] + j and block_mask[t, j]); with `window`, only where the slot's position is above
    that of token t less `window` (a held slot's position is s, new token j's held[b] + depth(j), depth = mask row
    sum - 1). Device ops only (capturable)."""
    t = block_mask.shape[0]
    rel = torch.arange(capacity, device=held.device)[None, :] - held[:, None]  # [B, S]: slot s is new token rel
    in_block = (rel >= 0) & (rel < t)
    sees = block_mask[:, rel.clamp(0, t - 1)].transpose(0, 1)  # [B, T, S]: block_mask[t, rel]
    visible = (rel < 0)[:, None, :] | (in_block[:, None, :] & sees)  # [B, T, S]
    if window:
        depth = block_mask.sum(1) - 1  # [T]
        slot = torch.arange(capacity, device=held.device)[None, :]
        key_pos = torch.where(in_block, held[:, None] + depth[rel.clamp(0, t - 1)], slot)  # [B, S]
        query_pos = held[:, None] + depth[None, :]  # [B, T]
        visible = visible & (key_pos[:, None, :] > query_pos[:, :, None] - window)
    return visible[:, None].repeat(1, 1, group, 1)


def verify_attention_reference(q, k_cache, v_cache, held, block_mask, *, visible=None,
                               compute_dtype: torch.dtype | None = None, window: int = 0,
                               sinks: torch.Tensor | None = None):
    """torch SDPA over the whole buffer under `block_visibility` (the G query heads of a KV head stacked along the
    query axis: no K/V expansion); it reads all `capacity` slots whatever the length. `visible`: that mask (for
    this `window`) when the caller keeps it for several layers of a step. compute_dtype None: q's dtype (the
    uncaptured/CPU path). With `sinks` SDPA has no column for them: the scores are computed here, the sink's
    column joins the softmax in float32 (at least) and is dropped before the values, as decode_varlen_reference."""
    b, hq, t, d = q.shape
    hkv = k_cache.shape[1]
    if visible is None:
        visible = block_visibility(held, block_mask, k_cache.shape[2], hq // hkv, window)
    dt = compute_dtype or q.dtype
    qg, k, v = q.reshape(b, hkv, hq // hkv * t, d).to(dt), k_cache.to(dt), v_cache.to(dt)  # rows g * T + t
    if sinks is None:
        out = F.scaled_dot_product_attention(qg, k, v, attn_mask=visible)  # [B, Hkv, G*T, D]
    else:
        st = torch.promote_types(dt, torch.float32)
        scores = (qg @ k.transpose(-1, -2)).to(st) / math.sqrt(d)  # [B, Hkv, G*T, S]
        scores = scores.masked_fill(~visible, float("-inf"))
        sink = sinks.to(st).view(1, hkv, hq // hkv, 1, 1).expand(b, hkv, hq // hkv, t, 1).reshape(b, hkv, -1, 1)
        probs = torch.softmax(torch.cat((scores, sink), dim=-1), dim=-1)[..., :-1]
        out = probs.to(dt) @ v
    return out.reshape(b, hq, t, d)


def verify_attention(q, k_cache, v_cache, held, block_mask, *, use_kernel: bool | None = None, window: int = 0,
                     sinks: torch.Tensor | None = None):
    """Attention of T new tokens per sequence, each over the held keys and the new tokens its mask allows.

    q: [B, Hq, T, D] (after RoPE); k_cache, v_cache: [B, Hkv, cap, D] with the T new tokens' K/V already at slots
    held[b] .. held[b] + T - 1; held: [B] int on q's device (held[b] + T <= cap); block_mask: [T, T] bool on q's
    device, new token t sees new token j iff block_mask[t, j] (causal for a chain, ancestors-or-self for a tree);
    window: the model's sliding window (0: none): token t at position p = held[b] + depth(t) (depth: its mask
    row's count - 1) sees only keys of positions p - window < s <= p, a new token j's position held[b] + depth(j);
    sinks: [Hq] logits on q's device, exp(sinks[h]) added to head h's softmax denominator (None: none).
    Returns [B, Hq, T, D] in q's dtype. use_kernel: None = Triton on CUDA, the reference elsewhere.
    """
    check_verify(q, k_cache, v_cache, held, block_mask, window, sinks)
    if (q.is_cuda if use_kernel is None else use_kernel) and kernel_supports(q, k_cache, q.shape[2]):
        return verify_attention_kernel(q, k_cache, v_cache, held, block_mask, window=window, sinks=sinks)
    return verify_attention_reference(q, k_cache, v_cache, held, block_mask, window=window, sinks=sinks)


@torch.library.custom_op("ollm_triton::decode_varlen", mutates_args=())
def decode_varlen_op(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, lengths: torch.Tensor
) -> torch.Tensor:
    """`decode_varlen` as a custom op."""
    return decode_varlen(q, k_cache, v_cache, lengths)


@decode_varlen_op.register_fake
def _(q, k_cache, v_cache, lengths):
    return torch.empty_like(q)


__all__ = ["decode_varlen", "decode_varlen_kernel", "decode_varlen_reference", "decode_varlen_op", "num_splits_for",
           "verify_attention", "verify_attention_kernel", "verify_attention_reference", "block_visibility",
           "kernel_supports"]
