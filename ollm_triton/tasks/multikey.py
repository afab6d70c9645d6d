"""`multikey`: many key-value pairs spread evenly through a long context, one asked; accuracy by length and depth.

RULER's multi-key needle-in-a-haystack in this project's vocabulary: `num_pairs` needles `<key> = <value>` sit at depths
(i + 0.5) / num_pairs of held-out corpus filler, keys come in pairs that share their first word, and the question
asks for the pair nearest each configured depth. Passkey (one needle, or distractors at random depths) leaves most of
the context empty of facts, so a codec that loses a region can still score; here every region holds a pair. Scoring,
plugin-effect reporting and the context compressor's handling are the passkey task's: only the documents differ.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from ollm_triton.registry import register
from ollm_triton.tasks.passkey import Passkey, PasskeyConfig


@dataclass
class MultikeyConfig(PasskeyConfig):
    lengths: list[int] = field(default_factory=lambda: [1024, 2048, 4096])  # prompt lengths in tokens
    depths: list[float] = field(default_factory=lambda: [0.05, 0.3, 0.5, 0.7, 0.95])  # asked pair nearest each
    num_pairs: int = 16  # key-value pairs per document, every one at its own evenly spaced depth

    def check(self) -> None:
        super().check()
        if self.num_needles != 1:
            raise ValueError(f"num_needles={self.num_needles} is passkey's option; multikey places num_pairs pairs")
        if self.num_pairs < 2:
            raise ValueError(f"num_pairs={self.num_pairs}; a multi-key document needs at least 2 pairs")
        need = 12 * self.num_pairs + 32  # a pair is <= ~12 tokens, the question ~16: the filler must keep a share
        if min(self.lengths) < need:
            raise ValueError(f"lengths {self.lengths} are too short for {self.num_pairs} pairs; accepted: every "
                             f"length >= {need}")


@register("task", "multikey", MultikeyConfig)
class Multikey(Passkey):
    """Multi-key retrieval accuracy (exact match of the asked pair's 5-7 digit value) by length and depth."""

    def document(self, tok, filler, length: int, rng: random.Random, depth: float):
        from ollm_triton.data.retrieval import make_multikey_doc

        return make_multikey_doc(tok, filler, length, rng, depth=depth, num_pairs=self.cfg.num_pairs)

    def run(self, ctx):
        out = super().run(ctx)
        out["num_pairs"] = self.cfg.num_pairs
        out.pop("num_needles", None)
        return out
