"""Tasks measure what the selected plugins do: perplexity through the cache (int2 and a short window move it, a
window longer than the text says so), throughput and memory on held-out text, integer counts."""

from pathlib import Path

import pytest
import torch

from ollm_triton.data.corpus import load_corpus
from ollm_triton.decoding.base import DecoderStrategy
from ollm_triton.engine import load_engine
from ollm_triton.registry import registry
from ollm_triton.tasks.base import RunContext

MODEL = Path(__file__).resolve().parent.parent / "ollm_triton" / "assets" / "tiny-llama"
CPU = torch.device("cpu")
# three windows of 384 tokens (256 of context, 128 scored after the first): int2 holds up to 256 tokens quantized
PPL = dict(max_length=384, stride=128, max_tokens=640)

pytestmark = pytest.mark.skipif(not (MODEL / "config.json").is_file(), reason="embedded model not in this checkout")


def engine(attention=None, cache=None, **cache_params):
    codec = registry.build("cache", cache, cache_params) if cache else None
    attn = registry.build("attention", attention[0], attention[1]) if attention else None
    return load_engine(MODEL, attention=attn, codec=codec, device="cpu", dtype=torch.float32)


def perplexity(eng, **params):
    return registry.build("task", "perplexity", {**PPL, **params}).run(RunContext(engine=eng, decoder=None, device=CPU))


@pytest.fixture(scope="module")
def dense():
    return perplexity(engine())


def test_dense_scores_every_token_once_through_the_decode_path(dense):
    assert dense["tokens_scored"] == 639 and dense["windows"] == 3
    assert dense["chunk"] == 16 and dense["chunk_path"] == "decode"
    assert dense["tokens_scored_lossy_cache"] == 0 and dense["keys_masked"] == 0.0
    assert dense["plugin_effect"].startswith("baseline")
    for key in ("tokens_scored", "max_length", "stride", "chunk", "windows", "longest_sequence",
                "tokens_scored_lossy_cache", "kv_tokens_compressed_max", "kv_tokens_evicted_max"):
        assert type(dense[key]) is int, key


def test_dense_chunked_equals_one_forward_per_window(dense):
    """With a lossless cache the chunked decode path gives what one forward over each window gives."""
    eng = engine()
    one = perplexity(eng, chunk=PPL["max_length"])
    assert one["chunk_path"] == "prefill over the stored cache"
    assert one["ppl"] == pytest.approx(dense["ppl"], rel=1e-5)


def test_int2_is_not_dense(dense, capsys):
    out = perplexity(engine(cache="int2"))
    assert out["ppl"] != dense["ppl"]
    assert out["ppl"] > dense["ppl"] * 1.001, (out["ppl"], dense["ppl"])  # 2-bit keys lose information
    assert out["tokens_scored_lossy_cache"] > 300 and out["kv_tokens_compressed_max"] >= 128
    assert out["plugin_effect"].startswith("cache int2: ")
    assert "no effect" not in capsys.readouterr().err


def test_short_sliding_window_is_not_dense(dense):
    out = perplexity(engine(attention=("sliding_window", {"window": 128, "sink": 4})))
    assert out["ppl"] != dense["ppl"]
    assert 0.3 < out["keys_masked"] < 1
    assert out["plugin_effect"].startswith("attention sliding_window: ")


def test_window_longer_than_the_text_says_none(dense, capsys):
    out = perplexity(engine(attention=("sliding_window", {"window": 4096})))
    assert out["plugin_effect"] == "none: attention sliding_window: window 4096 >= longest sequence 384"
    assert out["keys_masked"] == 0.0
    assert out["ppl"] == pytest.approx(dense["ppl"], rel=1e-4)
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["perplexity: selected plugin had no effect: attention sliding_window: window 4096 >= longest "
                   "sequence 384"]


def test_residual_covering_every_token_says_none(dense, capsys):
    out = perplexity(engine(cache="int4", residual=512))
    assert out["tokens_scored_lossy_cache"] == 0
    assert out["plugin_effect"].startswith("none: cache int4: 0 tokens compressed or evicted")
    assert out["ppl"] == pytest.approx(dense["ppl"], rel=1e-5)
    assert "no effect" in capsys.readouterr().err


def test_h2o_evicts_and_moves_the_score(dense):
    out = perplexity(engine(cache="h2o"))
    assert out["kv_tokens_evicted_max"] > 0 and out["ppl"] != dense["ppl"]


class Recorder(DecoderStrategy):
    """Greedy, recording the prompts it was given."""

    def __init__(self):
        self.inner, self.prompts, self.lengths = registry.build("decoder", "greedy"), [], []

    def generate(self, engine, prompt_ids, max_new_tokens, *, eos_id=None):
        self.prompts.append(prompt_ids.cpu())
        self.lengths.append(max_new_tokens)
        return self.inner.generate(engine, prompt_ids, max_new_tokens, eos_id=eos_id)


def test_throughput_prompt_is_held_out_text():
    eng, rec = engine(), Recorder()
    task = registry.build("task", "throughput", {"prompt_len": 64, "new_tokens": 4, "repeats": 1, "batch": 2})
    out = task.run(RunContext(engine=eng, decoder=rec, device=CPU))
    assert out["prompt"] == "corpus"
    prompt = rec.prompts[-1]
    assert prompt.shape == (2, 64)
    docs = load_corpus().eval_docs
    for row in prompt:
        text = eng.tokenizer.decode(row.tolist())
        assert any(doc.startswith(text[:200]) for doc in docs), text[:80]
    for key in ("prompt_len", "new_tokens", "batch"):
        assert type(out[key]) is int, key


def test_throughput_warms_up_as_long_as_a_timed_run():
    """The warm-up decodes as many tokens as each timed run, so every graph a timed run replays (the piecewise step
    captures per length) is captured before the timing, also with repeats=1."""
    eng, rec = engine(), Recorder()
    registry.build("task", "throughput", {"prompt_len": 32, "new_tokens": 6, "repeats": 1, "prompt": "random"}).run(
        RunContext(engine=eng, decoder=rec, device=CPU))
    assert rec.lengths == [6, 6]


class AliveCaches(Recorder):
    """Records, as each generation starts, how many caches of the earlier generations are still alive."""

    def __init__(self):
        super().__init__()
        self.refs, self.alive = [], []

    def generate(self, engine, prompt_ids, max_new_tokens, *, eos_id=None):
        import gc
        import weakref

        gc.collect()
        self.alive.append(sum(r() is not None for r in self.refs))
        own = "new_cache" in engine.__dict__  # the task's CacheWatch wrapper, else the engine's own method
        build = engine.new_cache

        def new_cache(*args, **kwargs):
            cache = build(*args, **kwargs)
            self.refs.append(weakref.ref(cache))
            return cache

        engine.new_cache = new_cache
        try:
            return super().generate(engine, prompt_ids, max_new_tokens, eos_id=eos_id)
        finally:
            if own:
                engine.new_cache = build
            else:
                del engine.new_cache


def test_throughput_holds_one_cache_at_a_time():
    """The timed repeats' caches are released as each run ends (the memory check counts one cache): holding them
    to the task's end kept 3 caches alive, ~4 GB over the estimate for qwen3_next_80b's linear-attention states."""
    eng, rec = engine(), AliveCaches()
    registry.build("task", "throughput", {"prompt_len": 16, "new_tokens": 2, "repeats": 3, "prompt": "random"}).run(
        RunContext(engine=eng, decoder=rec, device=CPU))
    assert rec.alive == [0, 0, 0, 0]  # warm-up, then the 3 timed runs


def test_throughput_random_prompt_on_request_and_without_tokenizer():
    eng, rec = engine(), Recorder()
    task = registry.build("task", "throughput", {"prompt_len": 32, "new_tokens": 2, "repeats": 1, "prompt": "random"})
    assert task.run(RunContext(engine=eng, decoder=rec, device=CPU))["prompt"] == "random"
    eng.tokenizer = None
    out = registry.build("task", "throughput", {"prompt_len": 32, "new_tokens": 2, "repeats": 1}).run(
        RunContext(engine=eng, decoder=rec, device=CPU))
    assert out["prompt"] == "random (the model has no tokenizer)"


def test_memory_task_reads_held_out_text_and_its_own_peak():
    out = registry.build("task", "memory", {"context_len": 320, "new_tokens": 2}).run(
        RunContext(engine=engine(cache="int4", residual=32), decoder=None, device=CPU))
    assert out["prompt"] == "corpus" and out["context_len"] == 322
    assert out["host_peak_rss_source"] == "VmHWM" and out["host_peak_rss_bytes"] >= out["host_rss_bytes"] * 0.5
    assert type(out["host_peak_rss_bytes"]) is int and type(out["kv_tokens_kept"]) is int
    assert out["plugin_effect"].startswith("cache int4: ")


def test_footprints_declare_the_context():
    assert registry.build("task", "perplexity", {}).footprint(False) == (1, 2048)
    assert registry.build("task", "passkey", {}).footprint(False) == (1, 4096 + 10 + 16)
    assert registry.build("task", "throughput", {"batch": 4}).footprint(False) == (4, 512 + 64 + 16)
    assert registry.build("task", "memory", {}).footprint(True) == (1, 66)
