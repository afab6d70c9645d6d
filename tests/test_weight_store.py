"""The layer-file format and the WeightStore: round trips, interop with safetensors, and every failure naming its
file (torn header, truncated data, checksum mismatch, missing tensor, another model's cache, a full disk)."""

from __future__ import annotations

import errno
import json
import os
import struct

import pytest
import torch
from safetensors import safe_open

from ollm_triton.engine.checkpoint import empty_model, init_random
from ollm_triton.engine.config import ModelConfig
from ollm_triton.prefetch import layer_file
from ollm_triton.prefetch.layer_file import ALIGN, LayerLayout, WeightStoreError, read_header
from ollm_triton.prefetch.pool import aligned_empty
from ollm_triton.prefetch.store import MANIFEST, WeightStore, layer_file_name

CFG = dict(model_type="llama", vocab_size=64, hidden_size=48, intermediate_size=96, num_hidden_layers=3,
           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, attention_bias=True)


def _model(seed=0, dtype=torch.float32):
    cfg = ModelConfig.from_hf(CFG)
    model = empty_model(cfg)
    init_random(model, torch.device("cpu"), dtype, seed)
    return model


def _disk_store(tmp_path, seed=0, **kw):
    model = _model(seed)
    layers = list(model.model.layers)
    store = WeightStore.from_layers(layers, "disk", config=model.config, cache_dir=tmp_path / "cache", **kw)
    return model, store


def _read(store, i, **kw):
    buf = aligned_empty(store.slot_bytes, "cpu")
    store.read_into(i, buf, **kw)
    return store.layouts[i].views(buf)


def test_layout_aligns_every_tensor_and_packs_exactly():
    model = _model()
    layer = model.model.layers[0]
    layout = LayerLayout.of_module(layer)
    assert [e.name for e in layout.entries] == [n for n, _ in layer.named_parameters()]
    assert all(e.offset % ALIGN == 0 for e in layout.entries) and layout.slot_bytes % ALIGN == 0
    flat = aligned_empty(layout.slot_bytes, "cpu")
    layout.pack(dict(layer.named_parameters()), flat)
    for name, view in layout.views(flat).items():
        assert torch.equal(view, layer.get_parameter(name))


@pytest.mark.parametrize("direct", [False, True])
def test_disk_round_trip_and_safetensors_interop(tmp_path, direct):
    model, store = _disk_store(tmp_path, verify="always")
    for i, layer in enumerate(model.model.layers):
        got = _read(store, i, direct=direct)
        for name, p in layer.named_parameters():
            assert torch.equal(got[name], p), (i, name)
    path = store.path(1)
    _, data_start, _ = read_header(path)
    assert data_start % ALIGN == 0
    with safe_open(str(path), framework="pt") as f:  # an ordinary safetensors reader sees the same tensors
        for name, p in model.model.layers[1].named_parameters():
            assert torch.equal(f.get_tensor(f"model.layers.1.{name}"), p)


def test_cache_is_written_once_and_refuses_another_model(tmp_path):
    _, store = _disk_store(tmp_path)
    stamp = os.stat(store.path(0)).st_mtime_ns
    _, again = _disk_store(tmp_path)  # same model: files reused, not rewritten
    assert again.model_hash == store.model_hash and os.stat(again.path(0)).st_mtime_ns == stamp
    with pytest.raises(WeightStoreError, match="another model") as e:
        _disk_store(tmp_path, seed=1)
    assert str(tmp_path / "cache") in str(e.value)


def test_truncated_file_names_the_file(tmp_path):
    _, store = _disk_store(tmp_path)
    path = store.path(2)
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size - 100)
    with pytest.raises(WeightStoreError, match="truncated") as e:
        _read(store, 2)
    assert str(path) in str(e.value)
    layouts = store.layouts
    with pytest.raises(WeightStoreError, match="truncated") as e:  # and when the cache is opened again
        WeightStore.open_disk(tmp_path / "cache", layouts)
    assert str(path) in str(e.value)


@pytest.mark.parametrize("damage", ["length", "json", "tiny"])
def test_torn_header_names_the_file(tmp_path, damage):
    _, store = _disk_store(tmp_path)
    path = store.path(0)
    raw = bytearray(path.read_bytes())
    if damage == "length":
        raw[:8] = struct.pack("<Q", len(raw) * 2)
    elif damage == "json":
        raw[8:12] = b"\xff\xfe{{"
    else:
        raw = raw[:5]
    path.write_bytes(bytes(raw))
    with pytest.raises(WeightStoreError) as e:
        WeightStore.open_disk(tmp_path / "cache", store.layouts)
    assert str(path) in str(e.value) and ("torn" in str(e.value) or "truncated" in str(e.value))


def test_checksum_mismatch_names_file_and_tensor(tmp_path):
    _, store = _disk_store(tmp_path, verify="always")
    path = store.path(1)
    entry = store.layouts[1].entries[3]
    _, data_start, _ = read_header(path)
    with open(path, "r+b") as f:
        f.seek(data_start + entry.offset + 5)
        byte = f.read(1)
        f.seek(data_start + entry.offset + 5)
        f.write(bytes([byte[0] ^ 0x40]))
    with pytest.raises(WeightStoreError, match="checksum mismatch") as e:
        _read(store, 1)
    assert str(path) in str(e.value) and f"model.layers.1.{entry.name}" in str(e.value)
    # verify="once" checks the first read of each file in a process; "never" trusts the file
    once = WeightStore.open_disk(tmp_path / "cache", store.layouts, verify="once")
    with pytest.raises(WeightStoreError, match="checksum mismatch"):
        _read(once, 1)
    never = WeightStore.open_disk(tmp_path / "cache", store.layouts, verify="never")
    _read(never, 1)


def test_missing_tensor_names_file_and_tensor(tmp_path):
    _, store = _disk_store(tmp_path)
    path = store.path(0)
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    victim = "model.layers.0.mlp.up_proj.weight"
    header[f"__pad__.{victim}"] = header.pop(victim)  # same bytes, but the tensor the model needs is gone
    text = json.dumps(header).encode()
    path.write_bytes(raw[:8] + text + b" " * (n - len(text)) + raw[8 + n:])
    with pytest.raises(WeightStoreError, match="missing") as e:
        WeightStore.open_disk(tmp_path / "cache", store.layouts)
    assert str(path) in str(e.value) and victim in str(e.value)


def test_missing_file_and_missing_manifest(tmp_path):
    _, store = _disk_store(tmp_path)
    store.path(1).unlink()
    with pytest.raises(WeightStoreError, match="missing") as e:
        WeightStore.open_disk(tmp_path / "cache", store.layouts)
    assert layer_file_name(1) in str(e.value)
    (tmp_path / "cache" / MANIFEST).unlink()
    with pytest.raises(WeightStoreError, match=MANIFEST):
        WeightStore.open_disk(tmp_path / "cache", store.layouts)


def test_full_disk_names_the_file_and_leaves_no_partial_file(tmp_path, monkeypatch):
    def no_space(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(layer_file.os, "fsync", no_space)
    with pytest.raises(WeightStoreError, match="no space left") as e:
        _disk_store(tmp_path)
    assert layer_file_name(0) in str(e.value) or "layer_00" in str(e.value)
    left = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert not any(".tmp" in n for n in left) and MANIFEST not in left


def test_free_space_is_checked_before_writing(tmp_path, monkeypatch):
    import shutil

    from ollm_triton.prefetch import store as store_module

    monkeypatch.setattr(store_module.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10, 10, 10))
    with pytest.raises(WeightStoreError, match="no space left") as e:
        _disk_store(tmp_path)
    assert str(tmp_path / "cache") in str(e.value)


def test_cpu_tier_images_hold_the_weights():
    model = _model(dtype=torch.bfloat16)
    store = WeightStore.from_layers(list(model.model.layers), "cpu")
    for i, layer in enumerate(model.model.layers):
        views = store.layouts[i].views(store.image(i))
        assert all(torch.equal(views[n], p) for n, p in layer.named_parameters())
    with pytest.raises(ValueError, match="tier"):
        WeightStore.from_layers(list(model.model.layers), "tape")


def test_shard_script_writes_the_cache_a_policy_then_reuses(tmp_path, monkeypatch):
    import importlib.util

    from safetensors.torch import save_file

    from ollm_triton.engine import load_engine
    from ollm_triton.registry import registry

    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    model = _model(seed=3)
    save_file({n: p.contiguous() for n, p in model.named_parameters()}, str(ckpt / "model.safetensors"))
    (ckpt / "config.json").write_text(json.dumps(CFG))
    spec = importlib.util.spec_from_file_location("shard_layers", os.path.join(
        os.path.dirname(__file__), "..", "scripts", "shard_layers.py"))
    shard_layers = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(shard_layers)
    monkeypatch.setenv("OLLM_TRITON_CACHE", str(tmp_path / "root"))
    out = shard_layers.shard(str(ckpt), torch.float32)
    assert out.parent == tmp_path / "root" and (out / MANIFEST).is_file()
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    ids = torch.tensor([[3, 1, 4, 1, 5]])
    resident = load_engine(str(ckpt))
    ref = resident.forward(ids, resident.new_cache(1, 8))
    engine = load_engine(str(ckpt), prefetch=registry.build("prefetch", "lookahead", {"tier": "disk"}))
    assert engine.prefetch.store.directory == out  # found by the model hash: nothing rewritten
    assert torch.equal(engine.forward(ids, engine.new_cache(1, 8)), ref)
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamps
    engine.close()
