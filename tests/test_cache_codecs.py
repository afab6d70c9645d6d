"""Every cache codec x an attention backend through a CacheLayer on the CPU (the engine's call order), the configs,
and the stats every codec reports.

A 150-token prompt, 6 single-token decode steps and a 3-token verify block (two of them rolled back). Prompt rows
are attended over the exact K/V by every codec, so they say nothing about a codec: the errors below are measured
on the 9 decode rows alone, against float64 attention computed here (not by the backends), in three ways:
  - loss: decode rows against exact attention over every token seen, with a bound each codec meets and a zeroed
    output (relative error 1) does not;
  - own reference: each decode step's rows against attention over what the layer held at that step (`dense()`,
    at `positions()` for eviction codecs), to 1e-5;
  - fidelity: what the layer held against the exact K/V: quantized elements within half a quantization step of
    the truth (the step from the truth's own group range), cluster rows the nearest centroid of their codebook,
    eviction rows the exact K/V of the positions they claim, residual rows exact.
"""

import pytest
import torch

from ollm_triton.cache.base import KVCache, LayerSpec
from ollm_triton.registry import registry

B, HKV, GQ, D = 1, 2, 4, 32
PROMPT, STEPS, VERIFY = 150, 6, 3
N = PROMPT + STEPS + VERIFY

# small settings so every codec compresses within 150 tokens and keeps compressing while decoding
PARAMS = {
    "int8": {"group_size": 16, "residual": 16},
    "int4": {"group_size": 16, "residual": 16},
    "int2": {"group_size": 16, "residual": 16},
    "quant": {"group_size": 16, "residual": 16, "bits": 4},
    "streaming": {"ratio": 0.5},
    "h2o": {"ratio": 0.5},
    "snapkv": {"ratio": 0.5, "window": 16},
    "cluster": {"num_clusters": 32, "residual": 16, "iters": 3},
}
BITS = {"int8": 8, "int4": 4, "int2": 2, "quant": 4}
# relative RMS error of the decode rows against exact attention over every token seen (measured on this data:
# dense 1e-7, int8 0.004, int4 0.07, int2 0.3, cluster 0.5), each below 1, the error of a zeroed output. On random
# K/V attention is spread thin, so evicting half the tokens loses ~0.9 of it: for the eviction codecs the bite is
# their own reference (attention over the exact K/V of the positions they held) and fidelity checks.
LOSS = {"dense": 1e-5, "int8": 0.01, "int4": 0.15, "quant": 0.15, "int2": 0.5, "cluster": 0.75}
EVICTION_LOSS = 1.2


def inputs():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, HKV * GQ, N, D, generator=g)
    k = torch.randn(B, HKV, N, D, generator=g)
    v = torch.randn(B, HKV, N, D, generator=g)
    return q, k, v


def positions(layer) -> torch.Tensor:
    """int64 [B, Hkv, L]: the absolute position of every held token (all of them, in order, unless evicting)."""
    if hasattr(layer, "positions"):
        return layer.positions().long()
    return torch.arange(layer.length).expand(B, HKV, -1)


def attention_step(q, k, v, layer, backend, record=None):
    """What the engine does for one layer (ollm_triton/engine/model.py), plus the observe hook. A decode step
    appends `(q, held K, held V, held positions)` to `record`."""
    if layer.length > 0 and q.shape[2] <= 16:
        layer.append(k, v)
        out = backend.decode(q, layer)
        if record is not None:
            kd, vd = layer.dense()
            record.append((q, kd.clone(), vd.clone(), positions(layer).clone()))
    else:
        k_all, v_all = k, v
        if layer.length:
            past_k, past_v = layer.dense()
            k_all, v_all = torch.cat((past_k, k), 2), torch.cat((past_v, v), 2)
        out = backend.prefill(q, k_all, v_all, q_offset=k_all.shape[2] - q.shape[2])
        layer.append(k, v)
    layer.observe(q)
    return out


def run_codec(name, params, backend_name="sdpa", backend_params=None, record=None):
    """-> (outputs [B, Hq, N, D]: prompt rows, decode rows, verify rows; the cache after the rollback)."""
    q, k, v = inputs()
    spec = LayerSpec(batch=B, kv_heads=HKV, head_dim=D, dtype=torch.float32, device=torch.device("cpu"), max_len=N)
    cache = KVCache([registry.build("cache", name, params).new_layer(spec)])
    layer, backend = cache.layers[0], registry.build("attention", backend_name, backend_params or {})
    outs = [attention_step(q[:, :, :PROMPT], k[:, :, :PROMPT], v[:, :, :PROMPT], layer, backend)]
    cache.position = PROMPT
    for i in range(PROMPT, PROMPT + STEPS):
        sl = slice(i, i + 1)
        outs.append(attention_step(q[:, :, sl], k[:, :, sl], v[:, :, sl], layer, backend, record))
        cache.position += 1
    sl = slice(PROMPT + STEPS, N)  # three draft tokens verified in one step, two rejected
    outs.append(attention_step(q[:, :, sl], k[:, :, sl], v[:, :, sl], layer, backend, record))
    cache.position += VERIFY
    cache.truncate(cache.position - 2)
    return torch.cat(outs, 2), cache


def attend64(q, k, v, q_pos, k_pos, window=0, sink=0):
    """Float64 softmax attention, written here: q [B, Hq, T, D] at positions q_pos [T]; k, v [B, Hkv, S, D] at
    positions k_pos [B, Hkv, S]. Key s is visible to the query at p iff pos(s) <= p and, with a window,
    pos(s) > p - window or pos(s) < sink."""
    gq = q.shape[1] // k.shape[1]
    kr, vr = (x.double().repeat_interleave(gq, 1) for x in (k, v))
    kp = k_pos.repeat_interleave(gq, 1)[:, :, None, :]  # [B, Hq, 1, S]
    qp = q_pos.view(1, 1, -1, 1)
    visible = kp <= qp
    if window:
        visible &= (kp > qp - window) | (kp < sink)
    s = (q.double() @ kr.transpose(-1, -2)) / D**0.5
    return torch.softmax(s.masked_fill(~visible, float("-inf")), -1) @ vr


def rel_err(out, ref):
    return ((out.double() - ref).pow(2).mean() / ref.pow(2).mean()).sqrt().item()


def exact_decode_rows(window=0, sink=0):
    """Float64 attention of every decode row over the exact K/V of every token before it."""
    q, k, v = inputs()
    rows = slice(PROMPT, N)
    pos = torch.arange(N)
    return attend64(q[:, :, rows], k, v, pos[rows], pos.expand(B, HKV, -1), window, sink)


def check_own_reference(out, record, window=0, sink=0):
    """Each decode step's rows against float64 attention over what the layer held at that step."""
    first = PROMPT
    for q, kd, vd, pos in record:
        t = q.shape[2]
        ref = attend64(q, kd, vd, torch.arange(first, first + t), pos, window, sink)
        torch.testing.assert_close(out[:, :, first : first + t].double(), ref, rtol=1e-5, atol=1e-5)
        first += t
    assert first == N


def check_fidelity(name, layer, record):
    """What the layer held at each step against the exact K/V (see the module docstring)."""
    _, k, v = inputs()
    for _, kd, vd, pos in record:
        held = pos.shape[-1]
        assert torch.all(pos[..., 1:] > pos[..., :-1]), "held tokens must be in position order"
        assert torch.all(pos[..., -1] == pos.max()), "the newest token must be held"
        idx = pos[..., None].expand(-1, -1, -1, D)
        k_true, v_true = torch.gather(k, 2, idx), torch.gather(v, 2, idx)
        if name in BITS:
            n_quant = (held - PARAMS[name]["residual"]) // 16 * 16 if held >= 32 else 0
            assert n_quant > 0
            check_quantized(k_true[:, :, :n_quant], kd[:, :, :n_quant], BITS[name], token_group=16)
            check_quantized(v_true[:, :, :n_quant], vd[:, :, :n_quant], BITS[name], channel_group=16)
            exact = slice(n_quant, held)
        elif name == "cluster":
            n_coded = (held - 16) // 64 * 64
            assert n_coded > 0
            for true, got, book in ((k_true, kd, layer.k_book), (v_true, vd, layer.v_book)):
                dist = torch.cdist(true[:, :, :n_coded].double(), book.double())  # [B, H, n, C]
                got_dist = (true[:, :, :n_coded] - got[:, :, :n_coded]).double().norm(dim=-1)
                torch.testing.assert_close(got_dist, dist.min(-1).values, rtol=1e-5, atol=1e-5)
                assert rel_err(got[:, :, :n_coded], true[:, :, :n_coded].double()) < 0.9  # a fitted codebook
            exact = slice(n_coded, held)
        else:
            exact = slice(0, held)  # dense and eviction codecs hold exact rows
            newest = int(pos.max()) + 1
            if name == "streaming":  # the 4 sinks and the newest tokens
                assert pos[0, 0].tolist() == [0, 1, 2, 3, *range(newest - (held - 4), newest)]
            elif name == "h2o":  # half the budget (~ 0.5 * 0.5 * 150 tokens) goes to the newest tokens
                assert torch.equal(pos[..., -30:], torch.arange(newest - 30, newest).expand(B, HKV, -1))
        assert torch.equal(kd[:, :, exact], k_true[:, :, exact]) and torch.equal(vd[:, :, exact], v_true[:, :, exact])


def check_quantized(true, got, bits, token_group=0, channel_group=0):
    """Every element within half a step of the truth; the step (max - min) / (2^bits - 1) of its group, groups of
    `token_group` tokens per channel (keys) or `channel_group` channels per token (values)."""
    b, h, n, d = true.shape
    x = true.double()
    if token_group:
        g = x.reshape(b, h, n // token_group, token_group, d)
        span = (g.amax(3, keepdim=True) - g.amin(3, keepdim=True)).expand_as(g).reshape(x.shape)
    else:
        g = x.reshape(b, h, n, d // channel_group, channel_group)
        span = (g.amax(4, keepdim=True) - g.amin(4, keepdim=True)).expand_as(g).reshape(x.shape)
    step = span / (2**bits - 1)
    assert torch.all((got.double() - x).abs() <= step / 2 * (1 + 1e-4) + 1e-6)


@pytest.fixture(scope="module")
def exact_rows():
    return exact_decode_rows()


def test_every_registered_codec_is_covered():
    names = set(registry.names("cache"))
    assert names <= set(PARAMS) | {"dense"}, f"add new codecs to PARAMS: {names - set(PARAMS)}"


@pytest.mark.parametrize("name", registry.names("cache"))
def test_schema_defaults_build(name):
    """Each codec with its schema's defaults (what `+cache=<name>` composes; tests/test_configs.py covers the
    config nodes) holds a bf16 head_dim-128 append."""
    layer = registry.build("cache", name, {}).new_layer(
        LayerSpec(batch=1, kv_heads=2, head_dim=128, dtype=torch.bfloat16, device=torch.device("cpu"), max_len=64))
    layer.append(torch.zeros(1, 2, 3, 128, dtype=torch.bfloat16), torch.zeros(1, 2, 3, 128, dtype=torch.bfloat16))
    assert layer.length == 3


@pytest.mark.parametrize("name", ["dense", *sorted(PARAMS)])
def test_codec_decode_rows_within_its_loss_and_its_own_reference(name, exact_rows):
    record = []
    out, cache = run_codec(name, PARAMS.get(name, {}), record=record)
    assert out.shape == (B, HKV * GQ, N, D) and torch.isfinite(out).all()
    q, k, v = inputs()
    prompt_ref = attend64(q[:, :, :PROMPT], k[:, :, :PROMPT], v[:, :, :PROMPT], torch.arange(PROMPT),
                          torch.arange(PROMPT).expand(B, HKV, -1))
    assert rel_err(out[:, :, :PROMPT], prompt_ref) < 1e-5  # every codec's prompt attends over exact K/V
    err = rel_err(out[:, :, PROMPT:], exact_rows)
    if name in LOSS:
        assert err <= LOSS[name] < rel_err(torch.zeros_like(exact_rows), exact_rows), err
    else:
        assert 0.05 < err < EVICTION_LOSS, err  # it evicted, and boundedly
    check_own_reference(out, record)
    check_fidelity(name, cache.layers[0], record)
    st = cache.stats()
    assert st["kv_tokens_seen"] == PROMPT + STEPS + 1
    if name != "dense":
        assert 0 < st["kv_ratio"] < 1, st
        assert st["kv_compress_seconds"] > 0
        assert st["kv_tokens_compressed"] + st["kv_tokens_evicted"] > 0  # the codec did something


def test_original_bytes_are_what_a_dense_cache_held():
    """kv_original_bytes of any codec: the bytes the dense codec's own K/V tensors hold for the same tokens."""
    dense = run_codec("dense", {})[1]
    k, v = dense.layers[0].dense()
    measured = k.numel() * k.element_size() + v.numel() * v.element_size()
    for name in PARAMS:
        assert run_codec(name, PARAMS[name])[1].stats()["kv_original_bytes"] == measured


@pytest.mark.parametrize("name", ["streaming", "h2o", "snapkv"])
def test_eviction_with_a_budget_above_the_length_is_lossless(name, exact_rows):
    params = {"budget": 1000, **({"window": 16} if name == "snapkv" else {})}
    out, cache = run_codec(name, params)
    assert rel_err(out[:, :, PROMPT:], exact_rows) < 1e-5
    assert cache.stats()["kv_tokens_kept"] == PROMPT + STEPS + 1


def test_windowed_backend_with_quantized_cache_on_cpu():
    """sliding_window (window 24 + 4 sinks, far shorter than the 159 tokens) over int4: every row against float64
    attention under the window rule written here, over the exact K/V (prompt) and over what int4 held (decode)."""
    window, sink = 24, 4
    record = []
    out, _ = run_codec("int4", PARAMS["int4"], "sliding_window", {"window": window, "sink": sink}, record)
    q, k, v = inputs()
    pos = torch.arange(PROMPT)
    prompt_ref = attend64(q[:, :, :PROMPT], k[:, :, :PROMPT], v[:, :, :PROMPT], pos, pos.expand(B, HKV, -1),
                          window, sink)
    torch.testing.assert_close(out[:, :, :PROMPT].double(), prompt_ref, rtol=1e-5, atol=1e-5)
    check_own_reference(out, record, window, sink)
    # the window masks: unwindowed attention differs, and the windowed int4 rows stay near windowed exact ones
    assert rel_err(out[:, :, PROMPT:], exact_decode_rows()) > 0.3
    assert rel_err(out[:, :, PROMPT:], exact_decode_rows(window, sink)) < LOSS["int4"]
