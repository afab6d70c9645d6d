"""Every (attention backend x cache codec) pair through the engine, each against its own reference.

Settings small enough that at 96 prompt tokens every quantizing codec has quantized blocks (group 16, residual 16;
cluster flushes 64-token blocks), every eviction codec has evicted (budget 24) and every windowed or sparse backend
masks (window 8, 16-token sparse blocks, adaptive switching to sparse past 32 keys). The run: a 96-token prompt
(prefill on an empty cache), three single-token decode steps, a 3-token verify block (decode) and a 20-token chunk
(prefill over `dense()` + the chunk).

Every attention call of every layer is checked where it happens, against float64 attention computed here:
  - prefill: over the K/V it was given, under the backend's mask;
  - decode: over what the codec holds (`layer.dense()`), under the backend's mask (cache indices as positions,
    as the engine does);
and after every forward, what each layer holds against the exact K/V the engine appended: exact rows exact (all of
them for dense and the eviction codecs, at the positions they claim), compressed rows within the codec's loss.
The masks are written here for the causal, window and sink rules; sparse uses its own block schedule (`mask()`),
multiscale its definition (`multiscale_reference`). So a codec that stores garbage, or a backend that attends
past its window, fails its own pair. Lossless pairs must also reproduce sdpa + dense end to end.
"""

import itertools

import pytest
import torch
from test_cache_codecs import check_quantized

from ollm_triton.engine import load_engine
from ollm_triton.kernels.attention_multiscale import multiscale_reference
from ollm_triton.registry import registry

ARCH = dict(model_type="llama", vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512)
PROMPT = torch.randint(0, 64, (1, 96), generator=torch.Generator().manual_seed(0))
CHUNK = torch.randint(0, 64, (1, 20), generator=torch.Generator().manual_seed(1))
ATTENTION = {
    "sdpa": {},
    "flash": {},
    "sliding_window": {"window": 8, "sink": 2},
    "sparse": {"pattern": "bigbird", "block_size": 16, "density": 0.25, "num_global": 1},
    "multiscale": {"window": 8, "scales": [4, 16]},
    "adaptive": {"short_seq_threshold": 16, "long_seq_threshold": 32, "low_memory_gb": 0.0, "window": 8,
                 "sink": 2, "sparse_block_size": 16},  # window and sink as sliding_window's (its third mechanism)
}
QUANT = {"group_size": 16, "residual": 16}
CACHE = {
    "dense": {},
    "int8": QUANT, "int4": QUANT, "int2": QUANT, "quant": {**QUANT, "bits": 4},
    "cluster": {"num_clusters": 16, "residual": 16, "iters": 2},
    "streaming": {"budget": 24, "sink": 4},
    "h2o": {"budget": 24},
    "snapkv": {"budget": 24, "window": 8},
}
BITS = {"int8": 8, "int4": 4, "int2": 2, "quant": 4}
CLUSTER_LOSS = 0.9  # relative RMS error of coded K/V rows (16 centroids for 64+ random-ish rows)
LOSSLESS_ATTENTION = {"sdpa", "flash"}
PAIRS = list(itertools.product(registry.names("attention"), registry.names("cache")))


def causal(t, s, q_offset):
    return torch.arange(s)[None, :] <= (q_offset + torch.arange(t))[:, None]


def expected_mask(backend, name, t, s, q_offset):
    """bool [T, S]: what the backend's queries should see."""
    cfg = ATTENTION[name]
    if name == "adaptive":  # the mechanism it chose for this call
        return expected_mask(backend.backends[backend.choice], backend.choice, t, s, q_offset)
    mask = causal(t, s, q_offset)
    if name == "sliding_window":  # the configured window, not the one the backend says it has
        pos, key = (q_offset + torch.arange(t))[:, None], torch.arange(s)[None, :]
        mask &= (key > pos - cfg["window"]) | (key < cfg["sink"])
    elif name == "sparse":
        mask &= backend.mask(t, s, q_offset)(slice(0, t)).cpu()
    return mask


def attend64(q, k, v, mask):
    gq = q.shape[1] // k.shape[1]
    kr, vr = (x.double().repeat_interleave(gq, 1) for x in (k, v))
    s = (q.double() @ kr.transpose(-1, -2)) / q.shape[-1] ** 0.5
    return torch.softmax(s.masked_fill(~mask, float("-inf")), -1) @ vr


class Checked:
    """Wraps a backend instance's prefill and decode with the comparison against float64 attention."""

    def __init__(self, backend, name):
        self.backend, self.name = backend, name
        self.calls = {"prefill": 0, "decode": 0}
        self.masked = 0  # calls whose mask hid a causally visible key
        self.depth = 0  # a scheduled backend's CPU decode calls its own prefill: checked once, as the decode
        self.prefill, self.decode = backend.prefill, backend.decode
        backend.prefill, backend.decode = self.checked_prefill, self.checked_decode

    def expect(self, q, k, v, q_offset):
        t, s = q.shape[2], k.shape[2]
        if self.name == "multiscale":
            b = self.backend
            ref = multiscale_reference(q, k, v, q_offset=q_offset, window=b.window, scales=b.scales,
                                       compute_dtype=torch.float64)
            ref = ref.double()
            self.masked += not torch.allclose(ref, attend64(q, k, v, causal(t, s, q_offset)), atol=1e-6)
            return ref
        mask = expected_mask(self.backend, self.name, t, s, q_offset)
        self.masked += bool((mask != causal(t, s, q_offset)).any())
        return attend64(q, k, v, mask)

    def checked_prefill(self, q, k, v, *, q_offset, tree_mask=None):
        if self.depth:
            return self.prefill(q, k, v, q_offset=q_offset, tree_mask=tree_mask)
        out = self.prefill(q, k, v, q_offset=q_offset, tree_mask=tree_mask)
        torch.testing.assert_close(out.double(), self.expect(q, k, v, q_offset), rtol=1e-4, atol=1e-5)
        self.calls["prefill"] += 1
        return out

    def checked_decode(self, q, layer_cache, *, tree_mask=None):
        self.depth += 1
        try:
            out = self.decode(q, layer_cache, tree_mask=tree_mask)
        finally:
            self.depth -= 1
        k, v = layer_cache.dense()
        want = self.expect(q, k, v, k.shape[2] - q.shape[2])
        torch.testing.assert_close(out.double(), want, rtol=1e-4, atol=1e-5)
        self.calls["decode"] += 1
        return out


class Recorded:
    """Records the exact K/V the engine appends to a layer."""

    def __init__(self, layer):
        self.layer, self.k, self.v = layer, [], []
        self.append = layer.append
        layer.append = self.recorded_append

    def recorded_append(self, k, v):
        self.k.append(k.clone())
        self.v.append(v.clone())
        return self.append(k, v)

    def check(self, name):
        """What the layer holds against the exact K/V appended to it."""
        layer = self.layer
        k_true, v_true = torch.cat(self.k, 2), torch.cat(self.v, 2)
        kd, vd = layer.dense()
        n = kd.shape[2]
        assert n == layer.length
        pos = layer.positions().long() if hasattr(layer, "positions") else torch.arange(n).expand(*kd.shape[:2], -1)
        idx = pos[..., None].expand(-1, -1, -1, kd.shape[-1])
        k_true, v_true = torch.gather(k_true, 2, idx), torch.gather(v_true, 2, idx)
        lossy = layer.compressed_tokens
        if name in BITS:
            check_quantized(k_true[:, :, :lossy], kd[:, :, :lossy], BITS[name], token_group=16)
            check_quantized(v_true[:, :, :lossy], vd[:, :, :lossy], BITS[name], channel_group=16)
        elif lossy:
            for got, true in ((kd, k_true), (vd, v_true)):
                err = (got[:, :, :lossy] - true[:, :, :lossy]).pow(2).mean() / true[:, :, :lossy].pow(2).mean()
                assert err.sqrt() < CLUSTER_LOSS
        assert torch.equal(kd[:, :, lossy:], k_true[:, :, lossy:])
        assert torch.equal(vd[:, :, lossy:], v_true[:, :, lossy:])


def run(attention: str, cache: str, check: bool = True):
    backend = registry.build("attention", attention, ATTENTION[attention])
    checked = Checked(backend, attention) if check else None
    engine = load_engine(ARCH, attention=backend, codec=registry.build("cache", cache, CACHE[cache]), device="cpu",
                         dtype=torch.float32, seed=1)
    kv = engine.new_cache(batch=1, max_len=160)
    layers = [Recorded(layer) for layer in kv.layers]

    def forward(ids, **kw):
        out = engine.forward(ids, kv, **kw)
        if check:
            for layer in layers:
                layer.check(cache)
        return out

    outs = [forward(PROMPT, last_only=True)]
    for _ in range(3):  # single-token decode steps
        outs.append(forward(outs[-1][:, -1:].argmax(-1)))
    outs.append(forward(torch.tensor([[5, 9, 11]])))  # a verify-style block of 3 tokens (decode)
    outs.append(forward(CHUNK))  # a later chunk longer than decode_max_tokens (prefill over dense() + chunk)
    engine.close()
    return torch.cat(outs, dim=1), checked, kv


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny tensors: see conftest.py


@pytest.fixture(scope="module")
def baseline():
    return run("sdpa", "dense", check=False)[0]


def test_every_plugin_has_matrix_settings():
    assert set(registry.names("attention")) == set(ATTENTION)
    assert set(registry.names("cache")) == set(CACHE)


@pytest.mark.parametrize("attention, cache", PAIRS, ids=[f"{a}-{c}" for a, c in PAIRS])
def test_pair_against_its_own_reference(attention, cache, baseline):
    out, checked, kv = run(attention, cache)
    assert out.shape == baseline.shape and torch.isfinite(out).all()
    layers = len(kv.layers)
    assert checked.calls == {"prefill": 2 * layers, "decode": 4 * layers}
    if attention not in LOSSLESS_ATTENTION and attention != "sdpa":
        assert checked.masked > 0, "the backend masked nothing at these settings"
    st = kv.stats()
    if cache in BITS or cache == "cluster":
        assert st["kv_tokens_compressed"] > 0
    elif cache != "dense":
        assert st["kv_tokens_evicted"] > 0
    if attention in LOSSLESS_ATTENTION and cache == "dense":
        torch.testing.assert_close(out, baseline, rtol=1e-5, atol=1e-5)
