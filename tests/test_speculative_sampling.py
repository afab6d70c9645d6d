"""Speculative sampling keeps the target's distribution: chi-square tests, seeded and deterministic.

1. The acceptance rule alone on synthetic two-step distributions (200k rows, vectorised): the first two emitted
   tokens' joint distribution equals the target's, for the per-row rule and for the batch rule (a row emits only
   up to n <= its accepted count, n chosen independently of it); a wrong sampler (the draft's) fails the same test.
2. Every sampling strategy end to end on a tiny model, 4000 batch rows: the marginal distributions of the 2nd and
   3rd new tokens (the first and second speculated ones) equal the exact target marginals computed by enumeration.
"""

import math

import pytest
import torch

from ollm_triton.decoding.greedy import sampling_probs
from ollm_triton.decoding.speculation import accept_sampled
from ollm_triton.engine import load_engine
from ollm_triton.registry import registry

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny matmuls (conftest)

Z = 4.0  # one-sided normal quantile of the threshold: a correct sampler fails with probability ~3e-5


def chi2_threshold(dof: int) -> float:
    """Upper quantile of chi-square(dof) at Z, by the Wilson-Hilferty cube approximation."""
    c = 2.0 / (9.0 * dof)
    return dof * (1.0 - c + Z * math.sqrt(c)) ** 3


def chi2(counts: torch.Tensor, expected: torch.Tensor) -> tuple[float, int]:
    """Pearson statistic; cells expecting fewer than 5 are pooled into one."""
    counts, expected = counts.double().flatten(), expected.double().flatten()
    small = expected < 5
    c = torch.cat((counts[~small], counts[small].sum()[None]))
    e = torch.cat((expected[~small], expected[small].sum()[None]))
    keep = e > 0
    c, e = c[keep], e[keep]
    return float(((c - e) ** 2 / e).sum()), int(keep.sum()) - 1


def assert_matches(counts, expected, what):
    stat, dof = chi2(counts, expected)
    assert stat < chi2_threshold(dof), f"{what}: chi2 {stat:.1f} > {chi2_threshold(dof):.1f} (dof {dof})"
    return stat


def assert_differs(counts, expected, what):
    stat, dof = chi2(counts, expected)
    assert stat > chi2_threshold(dof), f"{what}: the test cannot tell this distribution apart (chi2 {stat:.1f})"


# --------------------------------------------------------------------------------------------- the rule alone


def random_dist(gen, *shape, sharp=2.0):
    return torch.softmax(torch.randn(*shape, generator=gen) * sharp, -1)


@pytest.mark.parametrize("batch_rule", [False, True], ids=["per-row", "batch-rule"])
def test_acceptance_rule_keeps_the_target_distribution(batch_rule):
    v, rows = 8, 200_000
    gen = torch.Generator().manual_seed(0)
    p0, q0 = random_dist(gen, v), random_dist(gen, v)
    p1, q1 = random_dist(gen, v, v), random_dist(gen, v, v)  # [first token, V]
    p2 = random_dist(gen, v, v, v)
    d1 = torch.multinomial(q0.expand(rows, v), 1, generator=gen)[:, 0]
    d2 = torch.multinomial(q1[d1], 1, generator=gen)[:, 0]
    drafts = torch.stack((d1, d2), 1)
    p = torch.stack((p0.expand(rows, v), p1[d1], p2[d1, d2]), 1)
    q = torch.stack((q0.expand(rows, v), q1[d1]), 1)
    accepted, outcome = accept_sampled(p, q, drafts, gen)
    emit = accepted
    if batch_rule:  # the other rows' minimum, independent of this row
        emit = torch.minimum(accepted, torch.randint(0, 3, (rows,), generator=gen))
    t1 = outcome[:, 0]
    # a row that emitted one token draws its second in the next iteration: from the target directly here
    fresh = torch.multinomial(p1[t1], 1, generator=gen)[:, 0]
    t2 = torch.where(emit >= 1, outcome[:, 1], fresh)
    joint = torch.bincount(t1 * v + t2, minlength=v * v)
    assert_matches(joint, rows * (p0[:, None] * p1), "joint of the first two tokens")
    assert_differs(torch.bincount(d1 * v + d2, minlength=v * v), rows * (p0[:, None] * p1), "draft tokens")
    share = torch.bincount(accepted, minlength=3) / rows
    assert (share > 0.02).all(), share  # rejection at either draft and full acceptance are all exercised


def test_deterministic_drafts_use_one_hot_q():
    v, rows = 6, 100_000
    gen = torch.Generator().manual_seed(1)
    p0 = random_dist(gen, v)
    drafts = torch.full((rows, 1), 2)
    p = torch.stack((p0.expand(rows, v), p0.expand(rows, v)), 1)
    accepted, outcome = accept_sampled(p, None, drafts, gen)
    assert_matches(torch.bincount(outcome[:, 0], minlength=v), rows * p0, "lookup first token")
    assert abs(accepted.float().mean().item() - p0[2].item()) < 0.01  # accepted with probability p(draft)


def test_identical_distributions_always_accept():
    gen = torch.Generator().manual_seed(2)
    p = random_dist(gen, 50, 4, 10)
    drafts = torch.multinomial(p[:, :3].reshape(-1, 10), 1, generator=gen).view(50, 3)
    accepted, outcome = accept_sampled(p, p[:, :3].clone(), drafts, gen)
    assert torch.equal(accepted, torch.full((50,), 3)) and torch.equal(outcome[:, :3], drafts)


# ------------------------------------------------------------------------------------------------ end to end

V = 24
ARCH = dict(model_type="llama", vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False)
ROWS = 4000
SAMPLING = {"temperature": 0.8, "top_k": 16, "top_p": 1.0, "seed": 11}


def build(layers=2):
    eng = load_engine({**ARCH, "num_hidden_layers": layers}, device="cpu", dtype=torch.float32, seed=1)
    with torch.no_grad():
        eng.model.lm_head.weight.mul_(25.0)
    return eng


@pytest.fixture(scope="module")
def models():
    target = build()
    draft = build(1)  # the target's first layer, embedding, norm and head: a related but different distribution
    src = target.model.state_dict()
    with torch.no_grad():
        for name, p in draft.model.named_parameters():
            p.copy_(src[name])
    return {"target": target, "truncated": draft}


PROMPT = torch.tensor([[3, 7, 1, 3, 7, 1, 3]])  # repetitive: prompt_lookup has drafts


def probs(engine, ids):
    return sampling_probs(engine.forward(ids, engine.new_cache(ids.shape[0], ids.shape[1]))[:, -1],
                          SAMPLING["temperature"], SAMPLING["top_k"], SAMPLING["top_p"]).double()


def marginals(engine):
    """Exact marginal distributions of new tokens 2 and 3, by enumerating tokens 1 and 2."""
    p1 = probs(engine, PROMPT)[0]  # [V]
    firsts = torch.arange(V)[:, None]
    p2 = probs(engine, torch.cat((PROMPT.expand(V, -1), firsts), 1))  # [V, V]: P(t2 | t1)
    pairs = torch.cartesian_prod(torch.arange(V), torch.arange(V))
    p3 = probs(engine, torch.cat((PROMPT.expand(V * V, -1), pairs), 1)).view(V, V, V)  # P(t3 | t1, t2)
    joint12 = p1[:, None] * p2
    return joint12.sum(0), (joint12[..., None] * p3).sum((0, 1))


@pytest.fixture(scope="module")
def expected(models):
    return {"target": marginals(models["target"]), "truncated": marginals(models["truncated"])}


CASES = {
    "speculative": ("speculative", {"num_candidates": 3}, "truncated"),
    "speculative-exact-draft": ("speculative", {"num_candidates": 2}, "target"),  # p == q: every draft accepted
    "adaptive": ("adaptive", {"initial_candidates": 2, "warmup": 1}, "truncated"),
    "self_speculative": ("self_speculative", {"draft_layers": 1, "num_candidates": 2}, None),
    "prompt_lookup": ("prompt_lookup", {"num_candidates": 3, "max_ngram": 2}, None),
    # the static-buffer path (CUDA graphs on the GPU) runs the same rule
    "speculative-static": ("speculative", {"num_candidates": 3, "fast_path": "static"}, "truncated"),
    "self_speculative-static": ("self_speculative", {"draft_layers": 1, "num_candidates": 2, "fast_path": "static"},
                                None),
}


@pytest.mark.parametrize("case", list(CASES))
def test_second_and_third_tokens_follow_the_target(case, models, expected):
    name, params, draft = CASES[case]
    kwargs = {"draft_engine": models[draft]} if draft else {}
    strategy = registry.build("decoder", name, {**params, **SAMPLING}, **kwargs)
    out = strategy.generate(models["target"], PROMPT.expand(ROWS, -1), 3)
    assert out.tokens.shape == (ROWS, 3)
    want2, want3 = expected["target"]
    assert_matches(torch.bincount(out.tokens[:, 1], minlength=V), ROWS * want2, f"{case} token 2")
    assert_matches(torch.bincount(out.tokens[:, 2], minlength=V), ROWS * want3, f"{case} token 3")
    if case == "speculative-exact-draft":
        assert out.counters["acceptance_rate"] == 1.0 and out.counters["iterations"] == 1
    if case == "speculative":  # the draft's own marginals are far enough to be caught: the test can fail
        draft2, _ = expected["truncated"]
        assert_differs(torch.bincount(out.tokens[:, 1], minlength=V), ROWS * draft2, "draft marginal")


def test_sampling_is_seeded(models):
    def run(seed):
        s = registry.build("decoder", "speculative", {**SAMPLING, "seed": seed, "num_candidates": 3},
                           draft_engine=models["truncated"])
        return s.generate(models["target"], PROMPT.expand(8, -1), 12).tokens

    a = run(5)
    assert torch.equal(a, run(5)) and not torch.equal(a, run(6))
