"""The Gluon MMA decode's cp.async ring (mma_stages >= 2) and its varlen entry (quant_decode_varlen on the MMA
kernel, each row's lengths read on the device).

On the CPU: the occupancy arithmetic the split count rests on, the launch options' checks and the kernel choice
(the interpreter keeps the Triton-language kernel). On the GPU: every ring depth and step size against the float64
reference and against the register pipeline (the same arithmetic, so nearly bit for bit), odd lengths, windows,
empty splits; the varlen entry over rows of odd lengths with poisoned partials and outputs, and replayed from a
CUDA graph whose lengths change between replays.
"""

from __future__ import annotations

import pytest
import torch
from test_kernels_quant import _quantized_cache, rel_rms

from ollm_triton.kernels import kv_quant_decode as KQ
from ollm_triton.kernels import kv_quant_decode_mma as M
from ollm_triton.kernels import quant as Q
from ollm_triton.kernels.kv_quant_decode import (
    quant_decode,
    quant_decode_ref,
    quant_decode_varlen,
    quant_decode_varlen_ref,
    visible_mask,
)


def test_occupancy_follows_registers_and_shared_memory():
    """The AOT numbers of the sm_90 build (Triton 3.6): the register pipeline at 220 registers and no shared
    memory fits 8 one-warp programs an SM; the int4 ring at 2 stages (168 registers, 17,920 bytes) 12; at 3 stages
    (163, 26,880) registers would allow 12 but shared memory 8; int8's ring (130 registers, 26,496 bytes) 8."""
    assert M.occupancy(220, 0) == 8
    assert M.occupancy(256, 0) == 8  # 225-256 registers still give 2 warps a scheduler
    assert M.occupancy(168, 17920) == 12
    assert M.occupancy(169, 17920) == 8
    assert M.occupancy(163, 26880) == 8
    assert M.occupancy(130, 26496) == 8
    assert M.occupancy(64, 0) == 32  # the resident-block limit


def test_launch_options_checked():
    assert M.launch_defaults(4) == M.DEFAULTS[4]
    assert M.launch_defaults(4, stages=3) == (M.DEFAULTS[4][0], M.DEFAULTS[4][1], 3)
    assert M.launch_defaults(8, block_n=64) == (64, None, M.DEFAULTS[8][2])
    with pytest.raises(ValueError, match="mma stages must be 1 .* or >= 2 .*steps of >= 32 keys"):
        M.check_stages(0, 64)
    with pytest.raises(ValueError, match="got stages=2 with 16-key steps"):
        M.check_stages(2, 16)


def test_ring_needs_aligned_scale_rows():
    """cp.async copies >= 4 bytes: the ring takes scales and zeros whose bases are 16-byte aligned and strides
    divisible by 16 or unit (what the JIT can prove); a default ring falls back to registers, an explicit one is
    refused in one line."""
    aligned = torch.zeros(2, 1280, 1, dtype=torch.float16)  # [B*Hkv, tokens, value groups]
    odd = torch.zeros(2, 1283, 1, dtype=torch.float16)
    keys = torch.zeros(2, 10, 128, dtype=torch.float16)  # [B*Hkv, groups, D]
    assert M.ring_fits(aligned, None, keys) and not M.ring_fits(keys, odd)
    assert not M.ring_fits(torch.zeros(2 * 1280 + 1, dtype=torch.float16)[1:].view(2, 1280, 1))  # base misaligned
    assert M.pick_stages(3, False, aligned, keys) == 3 and M.pick_stages(3, False, odd) == 1
    assert M.pick_stages(1, True, odd) == 1
    with pytest.raises(ValueError, match=r"mma_stages=2 needs the scales and zeros 16-byte aligned .*use mma_stages=1"):
        M.pick_stages(2, True, odd)


def _varlen_storage(b, h, d, cap, res_cap, bits, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(b, h, cap, d, generator=g).to(torch.bfloat16)
    v = torch.randn(b, h, cap, d, generator=g).to(torch.bfloat16)
    sdtype = Q.scale_dtype_for(torch.bfloat16)  # as the cache stores them
    kc, ks, kz = Q.quantize_keys_ref(k, bits, 128, False, sdtype)
    vc, vs, vz = Q.quantize_values_ref(v, bits, d, False, sdtype)
    kr = torch.randn(b, h, res_cap, d, generator=g).to(torch.bfloat16)
    vr = torch.randn(b, h, res_cap, d, generator=g).to(torch.bfloat16)
    return [x.to(device) for x in (kc, ks, kz, vc, vs, vz, kr, vr)]


@pytest.mark.interpreter
def test_varlen_keeps_the_triton_kernel_on_the_cpu_and_refuses_mma_clearly():
    b, h, d = 2, 1, 128
    store = _varlen_storage(b, h, d, 256, 64, 4, "cpu")
    q = torch.randn(b, 4, 1, d).to(torch.float16)
    store = [x.to(torch.float16) if x.is_floating_point() else x for x in store]
    rq, ln = torch.tensor([0, 128]), torch.tensor([5, 128 + 63])
    got = quant_decode_varlen(q, *store, rq, ln, bits=4, key_group=128, value_group=d, block_k=128)
    assert KQ.LAST_LAUNCH["kernel"] == "triton.varlen"
    want = quant_decode_varlen_ref(q, *store, [0, 128], [5, 191], bits=4, key_group=128, value_group=d,
                                   compute_dtype=torch.float64)
    assert rel_rms(want, got) < 1e-2
    with pytest.raises(ValueError, match="kernel='mma' cannot serve this call: it runs on a GPU only"):
        quant_decode_varlen(q, *store, rq, ln, bits=4, key_group=128, value_group=d, block_k=128, kernel="mma")


# (bits, keys a step, stages): each ring depth and step size once, every width once (compiles cost GPU-call time)
RING = [(4, 64, 2), (4, 64, 3), (4, 32, 4), (8, 32, 3), (2, 32, 2)]


@pytest.mark.gpu
@pytest.mark.parametrize("bits,bn,stages", RING)
def test_ring_matches_reference_and_registers_gpu(bits, bn, stages):
    """A split of one sub-block up to many, groups crossing steps (bn < block_k), an odd residual tail, a window
    schedule with a sink: against float64, and against the register pipeline (the same arithmetic)."""
    store, k_deq, v_deq = _quantized_cache(1, 3, 128, 1280, 63, bits, 128, 128, False, torch.bfloat16, "cuda",
                                           seed=bits)
    q = torch.randn(1, 12, 1, 128, device="cuda", dtype=torch.bfloat16)
    ids = torch.tensor([0, 4, 5, 6, 7, 8, 9, 10], dtype=torch.int32)
    kw = dict(n_quant=1280, kv_len=1343, bits=bits, key_group=128, value_group=128, block_k=128, kernel="mma",
              mma_block_n=bn)
    for block_ids, window, sink, splits in ((None, 0, 0, None), (None, 0, 0, 3), (ids, 700, 2, None)):
        out = torch.full_like(q, float("nan"))
        quant_decode(q, *store, block_ids=block_ids, window=window, sink=sink, num_splits=splits, mma_stages=stages,
                     out=out, **kw)
        mask = visible_mask(1, 1343, block_ids=block_ids, window=window, sink=sink, block_k=128, device="cuda")
        assert not out.isnan().any()
        assert rel_rms(quant_decode_ref(q, k_deq, v_deq, mask), out) < 1e-2
        if splits is not None:  # the same splits: the same keys a split, the same operations in the same order
            # (without the schedule only: one compile less a case, each costs device time)
            regs = quant_decode(q, *store, block_ids=block_ids, window=window, sink=sink, num_splits=splits,
                                mma_stages=1, **kw)
            assert rel_rms(regs.float(), out.float()) < 1e-4


@pytest.mark.gpu
@pytest.mark.parametrize("stages", [3])
def test_ring_symmetric_two_tokens_eight_rows_gpu(stages):
    """Symmetric codes (no zeros: the ring copies the scales twice), T = 2 (causal rows), 8 query rows a KV head,
    head_dim 64."""
    for bits, d, gq, t, symmetric in ((4, 128, 4, 2, True), (8, 64, 8, 1, False), (4, 64, 4, 1, True)):
        store, k_deq, v_deq = _quantized_cache(2, 2, d, 640, 5, bits, 128, d, symmetric, torch.bfloat16, "cuda")
        q = torch.randn(2, 2 * gq, t, d, device="cuda", dtype=torch.bfloat16)
        out = quant_decode(q, *store, n_quant=640, kv_len=645, bits=bits, key_group=128, value_group=d, block_k=128,
                           kernel="mma", mma_block_n=32, mma_stages=stages)
        assert rel_rms(quant_decode_ref(q, k_deq, v_deq, visible_mask(t, 645, device="cuda")), out) < 1e-2


@pytest.mark.gpu
def test_ring_really_reads_the_codes_gpu():
    """Corrupting one byte column of the quantized values, then of the keys, moves the ring's output."""
    store, _, _ = _quantized_cache(1, 1, 128, 512, 4, 4, 128, 128, False, torch.bfloat16, "cuda")
    q = torch.randn(1, 4, 1, 128, device="cuda", dtype=torch.bfloat16, generator=torch.Generator("cuda").manual_seed(0))
    kw = dict(n_quant=512, kv_len=516, bits=4, key_group=128, value_group=128, block_k=128, kernel="mma",
              mma_stages=3, num_splits=2)
    before = quant_decode(q, *store, **kw)
    store[3][0, 0, :512, 7] ^= 0xFF
    mid = quant_decode(q, *store, **kw)
    store[0][0, 0, :512, 3] ^= 0xFF
    after = quant_decode(q, *store, **kw)
    assert (before - mid)[..., 14:16].abs().min() > 1e-2 and (mid - after).abs().max() > 1e-2


# rows: nothing quantized (1 token, a window of 63), one group + 1, groups + a partial window, a full window, long
ROWS = ([0, 0, 128, 1024, 2048, 4096], [1, 63, 129, 1024 + 129, 2048 + 255, 4096 + 1])


@pytest.mark.gpu
@pytest.mark.parametrize("bits,opts", [(4, {}), (4, {"min_blocks": 1}), (8, {"min_blocks": 4, "num_splits": 5}),
                                       (4, {"mma_stages": 2}), (8, {"mma_stages": 3, "mma_block_n": 32})])
def test_varlen_mma_rows_match_reference_gpu(monkeypatch, bits, opts):
    """Each row at its own length through the MMA kernel: splits past a row's blocks and residual programs past
    its window write empty partials (poisoned here: each must be written), every output row is written."""
    b, hq, h, d, res_cap, cap = len(ROWS[0]), 32, 8, 128, 256, 4096
    store = _varlen_storage(b, h, d, cap, res_cap, bits, "cuda")
    empty = KQ._partials
    monkeypatch.setattr(KQ, "_partials", lambda *a: tuple(x.fill_(float("nan")) for x in empty(*a)))
    q = torch.randn(b, hq, 1, d, device="cuda", dtype=torch.bfloat16)
    got = quant_decode_varlen(q, *store, torch.tensor(ROWS[0], device="cuda"), torch.tensor(ROWS[1], device="cuda"),
                              bits=bits, key_group=128, value_group=d, block_k=128,
                              out=torch.full_like(q, float("nan")), **opts)
    assert KQ.LAST_LAUNCH["kernel"] == "mma.varlen"
    want = quant_decode_varlen_ref(q, *store, *ROWS, bits=bits, key_group=128, value_group=d,
                                   compute_dtype=torch.float64)
    assert not got.isnan().any()
    for r in range(b):  # row by row: a row that read another row's lengths would fail alone
        assert rel_rms(want[r], got[r]) < 1e-2, r
    tri = quant_decode_varlen(q, *store, torch.tensor(ROWS[0], device="cuda"), torch.tensor(ROWS[1], device="cuda"),
                              bits=bits, key_group=128, value_group=d, block_k=128, kernel="triton")
    assert rel_rms(tri.float(), got.float()) < 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("stages", [1, 3])
def test_varlen_mma_graph_replays_follow_the_lengths_gpu(stages):
    """Captured once, replayed after the rows' lengths changed on the device (the static step's contract): each
    replay attends the new lengths, growing across a group boundary and shrinking to one token."""
    b, hq, h, d, res_cap, cap = 3, 32, 8, 128, 256, 2048
    store = _varlen_storage(b, h, d, cap, res_cap, 4, "cuda", seed=3)
    q = torch.randn(b, hq, 1, d, device="cuda", dtype=torch.bfloat16)
    rq = torch.tensor([128, 0, 1024], device="cuda")
    ln = torch.tensor([128 + 100, 1, 1024 + 200], device="cuda")
    out = torch.empty_like(q)
    kw = dict(bits=4, key_group=128, value_group=d, block_k=128, mma_stages=stages, out=out)
    quant_decode_varlen(q, *store, rq, ln, **kw)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        quant_decode_varlen(q, *store, rq, ln, **kw)
    for new_q, new_len in (([128, 0, 1024], [128 + 101, 1, 1024 + 201]), ([256, 128, 1920], [256 + 1, 128 + 255,
                                                                                              1920 + 128]),
                           ([0, 0, 0], [1, 1, 1])):
        rq.copy_(torch.tensor(new_q)), ln.copy_(torch.tensor(new_len))
        out.fill_(float("nan"))
        graph.replay()
        want = quant_decode_varlen_ref(q, *store, new_q, new_len, bits=4, key_group=128, value_group=d,
                                       compute_dtype=torch.float64)
        assert rel_rms(want, out) < 1e-2, new_len
