"""`h2o`: Heavy-Hitter Oracle eviction, the tokens with the most accumulated attention plus the most recent ones.

Each token's score is the attention it has received, summed over every query since it arrived and over the
query heads of its KV head (scored in `observe` from the step's queries, chunked: kernels/kv_scores.py; for a
prompt that is every prompt query, causal). When the held tokens exceed the budget, the newest
`recent * budget` are kept and the rest of the budget goes to the highest scores, per KV head.

Scores are recomputed from the queries rather than taken from the attention kernel (which does not return
probabilities): one extra QK^T pass per step over the held tokens (two for a prompt).

Rollback: tokens roll back exactly as for every eviction codec (see _eviction.py), but the accumulated scores keep
the votes that the rolled-back queries cast; they only steer later evictions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ollm_triton.cache.base import CacheLayer, LayerSpec
from ollm_triton.cache.eviction import EvictingCodec, EvictingLayer, EvictionParams, topk_sorted
from ollm_triton.cache.storage import wrap_store
from ollm_triton.kernels.kv_scores import attention_column_sums
from ollm_triton.registry import register


@dataclass
class H2OConfig(EvictionParams):
    recent: float = 0.5  # fraction of the budget reserved for the newest tokens (the rest: heavy hitters)

    def check(self) -> None:
        super().check()
        if not 0.0 <= self.recent <= 1.0:
            raise ValueError(f"recent must be a fraction in [0, 1], got {self.recent}")


class H2OLayer(EvictingLayer):
    needs_scores = True

    def __init__(self, spec: LayerSpec, cfg: H2OConfig):
        super().__init__(spec, cfg, min_budget=1)
        self.recent = cfg.recent
        self.scores = torch.zeros(spec.batch, spec.kv_heads, 0, device=spec.device)

    def _extra_state(self) -> list[str]:
        return ["scores"]

    def score(self, q: torch.Tensor) -> None:
        k = self.k[:, :, : self.n]
        self.scores[:, :, : self.n] += attention_column_sums(q, k, q_offset=self.n - q.shape[2])

    def select(self, budget: int) -> torch.Tensor:
        recent = min(budget, round(self.recent * budget))
        heavy = budget - recent
        older = self.n - recent
        idx_recent = torch.arange(older, self.n, device=self.k.device).expand(*self.scores.shape[:2], -1)
        if heavy == 0:
            return idx_recent
        idx_heavy = topk_sorted(self.scores[:, :, :older], heavy)
        return torch.cat((idx_heavy, idx_recent), dim=-1)


@register("cache", "h2o", H2OConfig)
class H2O(EvictingCodec):
    """Heavy-hitter eviction (H2O): accumulated-attention heavy hitters plus recent tokens, `budget` or `ratio`."""

    score_bytes = 4  # the float32 accumulated attention of each held token

    def __init__(self, cfg: H2OConfig):
        self.cfg = cfg

    def new_layer(self, spec: LayerSpec) -> CacheLayer:
        return wrap_store(H2OLayer(spec, self.cfg), self.cfg, self)
