"""The token mixers of the one model step (engine/model.py): RoPE, the K/V store and attention, per path.

A mixer is called as `mixer(i, q, k, v)` for layer i with token-major q: [B, T, Hq, D], k, v: [B, T, Hkv, D]
(before RoPE) and returns [B, Hq, T, D]. The model step is the same on every path; only the mixer differs:

    PluginMixer         the engine's forward: the cache codec stores, the attention backend attends (any plugins)
    RowsMixer           T new tokens for each of B independent sequences, each with its own cache and position
                        (continuous batching: rows join and leave between steps); projections and MLP run the B
                        rows as one matmul, attention goes through the plugins row by row
    StaticDecodeMixer   one token per row over dense static buffers (the CUDA-graph decode step): RoPE fused with
                        the K/V write at each row's own slot, then the varlen decode kernel reading each row's
                        length from the device (no host value: capturable); the layer's own window and sinks
                        (gpt-oss) passed through to codecs that declare `static_window_sinks`
    StaticBlockMixer    T tokens with a [T, T] mask among them over dense static buffers (speculative verify
                        blocks, draft steps, tree levels): the varlen kernel with T query rows over each row's
                        held + T keys (device lengths and mask: capturable), with the layer's own window and sinks
    SegmentMixer        the piecewise step: RoPE, then q/k/v handed to static buffers and the attention run
                        eagerly through the plugins between captured segments (`cut`)

Which attention call PluginMixer makes for a layer (`attention_step`):
- the layer cache is empty (the first chunk of a prompt): `prefill(q, k, v, q_offset=0)`, then append k, v;
- a tree mask is given, or T <= `decode_max_tokens` (decoding, speculative verification): append k, v first, then
  `decode(q, layer_cache)`. Every new token then sees the keys exactly as the cache stores them, which is what it
  would have seen had the tokens been decoded one at a time; so k drafted tokens verified in one call give the same
  logits as k single steps, for lossy codecs too (a quantised or evicting cache);
- otherwise (a later prompt chunk longer than `decode_max_tokens`): `prefill` over the cache's dense K/V followed
  by the chunk's own exact K/V, with `q_offset` = tokens held, then append. This is the usual chunked prefill: the
  chunk attends to itself at full precision.
For a lossless cache (dense) the two calls see the same keys under the same causal mask, so the choice changes no
result beyond floating-point summation order. After either, `layer_cache.observe(q)`: eviction codecs score there.

Linear-attention layers (qwen3_next's Gated DeltaNet) take no q/k/v: the layer asks `mixer.state(i)` for its
fixed-size state (cache/state.py) and advances it. PluginMixer hands over the cache's StateLayer, RowsMixer the rows'
layers stacked into one batch; a tree of drafts is refused (one recurrent state holds one sequence), and the static
mixers have no state (such a model decodes eagerly: ModelConfig.static_step_blocker). Partial RoPE (cos, sin
narrower than the head) rotates the leading dims and passes the rest through (`rope_partial`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ollm_triton.cache.state import StackedStates
from ollm_triton.kernels.attention_decode_varlen import (
    block_visibility,
    kernel_supports,
    verify_attention_kernel,
    verify_attention_reference,
)
from ollm_triton.kernels.rope import rope_qk, rope_write_kv

DECODE_MAX_TOKENS = 16


def rope_partial(q, k, cos, sin, *, use_kernel):
    """rope_qk over the first cos.shape[-1] dims of each head, the rest passed through (partial rotary):
    q: [B, T, Hq, D], k: [B, T, Hkv, D] -> head-major [B, H, T, D]."""
    r = cos.shape[-1]
    if r == q.shape[-1]:
        return rope_qk(q, k, cos, sin, use_kernel=use_kernel)
    q_rot, k_rot = rope_qk(q[..., :r], k[..., :r], cos, sin, use_kernel=use_kernel)
    return (torch.cat((q_rot, q[..., r:].transpose(1, 2)), dim=-1),
            torch.cat((k_rot, k[..., r:].transpose(1, 2)), dim=-1))


def attention_step(q, k, v, layer_cache, attention, *, tree_mask=None, decode_max_tokens=DECODE_MAX_TOKENS,
                   **layer):
    """Attend T new queries and store their keys (the rule is in this module's docstring).

    q: [B, Hq, T, D]; k, v: [B, Hkv, T, D] (after RoPE) -> [B, Hq, T, D]. `layer`: the model's own attention rule
    for this layer, passed to the backend as it is (gpt-oss: `window`, `sinks`; Attention.mixer_kwargs), empty for
    most models; the engine has checked that the backend declares it (attention/base.py).
    """
    t = q.shape[2]
    held = layer_cache.length
    if held > 0 and (tree_mask is not None or t <= decode_max_tokens):
        layer_cache.append(k, v)
        out = attention.decode(q, layer_cache, tree_mask=tree_mask, **layer)
    else:
        k_all, v_all = k, v
        if held > 0:
            past_k, past_v = layer_cache.dense()
            k_all, v_all = torch.cat((past_k, k), dim=2), torch.cat((past_v, v), dim=2)
        out = attention.prefill(q, k_all, v_all, q_offset=k_all.shape[2] - t, tree_mask=tree_mask, **layer)
        layer_cache.append(k, v)
    # eviction codecs score the held tokens with this step's queries, after the step attended to all of them
    layer_cache.observe(q)
    return out


class PluginMixer:
    """Through the plugins: RoPE at cos, sin ([T, D] or [B, T, D]), then `attention_step` on cache layer i."""

    def __init__(self, layers, attention, cos, sin, *, kernels: bool, tree_mask=None,
                 decode_max_tokens: int = DECODE_MAX_TOKENS):
        self.layers, self.attention = layers, attention
        self.cos, self.sin, self.kernels = cos, sin, kernels
        self.tree_mask, self.decode_max_tokens = tree_mask, decode_max_tokens

    def rope(self, q, k, v):
        """-> head-major q_rot [B, Hq, T, D], k_rot, v [B, Hkv, T, D]."""
        q, k = rope_partial(q, k, self.cos, self.sin, use_kernel=self.kernels)
        return q, k, v.transpose(1, 2)

    def state(self, i):
        if self.tree_mask is not None:
            raise ValueError("a tree of drafts cannot be verified through a linear-attention layer (its recurrent "
                             "state holds one sequence); use a linear speculative decoder (speculative, "
                             "self_speculative, prompt_lookup) or greedy/sample")
        return self.layers[i]

    def __call__(self, i, q, k, v, **layer):
        q, k, v = self.rope(q, k, v)
        return attention_step(q, k, v, self.layers[i], self.attention, tree_mask=self.tree_mask,
                              decode_max_tokens=self.decode_max_tokens, **layer)


class RowsMixer:
    """B sequences, T new tokens each: row b at its own positions (cos, sin [B, T, D]) and with its own cache
    (caches[b], any codec); attention row by row through `attention_step`, so every codec and backend works."""

    def __init__(self, caches, attention, cos, sin, *, kernels: bool, decode_max_tokens: int = DECODE_MAX_TOKENS):
        self.caches, self.attention = caches, attention
        self.cos, self.sin, self.kernels, self.decode_max_tokens = cos, sin, kernels, decode_max_tokens

    def state(self, i):
        layers = [cache.layers[i] for cache in self.caches]
        return layers[0] if len(layers) == 1 else StackedStates(layers)

    def __call__(self, i, q, k, v, **layer):
        q, k = rope_partial(q, k, self.cos, self.sin, use_kernel=self.kernels)
        v = v.transpose(1, 2)
        rows = [attention_step(q[b : b + 1], k[b : b + 1], v[b : b + 1], cache.layers[i], self.attention,
                               decode_max_tokens=self.decode_max_tokens, **layer)
                for b, cache in enumerate(self.caches)]
        return torch.cat(rows) if len(rows) > 1 else rows[0]


class StaticDecodeMixer:
    """One new token per row over a codec's static-step layers (`CacheCodec.static_decode`): pos [B] each row's
    length before the step, cos, sin [B, 1, D] at those positions. The layer stores and attends in place (dense:
    RoPE fused with the K/V write, then the varlen decode; quantized: the write into the residual window, then the
    fused varlen decode over the codes), each row's length read on the device."""

    def __init__(self, layers, cos, sin, pos, *, kernels: bool):
        self.layers, self.cos, self.sin, self.pos, self.kernels = layers, cos, sin, pos, kernels
        self.shared: dict = {}  # what every layer of this step derives from pos alone, computed by the first

    def __call__(self, i, q, k, v, **layer):
        # `layer`: the model's own window / sinks for layer i, only for codecs declaring `static_window_sinks`
        # (engine/fast_decode.py capture_blocker refuses the others)
        return self.layers[i].static_decode(q, k, v, self.cos, self.sin, self.pos, kernels=self.kernels,
                                            shared=self.shared, **layer)


class StaticBlockMixer:
    """T new tokens per row over static buffers: token t of row b goes to slot base[b] + t at RoPE position
    base[b] + offsets[t] and sees slot s iff s < base[b] or (s = base[b] + j and mask[t, j]).

    Attention (kernels/attention_decode_varlen.py `verify_attention`): with the kernels on, the split-K Triton
    kernel over each row's base[b] + T keys, base and mask read on the device, so one captured graph serves every
    context and every chain or tree mask; otherwise (CPU, shapes the kernel does not take, or attention_kernel=False,
    the benchmark's baseline) torch SDPA over the whole buffer under a [G*T, capacity] mask built once a step. No
    host value either way (capturable). Rolling back is a smaller `base` next time: rejected tokens' slots are
    masked out and later overwritten. A layer's own window and sinks (gpt-oss) go to `verify_attention` as they
    are; the SDPA path keeps one mask per window size."""

    def __init__(self, layers, cos_table, sin_table, base, offsets, mask, *, group: int, kernels: bool,
                 attention_kernel: bool | None = None):
        self.layers, self.kernels, self.base, self.block_mask, self.group = layers, kernels, base, mask, group
        self.attention_kernel = kernels if attention_kernel is None else attention_kernel
        rope_pos = base[:, None] + offsets[None, :]  # [B, T]
        self.cos, self.sin = cos_table[rope_pos], sin_table[rope_pos]  # [B, T, D]
        self.visible = {}  # window -> the SDPA path's [B, 1, G*T, S] mask: built by a layer, shared by the rest

    def __call__(self, i, q, k, v, window: int = 0, sinks: torch.Tensor | None = None):
        kv = self.layers[i]
        q = rope_write_kv(q, k, v, self.cos, self.sin, kv.k, kv.v, self.base, use_kernel=self.kernels)  # [B,Hq,T,D]
        if self.attention_kernel and kernel_supports(q, kv.k, q.shape[2]):
            return verify_attention_kernel(q, kv.k, kv.v, self.base, self.block_mask, window=window, sinks=sinks)
        if window not in self.visible:
            self.visible[window] = block_visibility(self.base, self.block_mask, kv.k.shape[2], self.group, window)
        return verify_attention_reference(q, kv.k, kv.v, self.base, self.block_mask, visible=self.visible[window],
                                          sinks=sinks)


class SegmentMixer:
    """The piecewise step's boundary: RoPE at cos, sin [B, 1, D], q/k/v copied into io["q"], io["k"], io["v"]
    ([B, H, 1, D]), then `cut(i)`, and io["out"] returned. While capturing, `cut` ends one segment's graph and
    begins the next; uncaptured it runs layer i's attention at once. io["out"] is filled by that attention."""

    def __init__(self, io: dict[str, torch.Tensor], cos, sin, cut: Callable[[int], None], *, kernels: bool):
        self.io, self.cos, self.sin, self.cut, self.kernels = io, cos, sin, cut, kernels

    def __call__(self, i, q, k, v, **layer):
        # `layer` (the model's own window / sinks) is applied where the attention runs: FastDecoder.attend
        io = self.io
        q_rot, k_rot = rope_qk(q, k, self.cos, self.sin, use_kernel=self.kernels)
        io["q"].copy_(q_rot)
        io["k"].copy_(k_rot)
        io["v"].copy_(v.transpose(1, 2))
        self.cut(i)
        return io["out"]


__all__ = ["DECODE_MAX_TOKENS", "PluginMixer", "RowsMixer", "SegmentMixer", "StaticBlockMixer", "StaticDecodeMixer",
           "attention_step"]
