"""The context-compression interface: the whole contract a compressor keeps with the tasks (and the server).

A `ContextCompressor` takes a prompt's token ids before prefill and returns the ids it keeps, in their original
order, plus a record of what it dropped. The target model then prefills the shorter prompt: the compressed text is
a new prompt (positions renumbered), as LLMLingua and Selective Context feed it, unlike a KV-eviction codec
(`cache/h2o.py`, `snapkv.py`, `streaming.py`) that drops K/V after the full prompt was read.

    compress(ids, protect=[(start, end), ...], query=(start, end), target=engine) -> Compressed

ids: [B, T] long (rows are compressed independently and keep the same count, so they stack). protect: spans every
method keeps whole (the instruction, BOS); `query`: the question span, protected too, which query-aware methods
score the context against. Without a query the last `keep_last` tokens are protected and stand in for it.
`target`: the engine that will prefill the result (optional): a scorer LM is placed on its device and dtype, and
an adaptive compressor reads its KV bytes per token.

What a task reads, declared here and never inferred from a compressor's name:
    ContextCompressor.needs_scorer   it runs a small LM over the prompt (`prepare(target)` loads it before a timed
                                     region, so load time never lands in a time-to-first-token figure)

Where it is applied (tasks/*.py, through `tasks.base.compress_prompt`):
    passkey      each document: BOS protected, the question is the query (a compressor must not drop what is asked)
    throughput   the prompt, once, before the timed repeats; the compression time is added to ttft_s
    memory       the prompt the measured cache holds (the scorer's activations count in the peak)
    perplexity   each window's context (its tail kept: the scored tokens continue it); the scored tokens are never
                 compressed, or the score would be of a different text. The first window has no context.
    facade       OptimizedInference.generate / stream / chat (facade.py)
    server       refused in one line for now (serve/server.py): it would otherwise serve prompts uncompressed

Floor: a compressor that scores with a language model builds an Engine, so this kind sits beside `decoding/` (above
`engine/`), not beside `cache/`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class ContextParams:
    """Parameters every compressor shares."""

    keep_first: int = 1  # leading tokens always kept (BOS, a system instruction)
    keep_last: int = 16  # trailing tokens always kept when no query span is given (they stand in for the question)

    def check(self) -> None:
        if self.keep_first < 0 or self.keep_last < 0:
            raise ValueError(f"keep_first and keep_last must be >= 0 tokens, got {self.keep_first}, {self.keep_last}")


@dataclass
class RatioParams(ContextParams):
    ratio: float = 0.5  # fraction of the prompt's tokens kept (protected spans included): kept = round(ratio * T)

    def check(self) -> None:
        super().check()
        if not 0.0 < self.ratio <= 1.0:
            raise ValueError(f"ratio must be a fraction in (0, 1], got {self.ratio}")


@dataclass
class Compressed:
    """What a compressor kept. ids, kept: [B, K] (kept[b] are ascending positions into the original row b)."""

    ids: torch.Tensor
    kept: torch.Tensor
    original_length: int
    method: str  # the method that ran (an adaptive compressor names the one it chose)
    seconds: float = 0.0  # scoring and selection
    pooled_tokens: int = 0  # of the kept tokens per row, those kept as a chunk's summary (hierarchical)
    over_budget: int = 0  # tokens kept beyond round(ratio * T) because protected spans needed them
    notes: dict[str, Any] = field(default_factory=dict)

    @property
    def length(self) -> int:
        return int(self.ids.shape[1])

    @property
    def ratio(self) -> float:
        return self.length / self.original_length if self.original_length else 1.0

    def dropped_spans(self, row: int = 0) -> list[tuple[int, int]]:
        """[start, end) runs of positions of row `row` that were dropped."""
        keep = torch.zeros(self.original_length, dtype=torch.bool)
        keep[self.kept[row]] = True
        spans, start = [], None
        for i, k in enumerate(keep.tolist()):
            if not k and start is None:
                start = i
            elif k and start is not None:
                spans.append((start, i))
                start = None
        if start is not None:
            spans.append((start, self.original_length))
        return spans

    def record(self) -> dict[str, Any]:
        """Flat numbers for metrics.json."""
        return {"method": self.method, "original_tokens": self.original_length, "kept_tokens": self.length,
                "ratio": self.ratio, "dropped_tokens": self.original_length - self.length,
                "pooled_tokens": self.pooled_tokens, "over_budget": self.over_budget, "seconds": self.seconds,
                **self.notes}


class ContextCompressor:
    """Base class of context-compression plugins."""

    plugin_name = "base"
    needs_scorer: bool = False

    def __init__(self, cfg: ContextParams):
        self.cfg = cfg

    def prepare(self, target: Any = None) -> None:
        """Load what compressing needs (a scorer LM) on the target's device, outside any timed region."""

    def compress(self, ids: torch.Tensor, *, protect: Sequence[tuple[int, int]] = (),
                 query: tuple[int, int] | None = None, target: Any = None) -> Compressed:
        if ids.dim() != 2:
            raise ValueError(f"ids must be [batch, tokens], got shape {list(ids.shape)}")
        t = int(ids.shape[1])
        if query is not None and not 0 <= query[0] < query[1] <= t:
            raise ValueError(f"query span {query} is outside the prompt's {t} tokens")
        for span in protect:
            if not 0 <= span[0] <= span[1] <= t:
                raise ValueError(f"protected span {span} is outside the prompt's {t} tokens")
        mask = self.protected(t, protect, query)
        start = time.perf_counter()
        rows, info = [], {}
        for b in range(ids.shape[0]):
            kept, info = self.select(ids[b].cpu(), mask, query, target)
            rows.append(kept)
        if len({r.numel() for r in rows}) != 1:  # a contract break of the subclass, not bad input
            raise RuntimeError(f"{self.plugin_name}: rows kept different counts {[r.numel() for r in rows]}")
        kept = torch.stack(rows).to(torch.long)
        out_ids = torch.gather(ids.cpu(), 1, kept).to(ids.device)
        seconds = time.perf_counter() - start
        method = info.pop("method", self.plugin_name)
        pooled = int(info.pop("pooled_tokens", 0))
        budget = info.pop("budget") if "budget" in info else self.budget(t)
        over = max(kept.shape[1] - int(budget), 0)
        return Compressed(out_ids, kept, t, method, seconds, pooled, over, info)

    def protected(self, t: int, protect: Sequence[tuple[int, int]], query: tuple[int, int] | None) -> torch.Tensor:
        """bool [T]: positions every method keeps."""
        mask = torch.zeros(t, dtype=torch.bool)
        mask[: min(self.cfg.keep_first, t)] = True
        for a, b in protect:
            mask[a:b] = True
        if query is not None:
            mask[query[0] : query[1]] = True
        elif self.cfg.keep_last:
            mask[max(t - self.cfg.keep_last, 0) :] = True
        return mask

    def budget(self, t: int) -> int:
        """Tokens kept of a T-token prompt (protected ones included)."""
        return t

    def select(self, ids: torch.Tensor, protected: torch.Tensor, query: tuple[int, int] | None,
               target: Any) -> tuple[torch.Tensor, dict[str, Any]]:
        """Ascending kept positions [K] of one row ids [T], and notes for the record (`method`, `pooled_tokens` and
        `budget` there override the record's defaults: an adaptive compressor names what it chose)."""
        raise NotImplementedError


def query_span(t: int, protected: torch.Tensor, query: tuple[int, int] | None, keep_last: int) -> tuple[int, int]:
    """The span query-aware methods score against: the given query, else the protected tail."""
    if query is not None:
        return query
    return (max(t - max(keep_last, 1), 0), t)


def fill_by_score(protected: torch.Tensor, score: torch.Tensor, budget: int) -> torch.Tensor:
    """Ascending positions: every protected one, then the highest-`score` others until `budget` are kept (ties go to
    the earlier position, so the choice is deterministic)."""
    keep = protected.clone()
    free = budget - int(keep.sum())
    if free > 0:
        candidates = (~keep).nonzero()[:, 0]
        order = torch.argsort(-score[candidates].double(), stable=True)
        keep[candidates[order[:free]]] = True
    return keep.nonzero()[:, 0]
