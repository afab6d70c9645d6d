"""`flash`: dense causal attention on the block-schedule Triton kernels (PyTorch reference on the CPU)."""

from __future__ import annotations

from ollm_triton.attention.scheduled import ScheduledAttention
from ollm_triton.registry import register


@register("attention", "flash")
class Flash(ScheduledAttention):
    """Dense causal flash attention: Triton prefill and split-K decode kernels, GQA without repeated K/V."""
