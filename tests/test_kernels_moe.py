"""The grouped MoE expert kernels (ollm_triton/kernels/moe.py) against a float64 reference.

On the CPU the kernels run under the Triton interpreter (fp32; bf16 `tl.dot` is wrong there), on 1, 63 and 129 tokens
with a hidden size and intermediate size that are not multiples of the 64-wide tiles, both weight layouts (qwen's
concatenated gate/up, gpt-oss' transposed interleaved one with biases) and both activations. Every buffer the
kernels write starts as NaN, so a row or column they leave unwritten fails. The `gpu` test covers bf16.
"""

from __future__ import annotations

import pytest
import torch

from ollm_triton.kernels import moe
from ollm_triton.kernels.moe import align_pairs, moe_experts_kernel, moe_experts_torch

pytestmark = [pytest.mark.interpreter, pytest.mark.usefixtures("one_torch_thread")]

E, K, H, I = 6, 2, 40, 24  # noqa: E741


@pytest.fixture
def poisoned(monkeypatch):
    def empty(*shape, **kw):
        t = torch.empty(*shape, **kw)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(moe, "_empty", empty)


def weights(layout, bias, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator(device=device).manual_seed(seed)

    def rnd(*shape, scale=0.2):
        return (torch.randn(*shape, generator=g, device=device) * scale).to(dtype)

    if layout == "concat":
        w_gu, w_d = rnd(E, 2 * I, H), rnd(E, H, I)
    else:
        w_gu, w_d = rnd(E, H, 2 * I), rnd(E, I, H)
    b_gu, b_d = (rnd(E, 2 * I, scale=1.0), rnd(E, H, scale=1.0)) if bias else (None, None)
    return w_gu, w_d, b_gu, b_d


def routing(n, device="cpu", seed=1):
    g = torch.Generator(device=device).manual_seed(seed)
    probs = torch.randn(n, E, generator=g, device=device).softmax(-1)
    w, ex = torch.topk(probs, K, dim=-1)
    return w / w.sum(-1, keepdim=True), ex


def f64(t):
    return None if t is None else t.double()


@pytest.mark.parametrize("n", [1, 63, 129])
@pytest.mark.parametrize("layout,act", [("concat", "silu"), ("interleaved_t", "clamped_swiglu"),
                                        ("interleaved_t", "silu")])
def test_kernel_matches_float64_reference(poisoned, n, layout, act):
    x = torch.randn(n, H, generator=torch.Generator().manual_seed(2)) * 3  # large enough to reach the clamp
    w, ex = routing(n)
    w_gu, w_d, b_gu, b_d = weights(layout, bias=act == "clamped_swiglu")
    ref = moe_experts_torch(f64(x), f64(w), ex, f64(w_gu), f64(w_d), f64(b_gu), f64(b_d), layout=layout, act=act,
                            limit=2.0)
    out = moe_experts_kernel(x, w, ex, w_gu, w_d, b_gu, b_d, layout=layout, act=act, limit=2.0)
    assert out.dtype == x.dtype and out.shape == (n, H)
    err = (out.double() - ref).abs().max().item()
    assert err <= 1e-5 * max(ref.abs().max().item(), 1.0), err


@pytest.mark.parametrize("layout,act", [("concat", "silu"), ("interleaved_t", "clamped_swiglu")])
def test_small_tiles_with_partial_edges(poisoned, layout, act):
    """16-wide tiles: I = 24 spans one full and one partial column tile (gpt-oss' paired tile holds 16 (gate, up)
    pairs, so its second tile is half past 2I), H = 40 two full and one partial k step; a (gate, up) pair split across
    the wrong columns, or a masked edge read, moves the result."""
    x = torch.randn(5, H, generator=torch.Generator().manual_seed(4)) * 3
    w, ex = routing(5)
    w_gu, w_d, b_gu, b_d = weights(layout, bias=act == "clamped_swiglu")
    ref = moe_experts_torch(f64(x), f64(w), ex, f64(w_gu), f64(w_d), f64(b_gu), f64(b_d), layout=layout, act=act,
                            limit=2.0)
    out = moe_experts_kernel(x, w, ex, w_gu, w_d, b_gu, b_d, layout=layout, act=act, limit=2.0, block_m=16,
                             block_n=16, block_k=16)
    err = (out.double() - ref).abs().max().item()
    assert err <= 1e-5 * max(ref.abs().max().item(), 1.0), err


def test_block_rows_cover_every_pair_once():
    """Each pair sits in exactly one row; each block holds one expert's pairs; blocks past the end are -1."""
    n, bm = 37, 16
    _, ex = routing(n)
    pairs, block_expert = align_pairs(ex, E, bm)
    real = pairs[pairs < n * K]
    assert sorted(real.tolist()) == list(range(n * K))
    flat = ex.reshape(-1)
    for b, e in enumerate(block_expert.tolist()):
        rows = pairs[b * bm : (b + 1) * bm]
        rows = rows[rows < n * K]
        if e < 0:
            assert rows.numel() == 0
        else:
            assert rows.numel() > 0 and bool((flat[rows.long()] == e).all())
    # only the experts chosen get blocks (a batch-1 step reads k experts' weights, not E)
    _, one = routing(1)
    _, blocks = align_pairs(one, E, bm)
    assert sorted(e for e in blocks.tolist() if e >= 0) == sorted(one[0].tolist())


def test_tile_follows_the_routing_not_the_call(poisoned, monkeypatch):
    """A call holding part of a routing (some of E = 6 experts' rows, one routing slot of K = 2) tiles as the whole
    routing does when given it: 60 tokens are 120 pairs > 16 x 6 (BLOCK_M 64) where the call's own 60 pairs over 4
    rows would take 16; 40 tokens are 80 <= 96 (16) where 40 over 2 rows would take 64. It then equals the call at
    that explicit BLOCK_M bit for bit, and float64 (prefetch/experts.py's rounds pass the routing through
    engine/moe.py, so a streamed call tiles as the resident one)."""
    tiles = []
    align = moe.align_pairs
    monkeypatch.setattr(moe, "align_pairs", lambda e, n, bm: tiles.append(bm) or align(e, n, bm))
    w_gu, w_d, _, _ = weights("concat", bias=False)
    for n, rows, tile, own in [(60, 4, 64, 16), (40, 2, 16, 64)]:
        x = torch.randn(n, H, generator=torch.Generator().manual_seed(n))
        w, ex = routing(n)
        w, ex = w[:, :1], ex[:, :1] % rows
        tiles.clear()
        out = moe_experts_kernel(x, w, ex, w_gu[:rows], w_d[:rows], routing=(E, K))
        at = moe_experts_kernel(x, w, ex, w_gu[:rows], w_d[:rows], block_m=tile)
        moe_experts_kernel(x, w, ex, w_gu[:rows], w_d[:rows])
        assert tiles == [tile, tile, own]
        assert torch.equal(out, at)
        ref = moe_experts_torch(f64(x), f64(w), ex, f64(w_gu[:rows]), f64(w_d[:rows]))
        assert (out.double() - ref).abs().max().item() <= 1e-5 * max(ref.abs().max().item(), 1.0)


def test_unknown_layout_refuses_in_one_line():
    w, ex = routing(3)
    with pytest.raises(ValueError, match="accepted") as err:
        moe_experts_kernel(torch.randn(3, H), w, ex, *weights("concat", False)[:2], layout="fused")
    assert "\n" not in str(err.value)


@pytest.mark.gpu
@pytest.mark.parametrize("n", [1, 16, 129])
@pytest.mark.parametrize("layout,act", [("concat", "silu"), ("interleaved_t", "clamped_swiglu")])
def test_kernel_bf16_gpu(poisoned, n, layout, act):
    x = torch.randn(n, H, device="cuda").bfloat16()
    w, ex = routing(n, device="cuda")
    w = w.bfloat16()
    w_gu, w_d, b_gu, b_d = weights(layout, bias=act == "clamped_swiglu", dtype=torch.bfloat16, device="cuda")
    ref = moe_experts_torch(f64(x), f64(w), ex, f64(w_gu), f64(w_d), f64(b_gu), f64(b_d), layout=layout, act=act)
    out = moe_experts_kernel(x, w, ex, w_gu, w_d, b_gu, b_d, layout=layout, act=act)
    rel = ((out.double() - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt()).item()
    assert rel < 1e-2, rel
