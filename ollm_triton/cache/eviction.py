"""Shared machinery of the token-eviction codecs (streaming, h2o, snapkv).

A layer holds the kept tokens' post-RoPE K/V in position order, [B, H, n, D], plus each token's absolute
position (int32 [B, H, n]). Every KV head keeps the same number of tokens, but which ones may differ per head
(and per sequence of the batch): the layout stays dense, so every attention backend reads it through `dense()`.
RoPE stays right because keys are cached after rotation and the engine takes new positions from
`KVCache.position`, which counts tokens seen, not tokens held.

Eviction really frees memory: the kept tokens are gathered into new buffers sized to them (plus a little room
for the next appends) and the old buffers are dropped.

When: `observe(q)` (called by the engine after each attention step) only scores; the eviction a step owes happens
at the start of the next `append`. So a prompt attends to all of itself, a decode step attends to budget + its
own tokens, and draft tokens verified in one step can still be rolled back exactly (nothing was evicted since
they arrived). The cache thus holds the whole prompt until the first decode step, as the prompt's own attention
needed it anyway.

Rollback (`truncate(length)`): exact while no eviction happened since token `length` was appended (the
speculative-decoding case: the draft tokens are the newest and nothing was evicted while verifying them; an
eviction codec used with speculation should evict at most once per verified step). Otherwise it raises
NotImplementedError: tokens evicted since then are gone and cannot be restored.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ollm_triton.cache.base import CacheCodec, CacheLayer, LayerSpec
from ollm_triton.cache.storage import StoredCodec, StoreParams


@dataclass
class EvictionParams(StoreParams):
    budget: int = 0  # tokens kept per layer and KV head; 0 = use `ratio`
    ratio: float = 0.5  # fraction of the tokens seen that is kept (when budget is 0)
    evict_every: int = 1  # evict once the held tokens exceed the budget by this many (amortizes the compaction)

    def check(self) -> None:
        super().check()
        if self.budget < 0:
            raise ValueError(f"budget must be >= 0 tokens, got {self.budget}")
        if self.budget == 0 and not 0.0 < self.ratio <= 1.0:
            raise ValueError(f"ratio must be in (0, 1] when budget is 0, got {self.ratio}")
        if self.evict_every < 1:
            raise ValueError(f"evict_every must be >= 1, got {self.evict_every}")


class EvictingCodec(StoredCodec, CacheCodec):
    """What an eviction codec declares (cache/base.py): its bytes per token and the most tokens a layer holds.

    A layer evicts what it owes at the start of an append (EvictingLayer.append), down to `budget` once it holds
    `budget + evict_every` or more; so before an append it holds at most `budget + evict_every - 1` tokens and after
    one at most that plus the block appended. A `ratio` budget grows with the tokens seen: no bound."""

    score_bytes = 0  # bytes per token and KV head of the layer's per-token scores (`_extra_state`)

    def bytes_per_token(self, spec: LayerSpec) -> float:
        """K and V in the model dtype, the int32 position and the scores, per KV head: what `stored_bytes` counts."""
        elt = torch.empty((), dtype=spec.dtype).element_size()
        return float(spec.batch * spec.kv_heads * (2 * spec.head_dim * elt + 4 + self.score_bytes))

    def max_held_tokens(self, block: int) -> int | None:
        if self.cfg.budget <= 0:
            return None
        return self.cfg.budget + self.cfg.evict_every - 1 + max(int(block), 1)


class EvictingLayer(CacheLayer):
    """Dense, position-ordered buffers with eviction by index; subclasses choose what to keep."""

    needs_scores = False  # h2o / snapkv cannot evict without `observe(q)`

    def __init__(self, spec: LayerSpec, cfg: EvictionParams, min_budget: int = 1):
        super().__init__(spec)
        self.cfg = cfg
        self.min_budget = min_budget
        self.n = 0
        self.last_evict_seen = 0  # tokens seen at the last eviction: no rollback below it
        self.observed = False
        self.last_path = "torch.dense"
        self._alloc(0)

    # -- buffers -------------------------------------------------------------------------------------------------

    def _alloc(self, cap: int) -> None:
        s = self.spec
        self.k = torch.empty(s.batch, s.kv_heads, cap, s.head_dim, dtype=s.dtype, device=s.device)
        self.v = torch.empty_like(self.k)
        self.pos = torch.empty(s.batch, s.kv_heads, cap, dtype=torch.int32, device=s.device)
        self.cap = cap

    def _extra_state(self) -> list[str]:
        """Names of per-token float buffers [B, H, cap] that move with the tokens (h2o's scores)."""
        return []

    def _grow(self, need: int) -> None:
        if need <= self.cap:
            return
        old = {name: getattr(self, name) for name in ["k", "v", "pos", *self._extra_state()]}
        cap = max(need, 2 * self.cap, 64)
        self._alloc(cap)
        for name in self._extra_state():
            setattr(self, name, torch.zeros(*old[name].shape[:2], cap, dtype=old[name].dtype, device=old[name].device))
        for name, buf in old.items():
            getattr(self, name)[:, :, : self.n] = buf[:, :, : self.n]

    def budget(self) -> int:
        """Tokens to keep now (per head)."""
        if self.cfg.budget > 0:
            b = self.cfg.budget
        else:
            b = math.ceil(self.cfg.ratio * self.appended)
        return max(b, self.min_budget)

    def keep(self, idx: torch.Tensor) -> None:
        """Keep the tokens at buffer indices idx: int64 [B, H, K], ascending along the last axis; free the rest."""
        kept = idx.shape[-1]
        headroom = max(self.cfg.evict_every, 16)
        new = {}
        for name in ["k", "v", "pos", *self._extra_state()]:
            buf = getattr(self, name)[:, :, : self.n]
            ix = idx if buf.dim() == 3 else idx[..., None].expand(-1, -1, -1, buf.shape[-1])
            gathered = torch.gather(buf, 2, ix)
            room = torch.empty(*buf.shape[:2], kept + headroom, *buf.shape[3:], dtype=buf.dtype, device=buf.device)
            room[:, :, :kept] = gathered
            new[name] = room
        for name, buf in new.items():
            setattr(self, name, buf)
        self.cap = kept + headroom
        self.n = kept
        self.last_evict_seen = self.appended

    def over_budget(self) -> bool:
        return self.n >= self.budget() + self.cfg.evict_every

    # -- CacheLayer ----------------------------------------------------------------------------------------------

    @property
    def length(self) -> int:
        return self.n

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        t = k.shape[2]
        self.evict_pending()
        self._grow(self.n + t)
        self.k[:, :, self.n : self.n + t] = k
        self.v[:, :, self.n : self.n + t] = v
        self.pos[:, :, self.n : self.n + t] = torch.arange(self.appended, self.appended + t, device=k.device,
                                                            dtype=torch.int32)
        for name in self._extra_state():
            getattr(self, name)[:, :, self.n : self.n + t] = 0
        self.n += t
        self.appended += t

    def evict_pending(self) -> None:
        """Evict what the last step owes, before new tokens arrive (see the module docstring for why not sooner)."""
        if not self.over_budget():
            return
        if self.needs_scores and not self.observed:
            raise RuntimeError(
                f"{type(self).__name__} needs the engine to call layer_cache.observe(q) after each attention step; "
                "without the queries it cannot score tokens, and would silently keep everything")
        with self.encode_timer.region():
            self.keep(self.select(self.budget()))

    def observe(self, q: torch.Tensor) -> None:
        self.observed = True
        with self.encode_timer.region():
            self.score(q)

    def score(self, q: torch.Tensor) -> None:
        """Update scores from this step's queries (h2o accumulates, snapkv votes); default: nothing."""

    def select(self, budget: int) -> torch.Tensor:
        """int64 [B, H, budget] ascending buffer indices to keep."""
        raise NotImplementedError

    def dense(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k[:, :, : self.n], self.v[:, :, : self.n]

    def positions(self) -> torch.Tensor:
        """int32 [B, H, n]: the absolute position of every held token."""
        return self.pos[:, :, : self.n]

    def truncate(self, length: int) -> None:
        if not 0 <= length <= self.appended:
            raise ValueError(f"cannot truncate a cache that has seen {self.appended} tokens to {length}")
        if length < self.last_evict_seen:
            raise NotImplementedError(
                f"{type(self).__name__} cannot roll back to {length} tokens: it evicted tokens after {length} had "
                f"been seen (last eviction at {self.last_evict_seen}), and evicted tokens cannot be restored")
        # nothing evicted since `length`: the tokens appended after it are the newest `appended - length` of every head
        self.n -= self.appended - length
        self.appended = length

    def stored_bytes(self) -> int:
        s = self.spec
        per_token = 2 * s.head_dim * self.k.element_size() + self.pos.element_size()
        per_token += sum(getattr(self, name).element_size() for name in self._extra_state())
        return s.batch * s.kv_heads * self.n * per_token


def topk_sorted(scores: torch.Tensor, k: int) -> torch.Tensor:
    """int64 [..., k]: indices of the k largest scores along the last axis, ascending (position order)."""
    return torch.topk(scores, k, dim=-1, sorted=False).indices.sort(dim=-1).values
