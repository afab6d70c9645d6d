"""Block schedules, sparse patterns, the multiscale partition and the adaptive chooser (plain CPU, no kernels)."""

import pytest
import torch

from ollm_triton.attention.adaptive import AdaptiveConfig, choose_attention_mechanism
from ollm_triton.kernels.attention_multiscale import check_scales, exact_mask, summary_mask
from ollm_triton.kernels.attention_schedule import (
    SparsePattern,
    block_uniform,
    build_schedule,
    decode_block_ids,
    schedule_to_mask,
)
from ollm_triton.registry import PluginError, registry


def intended_mask(t, s, q_offset, window=0, sink=0, tree=None):
    """The element rules written out directly, independently of the schedule code."""
    p = torch.arange(q_offset, q_offset + t)[:, None]
    k = torch.arange(s)[None, :]
    m = k <= p
    if tree is not None:
        m[:, s - t :] = tree
    if window:
        m &= (k < sink) | (k > p - window)
    return m


def check_tiles(sched, mask):
    """Every visible pair lies in a listed tile; a tile listed as full has every pair of valid rows visible."""
    bm, bn = sched.block_m, sched.block_n
    first = sched.q_offset // bm
    for i in range(sched.n_q_tiles):
        r0 = max((first + i) * bm - sched.q_offset, 0)
        r1 = min((first + i + 1) * bm - sched.q_offset, sched.q_len)
        listed = sched.kv_blocks[i, : sched.kv_total[i]].tolist()
        assert listed == sorted(listed[: sched.kv_full[i]]) + sorted(listed[sched.kv_full[i] :])
        for j in range((sched.kv_len + bn - 1) // bn):
            tile = mask[r0:r1, j * bn : (j + 1) * bn]
            if j in listed[: sched.kv_full[i]]:
                assert tile.all() and tile.shape[1] == bn
            elif j not in listed:
                assert not tile.any()


@pytest.mark.parametrize("t, s, q_offset, window, sink, bm, bn", [
    (1, 1, 0, 0, 0, 16, 16), (63, 63, 0, 0, 0, 16, 32), (129, 129, 0, 0, 0, 64, 32), (50, 300, 250, 0, 0, 32, 16),
    (129, 129, 0, 17, 3, 32, 16), (40, 500, 460, 100, 4, 16, 32), (200, 200, 0, 64, 0, 64, 64),
])
def test_schedule_means_the_intended_mask(t, s, q_offset, window, sink, bm, bn):
    sched = build_schedule(t, s, q_offset, bm, bn, window=window, sink=sink)
    mask = schedule_to_mask(sched)
    assert torch.equal(mask, intended_mask(t, s, q_offset, window, sink))
    check_tiles(sched, mask)
    part = schedule_to_mask(sched, rows=slice(5, 9))
    assert torch.equal(part, mask[5:9])


def test_tree_schedule():
    t, s = 7, 40
    tree = torch.rand(t, t, generator=torch.Generator().manual_seed(1)) < 0.5
    sched = build_schedule(t, s, s - t, 16, 16, tree=True)
    mask = schedule_to_mask(sched, tree)
    assert torch.equal(mask, intended_mask(t, s, s - t, tree=tree))
    check_tiles(sched, mask)
    with pytest.raises(ValueError, match="tree"):
        schedule_to_mask(sched)


@pytest.mark.parametrize("kind", ["local", "strided", "random", "bigbird"])
def test_sparse_patterns(kind):
    pattern = SparsePattern(kind=kind, block_size=32, density=0.25, num_global=1, seed=3)
    s = 32 * 40 - 5
    sched = build_schedule(s, s, 0, 16, 32, pattern=pattern)
    mask = schedule_to_mask(sched)
    n = 40
    rows = pattern.rows(torch.arange(n), n)
    blocks = rows.repeat_interleave(32, 0).repeat_interleave(32, 1)[:s, :s]
    assert torch.equal(mask, blocks & intended_mask(s, s, 0))
    check_tiles(sched, mask)
    assert rows.diagonal().all() and rows[:, 0].all()  # own block and the global block always
    density = pattern.density_of(n)
    assert 0.15 < density < 0.4, density
    # The same (query block, key block) pair keeps its decision at another length (prefill and decode agree).
    if kind == "random":
        longer = pattern.rows(torch.arange(n), 2 * n)[:, :n]
        assert torch.equal(longer, rows)


def test_density_hits_target():
    for kind in ["local", "random", "bigbird"]:
        for d in [0.5, 0.25, 0.125]:
            got = SparsePattern(kind=kind, block_size=128, density=d).density_of(256)
            assert abs(got - d) < 0.05 * max(1, 4 * d), (kind, d, got)


def test_block_uniform_is_uniform_and_seeded():
    qb = torch.arange(300)[:, None]
    kb = torch.arange(300)[None, :]
    u = block_uniform(0, qb, kb)
    assert 0.45 < float(u.mean()) < 0.55 and float(u.min()) >= 0 and float(u.max()) < 1
    assert not torch.equal(u, block_uniform(1, qb, kb))


def test_decode_block_ids_match_last_row():
    s, t, block = 1000, 3, 16
    ids = decode_block_ids(s, t, block, window=100, sink=4)
    mask = intended_mask(t, s, s - t, window=100, sink=4)
    need = sorted({i // block for i in torch.nonzero(mask.any(0)).flatten().tolist()})
    assert ids.tolist() == need
    assert decode_block_ids(s, 1, block) is None
    pattern = SparsePattern(kind="bigbird", block_size=64, density=0.3)
    ids = decode_block_ids(s, 1, 16, pattern=pattern)
    row = pattern.rows(torch.tensor([(s - 1) // 64]), (s + 63) // 64)[0]
    assert ids.tolist() == [j for j in range((s + 15) // 16) if row[j * 16 // 64]]
    with pytest.raises(ValueError, match="divide"):
        decode_block_ids(s, 1, 128, pattern=pattern)


@pytest.mark.parametrize("t, s, q_offset, window, scales", [
    (200, 200, 0, 30, (8, 32)), (50, 333, 283, 7, (4, 16, 64)), (64, 64, 0, 100, (16,)),
])
def test_multiscale_partition_covers_each_key_once(t, s, q_offset, window, scales):
    exact = exact_mask(t, s, q_offset, window, scales).int()
    summary, bias = summary_mask(t, s, q_offset, window, scales)
    cover, col = exact.clone(), 0
    for f in scales:
        for j in range(s // f):
            cover[:, j * f : (j + 1) * f] += summary[:, col + j : col + j + 1].int()
        col += s // f
    assert torch.equal(cover, intended_mask(t, s, q_offset).int())
    assert bias.shape[0] == summary.shape[1]


def test_check_scales():
    check_scales(16, (8, 32, 128))
    for bad in [(), (8, 12), (32, 16), (1,)]:
        with pytest.raises(ValueError):
            check_scales(16, bad)


def test_choose_attention_mechanism():
    assert choose_attention_mechanism(100, 80.0) == "flash"
    assert choose_attention_mechanism(100, 0.5) == "flash"
    assert choose_attention_mechanism(2048, 80.0) == "flash"
    assert choose_attention_mechanism(2048, 1.0) == "sliding_window"
    assert choose_attention_mechanism(32768, 80.0) == "sparse"
    assert choose_attention_mechanism(32768, 1.0) == "sliding_window"
    assert choose_attention_mechanism(600, 80.0, short_seq_threshold=1024) == "flash"
    assert choose_attention_mechanism(5000, 80.0, long_seq_threshold=8192) == "flash"


@pytest.mark.parametrize("name, params, match", [
    ("sliding_window", {"window": 0}, "window"),
    ("sparse", {"pattern": "diagonal"}, "pattern"),
    ("sparse", {"block_size": 100}, "block_size"),
    ("sparse", {"density": 0.0}, "density"),
    ("multiscale", {"scales": [64, 100]}, "scales"),
    ("adaptive", {"short_seq_threshold": 5000}, "threshold"),
])
def test_bad_parameters_name_the_problem(name, params, match):
    with pytest.raises(PluginError, match=match):
        registry.build("attention", name, params)


def test_adaptive_defaults():
    cfg = AdaptiveConfig()
    assert (cfg.short_seq_threshold, cfg.long_seq_threshold) == (512, 4096)
