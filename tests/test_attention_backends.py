"""The attention plugins: reference path (CPU), kernel path (interpreter / GPU), decode through caches, adaptive."""

import pytest
import torch

from ollm_triton.attention.adaptive import Adaptive, AdaptiveConfig
from ollm_triton.attention.base import DecodeSchedule
from ollm_triton.cache.base import LayerSpec
from ollm_triton.cache.dense import DenseLayer
from ollm_triton.kernels.attention_multiscale import multiscale_reference
from ollm_triton.kernels.attention_prefill import attention_reference
from ollm_triton.kernels.attention_schedule import SparsePattern
from ollm_triton.registry import registry

TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
SPARSE = {"pattern": "bigbird", "block_size": 32, "density": 0.3}
BACKENDS = [
    ("flash", {}),
    ("sliding_window", {"window": 40, "sink": 3}),
    ("sparse", SPARSE),
    ("sparse", {"pattern": "strided", "block_size": 32, "stride": 3}),
    ("multiscale", {"window": 30, "scales": [8, 32]}),
]


def rel_rms(out, ref):
    assert not out.isnan().any()
    return ((out.double() - ref.double()).pow(2).mean().sqrt() / ref.double().pow(2).mean().sqrt()).item()


def independent_mask(name, params, t, s, q_offset):
    """Each backend's mask written from its definition (not through the schedule code)."""
    p = torch.arange(q_offset, q_offset + t)[:, None]
    k = torch.arange(s)[None, :]
    mask = k <= p
    if name == "sliding_window":
        mask &= (k < params["sink"]) | (k > p - params["window"])
    if name == "sparse":
        pat = SparsePattern(kind=params["pattern"], block_size=params["block_size"],
                            density=params.get("density", 0.25), stride=params.get("stride", 0))
        n = -(-s // pat.block_size)
        rows = pat.rows(torch.arange(n), n)
        mask &= rows[p // pat.block_size, k // pat.block_size]
    return mask


def float64_reference(name, params, q, k, v, q_offset):
    t, s = q.shape[2], k.shape[2]
    if name == "multiscale":
        return multiscale_reference(q, k, v, q_offset=q_offset, window=params["window"], scales=tuple(params["scales"]))
    return attention_reference(q, k, v, independent_mask(name, params, t, s, q_offset), compute_dtype=torch.float64)


def qkv(b, hq, hkv, t, s, d, dtype, device="cpu", seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    return [torch.randn(b, h, n, d, generator=g, device=device).to(dtype) for h, n in ((hq, t), (hkv, s), (hkv, s))]


@pytest.mark.parametrize("name, params", BACKENDS, ids=[f"{n}-{p.get('pattern', '')}" for n, p in BACKENDS])
def test_reference_path_on_cpu(name, params):
    backend = registry.build("attention", name, params)
    q, k, v = qkv(1, 4, 2, 150, 150, 32, torch.float32)
    out = backend.prefill(q, k, v, q_offset=0)
    assert backend.last_path == "torch.reference"
    assert rel_rms(out, float64_reference(name, params, q, k, v, 0)) < 1e-5
    assert backend.describe()["attention_path"] == "torch.reference"


@pytest.mark.interpreter
@pytest.mark.parametrize("name, params", BACKENDS, ids=[f"{n}-{p.get('pattern', '')}" for n, p in BACKENDS])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_kernel_path_interpreter(name, params, dtype):
    backend = registry.build("attention", name, params)
    backend.use_kernels = True
    t, s = 129, 200
    q, k, v = qkv(1, 8, 1, t, s, 64, dtype, seed=1)
    out = backend.prefill(q, k, v, q_offset=s - t)
    assert backend.last_path == "triton.prefill"
    assert rel_rms(out, float64_reference(name, params, q, k, v, s - t)) < TOL[dtype]


def dense_layer(k, v):
    b, h, s, d = k.shape
    layer = DenseLayer(LayerSpec(b, h, d, k.dtype, k.device, s + 16), k.dtype, True)
    layer.append(k, v)
    return layer


@pytest.mark.interpreter
@pytest.mark.parametrize("name, params", BACKENDS, ids=[f"{n}-{p.get('pattern', '')}" for n, p in BACKENDS])
@pytest.mark.parametrize("use_kernels", [False, True])
def test_decode_equals_last_rows_of_prefill(name, params, use_kernels):
    backend = registry.build("attention", name, params)
    backend.use_kernels = use_kernels
    s, t = 300, 3
    q, k, v = qkv(1, 4, 1, t, s, 64, torch.float32, seed=2)
    out = backend.decode(q, dense_layer(k, v))
    expected = "triton.decode" if use_kernels and name != "multiscale" else (
        "triton.prefill" if use_kernels else "torch.reference")
    if name == "sparse" and (s - t) // 32 != (s - 1) // 32:
        expected = "triton.prefill" if use_kernels else "torch.reference"
    assert backend.last_path == expected
    assert rel_rms(out, float64_reference(name, params, q, k, v, s - t)) < TOL[torch.float32]


@pytest.mark.interpreter
def test_decode_with_tree_mask_uses_prefill_kernel():
    backend = registry.build("attention", "flash")
    backend.use_kernels = True
    s, t = 100, 6
    q, k, v = qkv(1, 4, 2, t, s, 32, torch.float16, seed=3)
    tree = torch.tril(torch.ones(t, t, dtype=torch.bool))
    tree[3, 1:3] = False
    out = backend.decode(q, dense_layer(k, v), tree_mask=tree)
    assert backend.last_path == "triton.prefill"
    mask = torch.arange(s)[None, :] <= torch.arange(s - t, s)[:, None]
    mask[:, s - t :] = tree
    assert rel_rms(out, attention_reference(q, k, v, mask, compute_dtype=torch.float64)) < TOL[torch.float16]


class FusedLayer(DenseLayer):
    """A cache with a 'fused kernel' that records the schedule it was handed."""

    def attend(self, q, backend):
        self.seen = backend.decode_schedule(self.length, 16, num_queries=q.shape[2], device=q.device)
        return torch.zeros_like(q)


def test_fused_codec_path_and_decode_schedules():
    q, k, v = qkv(1, 2, 1, 1, 100, 32, torch.float32)
    layer = FusedLayer(LayerSpec(1, 1, 32, torch.float32, torch.device("cpu"), 128), torch.float32, True)
    layer.append(k, v)
    sw = registry.build("attention", "sliding_window", {"window": 20, "sink": 4})
    assert torch.equal(sw.decode(q, layer), torch.zeros_like(q)) and sw.last_path == "fused:FusedLayer"
    assert isinstance(layer.seen, DecodeSchedule) and (layer.seen.window, layer.seen.sink) == (20, 4)
    assert layer.seen.block_ids.tolist() == [0, 5, 6]  # sinks in block 0, keys 80..99
    assert registry.build("attention", "flash").decode_schedule(100, 16).block_ids is None
    sdpa = registry.build("attention", "sdpa")  # the label follows the path each call took
    sdpa.decode(q, layer)
    assert sdpa.last_path == "fused:FusedLayer"
    sdpa.fused_codec_decode = False
    sdpa.decode(q, layer)
    assert sdpa.last_path == "torch.sdpa"
    sp = registry.build("attention", "sparse", {"pattern": "local", "block_size": 32, "density": 0.3})
    assert sp.decode_schedule(100, 16).block_ids is not None
    ms = registry.build("attention", "multiscale", {"window": 30, "scales": [8, 32]})
    ms.decode(q, layer)  # never hands the query to the codec: summaries are not in its format
    assert ms.last_path == "torch.reference"
    assert ms.decode_schedule(100, 16) is None  # an aligned window is no rule the codec kernels know


def test_adaptive_records_choice_and_reason():
    backend = Adaptive(AdaptiveConfig(short_seq_threshold=64, long_seq_threshold=128, window=32, sink=2,
                                      sparse_block_size=32))
    for s, choice in [(40, "flash"), (100, "flash"), (200, "sparse")]:
        q, k, v = qkv(1, 2, 1, s, s, 16, torch.float32)
        out = backend.prefill(q, k, v, q_offset=0)
        info = backend.describe()
        assert info["attention_choice"] == choice and str(s) in info["attention_reason"]
        assert backend.last_path == f"{choice}:torch.reference"
        sub = backend.backends[choice]
        assert torch.allclose(out, sub.reference(q, k, v, q_offset=0))
    backend.cfg.low_memory_gb = 1e9  # no machine has this much free: the bounded window
    backend._memory = (-1.0, 0.0, "")
    q, k, v = qkv(1, 2, 1, 1, 200, 16, torch.float32)
    backend.decode(q, dense_layer(k, v))
    assert backend.describe()["attention_choice"] == "sliding_window"
    assert backend.describe()["attention_choices"] == {"flash": 2, "sparse": 1, "sliding_window": 1}


# ------------------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("name, params", [
    ("flash", {}), ("sliding_window", {"window": 4096, "sink": 4}),
    ("sparse", {"pattern": "bigbird", "block_size": 128, "density": 0.25}),
    ("multiscale", {"window": 1024, "scales": [64, 1024]}),
])
def test_gpu_backends_bf16(name, params):
    backend = registry.build("attention", name, params)
    s = 8192
    q, k, v = qkv(1, 8, 2, s, s, 128, torch.bfloat16, device="cuda", seed=4)
    out = backend.prefill(q, k, v, q_offset=0)
    assert backend.last_path == "triton.prefill"
    ref = float64_reference(name, params, q, k, v, 0)
    assert rel_rms(out.cpu(), ref.cpu()) < TOL[torch.bfloat16]
    q1 = q[:, :, -1:]
    out1 = backend.decode(q1, dense_layer(k, v))
    assert backend.last_path == ("triton.prefill" if name == "multiscale" else "triton.decode")
    assert rel_rms(out1.cpu(), ref[:, :, -1:].cpu()) < TOL[torch.bfloat16]


ENGINE = dict(model_type="llama", vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=512, rms_norm_eps=1e-5)


@pytest.mark.interpreter
@pytest.mark.parametrize("name, params", [
    ("flash", {}), ("sliding_window", {"window": 512, "sink": 0}), ("multiscale", {"window": 512, "scales": [16]}),
    ("sparse", {"pattern": "local", "block_size": 16, "density": 1.0}), ("adaptive", {}),
])
@pytest.mark.parametrize("use_kernels", [False, True])
def test_engine_matches_sdpa_when_nothing_is_masked_away(name, params, use_kernels):
    """Every backend whose pattern keeps all keys at this length gives sdpa's logits: prefill, chunked prefill,
    then decode steps through the dense cache."""
    from ollm_triton.engine import load_engine

    backend = registry.build("attention", name, params)
    for b in getattr(backend, "backends", {"": backend}).values():
        b.use_kernels = use_kernels
    ids = torch.randint(0, 128, (1, 60), generator=torch.Generator().manual_seed(0))
    logits = {}
    for which, attn in (("sdpa", "sdpa"), (name, backend)):
        engine = load_engine(dict(ENGINE), attention=attn, device="cpu", dtype=torch.float32, decode_max_tokens=4)
        cache = engine.new_cache(batch=1, max_len=128)
        outs = [engine.forward(ids[:, :40], cache), engine.forward(ids[:, 40:50], cache)]
        outs += [engine.forward(ids[:, i : i + 1], cache) for i in range(50, 53)]
        logits[which] = torch.cat(outs, dim=1)
    assert (logits[name] - logits["sdpa"]).abs().max() < 1e-4
    path = backend.last_path
    assert ("triton" in path) == use_kernels, path
