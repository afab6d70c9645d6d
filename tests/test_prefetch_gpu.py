"""Layer streaming on CUDA: bf16 logits equal the resident run exactly for every policy and tier, the host images
are page-locked, peak device memory stays within the budget, and lookahead hides copies behind compute."""

from __future__ import annotations

import time

import pytest
import torch

from ollm_triton.engine import load_engine
from ollm_triton.prefetch.loader import kvikio_available
from ollm_triton.registry import registry

pytestmark = pytest.mark.gpu

CFG = dict(model_type="llama", vocab_size=512, hidden_size=256, intermediate_size=704, num_hidden_layers=5,
           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5)
# one Llama-3-8B-sized layer (436 MB in bf16) six times: copies take milliseconds, as in the real model
BIG = dict(model_type="llama", vocab_size=1024, hidden_size=4096, intermediate_size=14336, num_hidden_layers=6,
           num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=16384)
PROMPT = torch.arange(3, 40).reshape(1, -1) % 500


def _run(cfg, prefetch, steps=3):
    engine = load_engine(cfg, prefetch=prefetch, device="cuda", dtype=torch.bfloat16)
    cache = engine.new_cache(1, 64)
    outs = [engine.forward(PROMPT, cache)]
    for _ in range(steps):
        outs.append(engine.forward(outs[-1][:, -1:].argmax(-1), cache))
    stats = engine.prefetch.stats()
    return engine, outs, stats


@pytest.fixture(scope="module")
def resident():
    engine, outs, _ = _run(CFG, None)
    engine.close()
    return outs


@pytest.mark.parametrize("tier", ["cpu", "disk"])
@pytest.mark.parametrize(("name", "params"), [
    ("on_demand", {}), ("lookahead", {"prefetch_distance": 2, "max_cache_size": 3}),
    ("lookahead", {"prefetch_distance": 1, "max_cache_size": 3, "eviction": "next_use"}),
    ("adaptive", {}), ("memory_aware", {}),
])
def test_bf16_logits_equal_resident(name, params, tier, resident, tmp_path):
    policy = registry.build("prefetch", name, {**params, "tier": tier, "cache_dir": str(tmp_path)})
    engine, outs, st = _run(CFG, policy)
    assert all(torch.equal(a, b) for a, b in zip(resident, outs, strict=True))
    assert st["hits"] + st["misses"] == st["accesses"] == CFG["num_hidden_layers"] * 4
    if tier == "cpu":
        assert policy.store.is_page_locked(0)
    assert policy.loader.stream is not None and engine.describe()["prefetch"] == name
    engine.close()


@pytest.mark.skipif(not kvikio_available(), reason="kvikio is not installed")
def test_kvikio_loader_equals_resident(resident, tmp_path):
    policy = registry.build("prefetch", "lookahead", {"tier": "disk", "cache_dir": str(tmp_path), "loader": "kvikio"})
    engine, outs, st = _run(CFG, policy)
    assert policy.loader.kind == "kvikio" and st["kvikio"] == 1.0
    assert all(torch.equal(a, b) for a, b in zip(resident, outs, strict=True))
    engine.close()


def _timed_prefill(policy, tokens):
    engine = load_engine(BIG, prefetch=policy, device="cuda", dtype=torch.bfloat16)
    ids = torch.randint(0, BIG["vocab_size"], (1, tokens), generator=torch.Generator().manual_seed(0))
    times, logits = [], None
    for _ in range(2):  # the first pass warms kernels and the allocator
        cache = engine.new_cache(1, tokens)
        torch.cuda.synchronize()
        t = time.perf_counter()
        logits = engine.forward(ids, cache, last_only=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    peak = torch.cuda.max_memory_allocated()
    stats = policy.stats()
    engine.close()
    return times[-1], logits, stats, peak


def test_lookahead_hides_copies_behind_compute_within_budget():
    budget_gb = 5.0  # head (8 MB) + 3 slots of 436 MB + 3.5 GB headroom for an 8k-token prefill
    common = {"tier": "cpu", "budget_gb": budget_gb, "headroom_gb": 3.5}
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    t_od, out_od, st_od, _ = _timed_prefill(registry.build("prefetch", "on_demand", common), 8192)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    look = registry.build("prefetch", "lookahead", {**common, "prefetch_distance": 2, "max_cache_size": 3})
    t_la, out_la, st_la, peak = _timed_prefill(look, 8192)
    assert torch.equal(out_od, out_la)
    assert peak <= budget_gb * 1e9, f"peak {peak / 1e9:.2f} GB over the {budget_gb} GB budget"
    assert st_la["overlap_efficiency"] > st_od["overlap_efficiency"] + 0.2, (st_od, st_la)
    assert t_la < 0.85 * t_od, f"lookahead {t_la:.3f} s vs on_demand {t_od:.3f} s"
