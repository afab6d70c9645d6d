"""`ModelConfig`: the few numbers the native decoder needs, read from a Hugging Face `config.json` dict.

Both config layouts are read:
- transformers 4.x: `rope_theta` at the top level, scaling in `rope_scaling` ({"type"|"rope_type": ..., "factor": ...}).
- transformers 5.x: `rope_parameters` = {"rope_type": ..., "rope_theta": ..., ...} (possibly nested per layer type,
  {"full_attention": {...}, ...}, of which the full-attention entry is used).

Per model type:
- llama: optional `attention_bias` (q/k/v/o) and `mlp_bias`; RoPE default, linear or Llama-3 ("llama3") scaling.
- mistral: no biases; an explicit `head_dim` (Mistral-Nemo) is honoured. `sliding_window` is ignored: the engine
  attends over the full context, and windowing is an attention-backend plugin's decision.
- qwen2: q/k/v carry a bias, o_proj does not (fixed by the architecture, not by a config flag).
- qwen3: RMSNorm over each head of q and k (`q_norm`, `k_norm`) before RoPE; optional `attention_bias` on q/k/v/o.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


class UnsupportedModelError(ValueError):
    """A model type or feature the native engine cannot run. The message is one line naming what is supported."""


@dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling: `kind` is "linear" (positions divided by `factor`) or "llama3" (Llama-3.1 smooth
    interpolation between `low_freq_factor` and `high_freq_factor` wavelengths)."""

    kind: str
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # bias on q/k/v/o (llama, qwen3)
    qkv_bias: bool = False  # bias on q/k/v only (qwen2)
    mlp_bias: bool = False
    qk_norm: bool = False  # per-head RMSNorm of q and k (qwen3)
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    checkpoint_dtype: str | None = None  # the dtype config.json names ("bfloat16"), for dtype="auto"
    extra: dict[str, Any] = field(default_factory=dict, compare=False)  # fields read but not used (sliding_window)

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> ModelConfig:
        """Build from a Hugging Face config dict (the contents of config.json, or `PretrainedConfig.to_dict()`)."""
        if not isinstance(hf, dict):
            raise TypeError(f"ModelConfig.from_hf expects a dict of config.json fields, got {type(hf).__name__}")
        model_type = hf.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise UnsupportedModelError(
                f"unsupported model_type {model_type!r}; the native engine supports: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                               "num_attention_heads") if hf.get(k) is None]
        if missing:
            raise ValueError(f"{model_type} config is missing required field(s): {', '.join(missing)}")
        act = hf.get("hidden_act", "silu")
        if act != "silu":
            raise UnsupportedModelError(f"unsupported hidden_act {act!r} for {model_type}; supported: silu")

        hidden, heads = int(hf["hidden_size"]), int(hf["num_attention_heads"])
        kv_heads = int(hf.get("num_key_value_heads") or heads)
        head_dim = hf.get("head_dim") or hidden // heads  # explicit head_dim wins (Mistral-Nemo, Qwen3)
        if heads % kv_heads:
            raise ValueError(f"num_attention_heads ({heads}) must be a multiple of num_key_value_heads ({kv_heads})")
        max_pos = int(hf.get("max_position_embeddings") or 2048)
        theta, scaling = _read_rope(hf, model_type, max_pos)

        attention_bias = bool(hf.get("attention_bias", False)) and model_type in ("llama", "qwen3")
        dtype = hf.get("dtype") or hf.get("torch_dtype")  # 5.x writes "dtype", 4.x "torch_dtype"
        return cls(
            model_type=model_type,
            vocab_size=int(hf["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(hf["intermediate_size"]),
            num_layers=int(hf["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=int(head_dim),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_scaling=scaling,
            max_position_embeddings=max_pos,
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            attention_bias=attention_bias,
            qkv_bias=model_type == "qwen2",
            mlp_bias=bool(hf.get("mlp_bias", False)) and model_type == "llama",
            qk_norm=model_type == "qwen3",
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=hf.get("eos_token_id"),
            checkpoint_dtype=str(dtype).replace("torch.", "") if dtype else None,
            extra={k: hf[k] for k in ("sliding_window", "use_sliding_window") if k in hf},
        )

    def num_parameters(self) -> int:
        """Parameter count of the decoder this config describes (tied embeddings counted once)."""
        h, d = self.hidden_size, self.head_dim
        q, kv = self.num_heads * d, self.num_kv_heads * d
        attn = h * q + 2 * h * kv + q * h
        if self.attention_bias:
            attn += q + 2 * kv + h
        elif self.qkv_bias:
            attn += q + 2 * kv
        if self.qk_norm:
            attn += 2 * d
        mlp = 3 * h * self.intermediate_size + ((2 * self.intermediate_size + h) if self.mlp_bias else 0)
        layer = attn + mlp + 2 * h
        head = 0 if self.tie_word_embeddings else self.vocab_size * h
        return self.vocab_size * h + self.num_layers * layer + h + head

    def inv_freq(self) -> torch.Tensor:
        """RoPE inverse frequencies [head_dim // 2], float32 on the CPU (computed there so that every device
        uses the same values, as transformers does)."""
        d = self.head_dim
        inv = 1.0 / (self.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
        s = self.rope_scaling
        if s is None:
            return inv
        if s.kind == "linear":
            return inv / s.factor
        # llama3: wavelengths shorter than original/high_freq_factor are kept, longer than original/low_freq_factor
        # are divided by factor, and the band between is a linear blend in 1/wavelength.
        low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
        high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > low_wavelen, inv / s.factor, inv)
        smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
            s.high_freq_factor - s.low_freq_factor
        )
        blended = (1 - smooth) * scaled / s.factor + smooth * scaled
        in_band = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
        return torch.where(in_band, blended, scaled)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for metrics.json."""
        out = asdict(self)
        out.pop("extra")
        return out


def _read_rope(hf: dict[str, Any], model_type: str, max_pos: int) -> tuple[float, RopeScaling | None]:
    params = hf.get("rope_parameters")
    if isinstance(params, dict) and params and all(isinstance(v, dict) for v in params.values()):
        # 5.x per-layer-type nesting: the decoder here has full attention only
        params = params.get("full_attention") or next(iter(params.values()))
    params = dict(params or {})
    legacy = hf.get("rope_scaling")  # 4.x; 5.x may still carry it in an old config.json
    if not params and isinstance(legacy, dict):
        params = dict(legacy)
    theta = params.get("rope_theta") or hf.get("rope_theta") or 10000.0
    kind = params.get("rope_type", params.get("type", "default")) or "default"
    partial = params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    if partial not in (None, 1, 1.0):
        raise UnsupportedModelError(f"{model_type}: partial_rotary_factor {partial} is not supported; supported: 1.0")
    if kind not in SUPPORTED_ROPE_TYPES:
        raise UnsupportedModelError(
            f"{model_type}: unsupported rope type {kind!r}; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    if kind == "default":
        return float(theta), None
    factor = float(params["factor"])
    if kind == "linear":
        return float(theta), RopeScaling("linear", factor)
    return float(theta), RopeScaling(
        "llama3",
        factor,
        float(params.get("low_freq_factor", 1.0)),
        float(params.get("high_freq_factor", 4.0)),
        int(params.get("original_max_position_embeddings") or hf.get("original_max_position_embeddings") or max_pos),
    )
