"""The evaluation-task interface and what the runner hands every task."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch


class TaskRefused(Exception):
    """A task that would print a meaningless number (perplexity of random weights) refuses with the reason."""


@dataclass
class RunContext:
    """engine: the loaded Engine; decoder: the DecoderStrategy; smoke: run a tiny slice (debug=smoke);
    trained: False for random weights; cfg: the full resolved run config (a dict)."""

    engine: Any
    decoder: Any
    device: torch.device
    smoke: bool = False
    trained: bool = True
    cfg: dict = field(default_factory=dict)
    seed: int = 0


class Task:
    """Base class of evaluation tasks; `plugin_name` is set by the registry."""

    plugin_name = "base"

    def run(self, ctx: RunContext) -> dict[str, float | str]:
        raise NotImplementedError


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Timer:
    """Wall time of a region, synchronized with the device on both ends (kernels are asynchronous)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds = 0.0

    def __enter__(self):
        synchronize(self.device)
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        synchronize(self.device)
        self.seconds = time.perf_counter() - self._t0
