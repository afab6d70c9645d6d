"""Block schedules: which KV tiles each query tile visits, plus the element rules applied inside boundary tiles.

Dense causal, sliding window with sinks, block-sparse patterns and the exact part of multi-scale attention are all
schedules of one prefill kernel (attention_prefill.py). Positions are absolute: query t of a call sits at position
`q_offset + t`, key s at position s. Query tiles are aligned to absolute positions (tile a covers positions
[a * block_m, (a + 1) * block_m)), so the first tile of a chunked prefill may be partial; row i of a schedule is
absolute query tile `q_offset // block_m + i`.

Element rules (what the kernel masks inside a visited tile; `schedule_to_mask` applies the same ones):
    causal:   key s visible to the query at position p iff s <= p
    window:   window > 0 keeps only s < sink or s >= lo(p), lo(p) = floor(max(p - window + 1, 0) / align) * align
              (align = 1 is the usual window p - window < s <= p; multiscale uses align = its finest pool size)
    tree:     for the trailing T keys (s >= S - T) a bool [T, T] tree mask replaces the causal rule
    pattern:  a block-sparse pattern (`BlockPattern`) decides whole pattern blocks; its block size is a multiple of
              the kernel tiles, so it needs no element rule of its own.
Each row lists its fully visible tiles first (the kernel runs them without masks), then the partial ones.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch


@dataclass(frozen=True)
class BlockSchedule:
    """For each query tile, the KV tiles to visit.

    kv_blocks: int32 [n_q_tiles, max_visits]: per row the `kv_full[i]` fully visible tiles (ascending), then the
        partial tiles (ascending) up to `kv_total[i]`; padded with -1.
    kv_full, kv_total: int32 [n_q_tiles].
    """

    kv_blocks: torch.Tensor
    kv_full: torch.Tensor
    kv_total: torch.Tensor
    block_m: int
    block_n: int
    q_len: int
    kv_len: int
    q_offset: int
    causal: bool = True
    window: int = 0
    sink: int = 0
    window_align: int = 1
    tree: bool = False

    @property
    def n_q_tiles(self) -> int:
        return self.kv_blocks.shape[0]

    def visited_tiles(self) -> int:
        return int(self.kv_total.sum())

    def to(self, device) -> BlockSchedule:
        return _replace(self, kv_blocks=self.kv_blocks.to(device), kv_full=self.kv_full.to(device),
                        kv_total=self.kv_total.to(device))


def _replace(s: BlockSchedule, **kw) -> BlockSchedule:
    fields = {f: getattr(s, f) for f in s.__dataclass_fields__}
    fields.update(kw)
    return BlockSchedule(**fields)


class BlockPattern:
    """A block-sparse pattern over absolute blocks of `block_size` tokens.

    `rows(q_blocks, n_k_blocks)` returns bool [len(q_blocks), n_k_blocks]: True where query block qb may see key
    block kb. `n_k_blocks` = cdiv(kv_len, block_size) of the call, so density-derived widths follow the context
    length (decoding the last token of a sequence sees exactly the last row of that sequence's prefill pattern).
    The causal rule is applied on top, so the pattern may say True above the diagonal.
    """

    block_size: int = 128

    def rows(self, q_blocks: torch.Tensor, n_k_blocks: int) -> torch.Tensor:
        raise NotImplementedError


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def window_start(p: torch.Tensor, window: int, align: int) -> torch.Tensor:
    """lo(p): first key position of the window of the query at position p (int64 tensor in, same shape out)."""
    return torch.div((p - window + 1).clamp(min=0), align, rounding_mode="floor") * align


def build_schedule(
    q_len: int,
    kv_len: int,
    q_offset: int,
    block_m: int,
    block_n: int,
    *,
    device=None,
    causal: bool = True,
    window: int = 0,
    sink: int = 0,
    window_align: int = 1,
    tree: bool = False,
    pattern: BlockPattern | None = None,
) -> BlockSchedule:
    """The block schedule of one attention call (see the module docstring for the rules).

    A tile is listed iff some valid (query, key) pair in it is visible; it is listed as full iff every pair of a
    valid query row and a key in it is visible. Returns tensors on `device`.
    """
    if q_len < 1 or kv_len < 1:
        raise ValueError(f"attention needs at least one query and one key, got q_len={q_len}, kv_len={kv_len}")
    if q_offset < 0:
        raise ValueError(f"q_offset must be >= 0, got {q_offset}")
    if tree and q_len > kv_len:
        raise ValueError(f"a tree mask covers the trailing q_len keys: q_len={q_len} > kv_len={kv_len}")
    if pattern is not None and (pattern.block_size % block_m or pattern.block_size % block_n):
        raise ValueError(f"pattern block_size {pattern.block_size} must be a multiple of the tiles {block_m}x{block_n}")
    first_tile = q_offset // block_m
    n_q = cdiv(q_offset % block_m + q_len, block_m)
    n_k = cdiv(kv_len, block_n)
    a = torch.arange(first_tile, first_tile + n_q, device=device, dtype=torch.int64)
    p_lo = (a * block_m).clamp(min=q_offset)[:, None]  # first and last valid query position of each tile
    p_hi = ((a + 1) * block_m - 1).clamp(max=q_offset + q_len - 1)[:, None]
    j = torch.arange(n_k, device=device, dtype=torch.int64)
    s_lo = (j * block_n)[None, :]
    s_hi = ((j + 1) * block_n - 1).clamp(max=kv_len - 1)[None, :]

    visible = torch.ones(n_q, n_k, dtype=torch.bool, device=device)
    full = ((j + 1) * block_n <= kv_len)[None, :].expand(n_q, n_k).clone()
    if causal:
        reach = s_lo <= p_hi
        if tree:  # the tree mask may open any of the trailing q_len keys
            reach = reach | (s_hi >= kv_len - q_len)
        visible &= reach
        full &= s_hi <= p_lo
    if tree:
        full &= s_hi < kv_len - q_len
    if window > 0:
        in_window = s_hi >= window_start(p_lo, window, window_align)
        in_sink = s_lo < sink
        visible &= in_window | in_sink
        full &= (s_lo >= window_start(p_hi, window, window_align)) | (s_hi < sink)
    if pattern is not None:
        n_pb = cdiv(kv_len, pattern.block_size)
        rows = pattern.rows(torch.div(a * block_m, pattern.block_size, rounding_mode="floor"), n_pb)
        cols = torch.div(j * block_n, pattern.block_size, rounding_mode="floor")
        visible &= rows.to(device)[:, cols]
    full &= visible
    return pack_schedule(visible, full, block_m=block_m, block_n=block_n, q_len=q_len, kv_len=kv_len,
                         q_offset=q_offset, causal=causal, window=window, sink=sink, window_align=window_align,
                         tree=tree)


def pack_schedule(visible: torch.Tensor, full: torch.Tensor, **meta) -> BlockSchedule:
    """Bool [n_q, n_k] tile maps -> padded int32 lists: full tiles ascending, then partial tiles ascending."""
    n_q, n_k = visible.shape
    partial = visible & ~full
    j = torch.arange(n_k, device=visible.device, dtype=torch.int64)[None, :]
    # Sort key: full tiles first, partial next, invisible last; ascending tile index within each group.
    key = torch.where(full, j, torch.where(partial, n_k + j, 2 * n_k + j))
    order = key.sort(dim=1).values
    total = visible.sum(1)
    width = max(int(total.max()) if n_q else 0, 1)
    order = order[:, :width]
    blocks = torch.where(order < 2 * n_k, order % n_k, torch.full_like(order, -1))
    return BlockSchedule(
        kv_blocks=blocks.to(torch.int32).contiguous(),
        kv_full=full.sum(1).to(torch.int32),
        kv_total=total.to(torch.int32),
        **meta,
    )


def schedule_to_mask(
    sched: BlockSchedule, tree_mask: torch.Tensor | None = None, rows: slice | None = None
) -> torch.Tensor:
    """The dense bool mask [T, S] (True = visible) that a schedule means: visited tiles times the element rules.

    rows: optional slice of query indices (to build a large mask in pieces). tree_mask: bool [T, T] when the
    schedule was built with tree=True.
    """
    t_all, s_len = sched.q_len, sched.kv_len
    rows = rows or slice(0, t_all)
    device = sched.kv_blocks.device
    t = torch.arange(t_all, device=device, dtype=torch.int64)[rows]
    p = (sched.q_offset + t)[:, None]
    s = torch.arange(s_len, device=device, dtype=torch.int64)[None, :]
    # Tile map: which (query tile, key tile) pairs the schedule visits.
    n_k = cdiv(s_len, sched.block_n)
    tile_map = torch.zeros(sched.n_q_tiles, n_k + 1, dtype=torch.bool, device=device)
    blocks = sched.kv_blocks.long()
    valid = torch.arange(blocks.shape[1], device=device)[None, :] < sched.kv_total.long()[:, None]
    tile_map.scatter_(1, torch.where(valid, blocks, n_k), valid)
    row_tile = torch.div(p[:, 0], sched.block_m, rounding_mode="floor") - sched.q_offset // sched.block_m
    mask = tile_map[row_tile][:, torch.div(s[0], sched.block_n, rounding_mode="floor")]
    rule = torch.ones_like(mask)
    if sched.causal:
        rule &= s <= p
    if sched.tree:
        if tree_mask is None:
            raise ValueError("this schedule was built for a tree mask: pass tree_mask [T, T]")
        tail = s_len - t_all
        rule[:, tail:] = tree_mask.to(device)[rows]
    if sched.window > 0:
        rule &= (s < sched.sink) | (s >= window_start(p, sched.window, sched.window_align))
    return mask & rule


# ----------------------------------------------------------------------------------------------------------------
# Block-sparse patterns. Blocks are absolute; "density" is the fraction of the causal block triangle visited.


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (lowbias32), on int64 tensors so it runs the same on every device."""
    m = 0xFFFFFFFF
    x = x & m
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & m
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & m
    return x ^ (x >> 16)


def block_uniform(seed: int, qb: torch.Tensor, kb: torch.Tensor) -> torch.Tensor:
    """A reproducible uniform number in [0, 1) per (query block, key block): the same pair always gets the same
    number whatever the sequence length, so prefill and decode agree on the random blocks."""
    x = _mix32(qb * 0x9E3779B1 + _mix32(kb + 0x632BE5AB * (seed + 1)))
    return x.to(torch.float64) / 2.0**32


@lru_cache(maxsize=4096)
def local_count(n: int, width: int, num_global: int) -> int:
    """Causal blocks visited by the local band of `width` blocks plus `num_global` leading blocks, over n rows."""
    qb = torch.arange(n, dtype=torch.int64)
    band = torch.clamp(qb + 1, max=width)
    extra = torch.clamp(torch.minimum(torch.full_like(qb, num_global), qb - width + 1), min=0)
    return int((band + extra).sum())


@lru_cache(maxsize=1024)  # decode asks every layer of every step for the same few lengths
def width_for_density(n: int, density: float, num_global: int, share: float = 1.0) -> int:
    """The smallest band width whose local+global count reaches `share * density` of the causal triangle."""
    target = share * density * n * (n + 1) / 2
    lo, hi = 1, max(n, 1)
    while lo < hi:  # local_count grows with width: binary search
        mid = (lo + hi) // 2
        if local_count(n, mid, num_global) >= target:
            hi = mid
        else:
            lo = mid + 1
    return lo


@dataclass
class SparsePattern(BlockPattern):
    """local | strided | random | bigbird block patterns (see `rows`).

    local:   key blocks qb - w < kb <= qb, w chosen so the visited fraction of the causal triangle is `density`
    strided: kb == qb or (qb - kb) % stride == 0 (Sparse-Transformer style), stride = `stride` or round(1 / density)
    random:  kb == qb, or kb < qb with probability `density` (a seeded hash of (qb, kb))
    bigbird: local band (half the density budget) + random blocks filling the rest of the budget
    Every pattern also keeps the first `num_global` key blocks visible to every query (global tokens).
    """

    kind: str = "local"
    block_size: int = 128
    density: float = 0.25
    stride: int = 0
    num_global: int = 1
    seed: int = 0

    def rows(self, q_blocks: torch.Tensor, n_k_blocks: int) -> torch.Tensor:
        qb = q_blocks.long()[:, None]
        kb = torch.arange(n_k_blocks, device=q_blocks.device, dtype=torch.int64)[None, :]
        n = n_k_blocks
        diag = kb == qb
        if self.kind == "local":
            keep = (qb - kb >= 0) & (qb - kb < width_for_density(n, self.density, self.num_global))
        elif self.kind == "strided":
            stride = self.stride or max(1, round(1 / self.density))
            keep = diag | ((qb - kb) % stride == 0)
        elif self.kind == "random":
            keep = diag | (block_uniform(self.seed, qb, kb) < self.density)
        elif self.kind == "bigbird":
            w = width_for_density(n, self.density, self.num_global, share=0.5)
            band = (qb - kb >= 0) & (qb - kb < w)
            used = local_count(n, w, self.num_global)
            candidates = n * (n + 1) // 2 - used
            p = max(0.0, self.density * n * (n + 1) / 2 - used) / max(candidates, 1)
            keep = band | (block_uniform(self.seed, qb, kb) < p)
        else:
            raise ValueError(f"sparse pattern must be local, strided, random or bigbird, got {self.kind!r}")
        return (keep | (kb < self.num_global)) & (kb <= qb)

    def density_of(self, n_k_blocks: int) -> float:
        """Visited fraction of the causal block triangle at this many blocks (for reports)."""
        rows = self.rows(torch.arange(n_k_blocks), n_k_blocks)
        return float(rows.sum()) / (n_k_blocks * (n_k_blocks + 1) / 2)


@dataclass(frozen=True)
class DecodeSchedule:
    """Keys visited by the newest decode queries: the KV blocks in `block_ids` (int32, ascending; None = all
    blocks), and inside them only keys with position < sink or position > q_pos - window (window 0 = no window).
    An attention backend produces it (`decode_schedule`), a codec's fused decode kernel follows it; it lives here,
    below both plugin kinds."""

    block_ids: torch.Tensor | None = None
    window: int = 0
    sink: int = 0


def decode_block_ids(
    kv_len: int, num_queries: int, block_k: int, *, window: int = 0, sink: int = 0, window_align: int = 1,
    pattern: BlockPattern | None = None, device=None,
) -> torch.Tensor | None:
    """Ascending int32 ids of the `block_k`-key blocks that the last `num_queries` queries (positions
    kv_len - num_queries .. kv_len - 1) may see; None when that is every block."""
    if window <= 0 and pattern is None:
        return None
    n_k = cdiv(kv_len, block_k)
    j = torch.arange(n_k, dtype=torch.int64)
    keep = torch.ones(n_k, dtype=torch.bool)
    if window > 0:
        lo = int(window_start(torch.tensor(kv_len - num_queries), window, window_align))
        keep &= ((j + 1) * block_k - 1 >= lo) | (j * block_k < sink)
    if pattern is not None:
        bs = pattern.block_size
        if bs % block_k:
            raise ValueError(f"decode block size {block_k} must divide the sparse pattern's block_size {bs}")
        q_blocks = torch.arange((kv_len - num_queries) // bs, (kv_len - 1) // bs + 1)
        if len(q_blocks) > 1:
            raise ValueError("the decode queries span two pattern blocks: use the prefill kernel")
        row = pattern.rows(q_blocks, cdiv(kv_len, bs))[0]
        keep &= row[torch.div(j * block_k, bs, rounding_mode="floor")]
    ids = torch.nonzero(keep).flatten().to(torch.int32)
    if len(ids) == n_k:
        return None
    return ids.to(device) if device is not None else ids


__all__ = [
    "BlockSchedule", "BlockPattern", "SparsePattern", "build_schedule", "pack_schedule", "schedule_to_mask",
    "DecodeSchedule", "decode_block_ids", "window_start", "block_uniform", "width_for_density", "cdiv",
]
