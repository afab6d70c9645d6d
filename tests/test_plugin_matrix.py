"""Every (attention backend x cache codec) pair runs through the engine: prefill, decode steps, and a multi-token
verify step, on the CPU reference paths. Lossless pairs must reproduce sdpa + dense."""

import itertools

import pytest
import torch

from ollm_triton.engine import load_engine
from ollm_triton.registry import registry

ARCH = dict(model_type="llama", vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512)
PROMPT = torch.randint(0, 64, (1, 70), generator=torch.Generator().manual_seed(0))
LOSSLESS_ATTENTION = {"sdpa", "flash"}  # dense causal: any other backend changes which keys are seen
LOSSLESS_CACHE = {"dense"}
PAIRS = list(itertools.product(registry.names("attention"), registry.names("cache")))


def run(attention: str, cache: str) -> torch.Tensor:
    engine = load_engine(ARCH, attention=attention, codec=cache, device="cpu", dtype=torch.float32, seed=1)
    kv = engine.new_cache(batch=1, max_len=96)
    outs = [engine.forward(PROMPT, kv, last_only=True)]
    for _ in range(3):  # single-token decode steps
        outs.append(engine.forward(outs[-1][:, -1:].argmax(-1), kv))
    outs.append(engine.forward(torch.tensor([[5, 9, 11]]), kv))  # a verify-style block of 3 tokens
    engine.close()
    return torch.cat(outs, dim=1)


@pytest.fixture(scope="module")
def baseline():
    return run("sdpa", "dense")


@pytest.mark.parametrize("attention, cache", PAIRS, ids=[f"{a}-{c}" for a, c in PAIRS])
def test_pair_runs(attention, cache, baseline):
    out = run(attention, cache)
    assert out.shape == baseline.shape and torch.isfinite(out).all()
    if attention in LOSSLESS_ATTENTION and cache in LOSSLESS_CACHE:
        torch.testing.assert_close(out, baseline, rtol=1e-5, atol=1e-5)
