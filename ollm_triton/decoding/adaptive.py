"""`adaptive`: draft-model speculation whose number of drafts follows the measured acceptance and step costs.

The controller is the adaptation layer's draft-length strategy (adapt/speculative.py: the model of tokens per
forward against measured draft and verify costs, its warm-up and hysteresis, every change recorded in counters and
`history`). This decoder builds one for itself; under `+adapt=speculative` the run's adapter hands over its own
(`use_controller`), so the moves become the adapter's decisions. Both may go down to 0 drafts (`min_candidates`):
speculation off while drafting does not pay, plain target steps in bursts (decoding/speculation.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from ollm_triton.adapt.speculative import (
    DraftLengthController,
    DraftLengthParams,
    expected_tokens,  # noqa: F401  (imported from here by tests and scripts)
)
from ollm_triton.decoding.base import DecoderStrategy
from ollm_triton.decoding.drafters import DraftEngineHolder, model_drafter
from ollm_triton.decoding.speculation import Sampling, speculate
from ollm_triton.decoding.static_steps import resolve_fast_path
from ollm_triton.decoding.strategy_fields import SamplingStrategyFields
from ollm_triton.registry import register

CandidateController = DraftLengthController  # the name this module gave the controller before it moved


@dataclass
class AdaptiveConfig(SamplingStrategyFields, DraftLengthParams):
    draft: str = "embedded:tiny-llama-draft"  # embedded:NAME | checkpoint dir | random:<json|conf/model preset>
    persist: bool = True  # keep the estimates across generate calls on the same engine (a warm-up call teaches them)

    def check(self) -> None:
        DraftLengthParams.check(self)
        SamplingStrategyFields.check(self)


@register("decoder", "adaptive", AdaptiveConfig)
class Adaptive(DecoderStrategy):
    """Speculative decoding that tunes its number of drafts online from acceptance and measured step costs."""

    def __init__(self, cfg: AdaptiveConfig, *, draft_engine=None):
        self.cfg = cfg
        self.draft = DraftEngineHolder(cfg.draft, draft_engine)
        self.sampling = Sampling(cfg.temperature, cfg.top_k, cfg.top_p)
        self.controller: DraftLengthController | None = None
        self._engine_key = None
        self._handed: DraftLengthController | None = None  # the run adapter's controller (use_controller)
        self.keep_state: dict | None = None

    def use_controller(self, controller: DraftLengthController) -> None:
        """Take the run adapter's draft-length controller (adapt/speculative.py) instead of building one."""
        self._handed = self.controller = controller

    def generate(self, engine, prompt_ids, max_new_tokens, *, eos_id=None):
        key = (id(engine), str(engine.device), engine.dtype)
        if self._handed is not None:
            self.controller = self._handed
        elif self.controller is None or not self.cfg.persist or key != self._engine_key:
            self.controller = DraftLengthController(self.cfg)
            self._engine_key = key
        self.controller.begin_call()
        path = resolve_fast_path(self.cfg.fast_path, engine)
        drafter = model_drafter(self.draft.get(engine), engine.config.vocab_size, self.sampling, path)
        out = speculate(engine, prompt_ids, max_new_tokens, eos_id=eos_id, drafter=drafter, sampling=self.sampling,
                        seed=self.cfg.seed, controller=self.controller, path=path, keep_state=self.keep_state)
        out.counters.update(self.controller.counters())
        return out

    @property
    def history(self) -> list[dict[str, float]]:
        """Every change of the number of drafts since the estimates were last reset."""
        return self.controller.history if self.controller else []

    def close(self) -> None:
        self.draft.close()
