"""`prompt_lookup`: drafts copied from the prompt or the generated text after the last n-gram's earlier occurrence."""

from __future__ import annotations

from dataclasses import dataclass

from ollm_triton.decoding.base import DecoderStrategy
from ollm_triton.decoding.drafters import LookupDrafter
from ollm_triton.decoding.speculation import FixedCandidates, Sampling, speculate
from ollm_triton.decoding.static_steps import resolve_fast_path
from ollm_triton.decoding.strategy_fields import SamplingStrategyFields
from ollm_triton.registry import register


@dataclass
class PromptLookupConfig(SamplingStrategyFields):
    num_candidates: int = 8  # at most this many copied tokens per target forward (drafts cost nothing)
    max_ngram: int = 3  # longest suffix matched first
    min_ngram: int = 1

    def check(self) -> None:
        if not 1 <= self.num_candidates <= 64:
            raise ValueError(f"num_candidates must be in [1, 64], got {self.num_candidates}")
        if not 1 <= self.min_ngram <= self.max_ngram:
            raise ValueError(f"need 1 <= min_ngram <= max_ngram, got min_ngram={self.min_ngram}, "
                             f"max_ngram={self.max_ngram}")
        super().check()


@register("decoder", "prompt_lookup", PromptLookupConfig)
class PromptLookup(DecoderStrategy):
    """Prompt-lookup decoding: n-gram matches in the context are the drafts; no draft model."""

    def __init__(self, cfg: PromptLookupConfig):
        self.cfg = cfg
        self.sampling = Sampling(cfg.temperature, cfg.top_k, cfg.top_p)
        self.keep_state: dict | None = None

    def generate(self, engine, prompt_ids, max_new_tokens, *, eos_id=None):
        drafter = LookupDrafter(self.cfg.max_ngram, self.cfg.min_ngram)
        out = speculate(engine, prompt_ids, max_new_tokens, eos_id=eos_id, drafter=drafter, sampling=self.sampling,
                        seed=self.cfg.seed, controller=FixedCandidates(self.cfg.num_candidates),
                        path=resolve_fast_path(self.cfg.fast_path, engine), keep_state=self.keep_state)
        out.counters["num_candidates"] = float(self.cfg.num_candidates)
        return out
