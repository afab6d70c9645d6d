"""The synthetic retrieval generator: exact lengths, a needle that is really there, a unique answer, determinism."""

import random
import re

import pytest

from ollm_triton.data.corpus import load_corpus
from ollm_triton.data.retrieval import (
    ANSWER_TEMPLATE,
    NEEDLE_TEMPLATE,
    QUESTION_TEMPLATE,
    FillerStream,
    corpus_filler,
    extract_answer,
    make_retrieval_doc,
    make_training_doc,
)


@pytest.fixture(scope="module")
def tok():
    """A small byte-level BPE trained on a slice of the corpus (the shipped tokenizer's recipe, smaller)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1024, special_tokens=["<|pad|>", "<|bos|>", "<|eos|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    t.train_from_iterator(load_corpus().train_docs[:60], trainer=trainer)
    return t


@pytest.fixture(scope="module")
def filler(tok):
    return corpus_filler(tok, "eval")


def text(tok, ids):
    return tok.decode(list(ids))


@pytest.mark.parametrize("length", [512, 1000, 4096, 16384])
def test_exact_length_and_needle_in_place(tok, filler, length):
    doc = make_retrieval_doc(tok, filler, length, random.Random(length), depth=0.5)
    assert len(doc.ids) == length
    start, end = doc.needle_span
    assert text(tok, doc.ids[start:end]) == NEEDLE_TEMPLATE.format(key=doc.needle.key, value=doc.answer)
    assert re.fullmatch(r"[1-9][0-9]{4,6}", doc.answer)
    # the needle sits at the asked depth of the filler (within its own length)
    filler_len = length - (end - start) - len(tok.encode(QUESTION_TEMPLATE.format(key=doc.needle.key)).ids)
    assert abs(start - 0.5 * filler_len) <= 1
    # the prompt ends with the question, whose continuation is the answer's tokens
    assert text(tok, doc.ids).endswith(QUESTION_TEMPLATE.format(key=doc.needle.key))
    assert doc.answer_ids == tok.encode(ANSWER_TEMPLATE.format(value=doc.answer)).ids
    assert extract_answer(text(tok, doc.answer_ids + tok.encode("\n\n").ids)) == doc.answer


@pytest.mark.parametrize("depth", [0.0, 0.25, 1.0])
def test_depth_extremes(tok, filler, depth):
    doc = make_retrieval_doc(tok, filler, 600, random.Random(1), depth=depth)
    start, end = doc.needle_span
    assert len(doc.ids) == 600
    assert text(tok, doc.ids[start:end]).strip() == f"{doc.needle.key} = {doc.answer}"
    if depth == 0.0:
        assert start == 0


def test_answer_is_unique_with_distractors(tok, filler):
    for seed in range(20):
        doc = make_retrieval_doc(tok, filler, 2048, random.Random(seed), num_needles=5)
        keys = [n.key for n in doc.needles]
        values = [n.value for n in doc.needles]
        assert len(set(keys)) == 5 and len(set(values)) == 5
        body = text(tok, doc.ids)
        asked = doc.needle.key
        # the asked key appears once as a fact and once in the question, nowhere else
        assert body.count(f"{asked} = ") == 1
        assert body.count(asked) == 3  # fact, "# What is the value of <key>?", "<key> ="
        assert re.findall(rf"\n{asked} = (\d+)\n", body) == [doc.answer]
        for n in doc.needles:
            s, e = n.span
            assert text(tok, doc.ids[s:e]) == NEEDLE_TEMPLATE.format(key=n.key, value=n.value)


def test_seeded_determinism(tok, filler):
    a = make_retrieval_doc(tok, filler, 1024, random.Random(7), depth=0.3, num_needles=3)
    b = make_retrieval_doc(tok, filler, 1024, random.Random(7), depth=0.3, num_needles=3)
    c = make_retrieval_doc(tok, filler, 1024, random.Random(8), depth=0.3, num_needles=3)
    assert a == b
    assert a.ids != c.ids and a.answer != c.answer


def test_training_doc_mask_marks_answers(tok, filler):
    rng = random.Random(0)
    for _ in range(20):
        ids, mask = make_training_doc(tok, filler, 1025, rng)
        assert len(ids) == len(mask) == 1025
        body = text(tok, ids)
        facts = dict(re.findall(r"\n(\w+_\w+) = (\d+)\n", body))
        asked = re.findall(r"\n# What is the value of (\w+)\?\n\1 = (\d+)\n", body)
        assert asked and all(facts[k] == v for k, v in asked)
        # the masked tokens spell exactly the answers, in order
        masked = [i for i, m in zip(ids, mask, strict=True) if m]
        assert text(tok, masked) == "".join(f" {v}" for _, v in asked)


def test_short_training_doc_falls_back(tok, filler):
    ids, mask = make_training_doc(tok, filler, 80, random.Random(3), max_needles=6)
    assert len(ids) == 80 and sum(mask) >= 1


def test_bad_input(tok, filler):
    with pytest.raises(ValueError, match="too short"):
        make_retrieval_doc(tok, filler, 20, random.Random(0))
    with pytest.raises(ValueError, match="outside"):
        make_retrieval_doc(tok, filler, 512, random.Random(0), depth=1.5)
    with pytest.raises(ValueError, match="at least 16"):
        FillerStream([1, 2, 3])


def test_filler_window_wraps():
    stream = FillerStream(list(range(20)))
    out = stream.window(50, random.Random(0))
    assert len(out) == 50 and all((b - a) % 20 == 1 for a, b in zip(out, out[1:], strict=False))


def test_extract_answer():
    assert extract_answer(" 123456\n\nfoo") == "123456"
    assert extract_answer(" 1234567)") == "1234567)"
    assert extract_answer("\n") == ""
