"""The layer-prefetch policy interface: where decoder-layer weights live and when they move.

The engine calls `setup(model, device)` once after loading, then `before_layer(i)` / `after_layer(i)` around
every decoder layer of every forward. A policy guarantees that layer i's parameters are on `device` when
`before_layer(i)` returns.

What the engine reads, declared here and never inferred from a policy's name:
    resident_weights    every parameter stays at one address on the device between forwards, so a decode step may
                        be captured as a CUDA graph (which replays those addresses)
    weights_device(d)   where the weights are materialised before `setup` (a streaming policy keeps them on the
                        host); default: the compute device
    device_weight_bytes(total, layer_bytes=, num_layers=, head_bytes=)  the weight bytes this policy holds on the
                        device at once, for the run's memory check before building a model; default: all of them
"""

from __future__ import annotations

import torch


class PrefetchPolicy:
    """Base class of prefetch policies; `plugin_name` is set by the registry."""

    plugin_name = "base"
    resident_weights: bool = False

    def weights_device(self, device: torch.device) -> torch.device:
        return device

    def device_weight_bytes(self, total_bytes: int, layer_bytes: int | None = None, num_layers: int | None = None,
                            head_bytes: int = 0) -> float:
        """Weight bytes on the device at once, given the model's total (and, for policies that stream layers, one
        decoder layer's bytes, the layer count and the embeddings/head bytes)."""
        return float(total_bytes)

    def setup(self, model: torch.nn.Module, device: torch.device) -> None:
        raise NotImplementedError

    def before_layer(self, index: int) -> None:
        pass

    def after_layer(self, index: int) -> None:
        pass

    def stats(self) -> dict[str, float]:
        return {}
