"""Eviction codecs (streaming, h2o, snapkv): the right tokens are kept, memory is freed, positions and rollback."""

import pytest
import torch

from ollm_triton.cache.base import LayerSpec
from ollm_triton.kernels.kv_scores import attention_column_sums, attention_column_sums_ref, pool_scores
from ollm_triton.registry import PluginError, registry

D = 16


def spec(h=2, b=1):
    return LayerSpec(batch=b, kv_heads=h, head_dim=D, dtype=torch.float32, device=torch.device("cpu"), max_len=4096)


def build(name, **params):
    return registry.build("cache", name, params).new_layer(spec())


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------- scores


@pytest.mark.parametrize("t,s", [(1, 63), (37, 37), (5, 129)])
def test_column_sums_chunked_match_full_matrix(t, s):
    q, k = rand(2, 8, t, D, seed=1), rand(2, 2, s, D, seed=2)
    ref = attention_column_sums_ref(q, k, q_offset=s - t)
    for max_elems in (1 << 24, 50):  # one tile, and many small tiles (rows and keys split)
        out = attention_column_sums(q, k, q_offset=s - t, max_elems=max_elems)
        torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    # every query's distribution sums to one: 4 heads per group x t queries
    torch.testing.assert_close(ref.sum(-1), torch.full((2, 2), 4.0 * t, dtype=torch.float64))


def test_pool_scores_keeps_length_and_spreads_a_peak():
    x = torch.zeros(1, 1, 10)
    x[0, 0, 4] = 3.0
    assert pool_scores(x, 3, "max")[0, 0].tolist() == [0, 0, 0, 3, 3, 3, 0, 0, 0, 0]
    torch.testing.assert_close(pool_scores(x, 3, "avg")[0, 0, 3:6], torch.ones(3))
    assert pool_scores(x, 4).shape == x.shape


@pytest.mark.parametrize("prompt", [1, 7, 8])
def test_snapkv_prompt_not_longer_than_the_window(prompt):
    """A prompt of at most `window` tokens leaves no token outside the observation window to vote on: nothing to
    pool (avg_pool1d refused the empty score row), and the layer still decodes; one of exactly `window` tokens over
    the budget keeps its newest."""
    assert pool_scores(torch.zeros(2, 3, 0), 7).shape == (2, 3, 0)
    lay = build("snapkv", budget=4, window=8, kernel_size=7)
    k, v = rand(1, 2, prompt, D), rand(1, 2, prompt, D, seed=1)
    lay.append(k, v)
    lay.observe(rand(1, 8, prompt, D, seed=2))
    lay.append(rand(1, 2, 1, D, seed=3), rand(1, 2, 1, D, seed=4))
    lay.observe(rand(1, 8, 1, D, seed=5))
    kept = min(prompt, 4) if prompt == 8 else prompt  # a shorter prompt casts no vote: kept whole, as in SnapKV
    assert lay.length == kept + 1
    assert lay.positions()[0, 0].tolist() == list(range(prompt - kept, prompt + 1))
    torch.testing.assert_close(lay.dense()[0][:, :, :kept], k[:, :, prompt - kept :])


# ---------------------------------------------------------------------------------------------- which tokens


def test_streaming_keeps_sinks_and_recent_without_observe():
    lay = build("streaming", budget=20, sink=4)
    for i in range(100):  # one token at a time, the engine never calling observe
        lay.append(rand(1, 2, 1, D, seed=i), rand(1, 2, 1, D, seed=i + 1000))
    lay.append(rand(1, 2, 1, D, seed=100), rand(1, 2, 1, D, seed=1100))
    assert lay.length == 21 and lay.appended == 101
    assert lay.positions()[0, 0].tolist() == [0, 1, 2, 3, *range(84, 101)]
    k, _ = lay.dense()
    torch.testing.assert_close(k[:, :, 4], rand(1, 2, 1, D, seed=84)[:, :, 0])  # the data moved with its position
    assert lay.k.shape[2] <= 21 + 16  # the buffers shrank to what is kept


def test_streaming_ratio_budget_grows_with_tokens_seen():
    lay = build("streaming", ratio=0.25, sink=2)
    lay.append(rand(1, 2, 64, D), rand(1, 2, 64, D, seed=1))
    lay.append(rand(1, 2, 1, D), rand(1, 2, 1, D))  # evicts the prompt to ceil(0.25 * 64) = 16, then adds one
    assert lay.length == 17
    assert lay.positions()[0, 1].tolist() == [0, 1, *range(50, 65)]


def _planted(n, planted, seed=0, scale=6.0):
    """Keys: noise, plus a strong component along u at the planted positions; queries all along u."""
    u = torch.nn.functional.normalize(rand(D, seed=seed + 7), dim=0) * D**0.5
    k = rand(1, 2, n, D, seed=seed) * 0.3
    for p in planted:
        k[:, :, p] += scale * u
    return k, u


def test_h2o_keeps_heavy_hitters_and_recent_tokens():
    n, planted = 48, [5, 17, 30]
    k, u = _planted(n, planted)
    q = u.expand(1, 8, n, D) + rand(1, 8, n, D, seed=3) * 0.1
    lay = build("h2o", budget=12, recent=0.5)
    lay.append(k, rand(1, 2, n, D, seed=4))
    lay.observe(q)
    assert lay.length == n  # scored, eviction owed to the next append
    lay.append(rand(1, 2, 1, D, seed=5), rand(1, 2, 1, D, seed=6))
    lay.observe(u.expand(1, 8, 1, D))
    pos = lay.positions()
    assert lay.length == 13
    for h in range(2):
        kept = set(pos[0, h].tolist())
        assert set(planted) <= kept
        assert set(range(42, 49)) <= kept  # 6 recent of the budget + the new token


def test_h2o_without_observe_fails_loudly():
    lay = build("h2o", budget=8)
    lay.append(rand(1, 2, 20, D), rand(1, 2, 20, D))
    with pytest.raises(RuntimeError, match="observe"):
        lay.append(rand(1, 2, 1, D), rand(1, 2, 1, D))


@pytest.mark.parametrize("pooling", ["avg", "max"])
def test_snapkv_window_votes_for_planted_tokens(pooling):
    n, w, planted = 64, 8, [3, 20, 33, 47]
    k, u = _planted(n, planted, scale=4.0)
    q = rand(1, 8, n, D, seed=9) * 0.1
    q[:, :, -w:] += u  # only the observation window looks for the planted tokens
    lay = build("snapkv", budget=w + 4, window=w, kernel_size=1, pooling=pooling)
    lay.append(k, rand(1, 2, n, D, seed=4))
    lay.observe(q)
    lay.append(rand(1, 2, 1, D), rand(1, 2, 1, D))
    assert lay.length == w + 4 + 1
    for h in range(2):
        assert lay.positions()[0, h].tolist() == [*planted, *range(n - w, n + 1)]
    for _ in range(5):  # decode steps keep growing: the budget applies to the prompt
        lay.observe(rand(1, 8, 1, D))
        lay.append(rand(1, 2, 1, D), rand(1, 2, 1, D))
    assert lay.length == w + 4 + 6


def test_snapkv_pooling_brings_neighbours():
    n, w = 64, 8
    k, u = _planted(n, [20], scale=4.0)
    q = rand(1, 8, n, D, seed=9) * 0.1
    q[:, :, -w:] += u
    lay = build("snapkv", budget=w + 3, window=w, kernel_size=3, pooling="max")
    lay.append(k, rand(1, 2, n, D, seed=4))
    lay.observe(q)
    lay.append(rand(1, 2, 1, D), rand(1, 2, 1, D))
    assert lay.positions()[0, 0].tolist()[:3] == [19, 20, 21]


# ---------------------------------------------------------------------------------------------- bytes, rollback


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def allocated(lay) -> int:
    """Bytes of every tensor the layer holds a reference to (capacity included): what it really keeps alive."""
    return sum(nbytes(t) for t in vars(lay).values() if isinstance(t, torch.Tensor))


def held(lay) -> int:
    """Bytes of the per-token buffers' held rows (K, V, positions, scores): the layer's tensors, sliced to n."""
    return sum(nbytes(t[:, :, : lay.n]) for t in vars(lay).values()
               if isinstance(t, torch.Tensor) and t.dim() >= 3 and t.shape[2] == lay.cap)


@pytest.mark.parametrize("name", ["streaming", "h2o", "snapkv"])
def test_memory_is_freed_and_counted(name):
    """Measured on the layer's own tensors: eviction frees the buffers (not only the count), stored_bytes() is what
    the held rows occupy, original_bytes() what the appended K/V occupied."""
    lay = build(name, ratio=0.25, **({"window": 8} if name == "snapkv" else {}))
    k, v = rand(1, 2, 256, D), rand(1, 2, 256, D, seed=1)
    k1, v1 = rand(1, 2, 1, D), rand(1, 2, 1, D)
    lay.append(k, v)
    lay.observe(rand(1, 8, 256, D, seed=2))
    before = allocated(lay)
    assert lay.stored_bytes() == held(lay) > 0
    lay.append(k1, v1)
    assert lay.length == 65
    assert allocated(lay) < before / 3
    assert lay.stored_bytes() == held(lay) < before / 3
    assert lay.original_bytes() == sum(map(nbytes, (k, v, k1, v1)))


@pytest.mark.parametrize("name", ["streaming", "h2o", "snapkv"])
def test_rollback_of_draft_tokens_is_exact_and_older_rollback_refuses(name):
    """Verifying four drafts in one step and accepting one leaves exactly the cache that appending that one token
    would have left."""
    extra = {"window": 8} if name == "snapkv" else {}
    layers = [build(name, budget=20, **extra) for _ in range(2)]
    for lay in layers:
        lay.append(rand(1, 2, 40, D), rand(1, 2, 40, D, seed=1))
        lay.observe(rand(1, 8, 40, D, seed=2))
        lay.append(rand(1, 2, 1, D, seed=3), rand(1, 2, 1, D, seed=4))  # evicts the prompt
        lay.observe(rand(1, 8, 1, D, seed=5))
    drafts_k, drafts_v, drafts_q = rand(1, 2, 4, D, seed=6), rand(1, 2, 4, D, seed=7), rand(1, 8, 4, D, seed=8)
    spec_layer, plain = layers
    spec_layer.append(drafts_k, drafts_v)
    spec_layer.observe(drafts_q)
    spec_layer.truncate(spec_layer.appended - 3)
    plain.append(drafts_k[:, :, :1], drafts_v[:, :, :1])
    plain.observe(drafts_q[:, :, :1])
    assert spec_layer.appended == plain.appended == 42 and spec_layer.length == plain.length
    assert torch.equal(spec_layer.positions(), plain.positions())
    for a, b in zip(spec_layer.dense(), plain.dense(), strict=True):
        assert torch.equal(a, b)
    with pytest.raises(NotImplementedError, match="evicted tokens cannot be restored"):
        spec_layer.truncate(10)


def test_bad_parameters():
    with pytest.raises(PluginError, match="ratio must be in"):
        registry.build("cache", "h2o", {"ratio": 0.0})
    with pytest.raises(PluginError, match="budget .* must exceed sink"):
        registry.build("cache", "streaming", {"budget": 4, "sink": 4})
    with pytest.raises(PluginError, match="pooling must be avg or max"):
        registry.build("cache", "snapkv", {"pooling": "median"})
