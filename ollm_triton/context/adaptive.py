"""`adaptive`: picks the compression method and ratio per prompt from its length against a token and memory budget.

The budget is the smaller of `max_context` tokens and the tokens whose KV cache fits `memory_gb` on the target
(the target codec's declared bytes per token times its layers: an int4 cache admits about four times the tokens of
a dense one). A prompt within budget passes unchanged. A longer one is compressed to ratio = budget / length:
with `importance` (token dropping) when the ratio is at least `coarse_below`, with `hierarchical` (whole chunks,
query-aware) below it, because token-level dropping at heavy rates cuts through the facts a question asks about
(LongLLMLingua's motivation for coarse-to-fine; experiments/context/ measures both on the embedded model).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from ollm_triton.context.base import ContextParams
from ollm_triton.context.hierarchical import Hierarchical, HierarchicalConfig
from ollm_triton.context.importance import DEFAULT_SCORER, Importance, ImportanceConfig, ScoredCompressor
from ollm_triton.registry import register


@dataclass
class AdaptiveContextConfig(ContextParams):
    scorer: str = DEFAULT_SCORER  # the small LM both methods score with
    max_context: int = 8192  # prompt tokens that pass uncompressed (0 = no token budget)
    memory_gb: float = 0.0  # KV memory (1e9 bytes) the prompt may take on the target (0 = no memory budget)
    coarse_below: float = 0.5  # below this ratio compress by chunks (hierarchical), at or above it by tokens

    def check(self) -> None:
        super().check()
        if self.max_context < 0 or self.memory_gb < 0:
            raise ValueError(f"max_context and memory_gb must be >= 0, got {self.max_context}, {self.memory_gb}")
        if self.max_context == 0 and self.memory_gb == 0:
            raise ValueError("give a budget: max_context > 0 tokens or memory_gb > 0")
        if not 0.0 <= self.coarse_below <= 1.0:
            raise ValueError(f"coarse_below must be a fraction in [0, 1], got {self.coarse_below}")
        if not self.scorer:
            raise ValueError("scorer must name a model: embedded:NAME, a checkpoint directory or random:...")


@register("context", "adaptive", AdaptiveContextConfig)
class AdaptiveContext(ScoredCompressor):
    """Chooses per prompt: unchanged within budget, else importance (mild ratios) or hierarchical (heavy ratios) at
    ratio = budget / length, the budget being max_context tokens and the KV bytes memory_gb holds on the target."""

    def budget_tokens(self, target: Any) -> int:
        """Prompt tokens the budget admits."""
        limits = [self.cfg.max_context] if self.cfg.max_context else []
        if self.cfg.memory_gb:
            if target is None:
                raise ValueError("context 'adaptive': memory_gb needs the target model (its KV bytes per token); "
                                 "pass target= or set memory_gb=0")
            per_token = target.codec.bytes_per_token(target.layer_spec(1, 1)) * target.config.num_layers
            limits.append(math.floor(self.cfg.memory_gb * 1e9 / per_token))
        return max(min(limits), 1)

    def select(self, ids: torch.Tensor, protected: torch.Tensor, query: tuple[int, int] | None,
               target: Any) -> tuple[torch.Tensor, dict[str, Any]]:
        t = ids.numel()
        allowed = self.budget_tokens(target)
        if t <= allowed:
            return torch.arange(t), {"method": "none", "budget": t, "budget_tokens": allowed}
        ratio = allowed / t
        shared = {"scorer": self.cfg.scorer, "keep_first": self.cfg.keep_first, "keep_last": self.cfg.keep_last}
        if ratio >= self.cfg.coarse_below:
            child: ScoredCompressor = Importance(ImportanceConfig(ratio=ratio, **shared))
        else:
            child = Hierarchical(HierarchicalConfig(ratio=ratio, **shared))
        child._scorer, child._place = self.scorer(target), self._place  # one scorer model for both methods
        kept, notes = child.select(ids, protected, query, target)
        return kept, {**notes, "method": child.plugin_name, "budget": child.budget(t), "budget_tokens": allowed}
