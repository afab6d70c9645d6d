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


def mxfp4_weights(layout, bias, h=96, i=32, device="cpu"):
    """MXFP4 stacks of random weights (H = 96: three 32-code groups, a tile and a half of 64; I = 32) in the layout's
    row order (output rows along K), and the biases."""
    from ollm_triton.kernels.mxfp4 import quantize_mxfp4

    g = torch.Generator().manual_seed(3)
    w_gu, w_d = torch.randn(E, 2 * i, h, generator=g) * 0.2, torch.randn(E, h, i, generator=g) * 0.2
    if layout == "interleaved_t":  # gate n and up n adjacent rows, as gpt-oss stores them
        w_gu = torch.stack((w_gu[:, :i], w_gu[:, i:]), dim=2).reshape(E, 2 * i, h)
    b_gu, b_d = (torch.randn(E, 2 * i, generator=g), torch.randn(E, h, generator=g)) if bias else (None, None)
    move = (lambda t: None if t is None else t.to(device))
    mx_gu, mx_d = quantize_mxfp4(w_gu), quantize_mxfp4(w_d)
    return (type(mx_gu)(*map(move, mx_gu)), type(mx_d)(*map(move, mx_d)), move(b_gu), move(b_d))


@pytest.mark.parametrize("swap", [False, True])
@pytest.mark.parametrize("n", [1, 63])
@pytest.mark.parametrize("layout,act", [("concat", "silu"), ("interleaved_t", "clamped_swiglu")])
def test_mxfp4_weights_read_directly_match_float64(poisoned, n, layout, act, swap):
    """The kernels reading MXFP4 bytes (two codes a byte, a power-of-two scale per 32) equal the float64 reference
    over the dequantized matrices (kernels/mxfp4.py), with the weights as the dot's right operand or (swap) its
    left; a wrong nibble order, sign or scale moves the result."""
    mx_gu, mx_d, b_gu, b_d = mxfp4_weights(layout, bias=act == "clamped_swiglu")
    x = torch.randn(n, 96, generator=torch.Generator().manual_seed(5)) * 3
    w, ex = routing(n)
    ref = moe_experts_torch(f64(x), f64(w), ex, mx_gu, mx_d, f64(b_gu), f64(b_d), layout=layout, act=act, limit=2.0)
    out = moe_experts_kernel(x, w, ex, mx_gu, mx_d, b_gu, b_d, layout=layout, act=act, limit=2.0, mx_swap=swap)
    err = (out.double() - ref).abs().max().item()
    assert err <= 1e-5 * max(ref.abs().max().item(), 1.0), err
    with pytest.raises(ValueError, match="both MXFP4 or neither"):
        moe_experts_kernel(x, w, ex, mx_gu, mx_d.dense(x.dtype, transposed=layout == "interleaved_t"), layout=layout)


@pytest.mark.parametrize("n", [1, 63])
@pytest.mark.parametrize("layout,act", [("concat", "silu"), ("interleaved_t", "clamped_swiglu")])
def test_mxfp4_through_dot_scaled_matches_float64(poisoned, n, layout, act):
    """The tl.dot_scaled variant (fp16 activations: the formats it accepts are 16-bit) equals the float64 reference
    over the dequantized matrices to fp16's rounding of the intermediate, as the other MXFP4 path does; fp32
    activations are refused in one line."""
    mx_gu, mx_d, b_gu, b_d = mxfp4_weights(layout, bias=act == "clamped_swiglu")
    x = torch.randn(n, 96, generator=torch.Generator().manual_seed(5)).half()
    w, ex = routing(n)
    ref = moe_experts_torch(f64(x), f64(w), ex, mx_gu, mx_d, f64(b_gu), f64(b_d), layout=layout, act=act, limit=2.0)
    half = (lambda t: None if t is None else t.half())
    out = moe_experts_kernel(x, w.half(), ex, mx_gu, mx_d, half(b_gu), half(b_d), layout=layout, act=act, limit=2.0,
                             mx_dot_scaled=True)
    rel = ((out.double() - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt()).item()
    assert rel < 2e-3, rel
    with pytest.raises(ValueError, match="mx_dot_scaled with torch.float32 activations"):
        moe_experts_kernel(x.float(), w, ex, mx_gu, mx_d, layout=layout, act=act, mx_dot_scaled=True)


def test_mxfp4_round_trip_is_exact_on_representable_values():
    """quantize(dequantize(codes, scales)) gives back the codes and scales wherever a group holds a +-6 (its scale
    is then the one that was drawn), and every value lands within half a code step otherwise."""
    from ollm_triton.kernels.mxfp4 import MXFP4, dequantize_mxfp4, quantize_mxfp4

    g = torch.Generator().manual_seed(6)
    codes = torch.randint(0, 16, (2, 3, 4, 32), generator=g, dtype=torch.uint8)
    codes[..., 0] = 7  # +6: each group's largest magnitude is 6 x its scale
    scales = torch.randint(120, 135, (2, 3, 4), generator=g, dtype=torch.uint8)
    blocks = codes[..., 0::2] | (codes[..., 1::2] << 4)
    w = dequantize_mxfp4(blocks, scales, torch.float32)
    back = quantize_mxfp4(w)
    negative_zero = (codes == 8)  # -0 comes back as +0: the same value
    assert torch.equal(back.scales, scales)
    got = torch.stack((back.blocks & 15, back.blocks >> 4), dim=-1).flatten(-2)
    assert torch.equal(torch.where(negative_zero, torch.zeros_like(codes), codes), got)
    assert torch.equal(MXFP4(back.blocks, back.scales).dense(torch.float32, transposed=False), w.reshape(2, 3, 128))
    x = torch.randn(2, 3, 64, generator=g)
    q = quantize_mxfp4(x).dense(torch.float32, transposed=False)
    step = torch.exp2(torch.ceil(torch.log2(x.reshape(2, 3, 2, 32).abs().amax(-1) / 6)))  # the scale of each group
    assert ((q - x).reshape(2, 3, 2, 32).abs() <= step[..., None] * 1.0 + 1e-7).all()  # the widest code gap is 2


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


@pytest.mark.gpu
@pytest.mark.parametrize("swap", [False, True, "dot_scaled"])
@pytest.mark.parametrize("n", [1, 16, 129])
def test_mxfp4_kernel_bf16_gpu(poisoned, n, swap):
    mx_gu, mx_d, b_gu, b_d = mxfp4_weights("interleaved_t", bias=True, device="cuda")
    x = torch.randn(n, 96, device="cuda").bfloat16()
    w, ex = routing(n, device="cuda")
    w = w.bfloat16()
    ref = moe_experts_torch(f64(x), f64(w), ex, mx_gu, mx_d, f64(b_gu), f64(b_d), layout="interleaved_t",
                            act="clamped_swiglu")
    out = moe_experts_kernel(x, w, ex, mx_gu, mx_d, b_gu.bfloat16(), b_d.bfloat16(), layout="interleaved_t",
                             act="clamped_swiglu", mx_swap=swap is True, mx_dot_scaled=swap == "dot_scaled")
    rel = ((out.double() - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt()).item()
    assert rel < 1e-2, rel
