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
    repeats: int = 3  # timed repetitions after one warm-up; the run with the median decode time is reported

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
        prompt_len, new_tokens = (
            (min(c.prompt_len, 32), min(c.new_tokens, 4)) if ctx.smoke else (c.prompt_len, c.new_tokens)
        )
        gen = torch.Generator().manual_seed(ctx.seed)
        prompt = torch.randint(0, engine.config.vocab_size, (c.batch, prompt_len), generator=gen).to(device)

        # warm-up: kernels compile / autotune and allocator pools fill outside the timed region
        ctx.decoder.generate(engine, prompt, 2)

        runs = []
        for _ in range(1 if ctx.smoke else c.repeats):
            with Timer(device) as total:
                out = ctx.decoder.generate(engine, prompt, new_tokens)
            runs.append((out.counters["decode_s"], total.seconds, out))
        runs.sort(key=lambda r: r[0])
        decode_s, total_s, out = runs[len(runs) // 2]  # the median run by decode time
        produced = out.tokens.shape[1]
        prefill_s = out.counters["prefill_s"]
        # the first token comes from the prefill's logits; decode_s covers the produced - 1 steps after it
        return {
            "prompt_len": float(prompt_len),
            "new_tokens": float(produced),
            "batch": float(c.batch),
            "prefill_s": prefill_s,
            "prefill_tok_s": c.batch * prompt_len / prefill_s,
            "ttft_s": prefill_s,
            "decode_s": decode_s,
            "decode_tok_s": c.batch * (produced - 1) / decode_s,
            "e2e_tok_s": c.batch * produced / total_s,
            **{f"decoder_{k}": float(v) for k, v in out.counters.items() if k not in ("prefill_s", "decode_s")},
        }
