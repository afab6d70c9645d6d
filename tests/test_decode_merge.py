"""The in-kernel split merge of the decode kernels (kernels/decode_merge.py): more splits than one merge chunk,
the ticket counters left at zero after every launch, and (GPU) many launches and graph replays in a row, each
against a float64 reference, so a counter that is not reset or a partial read before it is written shows up."""

import pytest
import torch

from ollm_triton.kernels import decode_merge
from ollm_triton.kernels.attention_decode import decode_reference, flash_decode
from ollm_triton.kernels.attention_decode_varlen import decode_varlen_kernel, decode_varlen_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def rel_rms(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    return ((out - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt()).item()


def randn(*shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype).to(DEVICE)


def tickets_clear(device) -> bool:
    """Every ticket counter on this kind of device is back at 0 (and some launch allocated them)."""
    bufs = [b for dev, b in decode_merge._TICKETS.items() if dev.type == torch.device(device).type]
    return bool(bufs) and not any(b.any() for b in bufs)


@pytest.mark.interpreter
def test_merge_of_more_splits_than_one_step(poison):
    """71 splits of one block each, 4 rows of d = 64: the merge takes 32 splits a step and must weigh them all."""
    s, t = 71 * 16, 2
    assert decode_merge.merge_shape(2 * t, 64, 71) == (4, 32)
    q, k, v = randn(1, 4, t, 64, dtype=torch.float32, seed=1), *(randn(1, 2, s, 64, dtype=torch.float32, seed=i)
                                                                 for i in (2, 3))
    out = poison(torch.empty_like(q))
    flash_decode(q, k, v, block_n=16, num_splits=71, out=out)
    ref = decode_reference(q, k, v, compute_dtype=torch.float64)
    assert rel_rms(out, ref) < 1e-5
    assert tickets_clear(DEVICE)


@pytest.mark.interpreter
def test_varlen_and_repeated_launches_leave_counters_zero(poison):
    lengths = torch.tensor([1, 200, 63], dtype=torch.int32, device=DEVICE)
    q = randn(3, 8, 32, dtype=torch.float16, seed=4)
    k, v = randn(3, 2, 256, 32, dtype=torch.float16, seed=5), randn(3, 2, 256, 32, dtype=torch.float16, seed=6)
    ref = decode_varlen_reference(q, k, v, lengths, compute_dtype=torch.float64)
    for splits in (1, 3, 4, 3):  # a stale counter from one launch would make the next merge early or never
        out = poison(torch.empty_like(q))
        decode_varlen_kernel(q, k, v, lengths, num_splits=splits, out=out)
        assert rel_rms(out, ref) < 2e-3, splits
        assert tickets_clear(DEVICE)


@pytest.mark.gpu
@pytest.mark.parametrize("b, s", [(1, 32768), (8, 4099), (1, 129)])
def test_gpu_back_to_back_launches(b, s, poison):
    q = randn(b, 32, 1, 128, dtype=torch.bfloat16, seed=7)
    k, v = randn(b, 8, s, 128, dtype=torch.bfloat16, seed=8), randn(b, 8, s, 128, dtype=torch.bfloat16, seed=9)
    outs = [poison(torch.empty_like(q)) for _ in range(20)]
    for i, out in enumerate(outs):  # no sync between launches
        flash_decode(q * (1 + i / 20), k, v, out=out)
    for i, out in enumerate(outs):
        ref = decode_reference(q * (1 + i / 20), k, v, compute_dtype=torch.float64)
        assert rel_rms(out, ref) < 1e-2, i
    assert tickets_clear("cuda")


@pytest.mark.gpu
def test_gpu_graph_replays_of_varlen_decode():
    b, hq, hkv, cap, d = 4, 32, 8, 8192, 128
    k, v = randn(b, hkv, cap, d, dtype=torch.bfloat16, seed=10), randn(b, hkv, cap, d, dtype=torch.bfloat16, seed=11)
    q = randn(b, hq, d, dtype=torch.bfloat16, seed=12)
    lengths = torch.tensor([1, 5000, 8192, 77], dtype=torch.int32, device="cuda")
    out = torch.empty_like(q)
    decode_varlen_kernel(q, k, v, lengths, out=out)  # compile, and allocate the counters before the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        decode_varlen_kernel(q, k, v, lengths, out=out)
    for step in range(30):
        q.copy_(randn(b, hq, d, dtype=torch.bfloat16, seed=100 + step))
        lengths.copy_(torch.tensor([1 + step, 5000 - step, 8192 - 3 * step, 77 + 50 * step], device="cuda"))
        out.fill_(float("nan"))
        graph.replay()
        ref = decode_varlen_reference(q, k, v, lengths, compute_dtype=torch.float64)
        assert rel_rms(out, ref) < 1e-2, step
    assert tickets_clear("cuda")
