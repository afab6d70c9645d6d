"""`sdpa`: torch's scaled_dot_product_attention, the baseline every other backend is compared with.

It honours a model's per-layer sliding window (a mask) and per-head sink logits (`attend_with_sinks`: scores in
float32 with the sink as one more softmax column, dropped before the values; SDPA has no such column)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ollm_triton.attention.base import AttentionBackend, causal_mask
from ollm_triton.registry import register


@register("attention", "sdpa")
class SDPA(AttentionBackend):
    """Dense causal attention through torch.nn.functional.scaled_dot_product_attention (the baseline)."""

    dense_causal = True
    layer_window = True
    sink_logits = True

    def __init__(self, cfg=None):
        self.cfg = cfg
        self.last_path = "torch.sdpa"

    def prefill(self, q, k, v, *, q_offset, tree_mask=None, window: int = 0, sinks: torch.Tensor | None = None):
        t, s = q.shape[2], k.shape[2]
        self.last_path = "torch.sdpa"  # a decode that fell back here after a fused one must not keep its label
        if window or sinks is not None:
            start = max(0, q_offset - window + 1) if window else 0
            if start:  # keys before the first query's window are invisible to every query: not read at all
                k, v, s, q_offset = k[:, :, start:], v[:, :, start:], s - start, q_offset - start
            mask = causal_mask(t, s, q_offset, q.device, tree_mask, window=window)
            if sinks is None:
                return sdpa_gqa(q, k, v, mask=mask)
            self.last_path = "torch.sinks"
            return attend_with_sinks(q, k, v, mask, sinks)
        if tree_mask is None and t == s and q_offset == 0:
            return sdpa_gqa(q, k, v, is_causal=True)
        if tree_mask is None and t == 1:
            return sdpa_gqa(q, k, v)  # one query at the end sees every key
        return sdpa_gqa(q, k, v, mask=causal_mask(t, s, q_offset, q.device, tree_mask))


# float32 scores one query chunk of attend_with_sinks holds (its transient is ~2x this: sink_attention_bytes). At
# 1 GiB a gpt-oss-20b 8k prefill peaked ~5.1 GB above weights + KV on the H100 (the memory study's rows, the
# masked copy, the sink column's concatenation, the softmax and bf16 probabilities alive at once). 256 MiB chunks
# with the softmax in place are faster, not slower: 31.7 s against 73.3 s for the 1 GiB chunks with their copies
# (2-core CPU, fp32, 4096 queries x 8192 keys, 64 / 8 heads, D 16); GPU numbers: scripts/bench_prefill.py --sinks.
SINK_SCORES_BYTES = 256 << 20


def sink_chunk_rows(batch: int, heads: int, kv_len: int) -> int:
    """Query rows attend_with_sinks takes at once: float32 scores [B, Hq, rows, S] under SINK_SCORES_BYTES."""
    return max(1, SINK_SCORES_BYTES // (4 * batch * heads * max(kv_len, 1)))


def sink_attention_bytes(batch: int, heads: int, q_len: int, kv_len: int, element_size: int) -> int:
    """What attend_with_sinks holds at once beyond its inputs and output, for the footprint estimate: one chunk's
    float32 scores, plus either the matmul's scores in the inputs' dtype (before the float32 copy) or the
    probabilities cast back to it (after the in-place softmax); and the chunk's bool mask rows."""
    rows = min(q_len, sink_chunk_rows(batch, heads, kv_len))
    scores = batch * heads * rows * kv_len
    return scores * (4 + element_size) + rows * kv_len


def attend_with_sinks(q, k, v, mask: torch.Tensor, sinks: torch.Tensor) -> torch.Tensor:
    """softmax([q k^T / sqrt(D), sink_h]) without its last column, @ v. q: [B, Hq, T, D]; k, v: [B, Hkv, S, D];
    mask: bool [T, S] (True = visible); sinks: [Hq] logits. Returns [B, Hq, T, D] in q's dtype. Queries go in
    chunks so the float32 scores stay under SINK_SCORES_BYTES (a 64-head 8k prefill would otherwise hold 17 GB),
    and the softmax runs in place on them, the sink as one more denominator term (no concatenated column, no
    masked copy): a chunk holds its float32 scores and one copy in the inputs' dtype (sink_attention_bytes).

    The G query heads of a KV head are stacked along the query axis (rows g * T + t), so K/V are read as stored:
    neither repeated per query head nor copied to float32 (at 32k keys that copy was 0.5 GB per layer and step).
    Rounding as transformers' eager attention: scores and probabilities in the inputs' dtype around a float32
    softmax."""
    b, hq, t, d = q.shape
    hkv, s = k.shape[1], k.shape[2]
    g = hq // hkv
    sink = sinks.float().view(1, hkv, g, 1, 1)
    chunk = sink_chunk_rows(b, hq, s)
    out = torch.empty(b, hq, t, v.shape[-1], dtype=q.dtype, device=q.device)
    for t0 in range(0, t, chunk):
        qc = q[:, :, t0 : t0 + chunk]
        tc = qc.shape[2]
        scores = (qc.reshape(b, hkv, g * tc, d) @ k.transpose(-1, -2)).float()  # [B, Hkv, G*tc, S]
        scores = scores.view(b, hkv, g, tc, s).mul_(d**-0.5).masked_fill_(~mask[t0 : t0 + chunk], float("-inf"))
        top = torch.maximum(scores.amax(dim=-1, keepdim=True), sink)  # [B, Hkv, G, tc, 1]: finite (the sink is)
        probs = scores.sub_(top).exp_()
        probs = probs.div_(probs.sum(dim=-1, keepdim=True).add_((sink - top).exp_()))
        probs = probs.to(v.dtype).view(b, hkv, g * tc, s)
        out[:, :, t0 : t0 + chunk] = (probs @ v).view(b, hq, tc, -1)  # [B, Hkv, G*tc, S] @ [B, Hkv, S, D]
    return out


def sdpa_gqa(q, k, v, *, is_causal: bool = False, mask: torch.Tensor | None = None) -> torch.Tensor:
    """SDPA with grouped-query heads. torch's `enable_gqa` avoids materialising repeated K/V."""
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=is_causal, enable_gqa=k.shape[1] != q.shape[1]
    )
