"""`perplexity`: negative log-likelihood of held-out text, scored through the KV cache the way generation reads it.

Each window of `max_length` tokens is split in two: its context (the tokens before the first one this window
scores) is prefilled, and the scored tokens follow in forwards of `chunk` tokens over that cache. With the default
chunk (the engine's `decode_max_tokens`, 16) every scored token goes through `attention.decode` over the cache as
the codec stores it (quantized, clustered, evicted) and under the backend's window or pattern, exactly as a decode
step of generation would see it. A chunk longer than `decode_max_tokens` runs the engine's prefill path instead:
attention over the cache's `dense()` (as stored) plus the chunk's own exact K/V.

Scoring a whole window in one forward (what this task did first) attends over the window's own full-precision K/V:
a KV codec then never matters and a window as long as the sequence never masks a key, so every codec printed the
dense figure. The task records how its tokens were scored (`chunk`, tokens scored against compressed or evicted
storage, the fraction of causally visible keys the backend masked) and says in `plugin_effect` (and one stderr
line) when a selected plugin provably had no effect.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ollm_triton.cache.base import kv_length
from ollm_triton.progress import progress
from ollm_triton.registry import register
from ollm_triton.tasks.base import (
    RunContext,
    Task,
    TaskRefused,
    context_metrics,
    lossy_tokens,
    plugin_effect,
    report_no_effect,
)

SMOKE_LENGTH = 384  # debug=smoke: windows of at most this many tokens (past int4/int2's default residual + group)


@dataclass
class PerplexityConfig:
    data: str = "corpus"  # corpus (the stdlib eval split) | a local text file | hf:<dataset>[:<config>[:<split>]]
    max_length: int = 2048  # tokens per window: the context prefilled plus the tokens it scores
    stride: int = 1024  # window step; each token is scored once, with max_length - stride tokens of context or more
    max_tokens: int = 8192  # score at most this many tokens of the text (0 = all)
    # Scored tokens per forward, after the window's context was prefilled into the cache (0 = the engine's
    # decode_max_tokens, 16: each chunk appends and runs attention.decode over the cache as the codec stores it,
    # as generation reads it). A longer chunk runs the prefill path: attention over the stored cache plus the
    # chunk's own exact K/V. Not the run's `prefill_chunk`: that one only splits a long prefill (here: each window's
    # context) to bound activation memory, and a KV codec affects its result only through what earlier pieces
    # stored; this one decides how the scored tokens read the cache, i.e. what the score measures.
    chunk: int = 0

    def check(self) -> None:
        if not 0 < self.stride <= self.max_length:
            raise ValueError(f"need 0 < stride <= max_length, got stride={self.stride}, max_length={self.max_length}")
        if self.max_length < 2:
            raise ValueError(f"max_length must be >= 2 tokens, got {self.max_length}")
        if self.max_tokens < 0 or self.chunk < 0:
            raise ValueError("max_tokens and chunk must be >= 0")


@register("task", "perplexity", PerplexityConfig)
class Perplexity(Task):
    """Perplexity on held-out text (windows of max_length, step stride, each token scored once), scored through
    the cache in chunks after each window's context is prefilled."""

    def __init__(self, cfg: PerplexityConfig):
        self.cfg = cfg

    def _shape(self, smoke: bool) -> tuple[int, int, int]:
        """(max_length, stride, max_tokens); a smoke run scores two short windows."""
        c = self.cfg
        if not smoke:
            return c.max_length, c.stride, c.max_tokens
        max_length = min(c.max_length, SMOKE_LENGTH)
        return max_length, max(1, min(c.stride, max_length // 2)), 2 * max_length

    def footprint(self, smoke: bool) -> tuple[int, int]:
        max_length, _, max_tokens = self._shape(smoke)
        return 1, min(max_length, max_tokens or max_length)

    def run(self, ctx: RunContext) -> dict[str, float | int | str]:
        c = self.cfg
        engine = ctx.engine
        if not ctx.trained:
            raise TaskRefused("perplexity of random weights means nothing; use a trained model (model=tiny, model=hf)")
        if engine.tokenizer is None:
            raise TaskRefused("perplexity needs a tokenizer; the model directory has no tokenizer.json")
        from ollm_triton.data.corpus import load_eval_text

        max_length, stride, max_tokens = self._shape(ctx.smoke)
        text, meta = load_eval_text(c.data)
        if max_tokens:  # tokenizing megabytes to keep a few thousand tokens wastes seconds; 8 chars/token is ample
            text = text[: 8 * max_tokens]
        ids = torch.tensor(engine.tokenizer.encode(text), dtype=torch.long)
        if max_tokens:
            ids = ids[:max_tokens]
        if ids.numel() < 2:
            raise ValueError(f"perplexity: the text from {c.data!r} has fewer than 2 tokens")
        chunk = c.chunk or engine.decode_max_tokens
        if ctx.context is not None:  # the scorer model loads outside the timed region
            ctx.context.prepare(engine)
        with ctx.timed("scored") as region:
            s = score(engine, ids, max_length, stride, chunk, context=ctx.context)
            region.tokens = s.scored
        effect, none = plugin_effect(engine, longest=s.longest, masked=s.masked_fraction,
                                     compressed=s.tokens_compressed, evicted=s.max_evicted,
                                     lossy_scored=s.scored_lossy)
        report_no_effect("perplexity", none)
        return {
            "ppl": math.exp(s.nll / s.scored),
            "nll_per_token": s.nll / s.scored,
            "tokens_scored": s.scored,
            "max_length": max_length,
            "stride": stride,
            "chunk": chunk,
            "chunk_path": "decode" if chunk <= engine.decode_max_tokens else "prefill over the stored cache",
            "windows": s.windows,
            "longest_sequence": s.longest,
            "tokens_scored_lossy_cache": s.scored_lossy,  # scored by a forward that read compressed/evicted K/V
            "kv_tokens_compressed_max": s.tokens_compressed,  # most tokens one layer held lossily at a scored step
            "kv_tokens_evicted_max": s.max_evicted,
            "keys_masked": s.masked_fraction,  # 1 - visible / causally visible (query, key) pairs, scored queries
            "plugin_effect": effect,
            **context_metrics(s.context),  # each window's context (not its scored tokens) as the compressor kept it
            **{f"data_{k}": v for k, v in meta.items()},
        }


@dataclass
class Scored:
    nll: float = 0.0  # nats, summed
    scored: int = 0  # tokens scored
    scored_lossy: int = 0  # of which by a forward whose cache read held compressed or evicted tokens
    tokens_compressed: int = 0  # most tokens held lossily by a layer when a scored step read it
    max_evicted: int = 0  # most tokens evicted by a layer when a scored step read it
    visible_pairs: float = 0.0  # (query, key) pairs the backend attended, over scored queries
    causal_pairs: int = 0  # (query, key) pairs plain causal attention would attend
    windows: int = 0
    longest: int = 0  # the longest window (tokens)
    context: list = field(default_factory=list)  # a context compressor's record per window context it shortened

    @property
    def masked_fraction(self) -> float:
        return 1.0 - self.visible_pairs / self.causal_pairs if self.causal_pairs else 0.0


def score(engine, ids: torch.Tensor, max_length: int, stride: int, chunk: int, context=None) -> Scored:
    """Score every token of ids [N] after the first: windows of max_length tokens every stride tokens; in each,
    the tokens before the first new one are prefilled (engine.prefill, in the engine's prefill_chunk pieces) and
    the new ones are fed `chunk` at a time, each chunk's logits predicting the next tokens.

    context: a context compressor (`+context=...`) that shortens each window's context before its prefill; the
    scored tokens then follow the kept ones (positions renumbered, as a compressed prompt is read). Its tail
    (`keep_last`), the text the scored tokens continue, is kept and stands in for the query."""
    from ollm_triton.attention.base import causal_pairs

    n = ids.numel()
    out = Scored()
    attention = engine.attention
    prev_end = 0
    windows = 1 + (max(n - max_length, 0) + stride - 1) // stride  # the last window is the first reaching n
    bar = progress(range(0, n, stride), total=windows, desc="perplexity", unit="window")
    for begin in bar:
        end = min(begin + max_length, n)
        window = ids[begin:end].to(engine.device)[None]
        first = max(prev_end, begin + 1) - begin  # index in the window of its first token not yet scored (>= 1)
        head = window[:, :first]
        if context is not None and first > 1:
            record = context.compress(head, target=engine)
            head = record.ids
            out.context.append(record)
        cache = engine.new_cache(batch=1, max_len=head.shape[1] + end - begin - first)
        logits = engine.prefill(head, cache)  # [1, V]: predicts window[first]
        # the prefill's last query is a scored one: count what it saw
        held = kv_length(cache)
        _count_keys(out, attention, 1, held, held - 1, causal_pairs)
        comp, ev = lossy_tokens(cache)
        preds = [logits[:, None]]
        lossy = [comp + ev > 0]  # per prediction group: did its read see lossy storage
        sizes = [1]
        # each chunk [i, i + step) predicts window[i + 1 : i + step + 1]; the last token of the window predicts nothing
        for i in range(first, end - begin - 1, chunk):
            part = window[:, i : min(i + chunk, end - begin - 1)]
            t = part.shape[1]
            decode_path = t <= engine.decode_max_tokens
            before = lossy_tokens(cache)
            held_before = kv_length(cache)
            logits = engine.forward(part, cache)
            after = lossy_tokens(cache)
            # the decode path appends, then reads the cache as stored; the prefill path reads dense() + the chunk's
            # exact K/V, then appends
            read = after if decode_path else before
            kv_len = kv_length(cache) if decode_path else held_before + t
            _count_keys(out, attention, t, kv_len, kv_len - t, causal_pairs)
            comp, ev = max(comp, read[0]), max(ev, read[1])
            preds.append(logits)
            lossy.append(sum(read) > 0)
            sizes.append(t)
        pred = torch.cat(preds, 1)[0].float()
        target = window[0, first:]
        nll = F.cross_entropy(pred, target, reduction="none")
        out.nll += nll.sum().item()
        out.scored += target.numel()
        out.scored_lossy += sum(sz for sz, lo in zip(sizes, lossy, strict=True) if lo)
        out.tokens_compressed = max(out.tokens_compressed, comp)
        out.max_evicted = max(out.max_evicted, ev)
        out.windows += 1
        out.longest = max(out.longest, end - begin)
        prev_end = end
        if end == n:
            break
    bar.close()
    return out


def _count_keys(out: Scored, attention, q_len: int, kv_len: int, q_offset: int, causal_pairs) -> None:
    total = causal_pairs(q_len, kv_len, q_offset)
    out.causal_pairs += total
    out.visible_pairs += attention.visible_fraction(q_len, kv_len, q_offset) * total
