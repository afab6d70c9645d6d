"""The native Llama-family decoder: embedding, RMSNorm, RoPE, grouped-query attention, SwiGLU MLP, LM head.

Parameter names equal the Hugging Face checkpoint names (`model.embed_tokens.weight`,
`model.layers.{i}.self_attn.q_proj.weight`, `model.layers.{i}.mlp.gate_proj.weight`, `model.norm.weight`,
`lm_head.weight`, `...self_attn.q_norm.weight` for qwen3, `...q_proj.bias` for qwen2), so a safetensors state
dict loads without renaming.

Attention goes through the attention-backend plugin and K/V through the cache-codec plugin's layers; nothing here
depends on transformers. Which of the backend's two calls runs for a layer (`attention_step`):

- the layer cache is empty (the first chunk of a prompt): `prefill(q, k, v, q_offset=0)`, then append k, v;
- a tree mask is given, or T <= `decode_max_tokens` (decoding, speculative verification): append k, v first, then
  `decode(q, layer_cache)`. Every new token then sees the keys exactly as the cache stores them, which is what it
  would have seen had the tokens been decoded one at a time; so k drafted tokens verified in one call give the same
  logits as k single steps, for lossy codecs too (a quantised or evicting cache);
- otherwise (a later prompt chunk longer than `decode_max_tokens`): `prefill` over the cache's dense K/V followed
  by the chunk's own exact K/V, with `q_offset` = tokens held, then append. This is the usual chunked prefill: the
  chunk attends to itself at full precision.
For a lossless cache (dense) the two calls see the same keys under the same causal mask, so the choice changes no
result beyond floating-point summation order.

Fused kernels (`CausalLM.fused_kernels`; by default on CUDA tensors, the eager PyTorch ops elsewhere): the residual
add is fused into the next RMSNorm, RoPE into one kernel that also produces the head-major layout, and SiLU-gate
into one pass (ollm_triton/kernels/{norm,rope,mlp}.py). Their rounding points are the eager path's, so results
agree to the reduction order. A layer whose q/k/v (or gate/up) weights were concatenated into one matrix
(`qkv_weight`, `gate_up_weight`: the fast decode path does this, the separate weights become views of it) runs one
matmul instead of three (two). `CausalLM.kernel_path` says which path the last forward ran.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ollm_triton.engine.config import ModelConfig
from ollm_triton.kernels.mlp import silu_mul
from ollm_triton.kernels.norm import rmsnorm
from ollm_triton.kernels.rope import rope_qk

DECODE_MAX_TOKENS = 16
FUSED_PATH = "triton:rmsnorm+residual,rope,silu_mul"


class RMSNorm(nn.Module):
    """x / rms(x) * weight, normalised in float32 and cast back before the weight (as transformers does)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """cos, sin: [T, D] in `dtype` for absolute `positions` [T] (angles computed in float32).

    inv_freq: [D/2] float32. The two halves of the head dimension share one frequency each (rotate-half layout).
    """
    angles = positions.float()[:, None] * inv_freq.float()[None, :]
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x: [B, H, T, D] by the angles behind cos, sin: [T, D] (first half paired with second half)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class Attention(nn.Module):
    qkv_weight: torch.Tensor | None = None  # [(Hq + 2 Hkv) D, hidden] when the projections were fused
    qkv_bias: torch.Tensor | None = None

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d, h = cfg.head_dim, cfg.hidden_size
        qkv_bias = cfg.attention_bias or cfg.qkv_bias
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, d
        self.q_proj = nn.Linear(h, cfg.num_heads * d, bias=qkv_bias)
        self.k_proj = nn.Linear(h, cfg.num_kv_heads * d, bias=qkv_bias)
        self.v_proj = nn.Linear(h, cfg.num_kv_heads * d, bias=qkv_bias)
        self.o_proj = nn.Linear(cfg.num_heads * d, h, bias=cfg.attention_bias)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(d, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(d, cfg.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def project(self, x: torch.Tensor, fused: bool = False, linear=F.linear) -> tuple[torch.Tensor, ...]:
        """x: [B, T, hidden] -> token-major q [B, T, Hq, D], k, v [B, T, Hkv, D] (q/k-normed for qwen3).
        linear(x, weight, bias): the matmul (the fast decode step passes kernels.gemv.decode_linear)."""
        b, t, _ = x.shape
        hq, hkv, d = self.num_heads, self.num_kv_heads, self.head_dim
        if self.qkv_weight is not None:
            qkv = linear(x, self.qkv_weight, self.qkv_bias)
            q, k, v = qkv.split((hq * d, hkv * d, hkv * d), dim=-1)
        else:
            q, k, v = (linear(x, p.weight, p.bias) for p in (self.q_proj, self.k_proj, self.v_proj))
        q, k, v = q.view(b, t, hq, d), k.view(b, t, hkv, d), v.view(b, t, hkv, d)
        if self.q_norm is not None:  # qwen3: per-head RMSNorm before RoPE
            if fused:
                q = rmsnorm(q, self.q_norm.weight, self.q_norm.eps, use_kernel=True)
                k = rmsnorm(k, self.k_norm.weight, self.k_norm.eps, use_kernel=True)
            else:
                q, k = self.q_norm(q), self.k_norm(k)
        return q, k, v

    def forward(self, x, cos, sin, layer_cache, attention, *, tree_mask=None, decode_max_tokens=DECODE_MAX_TOKENS,
                fused: bool = False):
        """x: [B, T, hidden] -> [B, T, hidden]; appends this layer's T keys/values to `layer_cache`."""
        b, t, _ = x.shape
        q, k, v = self.project(x, fused)
        if fused:
            q, k = rope_qk(q, k, cos, sin, use_kernel=True)
            v = v.transpose(1, 2)
        else:
            q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = attention_step(q, k, v, layer_cache, attention, tree_mask=tree_mask, decode_max_tokens=decode_max_tokens)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, self.num_heads * self.head_dim))


def attention_step(q, k, v, layer_cache, attention, *, tree_mask=None, decode_max_tokens=DECODE_MAX_TOKENS):
    """Attend T new queries and store their keys (the rule is in this module's docstring).

    q: [B, Hq, T, D]; k, v: [B, Hkv, T, D] (after RoPE) -> [B, Hq, T, D].
    """
    t = q.shape[2]
    held = layer_cache.length
    if held > 0 and (tree_mask is not None or t <= decode_max_tokens):
        layer_cache.append(k, v)
        out = attention.decode(q, layer_cache, tree_mask=tree_mask)
    else:
        k_all, v_all = k, v
        if held > 0:
            past_k, past_v = layer_cache.dense()
            k_all, v_all = torch.cat((past_k, k), dim=2), torch.cat((past_v, v), dim=2)
        out = attention.prefill(q, k_all, v_all, q_offset=k_all.shape[2] - t, tree_mask=tree_mask)
        layer_cache.append(k, v)
    # eviction codecs score the held tokens with this step's queries, after the step attended to all of them
    layer_cache.observe(q)
    return out


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    gate_up_weight: torch.Tensor | None = None  # [2 * intermediate, hidden] when gate and up were fused
    gate_up_bias: torch.Tensor | None = None

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        h, m = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = nn.Linear(h, m, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(h, m, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(m, h, bias=cfg.mlp_bias)

    def forward(self, x: torch.Tensor, fused: bool = False, linear=F.linear) -> torch.Tensor:
        """linear(x, weight, bias): the matmul (the fast decode step passes kernels.gemv.decode_linear)."""
        if self.gate_up_weight is not None:
            gate, up = linear(x, self.gate_up_weight, self.gate_up_bias).chunk(2, dim=-1)
        else:
            gate, up = linear(x, self.gate_proj.weight, self.gate_proj.bias), linear(x, self.up_proj.weight,
                                                                                    self.up_proj.bias)
        act = silu_mul(gate, up, use_kernel=True) if fused else F.silu(gate) * up
        return linear(act, self.down_proj.weight, self.down_proj.bias)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, layer_cache, attention, **kw):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, layer_cache, attention, **kw)
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class CausalLM(nn.Module):
    """The decoder with its LM head; `lm_head.weight` is `model.embed_tokens.weight` when embeddings are tied."""

    # None: the fused Triton kernels on CUDA tensors and the eager ops elsewhere; True/False force one path
    # (True on the CPU runs the kernels through the Triton interpreter: tests).
    fused_kernels: bool | None = None
    kernel_path: str = "none"  # what the last forward ran: "torch" or FUSED_PATH

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

    def forward(
        self,
        ids: torch.Tensor,
        cache,
        cos: torch.Tensor,
        sin: torch.Tensor,
        attention,
        prefetch,
        *,
        tree_mask: torch.Tensor | None = None,
        decode_max_tokens: int = DECODE_MAX_TOKENS,
        last_only: bool = False,
    ) -> torch.Tensor:
        """ids: [B, T] -> logits [B, T, V] (or [B, 1, V] with last_only) in the model dtype.

        cos, sin: [T, D] for the tokens' positions. Each layer appends its K/V to `cache.layers[i]`; the caller
        advances `cache.position`. `prefetch.before_layer(i)` / `after_layer(i)` bracket decoder layer i.
        """
        x = self.model.embed_tokens(ids)
        fused = x.is_cuda if self.fused_kernels is None else self.fused_kernels
        self.kernel_path = FUSED_PATH if fused else "torch"
        if fused:
            return self._forward_fused(x, cache, cos, sin, attention, prefetch, tree_mask=tree_mask,
                                       decode_max_tokens=decode_max_tokens, last_only=last_only)
        for i, layer in enumerate(self.model.layers):
            prefetch.before_layer(i)
            x = layer(x, cos, sin, cache.layers[i], attention, tree_mask=tree_mask,
                      decode_max_tokens=decode_max_tokens)
            prefetch.after_layer(i)
        if last_only:
            x = x[:, -1:]
        return self.lm_head(self.model.norm(x))

    def _forward_fused(self, x, cache, cos, sin, attention, prefetch, *, tree_mask, decode_max_tokens, last_only):
        """`forward` with the residual add carried into the next norm: h + delta is formed inside the fused
        RMSNorm kernel (same rounding as the eager `x = x + ...`)."""
        residual, delta = x, None
        for i, layer in enumerate(self.model.layers):
            prefetch.before_layer(i)
            normed, residual = add_rmsnorm(delta, residual, layer.input_layernorm)
            delta = layer.self_attn(normed, cos, sin, cache.layers[i], attention, tree_mask=tree_mask,
                                    decode_max_tokens=decode_max_tokens, fused=True)
            normed, residual = add_rmsnorm(delta, residual, layer.post_attention_layernorm)
            delta = layer.mlp(normed, fused=True)
            prefetch.after_layer(i)
        if last_only:
            residual, delta = residual[:, -1:], delta[:, -1:]
        normed, _ = add_rmsnorm(delta, residual, self.model.norm)
        return self.lm_head(normed)


def add_rmsnorm(delta: torch.Tensor | None, residual: torch.Tensor, norm: RMSNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """(norm(residual + delta), residual + delta) through the fused kernel; delta None: norm(residual) alone."""
    if delta is None:
        return rmsnorm(residual, norm.weight, norm.eps, use_kernel=True), residual
    return rmsnorm(delta, norm.weight, norm.eps, residual=residual, use_kernel=True)
