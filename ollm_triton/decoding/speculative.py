"""`speculative`: a draft model proposes `num_candidates` tokens, the target verifies them in one forward."""

from __future__ import annotations

from dataclasses import dataclass

from ollm_triton.decoding.base import DecoderStrategy
from ollm_triton.decoding.drafters import DraftEngineHolder, model_drafter
from ollm_triton.decoding.speculation import FixedCandidates, Sampling, speculate
from ollm_triton.decoding.static_steps import resolve_fast_path
from ollm_triton.decoding.strategy_fields import SamplingStrategyFields
from ollm_triton.registry import register


@dataclass
class SpeculativeConfig(SamplingStrategyFields):
    draft: str = "embedded:tiny-llama-draft"  # embedded:NAME | checkpoint dir | random:<json|conf/model preset>
    num_candidates: int = 4  # drafts per target forward

    def check(self) -> None:
        if not 1 <= self.num_candidates <= 64:
            raise ValueError(f"num_candidates must be in [1, 64], got {self.num_candidates}")
        super().check()


@register("decoder", "speculative", SpeculativeConfig)
class Speculative(DecoderStrategy):
    """Draft-model speculative decoding: lossless greedy, or speculative sampling with the target's distribution."""

    def __init__(self, cfg: SpeculativeConfig, *, draft_engine=None):
        self.cfg = cfg
        self.draft = DraftEngineHolder(cfg.draft, draft_engine)
        self.sampling = Sampling(cfg.temperature, cfg.top_k, cfg.top_p)
        self.keep_state: dict | None = None  # set to {} to keep the last run's caches (tests)

    def generate(self, engine, prompt_ids, max_new_tokens, *, eos_id=None):
        path = resolve_fast_path(self.cfg.fast_path, engine)
        drafter = model_drafter(self.draft.get(engine), engine.config.vocab_size, self.sampling, path)
        out = speculate(engine, prompt_ids, max_new_tokens, eos_id=eos_id, drafter=drafter, sampling=self.sampling,
                        seed=self.cfg.seed, controller=FixedCandidates(self.cfg.num_candidates), path=path,
                        keep_state=self.keep_state)
        out.counters["num_candidates"] = float(self.cfg.num_candidates)
        return out

    def close(self) -> None:
        """Free the draft model (the runner's multirun jobs each build their own strategy)."""
        self.draft.close()
