"""`adaptive`: draft-model speculation whose number of drafts follows the measured acceptance and step costs.

With per-draft acceptance probability a, k drafts yield E(k) = (1 - a^(k+1)) / (1 - a) tokens per target forward
(the accepted prefix plus the target's own token), and an iteration costs C(k) = V(k) + k * D: V(k) the verify
forward plus the loop's bookkeeping, D one draft forward. The controller keeps
- a: accepted / tested drafts with exponential forgetting (`decay` per iteration) and a Beta(1, 1) prior; a
  rejection at draft i means i acceptances and one failure, drafts after it were never tested;
- D: moving average of the draft phase's time per draft (device-event timed on CUDA);
- V(k): moving average of the rest of the iteration's wall time, per k; an untried k borrows the nearest tried one,
  extrapolated by the slope between tried ones (0 until two have been tried, which makes it try larger k);
and after `warmup` iterations moves to the k in [min_candidates, max_candidates] that maximises E(k) / C(k) when
that beats the current k by more than `hysteresis`. Every change is recorded (counters and `history`).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from ollm_triton.decoding.base import DecoderStrategy
from ollm_triton.decoding.drafters import DraftEngineHolder, model_drafter
from ollm_triton.decoding.speculation import Sampling, speculate
from ollm_triton.decoding.static_steps import resolve_fast_path
from ollm_triton.decoding.strategy_fields import SamplingStrategyFields
from ollm_triton.registry import register

MAX_RECORDED_CHANGES = 16  # per generate call in the counters; `history` keeps them all


@dataclass
class AdaptiveConfig(SamplingStrategyFields):
    draft: str = "embedded:tiny-llama-draft"  # embedded:NAME | checkpoint dir | random:<json|conf/model preset>
    initial_candidates: int = 4
    min_candidates: int = 1
    max_candidates: int = 12
    decay: float = 0.95  # per-iteration forgetting of the acceptance and cost estimates
    warmup: int = 4  # iterations observed before the first change
    hysteresis: float = 0.05  # switch only for a predicted gain above 5% (noise in timings would otherwise flap)
    persist: bool = True  # keep the estimates across generate calls on the same engine (a warm-up call teaches them)

    def check(self) -> None:
        if not 1 <= self.min_candidates <= self.initial_candidates <= self.max_candidates <= 64:
            raise ValueError("need 1 <= min_candidates <= initial_candidates <= max_candidates <= 64, got "
                             f"{self.min_candidates}, {self.initial_candidates}, {self.max_candidates}")
        if not 0 < self.decay <= 1:
            raise ValueError(f"decay must be in (0, 1], got {self.decay}")
        if self.warmup < 0 or self.hysteresis < 0:
            raise ValueError(f"warmup and hysteresis must be >= 0, got {self.warmup}, {self.hysteresis}")
        super().check()


def expected_tokens(alpha: float, k: int) -> float:
    """Tokens per target forward with k drafts each accepted with probability alpha (independently)."""
    if alpha >= 1.0:
        return k + 1.0
    return (1.0 - alpha ** (k + 1)) / (1.0 - alpha)


class CandidateController:
    """Chooses the number of drafts per iteration (see the module docstring)."""

    needs_timing = True

    def __init__(self, cfg: AdaptiveConfig):
        self.cfg = cfg
        self.k = cfg.initial_candidates
        self.max_candidates = cfg.max_candidates
        self.accepted = 0.0
        self.tested = 0.0
        self.draft_step: float | None = None
        self.verify: dict[int, float] = {}
        self.iterations = 0
        self.history: list[dict[str, float]] = []
        self.begin_call()

    def begin_call(self) -> None:
        self.call_changes: list[dict[str, float]] = []
        self.used: Counter[int] = Counter()

    @property
    def alpha(self) -> float:
        return (self.accepted + 1.0) / (self.tested + 2.0)

    def candidates(self) -> int:
        self.used[self.k] += 1
        return self.k

    def observe(self, drafted: int, accepted: int, draft_s: float, iteration_s: float, emitted: int) -> None:
        g = self.cfg.decay
        self.accepted = g * self.accepted + accepted
        self.tested = g * self.tested + accepted + (1 if accepted < drafted else 0)
        if drafted > 0:
            self.draft_step = _ema(self.draft_step, draft_s / drafted, g)
        self.verify[drafted] = _ema(self.verify.get(drafted), max(iteration_s - draft_s, 0.0), g)
        self.iterations += 1
        if self.iterations >= self.cfg.warmup:
            self._replan(emitted)

    def verify_cost(self, k: int) -> float:
        if k in self.verify:
            return self.verify[k]
        tried = sorted(self.verify)
        nearest = min(tried, key=lambda t: (abs(t - k), t))
        slope = 0.0
        if len(tried) >= 2:
            lo, hi = tried[0], tried[-1]
            slope = max(0.0, (self.verify[hi] - self.verify[lo]) / (hi - lo))
        return self.verify[nearest] + slope * (k - nearest)

    def rate(self, k: int) -> float:
        """Predicted tokens per second with k drafts."""
        cost = self.verify_cost(k) + k * (self.draft_step or 0.0)
        return expected_tokens(self.alpha, k) / max(cost, 1e-12)

    def _replan(self, emitted: int) -> None:
        if self.draft_step is None or not self.verify:
            return
        rates = {k: self.rate(k) for k in range(self.cfg.min_candidates, self.cfg.max_candidates + 1)}
        best = max(rates, key=rates.get)
        if best != self.k and rates[best] > rates[self.k] * (1.0 + self.cfg.hysteresis):
            change = {"iteration": float(self.iterations), "emitted": float(emitted), "from": float(self.k),
                      "to": float(best), "alpha": self.alpha, "draft_step_s": self.draft_step,
                      "verify_s": self.verify_cost(best), "predicted_gain": rates[best] / rates[self.k] - 1.0}
            self.history.append(change)
            self.call_changes.append(change)
            self.k = best

    def counters(self) -> dict[str, float]:
        total = sum(self.used.values())
        out = {
            "candidates_final": int(self.k),
            "candidates_mean": sum(k * c for k, c in self.used.items()) / total if total else float(self.k),
            "candidates_changes": int(len(self.call_changes)),
            "alpha_estimate": self.alpha,
        }
        for i, change in enumerate(self.call_changes[:MAX_RECORDED_CHANGES]):
            out[f"candidates_change_{i}_to"] = change["to"]
            out[f"candidates_change_{i}_at_token"] = change["emitted"]
        return out


def _ema(old: float | None, new: float, decay: float) -> float:
    return new if old is None else decay * old + (1.0 - decay) * new


@register("decoder", "adaptive", AdaptiveConfig)
class Adaptive(DecoderStrategy):
    """Speculative decoding that tunes its number of drafts online from acceptance and measured step costs."""

    def __init__(self, cfg: AdaptiveConfig, *, draft_engine=None):
        self.cfg = cfg
        self.draft = DraftEngineHolder(cfg.draft, draft_engine)
        self.sampling = Sampling(cfg.temperature, cfg.top_k, cfg.top_p)
        self.controller: CandidateController | None = None
        self._engine_key = None
        self.keep_state: dict | None = None

    def generate(self, engine, prompt_ids, max_new_tokens, *, eos_id=None):
        key = (id(engine), str(engine.device), engine.dtype)
        if self.controller is None or not self.cfg.persist or key != self._engine_key:
            self.controller = CandidateController(self.cfg)
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
