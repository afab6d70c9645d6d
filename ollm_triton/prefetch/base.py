"""The layer-prefetch policy interface: where decoder-layer weights live and when they move.

The engine calls `setup(model, device)` once after loading, then `before_layer(i)` / `after_layer(i)` around
every decoder layer of every forward. A policy guarantees that layer i's parameters are on `device` when
`before_layer(i)` returns (one acting on experts: the routed experts by the time its `run_experts` computes them).

What the engine reads, declared here and never inferred from a policy's name:
    resident_weights    every parameter stays at one address on the device between forwards, so a decode step may
                        be captured as a CUDA graph (which replays those addresses)
    weights_device(d)   where the weights are materialised before `setup` (a streaming policy keeps them on the
                        host); default: the compute device
    keep_weight(model, name, value, d)  the tensor the model keeps for parameter `name` as the loader creates it
                        (drawn or read, one at a time, before `setup`); default: `value` on weights_device(d). A policy
                        may store it its own way (compressed on the host) and return a placeholder that `setup` binds
    host_weight_bytes(d, total, expert_bytes=, element_size=)  the weight bytes this policy keeps in host memory,
                        for the run's memory check; default: all of them when weights_device(d) is the host, else 0
    device_weight_bytes(total, layer_bytes=, num_layers=, head_bytes=, expert_bytes=)  the weight bytes this policy
                        holds on the device at once, for the run's memory check before building a model; default: all
                        of them

What a mixture-of-experts block calls (engine/moe.py), so a policy can act on expert granularity:
    run_experts(x, weights, experts, compute)  after routing, inside the layer bracketed by before_layer/after_layer;
                        the block finds the policy in its `expert_hooks` attribute, which a policy that acts on
                        experts sets in `setup` (None: the block computes its experts itself); default: compute them
"""

from __future__ import annotations

from collections.abc import Callable

import torch


class PrefetchPolicy:
    """Base class of prefetch policies; `plugin_name` is set by the registry."""

    plugin_name = "base"
    resident_weights: bool = False

    def weights_device(self, device: torch.device) -> torch.device:
        return device

    def keep_weight(self, model: torch.nn.Module, name: str, value: torch.Tensor,
                    device: torch.device) -> torch.Tensor:
        """What the model keeps for parameter `name` (of the meta-built `model`) when the loader has just created
        `value` (on any device); `device` is the compute device."""
        return value.to(self.weights_device(device))

    def host_weight_bytes(self, device: torch.device, total_bytes: int, expert_bytes: int = 0,
                          element_size: int = 2) -> float:
        """Weight bytes this policy keeps in host memory (total_bytes, expert_bytes: as in device_weight_bytes, in
        the model dtype of `element_size` bytes)."""
        return float(total_bytes) if torch.device(self.weights_device(device)).type == "cpu" else 0.0

    def host_advice(self, room: float, total_bytes: int, expert_bytes: int = 0, element_size: int = 2) -> str | None:
        """A setting of this policy under which what it keeps in host memory fits in `room` bytes, for the memory
        check's one-line refusal (e.g. `prefetch.host_dtype=fp8`); None when it has none."""
        return None

    def device_weight_bytes(self, total_bytes: int, layer_bytes: int | None = None, num_layers: int | None = None,
                            head_bytes: int = 0, expert_bytes: int = 0) -> float:
        """Weight bytes on the device at once, given the model's total (and, for policies that stream layers, one
        decoder layer's bytes, the layer count and the embeddings/head bytes; for policies that stream experts,
        the bytes of every routed expert of every layer, 0 for a dense model)."""
        return float(total_bytes)

    def setup(self, model: torch.nn.Module, device: torch.device) -> None:
        raise NotImplementedError

    def before_layer(self, index: int) -> None:
        pass

    def after_layer(self, index: int) -> None:
        pass

    def run_experts(self, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor,
                    compute: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """A MoE block's routed experts, called by the block after routing. x: [N, hidden] the routed tokens;
        weights, experts: [N, k] routing weights and expert ids; compute(weights, ids) -> [N, hidden] runs the
        block's experts as its parameters are bound now, `ids` indexing dim 0 of them. A policy may rebind those
        parameters and translate the ids (a cache of some experts); the default computes them as they are."""
        return compute(weights, experts)

    def stats(self) -> dict[str, float]:
        return {}
