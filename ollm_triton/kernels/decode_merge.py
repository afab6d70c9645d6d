"""The flash-decoding merge of split partials, and how many splits a decode launch uses.

Split-K decode cuts the keys of one (batch, KV head) into `n_split` ranges, one program each. Every program stores
its normalised partial output (fp32 rows of BLOCK_D, laid out [batch * Hkv, n_split, rows, BLOCK_D]) and its
log2-sum-exp ([batch * Hkv, n_split, rows]); `merge_splits` then launches one small program per output row:

    out = sum_s w_s o_s / (sum_s w_s + w_sink),   w_s = 2^(lse_s - m),   m = max(max_s lse_s, sink_h log2(e))

With per-head sink logits (gpt-oss), w_sink = 2^(sink_h log2(e) - m) is one more term of the denominator and
nothing of the numerator: a split with no values and lse = sink_h log2(e), which the merge starts from (without
sinks it starts from lse = -inf, weight 0). That is softmax over [scores, sink] with the sink's column dropped.

Used by the dense (attention_decode), static-buffer (attention_decode_varlen) and quantized (kv_quant_decode)
decode kernels.

Tried and measured slower: merging inside the split kernel, by the last program of each head to take a ticket from
an atomic counter. On the H200 at 32k keys, b = 1 (33 splits, CUDA-graph replays) that took 42.2 us against 37.6 us
for split kernel + this merge kernel (experiments/attention/README.md, run 3): the lone merging program waits on
its loads at the very end of the kernel, while this kernel spreads the merge over 32 programs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_MERGE_CHUNK = 64  # splits loaded at once: a [64, BLOCK_D] fp32 tile stays in registers at d = 128


def num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 2  # the interpreter: a few splits, so the merge still has work


def one_wave_splits(device: torch.device, heads: int, n_blocks: int, *, per_sm: int = 2, min_blocks: int = 4) -> int:
    """Splits per (batch, KV head) so that heads * splits programs fill each SM `per_sm` times, once: programs of
    equal length then finish together, with no second, partial wave. Each split keeps >= min_blocks blocks (the
    load pipeline needs something to overlap). On the H200 at 32k keys, b = 1: one wave (33 splits) 38.1 us against
    42.1 us for 64 splits, a second wave 94% full (experiments/attention/README.md, run 3)."""
    return max(1, min((per_sm * num_sms(device)) // max(heads, 1), n_blocks // min_blocks))


@triton.jit(do_not_specialize=["T", "n_split"])
def _merge_splits_kernel(
    O_PART, L_PART, O, SINKS, stride_ob, stride_oh, stride_ot, Hkv, T, n_split,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_SPLIT: tl.constexpr,
    CHUNK_D: tl.constexpr, HAS_SINKS: tl.constexpr,
):
    """Program (i, j): channels [j CHUNK_D, (j + 1) CHUNK_D) of output row r = i % (GROUP * T) of (batch, KV head)
    i // (GROUP * T) -- query head kv_head * GROUP + r // T, new token r % T. HAS_SINKS: SINKS [Hq] natural-log
    logits, one more denominator term per head."""
    i = tl.program_id(0)
    rows = GROUP * T
    i_bkv = i // rows
    i_r = i % rows
    i_h = (i_bkv % Hkv) * GROUP + i_r // T
    o_sp = tl.arange(0, BLOCK_SPLIT)
    o_d = tl.program_id(1) * CHUNK_D + tl.arange(0, CHUNK_D)
    if HAS_SINKS:  # the sink as a split of weight 2^(sink log2 e) and no values: the running max starts there
        b_max = tl.load(SINKS + i_h + tl.zeros([1], tl.int32)).to(tl.float32) * 1.4426950408889634
        b_sum = tl.full([1], 1.0, tl.float32)
    else:
        b_max = tl.full([1], float("-inf"), tl.float32)
        b_sum = tl.zeros([1], tl.float32)
    b_acc = tl.zeros([CHUNK_D], tl.float32)
    for s0 in range(0, n_split, BLOCK_SPLIT):  # one step unless there are more than MAX_MERGE_CHUNK splits
        m_sp = s0 + o_sp < n_split
        o_part = (i_bkv.to(tl.int64) * n_split + s0 + o_sp) * rows + i_r
        b_lse = tl.load(L_PART + o_part, mask=m_sp, other=float("-inf"))
        b_o = tl.load(O_PART + o_part[:, None] * BLOCK_D + o_d[None, :], mask=m_sp[:, None], other=0.0)
        b_new = tl.maximum(b_max, tl.max(b_lse, 0))
        b_ref = tl.where(b_new == float("-inf"), 0.0, b_new)  # nothing seen yet: weights stay 0
        b_alpha = tl.exp2(b_max - b_ref)
        b_w = tl.exp2(b_lse - b_ref)  # [BLOCK_SPLIT]
        b_sum = b_sum * b_alpha + tl.sum(b_w, 0)
        b_acc = b_acc * b_alpha + tl.sum(b_o * b_w[:, None], 0)
        b_max = b_new
    b_out = b_acc / tl.where(b_sum > 0, b_sum, 1.0)
    p_o = O + (i_bkv // Hkv).to(tl.int64) * stride_ob + i_h.to(tl.int64) * stride_oh + (i_r % T) * stride_ot
    tl.store(p_o + o_d, b_out.to(O.dtype.element_ty), mask=o_d < HEAD_DIM)


def merge_splits(o_part: torch.Tensor, l_part: torch.Tensor, out: torch.Tensor, *, kv_heads: int, group: int,
                 t: int, n_split: int, stride_ot: int | None = None, sinks: torch.Tensor | None = None) -> torch.Tensor:
    """Merge partials o_part [B*Hkv, n_split, group*t, BLOCK_D] / l_part [B*Hkv, n_split, group*t] into out
    [B, Hq, T, D] (or [B, Hq, D] with stride_ot=0: one new token per sequence); sinks: None or [Hq] logits (each
    head's softmax gains the term exp(sinks[h]) in its denominator). Returns out.
    Above MAX_MERGE_CHUNK splits each row's channels are spread over programs of 32: the one-warp MMA quant decode
    leaves ~180 splits a head at 128k keys, and one program a row took 6.8 us to merge them (ncu, H200)."""
    block_d = o_part.shape[-1]
    chunk_d = block_d if n_split <= MAX_MERGE_CHUNK else min(block_d, 32)
    if sinks is not None and (sinks.shape != (kv_heads * group,) or sinks.stride(0) != 1):
        raise ValueError(f"merge_splits sinks must be a contiguous [Hq] = [{kv_heads * group}], got "
                         f"{tuple(sinks.shape)}")
    _merge_splits_kernel[(l_part.numel() // n_split, block_d // chunk_d)](
        o_part, l_part, out, l_part if sinks is None else sinks,  # no sinks: any pointer, HAS_SINKS off
        out.stride(0), out.stride(1), out.stride(2) if stride_ot is None else stride_ot,
        kv_heads, t, n_split, GROUP=group, HEAD_DIM=out.shape[-1], BLOCK_D=block_d,
        BLOCK_SPLIT=max(2, min(MAX_MERGE_CHUNK * block_d // chunk_d, triton.next_power_of_2(n_split))),
        CHUNK_D=chunk_d, HAS_SINKS=sinks is not None, num_warps=4,
    )
    return out


__all__ = ["merge_splits", "one_wave_splits", "num_sms", "MAX_MERGE_CHUNK"]
