"""Inputs longer than the model's context through the scheduler (serve/scheduler.py, "Long inputs").

A prompt of 3x the served context goes through `+cache=streaming` and `+cache=h2o` chunk by chunk (the context is
the scheduler's `max_context`, 512 here as `serve.max_context=512` would set it: the embedded model's own 4096 made
the test cost three 12k-token prefills, 90 s on this CPU; positions past 4096 are RoPE of the absolute position as
anywhere else): the KV the request holds is measured after every step against the bound computed here by hand from
the codec's parameters (budget + the chunk being appended, at K, V, an int32 position and h2o's score per token and
KV head), the prefill never exceeds the per-step budget, and the answer equals the same prompt run alone through
`Engine.prefill` with the same chunk. The same prompt with the dense codec is refused at submit with one line naming
`prompt` and what is accepted.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from ollm_triton.engine import load_engine
from ollm_triton.registry import registry
from ollm_triton.serve.scheduler import AdmissionError, SamplingParams, Scheduler

ASSET = Path(__file__).resolve().parents[1] / "ollm_triton" / "assets" / "tiny-llama"
BUDGET, SINK, CHUNK, NEW, CONTEXT = 64, 4, 128, 6, 512
GREEDY = SamplingParams(temperature=0)


@pytest.fixture(scope="module")
def engine(one_torch_thread):
    return load_engine(ASSET, codec=registry.build("cache", "streaming", {"budget": BUDGET, "sink": SINK}),
                       device="cpu")


def long_prompt(engine) -> list[int]:
    n = 3 * CONTEXT
    return torch.randint(3, engine.config.vocab_size, (n,), generator=torch.Generator().manual_seed(0)).tolist()


def held_bytes(cache) -> tuple[int, int]:
    """(bytes the layers account for, bytes of every tensor they hold) of one request's cache."""
    stored = sum(layer.stored_bytes() for layer in cache.layers)
    tensors = sum(t.numel() * t.element_size() for layer in cache.layers for t in vars(layer).values()
                  if isinstance(t, torch.Tensor))
    return stored, tensors


@pytest.fixture
def codec(engine, request):
    """The run's codec for one test (the scheduler reads engine.codec when it starts)."""
    name, params, score_bytes = request.param
    before = engine.codec
    engine.codec = registry.build("cache", name, params)
    yield score_bytes
    engine.codec = before


@pytest.mark.parametrize("codec", [("streaming", {"budget": BUDGET, "sink": SINK}, 0),
                                   ("h2o", {"budget": BUDGET}, 4)], indirect=True, ids=["streaming", "h2o"])
def test_a_prompt_three_times_the_context_streams_through_a_bounded_cache(engine, codec):
    cfg = engine.config
    prompt = long_prompt(engine)
    # by hand: the layer evicts to BUDGET before each append, so it holds at most BUDGET + one chunk, each token at
    # float32 K and V, an int32 position and (h2o) a float32 accumulated score per KV head
    per_token = cfg.num_layers * cfg.num_kv_heads * (2 * cfg.head_dim * 4 + 4 + codec)
    bound = (BUDGET + CHUNK) * per_token
    sched = Scheduler(engine, max_batch=2, prefill_chunk=CHUNK, prefill_budget=CHUNK, max_context=CONTEXT)
    assert sched.held_bound == BUDGET + CHUNK and len(prompt) > sched.max_context
    assert sched.kv_bytes(sched.held_bound) == bound  # what admission reserves is the declared bound
    req = sched.submit(prompt, NEW, GREEDY)
    most = most_tensors = steps = 0
    prefilled = []
    while not req.finished:
        before = sched.counts["prefill_tokens"]
        sched.step()
        steps += 1
        prefilled.append(sched.counts["prefill_tokens"] - before)
        for run in sched._running:
            stored, tensors = held_bytes(run.cache)
            most, most_tensors = max(most, stored), max(most_tensors, tensors)
        assert sched.stats()["kv_bytes_in_use"] <= bound
    events = req.result(timeout=0)
    assert events[-1].finish_reason == "length" and len(req.generated) == NEW
    assert req.prefill_tokens == len(prompt) and max(prefilled) <= CHUNK  # the per-step budget held
    assert steps >= math.ceil(len(prompt) / CHUNK)
    assert CHUNK * per_token <= most <= bound  # measured: it did fill up to a chunk, and never past the bound
    # what is allocated (room for the next appends included) does not grow with the prompt either
    assert most_tensors <= max(BUDGET + CHUNK, 2 * (BUDGET + 16)) * per_token

    # the request alone: the same chunks through Engine.prefill, then greedy steps
    cache = engine.new_cache(max_len=len(prompt) + NEW)
    logits = engine.prefill(torch.tensor([prompt]), cache, chunk=CHUNK)
    alone = []
    for i in range(NEW):
        alone.append(int(logits[0].argmax()))
        if i < NEW - 1:
            logits = engine.forward(torch.tensor([[alone[-1]]]), cache)[:, -1]
    assert req.generated == alone
    assert cache.position == len(prompt) + NEW - 1 and cache.layers[0].length <= BUDGET + CHUNK


def test_the_same_prompt_without_a_bounding_codec_is_refused_in_one_line(engine):
    prompt = long_prompt(engine)
    codec = engine.codec
    try:
        for name, params in (("dense", {}), ("streaming", {"ratio": 0.5}), ("snapkv", {"budget": BUDGET})):
            engine.codec = registry.build("cache", name, params)  # the scheduler reads the run's codec at start
            sched = Scheduler(engine, prefill_chunk=CHUNK, max_context=CONTEXT)
            assert sched.held_bound is None, name
            with pytest.raises(AdmissionError) as e:
                sched.submit(prompt, NEW, GREEDY)
            msg = str(e.value)
            assert e.value.status == 400 and e.value.param == "prompt" and "\n" not in msg, msg
            assert f"prompt ({len(prompt)} tokens)" in msg and "+cache=streaming" in msg, msg
    finally:
        engine.codec = codec


@pytest.mark.parametrize("name, params", [("streaming", {"budget": 24, "sink": 4, "evict_every": 5}),
                                          ("h2o", {"budget": 24, "evict_every": 3})])
def test_an_eviction_layer_never_holds_more_than_its_codec_declares(engine, name, params):
    """The declaration against the layer: appends of blocks of 1..20 tokens, bytes and tokens after each."""
    codec = registry.build("cache", name, params)
    spec = engine.layer_spec(1, 512)
    layer = codec.new_layer(spec)
    gen = torch.Generator().manual_seed(1)
    for block in [20, 1, 7, 20, 3, 1, 1, 20, 13, 20, 2, 20]:
        k = torch.randn(1, spec.kv_heads, block, spec.head_dim, generator=gen)
        layer.append(k, k)
        layer.observe(torch.randn(1, spec.kv_heads * 2, block, spec.head_dim, generator=gen))
        assert layer.length <= codec.max_held_tokens(20), (name, block, layer.length)
        assert layer.stored_bytes() == codec.bytes_for(spec, layer.length)
    assert layer.evicted_tokens > 0


def test_the_http_layer_passes_long_inputs_only_when_the_scheduler_bounds_them():
    """serve/protocol.py's length check before the scheduler: a 400 naming `prompt` and the codecs that would take
    it, or (Limits.long_inputs, from Scheduler.held_bound) the request through to the scheduler."""
    from ollm_triton.serve.protocol import APIError, Limits, check_length

    limits = Limits(model="tiny", max_context=CONTEXT, vocab_size=8192, defaults=GREEDY)
    with pytest.raises(APIError) as e:
        check_length(3 * CONTEXT, NEW, limits, "prompt")
    assert e.value.param == "prompt" and "+cache=streaming" in str(e.value) and "\n" not in str(e.value)
    limits.long_inputs = True
    assert check_length(3 * CONTEXT, NEW, limits, "prompt") == NEW
    assert check_length(3 * CONTEXT, None, limits, "prompt") == 16  # no context left to fill: OpenAI's default


def test_over_http_a_long_prompt_streams_and_without_a_bounding_codec_is_a_400():
    """The server end to end (the openai client over loopback): serve.max_context=256, a 768-token prompt."""
    import openai
    from test_serve import client, serving

    prompt = torch.randint(3, 8000, (768,), generator=torch.Generator().manual_seed(2)).tolist()
    small = ["serve.max_context=256", "serve.prefill_chunk=64", "+decoder=greedy"]
    with serving("+cache=streaming", "cache.budget=48", *small) as (server, url):
        assert server.scheduler.held_bound == 48 + 64
        out = client(url).completions.create(model=server.model_name, prompt=prompt, max_tokens=4)
        assert out.usage.prompt_tokens == 768 and out.usage.completion_tokens >= 1
        assert server.scheduler.counts["prefill_chunks"] >= 768 // 64
    with serving(*small) as (server, url):
        with pytest.raises(openai.BadRequestError) as e:
            client(url).completions.create(model=server.model_name, prompt=prompt, max_tokens=4)
        error = e.value.body
        assert error["param"] == "prompt" and error["code"] == "context_length_exceeded", error
        assert "+cache=streaming" in error["message"] and "\n" not in error["message"]
