"""Attention mass per key, for eviction codecs (H2O, SnapKV), without materializing the attention matrix.

`attention_column_sums(q, k)` returns, for every key, the softmax attention it receives summed over the given
queries and over the query heads sharing its KV head. It runs in two passes over (query-row chunk x key chunk)
tiles of at most `max_elems` scores: the first finds each row's log-sum-exp, the second adds exp(s - lse) per key.
So a 32k-token prompt scores its keys with O(tile) memory instead of the 32 x 32k x 32k matrix; the cost is two
QK^T products (no kernel of its own: the products are large matmuls that torch already runs at matmul speed).

`pool_scores` smooths scores along the keys (SnapKV's clustering of neighbouring tokens).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _tiles(n: int, size: int):
    for lo in range(0, n, size):
        yield lo, min(n, lo + size)


def attention_column_sums(
    q: torch.Tensor, k: torch.Tensor, *, q_offset: int, max_elems: int = 1 << 24
) -> torch.Tensor:
    """q: [B, Hq, T, D] (query t at position q_offset + t, causal), k: [B, Hkv, S, D] -> float32 [B, Hkv, S]:
    sum over the T queries and the Hq/Hkv heads of each group of softmax(q k^T / sqrt(D)) at each key."""
    b, hq, t, d = q.shape
    hkv, s = k.shape[1], k.shape[2]
    gq = hq // hkv
    rows = q.reshape(b, hkv, gq * t, d).float() * (1.0 / math.sqrt(d))  # row r: head r // t, token r % t
    row_pos = q_offset + torch.arange(gq * t, device=q.device) % t
    k_pos = torch.arange(s, device=q.device)
    kf = k.float()
    key_chunk = min(s, 4096)
    row_chunk = max(1, max_elems // max(1, b * hkv * key_chunk))

    def scores(r0, r1, k0, k1):
        sc = rows[:, :, r0:r1] @ kf[:, :, k0:k1].transpose(-1, -2)  # [B, Hkv, rows, keys]
        visible = k_pos[None, k0:k1] <= row_pos[r0:r1, None]
        return sc.masked_fill(~visible, float("-inf"))

    lse = torch.empty(b, hkv, gq * t, device=q.device)
    for r0, r1 in _tiles(gq * t, row_chunk):
        acc = torch.full((b, hkv, r1 - r0), float("-inf"), device=q.device)
        for k0, k1 in _tiles(s, key_chunk):
            acc = torch.logaddexp(acc, torch.logsumexp(scores(r0, r1, k0, k1), -1))
        lse[:, :, r0:r1] = acc
    out = torch.zeros(b, hkv, s, device=q.device)
    for k0, k1 in _tiles(s, key_chunk):
        for r0, r1 in _tiles(gq * t, row_chunk):
            out[:, :, k0:k1] += torch.exp(scores(r0, r1, k0, k1) - lse[:, :, r0:r1, None]).sum(-2)
    return out


def attention_column_sums_ref(q: torch.Tensor, k: torch.Tensor, *, q_offset: int) -> torch.Tensor:
    """Reference in float64 with the whole matrix (small inputs only)."""
    b, hq, t, d = q.shape
    hkv, s = k.shape[1], k.shape[2]
    kr = k.double().repeat_interleave(hq // hkv, dim=1)
    sc = q.double() @ kr.transpose(-1, -2) / math.sqrt(d)
    visible = torch.arange(s)[None, :] <= (q_offset + torch.arange(t))[:, None]
    p = torch.softmax(sc.masked_fill(~visible.to(q.device), float("-inf")), -1)  # [B, Hq, T, S]
    return p.sum(2).reshape(b, hkv, hq // hkv, s).sum(2)


def pool_scores(scores: torch.Tensor, kernel_size: int, mode: str = "avg") -> torch.Tensor:
    """scores: [B, H, S] -> [B, H, S], pooled over a window of `kernel_size` (odd) keys centred on each key."""
    b, h, s = scores.shape
    if kernel_size <= 1 or s == 0:  # nothing to smooth (the pooling ops refuse an empty axis)
        return scores
    x = scores.reshape(b * h, 1, s)
    pad = kernel_size // 2
    if mode == "max":
        y = F.max_pool1d(x, kernel_size, stride=1, padding=pad)
    else:
        y = F.avg_pool1d(x, kernel_size, stride=1, padding=pad, count_include_pad=False)
    return y.reshape(b, h, -1)[:, :, :s]
