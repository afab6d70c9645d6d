"""`self_speculative`: the target's own first k layers (plus its final norm and LM head) draft for it."""

from __future__ import annotations

from dataclasses import dataclass

from ollm_triton.decoding.base import DecoderStrategy
from ollm_triton.decoding.drafters import layer_skip_drafter
from ollm_triton.decoding.speculation import FixedCandidates, Sampling, speculate
from ollm_triton.decoding.static_steps import resolve_fast_path
from ollm_triton.decoding.strategy_fields import SamplingStrategyFields
from ollm_triton.registry import register


@dataclass
class SelfSpeculativeConfig(SamplingStrategyFields):
    draft_layers: int = 0  # layers the draft runs; 0 = half the target's (rounded down, at least 1)
    num_candidates: int = 4

    def check(self) -> None:
        if self.draft_layers < 0:
            raise ValueError(f"draft_layers must be >= 0 (0 = half the target's layers), got {self.draft_layers}")
        if not 1 <= self.num_candidates <= 64:
            raise ValueError(f"num_candidates must be in [1, 64], got {self.num_candidates}")
        super().check()


@register("decoder", "self_speculative", SelfSpeculativeConfig)
class SelfSpeculative(DecoderStrategy):
    """Early-exit self-speculation: the target's first k layers draft, all layers verify; one model, one cache."""

    def __init__(self, cfg: SelfSpeculativeConfig):
        self.cfg = cfg
        self.sampling = Sampling(cfg.temperature, cfg.top_k, cfg.top_p)
        self.keep_state: dict | None = None

    def draft_layers(self, engine) -> int:
        total = engine.config.num_layers
        k = self.cfg.draft_layers or max(1, total // 2)
        if k >= total:
            raise ValueError(f"self_speculative: draft_layers={k} must be below the target's {total} layers")
        return k

    def generate(self, engine, prompt_ids, max_new_tokens, *, eos_id=None):
        k = self.draft_layers(engine)
        path = resolve_fast_path(self.cfg.fast_path, engine)
        drafter = layer_skip_drafter(engine, k, self.sampling, path)
        out = speculate(engine, prompt_ids, max_new_tokens, eos_id=eos_id, drafter=drafter, sampling=self.sampling,
                        seed=self.cfg.seed, controller=FixedCandidates(self.cfg.num_candidates), path=path,
                        keep_state=self.keep_state)
        out.counters.update(num_candidates=int(self.cfg.num_candidates), draft_layers=int(k))
        return out
