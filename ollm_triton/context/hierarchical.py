"""`hierarchical`: coarse-to-fine compression by chunks, LongLLMLingua-style.

The unprotected context is cut into chunks of about `chunk` tokens, each ending where a line ends (a token whose
text holds a newline, searched back over the chunk's second half; a hard cut only where a line runs longer), so a
`key = value` line is never split. Each chunk's relevance to the query (the question span, else the protected
tail) comes from the scorer, one of:

- `maxsim` (default): late interaction over the scorer's last hidden states (ColBERT's MaxSim, Khattab & Zaharia,
  2020): the sum over query tokens of the best cosine similarity with any token of the chunk, each read in its own
  context ([BOS] chunk, [BOS] query);
- `surprisal`: the scorer's mean surprisal of the question given the chunk alone, -1/|q| sum log p(q | [BOS] chunk)
  (LongLLMLingua's question-aware coarse compression, Jiang et al., 2023).

On the embedded draft model (2 layers) `surprisal` is a weak signal: on 12 passkey prompts of 2048 tokens it ranked
the needle's chunk first in 3 (the 6-layer target as scorer: 12), while `maxsim` with the draft ranked it first in
all 12 (scratch measurement while building this; experiments/context/ has the end-to-end numbers). The chunks are
then, most relevant first:

- kept whole while a whole chunk fits the budget;
- the first that does not fit is refined: cut into line-aligned halves that are ranked and allotted the same way
  (recursively, down to pieces of `pool` tokens), so at a heavy ratio the relevant lines of the relevant chunk
  survive whole instead of the chunk being averaged away;
- the rest are pooled: summarised to `pool` representative tokens each, their highest self-information tokens
  (Selective Context's measure, from the same scorer forward) in their original order, while budget remains;
- dropped.

The budget is exact: the piece where it runs out is pooled to what remains, so round(ratio * T) tokens are kept.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ollm_triton.context.base import fill_by_score, query_span
from ollm_triton.context.importance import ScoredCompressor, ScorerParams
from ollm_triton.registry import register

RELEVANCE = ("maxsim", "surprisal")


@dataclass
class HierarchicalConfig(ScorerParams):
    chunk: int = 128  # tokens per chunk (cut at the last line end in its second half)
    pool: int = 8  # tokens a pooled chunk keeps (its most informative ones)
    relevance: str = "maxsim"  # maxsim (the scorer's hidden states, late interaction) | surprisal (of the question)

    def check(self) -> None:
        super().check()
        if self.relevance not in RELEVANCE:
            raise ValueError(f"relevance must be one of {', '.join(RELEVANCE)}, got {self.relevance!r}")
        if self.chunk < 2:
            raise ValueError(f"chunk must be >= 2 tokens, got {self.chunk}")
        if self.pool < 1:
            raise ValueError(f"pool must be >= 1 token, got {self.pool}")


def line_chunks(positions: torch.Tensor, newline: torch.Tensor, size: int) -> list[torch.Tensor]:
    """Consecutive runs of `positions` (ascending) cut into chunks of at most `size`, each ending after the last
    newline token in its second half when there is one. newline: bool per position (same length)."""
    chunks, run = [], []
    pos = positions.tolist()
    for i, p in enumerate(pos):
        if run and p != run[-1] + 1:  # a protected span interrupts: a run never crosses it
            chunks.append(run)
            run = []
        run.append(p)
        if len(run) == size:
            ends = [j for j in range(len(run) - 1, size // 2 - 1, -1) if newline[i - (len(run) - 1 - j)]]
            cut = ends[0] + 1 if ends else size
            chunks.append(run[:cut])
            run = run[cut:]
    if run:
        chunks.append(run)
    return [torch.tensor(c, dtype=torch.long) for c in chunks]


@register("context", "hierarchical", HierarchicalConfig)
class Hierarchical(ScoredCompressor):
    """Line-aligned chunks ranked by relevance to the question (MaxSim over the scorer's hidden states, or its
    surprisal of the question): kept whole, refined, pooled to their most informative tokens, or dropped."""

    def select(self, ids: torch.Tensor, protected: torch.Tensor, query: tuple[int, int] | None,
               target: Any) -> tuple[torch.Tensor, dict[str, Any]]:
        t = ids.numel()
        budget = self.budget(t)
        free = budget - int(protected.sum())
        if free <= 0 or budget >= t:
            keep = protected if budget < t else torch.ones(t, dtype=torch.bool)
            return keep.nonzero()[:, 0], {"chunks": 0}
        sc = self.scorer(target)
        q0, q1 = query_span(t, protected, query, self.cfg.keep_last)
        question = ids[q0:q1]
        newline = sc.newline[ids.clamp(max=sc.newline.numel() - 1)]
        open_pos = (~protected).nonzero()[:, 0]
        chunks = line_chunks(open_pos, newline[open_pos], self.cfg.chunk)
        info = torch.zeros(t)  # each token's self-information within its chunk (what pooling keeps)
        maxsim = self.cfg.relevance == "maxsim"
        if maxsim:  # hidden states read once per chunk; a sub-chunk's relevance reuses its tokens' states
            q_hidden = F.normalize(sc.read(question)[0], dim=-1)
            sims = torch.zeros(t, question.numel())  # cosine of each context token with each query token
        top: dict[tuple[int, int], float] = {}
        for c in chunks:
            if maxsim:
                hidden, own = sc.read(ids[c])
                sims[c] = F.normalize(hidden, dim=-1) @ q_hidden.T
            else:
                nll, own = sc.question_nll(ids[c], question)
                top[(int(c[0]), c.numel())] = nll
            info[c] = own

        def relevance(c: torch.Tensor) -> float:  # lower = more relevant
            if maxsim:
                return -float(sims[c].max(dim=0).values.sum())
            key = (int(c[0]), c.numel())
            if key not in top:  # a sub-chunk under surprisal relevance: its own forward
                top[key] = sc.question_nll(ids[c], question)[0]
            return top[key]

        keep = protected.clone()
        tally = {"whole": 0, "pooled": 0}

        def pool(c: torch.Tensor, free: int) -> int:
            take = min(self.cfg.pool, free, c.numel())
            keep[c[torch.argsort(-info[c].double(), stable=True)[:take]]] = True
            tally["pooled"] += take
            return free - take

        def allot(level: list[torch.Tensor], free: int, size: int) -> int:
            """Most relevant first: whole while they fit; the first that does not fit is refined (line-aligned
            halves, ranked again) while it is larger than a pool; the rest are pooled while budget remains."""
            order = sorted(range(len(level)), key=lambda i: (relevance(level[i]), i))
            for n, i in enumerate(order):
                c = level[i]
                if free <= 0:
                    return free
                if c.numel() <= free:
                    keep[c] = True
                    tally["whole"] += 1
                    free -= c.numel()
                    continue
                rest = order[n:]
                if size // 2 >= 2 and c.numel() > self.cfg.pool:
                    free = allot(line_chunks(c, newline[c], size // 2), free, size // 2)
                    rest = order[n + 1 :]
                for j in rest:
                    if free <= 0:
                        break
                    free = pool(level[j], free)
                return free
            return free

        allot(chunks, free, self.cfg.chunk)
        whole, pooled = tally["whole"], tally["pooled"]
        kept = fill_by_score(keep, info, budget)  # only when every chunk was pooled and budget remains
        return kept, {"chunks": len(chunks), "chunks_whole": whole, "pooled_tokens": pooled}
