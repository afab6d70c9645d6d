"""`sparse`: block-sparse causal attention (local, strided, seeded random, bigbird) on the block-schedule kernels."""

from __future__ import annotations

from dataclasses import dataclass

from ollm_triton.attention.scheduled import ScheduledAttention
from ollm_triton.kernels.attention_schedule import SparsePattern
from ollm_triton.registry import register

PATTERNS = ("local", "strided", "random", "bigbird")


@dataclass
class SparseConfig:
    pattern: str = "bigbird"  # local | strided | random | bigbird
    block_size: int = 128  # tokens per pattern block (a power of two, 16..1024)
    density: float = 0.25  # fraction of the causal block triangle visited (local, random, bigbird)
    stride: int = 0  # strided: every stride-th block back (0 = round(1 / density))
    num_global: int = 1  # leading key blocks every query sees (global tokens)
    seed: int = 0  # random and bigbird blocks

    def check(self) -> None:
        if self.pattern not in PATTERNS:
            raise ValueError(f"pattern must be one of {', '.join(PATTERNS)}, got {self.pattern!r}")
        if self.block_size < 16 or self.block_size > 1024 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two in 16..1024, got {self.block_size}")
        if not 0 < self.density <= 1:
            raise ValueError(f"density must be in (0, 1], got {self.density}")
        if self.stride < 0 or self.num_global < 0:
            raise ValueError(f"stride and num_global must be >= 0, got {self.stride} and {self.num_global}")


@register("attention", "sparse", SparseConfig)
class Sparse(ScheduledAttention):
    """Block-sparse attention: local, strided, seeded random or bigbird (local + global + random) block patterns."""

    def __init__(self, cfg: SparseConfig | None = None):
        cfg = cfg or SparseConfig()
        super().__init__(cfg)
        self.pattern = SparsePattern(kind=cfg.pattern, block_size=cfg.block_size, density=cfg.density,
                                     stride=cfg.stride, num_global=cfg.num_global, seed=cfg.seed)
