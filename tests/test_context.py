"""Context compression (`+context=...`, ollm_triton/context/): budgets, protected spans, determinism, what the
scorer says, and the passkey needle under hierarchical compression, with the embedded models on the CPU."""

from __future__ import annotations

import math
import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ollm_triton.context.hierarchical import line_chunks
from ollm_triton.engine import load_engine
from ollm_triton.registry import PluginError, registry

ASSETS = Path(__file__).resolve().parents[1] / "ollm_triton" / "assets"
METHODS = ("importance", "hierarchical")
T = 301  # odd, and more than two hierarchical chunks and one importance segment

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def target():
    return load_engine(ASSETS / "tiny-llama")


@pytest.fixture(scope="module")
def rows(target) -> torch.Tensor:
    """[2, T] held-out text, two different places of the eval split."""
    from ollm_triton.data.corpus import load_corpus

    ids = target.tokenizer.encode(load_corpus().eval_text()[:20000])
    return torch.tensor([ids[:T], ids[1000 : 1000 + T]])


_built: dict = {}


def compressor(name: str, **params):
    """One instance per configuration for the module (each loads the scorer once)."""
    key = (name, tuple(sorted(params.items())))
    if key not in _built:
        _built[key] = registry.build("context", name, params)
    return _built[key]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("ratio", [0.9, 0.1])
def test_reaches_ratio_keeps_protected_and_is_deterministic(target, rows, method, ratio):
    c = compressor(method, ratio=ratio)
    out = c.compress(rows, target=target)
    k = out.ids.shape[1]
    assert out.ids.shape[0] == 2 and abs(k - ratio * T) <= 1, (k, ratio * T)
    assert out.over_budget == 0
    for b in range(2):
        kept = out.kept[b].tolist()
        assert kept == sorted(set(kept)), "kept positions must be unique and in order"
        assert torch.equal(out.ids[b], rows[b, out.kept[b]])
        held = set(kept)
        assert 0 in held  # keep_first
        assert all(p in held for p in range(T - 16, T))  # keep_last stands in for a question
        dropped = sum(e - s for s, e in out.dropped_spans(b))
        assert dropped == T - k
    again = c.compress(rows, target=target)
    assert torch.equal(again.kept, out.kept)


@pytest.mark.parametrize("method", METHODS)
def test_protected_spans_and_query_survive_heavy_compression(target, rows, method):
    c = compressor(method, ratio=0.2)
    out = c.compress(rows, protect=[(40, 61)], query=(270, 290), target=target)
    assert out.ids.shape[1] == round(0.2 * T)
    for b in range(2):
        held = set(out.kept[b].tolist())
        assert {0, *range(40, 61), *range(270, 290)} <= held


def test_protected_spans_beyond_the_budget_are_kept_and_reported(target, rows):
    out = compressor("importance", ratio=0.1).compress(rows, protect=[(10, 60)], target=target)
    assert out.ids.shape[1] == 1 + 50 + 16 and out.over_budget == 1 + 50 + 16 - round(0.1 * T)


def test_importance_drops_the_least_informative_tokens(target, rows):
    """One segment: the kept free tokens are exactly the highest self-information ones under the draft model,
    computed here by one plain forward of an independently loaded draft."""
    budget = round(0.4 * T)
    out = compressor("importance", ratio=0.4, segment=T, keep_last=0).compress(rows[:1], target=target)
    draft = load_engine(ASSETS / "tiny-llama-draft")
    logits = draft.forward(rows[:1], draft.new_cache(1, T))[0].double()
    info = F.cross_entropy(logits[:-1], rows[0, 1:], reduction="none")  # info of tokens 1..T-1
    top = set((torch.argsort(info, descending=True)[: budget - 1] + 1).tolist())
    assert set(out.kept[0].tolist()) == {0} | top


@pytest.fixture(scope="module")
def passkey_docs(target):
    from ollm_triton.data.retrieval import QUESTION_TEMPLATE, corpus_filler, make_retrieval_doc
    from ollm_triton.tasks.passkey import _Segments

    tok = _Segments(target.tokenizer)
    filler = corpus_filler(target.tokenizer, "eval")
    rng = random.Random(3)
    docs = []
    for depth in (0.1, 0.5, 0.9):
        prefix = [tok.bos] if tok.bos is not None else []
        doc = make_retrieval_doc(tok, filler, 1024 - len(prefix), rng, depth=depth)
        ids = torch.tensor([[*prefix, *doc.ids]])
        asked = len(tok.encode(QUESTION_TEMPLATE.format(key=doc.needle.key)))
        a, b = doc.needle.span
        docs.append((ids, (ids.shape[1] - asked, ids.shape[1]), (a + len(prefix), b + len(prefix))))
    return docs


def test_hierarchical_keeps_the_needle_the_question_points_at(target, passkey_docs):
    c = compressor("hierarchical", ratio=0.3)
    for ids, query, (a, b) in passkey_docs:
        out = c.compress(ids, query=query, target=target)
        assert abs(out.ids.shape[1] - 0.3 * ids.shape[1]) <= 1
        held = set(out.kept[0].tolist())
        assert all(p in held for p in range(a, b)), f"needle [{a}, {b}) dropped at ratio 0.3"
        # the needle's chunk was kept whole (not pooled), so the tokens around the line survive too
        assert a - 1 in held and b in held


def test_hierarchical_refines_the_relevant_chunk_when_it_does_not_fit(target, passkey_docs):
    """At 0.1 of 1024 tokens no 128-token chunk fits the ~85 free tokens: the needle's chunk is cut into
    line-aligned halves, ranked again, and the needle's line is kept whole rather than pooled to 8 tokens."""
    c = compressor("hierarchical", ratio=0.1)
    for ids, query, (a, b) in passkey_docs:
        out = c.compress(ids, query=query, target=target)
        assert out.notes["chunks_whole"] >= 1  # whole pieces, at a finer level than the first chunks
        # the needle's leading newline token ends the line before it (pieces end after a newline): the line
        # `key = value\n` itself is what must survive
        assert set(range(a + 1, b)) <= set(out.kept[0].tolist()), f"needle line [{a + 1}, {b}) dropped at 0.1"


def test_line_chunks_end_at_line_ends_and_never_cross_a_protected_span():
    positions = torch.tensor([*range(0, 50), *range(60, 100)])
    newline = torch.zeros(positions.numel(), dtype=torch.bool)
    newline[[12, 30, 70]] = True  # positions 12, 30 and 80 end a line
    chunks = [c.tolist() for c in line_chunks(positions, newline, 20)]
    assert sum(chunks, []) == positions.tolist()
    assert chunks[0] == list(range(0, 13))  # cut after the line end in the second half of 20 tokens
    assert all(c == list(range(c[0], c[-1] + 1)) for c in chunks)  # no chunk spans the 50..59 gap
    assert max(len(c) for c in chunks) <= 20
    assert [60, 61] == chunks[[i for i, c in enumerate(chunks) if 60 in c][0]][:2]


def test_adaptive_picks_method_and_ratio_from_the_budget(target, rows):
    row = rows[:1]
    within = compressor("adaptive", max_context=400).compress(row, target=target)
    assert within.method == "none" and within.ids.shape[1] == T
    mild = compressor("adaptive", max_context=240).compress(row, target=target)
    assert mild.method == "importance" and mild.ids.shape[1] == 240
    heavy = compressor("adaptive", max_context=60).compress(row, target=target)
    assert heavy.method == "hierarchical" and heavy.ids.shape[1] == 60
    # the KV budget: dense float32 K and V of every layer, counted from the model's shapes here
    cfg = target.config
    per_token = 2 * cfg.num_kv_heads * cfg.head_dim * 4 * cfg.num_layers
    gb = 100.5 * per_token / 1e9
    by_memory = compressor("adaptive", max_context=0, memory_gb=gb).compress(row, target=target)
    assert by_memory.ids.shape[1] == 100 and by_memory.notes["budget_tokens"] == 100


def test_none_keeps_every_token(rows):
    out = registry.build("context", "none").compress(rows)
    assert torch.equal(out.ids, rows) and out.ratio == 1.0


@pytest.mark.parametrize("name, params, field", [
    ("importance", {"ratio": 0.0}, "ratio"),
    ("importance", {"ratio": 1.5}, "ratio"),
    ("importance", {"segment": 0}, "segment"),
    ("hierarchical", {"chunk": 1}, "chunk"),
    ("hierarchical", {"pool": 0}, "pool"),
    ("hierarchical", {"relevance": "bm25"}, "relevance"),
    ("hierarchical", {"ratios": 0.3}, "ratios"),
    ("adaptive", {"max_context": 0}, "budget"),
    ("adaptive", {"coarse_below": 2.0}, "coarse_below"),
    ("none", {"keep_last": -1}, "keep_last"),
])
def test_bad_parameters_refuse_in_one_line(name, params, field):
    with pytest.raises(PluginError) as e:
        registry.build("context", name, params)
    assert "\n" not in str(e.value) and field in str(e.value) and f"context {name!r}" in str(e.value)


def test_bad_spans_and_scorer_refuse_in_one_line(rows):
    c = registry.build("context", "hierarchical", {"ratio": 0.5})
    with pytest.raises(ValueError, match="query span"):
        c.compress(rows, query=(290, 400))
    with pytest.raises(ValueError, match="protected span"):
        c.compress(rows, protect=[(-1, 3)])
    with pytest.raises(ValueError) as e:
        registry.build("context", "importance", {"scorer": "embedded:no-such-model"}).compress(rows)
    assert "\n" not in str(e.value) and "no-such-model" in str(e.value)


def test_runner_validates_the_context_group():
    from ollm_triton.run import resolve_plugins

    plugins = resolve_plugins({"context": {"name": "hierarchical", "ratio": 0.3}})
    assert plugins["context"] == {"name": "hierarchical", "params": {"ratio": 0.3}, "default": False}
    assert resolve_plugins({})["context"]["name"] == "none"
    with pytest.raises(PluginError, match="ratio"):
        resolve_plugins({"context": {"name": "importance", "ratio": 3}})


def test_passkey_task_prefills_the_compressed_prompt(target):
    from ollm_triton.tasks.base import RunContext

    task = registry.build("task", "passkey", {"lengths": [256], "depths": [0.5]})
    ctx = RunContext(engine=target, decoder=registry.build("decoder", "greedy"), device=target.device, smoke=True,
                     context=compressor("hierarchical", ratio=0.3))
    seen = []
    generate = ctx.decoder.generate
    ctx.decoder.generate = lambda engine, prompt, *a, **k: seen.append(prompt.shape[1]) or generate(engine, prompt,
                                                                                                     *a, **k)
    out = task.run(ctx)
    assert seen == [round(0.3 * 256)]
    assert math.isclose(out["context_ratio"], round(0.3 * 256) / 256)
    assert out["context_method"] == "hierarchical" and out["context_needle_kept"] in (0.0, 1.0)


def test_server_refuses_context_in_one_line():
    """The server does not compress prompts yet: +context is refused rather than accepted and ignored."""
    from hydra import compose, initialize_config_dir

    from ollm_triton.run import CONF, RunError
    from ollm_triton.serve.server import build

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="serve", overrides=["+context=importance"])
    with pytest.raises(RunError, match=r"\+context=importance is not applied by the server") as e:
        build(cfg)
    assert "\n" not in str(e.value)
