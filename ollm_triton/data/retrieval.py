"""Seeded synthetic key-value retrieval documents (passkey), built directly in token ids.

A document is filler drawn from the corpus with one or more needles `\\n<key> = <value>\\n` inserted at chosen depths
(fraction 0..1 of the filler), then a question about one needle that ends with `<key> =`; the answer is ` <value>`.
Keys are distinct within a document and never occur in its filler, values are distinct numbers, so the answer is
unique. Segments are tokenized separately and concatenated, which gives exact lengths and exact needle spans: every
segment starts at a pre-tokenizer boundary (a newline or a space before a number), so the concatenation is what
tokenizing the joined text would give for the needle and the answer.

Used as training data for the embedded models (`make_training_doc`, several questions with answers and a loss
mask), by the `passkey` task (`make_retrieval_doc`, one question, answer held out) and by the `multikey` task
(`make_multikey_doc`: many confusable pairs spread evenly through the context, one of them asked).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

NEEDLE_TEMPLATE = "\n{key} = {value}\n"
QUESTION_TEMPLATE = "\n# What is the value of {key}?\n{key} ="
ANSWER_TEMPLATE = " {value}"
ANSWER_END = "\n"

# Plain words for key names: keys read like identifiers in the Python filler but are absent from the stdlib.
_WORDS = (
    "amber apple arrow autumn badger banjo basil beacon birch bison blossom breeze canyon cedar cobalt comet coral "
    "cotton crane crystal dahlia delta desert dingo dolphin dune eagle ember falcon fern fjord forest fossil gecko "
    "glacier granite harbor hazel heron hollow iris ivory jade jasper juniper kelp kettle koala lagoon lantern lemon "
    "lilac lotus lynx magnet maple marble meadow mango meteor mint moss nebula nectar nutmeg oasis olive onyx orchid "
    "otter panda pebble pepper pine plum quartz quill raven reef river saffron sage salmon sequoia sparrow spruce "
    "summit tango thistle thunder tiger topaz tulip tundra velvet violet walnut willow yak zebra zephyr"
).split()


@dataclass(frozen=True)
class Needle:
    key: str
    value: str
    depth: float
    span: tuple[int, int]  # [start, end) token positions of the needle's ids in the document


@dataclass(frozen=True)
class RetrievalDoc:
    """ids: the prompt (filler + needles + question), len(ids) == the requested length; answer: the expected value
    string; answer_ids: the tokens of ` <value>` a model should generate next; needle: the one the question asks."""

    ids: list[int]
    answer: str
    answer_ids: list[int]
    needle: Needle
    needles: tuple[Needle, ...]

    @property
    def depth(self) -> float:
        return self.needle.depth

    @property
    def needle_span(self) -> tuple[int, int]:
        return self.needle.span


def encode(tokenizer: Any, text: str) -> list[int]:
    """Token ids of `text` without special tokens, for a `tokenizers.Tokenizer`, a transformers tokenizer, or any
    object whose encode(str) returns a list of ids."""
    try:
        out = tokenizer.encode(text, add_special_tokens=False)
    except TypeError:
        out = tokenizer.encode(text)
    return list(getattr(out, "ids", out))


def decode(tokenizer: Any, ids: Sequence[int]) -> str:
    return tokenizer.decode(list(ids))


def extract_answer(generated_text: str) -> str:
    """The value a model generated: the first whitespace-separated word ('' if none)."""
    words = generated_text.split()
    return words[0] if words else ""


class FillerStream:
    """A token stream that filler is cut from: contiguous windows starting at a random offset."""

    def __init__(self, ids: Sequence[int] | np.ndarray):
        if len(ids) < 16:
            raise ValueError(f"filler stream has {len(ids)} tokens; need at least 16")
        # numpy keeps a multi-million-token training stream compact (a list of Python ints is ~9x larger).
        self.ids = np.asarray(ids, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.ids)

    def window(self, n: int, rng: random.Random) -> list[int]:
        """n consecutive tokens (wrapping around the stream's end, so any n is served)."""
        if n <= 0:
            return []
        start = rng.randrange(len(self.ids))
        return self.ids.take(np.arange(start, start + n), mode="wrap").tolist()


def random_keys(rng: random.Random, count: int) -> list[str]:
    keys: list[str] = []
    while len(keys) < count:
        key = f"{rng.choice(_WORDS)}_{rng.choice(_WORDS)}"
        if key not in keys:
            keys.append(key)
    return keys


def random_values(rng: random.Random, count: int, digits: tuple[int, int] = (5, 7)) -> list[str]:
    values: list[str] = []
    while len(values) < count:
        n = rng.randint(digits[0], digits[1])
        value = str(rng.randrange(10 ** (n - 1), 10**n))
        if value not in values:
            values.append(value)
    return values


def _needles_length(tokenizer: Any, keys: list[str], values: list[str]) -> int:
    pairs = zip(keys, values, strict=True)
    return sum(len(encode(tokenizer, NEEDLE_TEMPLATE.format(key=k, value=v))) for k, v in pairs)


def _place_needles(
    tokenizer: Any, filler: list[int], keys: list[str], values: list[str], depths: list[float]
) -> tuple[list[int], list[Needle]]:
    """Insert each needle at round(depth * len(filler)) of the filler; return the ids and the needles' spans."""
    order = sorted(range(len(keys)), key=lambda i: depths[i])
    ids: list[int] = []
    cursor = 0
    needles: dict[int, Needle] = {}
    for i in order:
        cut = round(depths[i] * len(filler))
        ids += filler[cursor:cut]
        cursor = cut
        needle_ids = encode(tokenizer, NEEDLE_TEMPLATE.format(key=keys[i], value=values[i]))
        needles[i] = Needle(keys[i], values[i], depths[i], (len(ids), len(ids) + len(needle_ids)))
        ids += needle_ids
    ids += filler[cursor:]
    return ids, [needles[i] for i in range(len(keys))]


def make_retrieval_doc(
    tokenizer: Any,
    filler: FillerStream,
    length: int,
    rng: random.Random,
    *,
    depth: float | None = None,
    num_needles: int = 1,
    digits: tuple[int, int] = (5, 7),
) -> RetrievalDoc:
    """A prompt of exactly `length` tokens that asks for the value of one needle.

    depth: where the asked needle sits (fraction of the filler, 0..1); None draws it uniformly. Other needles
    (distractors, num_needles - 1 of them) get uniform depths. The filler's decoded text never contains a key.
    """
    if not 0.0 <= (depth if depth is not None else 0.0) <= 1.0:
        raise ValueError(f"needle depth {depth} is outside [0, 1]")
    if num_needles < 1:
        raise ValueError(f"num_needles={num_needles}; need at least 1")
    keys = random_keys(rng, num_needles)
    values = random_values(rng, num_needles, digits)
    depths = [depth if depth is not None else rng.random()] + [rng.random() for _ in range(num_needles - 1)]
    return _assemble(tokenizer, filler, length, rng, keys, values, depths)


def confusable_keys(rng: random.Random, count: int) -> list[str]:
    """`count` distinct keys in pairs that share their first word (`amber_lotus`, `amber_quartz`), so that telling
    two keys apart takes reading both words: a model that matches only a key's first token picks the wrong value."""
    if count > len(_WORDS) * 2:
        raise ValueError(f"{count} confusable keys asked; accepted: at most {len(_WORDS) * 2}")
    keys: list[str] = []
    for first in rng.sample(_WORDS, (count + 1) // 2):  # distinct first words: each is shared by exactly one pair
        keys += [f"{first}_{second}" for second in rng.sample(_WORDS, 2)]
    return keys[:count]


def make_multikey_doc(
    tokenizer: Any,
    filler: FillerStream,
    length: int,
    rng: random.Random,
    *,
    depth: float,
    num_pairs: int,
    digits: tuple[int, int] = (5, 7),
) -> RetrievalDoc:
    """A prompt of exactly `length` tokens holding `num_pairs` key-value pairs spread evenly through the filler (pair
    i at depth (i + 0.5) / num_pairs), keys in confusable pairs (`confusable_keys`); the question asks for the pair
    nearest `depth`. Unlike `make_retrieval_doc`, whose distractors land at random depths, every region of the
    context holds a pair, so an attention backend or KV codec that loses any region is charged for it."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth {depth} is outside [0, 1]")
    if num_pairs < 2:
        raise ValueError(f"num_pairs={num_pairs}; a multi-key document needs at least 2")
    keys = confusable_keys(rng, num_pairs)
    values = random_values(rng, num_pairs, digits)
    depths = [(i + 0.5) / num_pairs for i in range(num_pairs)]
    asked = min(range(num_pairs), key=lambda i: abs(depths[i] - depth))
    order = [asked] + [i for i in range(num_pairs) if i != asked]  # _assemble asks for the first pair
    return _assemble(tokenizer, filler, length, rng, [keys[i] for i in order], [values[i] for i in order],
                     [depths[i] for i in order])


def _assemble(tokenizer: Any, filler: FillerStream, length: int, rng: random.Random, keys: list[str],
              values: list[str], depths: list[float]) -> RetrievalDoc:
    """Filler free of every key, the needles at their depths, then the question about keys[0]."""
    needle_len = _needles_length(tokenizer, keys, values)
    question = encode(tokenizer, QUESTION_TEMPLATE.format(key=keys[0]))
    n_filler = length - needle_len - len(question)
    if n_filler < 1:
        raise ValueError(f"length {length} is too short for {len(keys)} needle(s) and the question; need > "
                         f"{needle_len + len(question)} tokens")
    for _ in range(100):  # a key that happens to occur in this filler would make the answer ambiguous: redraw
        chunk = filler.window(n_filler, rng)
        text = decode(tokenizer, chunk)
        if not any(k in text for k in keys):
            break
    else:
        raise ValueError("could not draw filler free of the needle keys in 100 tries")
    body, needles = _place_needles(tokenizer, chunk, keys, values, depths)
    ids = body + question
    answer_ids = encode(tokenizer, ANSWER_TEMPLATE.format(value=values[0]))
    return RetrievalDoc(ids=ids, answer=values[0], answer_ids=answer_ids, needle=needles[0], needles=tuple(needles))


def make_training_doc(
    tokenizer: Any,
    filler: FillerStream,
    length: int,
    rng: random.Random,
    *,
    max_needles: int = 6,
    digits: tuple[int, int] = (5, 7),
) -> tuple[list[int], list[bool]]:
    """A training sequence of exactly `length` tokens: needles in filler, then questions about a random non-empty
    subset of them, each followed by its answer and a newline. Returns (ids, answer_mask) where answer_mask marks
    the answer tokens (the positions a retrieval loss should weigh)."""
    n = rng.randint(1, max_needles)
    keys = random_keys(rng, n)
    values = random_values(rng, n, digits)
    asked = rng.sample(range(n), rng.randint(1, n))
    tail: list[int] = []
    mask_tail: list[bool] = []
    for i in asked:
        q = encode(tokenizer, QUESTION_TEMPLATE.format(key=keys[i]))
        a = encode(tokenizer, ANSWER_TEMPLATE.format(value=values[i]))
        e = encode(tokenizer, ANSWER_END)
        tail += q + a + e
        mask_tail += [False] * len(q) + [True] * len(a) + [False] * len(e)
    needle_len = _needles_length(tokenizer, keys, values)
    n_filler = length - needle_len - len(tail)
    if n_filler < 1:  # too many questions for a short sequence: fall back to one needle, one question
        return make_training_doc(tokenizer, filler, length, rng, max_needles=1, digits=digits)
    body, _ = _place_needles(tokenizer, filler.window(n_filler, rng), keys, values, [rng.random() for _ in keys])
    return body + tail, [False] * len(body) + mask_tail


_FILLER_CACHE: dict[tuple[int, str], tuple[Any, FillerStream]] = {}


def corpus_filler(tokenizer: Any, split: str = "eval") -> FillerStream:
    """The corpus split tokenized into one filler stream (cached per tokenizer object and split)."""
    if split not in ("train", "eval"):
        raise ValueError(f"split={split!r}; accepted: 'train', 'eval'")
    key = (id(tokenizer), split)
    hit = _FILLER_CACHE.get(key)
    if hit is not None and hit[0] is tokenizer:  # the id alone could be reused by a new object
        return hit[1]
    from ollm_triton.data.corpus import DOC_SEPARATOR, load_corpus

    corpus = load_corpus()
    docs = corpus.eval_docs if split == "eval" else corpus.train_docs
    sep = encode(tokenizer, DOC_SEPARATOR)
    ids: list[int] = []
    for doc in docs:
        ids += encode(tokenizer, doc) + sep
    if len(_FILLER_CACHE) >= 4:
        _FILLER_CACHE.clear()
    _FILLER_CACHE[key] = (tokenizer, FillerStream(ids))
    return _FILLER_CACHE[key][1]
