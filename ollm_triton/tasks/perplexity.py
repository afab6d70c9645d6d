"""`perplexity`: sliding-window negative log-likelihood over a held-out text."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ollm_triton.registry import register
from ollm_triton.tasks.base import RunContext, Task, TaskRefused


@dataclass
class PerplexityConfig:
    data: str = "corpus"  # corpus (the stdlib eval split) | a local text file | hf:<dataset>[:<config>[:<split>]]
    max_length: int = 1024  # tokens per window
    stride: int = 512  # window step; each token is scored once, with up to max_length - stride tokens of context
    max_tokens: int = 16384  # score at most this many tokens of the text (0 = all)
    chunk: int = 0  # feed each window in chunks of this many tokens through the cache (0 = one forward); makes
    #                 a lossy KV codec or a decode-time attention pattern affect the score

    def check(self) -> None:
        if not 0 < self.stride <= self.max_length:
            raise ValueError(f"need 0 < stride <= max_length, got stride={self.stride}, max_length={self.max_length}")
        if self.max_tokens < 0 or self.chunk < 0:
            raise ValueError("max_tokens and chunk must be >= 0")


@register("task", "perplexity", PerplexityConfig)
class Perplexity(Task):
    """Perplexity of the model on held-out text (sliding window of max_length, stride), each token scored once."""

    def __init__(self, cfg: PerplexityConfig):
        self.cfg = cfg

    def run(self, ctx: RunContext) -> dict[str, float | str]:
        c = self.cfg
        engine = ctx.engine
        if not ctx.trained:
            raise TaskRefused("perplexity of random weights means nothing; use a trained model (model=tiny, model=hf)")
        if engine.tokenizer is None:
            raise TaskRefused("perplexity needs a tokenizer; the model directory has no tokenizer.json")
        from ollm_triton.data.corpus import load_eval_text

        max_tokens = 2 * c.max_length if ctx.smoke else c.max_tokens
        text, meta = load_eval_text(c.data)
        if max_tokens:  # tokenizing megabytes to keep a few thousand tokens wastes seconds; 8 chars/token is ample
            text = text[: 8 * max_tokens]
        ids = torch.tensor(engine.tokenizer.encode(text), dtype=torch.long)
        if max_tokens:
            ids = ids[:max_tokens]
        if ids.numel() < 2:
            raise ValueError(f"perplexity: the text from {c.data!r} has fewer than 2 tokens")
        nll, scored = score(engine, ids, c.max_length, c.stride, c.chunk)
        return {
            "ppl": math.exp(nll / scored),
            "nll_per_token": nll / scored,
            "tokens_scored": float(scored),
            "max_length": float(c.max_length),
            "stride": float(c.stride),
            **{f"data_{k}": v for k, v in meta.items()},
        }


def score(engine, ids: torch.Tensor, max_length: int, stride: int, chunk: int = 0) -> tuple[float, int]:
    """Sum of NLL (nats) over every token after the first, and the number scored. ids: [N] long."""
    n = ids.numel()
    total, scored, prev_end = 0.0, 0, 0
    for begin in range(0, n, stride):
        end = min(begin + max_length, n)
        window = ids[begin:end].to(engine.device)[None]
        new = end - max(prev_end, begin + 1)  # tokens of this window not yet scored (the first token never is)
        cache = engine.new_cache(batch=1, max_len=end - begin)
        step = chunk or window.shape[1]
        logits = torch.cat([engine.forward(window[:, i : i + step], cache) for i in range(0, window.shape[1], step)], 1)
        pred = logits[0, -new - 1 : -1].float()
        target = window[0, -new:]
        total += F.cross_entropy(pred, target, reduction="sum").item()
        scored += new
        prev_end = end
        if end == n:
            break
    return total, scored
