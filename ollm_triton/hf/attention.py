"""Every registered attention backend as a transformers attention implementation (`AttentionInterface`).

`attn_implementation="ollm_sliding_window"` runs transformers' model with the toolkit's `sliding_window` backend
at its schema's defaults; `attention_name("sliding_window", window=256)` registers the same backend with
parameters (validated by the schema, the CLI's) and returns its name, `ollm_sliding_window[window=256]`.
Two backends get other names (`IMPL_NAMES`), because transformers (5.17-5.25) reads words inside an implementation's
name: `flash` is `ollm_fa` (a name containing "flash" is taken for a flash-attn kernel to import, and the model
refuses to load without it) and `sdpa` is `ollm_sdp` (a name containing "sdpa" is checked against the model's own
SDPA support, so Gemma-2, which has none in 5.25, refused `ollm_sdpa`).

What a call does, for q: [B, Hq, T, D] and the k, v [B, Hkv, S, D] the cache returned:
- With a CompressedKVCache (cache.py), the cache's note says the step's mode: a decoding step goes through
  `backend.decode(q, layer)`, so the codec's fused kernel runs where it has one; a prompt or a long chunk through
  `backend.prefill(q, k, v, q_offset=S - T)`. Then `layer.observe(q)`, which scoring codecs (h2o, snapkv) need.
- With any other cache (or none), `backend.prefill(q, k, v, q_offset=S - T)`: plain right-aligned causal attention
  under the backend's own rule (window, sink, block pattern).
- A scale other than 1/sqrt(D) (Gemma's query_pre_attn_scalar) is folded into q. Padding masks (transformers builds
  its sdpa mask for these names only to see them), logit soft-capping, dropout, and a model's own sliding window
  once it would mask anything refuse with one line: the backends apply their own causal rule and know none of them.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from ollm_triton.hf.cache import take_note
from ollm_triton.registry import PluginError, registry

PREFIX = "ollm_"
IMPL_NAMES = {"flash": "fa", "sdpa": "sdp"}  # backend -> the name's tail, avoiding the words below
RESERVED = ("flash", "sdpa", "flex_attention")  # words transformers reads inside an implementation's name
_BUILT: dict[str, Any] = {}  # implementation name -> backend instance
_DECODE_PATH: dict[str, str] = {}  # implementation name -> what its last decoding step ran (`backend.last_path`)


def attention_name(backend: str, **params: Any) -> str:
    """Register backend `backend` with `params` under AttentionInterface (once) and return the implementation name
    to pass as `attn_implementation=` (or to `set_attention`)."""
    cfg = registry.config("attention", backend, params)  # one-line PluginError for a wrong name or parameter
    base = PREFIX + IMPL_NAMES.get(backend, backend)
    taken = [word for word in RESERVED if word in base]
    if taken:
        raise PluginError(f"attention {backend!r}: transformers reads {taken[0]!r} inside an implementation's name as "
                          "its own kernel; this backend needs another name (IMPL_NAMES in ollm_triton/hf/attention.py)")
    name = base + ("[" + ",".join(f"{k}={params[k]}" for k in sorted(params)) + "]" if params else "")
    if name not in _BUILT:
        spec = registry.get("attention", backend)
        _BUILT[name] = spec.cls(cfg)
        AttentionInterface.register(name, _attention_function(name, _BUILT[name]))
        # transformers' boolean masks (None when plain causal), only to see padding: the backends apply their rule
        AttentionMaskInterface.register(name, sdpa_mask)
    return name


def register_all() -> list[str]:
    """Register every attention plugin at its defaults; returns the names."""
    return [attention_name(name) for name in registry.names("attention")]


def set_attention(model, backend: str, **params: Any) -> str:
    """Switch a loaded model to backend `backend` (through transformers' own `set_attn_implementation`)."""
    name = attention_name(backend, **params)
    model.set_attn_implementation(name)
    return name


def backend_of(name: str):
    """The backend instance behind implementation `name` (its `last_path` says what the last call ran)."""
    return _BUILT[name]


def decode_path(name: str) -> str | None:
    """What the last decoding step under implementation `name` ran (e.g. `fused:QuantLayer`: the codec's fused
    kernel), or None before any; `backend_of(name).last_path` is the last call of any kind."""
    return _DECODE_PATH.get(name)


def clear_decode_path(name: str) -> None:
    """Forget what `name`'s last decoding step ran (a new run through the same implementation starts clean)."""
    _DECODE_PATH.pop(name, None)


def _attention_function(name: str, backend):
    def attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                  sliding_window: int | None = None, softcap: float | None = None, **kwargs: Any):
        """query: [B, Hq, T, D], key/value: [B, Hkv, S, D] -> ([B, T, Hq, D], None)."""
        t, d = query.shape[2], query.shape[3]
        note = take_note(getattr(module, "layer_idx", -1))  # first, so that a refusal below leaves no stale note
        if dropout:
            raise PluginError(f"{name}: attention dropout ({dropout}) is not supported (inference only)")
        if softcap is not None:
            raise PluginError(f"{name}: attention logit soft-capping (softcap={softcap}) is not supported; set the "
                              "model config's attn_logit_softcapping to None or use attn_implementation='eager'")
        seen = note.layer.appended if note is not None else key.shape[2]
        if sliding_window is not None and seen > sliding_window:
            raise PluginError(f"{name}: layer {getattr(module, 'layer_idx', '?')} of this model attends within its "
                              f"own sliding window of {sliding_window} tokens, which {name} does not apply "
                              f"({seen} tokens seen); use transformers' own attention ('eager' or 'sdpa')")
        if attention_mask is not None and not is_plain_causal(attention_mask, t):
            raise PluginError(f"{name}: applies its own causal rule and takes no other attention mask (padding or a "
                              "custom mask); run unpadded sequences of one length")
        if scaling is not None and not math.isclose(scaling * math.sqrt(d), 1.0, rel_tol=1e-6):
            query = query * (scaling * math.sqrt(d))  # the backends scale by 1/sqrt(D)
        if note is not None and note.mode == "decode":
            out = backend.decode(query, note.layer)
            _DECODE_PATH[name] = backend.last_path
        else:
            out = backend.prefill(query, key, value, q_offset=key.shape[2] - t)
        if note is not None:
            note.layer.observe(query)
        return out.transpose(1, 2).contiguous(), None

    attention.__name__ = attention.__qualname__ = name
    return attention


def is_plain_causal(mask: torch.Tensor, t: int) -> bool:
    """Whether transformers' mask [B, 1, T, S] (bool, True = attend; or additive float) is the right-aligned causal
    rule the backends apply: key j visible to query i iff j <= S - T + i."""
    if mask.dtype != torch.bool:
        mask = mask == 0
    s = mask.shape[-1]
    causal = torch.arange(s, device=mask.device)[None, :] <= torch.arange(t, device=mask.device)[:, None] + (s - t)
    return bool((mask[..., -t:, :] == causal).all())


__all__ = ["IMPL_NAMES", "PREFIX", "attention_name", "backend_of", "clear_decode_path", "decode_path", "register_all",
           "set_attention"]
