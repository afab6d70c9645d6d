"""GPUMemoryPool and MemoryManager: reuse by name, LRU reclaim, no fragmentation, resizing, the report."""

from __future__ import annotations

import random
import threading

import pytest
import torch

from ollm_triton.prefetch.pool import PAGE, GPUMemoryPool, MemoryManager, PoolExhausted, aligned_empty


def test_allocate_by_shape_dtype_and_reuse_by_name():
    pool = GPUMemoryPool(1024, 2)
    a = pool.allocate("a", (4, 8), torch.float32)
    assert a.tensor.shape == (4, 8) and a.tensor.dtype == torch.float32 and not a.reused
    a.tensor.fill_(3.0)
    pool.release("a")
    again = pool.allocate("a", (4, 8), torch.float32)
    assert again.reused and again.slot == a.slot and torch.all(again.tensor == 3.0)  # contents still valid
    r = pool.report()
    assert r["allocations"] == 1 and r["reuse_hits"] == 1 and r["allocations_avoided"] == 1 and r["requests"] == 2


def test_lru_reclaims_least_recently_released():
    pool = GPUMemoryPool(256, 2)
    for name in ("a", "b"):
        pool.allocate(name, (256,))
    pool.release("b")
    pool.release("a")  # b is now the least recently released
    c = pool.allocate("c", (16,))
    assert c.evicted == "b" and pool.holds("a") and not pool.holds("b")
    assert pool.cached() == ["a"]
    r = pool.report()
    assert r["allocations"] == 2 and r["evictions"] == 1 and r["allocations_avoided"] == 1
    assert r["peak_in_use_bytes"] == 512 and r["reserved_bytes"] == 512


def test_victim_function_and_exhaustion():
    pool = GPUMemoryPool(64, 2)
    pool.allocate("x", (64,))
    pool.allocate("y", (64,))
    with pytest.raises(PoolExhausted, match="all 2 slots"):
        pool.allocate("z", (8,))
    pool.release("x")
    pool.release("y")
    assert pool.try_allocate("z", (8,), victim=lambda lru: None) is None  # the caller may refuse every victim
    z = pool.allocate("z", (8,), victim=lambda lru: lru[-1])  # most recently released
    assert z.evicted == "y"
    with pytest.raises(ValueError, match="needs 128 bytes"):
        pool.allocate("big", (128,))
    with pytest.raises(ValueError, match="already allocated"):
        pool.allocate("z", (8,))
    with pytest.raises(ValueError, match="not allocated"):
        pool.release("nobody")


def test_release_without_keep_frees_at_once():
    pool = GPUMemoryPool(64, 1)
    pool.allocate("a", (64,))
    pool.release("a", keep=False)
    assert not pool.holds("a")
    b = pool.allocate("a", (64,))
    assert not b.reused and pool.report()["allocations"] == 1  # same memory, but no stale contents claimed


def test_no_fragmentation_under_mixed_sizes():
    rng = random.Random(0)
    pool = GPUMemoryPool(4096, 4)
    live: list[str] = []
    for step in range(500):
        if live and (len(live) == 4 or rng.random() < 0.45):
            pool.release(live.pop(rng.randrange(len(live))), keep=rng.random() < 0.5)
        else:
            name = f"t{step}"
            size = rng.choice([1, 7, 333, 1024, 4095, 4096])
            pool.allocate(name, (size,), torch.uint8)  # never fails while fewer than 4 are in use
            live.append(name)
        assert pool.reserved_bytes() <= 4 * 4096
    r = pool.report()
    assert r["allocations"] <= 4 and r["allocations_avoided"] == r["requests"] - r["allocations"]


def test_resize_drops_free_then_lru_slots_but_never_in_use():
    pool = GPUMemoryPool(64, 4)
    for name in "abcd":
        pool.allocate(name, (64,))
    for name in "abc":
        pool.release(name)
    assert pool.resize(1) == 1 and pool.holds("d") and pool.in_use("d")
    assert pool.resize(0) == 1  # "d" is in use
    pool.release("d")
    assert pool.resize(3) == 3 and pool.cached() == ["d"]


def test_memory_manager_routes_budget_and_threads():
    mm = MemoryManager("cpu", budget_bytes=10_000)
    mm.add_pool("small", 256, 8)
    mm.add_pool("large", 4096, 1)
    assert mm.allocate("s", (100,)).tensor.numel() == 100 and mm.pools["small"].in_use("s")
    assert mm.allocate("l", (1000,), torch.float32).tensor.shape == (1000,) and mm.pools["large"].in_use("l")
    with pytest.raises(ValueError, match="over the budget"):
        mm.add_pool("extra", 4096, 1)
    with pytest.raises(ValueError, match="no pool"):
        mm.allocate("huge", (5000,))
    mm.release("s")
    mm.release("l", keep=False)
    errors = []

    def worker(k):
        try:
            for j in range(200):
                name = f"w{k}.{j}"
                mm.allocate(name, (64,), pool="small")
                mm.release(name, keep=False)
        except Exception as e:  # pragma: no cover - a failure is reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    report = mm.report()
    assert report["small_requests"] == 801 and report["small_allocations"] <= 8


def test_aligned_empty_is_page_aligned():
    for n in (1, 4097, 1 << 20):
        t = aligned_empty(n, "cpu")
        assert t.numel() == n and t.data_ptr() % PAGE == 0
