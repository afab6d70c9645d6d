"""`sdpa`: torch's scaled_dot_product_attention, the baseline every other backend is compared with."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ollm_triton.attention.base import AttentionBackend, causal_mask
from ollm_triton.registry import register


@register("attention", "sdpa")
class SDPA(AttentionBackend):
    """Dense causal attention through torch.nn.functional.scaled_dot_product_attention (the baseline)."""

    dense_causal = True

    def __init__(self, cfg=None):
        self.cfg = cfg
        self.last_path = "torch.sdpa"

    def prefill(self, q, k, v, *, q_offset, tree_mask=None):
        t, s = q.shape[2], k.shape[2]
        if tree_mask is None and t == s and q_offset == 0:
            return sdpa_gqa(q, k, v, is_causal=True)
        if tree_mask is None and t == 1:
            return sdpa_gqa(q, k, v)  # one query at the end sees every key
        return sdpa_gqa(q, k, v, mask=causal_mask(t, s, q_offset, q.device, tree_mask))


def sdpa_gqa(q, k, v, *, is_causal: bool = False, mask: torch.Tensor | None = None) -> torch.Tensor:
    """SDPA with grouped-query heads. torch's `enable_gqa` avoids materialising repeated K/V."""
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=is_causal, enable_gqa=k.shape[1] != q.shape[1]
    )
