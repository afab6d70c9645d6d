"""Every cache codec x the sdpa backend through a CacheLayer on the CPU (the engine's call order), the configs,
and the stats every codec reports."""

from pathlib import Path

import pytest
import torch
import yaml

from ollm_triton.cache.base import KVCache, LayerSpec
from ollm_triton.registry import registry

CONF = Path(__file__).resolve().parents[1] / "ollm_triton" / "conf" / "cache"
B, HKV, GQ, D = 1, 2, 4, 32
PROMPT, STEPS = 150, 6

# small settings so every codec compresses something within 150 tokens
PARAMS = {
    "int8": {"group_size": 32, "residual": 16},
    "int4": {"group_size": 32, "residual": 16},
    "int2": {"group_size": 32, "residual": 16},
    "quant": {"group_size": 32, "residual": 16, "bits": 4},
    "streaming": {"ratio": 0.5},
    "h2o": {"ratio": 0.5},
    "snapkv": {"ratio": 0.5, "window": 16},
    "cluster": {"num_clusters": 32, "residual": 16, "iters": 3},
}
# relative RMS error of the attention outputs against the dense cache
TOLERANCE = {"dense": 0.0, "int8": 0.02, "int4": 0.25, "quant": 0.25, "int2": 1.0}


def attention_step(q, k, v, layer, backend):
    """What the engine does for one layer (ollm_triton/engine/model.py), plus the observe hook."""
    if layer.length > 0 and q.shape[2] <= 16:
        layer.append(k, v)
        out = backend.decode(q, layer)
    else:
        k_all, v_all = k, v
        if layer.length:
            past_k, past_v = layer.dense()
            k_all, v_all = torch.cat((past_k, k), 2), torch.cat((past_v, v), 2)
        out = backend.prefill(q, k_all, v_all, q_offset=k_all.shape[2] - q.shape[2])
        layer.append(k, v)
    layer.observe(q)
    return out


def run_codec(name, params, backend_name="sdpa"):
    g = torch.Generator().manual_seed(0)
    n = PROMPT + STEPS + 3
    q = torch.randn(B, HKV * GQ, n, D, generator=g)
    k = torch.randn(B, HKV, n, D, generator=g)
    v = torch.randn(B, HKV, n, D, generator=g)
    spec = LayerSpec(batch=B, kv_heads=HKV, head_dim=D, dtype=torch.float32, device=torch.device("cpu"), max_len=n)
    cache = KVCache([registry.build("cache", name, params).new_layer(spec)])
    layer, backend = cache.layers[0], registry.build("attention", backend_name)
    outs = [attention_step(q[:, :, :PROMPT], k[:, :, :PROMPT], v[:, :, :PROMPT], layer, backend)]
    cache.position = PROMPT
    for i in range(PROMPT, PROMPT + STEPS):
        outs.append(attention_step(q[:, :, i : i + 1], k[:, :, i : i + 1], v[:, :, i : i + 1], layer, backend))
        cache.position += 1
    sl = slice(PROMPT + STEPS, n)  # three draft tokens verified in one step, two rejected
    outs.append(attention_step(q[:, :, sl], k[:, :, sl], v[:, :, sl], layer, backend))
    cache.position += 3
    cache.truncate(cache.position - 2)
    return torch.cat(outs, 2), cache


@pytest.fixture(scope="module")
def dense_outputs():
    return run_codec("dense", {})[0]


def test_every_registered_codec_is_covered_and_has_a_config():
    names = set(registry.names("cache"))
    assert names <= set(PARAMS) | {"dense"}, f"add new codecs to PARAMS: {names - set(PARAMS)}"
    assert {p.stem for p in CONF.glob("*.yaml")} >= names


@pytest.mark.parametrize("path", sorted(CONF.glob("*.yaml")), ids=lambda p: p.stem)
def test_config_files_build(path):
    cfg = yaml.safe_load(path.read_text())
    name = cfg.pop("name")
    assert name == path.stem
    layer = registry.build("cache", name, cfg).new_layer(
        LayerSpec(batch=1, kv_heads=2, head_dim=128, dtype=torch.bfloat16, device=torch.device("cpu"), max_len=64))
    layer.append(torch.zeros(1, 2, 3, 128, dtype=torch.bfloat16), torch.zeros(1, 2, 3, 128, dtype=torch.bfloat16))
    assert layer.length == 3


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_codec_through_sdpa_matches_dense_within_its_loss(name, dense_outputs):
    out, cache = run_codec(name, PARAMS[name])
    assert out.shape == dense_outputs.shape and torch.isfinite(out).all()
    err = ((out - dense_outputs).pow(2).mean() / dense_outputs.pow(2).mean()).sqrt().item()
    if name in TOLERANCE:
        assert err <= TOLERANCE[name]
    else:  # lossy by design (eviction, clustering): it changes the outputs, boundedly
        assert 0 < err < 1.5
    st = cache.stats()
    assert st["kv_tokens_seen"] == PROMPT + STEPS + 1
    assert st["kv_original_bytes"] == 2 * B * HKV * D * 4 * (PROMPT + STEPS + 1)
    assert 0 < st["kv_ratio"] < 1, st
    assert st["kv_compress_seconds"] > 0


@pytest.mark.parametrize("name", ["streaming", "h2o", "snapkv"])
def test_eviction_with_a_budget_above_the_length_is_lossless(name, dense_outputs):
    params = {"budget": 1000, **({"window": 16} if name == "snapkv" else {})}
    out, cache = run_codec(name, params)
    torch.testing.assert_close(out, dense_outputs, rtol=1e-5, atol=1e-5)
    assert cache.stats()["kv_tokens_kept"] == PROMPT + STEPS + 1


def test_windowed_backend_with_quantized_cache_on_cpu():
    if "sliding_window" not in registry.names("attention"):
        pytest.skip("no sliding_window backend registered")
    out, _ = run_codec("int4", PARAMS["int4"], backend_name="sliding_window")
    assert torch.isfinite(out).all()
