"""Tokens to text as they come, with stop strings: what a stream may send now, and where a stop string cuts.

Decoding one token at a time is wrong for byte-level BPE (a character's bytes can span tokens) and for tokenizers
that decide spacing from the neighbours, so the text of the new tokens is the decoding of a short window before
them minus that window's own text (vLLM's offsets), held back while it ends in an incomplete character (U+FFFD).

Stop strings: the text is searched as it grows; at the first occurrence of any stop string the answer ends before
it (the stop string itself is never sent). While the text's tail could still become a stop string, that tail is
held back, so a stream never sends characters it would have to take back.
"""

from __future__ import annotations

from dataclasses import dataclass

REPLACEMENT = "\ufffd"


@dataclass
class TokenText:
    """One generated token: its id, where its text starts in the answer, and its logprobs when asked for."""

    token_id: int
    offset: int
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None


class Detokenizer:
    """add(token) -> text that may be sent now; `stopped` once a stop string appeared; finish() -> the rest."""

    def __init__(self, tokenizer, stop: list[str] | None = None, skip_ids: set[int] | frozenset = frozenset(),
                 context_ids: list[int] | None = None):
        self.tokenizer = tokenizer
        self.stop = [s for s in (stop or []) if s]
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.skip_ids = set(skip_ids)
        # the window starts in the prompt's last tokens, so the first answer token decodes with its left context
        # (its leading space); those tokens' own text is never part of the answer
        tail = list(context_ids or [])[-4:]
        self.ids: list[int] = tail
        self.prefix_offset = 0
        self.read_offset = len(tail)
        self.text = ""  # the answer so far (cut at a stop string once one appears)
        self.sent = 0  # characters of `text` handed out
        self.tokens: list[TokenText] = []
        self.stopped = False

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def add(self, token_id: int, logprob: float | None = None,
            top_logprobs: list[tuple[int, float]] | None = None) -> str:
        """Take one generated token; return the text that can be sent now (maybe empty)."""
        if self.stopped:
            return ""
        if token_id in self.skip_ids:  # EOS: ends the answer, adds no text
            return ""
        self.tokens.append(TokenText(token_id, len(self.text), logprob, top_logprobs))
        self.ids.append(token_id)
        before = self._decode(self.ids[self.prefix_offset:self.read_offset])
        after = self._decode(self.ids[self.prefix_offset:])
        if len(after) > len(before) and not after.endswith(REPLACEMENT):
            piece = after[len(before):]
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            start = len(self.text)
            self.text += piece
            self._find_stop(start)
        return self._release()

    def _find_stop(self, start: int) -> None:
        if not self.stop:
            return
        begin = max(0, start - self.hold)
        hits = [i for i in (self.text.find(s, begin) for s in self.stop) if i >= 0]
        if hits:
            self.text = self.text[:min(hits)]
            self.stopped = True

    def _release(self) -> str:
        end = len(self.text)
        if not self.stopped and self.stop:
            end -= self._held_tail()
        end = max(end, self.sent)
        out, self.sent = self.text[self.sent:end], end
        return out

    def _held_tail(self) -> int:
        """Length of the longest tail of the text that is the beginning of some stop string."""
        for n in range(min(self.hold, len(self.text)), 0, -1):
            tail = self.text[-n:]
            if any(s.startswith(tail) for s in self.stop):
                return n
        return 0

    def finish(self) -> str:
        """The generation ended (length or EOS): everything not sent yet."""
        out, self.sent = self.text[self.sent:], len(self.text)
        return out

    def answered(self) -> list[TokenText]:
        """The tokens whose text is part of the answer (a stop string cuts the tokens that made it)."""
        return [t for t in self.tokens if t.offset < len(self.text)]

    def released(self, start: int) -> list[TokenText]:
        """Tokens from index `start` whose text begins before what has been sent (for a stream's logprobs)."""
        return [t for t in self.tokens[start:] if t.offset < self.sent]


class TokenIds:
    """The tokenizer of a model without one (random weights: model=tiny_random, model=llama3_8b): prompts are token
    ids, and a token's text is its id in angle brackets (`<8123>`), so streaming, stop strings and logprobs still
    have text to work on."""

    add_bos = False
    eos_token_ids: list[int] = []
    eos_token_id = None

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size

    def encode(self, text: str) -> list[int]:
        raise NoTokenizer("this model has no tokenizer (random weights): send `prompt` as a list of token ids "
                          f"in [0, {self.vocab_size})")

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return "".join(f"<{int(i)}>" for i in ids)


class NoTokenizer(ValueError):
    """Text where only token ids can be read."""
