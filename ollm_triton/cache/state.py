"""Cache layers that hold a fixed-size state instead of K/V: the linear-attention layers (engine/linear_attention.py).

A `KVCache` holds one layer per decoder layer. An attention layer's is the run's codec layer (cache/base.py); a
linear-attention layer's is a `StateLayer`: named tensors of a fixed shape (a conv state, a recurrent state) that
the layer reads and replaces as it absorbs tokens. No codec applies to it (`holds_kv = False`): nothing to
quantize or evict, and `append`/`dense` refuse. What the engine and the tasks read stays the CacheLayer contract:
`length` (tokens absorbed), `stored_bytes()` (the state's bytes, counted by `KVCache.stats` and the memory check),
`truncate(length)` (speculative rollback).

Rollback. A recurrent state cannot drop tokens; it can only go back to a state it kept. `update` keeps the state
before the block and, when the layer hands them over, the states after each token of the block (a speculative
verify block of <= 16 tokens), so `truncate` may return to any length from the block's start to its end; anything
earlier raises NotImplementedError with one line.
"""

from __future__ import annotations

import torch

from ollm_triton.cache.base import CacheLayer, LayerSpec


class StateLayer(CacheLayer):
    """state: name -> tensor [B, ...]; `update(new, tokens, history)` advances it by `tokens`."""

    holds_kv = False

    def __init__(self, spec: LayerSpec, shapes: dict[str, tuple[tuple[int, ...], torch.dtype]]):
        super().__init__(spec)
        self.state = {name: torch.zeros(shape, dtype=dtype, device=spec.device) for name, (shape, dtype) in
                      shapes.items()}
        self._len = 0
        self._start = 0  # where the last block began
        self._before: dict[str, torch.Tensor] | None = None  # the state at _start
        self._history: dict[str, torch.Tensor] | None = None  # name -> [T, ...]: the state after each block token

    @property
    def length(self) -> int:
        return self._len

    @property
    def evicted_tokens(self) -> int:
        return 0

    def update(self, state: dict[str, torch.Tensor], tokens: int,
               history: dict[str, torch.Tensor] | None = None) -> None:
        """The state after `tokens` more tokens; history[name][j]: the state after token j + 1 of them (optional)."""
        self._before, self._start = self.state, self._len
        self.state, self._history = state, history
        self._len += tokens
        self.appended = self._len

    def truncate(self, length: int) -> None:
        if length == self._len:
            return
        if self._before is None or not self._start <= length < self._len:
            raise NotImplementedError(
                f"a linear-attention state layer at {self._len} tokens can roll back only to the start of its last "
                f"block ({self._start}) or, after a verify block, to any token of it; asked for {length}")
        if length == self._start:
            self.state = self._before
        elif self._history is not None:
            j = length - self._start - 1
            self.state = {name: h[j] for name, h in self._history.items()}
        else:
            raise NotImplementedError(
                f"this state layer kept no per-token states for its last block ({self._start}..{self._len}); "
                f"cannot roll back to {length}")
        self._len = length
        self.appended = length

    def append(self, k, v):
        raise NotImplementedError("a linear-attention layer holds a recurrent state, not K/V: nothing to append")

    def dense(self):
        raise NotImplementedError("a linear-attention layer holds a recurrent state, not K/V: no dense K/V")

    def stored_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.state.values())

    def original_bytes(self) -> int:
        return self.stored_bytes()  # no codec: the state is what an uncompressed cache holds too


class StackedStates:
    """The same layer of several sequences' caches as one batch (continuous batching's rows): `state` is their
    tensors concatenated along the batch dim, `update` hands each row its slice. Every row absorbs the same
    number of tokens."""

    def __init__(self, layers: list[StateLayer]):
        self.layers = layers
        self.state = {name: torch.cat([layer.state[name] for layer in layers]) for name in layers[0].state}

    @property
    def length(self) -> int:
        return min(layer.length for layer in self.layers)

    def update(self, state, tokens, history=None) -> None:
        start = 0
        for layer in self.layers:
            n = layer.state[next(iter(layer.state))].shape[0]
            rows = slice(start, start + n)
            layer.update({name: t[rows] for name, t in state.items()}, tokens,
                         None if history is None else {name: h[:, rows] for name, h in history.items()})
            start += n


__all__ = ["StackedStates", "StateLayer"]
