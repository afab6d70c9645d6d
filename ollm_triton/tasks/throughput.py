"""`throughput`: prefill tok/s, decode tok/s and time to first token, from device-synchronized timers."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ollm_triton.registry import register
from ollm_triton.tasks.base import RunContext, Task, Timer


@dataclass
class ThroughputConfig:
    prompt_len: int = 512
    new_tokens: int = 64
    batch: int = 1
    repeats: int = 1  # timed repetitions after one warm-up; the median is reported

    def check(self) -> None:
        if self.prompt_len < 1 or self.new_tokens < 2 or self.batch < 1 or self.repeats < 1:
            raise ValueError("need prompt_len >= 1, new_tokens >= 2, batch >= 1, repeats >= 1")


@register("task", "throughput", ThroughputConfig)
class Throughput(Task):
    """Prefill and decode speed of the run's decoder strategy on a seeded random prompt, after a warm-up."""

    def __init__(self, cfg: ThroughputConfig):
        self.cfg = cfg

    def run(self, ctx: RunContext) -> dict[str, float | str]:
        c = self.cfg
        engine, device = ctx.engine, ctx.device
        prompt_len, new_tokens = (min(c.prompt_len, 32), min(c.new_tokens, 4)) if ctx.smoke else (c.prompt_len, c.new_tokens)
        gen = torch.Generator().manual_seed(ctx.seed)
        prompt = torch.randint(0, engine.config.vocab_size, (c.batch, prompt_len), generator=gen).to(device)

        def prefill() -> None:
            cache = engine.new_cache(batch=c.batch, max_len=prompt_len + new_tokens)
            engine.forward(prompt, cache)

        # warm-up: kernels compile / autotune and allocator pools fill outside the timed region
        prefill()
        ctx.decoder.generate(engine, prompt, 2)

        prefill_s, total_s, produced = [], [], 0
        for _ in range(c.repeats):
            with Timer(device) as t:
                prefill()
            prefill_s.append(t.seconds)
            with Timer(device) as t:
                out = ctx.decoder.generate(engine, prompt, new_tokens)
            total_s.append(t.seconds)
            produced = out.tokens.shape[1]
        p, total = _median(prefill_s), _median(total_s)
        # generate() = prefill + (produced - 1) decode steps after the first token; the prefill measured alone is
        # subtracted, so strategy overheads (drafting, verification) count as decode time.
        decode_s = max(total - p, 1e-9)
        return {
            "prompt_len": float(prompt_len),
            "new_tokens": float(produced),
            "batch": float(c.batch),
            "prefill_s": p,
            "prefill_tok_s": c.batch * prompt_len / p,
            "ttft_s": p,
            "decode_tok_s": c.batch * (produced - 1) / decode_s,
            "e2e_tok_s": c.batch * produced / total,
            "generate_s": total,
        }


def _median(xs: list[float]) -> float:
    xs = sorted(xs)
    return xs[len(xs) // 2]
