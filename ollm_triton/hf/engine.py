"""`TransformersEngine`: transformers' own model forward in the shape of the native Engine, so every task runs on it.

    python -m ollm_triton.run model=hf_transformers model.source=/path/to/any/causal-lm +cache=int4

The tasks and the forward-only decoders (greedy, sample) use an engine through `new_cache`, `prefill`,
`forward(ids, cache)`, `fast_decoder()` and a few attributes (`attention`, `codec`, `tokenizer`, `config.vocab_size`,
`model`, `device`, `decode_max_tokens`, `describe()`); this class gives them those over a transformers model:

- the run's codec is the model's `past_key_values`: `new_cache` returns a `BridgeCache`, a KVCache-shaped view (the
  codec's layers, `position`, `stats()`) of a `CompressedKVCache` (cache.py) over that codec instance;
- the run's attention backend is the model's `attn_implementation`, `ollm_<backend>[params]` (attention.py), so the
  backend's decode hands the query to the codec's fused kernel where it has one, and scoring codecs (h2o, snapkv)
  see the queries;
- the forward is the model's own (`model(ids, past_key_values=..., logits_to_keep=...)`); the cache's update rule
  is the engine's (prompt / decode block of <= 16 tokens / longer chunk), so a task measures the same thing on both.

What the native engine has and transformers' forward cannot take is refused in one line before the model loads
(`check_plugins`): a prefetch policy that moves weights (only one declaring `resident_weights` runs), a static or
captured decode step (`fast_decode` other than auto/off), a decoder that is not `forward_only` (speculative
strategies drive the engine's static steps, tree masks and early exits), and a model whose attention modules take
no `AttentionInterface` implementation.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ollm_triton.cache.base import CacheCodec, CacheLayer, KVCache
from ollm_triton.engine.fast_decode import FastPath
from ollm_triton.engine.mixers import DECODE_MAX_TOKENS
from ollm_triton.engine.placement import dtype_name, resolve_device, resolve_dtype
from ollm_triton.hf import TRANSFORMERS_VERSION
from ollm_triton.hf.attention import attention_name, backend_of, clear_decode_path, decode_path
from ollm_triton.hf.cache import CompressedKVCache
from ollm_triton.registry import PluginError

# fast_decode values transformers' forward honours: auto (here: eager, with the reason) and off
FAST_DECODE_ACCEPTED = ("auto", "off")
EAGER = FastPath("eager", reason="transformers' own forward (model runtime transformers): no static or captured "
                                  "decode step")


@dataclass(frozen=True)
class BridgeConfig:
    """What tasks read of `engine.config`, from the transformers config."""

    model_type: str
    vocab_size: int
    num_layers: int
    hidden_size: int


class BridgeCache:
    """A KVCache-shaped view of a CompressedKVCache (`hf`): the codec's layers (built at the first forward),
    `position` (tokens seen: the RoPE position), `truncate` and `stats()` as KVCache has them."""

    def __init__(self, hf: CompressedKVCache):
        self.hf = hf

    @property
    def layers(self) -> list[CacheLayer]:
        return self.hf.codec_layers()

    @property
    def position(self) -> int:
        return self.hf.get_seq_length()

    @property
    def kv_length(self) -> int:
        """Tokens a layer holds (what attention reads: fewer than `position` once a codec evicts)."""
        layers = self.layers
        return layers[0].length if layers else self.position

    def truncate(self, length: int) -> None:
        self.hf.crop(length)

    def stats(self) -> dict[str, float | int]:
        self.hf.compression_stats  # noqa: B018  (settles the last layer's pending note, as stats read the layers)
        view = KVCache(self.layers)
        view.position = self.position
        return view.stats()


def check_plugins(*, prefetch, decoder=None, fast_decode: str = "auto") -> None:
    """Refuse, in one line each, what transformers' forward cannot run (see the module docstring)."""
    if not getattr(prefetch, "resident_weights", False):
        raise PluginError(f"prefetch {prefetch.plugin_name!r} moves weights between the native engine's layers; "
                          "transformers' forward keeps every weight where the model is: under model runtime "
                          "transformers only a prefetch policy declaring resident_weights runs (+prefetch=resident)")
    if fast_decode not in FAST_DECODE_ACCEPTED:
        raise PluginError(f"fast_decode={fast_decode!r} needs the native engine's static decode step; under model "
                          f"runtime transformers accepted: {', '.join(FAST_DECODE_ACCEPTED)}")
    if decoder is not None and not getattr(decoder, "forward_only", False):
        raise PluginError(f"decoder {decoder.plugin_name!r} drives the native engine (static steps, tree masks or "
                          "early exits); under model runtime transformers accepted: decoders declaring forward_only "
                          "(greedy, sample)")


class TransformersEngine:
    """A transformers causal LM with the run's plugins, shaped as the native Engine (module docstring)."""

    kernels = None
    fast_path = EAGER

    def __init__(self, model, *, attention_impl: str, codec: CacheCodec, prefetch, device: torch.device,
                 dtype: torch.dtype, tokenizer=None, source: str = "random", prefill_chunk: int = 0):
        self.model = model
        cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        self.config = BridgeConfig(model_type=str(getattr(cfg, "model_type", model.config.model_type)),
                                   vocab_size=int(cfg.vocab_size), num_layers=int(cfg.num_hidden_layers),
                                   hidden_size=int(cfg.hidden_size))
        self.attention_impl = attention_impl
        self.attention = backend_of(attention_impl)
        clear_decode_path(attention_impl)
        self.codec = codec
        self.prefetch = prefetch
        self.device, self.dtype = device, dtype
        self.tokenizer = tokenizer
        self.source = source
        self.decode_max_tokens = DECODE_MAX_TOKENS  # the bridge cache's update rule (cache.py) is fixed at it
        if int(prefill_chunk) < 0:
            raise ValueError(f"prefill_chunk must be >= 0 tokens (0 = the whole prompt at once), got {prefill_chunk}")
        self.prefill_chunk = int(prefill_chunk)
        self._num_parameters = sum(p.numel() for p in model.parameters())
        # transformers 5.25 renamed the forward's past_key_values to cache (the old name warns until 6.0)
        self._cache_kwarg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        self.forwards = 0

    def new_cache(self, batch: int = 1, max_len: int = 2048, rollback_tokens: int | None = None) -> BridgeCache:
        """An empty cache of the run's codec (its layers are built at the first forward, from the shapes seen).
        rollback_tokens: accepted as the native engine's is; the bridge runs attention-only models, with no states
        to keep."""
        if batch < 1 or max_len < 1:
            raise ValueError(f"new_cache needs batch >= 1 and max_len >= 1, got batch={batch}, max_len={max_len}")
        return BridgeCache(CompressedKVCache(self.codec, max_len=max_len))

    @torch.inference_mode()
    def forward(self, ids: torch.Tensor, cache: BridgeCache, positions=None, tree_mask=None, *,
                last_only: bool = False, num_layers: int | None = None) -> torch.Tensor:
        """ids [B, T] -> float32 logits [B, T, V] ([B, 1, V] with `last_only`), appending to `cache`. Positions
        are the tokens the cache has seen; explicit positions, tree masks and early exits are the native engine's."""
        if positions is not None or tree_mask is not None or num_layers is not None:
            raise NotImplementedError("explicit positions, tree masks and early exits need the native engine; "
                                      "transformers' forward takes a plain causal block")
        if self.model is None:
            raise RuntimeError("this engine was closed")
        if ids.dim() != 2:
            raise ValueError(f"ids must be [batch, tokens], got shape {list(ids.shape)}")
        out = self.model(input_ids=ids.to(self.device), use_cache=True, logits_to_keep=1 if last_only else 0,
                         **{self._cache_kwarg: cache.hf})
        self.forwards += 1
        return out.logits.float()

    __call__ = forward

    def prefill(self, ids: torch.Tensor, cache: BridgeCache, chunk: int | None = None) -> torch.Tensor:
        """The prompt in chunks of `chunk` tokens (default `prefill_chunk`; 0 = at once) -> last logits [B, V]."""
        chunk = self.prefill_chunk if chunk is None else int(chunk)
        if chunk < 0:
            raise ValueError(f"prefill chunk must be >= 0 tokens (0 = the whole prompt at once), got {chunk}")
        t = ids.shape[1]
        step = t if chunk == 0 else chunk
        logits = None
        for start in range(0, t, step):
            logits = self.forward(ids[:, start : start + step], cache, last_only=True)
        return logits[:, -1]

    def fast_decoder(self) -> None:
        return None

    def num_parameters(self) -> int:
        return self._num_parameters

    def describe(self) -> dict[str, Any]:
        path = self.attention.last_path
        out = {
            "runtime": "transformers",
            "transformers_version": TRANSFORMERS_VERSION,
            "model_type": self.config.model_type,
            "model_class": type(self.model).__name__ if self.model is not None else "closed",
            "model_source": self.source,
            "num_parameters": self._num_parameters,
            "num_layers": self.config.num_layers,
            "dtype": dtype_name(self.dtype),
            "device": str(self.device),
            "attention": self.attention.plugin_name,
            "attn_implementation": self.attention_impl,
            "attention_path": path,
            "decode_attention_path": decode_path(self.attention_impl) or path,
            "cache": self.codec.plugin_name,
            "prefetch": self.prefetch.plugin_name,
            "decode_max_tokens": self.decode_max_tokens,
            "fused_kernels": "none",
            "prefill_chunk": self.prefill_chunk,
            **self.fast_path.describe(),
            "fast_path_steps": 0,
            "fast_path_matmul": "none",
        }
        if self.tokenizer is not None:
            out["tokenizer_add_bos"] = self.tokenizer.add_bos
        return out

    def close(self) -> None:
        self.model = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def __enter__(self) -> TransformersEngine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def load_transformers_engine(source: str | Path | dict, *, attention: str = "sdpa",
                             attention_params: dict | None = None, codec: CacheCodec, prefetch, decoder=None,
                             device: str | torch.device = "cpu", dtype: str | torch.dtype = "auto", seed: int = 0,
                             prefill_chunk: int = 0, fast_decode: str = "auto") -> TransformersEngine:
    """A TransformersEngine for `source`: a local directory transformers loads (`from_pretrained`, no download), or
    a dict of transformers config fields with `model_type` (seeded random weights, `AutoConfig.for_model`).
    attention: the run's backend name and parameters (becomes `attn_implementation`); codec, prefetch, decoder:
    the run's plugin instances (checked by `check_plugins` before anything loads)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    check_plugins(prefetch=prefetch, decoder=decoder, fast_decode=fast_decode)
    impl = attention_name(attention, **(attention_params or {}))
    device = resolve_device(device)
    tokenizer = None
    if isinstance(source, dict):
        fields = dict(source)
        model_type = fields.pop("model_type", None)
        if not model_type:
            raise ValueError("a random transformers model needs model_type in model.arch (e.g. gemma2, phi3)")
        try:
            hf_cfg = AutoConfig.for_model(model_type, **fields)
        except ValueError as e:
            raise ValueError(f"model.arch: {str(e).splitlines()[0]}") from None
        dtype = resolve_dtype(dtype, device)
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(hf_cfg, dtype=dtype, attn_implementation=impl)
        label = f"random {model_type}"
    else:
        from ollm_triton.engine.checkpoint import read_config, resolve_source
        from ollm_triton.engine.tokenizer import Tokenizer

        directory = resolve_source(source)
        raw = read_config(directory)
        dtype = resolve_dtype(dtype, device, raw.get("dtype") or raw.get("torch_dtype"))
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype, attn_implementation=impl,
                                                     local_files_only=True)
        if (directory / "tokenizer.json").is_file():
            tokenizer = Tokenizer(directory, raw)
        label = str(source)
    if getattr(model.config, "_attn_implementation", impl) != impl:
        raise PluginError(f"{type(model).__name__} did not take attn_implementation={impl!r} (it runs "
                          f"{model.config._attn_implementation!r}); its attention does not go through transformers' "
                          "AttentionInterface")
    model = model.to(device).eval()
    return TransformersEngine(model, attention_impl=impl, codec=codec, prefetch=prefetch, device=device, dtype=dtype,
                              tokenizer=tokenizer, source=label, prefill_chunk=prefill_chunk)


__all__ = ["BridgeCache", "TransformersEngine", "check_plugins", "load_transformers_engine"]
