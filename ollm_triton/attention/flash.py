"""`flash`: dense causal attention on the block-schedule Triton kernels (PyTorch reference on the CPU).

It takes a model's own attention rule (gpt-oss): the per-layer sliding window as the schedule's window and the
per-head sink logits in the prefill kernel's epilogue and the decode kernel's split merge, so a gpt-oss prefill holds
no score matrix (sdpa's `attend_with_sinks` holds float32 scores a query chunk at a time)."""

from __future__ import annotations

from ollm_triton.attention.scheduled import ScheduledAttention
from ollm_triton.registry import register


@register("attention", "flash")
class Flash(ScheduledAttention):
    """Dense causal flash attention: Triton prefill and split-K decode kernels, GQA without repeated K/V."""

    layer_window = True  # the model's per-layer window is the schedule's (this backend has none of its own)
    sink_logits = True
