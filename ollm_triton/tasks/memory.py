"""`memory`: peak device memory (allocated, reserved), peak host RSS, and the KV cache's own bytes."""

from __future__ import annotations

import resource
from dataclasses import dataclass

import psutil
import torch

from ollm_triton.registry import register
from ollm_triton.tasks.base import RunContext, Task, synchronize


@dataclass
class MemoryConfig:
    context_len: int = 2048  # tokens prefilled before measuring
    new_tokens: int = 16  # decode steps after the prefill, so decode-time buffers count too
    batch: int = 1

    def check(self) -> None:
        if self.context_len < 1 or self.new_tokens < 0 or self.batch < 1:
            raise ValueError("need context_len >= 1, new_tokens >= 0, batch >= 1")


@register("task", "memory", MemoryConfig)
class Memory(Task):
    """Peak memory of a prefill of context_len tokens plus new_tokens decode steps, and the codec's KV bytes."""

    def __init__(self, cfg: MemoryConfig):
        self.cfg = cfg

    def run(self, ctx: RunContext) -> dict[str, float | str]:
        c = self.cfg
        engine, device = ctx.engine, ctx.device
        context_len, new_tokens = (
            (min(c.context_len, 64), min(c.new_tokens, 2)) if ctx.smoke else (c.context_len, c.new_tokens)
        )
        if device.type == "cuda":
            synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        gen = torch.Generator().manual_seed(ctx.seed)
        ids = torch.randint(0, engine.config.vocab_size, (c.batch, context_len), generator=gen).to(device)
        cache = engine.new_cache(batch=c.batch, max_len=context_len + new_tokens)
        logits = engine.prefill(ids, cache)[:, None]  # in chunks when the run sets prefill_chunk
        for _ in range(new_tokens):
            logits = engine.forward(logits[:, -1:].argmax(-1), cache)
        synchronize(device)
        out: dict[str, float | str] = {
            "context_len": float(context_len + new_tokens),
            "weights_bytes": float(sum(p.numel() * p.element_size() for p in engine.model.parameters())),
            # ru_maxrss is KiB on Linux: the process's peak, including everything loaded before this task
            "host_peak_rss_bytes": float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024),
            "host_rss_bytes": float(psutil.Process().memory_info().rss),
        }
        if device.type == "cuda":
            out["device_peak_allocated_bytes"] = float(torch.cuda.max_memory_allocated(device))
            out["device_peak_reserved_bytes"] = float(torch.cuda.max_memory_reserved(device))
        out.update({k: float(v) for k, v in cache.stats().items()})
        return out
