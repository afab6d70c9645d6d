"""The `multikey` task and its documents: pairs spread evenly with confusable keys, the asked pair chosen by depth,
exact-match scoring (an oracle scores 1, a reader of the wrong pair 0), config refusals, and the shipped model."""

import random
import re
from pathlib import Path

import pytest
import torch

from ollm_triton.data.retrieval import FillerStream, decode, make_multikey_doc
from ollm_triton.decoding.base import DecoderStrategy, Generation
from ollm_triton.registry import PluginError, registry
from ollm_triton.tasks.base import RunContext

ASSETS = Path(__file__).resolve().parent.parent / "ollm_triton" / "assets"
SHIPPED = (ASSETS / "tiny-llama" / "config.json").is_file()
pytestmark = pytest.mark.skipif(not SHIPPED, reason="embedded model not trained yet")


@pytest.fixture(scope="module")
def engine():
    from ollm_triton.engine import load_engine

    return load_engine(ASSETS / "tiny-llama", device="cpu", dtype=torch.float32)


class Reader(DecoderStrategy):
    """Reads a value off the prompt text: the asked key's (an oracle) or its confusable twin's (same first word)."""

    def __init__(self, twin=False):
        self.twin, self.prompts = twin, []

    def generate(self, engine, prompt_ids, max_new_tokens, *, eos_id=None):
        self.prompts.append(prompt_ids[0].tolist())
        text = engine.tokenizer.decode(prompt_ids[0].tolist())
        key = re.findall(r"# What is the value of (\w+)\?\n\1 =$", text)[-1]
        if self.twin:
            first = key.split("_")[0]
            key = next(k for k in re.findall(rf"\n({first}_\w+) = \d+\n", text) if k != key)
        value = re.search(rf"\n{key} = (\d+)\n", text).group(1)
        return Generation(torch.tensor([engine.tokenizer.encode(f" {value}\n")[:max_new_tokens]]))


def test_documents_spread_confusable_pairs_and_ask_the_one_nearest_the_depth(engine):
    tok = engine.tokenizer
    filler = FillerStream(tok.encode("def f(x):\n    return x + 1\n" * 200))
    for length, pairs, depth in ((300, 4, 0.0), (1023, 8, 0.62), (1025, 9, 1.0)):
        doc = make_multikey_doc(tok, filler, length, random.Random(length), depth=depth, num_pairs=pairs)
        assert len(doc.ids) == length and len(doc.needles) == pairs
        keys = [n.key for n in doc.needles]
        assert len(set(keys)) == pairs and len({n.value for n in doc.needles}) == pairs
        # every first word is shared by two keys (the last one alone when the count is odd)
        firsts = [k.split("_")[0] for k in keys]
        assert sorted(firsts.count(f) for f in set(firsts))[-1] == 2 and sum(firsts.count(f) == 1 for f in firsts) <= 1
        assert sorted(n.depth for n in doc.needles) == pytest.approx([(i + 0.5) / pairs for i in range(pairs)])
        assert doc.needle.depth == min((n.depth for n in doc.needles), key=lambda d: abs(d - depth))
        for n in doc.needles:  # each span decodes to its own pair, in position order
            assert decode(tok, doc.ids[n.span[0]:n.span[1]]).strip() == f"{n.key} = {n.value}"
        starts = [n.span[0] for n in sorted(doc.needles, key=lambda n: n.depth)]
        assert starts == sorted(starts) and starts[-1] - starts[0] > length // 2
        assert decode(tok, doc.ids).endswith(f"{doc.needle.key} =") and doc.answer == doc.needle.value


def test_oracle_scores_one_and_the_twin_reader_zero(engine):
    task = registry.build("task", "multikey", {"lengths": [300, 400], "depths": [0.0, 1.0], "num_pairs": 6})
    oracle = Reader()
    out = task.run(RunContext(engine=engine, decoder=oracle, device=torch.device("cpu")))
    assert out["acc"] == out["acc@300"] == out["acc_depth@0"] == out["acc_depth@1"] == 1.0
    assert out["num_pairs"] == 6 and "num_needles" not in out and out["documents"] == 4
    assert sorted(len(p) for p in oracle.prompts) == [300, 300, 400, 400]
    twin = task.run(RunContext(engine=engine, decoder=Reader(twin=True), device=torch.device("cpu")))
    assert twin["acc"] == 0.0


@pytest.mark.parametrize("params", [{"num_pairs": 1}, {"num_pairs": 40, "lengths": [256]}, {"num_needles": 3},
                                    {"depths": [1.2]}])
def test_bad_config_is_refused(params):
    with pytest.raises(PluginError):
        registry.build("task", "multikey", params)


def test_shipped_model_retrieves_among_pairs(engine):
    task = registry.build("task", "multikey", {"lengths": [384], "depths": [0.1, 0.5, 0.9], "num_pairs": 4,
                                               "max_new_tokens": 6, "seed": 1})
    out = task.run(RunContext(engine=engine, decoder=registry.build("decoder", "greedy"), device=torch.device("cpu")))
    assert out["acc"] >= 2 / 3, out  # trained with up to 6 needles per 4k sequence; 3 samples may miss one
