"""`multiscale`: exact local window plus mean-pooled K/V summaries of distant blocks at coarser scales.

The definition is in ollm_triton/kernels/attention_multiscale.py: with E = max(p - window + 1, 0) and
B_l = floor(E / f_l) * f_l, the query at position p sees keys B_1 <= s <= p exactly, and summary j of scale f_l
(the mean of keys and of values over [j f_l, (j+1) f_l), logit + ln f_l) iff B_{l+1} <= j f_l and
(j+1) f_l <= B_l (B_{L+1} = 0): every earlier key is represented once, coarser the further back it is.
Decode recomputes the summaries from the cache's dense K/V on every call (one extra read of the cache), so codec
kernels are not used with this backend.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ollm_triton.attention.scheduled import ScheduledAttention
from ollm_triton.kernels.attention_multiscale import check_scales, flash_multiscale, multiscale_reference
from ollm_triton.registry import register


@dataclass
class MultiscaleConfig:
    window: int = 1024  # exact keys p - window < s <= p (widened down to a multiple of scales[0])
    scales: tuple[int, ...] = (64, 1024)  # pool sizes, finest first, each a multiple of the previous

    def check(self) -> None:
        check_scales(self.window, tuple(self.scales))


@register("attention", "multiscale", MultiscaleConfig)
class Multiscale(ScheduledAttention):
    """Local window attention plus mean-pooled K/V summaries of distant blocks at one or more coarser scales."""

    fused_codec_decode = False  # summaries are recomputed from dense K/V on every call

    def __init__(self, cfg: MultiscaleConfig | None = None):
        cfg = cfg or MultiscaleConfig()
        super().__init__(cfg)
        self.scales = tuple(cfg.scales)
        self.window, self.window_align = cfg.window, self.scales[0]

    def tiles(self, head_dim, dtype, q_len):
        # 64-key tiles: with 128 the summary loop's rule pushes the kernel past 255 registers (344 B of spills).
        bm, bn = super().tiles(head_dim, dtype, q_len)
        return bm, min(bn, 64)

    def kernel_prefill(self, q, k, v, q_offset, tree_mask):
        if tree_mask is not None:
            raise ValueError("multiscale attention takes no tree mask (speculative trees need an exact backend)")
        bm, bn = self.tiles(q.shape[3], q.dtype, q.shape[2])
        sched = self.schedule(q.shape[2], k.shape[2], q_offset, bm, bn, q.device)
        return flash_multiscale(q, k, v, q_offset=q_offset, window=self.window, scales=self.scales,
                                block_m=bm, block_n=bn, schedule=sched)

    def reference(self, q, k, v, *, q_offset, tree_mask=None, compute_dtype=None):
        if tree_mask is not None:
            raise ValueError("multiscale attention takes no tree mask (speculative trees need an exact backend)")
        return multiscale_reference(q, k, v, q_offset=q_offset, window=self.window, scales=self.scales,
                                    compute_dtype=compute_dtype or torch.float32)

    def decode_kernel_fits(self, q_len: int, kv_len: int) -> bool:
        return False  # summaries are keys of the prefill kernel only
