"""The layer-prefetch policy interface: where decoder-layer weights live and when they move.

The engine calls `setup(model, device)` once after loading, then `before_layer(i)` / `after_layer(i)` around
every decoder layer of every forward. A policy guarantees that layer i's parameters are on `device` when
`before_layer(i)` returns.
"""

from __future__ import annotations

import torch


class PrefetchPolicy:
    """Base class of prefetch policies; `plugin_name` is set by the registry."""

    plugin_name = "base"

    def setup(self, model: torch.nn.Module, device: torch.device) -> None:
        raise NotImplementedError

    def before_layer(self, index: int) -> None:
        pass

    def after_layer(self, index: int) -> None:
        pass

    def stats(self) -> dict[str, float]:
        return {}
