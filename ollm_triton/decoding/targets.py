"""The target model as the speculative loops see it: prefill, verify a block, keep a prefix, keep a tree path.

`EagerTarget`: engine.forward on a KVCache built by the run's codec (any attention, cache and prefetch plugin);
rollback through KVCache.truncate. `StaticTarget`: the static-buffer steps of _static.py (CUDA graphs on the GPU,
where `greedy` also replays graphs); rollback is a smaller base slot for the next step, no data moves.
"""

from __future__ import annotations

import torch

from ollm_triton.decoding.static_steps import StaticModel, static_model


def keep_tokens(layer, start: int, indices: torch.Tensor) -> None:
    """Keep a cache layer's first `start` tokens followed by its tokens at `indices` (ascending, >= start).

    Uses the layer's own `keep(start, indices)` when its codec defines one; otherwise reads the dense K/V of
    those tokens, truncates to `start` and appends them again: exact for dense, a copy of len(indices) tokens per
    layer; a lossy codec re-encodes its own decoded values."""
    keep = getattr(layer, "keep", None)
    if callable(keep):
        keep(start, indices)
        return
    k, v = layer.dense()
    k_path, v_path = k[:, :, indices], v[:, :, indices]  # advanced indexing copies: safe to overwrite below
    layer.truncate(start)
    if indices.numel():
        layer.append(k_path, v_path)


class EagerTarget:
    fixed_width = False  # a verify block may have any length
    capture_s = 0.0

    def __init__(self, engine, batch: int, max_len: int):
        self.engine = engine
        self.cache = engine.new_cache(batch=batch, max_len=max_len)

    @property
    def length(self) -> int:
        return self.cache.position

    def prefill(self, ids: torch.Tensor) -> torch.Tensor:
        """ids: [B, P] -> logits [B, V] of the last prompt token."""
        e = self.engine
        if hasattr(e, "prefill"):  # chunked when the engine has a prefill_chunk
            return e.prefill(ids, self.cache)
        return e.forward(ids, self.cache, last_only=True)[:, -1]

    def prepare(self, t: int, tree: bool = False) -> None:
        pass

    def verify(self, block: torch.Tensor, mask: torch.Tensor | None = None, offsets: torch.Tensor | None = None):
        """block: [B, T] appended after the held tokens -> logits [B, T, V]. mask: [T, T] (tree), offsets: [T]
        RoPE offsets from the first block token (tree depths); default causal chain. block may be on the host."""
        positions = None if offsets is None else self.cache.position + offsets
        return self.engine.forward(block.to(self.engine.device), self.cache, positions=positions, tree_mask=mask)

    def argmax(self, logits: torch.Tensor) -> torch.Tensor:
        """The target's argmax [B, T] of the block `verify` just returned logits [B, T, V] for."""
        return logits.argmax(-1)

    def commit(self, length: int) -> None:
        """Keep the first `length` tokens."""
        self.cache.truncate(length)

    def keep_path(self, start: int, slots: torch.Tensor) -> None:
        """Keep tokens 0..start-1 followed by those at `slots` (ascending, >= start)."""
        for layer in self.cache.layers:
            keep_tokens(layer, start, slots)
        self.cache.position = start + slots.numel()

    def held_kv(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [layer.dense() for layer in self.cache.layers]


class StaticTarget:
    fixed_width = True  # one captured graph per block length: the loops keep it constant

    def __init__(self, engine, batch: int, max_len: int, capture: bool):
        self.engine = engine
        self.sm: StaticModel = static_model(engine, batch, max_len, capture)
        self.length = 0

    @property
    def capture_s(self) -> float:
        return self.sm.capture_s

    def prefill(self, ids: torch.Tensor) -> torch.Tensor:
        logits = self.sm.prefill(ids)
        self.length = ids.shape[1]
        return logits

    def prepare(self, t: int, tree: bool = False) -> None:
        st = self.sm.step(t, tree=tree)
        st.base.fill_(self.length)
        self.sm.prepare(st)

    def verify(self, block, mask=None, offsets=None):
        """As EagerTarget.verify; a host block is copied straight into the step's token buffer."""
        st = self.sm.step(block.shape[1], tree=mask is not None)
        st.tokens.copy_(block)
        st.base.fill_(self.length)
        if mask is not None:
            st.mask.copy_(mask)
            st.offsets.copy_(offsets)
        self.sm.run(st)
        self.length += block.shape[1]
        self._last = st
        return st.logits

    def argmax(self, logits: torch.Tensor) -> torch.Tensor:
        """The step computed it with the logits (inside its graph): no extra kernel, no extra launch."""
        return self._last.argmax

    def commit(self, length: int) -> None:
        self.length = length

    def keep_path(self, start: int, slots: torch.Tensor) -> None:
        self.sm.move(slots, start)
        self.length = start + slots.numel()

    def held_kv(self):
        return self.sm.dense(self.length)


def make_target(engine, batch: int, max_len: int, path: str):
    """path: "eager", "static" or "graph" (resolve_fast_path)."""
    if path == "eager":
        return EagerTarget(engine, batch, max_len)
    return StaticTarget(engine, batch, max_len, capture=path == "graph")
