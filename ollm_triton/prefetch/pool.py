"""Fixed-slot memory for streamed layer weights and their staging buffers.

`GPUMemoryPool` holds up to `num_slots` byte buffers of `slot_bytes` each on one device (pinned host memory for
staging pools). A request names what it holds (`layer.7`), with a shape and dtype; the pool hands back a view of a
slot. Because every slot has the same size, a released slot fits any later request: memory never fragments and the
footprint is `slots x slot_bytes` whatever the order of requests. A released slot keeps its bytes until it is
reclaimed, so asking again for the same name is a reuse hit with the data still valid (that is how layers stay
cached); when no slot is free the least recently released one is reclaimed (LRU), or the one a caller's `victim`
function picks.

`MemoryManager` groups pools of one device under an optional byte budget, routes a request to the smallest slot
size that fits, serialises access (loader threads share it) and reports all pools together.

PyTorch's caching allocator already reuses freed blocks, so the pool does not make a single allocation faster; it
helps where the allocator cannot: a footprint that is fixed in advance and checked against a budget, no
fragmentation when layer-sized and small blocks interleave, and reuse of *contents* (a cached layer) rather than
only of memory. scripts/bench_prefetch.py measures both on the same workload.
"""

from __future__ import annotations

import itertools
import math
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

PAGE = 4096


class PoolExhausted(RuntimeError):
    """Every slot of a pool is in use."""


def aligned_empty(nbytes: int, device: torch.device | str, *, pin: bool = False) -> torch.Tensor:
    """uint8 [nbytes] on `device`; on the host its address is page aligned (O_DIRECT reads need it) and, with
    `pin` and CUDA present, page-locked so host-to-device copies run asynchronously at full speed."""
    device = torch.device(device)
    with torch.inference_mode(False):  # loader threads write into these outside inference mode
        if device.type != "cpu":
            return torch.empty(nbytes, dtype=torch.uint8, device=device)
        if pin and torch.cuda.is_available():
            # cudaHostAlloc-backed and page aligned; the host allocator rounds to a power of two, which a
            # layer-sized slot can afford (staging and cache slots are few)
            return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        raw = torch.empty(nbytes + PAGE, dtype=torch.uint8)
        start = (-raw.data_ptr()) % PAGE
        return raw[start:start + nbytes]


@dataclass
class Allocation:
    """A slot handed out: `tensor` views it with the requested shape and dtype. `reused` means the slot already
    held this name's bytes (a reuse hit: the contents are valid); `evicted` names the cached contents it replaced."""

    name: str
    tensor: torch.Tensor
    slot: int
    reused: bool
    evicted: str | None


@dataclass
class _Slot:
    storage: torch.Tensor | None = None
    owner: str | None = None  # whose bytes the slot holds (in use, or released and still valid)
    in_use: bool = False
    released_at: int = 0


class GPUMemoryPool:
    """`num_slots` fixed slots of `slot_bytes` on `device`, allocated on first use; LRU reuse by name."""

    def __init__(self, slot_bytes: int, num_slots: int, device: torch.device | str = "cpu", *, pin: bool = False,
                 name: str = "pool"):
        if slot_bytes < 1 or num_slots < 0:
            raise ValueError(f"pool {name!r}: slot_bytes must be >= 1 and num_slots >= 0, got {slot_bytes}, "
                             f"{num_slots}")
        self.name = name
        self.slot_bytes = int(slot_bytes)
        self.device = torch.device(device)
        self.pin = pin
        self._slots: list[_Slot] = [_Slot() for _ in range(num_slots)]
        self._by_name: dict[str, int] = {}
        self._clock = itertools.count(1)
        self.requests = self.allocations = self.reuse_hits = self.allocations_avoided = self.evictions = 0
        self.peak_in_use_bytes = self.peak_reserved_bytes = 0

    # --- queries -------------------------------------------------------------------------------------------
    @property
    def num_slots(self) -> int:
        return len(self._slots)

    def holds(self, name: str) -> bool:
        """Whether `name`'s bytes sit in a slot (in use, or released and not yet reclaimed)."""
        return name in self._by_name

    def in_use(self, name: str) -> bool:
        return name in self._by_name and self._slots[self._by_name[name]].in_use

    def cached(self) -> list[str]:
        """Names released but still held, least recently released first (the LRU order)."""
        held = [s for s in self._slots if s.owner is not None and not s.in_use]
        return [s.owner for s in sorted(held, key=lambda s: s.released_at)]

    def in_use_count(self) -> int:
        return sum(s.in_use for s in self._slots)

    def reserved_bytes(self) -> int:
        return sum(s.storage is not None for s in self._slots) * self.slot_bytes

    # --- allocate / release --------------------------------------------------------------------------------
    def allocate(self, name: str, shape: Sequence[int], dtype: torch.dtype = torch.uint8, *,
                 victim: Callable[[list[str]], str | None] | None = None) -> Allocation:
        """A view [shape] of `dtype` for `name`; raises PoolExhausted when no slot can be had."""
        out = self.try_allocate(name, shape, dtype, victim=victim)
        if out is None:
            raise PoolExhausted(f"pool {self.name!r}: all {self.num_slots} slots of {self.slot_bytes} bytes are in "
                                f"use; release one or size the pool larger")
        return out

    def try_allocate(self, name: str, shape: Sequence[int], dtype: torch.dtype = torch.uint8, *,
                     victim: Callable[[list[str]], str | None] | None = None) -> Allocation | None:
        """Like allocate, but None when every slot is in use (or `victim` declines every cached name).

        Order of preference: the slot already holding `name` (reuse hit), a free slot with memory, a slot never
        materialised (a new allocation), the cached slot `victim(lru_names)` picks (default: least recently
        released).
        """
        nbytes = math.prod(shape) * dtype.itemsize
        if nbytes > self.slot_bytes:
            raise ValueError(f"pool {self.name!r}: {name!r} needs {nbytes} bytes, slots hold {self.slot_bytes}")
        self.requests += 1
        evicted = None
        index = self._by_name.get(name)
        if index is not None:
            slot = self._slots[index]
            if slot.in_use:
                raise ValueError(f"pool {self.name!r}: {name!r} is already allocated; release it first")
            self.reuse_hits += 1
            self.allocations_avoided += 1
            reused = True
        else:
            reused = False
            index = self._free_slot(materialised=True)
            if index is None:
                index = self._free_slot(materialised=False)
            if index is None:
                lru = self.cached()
                pick = (victim(lru) if victim is not None else (lru[0] if lru else None)) if lru else None
                if pick is None:
                    self.requests -= 1
                    return None
                index = self._by_name.pop(pick)
                evicted = pick
                self.evictions += 1
            slot = self._slots[index]
            if slot.storage is None:
                slot.storage = aligned_empty(self.slot_bytes, self.device, pin=self.pin)
                self.allocations += 1
            else:
                self.allocations_avoided += 1
            slot.owner = name
            self._by_name[name] = index
        slot.in_use = True
        self._update_peaks()
        if dtype == torch.uint8 and len(shape) == 1 and nbytes == self.slot_bytes:
            view = slot.storage  # the whole slot as bytes: no new view needed
        else:
            with torch.inference_mode(False):  # a view made under inference mode could not be written outside it
                view = slot.storage[:nbytes].view(dtype).view(tuple(int(s) for s in shape))
        return Allocation(name, view, index, reused, evicted)

    def release(self, name: str, *, keep: bool = True) -> None:
        """Give `name`'s slot back. keep: its bytes stay valid for a later reuse hit until the slot is reclaimed;
        otherwise the slot is free at once."""
        index = self._by_name.get(name)
        if index is None or not self._slots[index].in_use:
            raise ValueError(f"pool {self.name!r}: {name!r} is not allocated")
        slot = self._slots[index]
        slot.in_use = False
        slot.released_at = next(self._clock)
        if not keep:
            slot.owner = None
            del self._by_name[name]

    def forget(self, name: str) -> None:
        """Drop a released name's cached bytes (its slot becomes free)."""
        index = self._by_name.get(name)
        if index is not None and not self._slots[index].in_use:
            self._slots[index].owner = None
            del self._by_name[name]

    def slot_of(self, name: str) -> int | None:
        return self._by_name.get(name)

    def resize(self, num_slots: int) -> int:
        """Grow, or shrink by freeing free slots first and then cached ones (LRU first); slots in use stay.
        Returns the new slot count (at least the number in use). Freed device memory returns to PyTorch's cache;
        call torch.cuda.empty_cache() to hand it back to the driver."""
        num_slots = max(0, int(num_slots))
        while len(self._slots) < num_slots:
            self._slots.append(_Slot())
        if len(self._slots) > num_slots:
            free = [i for i, s in enumerate(self._slots) if s.owner is None and not s.in_use]
            lru = [self._by_name[n] for n in self.cached()]
            drop = set((free + lru)[:len(self._slots) - num_slots])
            for i in drop:
                if self._slots[i].owner is not None:
                    del self._by_name[self._slots[i].owner]
            self._slots = [s for i, s in enumerate(self._slots) if i not in drop]
            self._by_name = {s.owner: i for i, s in enumerate(self._slots) if s.owner is not None}
        return len(self._slots)

    def close(self) -> None:
        self._slots, self._by_name = [], {}

    # --- report --------------------------------------------------------------------------------------------
    def _free_slot(self, *, materialised: bool) -> int | None:
        for i, s in enumerate(self._slots):
            if s.owner is None and not s.in_use and (s.storage is not None) == materialised:
                return i
        return None

    def _update_peaks(self) -> None:
        in_use = reserved = 0
        for s in self._slots:
            in_use += s.in_use
            reserved += s.storage is not None
        self.peak_in_use_bytes = max(self.peak_in_use_bytes, in_use * self.slot_bytes)
        self.peak_reserved_bytes = max(self.peak_reserved_bytes, reserved * self.slot_bytes)

    def report(self) -> dict[str, float]:
        """Sizes in bytes and counters: `reuse_hits` found their own bytes still in a slot; `allocations_avoided`
        were served without creating memory (reuse hits plus reclaimed slots); `allocations` created memory."""
        return {
            "slot_bytes": float(self.slot_bytes),
            "slots": float(self.num_slots),
            "in_use_bytes": float(self.in_use_count() * self.slot_bytes),
            "reserved_bytes": float(self.reserved_bytes()),
            "peak_in_use_bytes": float(self.peak_in_use_bytes),
            "peak_reserved_bytes": float(self.peak_reserved_bytes),
            "requests": float(self.requests),
            "allocations": float(self.allocations),
            "reuse_hits": float(self.reuse_hits),
            "allocations_avoided": float(self.allocations_avoided),
            "evictions": float(self.evictions),
        }


class MemoryManager:
    """Pools of one device by slot size, under an optional budget; thread-safe; allocate/release by name."""

    def __init__(self, device: torch.device | str = "cpu", *, budget_bytes: int | None = None):
        self.device = torch.device(device)
        self.budget_bytes = budget_bytes
        self.pools: dict[str, GPUMemoryPool] = {}
        self._owner: dict[str, str] = {}  # allocation name -> pool name
        self._lock = threading.RLock()

    def add_pool(self, name: str, slot_bytes: int, num_slots: int, *, pin: bool = False) -> GPUMemoryPool:
        with self._lock:
            planned = sum(p.slot_bytes * p.num_slots for p in self.pools.values()) + slot_bytes * num_slots
            if self.budget_bytes is not None and planned > self.budget_bytes:
                raise ValueError(f"memory pools on {self.device} would hold {planned / 1e9:.3f} GB, over the "
                                 f"budget of {self.budget_bytes / 1e9:.3f} GB")
            pool = GPUMemoryPool(slot_bytes, num_slots, self.device, pin=pin, name=name)
            self.pools[name] = pool
            return pool

    def resize(self, pool: str, num_slots: int) -> int:
        with self._lock:
            p = self.pools[pool]
            others = sum(q.slot_bytes * q.num_slots for n, q in self.pools.items() if n != pool)
            if self.budget_bytes is not None:
                num_slots = min(num_slots, max(0, (self.budget_bytes - others) // p.slot_bytes))
            n = p.resize(num_slots)
            if self.device.type == "cuda":
                torch.cuda.empty_cache()  # hand the freed slots back to the driver, where others can see them
            return n

    def _route(self, nbytes: int, pool: str | None) -> GPUMemoryPool:
        if pool is not None:
            return self.pools[pool]
        fits = [p for p in self.pools.values() if p.slot_bytes >= nbytes]
        if not fits:
            sizes = ", ".join(f"{n}: {p.slot_bytes}" for n, p in self.pools.items()) or "none"
            raise ValueError(f"no pool on {self.device} has slots of {nbytes} bytes (pools: {sizes})")
        return min(fits, key=lambda p: p.slot_bytes)

    def allocate(self, name: str, shape: Sequence[int], dtype: torch.dtype = torch.uint8, *, pool: str | None = None,
                 victim: Callable[[list[str]], str | None] | None = None) -> Allocation:
        nbytes = math.prod(shape) * dtype.itemsize
        with self._lock:
            p = self._route(nbytes, pool)
            out = p.allocate(name, shape, dtype, victim=victim)
            self._owner[name] = p.name
            return out

    def release(self, name: str, *, keep: bool = True) -> None:
        with self._lock:
            pool = self._owner.get(name)
            if pool is None:
                raise ValueError(f"{name!r} is not allocated on {self.device}")
            self.pools[pool].release(name, keep=keep)
            if not keep:
                del self._owner[name]

    def report(self) -> dict[str, float]:
        with self._lock:
            out: dict[str, float] = {}
            for name, p in self.pools.items():
                out.update({f"{name}_{k}": v for k, v in p.report().items()})
            return out

    def close(self) -> None:
        with self._lock:
            for p in self.pools.values():
                p.close()
            self.pools, self._owner = {}, {}
