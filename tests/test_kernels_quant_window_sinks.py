"""Sliding windows and attention sinks in the quantized static decode step (gpt-oss with +cache=int4).

`quant_decode_varlen` takes the layer's window (each row attends its last `window` keys; quantized blocks wholly
before them are not visited) and its per-head sink logits (the split merge's extra denominator term). Checked
against a float64 definition written here (softmax over [scores of the window's keys, sink], the sink's column
dropped, keys dequantized from the codes), at odd lengths with windows ending inside and before the quantized
region and longer than the row, poisoned outputs; then gpt-oss' tiny random model with the int4 cache runs the
whole static step (no longer refused) and gives the eager engine's logits past its 8-key window and a group flush.
"""

from __future__ import annotations

import pytest
import torch
from test_static_window_sinks import GPT_OSS, check_captured_gpt_oss, gpt_oss, recording

from ollm_triton.decoding.greedy import decode_loop
from ollm_triton.engine.fast_decode import FastDecoder, capture_blocker
from ollm_triton.kernels import quant as Q
from ollm_triton.kernels.kv_quant_decode import quant_decode_varlen, quant_decode_varlen_ref
from ollm_triton.registry import registry

B, HQ, HKV, D, GROUP, RES_CAP, CAP = 3, 4, 2, 32, 16, 40, 96
# (quantized tokens, length) a row: nothing quantized; a window ending inside the codes; a long row
ROWS = ([0, 16, 80], [7, 16 + 33, 80 + 17])
SINKS = {"none": None, "mixed": torch.tensor([-3.0, 1.5, -0.5, 6.0])}


def storage(bits, seed=0, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(B, HKV, CAP, D, generator=g)
    v = torch.randn(B, HKV, CAP, D, generator=g)
    sd = Q.scale_dtype_for(dtype)
    kq = Q.quantize_keys_ref(k.to(dtype), bits, GROUP, False, sd)
    vq = Q.quantize_values_ref(v.to(dtype), bits, D, False, sd)
    kr = torch.randn(B, HKV, RES_CAP, D, generator=g).to(dtype)
    vr = torch.randn(B, HKV, RES_CAP, D, generator=g).to(dtype)
    return [x.to(device) for x in (*kq, *vq, kr, vr)]


def definition(q, store, row_quant, lengths, bits, window, sinks):
    """float64 from the definition, head by head: the row's codes dequantized, then its window tokens."""
    kc, ks, kz, vc, vs, vz, kr, vr = [x.cpu() for x in store]
    out = torch.zeros(q.shape, dtype=torch.float64)
    for b, (nq, n) in enumerate(zip(row_quant, lengths, strict=True)):
        k = torch.cat((Q.dequantize_keys_ref(kc[b, :, :nq], ks[b, :, : nq // GROUP], kz[b, :, : nq // GROUP], bits,
                                             GROUP, D).double(), kr[b, :, : n - nq].double()), 1)
        v = torch.cat((Q.dequantize_values_ref(vc[b, :, :nq], vs[b, :, :nq], vz[b, :, :nq], bits, D, D).double(),
                       vr[b, :, : n - nq].double()), 1)
        lo = max(0, n - window) if window else 0
        for h in range(HQ):
            kv = h // (HQ // HKV)
            s = k[kv, lo:n] @ q[b, h, 0].double().cpu() / D**0.5
            logits = torch.cat((s, sinks[h : h + 1].double())) if sinks is not None else s
            out[b, h, 0] = torch.softmax(logits, 0)[: n - lo] @ v[kv, lo:n]
    return out


@pytest.mark.interpreter
@pytest.mark.parametrize("bits, window, sinks", [(4, 0, "mixed"), (4, 1, "none"), (4, 23, "mixed"), (2, 40, "none"),
                                                 (8, 500, "mixed")])
def test_varlen_window_and_sinks_against_float64(bits, window, sinks):
    """Windows of 1 key, ending inside the codes (23: row 2's quantized blocks before 80 + 17 - 23 are skipped, the
    one it starts in is masked), longer than the window (40) or than every row (500); sinks of both signs."""
    store = storage(bits)
    q = torch.randn(B, HQ, 1, D, generator=torch.Generator().manual_seed(1))
    sinks = SINKS[sinks]
    got = quant_decode_varlen(q, *store, torch.tensor(ROWS[0]), torch.tensor(ROWS[1]), bits=bits, key_group=GROUP,
                              value_group=D, block_k=16, num_splits=3, res_chunk=16, window=window, sinks=sinks,
                              out=torch.full_like(q, float("nan")))
    want = definition(q, store, *ROWS, bits, window, sinks)
    assert (got.double() - want).abs().max().item() < 1e-4
    ref = quant_decode_varlen_ref(q, *store, *ROWS, bits=bits, key_group=GROUP, value_group=D,
                                  compute_dtype=torch.float64, window=window, sinks=sinks)
    assert (ref.double() - want).abs().max().item() < 1e-6


def test_bad_window_and_sinks_refused_in_one_line():
    store = storage(4)
    q = torch.zeros(B, HQ, 1, D)
    kw = dict(bits=4, key_group=GROUP, value_group=D, block_k=16)
    with pytest.raises(ValueError, match=r"window must be >= 0 keys \(0: every key\), got -2"):
        quant_decode_varlen(q, *store, torch.tensor(ROWS[0]), torch.tensor(ROWS[1]), window=-2, **kw)
    with pytest.raises(ValueError, match=r"sinks must be \[Hq\] = \[4\] contiguous logits, got \(2,\)"):
        quant_decode_varlen(q, *store, torch.tensor(ROWS[0]), torch.tensor(ROWS[1]), sinks=torch.zeros(2), **kw)


# ---- gpt-oss with the int4 cache: the whole static step ----------------------------------------------------------

PARAMS = {"residual": 16, "group_size": 16}  # a group flushed at 32 tokens: layer 0's 8-key window then skips it
PROMPT_LEN, STEPS = 5, 30


def _prompt(t=PROMPT_LEN):
    return torch.randint(0, 128, (2, t), generator=torch.Generator().manual_seed(2))


@pytest.fixture(scope="module")
def eager_int4_logits():
    ref = []
    decode_loop(gpt_oss(codec=registry.build("cache", "int4", PARAMS), fast_decode="off"), _prompt(), STEPS,
                recording(ref), None)
    return ref


def test_gpt_oss_int4_whole_static_step_equals_eager(eager_int4_logits):
    """int4 declares `static_window_sinks`: gpt-oss runs the whole step (the PyTorch reference path on the CPU),
    each layer's window and sinks applied, the eager engine's logits (sdpa over the dequantized cache) to fp32
    rounding, past the window and a group flush."""
    int4 = registry.build("cache", "int4", PARAMS)
    assert int4.static_window_sinks
    engine = gpt_oss(codec=int4, fast_decode="static")
    assert capture_blocker(engine) is None and str(engine.fast_path) == "static"
    got = []
    engine.fast_decoder().generate(_prompt(), STEPS, recording(got))
    layer = engine.fast_decoder().buckets[2].cache.layers[0]
    assert layer.n_quant == 16  # the flush happened: the codes were attended (layer 1) and skipped (layer 0)
    assert max((a - b).abs().max().item() for a, b in zip(got, eager_int4_logits, strict=True)) <= 1e-4


@pytest.mark.interpreter
def test_gpt_oss_int4_whole_static_step_with_the_kernels():
    """The same step through the Triton kernels (the interpreter): the quantized varlen kernel's window skip and
    mask, the merge's sinks; a 27-token prompt and 6 steps cross the flush at 32 tokens."""
    ref, got = [], []
    decode_loop(gpt_oss(codec=registry.build("cache", "int4", PARAMS), fast_decode="off"), _prompt(27), 6,
                recording(ref), None)
    engine = gpt_oss(codec=registry.build("cache", "int4", PARAMS), fast_decode="static")
    fast = FastDecoder(engine, capture=False, use_kernels=True, fuse_weights=True)
    fast.generate(_prompt(27), 6, recording(got))
    assert fast.buckets[2].cache.layers[0].n_quant == 16
    assert max((a - b).abs().max().item() for a, b in zip(got, ref, strict=True)) <= 1e-3


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("stages", [1, 2])
def test_varlen_mma_window_and_sinks_gpu(stages):
    """gpt-oss' attention shape (head_dim 64, 8 query heads a KV head) through the Gluon varlen kernel: window 128
    over rows whose codes lie before, across and after its start; sinks of both signs; against float64."""
    from ollm_triton.kernels import kv_quant_decode as KQ

    b, hq, h, d, cap, res_cap = 4, 64, 8, 64, 2048, 256
    g = torch.Generator().manual_seed(5)
    k, v = torch.randn(b, h, cap, d, generator=g), torch.randn(b, h, cap, d, generator=g)
    kq = Q.quantize_keys_ref(k.bfloat16(), 4, 128, False, torch.float16)
    vq = Q.quantize_values_ref(v.bfloat16(), 4, d, False, torch.float16)
    kr = torch.randn(b, h, res_cap, d, generator=g).bfloat16()
    vr = torch.randn(b, h, res_cap, d, generator=g).bfloat16()
    store = [x.cuda() for x in (*kq, *vq, kr, vr)]
    q = torch.randn(b, hq, 1, d, generator=g).bfloat16().cuda()
    sinks = (2.0 * torch.randn(hq, generator=g)).cuda()
    rows = ([0, 128, 1024, 2048], [100, 128 + 200, 1024 + 129, 2048 + 1])
    out = torch.full_like(q, float("nan"))
    quant_decode_varlen(q, *store, torch.tensor(rows[0]).cuda(), torch.tensor(rows[1]).cuda(), bits=4, key_group=128,
                        value_group=d, block_k=128, window=128, sinks=sinks, mma_stages=stages, out=out)
    assert KQ.LAST_LAUNCH["kernel"] == "mma.varlen"
    want = quant_decode_varlen_ref(q, *store, *rows, bits=4, key_group=128, value_group=d,
                                   compute_dtype=torch.float64, window=128, sinks=sinks)
    assert not out.isnan().any()
    for r in range(b):
        err = ((out[r].double() - want[r].double()).norm() / want[r].double().norm()).item()
        assert err < 1e-2, (r, err)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_gpt_oss_int4_captured_whole_step():
    """gpt-oss with int4 (groups of 16) captured as one CUDA graph, past the window and two group flushes: the
    same tokens as the step uncaptured, and the eager engine's logits to bf16 rounding."""
    check_captured_gpt_oss(prompt_len=20, new=40, eager_steps=30, codec=lambda: registry.build("cache", "int4", PARAMS))


assert GPT_OSS["sliding_window"] == 8  # the engine tests above rely on layer 0's window of 8 keys
