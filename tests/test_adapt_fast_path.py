"""`+adapt` and the whole static decode step: a generation in which no strategy can act runs the wrapped codec's whole
step (the same path and tokens as a run without the adapter); one in which a strategy may act runs piecewise, so its
appends reach the adapter, and switches as before. CPU, the embedded model, fast_decode=static (the step uncaptured).
"""

from __future__ import annotations

import pytest
import torch
from test_adapt import NEW, PROMPT, QUANT, adapted, dense_bytes_per_token, engine, greedy_by_hand

from ollm_triton.decoding.greedy import Greedy
from ollm_triton.engine.engine import Engine
from ollm_triton.registry import registry


def static(eng: Engine) -> Engine:
    """The same model and plugins, decoding through the static step (what a GPU captures)."""
    return Engine(eng.model, attention=eng.attention, codec=eng.codec, prefetch=eng.prefetch, device=eng.device,
                  dtype=eng.dtype, tokenizer=eng.tokenizer, fast_decode="static")


@pytest.fixture(scope="module")
def prompt():
    return torch.randint(0, 8000, (1, PROMPT), generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def plain(prompt):
    """The run without an adapter: its fast path and tokens."""
    eng = static(engine())
    return eng, Greedy().generate(eng, prompt, NEW)


def fast_counters(gen) -> dict:
    return {k: v for k, v in gen.counters.items() if k.startswith("fast_path")}


def under_memory(**params):
    adapter, eng = adapted("memory", **QUANT, **params)
    eng = static(eng)
    adapter.attach(engine=eng)
    return adapter, eng


def test_a_horizon_that_fits_runs_the_whole_step_with_the_plain_runs_tokens(plain, prompt, one_torch_thread):
    ref_eng, ref = plain
    adapter, eng = under_memory(budget_gb=1.0)
    out = Greedy().generate(eng, prompt, NEW)
    assert eng.fast_path.describe() == ref_eng.fast_path.describe()
    assert eng.fast_path.mode == "graph"
    assert fast_counters(out) == fast_counters(ref) and out.counters["fast_path_piecewise"] == 0
    assert eng.fast_decoder().blocker is None and eng.fast_decoder().segments is None
    assert torch.equal(out.tokens, ref.tokens)
    report = adapter.report()
    assert report["adapt/switches"] == 0
    assert report["adapt/steps"] == NEW  # the prompt's step, then each decode step counted after the static step


def test_a_generation_that_must_switch_runs_piecewise_and_switches(probe_tokens, prompt, one_torch_thread):
    fits = 48  # dense tokens the budget holds: the same arithmetic as test_adapt's switch
    probe, ref_tokens = probe_tokens
    adapter, eng = under_memory(budget_gb=(fits + 0.5) * dense_bytes_per_token(probe) / 1e9, every=4)
    out = Greedy().generate(eng, prompt, NEW)
    fast = eng.fast_decoder()
    assert fast.blocker.startswith("adapt 'memory': the 56-token horizon needs")
    assert out.counters["fast_path_piecewise"] == 1 and fast.segments is not None and not fast.buckets
    decisions = adapter.report()["adapt/decisions"]
    # the piecewise bucket holds 1024 tokens (round_capacity): int8 would not fit that horizon, int4 does
    assert [(d["from"], d["to"], d["step"]) for d in decisions] == [("dense", "int4", fits - PROMPT + 2)]
    assert torch.equal(out.tokens, ref_tokens)


@pytest.fixture(scope="module")
def probe_tokens(prompt):
    probe = engine()
    tokens, _ = greedy_by_hand(probe, prompt, NEW, switch_at_len=48, codec=registry.build("cache", "int4", QUANT))
    return probe, tokens


def test_each_strategy_answers_for_the_cache_it_would_act_on(prompt, one_torch_thread):
    adapter, eng = under_memory()  # no budget: the device's room (simulated here) sizes the cache
    strategy = adapter.strategies[0]
    strategy.inactive = None
    spec = eng.layer_spec(1, 64)
    per_token = dense_bytes_per_token(eng)
    adapter.device_room = lambda: 1e12
    assert eng.codec.static_blocker(spec, 56) is None
    adapter.device_room = lambda: 40 * per_token + strategy.cfg.reserve_gb * 1e9
    assert eng.codec.static_blocker(spec, 56).startswith("adapt 'memory': dense fits ")
    # a cache the memory strategy moved while it stored the prompt is refused after it
    moved, moved_eng = adapted("memory", budget_gb=45 * per_token / 1e9, **QUANT)
    cache = moved_eng.new_cache(batch=1, max_len=64)
    moved_eng.prefill(torch.cat([prompt, prompt[:, :8]], 1), cache)
    assert moved.report()["adapt/switches"] == 1
    assert moved_eng.codec.static_blocker(spec, 56, cache) == "adapt moved the cache to int8 during the prompt"
    # a strategy on the step clock may act at any step; one its own loop drives (speculative) does not block
    power = registry.build("adapt", "power", {"max_power_w": 100.0})
    power_eng = engine(power.wrap_codec(registry.build("cache", "dense")))
    power.attach(engine=power_eng, monitor=object())
    assert power_eng.codec.static_blocker(spec, 56) == "adapt 'power' acts on the step clock"
    assert registry.build("adapt", "speculative").wrap_codec(eng.codec.base) is eng.codec.base
