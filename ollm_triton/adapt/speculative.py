"""`+adapt=speculative`: the number of drafts per speculative iteration follows measured acceptance and step costs,
down to 0 (speculation off) when drafting does not pay.

With per-draft acceptance probability a, k drafts yield E(k) = (1 - a^(k+1)) / (1 - a) tokens per target forward
(the accepted prefix plus the target's own token), and an iteration costs C(k) = V(k) + k * D: V(k) the verify
forward plus the loop's bookkeeping, D one draft forward. The controller keeps
- a: accepted / tested drafts with exponential forgetting (`decay` per iteration) and a Beta(1, 1) prior; a
  rejection at draft i means i acceptances and one failure, drafts after it were never tested;
- D: moving average of the draft phase's time per draft (device-event timed on CUDA);
- V(k): moving average of the rest of the iteration's wall time, per k; an untried k borrows the nearest tried one,
  extrapolated by the slope between tried ones (0 until two have been tried, which makes it try larger k); k = 0
  (speculation off) borrows nothing: until measured it is tried once, because plain steps run in bursts with one
  sync and cost much less than any verify iteration would suggest (decoding README, "Speculation off on the GPU");
and after `warmup` iterations moves to the k in [min_candidates, max_candidates] that maximises E(k) / C(k) when
that beats the current k by more than `hysteresis`. At k = 0 (off) nothing is tested, so the estimates decay
towards the prior (a = 1/2) and drafting is tried again once that predicts a gain.

`DraftLengthController` is the one implementation: the `adaptive` decoder builds it for itself, and
`+adapt=speculative` hands the run's controller to that decoder (`use_controller`), so its moves are the
adapter's decisions with their callbacks. It is driven by the speculative loop (decoding/speculation.py:
`candidates()` before an iteration, `observe(...)` after), not by the step clock.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

from ollm_triton.adapt.base import Adapter, AdaptParams, Signals, Strategy
from ollm_triton.registry import register

MAX_RECORDED_CHANGES = 16  # per generate call in the counters; `history` keeps them all


@dataclass
class DraftLengthParams:
    initial_candidates: int = 4
    min_candidates: int = 0  # 0: speculation off where drafting does not pay (plain steps, decoding/speculation.py)
    max_candidates: int = 12
    decay: float = 0.95  # per-iteration forgetting of the acceptance and cost estimates
    warmup: int = 4  # iterations observed before the first change
    hysteresis: float = 0.05  # switch only for a predicted gain above 5% (noise in timings would otherwise flap)

    def check(self) -> None:
        if not 0 <= self.min_candidates <= self.initial_candidates <= self.max_candidates <= 64:
            raise ValueError("need 0 <= min_candidates <= initial_candidates <= max_candidates <= 64, got "
                             f"{self.min_candidates}, {self.initial_candidates}, {self.max_candidates}")
        if not 0 < self.decay <= 1:
            raise ValueError(f"decay must be in (0, 1], got {self.decay}")
        if self.warmup < 0 or self.hysteresis < 0:
            raise ValueError(f"warmup and hysteresis must be >= 0, got {self.warmup}, {self.hysteresis}")


def expected_tokens(alpha: float, k: int) -> float:
    """Tokens per target forward with k drafts each accepted with probability alpha (independently)."""
    if alpha >= 1.0:
        return k + 1.0
    return (1.0 - alpha ** (k + 1)) / (1.0 - alpha)


class DraftLengthController(Strategy):
    """Chooses the number of drafts per iteration (see the module docstring)."""

    name = "speculative"
    needs_timing = True
    needs_clock = False  # the speculative loop drives it: the codec stays unwrapped (static verify steps stay)

    def __init__(self, cfg: DraftLengthParams, adapter: Adapter | None = None):
        super().__init__()
        self.cfg = cfg
        self.adapter = adapter  # where moves are recorded as decisions (None: only in `history`)
        self.k = cfg.initial_candidates
        self.setting = self.k
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
        """Predicted tokens per second with k drafts (infinite for k = 0 until a burst of plain steps measured it)."""
        if k == 0 and 0 not in self.verify:
            return math.inf
        cost = self.verify_cost(k) + k * (self.draft_step or 0.0)
        return expected_tokens(self.alpha, k) / max(cost, 1e-12)

    def _replan(self, emitted: int) -> None:
        if self.draft_step is None or not self.verify:
            return
        rates = {k: self.rate(k) for k in range(self.cfg.min_candidates, self.cfg.max_candidates + 1)}
        best = max(rates, key=rates.get)
        if best != self.k and rates[best] > rates[self.k] * (1.0 + self.cfg.hysteresis):
            measuring = math.isinf(rates[best])
            gain = 0.0 if measuring else rates[best] / rates[self.k] - 1.0
            change = {"iteration": float(self.iterations), "emitted": float(emitted), "from": float(self.k),
                      "to": float(best), "alpha": self.alpha, "draft_step_s": self.draft_step,
                      "verify_s": 0.0 if measuring else self.verify_cost(best), "predicted_gain": gain,
                      "measuring": float(measuring)}
            self.history.append(change)
            self.call_changes.append(change)
            if measuring:
                reason = "speculation off for one burst: the cost of a plain step is not measured yet"
            else:
                reason = (f"acceptance {self.alpha:.2f}, draft {self.draft_step * 1e3:.3g} ms, verify "
                          f"{self.verify_cost(best) * 1e3:.3g} ms: {gain:+.0%} predicted tokens/s"
                          + (" (speculation off)" if best == 0 else ""))
            if self.adapter is not None:
                self.adapter.switch(self, best, reason)
            else:
                old = self.k
                self.apply(best)
                for callback in self.callbacks:
                    callback(old, best, reason)

    def apply(self, new) -> None:
        self.k = self.setting = int(new)

    def effect(self, before: Signals, after: Signals) -> dict:
        return {"acceptance_before": before.acceptance, "acceptance_after": after.acceptance}

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

    def attach(self, run) -> str | None:
        use = getattr(run.decoder, "use_controller", None)
        if use is None:
            name = getattr(run.decoder, "plugin_name", type(run.decoder).__name__)
            return f"decoder {name} has no draft-length controller to hand over (use decoder=adaptive)"
        use(self)
        return None

    def summary(self) -> str:
        if self.inactive:
            return f"inactive: {self.inactive}"
        return f"drafts {self.k} after {self.iterations} iterations, acceptance estimate {self.alpha:.3f}"


def _ema(old: float | None, new: float, decay: float) -> float:
    return new if old is None else decay * old + (1.0 - decay) * new


@dataclass
class SpeculativeParams(AdaptParams, DraftLengthParams):
    def check(self) -> None:
        AdaptParams.check(self)
        DraftLengthParams.check(self)


@register("adapt", "speculative", SpeculativeParams)
class SpeculativeAdapter(Adapter):
    """Draft length of the adaptive decoder from acceptance and step costs, down to 0 (speculation off)."""

    def build_strategies(self, cfg):
        return [DraftLengthController(cfg, self)]
