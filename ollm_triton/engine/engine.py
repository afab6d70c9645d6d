"""`Engine`: the native decoder bound to one attention backend, one cache codec and one prefetch policy.

    engine = load_engine("path/to/checkpoint", attention=sdpa, codec=dense, prefetch=resident,
                         device="cpu", dtype=torch.float32)
    cache = engine.new_cache(batch=1, max_len=4096)
    logits = engine.forward(ids, cache)           # ids [B, T] -> float32 [B, T, V]; cache.position += T
    logits = engine.prefill(ids, cache, chunk=4096)   # a long prompt in chunks: activations bounded by the chunk
    fast = engine.fast_decoder()                  # graph-captured decode steps for decode loops, or None
    engine.fast_path                              # a FastPath: graph / piecewise / eager, and why
    engine.close()                                # frees the weights (multirun jobs in one process)

Every forward is the one model step (engine/model.py) with the plugin mixer (engine/mixers.py): the codec stores,
the backend attends, the prefetch policy brackets each layer. `prefill_chunk` (tokens, 0 = whole prompt) sets the
default chunk; `fast_decode` is "auto" (CUDA graphs on a CUDA device when the plugins declare what the whole
static step needs; else the piecewise step, captured segments with each layer's attention eager between them; else
eager with the reason), "graph", "static" (the same static-buffer step without capture: any device), "piecewise"
(that step on any plugins, captured on a GPU, uncaptured on the CPU), or "off" (engine/fast_decode.py). On CUDA
tensors the step runs the fused Triton kernels (`kernels`; describe()["fused_kernels"]).
"""

from __future__ import annotations

import gc
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ollm_triton.cache.base import KVCache, LayerSpec
from ollm_triton.cache.state import StateLayer
from ollm_triton.engine.checkpoint import (
    CheckpointError,
    empty_model,
    init_random,
    load_weights,
    read_config,
    resolve_source,
)
from ollm_triton.engine.config import ModelConfig, UnsupportedModelError
from ollm_triton.engine.fast_decode import FAST_DECODE_MODES, FastDecoder, FastPath, plan_fast_path
from ollm_triton.engine.linear_attention import gated_delta_path, state_bytes, state_shapes
from ollm_triton.engine.mixers import DECODE_MAX_TOKENS, PluginMixer, RowsMixer
from ollm_triton.engine.model import FUSED_PATH, CausalLM, rope_cos_sin
from ollm_triton.engine.placement import dtype_name, resolve_device, resolve_dtype
from ollm_triton.engine.tokenizer import Tokenizer


class Engine:
    """The native decoder with its plugins. Build it with `load_engine`."""

    # None: the fused Triton kernels on CUDA tensors and the eager ops elsewhere; True/False force one path
    # (True on the CPU runs the kernels through the Triton interpreter: tests).
    kernels: bool | None = None
    # Linear-attention layers keep their states of the last N lengths so speculative decoders can roll back
    # (cache/state.py); None = decode_max_tokens. Each kept length costs one state per layer (Qwen3-Next-80B: 77 MB
    # over its 36 layers at batch 1). A caller that never truncates asks for none (new_cache's rollback_tokens=0).
    state_rollback_tokens: int | None = None

    def __init__(
        self,
        model: CausalLM,
        *,
        attention,
        codec,
        prefetch,
        device: torch.device,
        dtype: torch.dtype,
        tokenizer: Tokenizer | None = None,
        source: str = "random",
        decode_max_tokens: int = DECODE_MAX_TOKENS,
        prefill_chunk: int = 0,
        fast_decode: str = "auto",
    ):
        self.model = model
        self.config: ModelConfig = model.config
        self.attention = attention
        self.codec = codec
        self.prefetch = prefetch
        self.device = device
        self.dtype = dtype
        self.tokenizer = tokenizer
        self.source = source
        self.decode_max_tokens = decode_max_tokens
        self.kernel_path = "none"  # what the last forward ran: "torch" or FUSED_PATH
        # MXFP4 experts hold bytes, not one element a weight: their count is the config's
        self._num_parameters = self.config.num_parameters() if self.config.expert_format == "mxfp4" else sum(
            p.numel() for p in model.parameters())
        check_attention(self.config, attention)
        prefetch.setup(model, device)
        self.inv_freq = self.config.inv_freq().to(device)
        if int(prefill_chunk) < 0:
            raise ValueError(f"prefill_chunk must be >= 0 tokens (0 = the whole prompt at once), got {prefill_chunk}")
        self.prefill_chunk = int(prefill_chunk)
        if fast_decode not in FAST_DECODE_MODES:
            raise ValueError(f"fast_decode={fast_decode!r} is not accepted; accepted: {', '.join(FAST_DECODE_MODES)}")
        self.fast_decode = fast_decode
        self.fast_path: FastPath = plan_fast_path(self, fast_decode)
        self._fast: FastDecoder | None = None

    def new_cache(self, batch: int = 1, max_len: int = 2048, rollback_tokens: int | None = None) -> KVCache:
        """A KVCache with one codec layer per decoder layer; `max_len` is the run's maximum context (codecs may
        pre-allocate to it). rollback_tokens: how far back `truncate` must reach in a linear-attention layer (None:
        `state_rollback_tokens`, else decode_max_tokens); 0 for a caller that never truncates (greedy's loop),
        which then holds one state a layer instead of 17 (Qwen3-Next-80B: 1.24 GB less, experiments/moe section 4a)."""
        if batch < 1 or max_len < 1:
            raise ValueError(f"new_cache needs batch >= 1 and max_len >= 1, got batch={batch}, max_len={max_len}")
        spec, cfg = self.layer_spec(batch, max_len), self.config
        rollback = rollback_tokens if rollback_tokens is not None else (
            self.decode_max_tokens if self.state_rollback_tokens is None else self.state_rollback_tokens)
        # a linear-attention layer holds its fixed-size state, not the codec's K/V (the codec applies elsewhere)
        return KVCache([StateLayer(spec, state_shapes(cfg, batch, self.dtype), rollback_tokens=rollback)
                        if cfg.layer_type(i) == "linear_attention" else self.codec.new_layer(spec)
                        for i in range(cfg.num_layers)])

    def layer_spec(self, batch: int, max_len: int) -> LayerSpec:
        cfg = self.config
        return LayerSpec(batch=batch, kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim, dtype=self.dtype,
                         device=self.device, max_len=max_len)

    def cache_bytes(self, tokens: int, batch: int = 1, max_len: int | None = None, rollback_tokens: int = 0) -> float:
        """What a cache of `batch` sequences holding `tokens` tokens takes at most: the codec's `bytes_for` on each
        attention layer plus the fixed-size state of each linear-attention layer (hybrid models), and the
        `rollback_tokens` earlier states such a layer keeps (`new_cache`'s argument)."""
        cfg = self.config
        spec = self.layer_spec(batch, max_len or max(tokens, 1))
        state = cfg.linear_layers * state_bytes(cfg, batch, self.dtype) * (1 + rollback_tokens)
        return self.codec.bytes_for(spec, tokens) * (cfg.num_layers - cfg.linear_layers) + state

    def use_kernels(self) -> bool:
        return self.device.type == "cuda" if self.kernels is None else self.kernels

    @torch.inference_mode()
    def forward(
        self,
        ids: torch.Tensor,
        cache: KVCache,
        positions: torch.Tensor | None = None,
        tree_mask: torch.Tensor | None = None,
        *,
        last_only: bool = False,
        num_layers: int | None = None,
    ) -> torch.Tensor:
        """Run T new tokens through the decoder, append their K/V to `cache` and advance `cache.position` by T.

        ids: [B, T] long. positions: optional [T] absolute positions (default cache.position + arange(T)).
        tree_mask: optional bool [T, T] among the new tokens (True = visible) in place of the causal triangle.
        num_layers: only the first layers, then the final norm and head (an early exit; `cache` needs that many).
        Returns float32 logits [B, T, V], or [B, 1, V] for the last token only with `last_only` (a long prefill
        then never materialises T x V logits).
        """
        if self.model is None:
            raise RuntimeError("this engine was closed")
        if ids.dim() != 2:
            raise ValueError(f"ids must be [batch, tokens], got shape {list(ids.shape)}")
        ids = ids.to(self.device)
        t = ids.shape[1]
        if positions is None:
            positions = torch.arange(cache.position, cache.position + t, device=self.device)
        else:
            positions = torch.as_tensor(positions, device=self.device).reshape(-1)
            if positions.numel() != t:
                raise ValueError(f"positions must hold one entry per new token ({t}), got {positions.numel()}")
        if tree_mask is not None:
            tree_mask = tree_mask.to(device=self.device, dtype=torch.bool)
            if tuple(tree_mask.shape) != (t, t):
                raise ValueError(f"tree_mask must be bool [{t}, {t}], got shape {list(tree_mask.shape)}")
        cos, sin = rope_cos_sin(self.inv_freq, positions, self.dtype)
        kernels = self.use_kernels()
        self.kernel_path = FUSED_PATH if kernels else "torch"
        mixer = PluginMixer(cache.layers, self.attention, cos, sin, kernels=kernels, tree_mask=tree_mask,
                            decode_max_tokens=self.decode_max_tokens)
        logits = self.model.step(ids, mixer, kernels=kernels, hooks=self.prefetch, num_layers=num_layers,
                                 last_only=last_only)
        cache.position += t
        return logits.float()

    __call__ = forward

    @torch.inference_mode()
    def forward_rows(self, ids: torch.Tensor, caches: list[KVCache], *, last_only: bool = False) -> torch.Tensor:
        """T new tokens for each of B independent sequences: ids [B, T], caches[b] row b's own cache (any codec,
        any length; each advanced by T). Returns float32 logits [B, T, V] ([B, 1, V] with `last_only`). The rows
        share the model step's matmuls; each attends over its own cache exactly as `forward` would with that cache
        alone (continuous batching: rows join and leave between steps, ollm_triton/serve/scheduler.py)."""
        if self.model is None:
            raise RuntimeError("this engine was closed")
        if ids.dim() != 2 or ids.shape[0] != len(caches):
            raise ValueError(f"ids must be [B, T] with one cache a row, got {list(ids.shape)} for {len(caches)}")
        t = ids.shape[1]
        start = torch.tensor([c.position for c in caches], device=self.device)
        positions = start[:, None] + torch.arange(t, device=self.device)[None, :]
        cos, sin = rope_cos_sin(self.inv_freq, positions, self.dtype)  # [B, T, D]
        kernels = self.use_kernels()
        mixer = RowsMixer(caches, self.attention, cos, sin, kernels=kernels, decode_max_tokens=self.decode_max_tokens)
        logits = self.model.step(ids.to(self.device), mixer, kernels=kernels, hooks=self.prefetch, last_only=last_only)
        for c in caches:
            c.position += t
        return logits.float()

    def decode_rows(self, tokens: torch.Tensor, caches: list[KVCache]) -> torch.Tensor:
        """One decode step for B independent sequences: tokens [B] -> float32 logits [B, V] (`forward_rows`)."""
        if tokens.dim() != 1:
            raise ValueError(f"tokens must be [B], got {list(tokens.shape)}")
        return self.forward_rows(tokens[:, None], caches)[:, 0]

    def prefill(self, ids: torch.Tensor, cache: KVCache, chunk: int | None = None) -> torch.Tensor:
        """Run a prompt through the decoder in chunks of `chunk` tokens (default `self.prefill_chunk`; 0 = all at
        once) and return the float32 logits of its last token, [B, V].

        Each chunk attends to the cache so far plus itself and runs its MLP over its own tokens only, so the
        activation memory is bounded by the chunk, not by the prompt (the KV cache still grows with the prompt).
        """
        chunk = self.prefill_chunk if chunk is None else int(chunk)
        if chunk < 0:
            raise ValueError(f"prefill chunk must be >= 0 tokens (0 = the whole prompt at once), got {chunk}")
        t = ids.shape[1]
        if chunk == 0 or t <= chunk:
            return self.forward(ids, cache, last_only=True)[:, -1]
        logits = None
        for start in range(0, t, chunk):
            logits = self.forward(ids[:, start : start + chunk], cache, last_only=True)
        return logits[:, -1]

    def fast_decoder(self) -> FastDecoder | None:
        """The FastDecoder that decode loops hand their steps to, or None when `fast_path` is eager."""
        if not self.fast_path.enabled:
            return None
        if self._fast is None:
            self._fast = FastDecoder(self, capture=self.fast_path.captured, piecewise=self.fast_path.piecewise,
                                     use_kernels=self.kernels)
        return self._fast

    def num_parameters(self) -> int:
        """Distinct parameters (tied embeddings counted once)."""
        return self._num_parameters

    def describe(self) -> dict[str, Any]:
        """Model, plugins and runtime choices, for metrics.json. The attention paths are reported per phase: the
        plugin's last call (prefill and eager decode) and what the fast decode steps ran, which under the whole
        captured step is the step's own kernel, not the plugin."""
        steps = self._fast.steps if self._fast is not None else 0
        fast = self.fast_path.describe()
        if self.fast_path.enabled and not steps:
            fast["fast_path"] += " (available; no decode step ran through the engine's fast decoder)"
        out = {
            "model_type": self.config.model_type,
            "model_source": self.source,
            "num_parameters": self._num_parameters,
            "num_layers": self.config.num_layers,
            "dtype": dtype_name(self.dtype),
            "device": str(self.device),
            "attention": self.attention.plugin_name,
            "attention_path": self.attention.last_path,
            "decode_attention_path": self._fast.attention_path if steps else self.attention.last_path,
            "cache": self.codec.plugin_name,
            "prefetch": self.prefetch.plugin_name,
            "decode_max_tokens": self.decode_max_tokens,
            "fused_kernels": self.kernel_path,
            "prefill_chunk": self.prefill_chunk,
            **fast,
            "fast_path_steps": steps,
            "fast_path_matmul": self._fast_matmul(),
            # the norms (and SwiGLU gate) folded into the one-row GEMVs that read them (engine section 10)
            "fast_path_fold": ("none" if self._fast is None else
                               "+".join(n for n, on in (("norm", self._fast.fold_norm), ("silu", self._fast.fold_silu))
                                        if on) or "none"),
            **{k: v for k, v in self.attention.describe().items() if k != "attention_path"},
        }
        if self.config.linear_layers:  # a hybrid model: how many layers hold a state, and what computes it
            out["linear_attention_layers"] = self.config.linear_layers
            out["linear_attention_path"] = gated_delta_path(self.device)
        if self.tokenizer is not None:
            out["tokenizer_add_bos"] = self.tokenizer.add_bos
        return out

    def _fast_matmul(self) -> str:
        """The weight matmuls of the fast decode step (kernels.gemv.decode_linear): ours at one row on a GPU."""
        if self._fast is None:
            return "none"
        return "triton:gemv at batch 1, cublas above" if self._fast.kernels and self.device.type == "cuda" else "torch"

    def close(self) -> None:
        """Drop the weights and release cached device memory, so the next job of a multirun starts clean."""
        close = getattr(self.prefetch, "close", None)
        if callable(close):
            close()
        if self._fast is not None:
            self._fast.close()
            self._fast = None
        self.model = None
        self.inv_freq = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def load_engine(
    model_source: str | os.PathLike | Mapping[str, Any] | ModelConfig,
    attention=None,
    codec=None,
    prefetch=None,
    *,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype = torch.float32,
    seed: int = 0,
    decode_max_tokens: int = DECODE_MAX_TOKENS,
    prefill_chunk: int = 0,
    fast_decode: str = "auto",
    experts: str = "dense",
) -> Engine:
    """Build an Engine.

    model_source: a checkpoint directory (config.json + *.safetensors [+ tokenizer.json]); a dict of Hugging Face
        config fields or a ModelConfig for seeded random weights; or a hub id, fetched when the network allows.
    attention, codec, prefetch: plugin instances, or registered names, or None for the baselines
        (sdpa, dense, resident).
    device: "cpu", "cuda", "cuda:N" or "auto" (cuda when available). dtype: a torch dtype, a name
        ("bfloat16", "fp16", ...), or "auto" (the checkpoint's dtype on CUDA, float32 on the CPU).
    prefill_chunk, fast_decode: see the module docstring (chunked prefill; graph-captured decode).
    experts: "dense" (the routed experts in `dtype`; an MXFP4 checkpoint is dequantized on load) or "mxfp4" (kept as
        MXFP4 codes and read so by the expert kernels: an MXFP4 checkpoint's bytes as they are, random codes for a
        random model; ModelConfig.expert_format).
    """
    from ollm_triton.registry import registry

    attention = _plugin(registry, "attention", attention)
    codec = _plugin(registry, "cache", codec)
    prefetch = _plugin(registry, "prefetch", prefetch)
    device = resolve_device(device)

    tokenizer = None
    if isinstance(model_source, ModelConfig):
        cfg, directory, source = model_source, None, "random"
    elif isinstance(model_source, Mapping):
        cfg, directory, source = ModelConfig.from_hf(dict(model_source)), None, "random"
    elif isinstance(model_source, (str, os.PathLike)):
        directory = resolve_source(model_source)
        hf = read_config(directory)
        cfg, source = ModelConfig.from_hf(hf), str(model_source)
        if (directory / "tokenizer.json").is_file():
            tokenizer = Tokenizer(directory, hf)
    else:
        raise TypeError(f"model_source must be a checkpoint path, a hub id, a config dict or a ModelConfig, "
                        f"got {type(model_source).__name__}")
    dtype = resolve_dtype(dtype, device, cfg.checkpoint_dtype)
    weights_device = torch.device(prefetch.weights_device(device))
    cfg = cfg.with_experts(experts, resident=prefetch.resident_weights)

    model = empty_model(cfg)

    def keep(name: str, value: torch.Tensor) -> torch.Tensor:  # one parameter at a time: the policy may compress it
        return prefetch.keep_weight(model, name, value, device)

    if directory is None:
        init_random(model, weights_device, dtype, seed, rng_device=device, keep=keep)
    else:
        load_weights(model, Path(directory), weights_device, dtype, keep=keep)
    model.eval()
    return Engine(model, attention=attention, codec=codec, prefetch=prefetch, device=device, dtype=dtype,
                  tokenizer=tokenizer, source=source, decode_max_tokens=decode_max_tokens,
                  prefill_chunk=prefill_chunk, fast_decode=fast_decode)


def check_attention(cfg: ModelConfig, attention) -> None:
    """Refuse, in one line, a backend that does not declare what this model's attention needs (a per-layer window,
    sink logits: ModelConfig.attention_requirements, attention/base.py)."""
    from ollm_triton.registry import registry

    for capability, why in cfg.attention_requirements().items():
        if not getattr(attention, capability, False):
            name = getattr(attention, "plugin_name", type(attention).__name__)
            able = [n for n in registry.names("attention")
                    if getattr(registry.get("attention", n).cls, capability, False)]
            raise UnsupportedModelError(
                f"model {cfg.model_type} needs {why}; attention '{name}' does not declare `{capability}` "
                f"(attention/base.py), so it would attend past them; backends that do: {', '.join(able) or 'none'}")


def _plugin(registry, kind: str, value):
    if value is None:
        return registry.build(kind, registry.baseline(kind))
    if isinstance(value, str):
        return registry.build(kind, value)
    return value


__all__ = ["CheckpointError", "Engine", "load_engine", "resolve_device", "resolve_dtype"]
