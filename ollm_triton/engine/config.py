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
- qwen3_moe: qwen3's attention; the MLP of layer i is a mixture of experts (engine/moe.py) unless i is in
  `mlp_only_layers` or (i + 1) % `decoder_sparse_step` != 0: `num_experts` (`num_local_experts` in transformers 5's
  own dict) SwiGLU experts of `moe_intermediate_size`, `num_experts_per_tok` routed per token, softmax over all
  experts then top-k, renormalised when `norm_topk_prob`.
- qwen3_next: `layer_types` (or every `full_attention_interval`-th layer full, default 4) mixes Gated DeltaNet
  layers (engine/linear_attention.py: `linear_*` sizes) with full attention whose q_proj also yields a sigmoid
  output gate per head, q/k norms, RoPE on the first `partial_rotary_factor` of each head; every RMSNorm but the
  gated one is zero-centred (x * (1 + w)); the MLP is qwen3_moe's with a sigmoid-gated shared expert
  (`shared_expert_intermediate_size`).
- gpt_oss: q/k/v/o biases, a learned sink logit per query head (`sinks`: a softmax column that takes mass and is
  dropped), `layer_types` alternating "sliding_attention" (a `sliding_window` of 128 keys) and "full_attention"
  (`layer_windows`), YaRN RoPE; every layer a MoE of `num_local_experts` experts of `intermediate_size` with a biased
  router (top-k logits, then softmax), clamped SwiGLU experts with biases, stored transposed with gate/up
  interleaved (transformers 5's layout; MXFP4 checkpoints are dequantized on load: engine/checkpoint.py).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

# transformers' config defaults where they differ from the engine's (rms_norm_eps 1e-6, no attention bias)
_HF_DEFAULTS: dict[str, dict[str, Any]] = {"gpt_oss": {"rms_norm_eps": 1e-5, "attention_bias": True}}

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "qwen3_moe", "qwen3_next", "gpt_oss")
LAYER_TYPES = ("full_attention", "linear_attention")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


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
    # yarn: frequencies blended between interpolated and original over the band [beta_slow, beta_fast] rotations,
    # and cos/sin multiplied by `attention_factor` (None: 0.1 ln(factor) + 1)
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    truncate: bool = True
    attention_factor: float | None = None


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
    # Mixture of experts (engine/moe.py); num_experts 0 = a dense MLP in every layer.
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = False  # renormalise the top-k routing weights to sum to 1
    decoder_sparse_step: int = 1  # layer i is MoE when (i + 1) % step == 0 and i is not in mlp_only_layers
    mlp_only_layers: tuple[int, ...] = ()
    router: str = "softmax_topk"  # softmax over every expert, then top-k; "topk_softmax": softmax over the top-k logits
    router_bias: bool = False
    expert_bias: bool = False
    expert_act: str = "silu"  # silu(gate) * up; "clamped_swiglu": gpt-oss' variant (swiglu_alpha, swiglu_limit)
    swiglu_alpha: float = 1.702
    swiglu_limit: float = 7.0
    # how the stacked expert weights are stored: "concat" gate_up_proj [E, 2I, H] (gate rows first) and
    # down_proj [E, H, I]; "interleaved_t" [E, H, 2I] with gate/up interleaved columns and [E, I, H] (gpt-oss)
    expert_layout: str = "concat"
    shared_expert_intermediate_size: int = 0  # a dense SwiGLU beside the experts, sigmoid-gated (qwen3_next)
    # Hybrid models (qwen3_next): layer i's token mixer is layer_types[i]; () = full attention everywhere. The
    # linear-attention (Gated DeltaNet) sizes: key/value heads, their dims, the short convolution's kernel.
    layer_types: tuple[str, ...] = ()
    linear_num_key_heads: int = 0
    linear_num_value_heads: int = 0
    linear_key_head_dim: int = 0
    linear_value_head_dim: int = 0
    linear_conv_kernel_dim: int = 0
    partial_rotary_factor: float = 1.0  # RoPE on the first int(head_dim * factor) dims of q and k, the rest as is
    attn_output_gate: bool = False  # q_proj yields [q | gate] per head; o_proj(attention * sigmoid(gate))
    norm_offset: float = 0.0  # 1.0: zero-centred RMSNorm weights, normalised x * (1 + w) in float32 (qwen3_next)
    # Per-layer attention (gpt_oss): layer i attends to its last layer_windows[i] keys (0 = all; () = 0 everywhere);
    # `attention_sinks`: one learned sink logit per query head. Backends declare whether they honour these
    # (attention/base.py `layer_window`, `sink_logits`); the engine refuses one that does not.
    layer_windows: tuple[int, ...] = ()
    attention_sinks: bool = False
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
        theta, scaling, partial = _read_rope(hf, model_type, max_pos)

        # a field the config leaves out takes transformers' default for that model type (GptOssConfig: eps 1e-5,
        # biases on), so a sparse config.json gives the model transformers would build from it
        defaults = _HF_DEFAULTS.get(model_type, {})
        attention_bias = bool(hf.get("attention_bias", defaults.get("attention_bias", False))) and model_type in ("llama", "qwen3", "qwen3_moe",
                                                                                "qwen3_next", "gpt_oss")
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
            rms_norm_eps=float(hf.get("rms_norm_eps", defaults.get("rms_norm_eps", 1e-6))),
            rope_theta=theta,
            rope_scaling=scaling,
            max_position_embeddings=max_pos,
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            attention_bias=attention_bias,
            qkv_bias=model_type == "qwen2",
            mlp_bias=bool(hf.get("mlp_bias", False)) and model_type == "llama",
            qk_norm=model_type in ("qwen3", "qwen3_moe", "qwen3_next"),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=hf.get("eos_token_id"),
            checkpoint_dtype=str(dtype).replace("torch.", "") if dtype else None,
            extra={k: hf[k] for k in ("sliding_window", "use_sliding_window") if k in hf},
            **_read_moe(hf, model_type),
            **_read_hybrid(hf, model_type, int(hf["num_hidden_layers"]), partial),
            **_read_gpt_oss(hf, model_type, int(hf["num_hidden_layers"])),
        )

    def layer_window(self, i: int) -> int:
        """The keys layer i's queries see, counted back from their own position (0 = every earlier key)."""
        return self.layer_windows[i] if self.layer_windows else 0

    def attention_requirements(self) -> dict[str, str]:
        """What the attention backend must honour for this model: capability (attention/base.py) -> why."""
        needs = {}
        windows = sorted({w for w in self.layer_windows if w})
        if windows:
            needs["layer_window"] = f"a sliding window of {'/'.join(map(str, windows))} keys on some layers"
        if self.attention_sinks:
            needs["sink_logits"] = "a learned sink logit per head"
        return needs

    @property
    def rope_attention_factor(self) -> float:
        """What YaRN multiplies cos and sin by (1.0 for other RoPE types)."""
        s = self.rope_scaling
        if s is None or s.kind != "yarn":
            return 1.0
        return s.attention_factor if s.attention_factor is not None else (
            0.1 * math.log(s.factor) + 1.0 if s.factor > 1 else 1.0)

    def layer_type(self, i: int) -> str:
        """Decoder layer i's token mixer: "full_attention" or "linear_attention"."""
        return self.layer_types[i] if self.layer_types else "full_attention"

    @property
    def linear_layers(self) -> int:
        """How many layers are linear attention (they hold a fixed-size state, not K/V)."""
        return sum(t == "linear_attention" for t in self.layer_types)

    @property
    def rotary_dim(self) -> int:
        """The leading dims of each q/k head that RoPE rotates (all of them unless `partial_rotary_factor` < 1)."""
        return int(self.head_dim * self.partial_rotary_factor)

    def static_step_blocker(self) -> str | None:
        """Why the engine's static decode step (dense K/V buffers, full-dim RoPE, plain attention output) cannot
        run this model (one line), or None when it can."""
        if self.linear_layers:
            return (f"model {self.model_type} has {self.linear_layers} linear-attention layers (a recurrent state, "
                    "not K/V): decode runs the eager step")
        if self.rotary_dim != self.head_dim or self.attn_output_gate or self.norm_offset:
            return f"model {self.model_type}'s partial RoPE / output gate / zero-centred norms: decode runs eager"
        return None

    def is_moe_layer(self, i: int) -> bool:
        """Whether decoder layer i's MLP is the mixture of experts (transformers' rule for qwen3_moe)."""
        return self.num_experts > 0 and i not in self.mlp_only_layers and (i + 1) % self.decoder_sparse_step == 0

    def moe_layer_parameters(self) -> int:
        """Parameters of one MoE block: router, every expert, the shared expert and its gate."""
        h, m, e = self.hidden_size, self.moe_intermediate_size, self.num_experts
        router = e * h + (e if self.router_bias else 0)
        experts = e * 3 * h * m + (e * (2 * m + h) if self.expert_bias else 0)
        s = self.shared_expert_intermediate_size
        shared = 3 * h * s + h if s else 0
        return router + experts + shared

    def moe_active_parameters(self) -> int:
        """Parameters of one MoE block that one token reads: router, its top-k experts, the shared expert."""
        h, m, k = self.hidden_size, self.moe_intermediate_size, self.num_experts_per_tok
        full = self.moe_layer_parameters()
        per_expert = 3 * h * m + ((2 * m + h) if self.expert_bias else 0)
        return full - (self.num_experts - k) * per_expert

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
        if self.attn_output_gate:
            attn += h * q
        if self.attention_sinks:
            attn += self.num_heads
        mlp = 3 * h * self.intermediate_size + ((2 * self.intermediate_size + h) if self.mlp_bias else 0)
        moe_layers = sum(self.is_moe_layer(i) for i in range(self.num_layers))
        lin = self.linear_layers
        hk, hv, dk, dv = (self.linear_num_key_heads, self.linear_num_value_heads, self.linear_key_head_dim,
                          self.linear_value_head_dim)
        # in_proj_qkvz, in_proj_ba, conv1d, dt_bias, A_log, the gated norm, out_proj
        linear_attn = (h * (2 * hk * dk + 2 * hv * dv) + 2 * h * hv + (2 * hk * dk + hv * dv) *
                       self.linear_conv_kernel_dim + 2 * hv + dv + hv * dv * h)
        layers = (self.num_layers - lin) * attn + lin * linear_attn + self.num_layers * 2 * h
        layers += (self.num_layers - moe_layers) * mlp
        layers += moe_layers * self.moe_layer_parameters()
        head = 0 if self.tie_word_embeddings else self.vocab_size * h
        return self.vocab_size * h + layers + h + head

    def inv_freq(self) -> torch.Tensor:
        """RoPE inverse frequencies [head_dim // 2], float32 on the CPU (computed there so that every device
        uses the same values, as transformers does)."""
        d = self.rotary_dim
        inv = 1.0 / (self.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
        s = self.rope_scaling
        if s is None:
            return inv
        if s.kind == "linear":
            return inv / s.factor
        if s.kind == "yarn":
            return _yarn_inv_freq(inv, d, self.rope_theta, s)
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


def _read_moe(hf: dict[str, Any], model_type: str) -> dict[str, Any]:
    """The mixture-of-experts fields of a config dict (none for dense model types)."""
    if model_type not in ("qwen3_moe", "qwen3_next"):
        return {}
    experts = hf.get("num_experts", hf.get("num_local_experts"))  # config.json: num_experts; 5.x dict: local
    top_k, size = hf.get("num_experts_per_tok"), hf.get("moe_intermediate_size")
    missing = [n for n, v in (("num_experts", experts), ("num_experts_per_tok", top_k),
                              ("moe_intermediate_size", size)) if v is None]
    if missing:
        raise ValueError(f"{model_type} config is missing required field(s): {', '.join(missing)}")
    experts, top_k, step = int(experts), int(top_k), int(hf.get("decoder_sparse_step") or 1)
    if experts > 0 and not 1 <= top_k <= experts:
        raise ValueError(f"{model_type}: num_experts_per_tok must be in 1..num_experts ({experts}), got {top_k}")
    if step < 1:
        raise ValueError(f"{model_type}: decoder_sparse_step must be >= 1, got {step}")
    return dict(num_experts=experts, num_experts_per_tok=top_k, moe_intermediate_size=int(size),
                norm_topk_prob=bool(hf.get("norm_topk_prob", False)), decoder_sparse_step=step,
                mlp_only_layers=tuple(int(i) for i in hf.get("mlp_only_layers") or ()),
                shared_expert_intermediate_size=int(hf.get("shared_expert_intermediate_size") or 0)
                if model_type == "qwen3_next" else 0)


def _read_gpt_oss(hf: dict[str, Any], model_type: str, num_layers: int) -> dict[str, Any]:
    """gpt_oss' fields: its MoE (experts of `intermediate_size`), per-layer windows, sinks."""
    if model_type != "gpt_oss":
        return {}
    experts = hf.get("num_local_experts", hf.get("num_experts"))
    top_k = hf.get("num_experts_per_tok", hf.get("experts_per_token"))
    if experts is None or top_k is None:
        raise ValueError(f"{model_type} config is missing required field(s): num_local_experts, num_experts_per_tok")
    experts, top_k = int(experts), int(top_k)
    if not 1 <= top_k <= experts:
        raise ValueError(f"{model_type}: num_experts_per_tok must be in 1..num_local_experts ({experts}), got {top_k}")
    types = tuple(hf.get("layer_types") or ("sliding_attention", "full_attention") * ((num_layers + 1) // 2))
    types = types[:num_layers] if hf.get("layer_types") is None else types
    bad = sorted({t for t in types if t not in ("sliding_attention", "full_attention")})
    if len(types) != num_layers or bad:
        raise UnsupportedModelError(
            f"{model_type}: layer_types must name sliding_attention or full_attention for each of the {num_layers} "
            f"layers, got {len(types)} entries" + (f" with {', '.join(map(repr, bad))}" if bad else ""))
    window = int(hf.get("sliding_window") or 0)
    if window < 1 and "sliding_attention" in types:
        raise ValueError(f"{model_type}: sliding_window must be >= 1 for sliding_attention layers, got {window}")
    return dict(num_experts=experts, num_experts_per_tok=top_k, moe_intermediate_size=int(hf["intermediate_size"]),
                router="topk_softmax", router_bias=True, expert_bias=True, expert_act="clamped_swiglu",
                swiglu_alpha=float(hf.get("swiglu_alpha", 1.702)), swiglu_limit=float(hf.get("swiglu_limit", 7.0)),
                expert_layout="interleaved_t", attention_sinks=True,
                layer_windows=tuple(window if t == "sliding_attention" else 0 for t in types))


def _yarn_inv_freq(inv: torch.Tensor, d: int, theta: float, s: RopeScaling) -> torch.Tensor:
    """YaRN (transformers' `_compute_yarn_parameters`): the original frequencies above `beta_fast` rotations over the
    original context, the interpolated ones (divided by factor) below `beta_slow`, a linear ramp between."""

    def dim_of(rotations: float) -> float:
        return d * math.log(s.original_max_position_embeddings / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = dim_of(s.beta_fast), dim_of(s.beta_slow)
    if s.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, d - 1)
    if low == high:
        high += 0.001  # transformers' guard against a zero-width ramp
    ramp = ((torch.arange(d // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp  # 1: the original frequency (extrapolation), 0: interpolated
    return (inv / s.factor) * (1 - keep) + inv * keep


def _read_hybrid(hf: dict[str, Any], model_type: str, num_layers: int, partial: float) -> dict[str, Any]:
    """qwen3_next's fields: layer types, the linear-attention sizes, partial RoPE, output gate, zero-centred norms."""
    if model_type != "qwen3_next":
        return {}
    types = hf.get("layer_types")
    if types is None:  # transformers' default: every `full_attention_interval`-th layer is full attention
        interval = int(hf.get("full_attention_interval") or 4)
        types = ["linear_attention" if (i + 1) % interval else "full_attention" for i in range(num_layers)]
    types = tuple(types)
    bad = sorted({t for t in types if t not in LAYER_TYPES})
    if len(types) != num_layers or bad:
        raise UnsupportedModelError(
            f"{model_type}: layer_types must name one of {', '.join(LAYER_TYPES)} for each of the {num_layers} "
            f"layers, got {len(types)} entries" + (f" with {', '.join(map(repr, bad))}" if bad else ""))
    sizes = {k: int(hf.get(k, default)) for k, default in (
        ("linear_num_key_heads", 16), ("linear_num_value_heads", 32), ("linear_key_head_dim", 128),
        ("linear_value_head_dim", 128), ("linear_conv_kernel_dim", 4))}  # transformers' defaults
    if sizes["linear_num_value_heads"] % sizes["linear_num_key_heads"]:
        raise ValueError(f"{model_type}: linear_num_value_heads ({sizes['linear_num_value_heads']}) must be a "
                         f"multiple of linear_num_key_heads ({sizes['linear_num_key_heads']})")
    if sizes["linear_conv_kernel_dim"] < 2:
        raise UnsupportedModelError(f"{model_type}: linear_conv_kernel_dim must be >= 2, got "
                                    f"{sizes['linear_conv_kernel_dim']}")
    return dict(layer_types=types, partial_rotary_factor=partial, attn_output_gate=True, norm_offset=1.0, **sizes)


def _read_rope(hf: dict[str, Any], model_type: str, max_pos: int) -> tuple[float, RopeScaling | None, float]:
    """(theta, scaling, partial_rotary_factor): a partial factor below 1 only where the model type has one."""
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
    default_partial = 0.25 if model_type == "qwen3_next" else 1.0  # transformers' default for qwen3_next
    partial = float(params.get("partial_rotary_factor", hf.get("partial_rotary_factor", default_partial)) or 1.0)
    if partial != 1.0 and model_type != "qwen3_next" or not 0 < partial <= 1:
        raise UnsupportedModelError(f"{model_type}: partial_rotary_factor {partial} is not supported; supported: 1.0"
                                    " (qwen3_next: 0 < factor <= 1)")
    if kind not in SUPPORTED_ROPE_TYPES:
        raise UnsupportedModelError(
            f"{model_type}: unsupported rope type {kind!r}; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    if kind == "default":
        return float(theta), None, partial
    factor = float(params["factor"])
    if kind == "linear":
        return float(theta), RopeScaling("linear", factor), partial
    if kind == "yarn":
        original = int(params.get("original_max_position_embeddings") or hf.get("original_max_position_embeddings")
                       or max_pos)
        attention_factor = params.get("attention_factor")
        if params.get("mscale") and params.get("mscale_all_dim"):
            raise UnsupportedModelError(f"{model_type}: yarn with mscale/mscale_all_dim is not supported; supported: "
                                        "factor, beta_fast, beta_slow, truncate, attention_factor")
        return float(theta), RopeScaling(
            "yarn", factor, original_max_position_embeddings=original,
            beta_fast=float(params.get("beta_fast") or 32.0), beta_slow=float(params.get("beta_slow") or 1.0),
            truncate=bool(params.get("truncate", True)),
            attention_factor=None if attention_factor is None else float(attention_factor)), partial
    return float(theta), RopeScaling(
        "llama3",
        factor,
        float(params.get("low_freq_factor", 1.0)),
        float(params.get("high_freq_factor", 4.0)),
        int(params.get("original_max_position_embeddings") or hf.get("original_max_position_embeddings") or max_pos),
    ), partial
