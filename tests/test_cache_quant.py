"""The int8/int4/int2/quant cache codecs: append/flush bookkeeping, round trip, truncation, bytes, config."""

import pytest
import torch

from ollm_triton.cache.base import KVCache, LayerSpec
from ollm_triton.cache.quant import QuantConfig, QuantLayer
from ollm_triton.registry import PluginError, registry


def spec(d=32, h=2, b=1, max_len=512, dtype=torch.float32):
    return LayerSpec(batch=b, kv_heads=h, head_dim=d, dtype=dtype, device=torch.device("cpu"), max_len=max_len)


def layer(bits=4, group=32, residual=16, symmetric=False, preallocate=True, **kw):
    cfg = QuantConfig(bits=bits, group_size=group, residual=residual, symmetric=symmetric, preallocate=preallocate)
    return QuantLayer(spec(**kw), bits, cfg)


def kv(n, d=32, h=2, b=1, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, h, n, d, generator=g).to(dtype), torch.randn(b, h, n, d, generator=g).to(dtype))


@pytest.mark.parametrize("name,bits", [("int8", 8), ("int4", 4), ("int2", 2), ("quant", 4)])
def test_registered_names_build_layers(name, bits):
    codec = registry.build("cache", name, {"group_size": 32, "residual": 16})
    lay = codec.new_layer(spec())
    assert isinstance(lay, QuantLayer) and lay.bits == bits


def test_bad_parameters_are_one_clear_line():
    with pytest.raises(PluginError, match="group_size must be a power of two"):
        registry.build("cache", "int4", {"group_size": 48})
    with pytest.raises(PluginError, match="bits must be one of 2, 4, 8"):
        registry.build("cache", "quant", {"bits": 3})
    with pytest.raises(PluginError, match="unknown parameter 'bits'"):
        registry.build("cache", "int4", {"bits": 8})
    with pytest.raises(ValueError, match="head_dim divisible by 4"):
        registry.build("cache", "int2").new_layer(spec(d=6))


@pytest.mark.parametrize("preallocate", [True, False])
def test_flush_keeps_residual_window_and_whole_groups(preallocate):
    lay = layer(group=32, residual=16, preallocate=preallocate)
    lay.append(*kv(40))  # 40 < 16 + 32: all full precision
    assert (lay.n_quant, lay.n_res) == (0, 40)
    lay.append(*kv(9, seed=1))  # a decode-sized block: attended exact, quantized once it has (observe)
    assert (lay.n_quant, lay.n_res) == (0, 49)
    lay.observe(None)  # 49 >= 48: one group of 32 quantized, 17 left
    assert (lay.n_quant, lay.n_res) == (32, 17)
    for i in range(31):
        lay.append(*kv(1, seed=2 + i))
        lay.observe(None)
    assert (lay.n_quant, lay.n_res) == (64, 16) and lay.length == 80 == lay.appended
    lay.append(*kv(40, seed=98))  # longer than a decode block: quantized as it is appended
    assert (lay.n_quant, lay.n_res) == (96, 24)
    lay.append(*kv(300, seed=99))  # a long chunk beyond the preallocation-free capacity
    assert lay.n_quant % 32 == 0 and 16 <= lay.n_res < 48 and lay.length == 420


def test_static_step_rows_keep_their_own_windows():
    """The static decode step over rows of one layer: each row's token lands in its own window at its own split
    point, an idle row (at or past scratch_from) writes only the spare slot, and `set_length` quantizes a row's
    full window on the host."""
    from ollm_triton.engine.model import rope_cos_sin

    big = layer(group=16, residual=16, b=2, max_len=128)
    big.zero_storage()
    big.scratch_from = 100
    busy = big.row_view(1, 2)  # row 1: a request being prefilled, 40 tokens (16 quantized, 24 in its window)
    busy.append(*kv(40, seed=3))
    before = busy.k_res.clone(), busy.v_res.clone(), busy.k_codes.clone()
    row = big.row_view(0, 1)  # row 0: decoding, 31 tokens held, all in its window
    row.append(*kv(31, seed=4))
    pos = torch.tensor([31, 100])
    cos, sin = rope_cos_sin(torch.ones(16), pos, torch.float32)
    q = torch.randn(2, 1, 4, 32)
    k, v = (torch.randn(2, 1, 2, 32) for _ in range(2))
    out = big.static_decode(q, k, v, cos[:, None], sin[:, None], pos, kernels=False)
    assert out.shape == (2, 4, 1, 32) and torch.isfinite(out).all()
    assert busy.n_res == 24 and torch.equal(busy.k_res[:, :, :32], before[0][:, :, :32])
    assert torch.equal(busy.v_res[:, :, :32], before[1][:, :, :32])  # the idle row's write missed its window
    assert torch.equal(row.v_res[0, :, 31], v[0, 0])  # row 0's token: its window, after its 31 exact tokens
    assert not row.sync_due(31) and row.sync_due(32)  # the engine's one check a row: due when the window is full
    row.set_length(32)  # 16 + 16: the window is full -> its oldest group is quantized
    assert (row.n_quant, row.n_res) == (16, 16) and torch.equal(busy.k_codes, before[2])
    with pytest.raises(ValueError, match="must be told each length its sync_due flags"):
        row.set_length(60)  # past a due length it was not told of (48)
    with pytest.raises(ValueError, match="must be told each length its sync_due flags"):
        row.set_length(32)  # a due length told twice would quantize a second group
    row.set_length(40)  # steps between two due lengths need not be told one by one
    assert (row.n_quant, row.n_res) == (16, 24) and not row.sync_due(47) and row.sync_due(48)
    row.set_length(48)
    assert (row.n_quant, row.n_res) == (32, 16)


@pytest.mark.parametrize("bits,tol", [(8, 0.01), (4, 0.15), (2, 0.6)])
@pytest.mark.parametrize("symmetric", [False, True])
def test_dense_roundtrip_and_exact_residual(bits, tol, symmetric):
    lay = layer(bits=bits, group=32, residual=16, symmetric=symmetric)
    chunks = [kv(n, seed=n) for n in (63, 1, 1, 65)]
    for k, v in chunks:
        lay.append(k, v)
    k_all = torch.cat([c[0] for c in chunks], 2)
    v_all = torch.cat([c[1] for c in chunks], 2)
    k, v = lay.dense()
    assert k.shape == k_all.shape and k.dtype == torch.float32
    n = lay.n_quant
    assert torch.equal(k[:, :, n:], k_all[:, :, n:]) and torch.equal(v[:, :, n:], v_all[:, :, n:])
    for got, want in ((k, k_all), (v, v_all)):
        err = ((got[:, :, :n] - want[:, :, :n]).pow(2).mean() / want[:, :, :n].pow(2).mean()).sqrt()
        assert 0 < err < tol + (0.25 if symmetric and bits == 2 else 0)


@pytest.mark.parametrize("slice_tokens", [1, 40, 64, 10_000])  # one group, rounded down to one, two, all at once
def test_dense_in_slices_is_the_whole_cache_decoded_at_once(slice_tokens, monkeypatch):
    import ollm_triton.cache.quant as quant
    from ollm_triton.kernels import quant as Q

    monkeypatch.setattr(quant, "DENSE_SLICE", slice_tokens)
    lay = layer(bits=4, group=32, residual=16, max_len=512)
    k_in, v_in = kv(203, seed=3)
    lay.append(k_in, v_in)
    n = lay.n_quant
    assert n >= 3 * 32  # several slices at every size above but the last
    k, v = lay.dense()
    # the reference: every quantized token decoded in one call, then the exact window after it
    k_ref = Q.dequantize_keys_ref(lay.k_codes[:, :, :n], lay.k_scale[:, :, : n // 32], lay.k_zero[:, :, : n // 32],
                                  4, 32, 32, False, torch.float32)
    v_ref = Q.dequantize_values_ref(lay.v_codes[:, :, :n], lay.v_scale[:, :, :n], lay.v_zero[:, :, :n], 4,
                                    lay.value_group, 32, False, torch.float32)
    assert torch.equal(k[:, :, :n], k_ref) and torch.equal(v[:, :, :n], v_ref)
    assert torch.equal(k[:, :, n:], k_in[:, :, n:]) and torch.equal(v[:, :, n:], v_in[:, :, n:])
    assert k.shape == k_in.shape and v.shape == v_in.shape


def test_truncate_inside_residual_and_inside_quantized_region():
    lay = layer(bits=4, group=32, residual=16)
    lay.append(*kv(120))
    k0, v0 = lay.dense()
    assert (lay.n_quant, lay.n_res) == (96, 24)
    lay.truncate(110)  # residual only: exact
    k1, v1 = lay.dense()
    assert lay.length == 110 and torch.equal(k1, k0[:, :, :110]) and torch.equal(v1, v0[:, :, :110])
    lay.truncate(70)  # inside the third key group: [64, 70) goes back to full precision, same numbers
    k2, v2 = lay.dense()
    assert (lay.n_quant, lay.n_res, lay.appended) == (64, 6, 70)
    torch.testing.assert_close(k2, k0[:, :, :70], rtol=0, atol=1e-6)
    torch.testing.assert_close(v2, v0[:, :, :70], rtol=0, atol=1e-6)
    lay.append(*kv(50, seed=5))  # and the cache keeps working after the rollback
    assert lay.length == 120 and lay.n_quant == 96
    k3, _ = lay.dense()
    assert (k3[:, :, :64] == k0[:, :, :64]).all()
    with pytest.raises(ValueError, match="cannot truncate"):
        lay.truncate(121)


def test_kvcache_truncate_resets_position():
    cache = KVCache([layer(), layer()])
    for lay in cache.layers:
        lay.append(*kv(90))
    cache.position = 90
    cache.truncate(50)
    assert cache.position == 50 and all(lay.length == 50 for lay in cache.layers)


def held_bytes(lay) -> int:
    """Bytes of the rows a quant layer actually holds, measured on its own tensors: codes and value scales/zeros of
    the n_quant quantized tokens, key scales/zeros of their n_quant / G groups, residual K/V of n_res tokens."""
    n, groups, res = lay.n_quant, lay.n_quant // lay.group, lay.n_res
    total = 0
    for name, rows in (("k_codes", n), ("v_codes", n), ("v_scale", n), ("v_zero", n), ("k_scale", groups),
                       ("k_zero", groups), ("k_res", res), ("v_res", res)):
        t = getattr(lay, name)
        if t is not None:
            total += t[:, :, :rows].numel() * t.element_size()
    return total


@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("symmetric", [False, True])
def test_stored_bytes_are_the_bytes_the_layer_holds(bits, symmetric):
    d = 128
    lay = layer(bits=bits, group=128, residual=128, d=d, h=2, max_len=4096, dtype=torch.bfloat16, symmetric=symmetric)
    lay.append(*kv(4000, d=d, dtype=torch.bfloat16))
    assert (lay.n_quant, lay.n_res) == (3840, 160)
    assert lay.stored_bytes() == held_bytes(lay)
    k, v = kv(4000, d=d, dtype=torch.bfloat16)
    assert lay.original_bytes() == k.numel() * k.element_size() + v.numel() * v.element_size()
    ratio = lay.stored_bytes() / lay.original_bytes()
    assert ratio < {8: 0.54, 4: 0.30, 2: 0.18}[bits]  # 4% of 4000 tokens sit in the residual window
    # the codec's declared per-token cost (the runner's memory check) is what a quantized token really takes
    codec = registry.build("cache", "quant", {"bits": bits, "group_size": 128, "residual": 128, "symmetric": symmetric})
    quantized = held_bytes(lay) - sum(getattr(lay, x)[:, :, : lay.n_res].numel() * 2 for x in ("k_res", "v_res"))
    assert codec.bytes_per_token(lay.spec) * lay.n_quant == quantized


def test_compress_time_and_stats():
    cache = KVCache([layer()])
    cache.layers[0].append(*kv(100))
    cache.position = 100
    st = cache.stats()
    assert st["kv_tokens_kept"] == 100 and st["kv_compress_seconds"] > 0
    assert 0 < st["kv_ratio"] < 1


def test_attend_returns_none_on_cpu_so_the_backend_uses_dense():
    lay = layer()
    lay.append(*kv(100))
    backend = registry.build("attention", "sdpa")
    q = torch.randn(1, 8, 1, 32)
    assert lay.attend(q, backend) is None
    out = backend.decode(q, lay)
    k, v = lay.dense()
    ref = torch.softmax(q @ k.repeat_interleave(4, 1).transpose(-1, -2) / 32**0.5, -1) @ v.repeat_interleave(4, 1)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["int8", "int4", "int2"])
def test_layer_fused_attend_matches_dense_path_gpu(name):
    s = LayerSpec(batch=1, kv_heads=8, head_dim=128, dtype=torch.bfloat16, device=torch.device("cuda"), max_len=3000)
    lay = registry.build("cache", name).new_layer(s)
    k, v = (torch.randn(1, 8, 2900, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    lay.append(k, v)
    for i in range(3):
        lay.append(k[:, :, i : i + 1], v[:, :, i : i + 1])
    backend = registry.build("attention", "sdpa")
    q = torch.randn(1, 32, 1, 128, device="cuda", dtype=torch.bfloat16)
    fused = lay.attend(q, backend)
    assert lay.last_path == "triton.quant_decode"
    kd, vd = lay.dense()
    ref = backend.prefill(q, kd, vd, q_offset=kd.shape[2] - 1)
    err = ((fused.float() - ref.float()).pow(2).mean() / ref.float().pow(2).mean()).sqrt()
    assert err < 1e-2


@pytest.mark.parametrize("n", [1, 200, 300, 1000, 4000])
def test_bytes_for_bounds_what_the_layer_holds(n):
    """The codec's admission estimate never undercounts a layer's bytes, and is tight once most tokens are codes."""
    lay = layer(bits=4, group=128, residual=128, d=128, h=2, max_len=4096, dtype=torch.bfloat16)
    lay.append(*kv(n, d=128, dtype=torch.bfloat16))
    codec = registry.build("cache", "int4", {"group_size": 128, "residual": 128})
    estimate = codec.bytes_for(lay.spec, n)
    assert held_bytes(lay) <= estimate
    if n >= 1000:
        assert held_bytes(lay) >= 0.9 * estimate
