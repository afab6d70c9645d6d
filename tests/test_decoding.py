"""greedy and sample against independent references on small random models."""

import math

import pytest
import torch

from ollm_triton.decoding.greedy import sampling_probs
from ollm_triton.engine import load_engine
from ollm_triton.registry import registry

ARCH = dict(
    model_type="llama",
    vocab_size=16,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    tie_word_embeddings=True,
)


@pytest.fixture(scope="module")
def engine():
    # larger init than HF's 0.02 so the tiny model's next-token distributions are far from uniform
    eng = load_engine({**ARCH, "initializer_range": 0.5}, device="cpu", dtype=torch.float32, seed=3)
    yield eng
    eng.close()


def reference_greedy(engine, prompt, n):
    """Argmax with no cache: the whole sequence re-run every step."""
    ids = prompt.clone()
    for _ in range(n):
        logits = engine.forward(ids, engine.new_cache(batch=ids.shape[0], max_len=ids.shape[1]))
        ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], 1)
    return ids[:, prompt.shape[1] :]


def test_greedy_matches_uncached_argmax(engine):
    prompt = torch.randint(0, 16, (2, 7), generator=torch.Generator().manual_seed(0))
    out = registry.build("decoder", "greedy").generate(engine, prompt, 12)
    assert torch.equal(out.tokens, reference_greedy(engine, prompt, 12))
    assert out.counters["target_forwards"] == 12


def test_greedy_stops_at_eos(engine):
    prompt = torch.randint(0, 16, (1, 5), generator=torch.Generator().manual_seed(1))
    ref = reference_greedy(engine, prompt, 10)[0]
    eos = int(ref[3])
    out = registry.build("decoder", "greedy").generate(engine, prompt, 10, eos_id=eos)
    first = int((ref == eos).nonzero()[0])
    assert out.tokens[0].tolist() == ref[: first + 1].tolist()


def test_sampling_filters():
    logits = torch.log(torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]]))
    assert torch.allclose(sampling_probs(logits, 1.0, 0, 1.0), logits.exp())
    top2 = sampling_probs(logits, 1.0, 2, 1.0)
    assert torch.allclose(top2, torch.tensor([[0.5, 0.2, 0, 0, 0]]) / 0.7)
    # nucleus 0.8: 0.5 + 0.2 = 0.7 < 0.8, so the token that crosses (0.15) is kept too
    nucleus = sampling_probs(logits, 1.0, 0, 0.8)
    assert torch.allclose(nucleus, torch.tensor([[0.5, 0.2, 0.15, 0, 0]]) / 0.85)
    hot = sampling_probs(logits, 2.0, 0, 1.0)
    assert torch.allclose(hot, torch.softmax(logits / 2, -1))


def test_sample_is_seeded_and_follows_the_model(engine):
    prompt = torch.randint(0, 16, (1, 6), generator=torch.Generator().manual_seed(2))
    rows = 4000
    batch = prompt.expand(rows, -1)
    sampler = registry.build("decoder", "sample", {"seed": 7})
    a = sampler.generate(engine, batch, 1).tokens[:, 0]
    b = registry.build("decoder", "sample", {"seed": 7}).generate(engine, batch, 1).tokens[:, 0]
    assert torch.equal(a, b)
    # chi-square of the first sampled token against the model's own distribution
    p = torch.softmax(engine.forward(prompt, engine.new_cache(1, 8))[0, -1].double(), -1)
    counts = torch.bincount(a, minlength=16).double()
    expected = p * rows
    keep = expected >= 5
    chi2 = (((counts - expected) ** 2 / expected)[keep]).sum().item()
    dof = int(keep.sum()) - 1
    # 99.9th percentile of chi-square ~ dof + 3.1 * sqrt(2 dof) + 7 for these dof; a wrong sampler is far above
    assert chi2 < dof + 3.1 * math.sqrt(2 * dof) + 7, (chi2, dof)
    assert p.max() < 0.9  # the test is only meaningful on a non-degenerate distribution
