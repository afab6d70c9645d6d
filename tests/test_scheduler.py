"""Continuous batching (ollm_triton/serve/scheduler.py), in process: requests of different lengths joining and
leaving one running batch give what each gives alone, with every kind of codec; admission, cancellation, timeouts,
failures and the prefix cache behave as documented."""

import asyncio
import time
from pathlib import Path

import pytest
import torch

from ollm_triton.engine import load_engine
from ollm_triton.registry import registry
from ollm_triton.serve.scheduler import AdmissionError, SamplingParams, Scheduler

TINY = str(Path(__file__).resolve().parents[1] / "ollm_triton" / "assets" / "tiny-llama")
TEXTS = ["def fib(n):\n    ", "import os\nimport sys\n\nclass Foo:\n" * 6, "x = 1", "for i in range(10):" * 9,
         "# hello", "return", "while True:\n    pass\n" * 3, "print("]
GREEDY = SamplingParams(temperature=0)
CHUNK = 48


@pytest.fixture(scope="module")
def engines():
    # the reference engine prefills in the scheduler's chunks: an eviction codec scores (and evicts) per chunk
    out = {codec: (load_engine(TINY, codec=codec), load_engine(TINY, codec=codec, prefill_chunk=CHUNK))
           for codec in ("dense", "int4", "h2o")}
    # the static decode step over slot rows of one dense cache (what a GPU runs captured), here uncaptured
    out["slots"] = (load_engine(TINY, fast_decode="static"), load_engine(TINY, prefill_chunk=CHUNK))
    # the same slots over a quantized codec's storage, with groups small enough that the rows quantize mid-decode
    small = {"residual": 16, "group_size": 16}
    out["int4 slots"] = (load_engine(TINY, fast_decode="static", codec=registry.build("cache", "int4", small)),
                         load_engine(TINY, prefill_chunk=CHUNK, codec=registry.build("cache", "int4", small)))
    return out


def tokens(events):
    return [e.token_id for e in events if e.token_id is not None]


@pytest.mark.parametrize("codec", ["dense", "int4", "h2o", "slots", "int4 slots"])
def test_concurrent_requests_equal_their_one_at_a_time_outputs(engines, codec):
    engine, alone = engines[codec]
    tok = engine.tokenizer
    # 8 requests through 4 slots; prompts in chunks of 48, up to three chunks of one length in one forward
    sched = Scheduler(engine, max_batch=4, prefill_chunk=CHUNK, prefill_budget=3 * CHUNK, max_context=512)
    assert sched.rows.kind == ("static slots" if codec.endswith("slots") else "codec caches")
    try:
        prompts = [tok.encode(t) for t in TEXTS]
        lengths = [5, 17, 9, 12, 3, 20, 7, 11]
        # all queued before the first step, so that the first step's prefill batches rows whatever the host's load
        reqs = [sched.submit(p, n, GREEDY) for p, n in zip(prompts, lengths, strict=True)]
        sched.start()
        results = [r.result(120) for r in reqs]
        greedy = registry.build("decoder", "greedy")
        for p, n, events in zip(prompts, lengths, results, strict=True):
            ref = greedy.generate(alone, torch.tensor([p]), n, eos_id=tok.eos_token_id).tokens[0].tolist()
            assert tokens(events) == ref[: len(tokens(events))] and events[-1].finish_reason in ("length", "stop")
            assert len(tokens(events)) == n or events[-1].finish_reason == "stop"
        st = sched.stats()
        assert st["batch_size_mean"] > 1.5 and st["prefill_rows_mean"] > 1  # the rows really ran together
        assert st["running"] == st["queued"] == 0 and st["kv_bytes_in_use"] == 0
    finally:
        sched.shutdown()


def test_sampling_is_the_same_for_the_same_seed_alone_or_in_a_batch(engines):
    engine, _ = engines["dense"]
    tok = engine.tokenizer
    sched = Scheduler(engine, max_batch=4).start()
    try:
        sampled = SamplingParams(temperature=0.9, top_p=0.95, seed=11)
        alone = tokens(sched.submit(tok.encode(TEXTS[0]), 10, sampled).result(60))
        batch = [sched.submit(tok.encode(t), 10, SamplingParams(temperature=0.9, top_p=0.95, seed=11))
                 for t in TEXTS[:4]]
        assert tokens(batch[0].result(60)) == alone
        other = tokens(sched.submit(tok.encode(TEXTS[0]), 10, SamplingParams(temperature=0.9, seed=12)).result(60))
        assert other != alone  # the seed matters
    finally:
        sched.shutdown()


@pytest.mark.parametrize("layout", ["dense", "slots"])
def test_a_chat_turn_reuses_the_previous_turns_cache(engines, layout):
    engine, _ = engines[layout]
    tok = engine.tokenizer
    sched = Scheduler(engine, max_context=512).start()
    try:
        first = tok.encode("def add(a, b):\n")
        turn1 = sched.submit(first, 8, GREEDY)
        answer = tokens(turn1.result(60))
        second = first + answer + tok.encode("\ndef sub(a, b):\n")
        turn2 = sched.submit(second, 4, GREEDY)
        out2 = tokens(turn2.result(60))
        # the cache held the first prompt and every answer token but the last (never fed): only the rest is prefilled
        assert turn2.prefill_tokens == len(second) - (len(first) + len(answer) - 1)
        fresh = Scheduler(load_engine(TINY), prefix_cache_bytes=0).start()
        try:
            again = fresh.submit(second, 4, GREEDY)
            assert tokens(again.result(60)) == out2 and again.prefill_tokens == len(second)
        finally:
            fresh.shutdown()
    finally:
        sched.shutdown()


def test_stream_logprobs_and_cancel(engines):
    engine, _ = engines["dense"]
    tok = engine.tokenizer
    sched = Scheduler(engine, max_batch=1).start()
    try:
        async def collect(req):
            return [e async for e in req.stream()]

        events = asyncio.run(collect(sched.submit(tok.encode("x = "), 4, SamplingParams(temperature=0, logprobs=3))))
        assert len(tokens(events)) == 4 and events[-1].finish_reason == "length"
        for e in events:
            assert e.top_logprobs[0][0] == e.token_id and len(e.top_logprobs) == 3  # greedy: the best is chosen
            assert e.logprob == pytest.approx(e.top_logprobs[0][1]) and e.logprob <= 0
        long = sched.submit(tok.encode("y = "), 1000, GREEDY)
        waiting = sched.submit(tok.encode("z = "), 3, GREEDY)  # queued behind the long one (max_batch 1)
        while not long.events:
            time.sleep(0.01)
        long.cancel()
        assert long.result(30)[-1].finish_reason == "cancelled" and len(tokens(long.events)) < 1000
        assert waiting.result(30)[-1].finish_reason == "length"  # the freed slot served the queue
    finally:
        sched.shutdown()


def test_refusals_timeouts_and_a_failure_that_stays_alone(engines):
    engine, _ = engines["dense"]
    tok = engine.tokenizer
    prompt = tok.encode("a = 1")
    sched = Scheduler(engine, max_batch=1, max_queue=1, queue_timeout_s=0.5)
    with pytest.raises(AdmissionError, match="exceeds the model's context") as e:
        sched.submit(prompt, engine.config.max_position_embeddings, GREEDY)
    assert e.value.status == 400
    for bad, match in [(dict(max_tokens=0), "max_tokens"), (dict(sampling=SamplingParams(temperature=-1)),
                                                             "temperature")]:
        with pytest.raises(AdmissionError, match=match):
            sched.submit(prompt, **{"max_tokens": 3, "sampling": GREEDY, **bad})
    sched.submit(prompt, 3, GREEDY)  # the loop is not started: both wait
    late = sched.submit(prompt, 3, GREEDY)
    with pytest.raises(AdmissionError, match="too many requests") as e:
        sched.submit(prompt, 3, GREEDY)
    assert e.value.status == 429
    time.sleep(0.6)
    sched.step()  # the first is admitted; the second has waited past queue_timeout_s
    assert late.finished and late.events[-1].status == 429 and "queue_timeout_s" in late.events[-1].error
    sched.start()
    broken = sched.submit(prompt, 5, GREEDY)
    while not broken.events:
        sched.step() if sched._thread is None else time.sleep(0.005)
    run = next(r for r in sched._running if r.req is broken) if not broken.finished else None
    if run is not None:  # make its cache fail: only this request ends in an error
        run.cache.layers[0].append = lambda *a: (_ for _ in ()).throw(RuntimeError("disk gone"))
        assert broken.result(30)[-1].finish_reason == "error" and "disk gone" in broken.events[-1].error
    ok = sched.submit(prompt, 3, GREEDY)
    assert ok.result(30)[-1].finish_reason == "length"
    sched.shutdown()


def test_kv_budget_admits_by_the_codecs_bytes(engines):
    """The same KV budget admits more int4 requests at once than dense ones: admission counts the codec's bytes."""
    def admitted(engine, budget):
        sched = Scheduler(engine, max_batch=8, kv_budget_bytes=budget, max_queue=16)
        reqs = [sched.submit(engine.tokenizer.encode(t), 600, GREEDY) for t in TEXTS]
        for _ in range(3):  # admission happens at the start of each step
            sched.step()
            assert sched.stats()["kv_bytes_reserved"] <= budget
        running = sched.stats()["running"]
        sched.shutdown()
        assert all(r.finished for r in reqs)
        return running

    dense, int4 = engines["dense"][0], engines["int4"][0]
    budget = int(3 * Scheduler(dense).kv_bytes(800))  # three 800-token requests in dense bytes
    # int4 keeps the newest residual + group - 1 tokens exact and the rest at about a quarter: more fit
    assert admitted(int4, budget) > admitted(dense, budget) >= 1


def test_a_failed_prompt_chunk_rolls_back_on_a_hybrid_model():
    """Qwen3-Next's linear-attention layers hold a state, not K/V. When a batched prompt chunk fails after some of
    them updated (here in its fourth layer, the first attention layer, after three Gated DeltaNet layers), the
    other request's state goes back to before the chunk and it gets the tokens it gets alone; the failing request
    fails alone."""
    import yaml

    root = Path(__file__).resolve().parents[1]
    arch = yaml.safe_load((root / "ollm_triton" / "conf" / "model" / "tiny_qwen3_next.yaml").read_text())["arch"]
    engine = load_engine(arch, seed=0)
    greedy = registry.build("decoder", "greedy")
    good = [11 + 7 * i for i in range(2 * CHUNK + 5)]  # three chunks: the failure comes in the second
    bad = [12 + 5 * i for i in range(2 * CHUNK + 5)]
    bad[CHUNK + 3] = 8000
    alone = greedy.generate(engine, torch.tensor([good]), 6).tokens[0].tolist()
    step = engine.model.step

    class FailingMixer:  # the step's mixer, raising when the attention layer is reached
        def __init__(self, mixer):
            self.mixer = mixer

        def __call__(self, i, *a, **k):
            if i == 3:
                raise RuntimeError("injected fault")
            return self.mixer(i, *a, **k)

        def __getattr__(self, name):  # the linear-attention layers' `state(i)`
            return getattr(self.mixer, name)

    def failing(ids, mixer, *args, **kwargs):
        return step(ids, FailingMixer(mixer) if (ids == 8000).any() else mixer, *args, **kwargs)

    engine.model.step = failing
    sched = Scheduler(engine, max_batch=2, prefill_chunk=CHUNK, prefill_budget=2 * CHUNK, max_context=512)
    reqs = [sched.submit(good, 6, GREEDY), sched.submit(bad, 6, GREEDY)]
    for _ in range(20):
        sched.step()
    assert all(r.finished for r in reqs)
    assert reqs[1].events[-1].finish_reason == "error" and "injected fault" in reqs[1].events[-1].error
    assert tokens(reqs[0].events) == alone
    sched.shutdown()
