"""The native Llama-family decoder and its one model step.

Parameter names equal the Hugging Face checkpoint names (`model.embed_tokens.weight`,
`model.layers.{i}.self_attn.q_proj.weight`, `model.layers.{i}.mlp.gate_proj.weight`, `model.norm.weight`,
`lm_head.weight`, `...self_attn.q_norm.weight` for qwen3, `...q_proj.bias` for qwen2), so a safetensors state
dict loads without renaming. Nothing here depends on transformers.

One model step. `CausalLM.step(ids, mixer, ...)` is the only forward over the decoder layers, and every path
calls it: the engine's eager forward (prompt chunks, decode steps, speculative and tree verification), the static
decode step replayed as a CUDA graph (whole or cut into per-layer segments), the speculative strategies' static
verify blocks, and the layer-skip draft (`num_layers`). A layer is

    norm -> q/k/v projection (-> q/k norm) -> mixer(i, q, k, v) -> o projection -> norm -> MLP

with the residual add carried into the next norm. The *mixer* is what differs between paths: it applies RoPE,
stores the new K/V and attends (ollm_triton/engine/mixers.py: through the attention and cache plugins, over the
static step's dense buffers, or cut at a graph-segment boundary). Fusion choices are options of the one step,
not copies of it: `kernels` runs the fused Triton RMSNorm(+residual), RoPE and SiLU-gate kernels (their rounding
points are the eager ops', so results agree to the reduction order), `linear` is the weight matmul (the static
decode step passes the one-shot GEMV), and a layer whose q/k/v (gate/up) weights were concatenated into one matrix
(`qkv_weight`, `gate_up_weight`, engine/fast_decode.py `fuse_projections`) runs one matmul instead of three (two).
`norm_linear` folds a norm into the fused matmul that reads it (the residual add, RMSNorm and q/k/v, gate/up or LM
head matmul in one kernel: kernels/gemv.py `decode_add_norm_linear`, the static decode step's option at one row),
and `silu_linear` the SwiGLU gate into the down matmul (`decode_silu_linear`); where one declines the shapes, the
two run apart, so every path keeps this one structure.
A new MLP or mixer (linear attention) is one module here: the mixture of experts is engine/moe.py's `MoE`, which
layer i runs in place of the dense MLP when the config says so (`ModelConfig.is_moe_layer`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from ollm_triton.engine.config import ModelConfig
from ollm_triton.engine.linear_attention import GatedDeltaNet
from ollm_triton.engine.moe import MoE
from ollm_triton.kernels.mlp import silu_mul
from ollm_triton.kernels.norm import rmsnorm

FUSED_PATH = "triton:rmsnorm+residual,rope,silu_mul"
Linear = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]
# (delta | None, residual, norm weight, eps, norm offset, W, b | None) -> (norm(residual + delta) W^T + b,
# residual + delta), or None when it does not take these shapes
NormLinear = Callable[..., tuple[torch.Tensor, torch.Tensor] | None]
# (gate_up [..., 2M], W, b | None) -> (silu(gate) * up) W^T + b, or None when it does not take these shapes
SiluLinear = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor | None]


class Mixer(Protocol):
    """The token mixer of layer i: q: [B, T, Hq, D], k, v: [B, T, Hkv, D] (token-major, before RoPE) ->
    attention output [B, Hq, T, D]; stores the new K/V wherever its path keeps them."""

    def __call__(self, i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor: ...

    def state(self, i: int):
        """Layer i's fixed-size state when it is a linear-attention layer (cache/state.py: `state` dict, `length`,
        `update`); paths that hold no such state raise with one line."""
        ...


class LayerHooks(Protocol):
    """Called around every decoder layer (the prefetch policy: layer i's weights are on the device inside)."""

    def before_layer(self, index: int) -> None: ...

    def after_layer(self, index: int) -> None: ...


class RMSNorm(nn.Module):
    """x / rms(x) * weight, normalised in float32 and cast back before the weight (as transformers does). With
    `offset` 1 (qwen3_next's zero-centred weights) x / rms(x) * (1 + weight), all in float32, then cast back."""

    def __init__(self, dim: int, eps: float, offset: float = 0.0):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps, self.offset = eps, offset
        self.init_value = 1.0 - offset  # what random initialisation fills the weight with (engine/checkpoint.py)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.offset:
            return (x32 * (self.offset + self.weight.float())).to(x.dtype)
        return self.weight * x32.to(x.dtype)


def add_norm(delta: torch.Tensor | None, residual: torch.Tensor, norm: RMSNorm,
             kernels: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(norm(residual + delta), residual + delta); delta None: (norm(residual), residual). With `kernels` the add
    happens inside the fused RMSNorm kernel (same rounding as the eager add); a zero-centred norm (`offset`) runs
    eagerly: the kernel rounds before the weight, transformers' Qwen3NextRMSNorm after it."""
    if kernels and not norm.offset:
        if delta is None:
            return rmsnorm(residual, norm.weight, norm.eps, use_kernel=True), residual
        return rmsnorm(delta, norm.weight, norm.eps, residual=residual, use_kernel=True)
    if delta is not None:
        residual = residual + delta
    return norm(residual), residual


def add_norm_project(delta: torch.Tensor | None, residual: torch.Tensor, norm: RMSNorm, kernels: bool,
                     norm_linear: NormLinear | None = None, weight: tuple | None = None,
                     ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor]:
    """add_norm, with the matmul that reads the normed row folded in when it can be: (normed, None, residual) as
    add_norm gives them, or (None, norm(residual + delta) W^T + b, residual) when the step has a `norm_linear`
    that takes these shapes. weight: (W, b) of that matmul, None when the reader is not one matmul."""
    if norm_linear is not None and weight is not None:
        folded = norm_linear(delta, residual, norm.weight, norm.eps, norm.offset, *weight)
        if folded is not None:
            return None, *folded
    normed, residual = add_norm(delta, residual, norm, kernels)
    return normed, None, residual


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """cos, sin: [..., D] in `dtype` for absolute `positions` [...] (angles computed in float32).

    inv_freq: [D/2] float32. The two halves of the head dimension share one frequency each (rotate-half layout).
    """
    angles = positions.float()[..., None] * inv_freq.float()
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


class Attention(nn.Module):
    qkv_weight: torch.Tensor | None = None  # [(Hq + 2 Hkv) D, hidden] when the projections were fused
    qkv_bias: torch.Tensor | None = None

    def __init__(self, cfg: ModelConfig, index: int = 0):
        super().__init__()
        d, h = cfg.head_dim, cfg.hidden_size
        qkv_bias = cfg.attention_bias or cfg.qkv_bias
        # gpt-oss: this layer's own sliding window (0 = none) and one sink logit per query head, handed to the mixer
        self.window = cfg.layer_window(index)
        self.sinks = nn.Parameter(torch.zeros(cfg.num_heads)) if cfg.attention_sinks else None
        # YaRN multiplies cos and sin by its attention factor, so q.k by its square: applied once to q here (RoPE is
        # linear), so the cos/sin tables of every mixer stay the plain ones
        self.q_scale = cfg.rope_attention_factor ** 2
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, d
        self.output_gate = cfg.attn_output_gate  # q_proj rows per head: [q (D), gate (D)] (qwen3_next)
        self.q_proj = nn.Linear(h, cfg.num_heads * d * (2 if self.output_gate else 1), bias=qkv_bias)
        self.k_proj = nn.Linear(h, cfg.num_kv_heads * d, bias=qkv_bias)
        self.v_proj = nn.Linear(h, cfg.num_kv_heads * d, bias=qkv_bias)
        self.o_proj = nn.Linear(cfg.num_heads * d, h, bias=cfg.attention_bias)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(d, cfg.rms_norm_eps, cfg.norm_offset)
            self.k_norm = RMSNorm(d, cfg.rms_norm_eps, cfg.norm_offset)
        else:
            self.q_norm = self.k_norm = None

    def fused_input(self) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """(W, b) of the one matmul that reads the normed input (the fused q/k/v), None when there are three."""
        return (self.qkv_weight, self.qkv_bias) if self.qkv_weight is not None else None

    def project(self, x: torch.Tensor | None, kernels: bool, linear: Linear,
                qkv: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        """x: [B, T, hidden] -> token-major q [B, T, Hq, D], k, v [B, T, Hkv, D] (q/k-normed for qwen3) and the
        output gate [B, T, Hq * D] (None unless `output_gate`). qkv: the fused projection when it was computed with
        the norm folded in (x is then None)."""
        b, t = (x if qkv is None else qkv).shape[:2]
        hq, hkv, d = self.num_heads, self.num_kv_heads, self.head_dim
        gate = None
        if qkv is None and self.qkv_weight is not None:
            qkv = linear(x, self.qkv_weight, self.qkv_bias)
        if qkv is not None:
            q, k, v = qkv.split((hq * d, hkv * d, hkv * d), dim=-1)
        else:
            q, k, v = (linear(x, p.weight, p.bias) for p in (self.q_proj, self.k_proj, self.v_proj))
        if self.output_gate:
            q, gate = q.view(b, t, hq, 2 * d).chunk(2, dim=-1)
            gate = gate.reshape(b, t, hq * d)
        q, k, v = q.view(b, t, hq, d) if gate is None else q, k.view(b, t, hkv, d), v.view(b, t, hkv, d)
        if self.q_norm is not None:  # qwen3: per-head RMSNorm before RoPE
            if kernels and not self.q_norm.offset:
                q = rmsnorm(q, self.q_norm.weight, self.q_norm.eps, use_kernel=True)
                k = rmsnorm(k, self.k_norm.weight, self.k_norm.eps, use_kernel=True)
            else:
                q, k = self.q_norm(q), self.k_norm(k)
        if self.q_scale != 1.0:
            q = q * self.q_scale
        return q, k, v, gate

    def mixer_kwargs(self) -> dict:
        """This layer's own attention rule for the mixer (attention_step): {} for plain causal attention."""
        out = {}
        if self.window:
            out["window"] = self.window
        if self.sinks is not None:
            out["sinks"] = self.sinks
        return out

    def output(self, out: torch.Tensor, linear: Linear, gate: torch.Tensor | None = None) -> torch.Tensor:
        """out: [B, Hq, T, D] -> o-projection [B, T, hidden] (of out * sigmoid(gate) with an output gate).
        reshape, not view: a backend may return a non-contiguous result."""
        b, _, t, _ = out.shape
        out = out.transpose(1, 2).reshape(b, t, self.num_heads * self.head_dim)
        if gate is not None:
            out = out * torch.sigmoid(gate)
        return linear(out, self.o_proj.weight, self.o_proj.bias)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)); `intermediate_size` overrides the config's (a MoE's shared expert)."""

    gate_up_weight: torch.Tensor | None = None  # [2 * intermediate, hidden] when gate and up were fused
    gate_up_bias: torch.Tensor | None = None

    def __init__(self, cfg: ModelConfig, intermediate_size: int | None = None):
        super().__init__()
        h, m = cfg.hidden_size, intermediate_size or cfg.intermediate_size
        self.gate_proj = nn.Linear(h, m, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(h, m, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(m, h, bias=cfg.mlp_bias)

    def fused_input(self) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """(W, b) of the one matmul that reads the normed input (the fused gate/up), None when there are two."""
        return (self.gate_up_weight, self.gate_up_bias) if self.gate_up_weight is not None else None

    def forward(self, x: torch.Tensor | None, kernels: bool, linear: Linear, gate_up: torch.Tensor | None = None,
                silu_linear: SiluLinear | None = None) -> torch.Tensor:
        """x: [B, T, hidden] -> [B, T, hidden]; gate_up: the fused gate/up projection when it was computed with the
        norm folded in (x is then None); silu_linear: the gate folded into the down matmul, when it takes the
        fused projection's shape."""
        if gate_up is None and self.gate_up_weight is not None:
            gate_up = linear(x, self.gate_up_weight, self.gate_up_bias)
        if gate_up is not None and silu_linear is not None:
            out = silu_linear(gate_up, self.down_proj.weight, self.down_proj.bias)
            if out is not None:
                return out
        if gate_up is not None:
            gate, up = gate_up.chunk(2, dim=-1)
        else:
            gate = linear(x, self.gate_proj.weight, self.gate_proj.bias)
            up = linear(x, self.up_proj.weight, self.up_proj.bias)
        act = silu_mul(gate, up, use_kernel=True) if kernels else F.silu(gate) * up
        return linear(act, self.down_proj.weight, self.down_proj.bias)


def make_mlp(cfg: ModelConfig, index: int) -> nn.Module:
    """Layer `index`'s MLP: the mixture of experts (with its shared expert, if any) or the dense SwiGLU."""
    if not cfg.is_moe_layer(index):
        return MLP(cfg)
    shared = cfg.shared_expert_intermediate_size
    return MoE(cfg, MLP(cfg, shared) if shared else None)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, index: int = 0):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.norm_offset)
        # the token mixer: attention (K/V through the mixer) or Gated DeltaNet (a state through `mixer.state`)
        if cfg.layer_type(index) == "linear_attention":
            self.linear_attn = GatedDeltaNet(cfg)
        else:
            self.self_attn = Attention(cfg, index)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.norm_offset)
        self.mlp = make_mlp(cfg, index)

    def forward(self, i: int, delta: torch.Tensor | None, residual: torch.Tensor, mixer: Mixer, kernels: bool,
                linear: Linear, norm_linear: NormLinear | None = None,
                silu_linear: SiluLinear | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The decoder layer: (delta, residual) in, (this layer's MLP output, the residual stream before it) out;
        the previous layer's delta is added into the residual inside this layer's first norm (with `norm_linear`,
        norm and add inside the q/k/v and gate/up matmuls where the shapes allow; with `silu_linear`, the SwiGLU
        gate inside the down matmul)."""
        attn = getattr(self, "self_attn", None)
        fold = attn.fused_input() if attn is not None and norm_linear is not None else None
        normed, qkv, residual = add_norm_project(delta, residual, self.input_layernorm, kernels, norm_linear, fold)
        if attn is None:
            delta = self.linear_attn(normed, mixer.state(i), linear)
        else:
            q, k, v, gate = attn.project(normed, kernels, linear, qkv)
            delta = attn.output(mixer(i, q, k, v, **attn.mixer_kwargs()), linear, gate)
        dense = isinstance(self.mlp, MLP)  # a MoE routes the normed row: nothing to fold into
        fold = self.mlp.fused_input() if dense and norm_linear is not None else None
        normed, gate_up, residual = add_norm_project(delta, residual, self.post_attention_layernorm, kernels,
                                                     norm_linear, fold)
        if dense:
            return self.mlp(normed, kernels, linear, gate_up, silu_linear), residual
        return self.mlp(normed, kernels, linear), residual


class Backbone(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.norm_offset)


class CausalLM(nn.Module):
    """The decoder with its LM head; `lm_head.weight` is `model.embed_tokens.weight` when embeddings are tied."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = Backbone(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.tie_weights()

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def step(
        self,
        ids: torch.Tensor,
        mixer: Mixer,
        *,
        kernels: bool = False,
        linear: Linear = F.linear,
        norm_linear: NormLinear | None = None,
        silu_linear: SiluLinear | None = None,
        hooks: LayerHooks | None = None,
        num_layers: int | None = None,
        last_only: bool = False,
    ) -> torch.Tensor:
        """The model step (see the module docstring). ids: [B, T] -> logits [B, T, V] in the model dtype ([B, 1, V]
        with `last_only`). `num_layers` runs the first layers only, then the final norm and head (early exit).
        norm_linear: the folded norm + matmul (kernels/gemv.py `decode_add_norm_linear`), None to keep them apart;
        silu_linear: the folded SwiGLU gate + down matmul (`decode_silu_linear`), the same."""
        layers = self.model.layers if num_layers is None else self.model.layers[:num_layers]
        residual, delta = self.model.embed_tokens(ids), None
        for i, layer in enumerate(layers):
            if hooks is not None:
                hooks.before_layer(i)
            delta, residual = layer(i, delta, residual, mixer, kernels, linear, norm_linear, silu_linear)
            if hooks is not None:
                hooks.after_layer(i)
        if last_only:
            residual, delta = residual[:, -1:], delta[:, -1:] if delta is not None else None
        head = (self.lm_head.weight, self.lm_head.bias) if norm_linear is not None else None
        normed, logits, _ = add_norm_project(delta, residual, self.model.norm, kernels, norm_linear, head)
        return logits if logits is not None else linear(normed, self.lm_head.weight, self.lm_head.bias)
