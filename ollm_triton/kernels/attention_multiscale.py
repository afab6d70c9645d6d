"""Multi-scale attention: exact attention to a local window plus mean-pooled K/V summaries of distant blocks.

Definition (query at position p, keys 0..p; `window` W >= 1; `scales` f_1 < f_2 < ... < f_L, each a multiple of
the one before). Let E = max(p - W + 1, 0) be where the window would start, and B_l = floor(E / f_l) * f_l.
  - exact keys:  B_1 <= s <= p (the window, widened down to a multiple of f_1)
  - scale l:     summary j of scale l (keys [j f_l, (j+1) f_l), K and V averaged) is attended iff
                 B_{l+1} <= j f_l and (j+1) f_l <= B_l, with B_{L+1} = 0
Every key before the window is represented exactly once, by the coarsest scale whose blocks still fit before the
finer scales' band: the coarsest scale covers [0, B_L), scale l the band [B_{l+1}, B_l) (fewer than f_{l+1} / f_l
summaries), and the exact window [B_1, p]. A summary's logit gets + ln(f_l), so a block of identical keys weighs
what its f_l copies would. Cost per query: W + f_1 + sum_l f_{l+1}/f_l + p / f_L keys instead of p.

The exact part is a block schedule (window rule with align = f_1) of the prefill kernel; summaries are extra keys
visited by the same kernel (`SummaryKeys`). `multiscale_reference` computes the definition directly in float64.
"""

from __future__ import annotations

import math

import torch

from ollm_triton.kernels.attention_prefill import SummaryKeys, attention_reference, flash_prefill
from ollm_triton.kernels.attention_schedule import build_schedule

COARSEST_NEXT = 1 << 30  # f_{L+1}: floor(E / 2**30) = 0 for any real position


def check_scales(window: int, scales: tuple[int, ...] | list[int]) -> None:
    """ValueError naming what is wrong with a (window, scales) pair."""
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    if not scales:
        raise ValueError("scales must list at least one pool size, e.g. [64, 1024]")
    for i, f in enumerate(scales):
        prev = scales[i - 1] if i else 1
        if f < 2 or f <= prev or f % prev:
            raise ValueError(f"scales must increase, each >= 2 and a multiple of the one before; got {list(scales)}")


def pool_summaries(k: torch.Tensor, v: torch.Tensor, scales: tuple[int, ...]) -> SummaryKeys:
    """Mean-pooled K/V of every complete block at each scale, finest scale first.

    k, v: [B, Hkv, S, D] -> SummaryKeys with k, v [B, Hkv, N, D], N = sum_l floor(S / f_l) (pooled in fp32)."""
    b, h, s, d = k.shape
    ks, vs, metas = [], [], []
    for level, f in enumerate(scales):
        n = s // f
        if n == 0:
            continue
        ks.append(k[:, :, : n * f].reshape(b, h, n, f, d).float().mean(3).to(k.dtype))
        vs.append(v[:, :, : n * f].reshape(b, h, n, f, d).float().mean(3).to(v.dtype))
        f_next = scales[level + 1] if level + 1 < len(scales) else COARSEST_NEXT
        j = torch.arange(n, dtype=torch.int32)
        metas.append(torch.stack((torch.full_like(j, f), torch.full_like(j, f_next), j)))
    if not ks:
        empty = k.new_zeros(b, h, 0, d)
        return SummaryKeys(empty, empty.clone(), torch.zeros(3, 0, dtype=torch.int32, device=k.device))
    meta = torch.cat(metas, dim=1).to(k.device)
    return SummaryKeys(torch.cat(ks, dim=2).contiguous(), torch.cat(vs, dim=2).contiguous(), meta)


def flash_multiscale(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, q_offset: int, window: int, scales: tuple[int, ...],
    block_m: int, block_n: int, schedule=None, **launch,
) -> torch.Tensor:
    """The Triton path. q: [B, Hq, T, D]; k, v: [B, Hkv, S, D] -> [B, Hq, T, D]."""
    t, s = q.shape[2], k.shape[2]
    if schedule is None:
        schedule = build_schedule(t, s, q_offset, block_m, block_n, device=q.device, window=window,
                                  window_align=scales[0])
    return flash_prefill(q, k, v, schedule, summaries=pool_summaries(k, v, tuple(scales)), **launch)


def exact_mask(q_len: int, kv_len: int, q_offset: int, window: int, scales, rows: slice | None = None, device=None):
    """Bool [T, S] of the exact keys (the definition's first line)."""
    p = torch.arange(q_offset, q_offset + q_len, device=device)[rows or slice(None)][:, None]
    s = torch.arange(kv_len, device=device)[None, :]
    e = (p - window + 1).clamp(min=0)
    return (s <= p) & (s >= e // scales[0] * scales[0])


def summary_mask(q_len: int, kv_len: int, q_offset: int, window: int, scales, rows: slice | None = None, device=None):
    """Bool [T, N] over the summaries in `pool_summaries` order, and their logit bias ln(f) [N] (float64)."""
    p = torch.arange(q_offset, q_offset + q_len, device=device)[rows or slice(None)][:, None]
    e = (p - window + 1).clamp(min=0)
    masks, bias = [], []
    for level, f in enumerate(scales):
        n = kv_len // f
        if n == 0:
            continue
        j = torch.arange(n, device=device)[None, :]
        upper = e // f * f  # B_l
        lower = e // scales[level + 1] * scales[level + 1] if level + 1 < len(scales) else torch.zeros_like(e)
        masks.append((j * f >= lower) & ((j + 1) * f <= upper))
        bias.append(torch.full((n,), math.log(f), dtype=torch.float64, device=device))
    if not masks:
        return torch.zeros(p.shape[0], 0, dtype=torch.bool, device=device), torch.zeros(0, dtype=torch.float64)
    return torch.cat(masks, dim=1), torch.cat(bias)


def multiscale_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, q_offset: int, window: int, scales,
    compute_dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """The definition computed directly (pooling in `compute_dtype`). Shapes as `flash_multiscale`."""
    t, s = q.shape[2], k.shape[2]
    b, h, _, d = k.shape
    k_sum, v_sum = [], []
    for f in scales:
        n = s // f
        if n:
            k_sum.append(k[:, :, : n * f].to(compute_dtype).reshape(b, h, n, f, d).mean(3))
            v_sum.append(v[:, :, : n * f].to(compute_dtype).reshape(b, h, n, f, d).mean(3))
    if not k_sum:
        return attention_reference(q, k, v, lambda r: exact_mask(t, s, q_offset, window, scales, r, q.device),
                                   compute_dtype=compute_dtype)
    _, bias = summary_mask(t, s, q_offset, window, scales, slice(0, 1), q.device)
    summaries = (torch.cat(k_sum, 2), torch.cat(v_sum, 2),
                 lambda r: summary_mask(t, s, q_offset, window, scales, r, q.device)[0], bias)
    return attention_reference(q, k, v, lambda r: exact_mask(t, s, q_offset, window, scales, r, q.device),
                               summaries=summaries, compute_dtype=compute_dtype)


__all__ = ["pool_summaries", "flash_multiscale", "multiscale_reference", "exact_mask", "summary_mask", "check_scales"]
