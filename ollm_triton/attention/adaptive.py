"""`adaptive`: picks flash, sliding_window or sparse per call from the sequence length and free device memory.

The rule (`choose_attention_mechanism`), with S the keys of the call and M the free memory of the tensors' device:
    S <  short_seq_threshold                   -> flash           (exact; a sparse schedule would skip ~nothing)
    S <= long_seq_threshold, M >= low_memory   -> flash           (exact attention is still affordable)
    S >  long_seq_threshold, M >= low_memory   -> sparse          (bigbird: local + global + random blocks)
    otherwise (M < low_memory_gb)              -> sliding_window  (sinks + window: a bounded working set)
Every call records what ran and why; `describe()` reports the last choice and how often each mechanism ran.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass

import torch

from ollm_triton.attention.base import AttentionBackend, DecodeSchedule
from ollm_triton.attention.flash import Flash
from ollm_triton.attention.sliding_window import SlidingWindow, SlidingWindowConfig
from ollm_triton.attention.sparse import Sparse, SparseConfig
from ollm_triton.registry import register


def choose_attention_mechanism(
    seq_len: int, available_memory_gb: float, *, short_seq_threshold: int = 512, long_seq_threshold: int = 4096,
    low_memory_gb: float = 4.0,
) -> str:
    """The mechanism for a call over `seq_len` keys with `available_memory_gb` free: flash | sparse |
    sliding_window (the rule is in this module's docstring)."""
    return _choose(seq_len, available_memory_gb, short_seq_threshold, long_seq_threshold, low_memory_gb)[0]


def _choose(seq_len, mem_gb, short, long, low) -> tuple[str, str]:
    if seq_len < short:
        return "flash", f"seq_len {seq_len} < short_seq_threshold {short}"
    if mem_gb < low:
        return "sliding_window", f"free memory {mem_gb:.1f} GB < low_memory_gb {low}"
    if seq_len <= long:
        return "flash", f"seq_len {seq_len} <= long_seq_threshold {long} and free memory {mem_gb:.1f} GB"
    return "sparse", f"seq_len {seq_len} > long_seq_threshold {long} and free memory {mem_gb:.1f} GB"


def available_memory_gb(device: torch.device) -> float:
    """Free memory of a CUDA device, or available host memory for CPU tensors, in GB."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0] / 1e9
    try:
        import psutil

        return psutil.virtual_memory().available / 1e9
    except ImportError:  # psutil is a dependency, but a bare environment should still run
        import os

        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 1e9


@dataclass
class AdaptiveConfig:
    short_seq_threshold: int = 512
    long_seq_threshold: int = 4096
    low_memory_gb: float = 4.0  # below this much free memory, use the bounded sliding window
    window: int = 4096  # sliding_window's window and sink
    sink: int = 4
    sparse_pattern: str = "bigbird"  # sparse's pattern, block size and density
    sparse_block_size: int = 128
    sparse_density: float = 0.25

    def check(self) -> None:
        if not 0 < self.short_seq_threshold <= self.long_seq_threshold:
            raise ValueError(f"need 0 < short_seq_threshold <= long_seq_threshold, got "
                             f"{self.short_seq_threshold} and {self.long_seq_threshold}")
        SlidingWindowConfig(self.window, self.sink).check()
        SparseConfig(self.sparse_pattern, self.sparse_block_size, self.sparse_density).check()


@register("attention", "adaptive", AdaptiveConfig)
class Adaptive(AttentionBackend):
    """Picks flash, sliding_window or sparse per call from sequence length and free memory; records which and why."""

    MEMORY_TTL_S = 0.5  # free memory is read at most this often (it is asked for every layer of every step)

    def __init__(self, cfg: AdaptiveConfig | None = None):
        self.cfg = cfg = cfg or AdaptiveConfig()
        self.backends = {
            "flash": Flash(),
            "sliding_window": SlidingWindow(SlidingWindowConfig(cfg.window, cfg.sink)),
            "sparse": Sparse(SparseConfig(cfg.sparse_pattern, cfg.sparse_block_size, cfg.sparse_density)),
        }
        self.choice, self.reason, self.last_path = "none", "not called yet", "none"
        self.counts: Counter[str] = Counter()
        self._memory = (-1.0, 0.0, "")  # (read at, GB, device)

    def _memory_gb(self, device: torch.device) -> float:
        at, gb, dev = self._memory
        now = time.monotonic()
        if dev != str(device) or now - at > self.MEMORY_TTL_S:
            gb = available_memory_gb(device)
            self._memory = (now, gb, str(device))
        return gb

    def pick(self, seq_len: int, device: torch.device) -> AttentionBackend:
        c = self.cfg
        self.choice, self.reason = _choose(seq_len, self._memory_gb(device), c.short_seq_threshold,
                                           c.long_seq_threshold, c.low_memory_gb)
        self.counts[self.choice] += 1
        return self.backends[self.choice]

    def prefill_mask_bytes(self, q_len: int, kv_len: int, element_size: int, device: torch.device) -> int:
        return max(b.prefill_mask_bytes(q_len, kv_len, element_size, device) for b in self.backends.values())

    def prefill(self, q, k, v, *, q_offset, tree_mask=None):
        backend = self.pick(k.shape[2], q.device)
        out = backend.prefill(q, k, v, q_offset=q_offset, tree_mask=tree_mask)
        self.last_path = f"{self.choice}:{backend.last_path}"
        return out

    def decode(self, q, layer_cache, *, tree_mask=None):
        backend = self.pick(layer_cache.length, q.device)
        out = backend.decode(q, layer_cache, tree_mask=tree_mask)
        self.last_path = f"{self.choice}:{backend.last_path}"
        return out

    def decode_schedule(self, kv_len: int, block_k: int, *, num_queries: int = 1, device=None) -> DecodeSchedule:
        # A fused codec kernel asks while decode() runs: answer for the mechanism chosen for this call.
        backend = self.backends.get(self.choice) or self.backends["flash"]
        return backend.decode_schedule(kv_len, block_k, num_queries=num_queries, device=device)

    def visible_fraction(self, q_len: int, kv_len: int, q_offset: int) -> float:
        # the mechanism chosen for the last call (tasks ask right after the calls they report on)
        backend = self.backends.get(self.choice) or self.backends["flash"]
        return backend.visible_fraction(q_len, kv_len, q_offset)

    def describe(self) -> dict:
        return {
            "attention_path": self.last_path,
            "attention_choice": self.choice,
            "attention_reason": self.reason,
            "attention_choices": dict(self.counts),
            **{f"attention_{k}": getattr(self.cfg, k) for k in self.cfg.__dataclass_fields__},
        }
