"""Decode attention over a static KV buffer whose per-sequence lengths live in a device tensor, and its reference.

    q: [B, Hq, D] (one new token per sequence)   k_cache, v_cache: [B, Hkv, cap, D]   lengths: [B] int
    out[b] = softmax(q[b] k[b, :, :lengths[b]]^T / sqrt(D)) v[b, :, :lengths[b]]

`attention_decode.flash_decode` takes the key count as a host integer, so every step would change a launch
argument and a CUDA graph could not replay it. Here the lengths are read on the device: the launch depends only on
the buffer's capacity, one captured graph serves every step, and each sequence of a batch reads its own keys only
(no padding waste for sequences of different lengths). The split-K layout is the same as flash_decode's: GROUP
query heads of one KV head share the K/V reads (rows of the dot, padded to 16), the blocks of each sequence are
cut into `n_split` contiguous ranges (fixed by the capacity, sized at launch from the SM count), each writes a
normalised partial and its log2-sum-exp, and a merge kernel combines them (decode_merge.py).
"""

# No `from __future__ import annotations`: torch.library.custom_op reads the annotations as types.
import math

import torch
import triton
import triton.language as tl

from ollm_triton.kernels.attention_prefill import LOG2E
from ollm_triton.kernels.decode_merge import merge_splits, one_wave_splits

BLOCK_N = 64
MAX_GROUP = 128


@triton.jit
def _decode_varlen_split_kernel(
    Q, K, V, LENS, O_PART, L_PART,
    stride_qb, stride_qh, stride_kb, stride_kh, stride_ks, stride_vb, stride_vh, stride_vs,
    Hkv, qk_scale,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr,
):
    i_s = tl.program_id(0)
    i_bkv = tl.program_id(1)
    n_split = tl.num_programs(0)
    i_b = i_bkv // Hkv
    i_kvh = i_bkv % Hkv

    o_r = tl.arange(0, BLOCK_R)  # row r: query head i_kvh * GROUP + r
    m_r = o_r < GROUP
    o_d = tl.arange(0, BLOCK_D)
    m_d = o_d < HEAD_DIM
    o_n = tl.arange(0, BLOCK_N)
    p_q = Q + i_b.to(tl.int64) * stride_qb + (i_kvh * GROUP + o_r)[:, None] * stride_qh + o_d[None, :]
    b_q = tl.load(p_q, mask=m_r[:, None] & m_d[None, :], other=0.0)
    p_k = K + i_b.to(tl.int64) * stride_kb + i_kvh.to(tl.int64) * stride_kh
    p_v = V + i_b.to(tl.int64) * stride_vb + i_kvh.to(tl.int64) * stride_vh

    # This sequence's blocks, split evenly over the programs of the grid's first axis.
    kv_len = tl.load(LENS + i_b).to(tl.int32)
    n_blocks = tl.cdiv(kv_len, BLOCK_N)
    per_split = tl.cdiv(n_blocks, n_split)
    j_lo = i_s * per_split
    j_hi = tl.minimum(j_lo + per_split, n_blocks)

    acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
    m_i = tl.full([BLOCK_R], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_R], dtype=tl.float32)
    for j in range(j_lo, j_hi):
        o_s = j * BLOCK_N + o_n
        m_s = o_s < kv_len
        m_kv = m_s[:, None] & m_d[None, :]
        b_k = tl.load(p_k + o_s[:, None].to(tl.int64) * stride_ks + o_d[None, :], mask=m_kv, other=0.0)
        b_v = tl.load(p_v + o_s[:, None].to(tl.int64) * stride_vs + o_d[None, :], mask=m_kv, other=0.0)
        b_qk = tl.dot(b_q, tl.trans(b_k), input_precision=DOT_PREC) * qk_scale  # [BR, BD] @ [BD, BN] -> [BR, BN]
        b_qk = tl.where(m_s[None, :], b_qk, float("-inf"))
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
    o_part = (i_bkv.to(tl.int64) * n_split + i_s) * GROUP + o_r
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


def kernel_supports(q: torch.Tensor, k_cache: torch.Tensor) -> bool:
    group = q.shape[1] // k_cache.shape[1]
    return q.dtype in (torch.float32, torch.float16, torch.bfloat16) and q.dtype == k_cache.dtype \
        and group <= MAX_GROUP and 16 <= q.shape[2] <= 256


def decode_varlen_kernel(q, k_cache, v_cache, lengths, *, scale=None, num_splits=None, out=None):
    """The Triton path of `decode_varlen` (the interpreter on the CPU)."""
    b, hq, d = q.shape
    hkv, cap = k_cache.shape[1], k_cache.shape[2]
    group = hq // hkv
    q = q if q.stride(-1) == 1 else q.contiguous()
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("decode_varlen needs cache buffers with a contiguous last dim")
    n_split = num_splits or num_splits_for(b, hkv, cap, q.device)
    block_d = max(16, triton.next_power_of_2(d))
    o_part = torch.empty(b * hkv, n_split, group, block_d, dtype=torch.float32, device=q.device)
    l_part = torch.empty(b * hkv, n_split, group, dtype=torch.float32, device=q.device)
    out = torch.empty(b, hq, d, dtype=q.dtype, device=q.device) if out is None else out
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    _decode_varlen_split_kernel[(n_split, b * hkv)](
        q, k_cache, v_cache, lengths, o_part, l_part,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), hkv, scale * LOG2E,
        GROUP=group, HEAD_DIM=d, BLOCK_D=block_d, BLOCK_R=max(16, triton.next_power_of_2(group)), BLOCK_N=BLOCK_N,
        DOT_PREC="ieee" if q.dtype == torch.float32 else "tf32", num_warps=4, num_stages=3,
    )
    # one new token per sequence: T = 1, no token stride
    merge_splits(o_part, l_part, out, kv_heads=hkv, group=group, t=1, n_split=n_split, stride_ot=0)
    return out


def decode_varlen_reference(q, k_cache, v_cache, lengths, *, compute_dtype: torch.dtype = torch.float32):
    """Softmax attention over each sequence's first lengths[b] keys, over the whole buffer with a mask (static
    shapes: no host sync, so it is graph-capturable too). Keys past a length must be finite (0 * inf is NaN):
    the fast decode path zero-fills its buffers once."""
    b, hq, d = q.shape
    hkv, cap = k_cache.shape[1], k_cache.shape[2]
    qg = q.reshape(b, hkv, hq // hkv, d).to(compute_dtype)  # the GROUP heads of a KV head share its keys
    scores = qg @ k_cache.to(compute_dtype).transpose(-1, -2) / math.sqrt(d)  # [B, Hkv, G, cap]
    visible = torch.arange(cap, device=q.device)[None, :] < lengths.to(q.device)[:, None]  # [B, cap]
    scores = scores.masked_fill(~visible[:, None, None, :], float("-inf"))
    out = torch.softmax(scores, dim=-1) @ v_cache.to(compute_dtype)
    out = out.reshape(b, hq, d)
    return out if compute_dtype == torch.float64 else out.to(q.dtype)


def decode_varlen(q, k_cache, v_cache, lengths, *, use_kernel: bool | None = None):
    """Attention of one new query per sequence over its first lengths[b] cached keys.

    q: [B, Hq, D]; k_cache, v_cache: [B, Hkv, cap, D]; lengths: [B] int on q's device (1 <= lengths[b] <= cap).
    Returns [B, Hq, D] in q's dtype. use_kernel: None = Triton on CUDA, the reference elsewhere.
    """
    check_varlen(q, k_cache, v_cache, lengths)
    if (q.is_cuda if use_kernel is None else use_kernel) and kernel_supports(q, k_cache):
        return decode_varlen_kernel(q, k_cache, v_cache, lengths)
    return decode_varlen_reference(q, k_cache, v_cache, lengths)


@torch.library.custom_op("ollm_triton::decode_varlen", mutates_args=())
def decode_varlen_op(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, lengths: torch.Tensor
) -> torch.Tensor:
    """`decode_varlen` as a custom op."""
    return decode_varlen(q, k_cache, v_cache, lengths)


@decode_varlen_op.register_fake
def _(q, k_cache, v_cache, lengths):
    return torch.empty_like(q)


__all__ = ["decode_varlen", "decode_varlen_kernel", "decode_varlen_reference", "decode_varlen_op", "num_splits_for"]
