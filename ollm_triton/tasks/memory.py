"""`memory`: peak device memory (allocated, reserved), peak host RSS, and the KV cache's own bytes.

The prompt is held-out text by default (`prompt: corpus`), so an eviction codec that scores tokens by attention
keeps what it would keep on real input; `prompt: random` gives seeded uniform tokens (a model without a tokenizer
gets them anyway, and `prompt` says so). Host peak RSS is the kernel's high-water mark `VmHWM`
(/proc/self/status), which the runner resets at each job's start (writing 5 to /proc/self/clear_refs), so a job of
a sweep reports its own peak, not the largest of the jobs before it; where /proc is missing it falls back to
ru_maxrss (the process's peak so far).
"""

from __future__ import annotations

import resource
from dataclasses import dataclass

import psutil
import torch

from ollm_triton.registry import register
from ollm_triton.tasks.base import (
    PROMPTS,
    RunContext,
    Task,
    compress_prompt,
    context_metrics,
    lossy_tokens,
    plugin_effect,
    prompt_ids,
    report_no_effect,
    synchronize,
)


@dataclass
class MemoryConfig:
    context_len: int = 2048  # tokens prefilled before measuring
    new_tokens: int = 16  # decode steps after the prefill, so decode-time buffers count too
    batch: int = 1
    prompt: str = "corpus"  # corpus (held-out text, one eval document a row) | random (seeded uniform tokens)

    def check(self) -> None:
        if self.context_len < 1 or self.new_tokens < 0 or self.batch < 1:
            raise ValueError("need context_len >= 1, new_tokens >= 0, batch >= 1")
        if self.prompt not in PROMPTS:
            raise ValueError(f"prompt must be one of {', '.join(PROMPTS)}, got {self.prompt!r}")


def host_peak_rss_bytes() -> tuple[int, str]:
    """The host peak resident set and where it comes from: VmHWM (resettable per job) or ru_maxrss."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024, "VmHWM"
    except OSError:
        pass
    # ru_maxrss is KiB on Linux, bytes on macOS: the process's peak, including everything loaded before this task
    scale = 1 if psutil.MACOS else 1024
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale), "ru_maxrss"


@register("task", "memory", MemoryConfig)
class Memory(Task):
    """Peak memory of a prefill of context_len tokens plus new_tokens decode steps, and the codec's KV bytes."""

    def __init__(self, cfg: MemoryConfig):
        self.cfg = cfg

    def _lengths(self, smoke: bool) -> tuple[int, int]:
        c = self.cfg
        return (min(c.context_len, 64), min(c.new_tokens, 2)) if smoke else (c.context_len, c.new_tokens)

    def footprint(self, smoke: bool) -> tuple[int, int]:
        context_len, new_tokens = self._lengths(smoke)
        return self.cfg.batch, context_len + new_tokens

    def run(self, ctx: RunContext) -> dict[str, float | int | str]:
        c = self.cfg
        engine, device = ctx.engine, ctx.device
        context_len, new_tokens = self._lengths(ctx.smoke)
        ids, prompt_kind = prompt_ids(engine, c.prompt, c.batch, context_len, ctx.seed)
        ids = ids.to(device)
        if ctx.context is not None:  # the scorer's weights load before the peak is reset; its activations count
            ctx.context.prepare(engine)
        if device.type == "cuda":
            synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        with ctx.timed("prompt+generated") as region:
            ids, record = compress_prompt(ctx, ids)  # a context compressor shortens the prompt the cache holds
            cache = engine.new_cache(batch=c.batch, max_len=ids.shape[1] + new_tokens)
            logits = engine.prefill(ids, cache)[:, None]  # in chunks when the run sets prefill_chunk
            for _ in range(new_tokens):
                logits = engine.forward(logits[:, -1:].argmax(-1), cache)
            region.tokens = c.batch * (context_len + new_tokens)
        peak, peak_source = host_peak_rss_bytes()
        out: dict[str, float | int | str] = {
            "prompt": prompt_kind,
            "context_len": context_len + new_tokens,
            "batch": c.batch,
            "weights_bytes": int(sum(p.numel() * p.element_size() for p in engine.model.parameters())),
            "host_peak_rss_bytes": peak,
            "host_peak_rss_source": peak_source,
            "host_rss_bytes": int(psutil.Process().memory_info().rss),
            **context_metrics([record]),
        }
        if device.type == "cuda":
            out["device_peak_allocated_bytes"] = int(torch.cuda.max_memory_allocated(device))
            out["device_peak_reserved_bytes"] = int(torch.cuda.max_memory_reserved(device))
        out.update(cache.stats())
        compressed, evicted = lossy_tokens(cache)
        effect, none = plugin_effect(engine, longest=cache.position, compressed=compressed, evicted=evicted)
        report_no_effect("memory", none)
        out["plugin_effect"] = effect
        return out
