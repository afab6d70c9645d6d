"""Storage tiers (store=cpu|disk): the file format, and codecs giving the same results from host or disk."""

import pytest
import torch
from test_cache_codecs import PARAMS, run_codec

from ollm_triton.cache.base import LayerSpec
from ollm_triton.cache.storage import StoredLayer, read_tensors, write_tensors
from ollm_triton.registry import PluginError, registry


def test_file_roundtrip_every_dtype(tmp_path):
    tensors = {
        "f32": torch.randn(3, 5),
        "bf16": torch.randn(2, 7).to(torch.bfloat16),
        "f16": torch.randn(4).half(),
        "u8": torch.randint(0, 255, (2, 3, 4), dtype=torch.uint8),
        "i16": torch.randint(-300, 300, (9,), dtype=torch.int16),
        "i32": torch.arange(5, dtype=torch.int32),
        "empty": torch.empty(2, 0, 4),
        "sliced": torch.randn(6, 8)[:, 2:5],  # non-contiguous
    }
    path = tmp_path / "layer.bin"
    write_tensors(path, tensors)
    back = read_tensors(path)
    assert set(back) == set(tensors)
    for name, t in tensors.items():
        assert back[name].dtype == t.dtype and back[name].shape == t.shape
        assert torch.equal(back[name], t)
    assert not path.with_suffix(".tmp").exists()


def test_corrupt_file_fails_with_the_tensor_named(tmp_path):
    path = tmp_path / "layer.bin"
    write_tensors(path, {"a": torch.zeros(100), "b": torch.ones(10)})
    raw = bytearray(path.read_bytes())
    raw[-5] ^= 0x40  # inside tensor b
    path.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="checksum mismatch in tensor 'b'"):
        read_tensors(path)
    path.write_bytes(b"NOTMAGIC" + bytes(raw[8:]))
    with pytest.raises(ValueError, match="bad magic"):
        read_tensors(path)


def test_store_parameters_are_checked():
    with pytest.raises(PluginError, match="store=disk needs cache_dir"):
        registry.build("cache", "int4", {"store": "disk"})
    with pytest.raises(PluginError, match="store must be one of device, cpu, disk"):
        registry.build("cache", "h2o", {"store": "nvme"})


def test_cpu_store_on_a_cpu_run_is_the_plain_layer():
    spec = LayerSpec(batch=1, kv_heads=2, head_dim=32, dtype=torch.float32, device=torch.device("cpu"), max_len=64)
    layer = registry.build("cache", "int4", {"store": "cpu"}).new_layer(spec)
    assert not isinstance(layer, StoredLayer)


@pytest.mark.parametrize("name", ["int4", "h2o", "snapkv", "cluster"])
def test_disk_tier_gives_identical_results_and_holds_nothing_between_steps(name, tmp_path):
    ref, ref_cache = run_codec(name, PARAMS[name])
    out, cache = run_codec(name, {**PARAMS[name], "store": "disk", "cache_dir": str(tmp_path)})
    assert torch.equal(out, ref)
    layer = cache.layers[0]
    assert isinstance(layer, StoredLayer) and layer.state == "disk"
    inner_tensors = [t for t in vars(layer.inner).values() if isinstance(t, torch.Tensor)]
    assert inner_tensors and all(t.device.type == "meta" for t in inner_tensors)  # nothing kept in memory
    layer._pending.result()  # the write has landed
    assert layer.path.exists() and layer.path.stat().st_size > 0
    st, ref_st = cache.stats(), ref_cache.stats()
    assert st["kv_stored_bytes"] == ref_st["kv_stored_bytes"] and st["kv_tokens_kept"] == ref_st["kv_tokens_kept"]
    k, v = layer.dense()  # comes back on demand
    k_ref, v_ref = ref_cache.layers[0].dense()
    assert torch.equal(k, k_ref) and torch.equal(v, v_ref)
    path = layer.path
    del cache, layer
    import gc

    gc.collect()
    assert not path.exists()  # the file goes with the layer


def test_a_stored_layer_starts_in_its_tier(tmp_path):
    spec = LayerSpec(batch=1, kv_heads=2, head_dim=16, dtype=torch.float32, device=torch.device("cpu"), max_len=512)
    layer = registry.build("cache", "int4", {"store": "disk", "cache_dir": str(tmp_path)}).new_layer(spec)
    assert isinstance(layer, StoredLayer) and layer.state == "disk"
    assert all(t.device.type == "meta" for t in vars(layer.inner).values() if isinstance(t, torch.Tensor))
    k = torch.randn(1, 2, 300, 16)
    layer.append(k, -k)
    out_k, out_v = layer.dense()
    ref = registry.build("cache", "int4").new_layer(spec)
    ref.append(k, -k)
    ref_k, ref_v = ref.dense()
    assert torch.equal(out_k, ref_k) and torch.equal(out_v, ref_v)


@pytest.mark.gpu
@pytest.mark.parametrize("store", ["cpu", "disk"])
def test_a_stored_cache_builds_its_layers_off_the_device(store, tmp_path):
    # a cache builds every layer before its first step: a preallocated int4 layer at 64k is ~70 MB, so 8 layers
    # left on the device would hold ~0.55 GB that store=cpu|disk promises to keep off it (the 128k-in-8GB run)
    spec = LayerSpec(batch=1, kv_heads=8, head_dim=128, dtype=torch.bfloat16, device=torch.device("cuda"),
                     max_len=65536)
    codec = registry.build("cache", "int4", {"store": store, "cache_dir": str(tmp_path)})
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    layers = [codec.new_layer(spec) for _ in range(8)]
    torch.cuda.synchronize()
    per_layer = codec.bytes_per_token(spec) * spec.max_len
    assert torch.cuda.memory_allocated() - before < 0.5 * per_layer
    assert all(lay.state == store for lay in layers)


@pytest.mark.gpu
@pytest.mark.parametrize("store", ["cpu", "disk"])
def test_tiers_on_gpu_free_device_memory_and_match(store, tmp_path):
    spec = LayerSpec(batch=1, kv_heads=8, head_dim=128, dtype=torch.bfloat16, device=torch.device("cuda"),
                     max_len=8192)
    params = {"store": store, "cache_dir": str(tmp_path)}
    layers = [registry.build("cache", "int4", params).new_layer(spec) for _ in range(3)]
    plain = [registry.build("cache", "int4").new_layer(spec) for _ in range(3)]
    backend = registry.build("attention", "sdpa")
    k = torch.randn(1, 8, 8000, 128, device="cuda", dtype=torch.bfloat16)
    q = torch.randn(1, 32, 1, 128, device="cuda", dtype=torch.bfloat16)
    for lay in layers + plain:
        lay.append(k, k)
        lay.observe(q)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    for _ in range(2):  # two decode steps over the three layers, each fetched back ahead of use
        for lay, ref in zip(layers, plain, strict=True):
            for x in (lay, ref):
                x.append(k[:, :, :1], k[:, :, :1])
            out, want = backend.decode(q, lay), backend.decode(q, ref)
            lay.observe(q)
            assert torch.equal(out, want)
    torch.cuda.synchronize()
    # the last layer's use starts fetching its successor (layer 0, wrapping around) ahead of the next step: at most
    # that one layer may be in flight, every other one is off the device (seen on the H200: layer 0 "fetching")
    states = [lay.state for lay in layers]
    assert states.count("fetching") <= 1 and all(s in (store, "fetching") for s in states), states
    assert torch.cuda.memory_allocated() <= before + layers[0].stored_bytes() + 1e6
