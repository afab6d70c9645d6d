"""`throughput`: prefill tok/s, decode tok/s and time to first token, from device-synchronized timers.

The prompt is held-out text by default (`prompt: corpus`, the documents the decoding study prompts with), so a
speculative decoder's acceptance, and with it its speed, is what it would be on real input: on random tokens every
draft is rejected and every speculative decoder looks slower than greedy. `prompt: random` gives seeded uniform
tokens; a model without a tokenizer gets them anyway, and `prompt` in metrics says so.
"""

from __future__ import annotations

from dataclasses import dataclass

from ollm_triton.registry import register
from ollm_triton.tasks.base import (
    PROMPTS,
    CacheWatch,
    RunContext,
    Task,
    Timer,
    compress_prompt,
    context_metrics,
    plugin_effect,
    prompt_ids,
    report_no_effect,
)


@dataclass
class ThroughputConfig:
    prompt_len: int = 512
    new_tokens: int = 64
    batch: int = 1
    repeats: int = 3  # timed repetitions after one warm-up; the run with the median decode time is reported
    prompt: str = "corpus"  # corpus (held-out text, one eval document a row) | random (seeded uniform tokens)

    def check(self) -> None:
        if self.prompt_len < 1 or self.new_tokens < 2 or self.batch < 1 or self.repeats < 1:
            raise ValueError("need prompt_len >= 1, new_tokens >= 2, batch >= 1, repeats >= 1")
        if self.prompt not in PROMPTS:
            raise ValueError(f"prompt must be one of {', '.join(PROMPTS)}, got {self.prompt!r}")


@register("task", "throughput", ThroughputConfig)
class Throughput(Task):
    """Prefill and decode speed of the run's decoder strategy on a held-out (or seeded random) prompt, after a
    warm-up."""

    def __init__(self, cfg: ThroughputConfig):
        self.cfg = cfg

    def _lengths(self, smoke: bool) -> tuple[int, int]:
        c = self.cfg
        return (min(c.prompt_len, 32), min(c.new_tokens, 4)) if smoke else (c.prompt_len, c.new_tokens)

    def footprint(self, smoke: bool) -> tuple[int, int]:
        prompt_len, new_tokens = self._lengths(smoke)
        return self.cfg.batch, prompt_len + new_tokens + 16  # + a speculative verify block

    def run(self, ctx: RunContext) -> dict[str, float | int | str]:
        c = self.cfg
        engine, device = ctx.engine, ctx.device
        prompt_len, new_tokens = self._lengths(ctx.smoke)
        prompt, prompt_kind = prompt_ids(engine, c.prompt, c.batch, prompt_len, ctx.seed)
        prompt = prompt.to(device)
        # A context compressor shortens the prompt once (its scorer loaded before, outside the timing); its time is
        # part of the time to first token.
        record = None
        if ctx.context is not None:
            ctx.context.prepare(engine)
            with Timer(device) as shorten:
                prompt, record = compress_prompt(ctx, prompt)
        context_s = shorten.seconds if record is not None else 0.0
        held_len = int(prompt.shape[1])

        # warm-up as long as a timed run: kernels compile / autotune, allocator pools fill, and every graph the
        # timed run replays is captured outside it (a 2-token warm-up left the piecewise step's later captures in
        # the one timed run of repeats=1: snapkv at 8k read 18.8 tok/s there against 150.3 as a median of 3)
        ctx.decoder.generate(engine, prompt, new_tokens)

        runs = []
        with CacheWatch(engine) as watch, ctx.timed("generated") as region:  # the monitor's region: the repeats
            for _ in range(1 if ctx.smoke else c.repeats):
                with Timer(device) as total:
                    out = ctx.decoder.generate(engine, prompt, new_tokens)
                runs.append((out.counters["decode_s"], total.seconds, out))
                watch.settle()  # this run's cache read and released: one cache alive at a time, as the footprint counts
                region.tokens += int(out.tokens.numel())
        runs.sort(key=lambda r: r[0])
        decode_s, total_s, out = runs[len(runs) // 2]  # the median run by decode time
        produced = int(out.tokens.shape[1])
        prefill_s = out.counters["prefill_s"]
        longest = held_len + produced
        compressed, evicted = watch.lossy()
        effect, none = plugin_effect(engine, longest=longest,
                                     masked=1 - engine.attention.visible_fraction(produced, longest, held_len),
                                     compressed=compressed, evicted=evicted)
        report_no_effect("throughput", none)
        # the first token comes from the prefill's logits; decode_s covers the produced - 1 steps after it
        return {
            "prompt": prompt_kind,
            "prompt_len": prompt_len,
            "new_tokens": produced,
            "batch": c.batch,
            "prefill_s": prefill_s,
            "prefill_tok_s": c.batch * held_len / prefill_s,  # tokens prefilled (after any context compressor)
            "ttft_s": prefill_s + context_s,
            **({**context_metrics([record]), "context_s": context_s, "prompt_len_prefilled": held_len}
               if record is not None else {}),
            "decode_s": decode_s,
            "decode_tok_s": c.batch * (produced - 1) / decode_s,
            "e2e_tok_s": c.batch * produced / total_s,
            "plugin_effect": effect,
            **{f"decoder_{k}": _number(k, v) for k, v in out.counters.items() if k not in ("prefill_s", "decode_s")},
        }


_COUNT_WORDS = ("forwards", "tokens", "iterations", "num_", "layers", "changes", "emitted", "steps", "calls")


def _number(name: str, v):
    """Decoder counters as recorded: whole counts (forwards, tokens, candidates) as integers, the rest as floats."""
    if isinstance(v, bool):
        return int(v)
    if isinstance(v, int):
        return v
    f = float(v)
    is_count = any(w in name for w in _COUNT_WORDS) and not name.endswith(("_s", "_per_token", "_rate"))
    return int(f) if is_count and f.is_integer() else f
