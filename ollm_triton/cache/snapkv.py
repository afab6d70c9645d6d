"""`snapkv`: SnapKV prompt compression, an observation window at the end of each prompt chunk votes for tokens.

When a chunk of at least `window` tokens has been attended (the prompt, scored in `observe`), the last `window`
queries' attention to each earlier token is summed over those queries and the query heads of each KV head
(chunked: kernels/kv_scores.py), pooled along the tokens (`kernel_size`, so neighbours of a voted token come
with it), and the top tokens per KV head are kept together with the window itself (at the next append, like
every eviction codec here). Decode steps (chunks shorter than the window) append without evicting, as in SnapKV:
the budget applies to the prompt.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ollm_triton.cache.base import CacheLayer, LayerSpec
from ollm_triton.cache.eviction import EvictingCodec, EvictingLayer, EvictionParams, topk_sorted
from ollm_triton.cache.storage import wrap_store
from ollm_triton.kernels.kv_scores import attention_column_sums, pool_scores
from ollm_triton.registry import register


@dataclass
class SnapKVConfig(EvictionParams):
    window: int = 32  # observation window: the last queries of a prompt chunk
    kernel_size: int = 7  # pooling width along the tokens
    pooling: str = "avg"  # avg | max

    def check(self) -> None:
        super().check()
        if self.window < 1:
            raise ValueError(f"window must be >= 1, got {self.window}")
        if self.kernel_size < 1:
            raise ValueError(f"kernel_size must be >= 1, got {self.kernel_size}")
        if self.pooling not in ("avg", "max"):
            raise ValueError(f"pooling must be avg or max, got {self.pooling!r}")


class SnapKVLayer(EvictingLayer):
    needs_scores = True

    def __init__(self, spec: LayerSpec, cfg: SnapKVConfig):
        super().__init__(spec, cfg, min_budget=1)
        self.snap = cfg
        self.votes: torch.Tensor | None = None  # pooled votes [B, H, voted_n - window] awaiting the next append
        self.voted_n = 0

    def score(self, q: torch.Tensor) -> None:
        w = self.snap.window
        if q.shape[2] < w or self.n <= self.budget():
            return  # a decode step: SnapKV compresses prompts only
        obs = q[:, :, -w:]
        votes = attention_column_sums(obs, self.k[:, :, : self.n], q_offset=self.n - w)
        self.votes = pool_scores(votes[:, :, : self.n - w], self.snap.kernel_size, self.snap.pooling)
        self.voted_n = self.n

    def over_budget(self) -> bool:
        return self.votes is not None and self.n > self.budget()

    def keep(self, idx: torch.Tensor) -> None:
        super().keep(idx)
        self.votes = None

    def truncate(self, length: int) -> None:
        super().truncate(length)
        if self.votes is not None and self.n < self.voted_n:  # the voting window was rolled back: no vote
            self.votes = None

    def select(self, budget: int) -> torch.Tensor:
        w, n = self.snap.window, self.voted_n  # tokens after the vote (decode steps) are kept with the window
        b, h = self.spec.batch, self.spec.kv_heads
        budget = max(budget, self.n - n + 1)  # never evict what arrived after the vote
        if budget <= self.n - n + w:  # the budget does not even hold the window: keep the newest tokens
            return torch.arange(self.n - budget, self.n, device=self.k.device).expand(b, h, -1)
        idx_new = torch.arange(n - w, self.n, device=self.k.device).expand(b, h, -1)
        return torch.cat((topk_sorted(self.votes, budget - (self.n - n + w)), idx_new), dim=-1)


@register("cache", "snapkv", SnapKVConfig)
class SnapKV(EvictingCodec):
    """SnapKV: the prompt's last `window` queries vote (pooled) for the tokens to keep, `budget` or `ratio`."""

    def max_held_tokens(self, block: int) -> int | None:
        return None  # decode steps never vote, so a layer keeps every generated token: no bound

    def __init__(self, cfg: SnapKVConfig):
        self.cfg = cfg

    def new_layer(self, spec: LayerSpec) -> CacheLayer:
        return wrap_store(SnapKVLayer(spec, self.cfg), self.cfg, self)
