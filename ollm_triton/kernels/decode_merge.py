"""The flash-decoding merge, done by the last split program to finish instead of by a second kernel.

Split-K decode cuts the keys of one (batch, KV head) into `n_split` ranges, one program each. Every program
stores its normalised partial output (fp32 rows of BLOCK_D, laid out [batch * Hkv, n_split, rows, BLOCK_D]) and
its log2-sum-exp ([batch * Hkv, n_split, rows]), then takes a ticket from a per-(batch, KV head) counter. The
program that draws the last ticket has, through the counter's acquire, every other split's partial in view: it
merges them into the output and resets the counter to 0 for the next launch.

Why not a second kernel: on the H200 the merge kernel and the gap before it cost ~3-4 us per call against a
38 us split kernel at 32k keys (ncu, experiments/attention/README.md), and an 8B model decodes 32 layers a token.

Memory ordering (PTX model): the split's threads store their partial, `debug_barrier` (bar.sync) orders those
stores before the ticket, and the ticket is an acq_rel atomic at GPU scope, so it releases them. The last
program's atomic acquires every earlier release; its loads bypass L1 (`.cg`), because L1 is not coherent and
another program on the same SM may have cached a neighbouring partial line before it was written.

The counters live in one zeroed int32 buffer per device (`tickets`), reused by every launch, and every launch
leaves it zeroed again. So two decode launches must not run at the same time on one device (two streams); the
engine decodes on one stream.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_TICKETS: dict[torch.device, torch.Tensor] = {}
MIN_TICKETS = 4096  # (batch, KV head) pairs served before the buffer has to grow


def tickets(device: torch.device, n: int) -> torch.Tensor:
    """The zeroed per-device counter buffer, at least n long. Allocate it before a CUDA graph capture (a first
    call does) so the capture does not record its memset."""
    buf = _TICKETS.get(device)
    if buf is None or buf.numel() < n:
        buf = torch.zeros(max(n, MIN_TICKETS), dtype=torch.int32, device=device)
        _TICKETS[device] = buf
    return buf


MERGE_TILE = 8192  # fp32 elements of partial output the merging program loads at once (64 registers a thread)


def merge_shape(rows: int, block_d: int, n_split: int) -> tuple[int, int]:
    """(MERGE_ROWS, BLOCK_SPLIT) for `merge_splits_if_last`: every row at once (a power of two >= rows), and as
    many splits per step as keep the [BLOCK_SPLIT, MERGE_ROWS, BLOCK_D] tile at MERGE_TILE elements."""
    merge_rows = triton.next_power_of_2(rows)
    chunk = max(1, MERGE_TILE // (merge_rows * block_d))  # all powers of two
    return merge_rows, min(triton.next_power_of_2(n_split), chunk)


def num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 2  # the interpreter: a few splits, so the merge still has work


def one_wave_splits(device: torch.device, heads: int, n_blocks: int, *, per_sm: int = 2, min_blocks: int = 4) -> int:
    """Splits per (batch, KV head) so that heads * splits programs fill each SM `per_sm` times, once: programs of
    equal length then finish together, with no second, partial wave. Each split keeps >= min_blocks blocks (the
    load pipeline needs something to overlap). On the H200 at 32k keys, b = 1: 33 splits (one wave) 37.6 us,
    64 splits 42.1 us, 132 splits 40.1 us (experiments/attention/README.md)."""
    return max(1, min((per_sm * num_sms(device)) // max(heads, 1), n_blocks // min_blocks))


@triton.jit
def merge_splits_if_last(
    O_PART, L_PART, O, TICKETS, i_bkv, n_split, Hkv, T, stride_ob, stride_oh, stride_ot,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, MERGE_ROWS: tl.constexpr,
    BLOCK_SPLIT: tl.constexpr,
):
    """Take this split's ticket; the last split of (batch, KV head) i_bkv writes out = sum_s w_s o_s / sum_s w_s,
    w_s = 2^lse_s, for its GROUP * T rows (row r: query head kv_head * GROUP + r // T, new token r % T).
    All rows are merged together, BLOCK_SPLIT splits a step: each step is one round of loads from L2, which is
    what the lone merging program waits on (a loop over rows was ~4 us slower at 32k keys on the H200)."""
    tl.debug_barrier()  # every thread's partial stores come before the ticket, which releases them
    ticket = tl.atomic_add(TICKETS + i_bkv, 1, sem="acq_rel", scope="gpu")
    if ticket == n_split - 1:
        rows = GROUP * T
        o_r = tl.arange(0, MERGE_ROWS)
        m_r = o_r < rows
        o_sp = tl.arange(0, BLOCK_SPLIT)
        o_d = tl.arange(0, BLOCK_D)
        b_max = tl.full([MERGE_ROWS], float("-inf"), tl.float32)
        b_sum = tl.zeros([MERGE_ROWS], tl.float32)
        b_acc = tl.zeros([MERGE_ROWS, BLOCK_D], tl.float32)
        for s0 in range(0, n_split, BLOCK_SPLIT):
            m_s = (s0 + o_sp < n_split)[:, None] & m_r[None, :]  # [S, R]
            o_part = (i_bkv.to(tl.int64) * n_split + s0 + o_sp)[:, None] * rows + o_r[None, :]
            b_lse = tl.load(L_PART + o_part, mask=m_s, other=float("-inf"), cache_modifier=".cg")
            b_o = tl.load(O_PART + o_part[:, :, None] * BLOCK_D + o_d[None, None, :], mask=m_s[:, :, None],
                          other=0.0, cache_modifier=".cg")  # [S, R, D]
            b_new = tl.maximum(b_max, tl.max(b_lse, 0))
            b_ref = tl.where(b_new == float("-inf"), 0.0, b_new)  # nothing seen yet: weights stay 0
            b_alpha = tl.exp2(b_max - b_ref)
            b_w = tl.exp2(b_lse - b_ref[None, :])  # [S, R]
            b_sum = b_sum * b_alpha + tl.sum(b_w, 0)
            b_acc = b_acc * b_alpha[:, None] + tl.sum(b_o * b_w[:, :, None], 0)
            b_max = b_new
        b_out = b_acc / tl.where(b_sum > 0, b_sum, 1.0)[:, None]
        i_h = (i_bkv % Hkv) * GROUP + o_r // T
        p_o = O + (i_bkv // Hkv).to(tl.int64) * stride_ob + i_h[:, None].to(tl.int64) * stride_oh \
            + (o_r % T)[:, None] * stride_ot + o_d[None, :]
        tl.store(p_o, b_out.to(O.dtype.element_ty), mask=m_r[:, None] & (o_d < HEAD_DIM)[None, :])
        tl.store(TICKETS + i_bkv, 0)  # the next launch (after this one on the stream) starts from 0


__all__ = ["merge_splits_if_last", "tickets", "merge_shape", "num_sms", "one_wave_splits", "MIN_TICKETS"]
