"""`importance`: LLMLingua-style token dropping scored by a small LM.

The scorer (the embedded draft model by default) reads the prompt in segments of `segment` tokens. Each token's
self-information -log p(x_i | kept prefix) is computed conditioned on the *compressed* prefix, as LLMLingua's
iterative token-level compression does (Jiang et al., 2023, sec. 3.3): a token the kept text already predicts
well carries little information and is dropped first. Each segment keeps its share of the budget (its protected
tokens plus the free budget split over segments in proportion to their unprotected tokens, largest remainders
first), so the whole prompt keeps round(ratio * T) tokens exactly; protected spans are never dropped.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ollm_triton.context.base import ContextCompressor, RatioParams, fill_by_score
from ollm_triton.context.scorer import Scorer
from ollm_triton.registry import register

DEFAULT_SCORER = "embedded:tiny-llama-draft"


@dataclass
class ScorerParams(RatioParams):
    scorer: str = DEFAULT_SCORER  # the small LM: embedded:NAME | checkpoint dir | random:<json|conf/model preset>

    def check(self) -> None:
        super().check()
        if not self.scorer:
            raise ValueError("scorer must name a model: embedded:NAME, a checkpoint directory or random:...")


@dataclass
class ImportanceConfig(ScorerParams):
    segment: int = 256  # tokens scored per step against the compressed prefix (LLMLingua's iterative segments)

    def check(self) -> None:
        super().check()
        if self.segment < 1:
            raise ValueError(f"segment must be >= 1 token, got {self.segment}")


class ScoredCompressor(ContextCompressor):
    """A compressor that runs the scorer LM (loaded once per device and dtype)."""

    needs_scorer = True

    def __init__(self, cfg: ScorerParams):
        super().__init__(cfg)
        self._scorer: Scorer | None = None

    def budget(self, t: int) -> int:
        return min(t, round(self.cfg.ratio * t))

    def scorer(self, target: Any = None) -> Scorer:
        place = (getattr(target, "device", None), getattr(target, "dtype", None))
        if self._scorer is None or self._place != place:
            if self._scorer is not None:
                self._scorer.close()
            self._scorer, self._place = Scorer(self.cfg.scorer, target), place
        return self._scorer

    def prepare(self, target: Any = None) -> None:
        self.scorer(target)

    def close(self) -> None:
        if self._scorer is not None:
            self._scorer.close()
            self._scorer = None


def proportional(total: int, weights: list[int]) -> list[int]:
    """`total` split into integers proportional to `weights` (largest remainders, earlier first on ties), each at
    most its weight."""
    whole = sum(weights)
    if whole == 0 or total <= 0:
        return [0] * len(weights)
    total = min(total, whole)
    exact = [total * w / whole for w in weights]
    shares = [int(e) for e in exact]
    order = sorted(range(len(weights)), key=lambda i: (-(exact[i] - shares[i]), i))
    for i in order[: total - sum(shares)]:
        shares[i] += 1
    return shares


@register("context", "importance", ImportanceConfig)
class Importance(ScoredCompressor):
    """LLMLingua-style token dropping: a small LM's self-information per token, scored in segments against the
    compressed prefix; the least informative tokens go first, protected spans stay."""

    def select(self, ids: torch.Tensor, protected: torch.Tensor, query: tuple[int, int] | None,
               target: Any) -> tuple[torch.Tensor, dict[str, Any]]:
        t = ids.numel()
        budget = self.budget(t)
        seg = self.cfg.segment
        bounds = [(s, min(s + seg, t)) for s in range(0, t, seg)]
        free = [int((~protected[a:b]).sum()) for a, b in bounds]
        shares = proportional(budget - int(protected.sum()), free)
        if int(protected.sum()) >= budget or budget >= t:  # nothing to choose: no scoring needed
            keep = protected if budget < t else torch.ones(t, dtype=torch.bool)
            return keep.nonzero()[:, 0], {"segments": len(bounds)}
        sc = self.scorer(target)
        cache = sc.engine.new_cache(1, budget + seg + 1)
        last = None
        kept = []
        for (a, b), share in zip(bounds, shares, strict=True):
            before = cache.position
            info = sc.self_information(ids[a:b], cache, last)
            local = fill_by_score(protected[a:b], info, int(protected[a:b].sum()) + share) + a
            kept.append(local)
            cache.truncate(before)  # the next segment is scored against the kept tokens only
            if local.numel():
                sc.self_information(ids[local], cache, last)
                last = sc.last_logits
        return torch.cat(kept), {"segments": len(bounds)}
