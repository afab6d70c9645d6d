"""The split merge of the decode kernels (kernels/decode_merge.py): more splits than one merge step, a split that
saw no key, and (GPU) many launches and graph replays in a row, each against a float64 reference."""

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


@pytest.mark.interpreter
@pytest.mark.parametrize("splits, d, t", [(71, 16, 2), (150, 64, 1)])
def test_merge_of_more_splits_than_one_step(splits, d, t, poison):
    """One block a split. 71 at head_dim 16: the merge takes MAX_MERGE_CHUNK (64) a step and must weigh them all.
    150 at head_dim 64: it spreads 32 channels a program and takes 128 splits a step (two steps)."""
    assert decode_merge.MAX_MERGE_CHUNK < 71
    s = splits * 16
    q, k, v = randn(1, 4, t, d, dtype=torch.float32, seed=1), *(randn(1, 2, s, d, dtype=torch.float32, seed=i)
                                                                for i in (2, 3))
    out = poison(torch.empty_like(q))
    flash_decode(q, k, v, block_n=16, num_splits=splits, out=out)
    ref = decode_reference(q, k, v, compute_dtype=torch.float64)
    assert rel_rms(out, ref) < 1e-5


@pytest.mark.interpreter
def test_merge_ignores_splits_that_saw_nothing(poison):
    """A length-1 sequence next to longer ones: most of its splits see no key (lse -inf, weight 0)."""
    lengths = torch.tensor([1, 200, 63], dtype=torch.int32, device=DEVICE)
    q = randn(3, 8, 32, dtype=torch.float16, seed=4)
    k, v = randn(3, 2, 256, 32, dtype=torch.float16, seed=5), randn(3, 2, 256, 32, dtype=torch.float16, seed=6)
    ref = decode_varlen_reference(q, k, v, lengths, compute_dtype=torch.float64)
    for splits in (1, 3, 4):
        out = poison(torch.empty_like(q))
        decode_varlen_kernel(q, k, v, lengths, num_splits=splits, out=out)
        assert rel_rms(out, ref) < 2e-3, splits


def test_one_wave_splits():
    cpu = torch.device("cpu")  # the interpreter counts 2 "SMs"
    assert decode_merge.one_wave_splits(cpu, 1, 1000) == 4  # 2 programs an SM x 2 SMs
    assert decode_merge.one_wave_splits(cpu, 2, 1000, per_sm=3) == 3
    assert decode_merge.one_wave_splits(cpu, 1, 9) == 2  # >= 4 blocks a split
    assert decode_merge.one_wave_splits(cpu, 64, 1000) == 1


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


@pytest.mark.gpu
def test_gpu_graph_replays_of_varlen_decode():
    b, hq, hkv, cap, d = 4, 32, 8, 8192, 128
    k, v = randn(b, hkv, cap, d, dtype=torch.bfloat16, seed=10), randn(b, hkv, cap, d, dtype=torch.bfloat16, seed=11)
    q = randn(b, hq, d, dtype=torch.bfloat16, seed=12)
    lengths = torch.tensor([1, 5000, 8192, 77], dtype=torch.int32, device="cuda")
    out = torch.empty_like(q)
    decode_varlen_kernel(q, k, v, lengths, out=out)  # compile outside the capture
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
