"""Cache layers that hold a fixed-size state instead of K/V: the linear-attention layers (engine/linear_attention.py).

A `KVCache` holds one layer per decoder layer. An attention layer's is the run's codec layer (cache/base.py); a
linear-attention layer's is a `StateLayer`: named tensors of a fixed shape (a conv state, a recurrent state) that
the layer reads and replaces as it absorbs tokens. No codec applies to it (`holds_kv = False`): nothing to
quantize or evict, and `append`/`dense` refuse. What the engine and the tasks read stays the CacheLayer contract:
`length` (tokens absorbed), `stored_bytes()` (the state's bytes, counted by `KVCache.stats` and the memory check),
`truncate(length)` (speculative rollback).

Rollback. A recurrent state cannot drop tokens; it can only go back to a state it kept. The layer keeps the states
of the last `rollback_tokens` lengths it passed through: the state before each update and, when the layer hands
them over, the state after each token of a block (a speculative verify block of <= 16 tokens). An update longer
than that reach (a prompt chunk) keeps the state before it instead of the oldest of those, so any caller that rolls
back at all can undo its last step whole. Each kept length holds its own state (a step makes a new one), so a layer
holds up to `rollback_tokens` + 1 states: a caller that
never truncates asks for 0 (engine `new_cache(rollback_tokens=0)`, greedy's loop). `truncate` returns to any kept
length; anything else raises NotImplementedError with one line. Kept states are not counted in `stored_bytes`
(what the layer holds for the sequence); `held_bytes` counts them too. The memory check counts them for decoders
that are not forward-only (engine/footprint.py), the server's admission for its one kept step (Engine.cache_bytes).
"""

from __future__ import annotations

import torch

from ollm_triton.cache.base import CacheLayer, LayerSpec


class StateLayer(CacheLayer):
    """state: name -> tensor [B, ...]; `update(new, tokens, history)` advances it by `tokens`."""

    holds_kv = False

    def __init__(self, spec: LayerSpec, shapes: dict[str, tuple[tuple[int, ...], torch.dtype]],
                 rollback_tokens: int = 16):
        super().__init__(spec)
        self.state = {name: torch.zeros(shape, dtype=dtype, device=spec.device) for name, (shape, dtype) in
                      shapes.items()}
        self._len = 0
        self.rollback_tokens = rollback_tokens
        self._kept: list[tuple[int, dict[str, torch.Tensor]]] = [(0, self.state)]  # (length, state), ascending

    @property
    def length(self) -> int:
        return self._len

    @property
    def evicted_tokens(self) -> int:
        return 0

    def update(self, state: dict[str, torch.Tensor], tokens: int,
               history: dict[str, torch.Tensor] | None = None) -> None:
        """The state after `tokens` more tokens; history[name][j]: the state after token j + 1 of them (optional)."""
        start, before = self._len, self._kept[-1]
        if history is not None:
            self._kept += [(start + j + 1, {name: h[j] for name, h in history.items()}) for j in range(tokens - 1)]
        self.state, self._len = state, start + tokens
        self._kept.append((self._len, state))
        oldest = self._len - self.rollback_tokens
        self._kept = [(n, s) for n, s in self._kept if n >= oldest]
        if self.rollback_tokens and start < oldest:
            # an update longer than the reach (a prompt chunk) can still be undone as a whole: the server rolls a
            # failed batched step back (serve/scheduler.py `_rows_call`); still at most rollback_tokens + 1 states
            self._kept = [before, *self._kept[-self.rollback_tokens:]]
        self.appended = self._len

    def truncate(self, length: int) -> None:
        if length == self._len:
            return
        kept = dict(self._kept)
        if length not in kept:
            raise NotImplementedError(
                f"a linear-attention state layer at {self._len} tokens kept its states at "
                f"{', '.join(map(str, sorted(kept)))} tokens only (the last {self.rollback_tokens} tokens, blocks of "
                f"<= 16 after the prompt); cannot roll back to {length}")
        self.state, self._len = kept[length], length
        self._kept = [(n, s) for n, s in self._kept if n <= length]
        self.appended = length

    def append(self, k, v):
        raise NotImplementedError("a linear-attention layer holds a recurrent state, not K/V: nothing to append")

    def dense(self):
        raise NotImplementedError("a linear-attention layer holds a recurrent state, not K/V: no dense K/V")

    def stored_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.state.values())

    def held_bytes(self) -> int:
        """The current state and every kept one: what the layer occupies."""
        return sum(t.numel() * t.element_size() for _, state in self._kept for t in state.values())

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
