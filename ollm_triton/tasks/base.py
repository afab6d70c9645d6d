"""The evaluation-task interface and what the runner hands every task."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ollm_triton.timing import Timer, synchronize  # noqa: F401  (tasks time their regions with it)


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
