"""Every cache codec x every attention backend runs, through the engine, at every short length where a boundary
could bite: prompts of 1 ... (largest window / residual + group + 2) tokens, and a few around cluster's first
64-token flush, each followed by decode steps of 1, 2 and 3 tokens (rotated, so each comes first after some prompt),
a speculative verify block of 2 ... 16 tokens (through `decode`) rolled back to its first token, and one more step.

Plugin settings are small so the range stays small: windows of 4, quantization groups of 16 with a 4-token
residual (quantized blocks from 20 tokens), eviction budgets of 4, 16-token sparse blocks. Checked: no error,
finite logits, and the cache's accounting (tokens seen, held, evicted) after every call.
"""

import itertools

import pytest
import torch

from ollm_triton.engine import load_engine
from ollm_triton.registry import registry

ARCH = dict(model_type="llama", vocab_size=32, hidden_size=32, intermediate_size=32, num_hidden_layers=1,
            num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=128)
ATTENTION = {
    "sdpa": {},
    "flash": {},
    "sliding_window": {"window": 4, "sink": 1},
    "sparse": {"pattern": "bigbird", "block_size": 16, "density": 0.25, "num_global": 1},
    "multiscale": {"window": 4, "scales": [2, 4]},
    "adaptive": {"short_seq_threshold": 4, "long_seq_threshold": 8, "low_memory_gb": 0.0, "window": 4, "sink": 1,
                 "sparse_block_size": 16},
}
GROUP, RESIDUAL, WINDOW = 16, 4, 4
QUANT = {"group_size": GROUP, "residual": RESIDUAL}
CACHE = {
    "dense": {},
    "int8": QUANT, "int4": QUANT, "int2": QUANT, "quant": {**QUANT, "bits": 2},
    "cluster": {"num_clusters": 4, "residual": RESIDUAL, "iters": 1},
    "streaming": {"budget": 4, "sink": 1},
    "h2o": {"budget": 4},
    "snapkv": {"ratio": 0.5, "window": WINDOW},  # a budget below the window: a prompt of exactly `window` evicts
}
CLUSTER_FLUSH = RESIDUAL + 64
PROMPTS = [*range(1, GROUP + RESIDUAL + 3), *range(CLUSTER_FLUSH - 2, CLUSTER_FLUSH + 3)]
PAIRS = list(itertools.product(registry.names("attention"), registry.names("cache")))


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny tensors: see conftest.py


def test_every_plugin_has_property_settings():
    assert set(registry.names("attention")) == set(ATTENTION)
    assert set(registry.names("cache")) == set(CACHE)


@pytest.mark.parametrize("attention, cache", PAIRS, ids=[f"{a}-{c}" for a, c in PAIRS])
def test_pair_runs_at_every_short_length(attention, cache):
    engine = load_engine(ARCH, attention=registry.build("attention", attention, ATTENTION[attention]),
                         codec=registry.build("cache", cache, CACHE[cache]), device="cpu", dtype=torch.float32, seed=0)
    gen = torch.Generator().manual_seed(0)
    compressed = evicted = 0
    for prompt in PROMPTS:
        verify = 2 + prompt % 15
        kv = engine.new_cache(batch=1, max_len=prompt + 6 + verify + 1)
        where = f"prompt {prompt}"
        step(engine, kv, gen, prompt, where)
        for t in [(1, 2, 3), (2, 3, 1), (3, 1, 2)][prompt % 3]:
            step(engine, kv, gen, t, f"{where}, decode {t}")
        step(engine, kv, gen, verify, f"{where}, verify {verify}")
        kv.truncate(kv.position - (verify - 1))  # the first draft accepted
        check_accounting(kv, kv.position, f"{where}, rollback of {verify - 1}")
        step(engine, kv, gen, 1, f"{where}, after the rollback")
        st = kv.stats()
        compressed, evicted = max(compressed, st["kv_tokens_compressed"]), max(evicted, st["kv_tokens_evicted"])
    engine.close()
    # the range reached every codec's lossy state
    if cache in ("int8", "int4", "int2", "quant", "cluster"):
        assert compressed > 0
    elif cache != "dense":
        assert evicted > 0


def step(engine, kv, gen, t, where):
    seen = kv.position + t
    logits = engine.forward(torch.randint(0, 32, (1, t), generator=gen), kv)
    assert logits.shape == (1, t, 32) and torch.isfinite(logits).all(), where
    check_accounting(kv, seen, where)


def check_accounting(kv, seen, where):
    assert kv.position == seen, where
    for layer in kv.layers:
        k, v = layer.dense()
        assert k.shape[2] == v.shape[2] == layer.length, where
        assert layer.length + layer.evicted_tokens == seen, where
        assert 0 <= layer.compressed_tokens <= layer.length, where
        assert torch.isfinite(k).all() and torch.isfinite(v).all(), where
