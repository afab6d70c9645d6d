"""`greedy` and `sample`: one target forward per new token, the baselines of every other strategy."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ollm_triton.decoding.base import DecoderStrategy, Generation
from ollm_triton.engine.generation import argmax_pick, emit_step
from ollm_triton.registry import register
from ollm_triton.timing import Timer


def decode_loop(engine, prompt_ids: torch.Tensor, max_new_tokens: int, pick, eos_id: int | None) -> Generation:
    """Prefill the prompt, then feed back one picked token per step. pick: logits [B, V] -> tokens [B].

    The prompt goes through `engine.prefill` (chunked when the engine has a `prefill_chunk`). When the engine offers
    a fast decoder (graph-captured static decode steps, engine/fast_decode.py; `engine.fast_path` says whether),
    the loop runs there with the same tokens and stopping rule; greedy's argmax then runs inside the step.
    """
    fast = engine.fast_decoder()
    if fast is not None:
        return fast.generate(prompt_ids, max_new_tokens, pick, eos_id)
    ids = prompt_ids.to(engine.device)
    batch, prompt_len = ids.shape
    cache = engine.new_cache(batch=batch, max_len=prompt_len + max_new_tokens, rollback_tokens=0)  # never truncated
    out = torch.empty(batch, max_new_tokens, dtype=torch.long, device=ids.device)
    done = torch.zeros(batch, dtype=torch.bool, device=ids.device)
    with Timer(engine.device) as prefill:
        logits = engine.prefill(ids, cache)
    n = 0
    with Timer(engine.device) as decode:
        for n in range(1, max_new_tokens + 1):
            token, finished = emit_step(out, n, pick(logits), done, eos_id)
            if n == max_new_tokens or finished:
                break
            logits = engine.forward(token[:, None], cache)[:, -1]
    counters = {
        "generated_tokens": int(n * batch),
        "target_forwards": int(n),
        "prefill_s": prefill.seconds,
        "decode_s": decode.seconds,
    }
    return Generation(out[:, :n], counters)


@register("decoder", "greedy")
class Greedy(DecoderStrategy):
    """Argmax of the target's logits, one forward per token."""

    forward_only = True

    def __init__(self, cfg=None):
        self.cfg = cfg

    def generate(self, engine, prompt_ids, max_new_tokens, *, eos_id=None):
        return decode_loop(engine, prompt_ids, max_new_tokens, argmax_pick, eos_id)


@dataclass
class SampleConfig:
    temperature: float = 1.0
    top_k: int = 0  # 0 = no top-k filter
    top_p: float = 1.0  # 1.0 = no nucleus filter
    seed: int = 0

    def check(self) -> None:
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0 (use decoder=greedy for argmax), got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


def sampling_probs(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """logits [..., V] -> the filtered, renormalised distribution sampling draws from (float32)."""
    logits = logits.float() / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        # keep the smallest prefix whose mass reaches top_p (the token that crosses it is kept)
        drop = sorted_p.cumsum(-1) - sorted_p >= top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


@register("decoder", "sample", SampleConfig)
class Sample(DecoderStrategy):
    """Seeded sampling with temperature, top-k and top-p."""

    forward_only = True

    def __init__(self, cfg: SampleConfig):
        self.cfg = cfg

    def generate(self, engine, prompt_ids, max_new_tokens, *, eos_id=None):
        c = self.cfg
        gen = torch.Generator(device=engine.device).manual_seed(c.seed)

        def pick(logits):
            probs = sampling_probs(logits, c.temperature, c.top_k, c.top_p)
            return torch.multinomial(probs, 1, generator=gen)[:, 0]

        return decode_loop(engine, prompt_ids, max_new_tokens, pick, eos_id)
