"""Fields and checks shared by the speculative strategies' config schemas."""

from __future__ import annotations

from dataclasses import dataclass

from ollm_triton.decoding.drafters import draft_source
from ollm_triton.decoding.speculation import check_sampling
from ollm_triton.decoding.static_steps import FAST_PATHS


def check_strategy_fields(cfg) -> None:
    """Validate the fields a strategy's schema has of: temperature/top_k/top_p, fast_path, draft (ValueError)."""
    if hasattr(cfg, "temperature"):
        check_sampling(cfg.temperature, cfg.top_k, cfg.top_p)
    if cfg.fast_path not in FAST_PATHS:
        raise ValueError(f"fast_path must be one of {', '.join(FAST_PATHS)}, got {cfg.fast_path!r}")
    draft = getattr(cfg, "draft", None)
    if draft is not None and not draft.startswith("embedded:"):  # a missing embedded draft is reported when needed
        draft_source(draft)


@dataclass
class StrategyFields:
    """The field every speculative strategy has. A schema subclasses this (or SamplingStrategyFields), adds its own
    fields, and ends its `check` with `super().check()`."""

    fast_path: str = "auto"  # auto: graph steps where greedy replays graphs (static buffers) | static | off

    def check(self) -> None:
        check_strategy_fields(self)


@dataclass
class SamplingStrategyFields(StrategyFields):
    """StrategyFields plus the sampling fields of the strategies that can sample."""

    temperature: float = 0.0  # 0 = greedy (token-identical to decoder=greedy); > 0 = speculative sampling
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
