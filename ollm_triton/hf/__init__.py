"""The transformers bridge: every cache codec as a transformers `Cache`, every attention backend by name.

    from ollm_triton.hf import CompressedKVCache
    cache = CompressedKVCache(compression_method="quantization", bits=8, cache_dir="./compressed_cache")
    outputs = model(input_ids, past_key_values=cache)
    print(cache.compression_stats.compression_ratio)

- `CompressedKVCache(codec, **params)` (cache.py): a `Cache` whose layers are the codec's `CacheLayer`s, usable as
  `past_key_values=` in `model(...)` and `model.generate(...)` of a decoder-only transformers model.
- `ollm_<backend>` attention implementations (attention.py): every registered attention plugin under
  transformers' `AttentionInterface` (`attn_implementation="ollm_sliding_window"`); `attention_name(backend,
  **params)` registers one with parameters. The flash backend is `ollm_fa` and the sdpa backend `ollm_sdp`:
  transformers reads "flash" and "sdpa" inside an implementation's name as its own kernels (attention.py).

This package sits at the top floor beside run.py: it imports engine/, cache/, attention/ and the registry, and
nothing below imports it. Its supported transformers range is `SUPPORTED` (checked at import, one line otherwise).
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

SUPPORTED = ">=5.17,<5.26"  # the cache and attention APIs this bridge was written and tested against (5.17, 5.25)


def _check_transformers() -> str:
    from packaging.specifiers import SpecifierSet

    try:
        found = version("transformers")
    except PackageNotFoundError:
        found = None
    if found is None or found not in SpecifierSet(SUPPORTED, prereleases=True):
        raise ImportError(f"ollm_triton.hf needs transformers {SUPPORTED} (pip install 'ollm-triton[hf]'); "
                          f"found {found or 'none'}")
    return found


TRANSFORMERS_VERSION = _check_transformers()

from ollm_triton.hf.attention import attention_name, register_all, set_attention  # noqa: E402
from ollm_triton.hf.cache import CompressedKVCache, CompressionStats, codec_from_spelling  # noqa: E402

register_all()

__all__ = [
    "SUPPORTED",
    "TRANSFORMERS_VERSION",
    "CompressedKVCache",
    "CompressionStats",
    "attention_name",
    "codec_from_spelling",
    "register_all",
    "set_attention",
]
