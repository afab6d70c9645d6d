"""Speculative decoder strategies in greedy mode: token-identical to `greedy`, caches rolled back exactly.

Small random models (vocab 48, hidden 32, 2 layers) with a sharpened LM head so next-token choices are not ties.
Drafts: the target itself (acceptance 1), a noisy copy (partial acceptance), a 1-layer truncated copy (low).
"""

import json

import pytest
import torch

from ollm_triton.cache.base import KVCache
from ollm_triton.decoding.adaptive import AdaptiveConfig, CandidateController, expected_tokens
from ollm_triton.decoding.drafters import draft_source
from ollm_triton.decoding.targets import keep_tokens
from ollm_triton.decoding.tree import accepted_path, level_sizes
from ollm_triton.engine import load_engine
from ollm_triton.registry import PluginError, registry

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny matmuls (conftest)

V = 48
ARCH = dict(model_type="llama", vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False)
NEW = 24


def build(layers=2, seed=1):
    eng = load_engine({**ARCH, "num_hidden_layers": layers}, device="cpu", dtype=torch.float32, seed=seed)
    with torch.no_grad():  # logits with std ~3: distinct argmaxes, non-degenerate distributions
        eng.model.lm_head.weight.mul_(40.0)
    return eng


def copy_of(target, layers=2, noise=0.0):
    """A draft holding the target's weights (its first `layers` layers), plus relative Gaussian noise."""
    draft = build(layers)
    gen = torch.Generator().manual_seed(5)
    src = target.model.state_dict()
    with torch.no_grad():
        for name, p in draft.model.named_parameters():
            p.copy_(src[name])
            if noise and p.dim() > 1:
                p.add_(torch.randn(p.shape, generator=gen) * p.std() * noise)
    return draft


@pytest.fixture(scope="module")
def models():
    target = build()
    return {"target": target, "self": target, "noisy": copy_of(target, noise=0.1), "truncated": copy_of(target, 1)}


def prompts():
    gen = torch.Generator().manual_seed(0)
    repetitive = torch.tensor([[3, 9, 4, 3, 9, 4, 3, 9, 4, 3, 9]])  # prompt_lookup finds matches here
    return [torch.randint(0, V, (1, 9), generator=gen), torch.randint(0, V, (1, 1), generator=gen), repetitive]


CASES = {
    "speculative-self-k3": ("speculative", {"num_candidates": 3}, "self"),
    "speculative-noisy-k4": ("speculative", {"num_candidates": 4}, "noisy"),
    "speculative-truncated-k1": ("speculative", {"num_candidates": 1}, "truncated"),
    "adaptive-noisy": ("adaptive", {"initial_candidates": 2, "warmup": 1, "min_candidates": 1}, "noisy"),
    "tree-noisy-gather": ("tree", {"depth": 4, "branching": 2, "width": 3}, "noisy"),
    "tree-noisy-rerun": ("tree", {"depth": 3, "branching": 3, "width": 4, "compaction": "rerun"}, "noisy"),
    "tree-chain": ("tree", {"depth": 3, "branching": 1, "width": 1}, "truncated"),
    "prompt_lookup": ("prompt_lookup", {"num_candidates": 4, "max_ngram": 2}, None),
    "self_speculative": ("self_speculative", {"draft_layers": 1, "num_candidates": 3}, None),
}


def strategy(case, models, fast_path="off"):
    name, params, draft = CASES[case]
    kwargs = {"draft_engine": models[draft]} if draft else {}
    return registry.build("decoder", name, {**params, "fast_path": fast_path}, **kwargs)


PATHS = ["off", "static"]  # eager engine.forward + codec cache | static-buffer steps (the CUDA-graph path, eager here)


@pytest.fixture(scope="module")
def greedy_refs(models):
    greedy = registry.build("decoder", "greedy")
    return [greedy.generate(models["target"], p, NEW).tokens for p in prompts()]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("case", list(CASES))
def test_matches_greedy_token_for_token(case, path, models, greedy_refs):
    s = strategy(case, models, path)
    for prompt, ref in zip(prompts(), greedy_refs, strict=True):
        out = s.generate(models["target"], prompt, NEW)
        assert torch.equal(out.tokens, ref), (case, out.tokens.tolist(), ref.tolist())
        c = out.counters
        assert c["generated_tokens"] == NEW
        assert c["target_forwards"] == 1 + c["iterations"] * (2 if "rerun" in case else 1)
        assert c["target_forwards_per_token"] == pytest.approx(c["target_forwards"] / NEW)
        assert c["decode_s"] > 0 and c["prefill_s"] > 0
    if CASES[case][2] == "self":  # the target drafting for itself: every draft accepted
        assert c["acceptance_rate"] == 1.0 and c["mean_accepted_length"] > 3.5


def test_acceptance_is_partial_with_a_noisy_draft(models):
    out = strategy("speculative-noisy-k4", models).generate(models["target"], prompts()[0], NEW)
    assert 0.2 < out.counters["acceptance_rate"] < 1.0
    assert out.counters["target_forwards"] < NEW  # fewer target forwards than greedy's NEW


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("case", ["speculative-noisy-k4", "self_speculative", "prompt_lookup"])
def test_batch_rows_match_greedy(case, path, models):
    gen = torch.Generator().manual_seed(4)
    batch = torch.randint(0, V, (3, 6), generator=gen)
    ref = registry.build("decoder", "greedy").generate(models["target"], batch, 16).tokens
    assert torch.equal(strategy(case, models, path).generate(models["target"], batch, 16).tokens, ref)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("case", ["speculative-noisy-k4", "tree-noisy-gather", "prompt_lookup"])
def test_stops_at_eos_like_greedy(case, path, models):
    prompt = prompts()[0]
    ref = registry.build("decoder", "greedy").generate(models["target"], prompt, NEW).tokens[0]
    eos = int(ref[5])
    expected = registry.build("decoder", "greedy").generate(models["target"], prompt, NEW, eos_id=eos).tokens
    out = strategy(case, models, path).generate(models["target"], prompt, NEW, eos_id=eos)
    assert torch.equal(out.tokens, expected) and out.tokens.shape[1] < NEW


def assert_kv_matches_fresh(engine, held_kv, tokens, what):
    """held_kv (per layer (K, V) [B, Hkv, L, D]) must be exactly tokens' K/V: a fresh prefill's, L = len(tokens)."""
    fresh = engine.new_cache(batch=tokens.shape[0], max_len=tokens.shape[1] + 1)
    engine.forward(tokens, fresh)
    for i, ((k, v), ref) in enumerate(zip(held_kv, fresh.layers, strict=True)):
        ref_k, ref_v = ref.dense()
        assert k.shape == ref_k.shape, (what, i, k.shape, ref_k.shape)
        torch.testing.assert_close(k, ref_k, atol=1e-5, rtol=1e-4, msg=f"{what} K layer {i}")
        torch.testing.assert_close(v, ref_v, atol=1e-5, rtol=1e-4, msg=f"{what} V layer {i}")


ROLLBACK = ["speculative-noisy-k4", "adaptive-noisy", "tree-noisy-gather", "tree-noisy-rerun", "self_speculative",
            "prompt_lookup"]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("case", ROLLBACK)
def test_rollback_leaves_caches_as_if_rejected_tokens_never_existed(case, path, models):
    s = strategy(case, models, path)
    s.keep_state = {}
    out = s.generate(models["target"], prompts()[0], NEW)
    assert 0 < out.counters["acceptance_rate"] < 1  # drafts were accepted and rejected
    state = s.keep_state
    seq, target = state["seq"], state["target"]
    # the target holds every emitted token but the last (pending) one
    assert target.length == seq.shape[1] - 1
    if path == "off":
        assert all(layer.length == target.length for layer in target.cache.layers)
    assert_kv_matches_fresh(models["target"], target.held_kv(), seq[:, :-1], "target")
    drafter = state["drafter"]
    if getattr(drafter, "cache", None) is not None:  # eager draft model: its cache is a prefix of the sequence
        held = drafter.cache.position
        assert 0 < held <= seq.shape[1] and all(layer.length == held for layer in drafter.cache.layers)
        assert_kv_matches_fresh(drafter.engine, [layer.dense() for layer in drafter.cache.layers], seq[:, :held],
                                "draft")
    elif hasattr(drafter, "held") and drafter.sm is not getattr(target, "sm", None):  # static draft model
        assert 0 < drafter.held <= seq.shape[1]
        assert_kv_matches_fresh(drafter.engine, drafter.sm.dense(drafter.held), seq[:, : drafter.held], "draft")


def test_early_exit_runs_the_same_layers_as_the_engine(models):
    """engine.forward(num_layers=k), the layer-skip draft's step: all layers give exactly the full forward, and k
    layers write exactly the full forward's K/V into those k layers."""
    target = models["target"]
    ids = prompts()[0]
    a, b = target.new_cache(1, 16), target.new_cache(1, 16)
    full = target.forward(ids, a)
    assert torch.equal(full, target.forward(ids, b, num_layers=target.config.num_layers))
    k = target.config.num_layers - 1
    c = KVCache(target.new_cache(1, 16).layers[:k])
    early = target.forward(ids, c, num_layers=k)
    assert c.position == a.position and not torch.equal(early, full)  # a different head input: other logits
    for mine, ref in zip(c.layers, a.layers[:k], strict=False):
        assert all(torch.equal(x, y) for x, y in zip(mine.dense(), ref.dense(), strict=True))


def test_keep_tokens_gathers_the_path():
    eng = build()
    cache = eng.new_cache(1, 32)
    eng.forward(torch.arange(10)[None], cache)
    before = [tuple(t.clone() for t in layer.dense()) for layer in cache.layers]
    index = torch.tensor([5, 7, 8])
    for layer in cache.layers:
        keep_tokens(layer, 4, index)
    for layer, (k, v) in zip(cache.layers, before, strict=True):
        kk, vv = layer.dense()
        keep = torch.tensor([0, 1, 2, 3, 5, 7, 8])
        assert torch.equal(kk, k[:, :, keep]) and torch.equal(vv, v[:, :, keep])


def test_tree_walk_and_shape():
    assert level_sizes(4, 2, 3) == [2, 3, 3, 3]
    # root -> a(5) -> c(9); root -> b(6); target argmax: root 5, a 9, c 1
    tokens, parents = [5, 6, 9], [-1, -1, 0]
    assert accepted_path([5, 9, 2, 1], tokens, parents) == ([0, 2], 1)
    assert accepted_path([7, 9, 2, 1], tokens, parents) == ([], 7)
    assert accepted_path([6, 9, 3, 1], tokens, parents) == ([1], 3)


def test_adaptive_controller_moves_towards_the_cost_optimum():
    cfg = AdaptiveConfig(initial_candidates=2, min_candidates=1, max_candidates=10, warmup=1, hysteresis=0.0)
    ctl = CandidateController(cfg)
    for _ in range(60):  # every draft accepted, drafts nearly free: more candidates pay
        k = ctl.candidates()
        ctl.observe(k, k, 0.001 * k, 0.1 + 0.001 * k, 0)
    assert ctl.k == 10 and ctl.history and ctl.history[0]["from"] == 2.0
    for _ in range(200):  # nothing accepted and drafts costly: one candidate
        k = ctl.candidates()
        ctl.observe(k, 0, 0.05 * k, 0.1 + 0.05 * k, 0)
    assert ctl.k == 1
    assert expected_tokens(0.0, 5) == 1.0 and expected_tokens(1.0, 5) == 6.0
    assert expected_tokens(0.5, 2) == pytest.approx(1.75)


def _drive(ctl, plain_s, iterations, accept=0.65):
    """Feed the controller one device's costs: a plain step plain_s (a burst of 16 is observed per step), a draft
    0.08 ms, a verify iteration 0.35 ms + 0.01 ms a draft; drafts accepted at rate `accept` in order."""
    for i in range(iterations):
        k = ctl.candidates()
        if k == 0:
            ctl.observe(0, 0, 0.0, plain_s, 0)
            continue
        n = next((j for j in range(k) if (i * 7 + j * 3) % 100 >= accept * 100), k)
        ctl.observe(k, n, 0.08e-3 * k, 0.35e-3 + 0.01e-3 * k + 0.08e-3 * k, 0)


def test_adaptive_measures_plain_steps_before_weighing_drafts_against_them():
    # speculation off is tried once, not priced from a verify's cost: where plain steps cost 0.13 ms (a GPU's
    # bursts) it stays off; where they cost 0.6 ms drafting comes back and stays on
    fast = CandidateController(AdaptiveConfig(warmup=2))
    _drive(fast, 0.13e-3, 40)
    assert fast.history[0]["to"] == 0.0 and fast.history[0]["measuring"] == 1.0 and fast.k == 0
    assert fast.rate(0) > fast.rate(4) and len(fast.history) == 1
    slow = CandidateController(AdaptiveConfig(warmup=2))
    _drive(slow, 0.6e-3, 40)
    assert slow.history[0]["to"] == 0.0 and slow.k > 0 and all(h["to"] > 0 for h in slow.history[1:])


def test_adaptive_records_changes_in_counters(models, monkeypatch):
    # timings are machine noise: a controller that always predicts more candidates to be faster makes it exact
    monkeypatch.setattr(CandidateController, "rate", lambda self, k: float(k))
    s = registry.build("decoder", "adaptive", {"initial_candidates": 1, "max_candidates": 5, "warmup": 2},
                       draft_engine=models["noisy"])
    ref = registry.build("decoder", "greedy").generate(models["target"], prompts()[0], 32).tokens
    out = s.generate(models["target"], prompts()[0], 32)
    assert torch.equal(out.tokens, ref)
    c = out.counters
    assert c["candidates_changes"] == 1 and c["candidates_change_0_to"] == 5 and c["candidates_final"] == 5
    assert c["candidates_change_0_at_token"] > 1 and 1 < c["candidates_mean"] < 5
    assert len(s.history) == 1 and s.history[0]["from"] == 1.0 and s.history[0]["iteration"] == 2.0


def _off_between(first: int, last: int):
    """A controller rate that switches speculation off (0 drafts) for observations first..last-1 and asks for the
    most drafts otherwise: exact moves, whatever the machine's timings."""
    def rate(self, k):
        return 1.0 + (k == 0) if first <= self.iterations < last else 1.0 + k
    return rate


@pytest.mark.parametrize("path", [*PATHS, pytest.param("auto", marks=pytest.mark.gpu)])  # auto on CUDA: graphs
def test_adaptive_switched_off_runs_plain_bursts_equal_to_greedy_and_drafts_again(models, monkeypatch, path):
    from ollm_triton.decoding.speculation import OFF_BURST

    if path == "auto":
        models = _cuda_models()
    monkeypatch.setattr(CandidateController, "rate", _off_between(2, 4))  # two bursts off, then drafting again
    s = registry.build("decoder", "adaptive", {"initial_candidates": 2, "max_candidates": 3, "warmup": 1,
                                                "hysteresis": 0.0, "fast_path": path}, draft_engine=models["noisy"])
    greedy = registry.build("decoder", "greedy")
    prompt, new = prompts()[0].to(models["target"].device), 64
    ref = greedy.generate(models["target"], prompt, new).tokens
    out = s.generate(models["target"], prompt, new)
    assert torch.equal(out.tokens, ref), (out.tokens.tolist(), ref.tolist())
    c = out.counters
    assert [h["to"] for h in s.history] == [3.0, 0.0, 3.0]
    assert c["candidates_final"] == 3 and c["target_forwards"] == 1 + c["iterations"]
    assert c["fast_path_graph"] == float(path == "auto")  # on CUDA the bursts replay the one-token graph
    # each burst is OFF_BURST target steps and one observation: the iterations count steps, not observations
    assert c["speculation_off_bursts"] == 2 and c["speculation_off_steps"] == 2 * OFF_BURST
    assert s.controller.iterations == c["iterations"] - c["speculation_off_steps"] + c["speculation_off_bursts"]
    # an eos inside a burst: the output stops where greedy's does
    seen, stop = set(), None
    for i, t in enumerate(ref[0].tolist()):
        if i >= 2 + OFF_BURST // 2 and t not in seen:
            stop = (i, t)
            break
        seen.add(t)
    assert stop is not None
    ref_eos = greedy.generate(models["target"], prompt, new, eos_id=stop[1]).tokens
    out_eos = s.generate(models["target"], prompt, new, eos_id=stop[1]).tokens
    assert ref_eos.shape[1] == stop[0] + 1 and torch.equal(out_eos, ref_eos)


def test_bad_parameters_are_one_line_errors(models):
    with pytest.raises(PluginError, match="num_candidates"):
        registry.build("decoder", "speculative", {"num_candidates": 0})
    with pytest.raises(PluginError, match="does not parse"):
        registry.build("decoder", "speculative", {"draft": "random:{bad"})
    with pytest.raises(PluginError, match="compaction"):
        registry.build("decoder", "tree", {"compaction": "copy"})
    with pytest.raises(PluginError, match="min_ngram"):
        registry.build("decoder", "prompt_lookup", {"min_ngram": 4, "max_ngram": 2})
    with pytest.raises(PluginError, match="temperature"):
        registry.build("decoder", "self_speculative", {"temperature": -1.0})
    with pytest.raises(ValueError, match="batch 1"):
        strategy("tree-chain", models).generate(models["target"], torch.zeros(2, 3, dtype=torch.long), 4)
    with pytest.raises(ValueError, match="below the target"):
        registry.build("decoder", "self_speculative", {"draft_layers": 2}).generate(models["target"], prompts()[0], 4)
    with pytest.raises(ValueError, match="not in this checkout"):
        draft_source("embedded:no-such-model")


def test_random_draft_sources(models):
    fields, seed = draft_source("random:" + json.dumps({**ARCH, "seed": 3}))
    assert seed == 3 and fields["vocab_size"] == V
    fields, _ = draft_source("random:tiny_random")
    assert fields["num_hidden_layers"] == 4
    # a draft loaded from a source string: the target's random config and seed give the target itself (unsharpened)
    plain = load_engine(ARCH, seed=1)
    s = registry.build("decoder", "speculative", {"draft": "random:" + json.dumps({**ARCH, "seed": 1})})
    out = s.generate(plain, prompts()[0], 8)
    assert out.counters["acceptance_rate"] == 1.0
    assert s.draft.get(plain) is s.draft.get(plain)  # loaded once, kept on the strategy
    s.close()
    assert s.draft._engine is None


def _cuda_models():
    """The module's target and noisy draft on CUDA (float32), the target decoding through captured graphs."""

    def cuda_build(layers=2):
        eng = load_engine({**ARCH, "num_hidden_layers": layers}, device="cuda", dtype=torch.float32, seed=1)
        with torch.no_grad():
            eng.model.lm_head.weight.mul_(40.0)
        return eng

    target = cuda_build()
    assert str(target.fast_path) == "graph", target.fast_path
    noisy = cuda_build()
    gen = torch.Generator(device="cuda").manual_seed(5)
    with torch.no_grad():
        for p, src in zip(noisy.model.parameters(), target.model.parameters(), strict=True):
            p.copy_(src)
            if p.dim() > 1:
                p.add_(torch.randn(p.shape, generator=gen, device="cuda") * p.std() * 0.1)
    return {"target": target, "self": target, "noisy": noisy, "truncated": noisy}


@pytest.mark.gpu
@pytest.mark.parametrize("case", ["speculative-noisy-k4", "adaptive-noisy", "tree-noisy-gather", "tree-noisy-rerun",
                                  "prompt_lookup", "self_speculative"])
def test_cuda_graph_path_matches_greedy(case):
    """On CUDA (float32) greedy replays the engine's captured decode step and the strategies their captured
    static-buffer steps (fast_path=auto resolves to graph): the tokens must still be greedy's."""
    cuda_models = _cuda_models()
    target = cuda_models["target"]
    greedy = registry.build("decoder", "greedy")
    s = strategy(case, cuda_models, "auto")
    for prompt in prompts():
        ref = greedy.generate(target, prompt.cuda(), 40).tokens
        out = s.generate(target, prompt.cuda(), 40)
        assert out.counters["fast_path_graph"] == 1.0
        assert torch.equal(out.tokens, ref), (case, out.tokens.tolist(), ref.tolist())
