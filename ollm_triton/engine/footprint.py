"""Will it fit? Weights + KV cache + activations of a run, estimated from shapes before anything is built.

`check_fits(model_cfg, dtype=, device=, batch=, context=, codec=, prefetch=)` returns the estimate (bytes, for
metrics.json) or raises `DoesNotFit` (a ValueError) with one line: what the run needs, what is free, and what to
do. It allocates nothing and reads no weights, so `model=llama3_8b` on a 24 GB CPU machine refuses in milliseconds
instead of building a float32 8B model until the OOM killer ends it.

What it counts (all upper-bound-ish, from shapes):
- weights: `ModelConfig.num_parameters()` in the run's dtype (a MoE's experts all count: all are stored; MXFP4
  experts as their codes, `ModelConfig.routed_expert_matrix_bytes`). On the
  compute device: what the prefetch policy holds there at once (`prefetch.device_weight_bytes(total)`; every
  weight for resident, head + layer slots for the streaming policies). In host memory: what the policy declares
  (`prefetch.host_weight_bytes`): all of them for layer streaming (load_engine materialises them there), the routed
  experts in their stored form for expert streaming (fp8 codes + scales: about half of bf16).
- KV: `codec.bytes_per_token(LayerSpec)` x context x attention layers (the codec declares its own cost: int4 a
  quarter of bf16, eviction codecs dense as an upper bound), plus the fixed-size state of each linear-attention
  layer of a hybrid model (engine/linear_attention.py `state_bytes`), which no codec touches, times the lengths a
  layer keeps for rollback (`state_rollback_tokens` + 1: cache/state.py; 1 for a forward-only decoder, 17 for a
  speculative one). On a GPU a codec with
  `store=cpu|disk` keeps only `codec.device_layers(...)` layers there at once (three); the rest count as host memory
  (for store=disk an upper bound: those wait in files).
- activations of the largest forward (the prompt, or one `prefill_chunk` of it): hidden states, q/k/v, the MLP's
  intermediate (a MoE's: k expert rows per token), on the CPU the float32 attention scores of one layer (the math
  path materialises them), for a model with sink logits (gpt-oss) what the baseline's `attend_with_sinks` holds
  (attention/sdpa.py `sink_attention_bytes`: one query chunk's float32 scores and their copy in the model dtype; the
  Triton `flash` path holds none, so for it this is an upper bound), and the float32 logits of one decode block (a
  prefill keeps only its last row).
- with a `prefill_chunk` shorter than the context: what the last chunk's attention step holds that grows with the
  keys it reads (`chunk_attention_bytes`: the held K/V concatenated with the chunk's, a stored codec's K/V decoded
  back, and the masks the attention backend declares, `AttentionBackend.prefill_mask_bytes`: 2.15 GB for a
  4096-token chunk at 128k on Llama-3-8B shapes with sdpa and dense KV). Without it the estimate was 1.9-2.4 GB
  under the measured peaks of the memory study's 128k rows (experiments/memory section 2); the memory adapter
  (adapt/memory.py) sizes its dense cache with the same function.

Against what: free device memory (`torch.cuda.mem_get_info`, capped by the run's `device_memory_gb`) on a GPU,
available host memory (psutil) on the CPU; on a GPU the host must also hold the weights a streaming policy keeps
there.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch

from ollm_triton.attention.base import AttentionBackend
from ollm_triton.attention.sdpa import sink_attention_bytes
from ollm_triton.cache.base import LayerSpec
from ollm_triton.cache.quant import DENSE_SLICE
from ollm_triton.cache.storage import StoredCodec
from ollm_triton.engine.config import ModelConfig
from ollm_triton.engine.linear_attention import state_bytes
from ollm_triton.kernels.gated_delta import CHUNK

GB = 1e9
LOGIT_ROWS = 16  # logits rows of the largest forward that keeps them all: a decode block, a perplexity chunk
USABLE = 0.9  # share of the free memory a run may plan to fill (allocator slack, the OS, other processes)


class DoesNotFit(ValueError):
    """A run that cannot fit; the message is one line: the need, what is free, what to do."""


def model_config(source: ModelConfig | Mapping[str, Any] | str | os.PathLike) -> ModelConfig:
    """A ModelConfig for a model source: a ModelConfig, a dict of Hugging Face config fields (`arch` of a
    source=random model), or a checkpoint directory / hub id (reads its config.json only)."""
    if isinstance(source, ModelConfig):
        return source
    if isinstance(source, Mapping):
        return ModelConfig.from_hf(dict(source))
    from ollm_triton.engine.checkpoint import read_config, resolve_source

    return ModelConfig.from_hf(read_config(resolve_source(source)))


def _elt(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def estimate(model_cfg: ModelConfig, *, dtype: torch.dtype, device: torch.device, batch: int, context: int,
             codec, prefetch, prefill_chunk: int = 0, state_rollback_tokens: int = 0,
             attention=None) -> dict[str, int]:
    """The bytes a run needs, by part (see the module docstring); no memory is read or allocated. attention: the
    run's backend (its declared mask bytes; None: sdpa's, an upper bound for the others)."""
    cfg = model_config(model_cfg)
    device = torch.device(device)
    elt = _elt(dtype)
    stored, as_dtype = cfg.routed_expert_matrix_bytes(elt)
    weights = cfg.num_parameters() * elt - as_dtype + stored  # MXFP4 experts as their codes (ModelConfig.expert_format)
    h, d = cfg.hidden_size, cfg.head_dim
    embed = cfg.vocab_size * h * elt
    head = embed * (1 if cfg.tie_word_embeddings else 2) + h * elt
    layer = (weights - head) // max(cfg.num_layers, 1)
    # every routed expert of every MoE layer: what a policy streaming by expert keeps on the host (prefetch/experts.py)
    biases = (2 * cfg.moe_intermediate_size + cfg.hidden_size) if cfg.expert_bias else 0
    experts = stored + sum(cfg.is_moe_layer(i) for i in range(cfg.num_layers)) * cfg.num_experts * biases * elt
    device_weights = weights if device.type == "cpu" else float(prefetch.device_weight_bytes(
        weights, layer_bytes=layer, num_layers=cfg.num_layers, head_bytes=head, expert_bytes=experts))
    kv = kv_dense = kv_host = 0
    if context > 0:
        spec = LayerSpec(batch=batch, kv_heads=cfg.num_kv_heads, head_dim=d, dtype=dtype, device=device,
                         max_len=context)
        attention_layers = cfg.num_layers - cfg.linear_layers  # the codec holds these; linear ones a fixed state
        per_layer = codec.bytes_for(spec, context)
        on_device = codec.device_layers(attention_layers, device)  # the others wait in host memory (store=cpu)
        kv = int(per_layer * on_device)
        kv_host = int(per_layer * (attention_layers - on_device))
        kv_dense = 2 * batch * cfg.num_kv_heads * d * elt * context * attention_layers
    # conv + recurrent state, whatever the context, once per length a layer keeps for rollback
    state = cfg.linear_layers * state_bytes(cfg, batch, dtype) * (1 + state_rollback_tokens)
    kv, kv_dense = kv + state, kv_dense + state
    t = min(context, prefill_chunk) if prefill_chunk else context
    acts = forward_activation_bytes(cfg, dtype=dtype, device=device, batch=batch, tokens=t, context=context)
    chunk = 0
    if cfg.num_layers > cfg.linear_layers:  # a later chunk reads the held keys back (none for the first)
        chunk = chunk_attention_bytes(cfg, dtype=dtype, device=device, batch=batch, tokens=t, context=context,
                                      codec=codec, attention=attention)
    acts += chunk
    # what the policy keeps on the host, in its own storage (prefetch/experts.py host_dtype=fp8: the experts' codes)
    host_weights = weights if device.type == "cpu" else prefetch.host_weight_bytes(
        device, weights, expert_bytes=experts, element_size=elt)
    on_device = device_weights + kv + acts
    return {
        "weights_bytes": int(weights),
        "device_weights_bytes": int(device_weights),
        "kv_bytes": int(kv),  # on the device
        "kv_host_bytes": int(kv_host),  # the layers a stored codec keeps on the host or on disk (counted as host)
        "kv_dense_bytes": int(kv_dense),  # what the same tokens take uncompressed (the advice's yardstick)
        "state_bytes": int(state),  # of kv_bytes: the linear-attention layers' fixed-size states (kept ones too)
        "activation_bytes": int(acts),  # with the last prompt chunk's attention transient
        "chunk_attention_bytes": int(chunk),
        "device_bytes": int(on_device),
        # on the CPU the device is the host; on a GPU the host holds what a streaming policy keeps there
        "host_bytes": int(on_device if device.type == "cpu" else host_weights + kv_host),
        "host_weights_bytes": int(weights if device.type == "cpu" else host_weights),
        "routed_expert_bytes": int(experts),  # every routed expert of every MoE layer, in the model dtype
    }


def forward_activation_bytes(cfg: ModelConfig, *, dtype: torch.dtype, device: torch.device, batch: int, tokens: int,
                             context: int) -> int:
    """Activations of one forward of `tokens` new tokens (a prompt chunk) whose attention reads `context` keys: the
    residual stream, q/k/v and the MLP of the chunk, on the CPU the float32 scores of one layer, with sink logits
    what the baseline's sink attention holds over `context` keys (both at once they are not: the larger), the
    float32 logits of one decode block, a hybrid model's gated delta rule. What grows with the keys a later chunk
    reads from the cache is `chunk_attention_bytes`."""
    if tokens <= 0:
        return 0
    elt = _elt(dtype)
    h, d, t = cfg.hidden_size, cfg.head_dim, tokens
    qkv = (cfg.num_heads + 2 * cfg.num_kv_heads) * d
    acts = batch * t * (4 * h + qkv + _mlp_width(cfg)) * elt  # residual stream, q/k/v, MLP
    scores = 0
    if torch.device(device).type == "cpu":  # the math path's float32 scores [B, Hq, T, S] of one layer
        scores = batch * cfg.num_heads * t * context * 4
    if cfg.attention_sinks:  # a chunk of float32 scores, their model-dtype copy and the [T, S] causal mask
        scores = max(scores, sink_attention_bytes(batch, cfg.num_heads, t, context, elt) + t * context)
    acts += scores
    acts += batch * min(t, LOGIT_ROWS) * cfg.vocab_size * 4  # float32 logits (a prefill keeps its last row)
    if cfg.linear_layers:  # the chunked gated delta rule in float32: q/k/v/outputs and three [C, C] per chunk
        hv, conv = cfg.linear_num_value_heads, 2 * cfg.linear_num_key_heads * cfg.linear_key_head_dim
        conv += hv * cfg.linear_value_head_dim
        acts += batch * t * 4 * (3 * conv + 3 * hv * CHUNK)
    return int(acts)


READ_WORK = 16  # bytes per element of one K or V tensor that a codec's read-back works through (int32 unpacking,
# then float32 codes, scale and zero point: kernels/quant.py's dequantize_*_ref peaks at 13)


def chunk_attention_bytes(cfg: ModelConfig, *, dtype: torch.dtype, device: torch.device, batch: int, tokens: int,
                          context: int, codec, attention=None) -> int:
    """What one layer's attention step of a later prompt chunk holds at once beyond `forward_activation_bytes`:
    `tokens` new tokens over `context` keys, of which context - tokens come from the cache (engine/mixers.py
    attention_step; 0 for the first chunk, which attends to itself under is_causal, and for decode-sized blocks).

    - the held K/V concatenated with the chunk's: K and V of `context` tokens in the model dtype;
    - the causal mask, bool [T, S], and the additive copy in the model dtype that torch's SDPA makes of it for its
      memory-efficient kernel (at 4096 x 40,960 in bf16: 320 MiB, the H100 run's failed allocation): what
      `attention` declares (AttentionBackend.prefill_mask_bytes; the Triton kernels hold none; None: sdpa's);
    - a codec whose layers are not the model-dtype buffers that dense() slices (its CacheCodec does not declare
      `static_buffers`) reads the held tokens back through dense(): K and V in the model dtype, alive through the
      attention, and while they are written, one slice of them as decoded and its decoding work
      (READ_WORK bytes an element; at most DENSE_SLICE tokens: the quantizers decode slice by slice into their
      output).
    Grows with the context: at 4096 x 53,248 on Llama-3-8B shapes (bf16) it is 0.87 GB over a dense cache."""
    held = context - tokens
    if held <= 0 or tokens <= 0:
        return 0
    elt = _elt(dtype)
    per_token = 2 * batch * cfg.num_kv_heads * cfg.head_dim * elt  # K and V of one token, one layer
    masks = (attention or AttentionBackend()).prefill_mask_bytes(tokens, context, elt, device)
    attend = per_token * context + masks
    if getattr(codec, "static_buffers", False):
        return int(attend)
    read = per_token * held  # the held tokens decoded to the model dtype
    piece = min(held, DENSE_SLICE)  # one slice: its K and V as decoded, and the decoding's intermediates
    decode = read + (per_token + READ_WORK * batch * cfg.num_kv_heads * cfg.head_dim) * piece
    return int(max(read + attend, decode))


def _mlp_width(cfg: ModelConfig) -> int:
    """Activation elements per token of the widest MLP: the dense SwiGLU's gate, up and product, or a MoE's router
    logits plus, for each of its k slots, the expert's intermediate row (padding included) and its output row."""
    moe_layers = sum(cfg.is_moe_layer(i) for i in range(cfg.num_layers))
    dense = 3 * cfg.intermediate_size if moe_layers < cfg.num_layers else 0
    if not moe_layers:
        return dense
    moe = cfg.num_experts + cfg.num_experts_per_tok * (3 * cfg.moe_intermediate_size + cfg.hidden_size)
    return max(dense, moe + 3 * cfg.shared_expert_intermediate_size)


def free_memory(device: torch.device, device_memory_gb: float | None = None) -> tuple[int, int]:
    """(free device bytes, available host bytes); on the CPU both are the host's available memory. The run's
    `device_memory_gb` cap bounds the device figure."""
    import psutil

    host = int(psutil.virtual_memory().available)
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        if device_memory_gb:
            free = min(free, int(device_memory_gb * GB))
        return int(free), host
    return host, host


def check_fits(model_cfg: ModelConfig | Mapping[str, Any] | str | os.PathLike, *, dtype: torch.dtype | str,
               device: torch.device | str, batch: int, context: int, codec, prefetch,
               device_memory_gb: float | None = None, prefill_chunk: int = 0, name: str | None = None,
               free: tuple[int, int] | None = None, state_rollback_tokens: int = 0,
               attention=None, experts: str = "dense") -> dict[str, Any]:
    """Raise DoesNotFit (one line) unless weights + KV + activations of the run fit; return the estimate.

    model_cfg: a ModelConfig, a dict of Hugging Face config fields (source=random's `arch`), or a checkpoint
    directory. dtype: a torch dtype or a name ("auto" resolves as load_engine does). batch, context: the largest
    (sequences, tokens) a task holds in one cache (Task.footprint). codec, prefetch: the built plugins.
    prefill_chunk: the run's prefill_chunk (bounds activations). name: the model's name in the message.
    state_rollback_tokens: the lengths a linear-attention layer keeps besides its state (0: a forward-only decoder).
    attention: the run's attention backend (the masks a later prompt chunk holds; None: sdpa's).
    experts: how the routed experts are stored (load_engine's `experts`; ModelConfig.with_experts refuses in one line).
    free: (device, host) free bytes to check against instead of measuring them (tests).
    """
    from ollm_triton.engine.placement import dtype_name, resolve_dtype

    cfg = model_config(model_cfg).with_experts(experts, resident=getattr(prefetch, "resident_weights", True))
    device = torch.device(device)
    dtype = resolve_dtype(dtype, device, cfg.checkpoint_dtype)
    est = estimate(cfg, dtype=dtype, device=device, batch=batch, context=context, codec=codec, prefetch=prefetch,
                   prefill_chunk=prefill_chunk, state_rollback_tokens=state_rollback_tokens, attention=attention)
    free_device, free_host = free if free is not None else free_memory(device, device_memory_gb)
    if device.type == "cuda" and device_memory_gb:
        free_device = min(free_device, int(device_memory_gb * GB))
    est.update({"free_device_bytes": int(free_device), "free_host_bytes": int(free_host)})
    label = name or f"{cfg.model_type} {cfg.num_parameters() / 1e9:.2f}B"
    where = "host memory" if device.type == "cpu" else f"{device} memory"
    over = []
    if est["device_bytes"] > USABLE * free_device:
        over.append((where, est["device_bytes"], free_device))
    if device.type != "cpu" and est["host_bytes"] > USABLE * free_host:
        over.append(("host memory (the weights a streaming policy keeps there)", est["host_bytes"], free_host))
    if not over:
        est["fits"] = True
        return est
    what, need, have = over[0]
    parts = (f"weights {est['device_weights_bytes'] / GB:.2f} GB {dtype_name(dtype)}"
             if what != "host memory (the weights a streaming policy keeps there)"
             else f"weights {est['host_weights_bytes'] / GB:.2f} GB as the prefetch policy stores them")
    if what != "host memory (the weights a streaming policy keeps there)":
        parts += (f" + KV {est['kv_bytes'] / GB:.2f} GB ({getattr(codec, 'plugin_name', type(codec).__name__)})"
                  f" + activations {est['activation_bytes'] / GB:.2f} GB")
    cap = f" (device_memory_gb={device_memory_gb})" if device.type == "cuda" and device_memory_gb else ""
    host_short = what == "host memory (the weights a streaming policy keeps there)"
    advice = _advice(est, device, dtype, have, codec, prefill_chunk, prefetch if host_short else None, cfg.model_type)
    raise DoesNotFit(
        f"{label} does not fit: {batch} x {context} tokens need {need / GB:.1f} GB of {what} ({parts}) but "
        f"{have / GB:.1f} GB is free{cap}; {advice}")


# the small random-weight preset of each architecture (conf/model/): the plumbing of a run on any machine
TINY_PRESETS = {"qwen3_moe": "tiny_qwen3_moe", "gpt_oss": "tiny_gpt_oss", "qwen3_next": "tiny_qwen3_next"}


def _advice(est: dict[str, int], device: torch.device, dtype: torch.dtype, have: int, codec,
            prefill_chunk: int, host_policy=None, model_type: str = "llama") -> str:
    tips = []
    if host_policy is not None:  # the host is what is short: the streaming policy may store its weights smaller
        tip = host_policy.host_advice(USABLE * have, est["weights_bytes"], est["routed_expert_bytes"], _elt(dtype))
        if tip:
            tips.append(tip)
    weights = est["device_weights_bytes"]
    if device.type == "cpu":
        tips.append("use a GPU (device=cuda)")
        if dtype == torch.float32 and est["weights_bytes"] / 2 + est["kv_bytes"] / 2 < USABLE * have:
            tips.append("model.dtype=bfloat16")
    elif weights > 0.5 * USABLE * have and weights >= est["weights_bytes"]:  # not streaming yet
        budget = max(USABLE * have / GB - 1.0, 0.5)
        tips.append(f"+prefetch=lookahead prefetch.budget_gb={budget:.0f}")
    if device.type == "cuda" and isinstance(codec, StoredCodec) and not est.get("kv_host_bytes") \
            and est["kv_bytes"] > 0.25 * est["device_bytes"]:
        tips.append("cache.store=cpu (the KV waits in host memory between layers)")
    compresses = est["kv_bytes"] < 0.5 * est.get("kv_dense_bytes", est["kv_bytes"])  # read from the codec's bytes
    if est["kv_bytes"] > 0.25 * est["device_bytes"] and not compresses:
        tips.append("+cache=int4")
    if est["activation_bytes"] > 0.25 * est["device_bytes"] and not prefill_chunk:
        tips.append("prefill_chunk=4096")
    if est["kv_bytes"] + est["activation_bytes"] > 0.25 * est["device_bytes"]:
        tips.append("a shorter context or smaller batch")
    tips.append(f"model={TINY_PRESETS.get(model_type, 'tiny_random')}")
    return "to run it: " + (", ".join(tips[:-1]) + " or " if len(tips) > 1 else "") + tips[-1]


__all__ = ["DoesNotFit", "check_fits", "chunk_attention_bytes", "estimate", "forward_activation_bytes", "free_memory",
           "model_config"]
