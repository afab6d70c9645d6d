"""`passkey`: retrieve a `<key> = <value>` fact buried in long filler, by context length and needle depth."""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from ollm_triton.progress import progress
from ollm_triton.registry import register
from ollm_triton.tasks.base import (
    CacheWatch,
    RunContext,
    Task,
    TaskRefused,
    compress_prompt,
    context_metrics,
    plugin_effect,
    report_no_effect,
)


@dataclass
class PasskeyConfig:
    lengths: list[int] = field(default_factory=lambda: [512, 1024, 2048, 4096])  # prompt lengths in tokens
    depths: list[float] = field(default_factory=lambda: [0.1, 0.5, 0.9])  # needle position, fraction of the filler
    samples: int = 1  # documents per (length, depth) cell
    num_needles: int = 1  # needles per document; the others are distractors with distinct keys and values
    seed: int = 0
    max_new_tokens: int = 10  # values have 5-7 digits; a few tokens more let a wrong answer show itself

    def check(self) -> None:
        if not self.lengths or min(self.lengths) < 64:
            raise ValueError(f"lengths must be a non-empty list of token counts >= 64, got {self.lengths}")
        if not self.depths or not all(0.0 <= d <= 1.0 for d in self.depths):
            raise ValueError(f"depths must be a non-empty list of fractions in [0, 1], got {self.depths}")
        if self.samples < 1 or self.num_needles < 1 or self.max_new_tokens < 1:
            raise ValueError("samples, num_needles and max_new_tokens must be >= 1")


class _Segments:
    """The engine's tokenizer without its BOS: the retrieval generator tokenizes segments and joins them, so a BOS
    that the tokenizer prepends to every encode would land inside the document. The task adds one BOS in front."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.bos = tokenizer.bos_token_id if getattr(tokenizer, "add_bos", False) else None

    def encode(self, text: str) -> list[int]:
        ids = list(self.tokenizer.encode(text))
        return ids[1:] if self.bos is not None and ids[:1] == [self.bos] else ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(list(ids))


@register("task", "passkey", PasskeyConfig)
class Passkey(Task):
    """Passkey retrieval accuracy (exact match of a 5-7 digit value) by context length and needle depth."""

    def __init__(self, cfg: PasskeyConfig):
        self.cfg = cfg

    def _grid(self, smoke: bool) -> tuple[list[int], list[float], int]:
        c = self.cfg
        return ([min(c.lengths)], [c.depths[len(c.depths) // 2]], 1) if smoke else (c.lengths, c.depths, c.samples)

    def footprint(self, smoke: bool) -> tuple[int, int]:
        lengths, _, _ = self._grid(smoke)
        return 1, max(lengths) + self.cfg.max_new_tokens + 16  # + a speculative verify block

    def document(self, tok, filler, length: int, rng: random.Random, depth: float):
        """The RetrievalDoc of one sample (the `multikey` task builds its own documents through this hook)."""
        from ollm_triton.data.retrieval import make_retrieval_doc

        return make_retrieval_doc(tok, filler, length, rng, depth=depth, num_needles=self.cfg.num_needles)

    def run(self, ctx: RunContext) -> dict[str, float | int | str]:
        from ollm_triton.attention.base import causal_pairs
        from ollm_triton.data.corpus import load_corpus
        from ollm_triton.data.retrieval import QUESTION_TEMPLATE, corpus_filler, extract_answer

        c = self.cfg
        engine = ctx.engine
        if not ctx.trained:
            raise TaskRefused("passkey of random weights means nothing; use a trained model (model=tiny, model=hf)")
        if engine.tokenizer is None:
            raise TaskRefused("passkey needs a trained model with a tokenizer; the model directory has no "
                              "tokenizer.json")
        lengths, depths, samples = self._grid(ctx.smoke)
        tok = _Segments(engine.tokenizer)
        prefix = [tok.bos] if tok.bos is not None else []
        # Filler is the corpus eval split as the engine's tokenizer encodes it (a BOS-adding tokenizer leaves one BOS
        # at each file's start, where a document would have it).
        filler = corpus_filler(engine.tokenizer, "eval")
        eos_id = getattr(engine.tokenizer, "eos_token_id", None)
        rng = random.Random(c.seed)

        t0 = time.perf_counter()
        by_length: dict[int, list[bool]] = {n: [] for n in lengths}
        by_depth: dict[float, list[bool]] = {d: [] for d in depths}
        visible = causal = 0.0  # (query, key) pairs of the answer's decode steps: attended, causally visible
        shortened: list = []  # the context compressor's records, one per document
        needle_kept: list[bool] = []  # did every token of the asked needle survive the compressor
        if ctx.context is not None:
            ctx.context.prepare(engine)
        bar = progress(total=len(lengths) * len(depths) * samples, desc=self.plugin_name, unit="doc")
        with CacheWatch(engine) as watch, ctx.timed("prompt+generated") as region, bar:
            for length in lengths:
                for depth in depths:
                    for _ in range(samples):
                        doc = self.document(tok, filler, length - len(prefix), rng, depth)
                        prompt = torch.tensor([prefix + doc.ids], dtype=torch.long)
                        # the question ends the prompt: the compressor keeps it and scores the context against it
                        asked = len(tok.encode(QUESTION_TEMPLATE.format(key=doc.needle.key)))
                        n_full = prompt.shape[1]
                        prompt, record = compress_prompt(ctx, prompt, protect=[(0, len(prefix))],
                                                         query=(n_full - asked, n_full))
                        if record is not None:
                            shortened.append(record)
                            a, b = doc.needle.span
                            held = set(record.kept[0].tolist())
                            needle_kept.append(all(p + len(prefix) in held for p in range(a, b)))
                        gen = ctx.decoder.generate(engine, prompt, c.max_new_tokens, eos_id=eos_id)
                        watch.settle()  # this document's cache read and released (not held to the task's end)
                        answer = extract_answer(tok.decode(gen.tokens[0].tolist()))
                        by_length[length].append(answer == doc.answer)
                        by_depth[depth].append(answer == doc.answer)
                        n, new = prompt.shape[1], max(int(gen.tokens.shape[1]), 1)
                        region.tokens += n + int(gen.tokens.shape[1])
                        pairs = causal_pairs(new, n + new, n)
                        causal += pairs
                        visible += engine.attention.visible_fraction(new, n + new, n) * pairs
                        bar.update(1)
        seconds = time.perf_counter() - t0

        every = [ok for oks in by_length.values() for ok in oks]
        corpus = load_corpus()
        compressed, evicted = watch.lossy()
        longest = watch.longest() or max(lengths)
        effect, none = plugin_effect(engine, longest=longest, masked=1 - visible / causal if causal else None,
                                     compressed=compressed, evicted=evicted)
        report_no_effect(self.plugin_name, none)
        out: dict[str, float | int | str] = {"acc": sum(every) / len(every)}
        out.update({f"acc@{n}": sum(oks) / len(oks) for n, oks in by_length.items()})
        out.update({f"acc_depth@{d:g}": sum(oks) / len(oks) for d, oks in by_depth.items()})
        out.update({
            "samples": samples,  # documents per (length, depth) cell, as configured (1 in smoke runs)
            "documents": len(every),  # documents generated and scored: lengths x depths x samples
            "num_needles": c.num_needles,
            "keys_masked": 1 - visible / causal if causal else 0.0,  # of the answer's decode steps
            "plugin_effect": effect,
            **context_metrics(shortened),
            **({"context_needle_kept": sum(needle_kept) / len(needle_kept)} if needle_kept else {}),
            "seconds": seconds,
            "data_python_version": corpus.python_version,
            "data_eval_hash": corpus.eval_hash,
        })
        return out
