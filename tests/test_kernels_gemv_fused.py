"""The RMSNorm folded into the batch-1 GEMV (kernels/gemv.py `add_rmsnorm_gemv`) and the SwiGLU gate folded into
the down GEMV (`silu_mul_gemv`) against float64 references, and the static decode step with the folds against the
same step with the norm, the gate and the matmuls apart."""

import pytest
import torch
from test_fast_decode import SMALL, VARIANTS
from test_fast_decode import engine_for as fast_decode_engine

from ollm_triton.engine import load_engine
from ollm_triton.engine.fast_decode import FastDecoder
from ollm_triton.kernels import gemv as G
from ollm_triton.kernels.gemv import (
    MAX_K,
    add_rmsnorm_gemv,
    add_rmsnorm_gemv_reference,
    decode_add_norm_linear,
    decode_silu_linear,
    fold_block_n,
    gemv,
    silu_mul_gemv,
    silu_mul_gemv_reference,
)
from ollm_triton.kernels.mlp import silu_mul
from ollm_triton.kernels.norm import rmsnorm

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.5e-2}  # y is rounded to the input dtype


def rel_rms(ref: torch.Tensor, out: torch.Tensor) -> float:
    ref, out = ref.double(), out.double()
    return ((ref - out).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt()).item()


def operands(n, k, dtype, bias, seed=0):
    g = torch.Generator().manual_seed(seed + n * 1000 + k)
    residual = (3 * torch.randn(1, 1, k, generator=g)).to(dtype).to(DEVICE)  # off unit scale: the rms matters
    delta = torch.randn(1, 1, k, generator=g).to(dtype).to(DEVICE)
    norm_w = (1 + 0.3 * torch.randn(k, generator=g)).to(dtype).to(DEVICE)
    w = (torch.randn(n, k, generator=g) / k**0.5).to(dtype).to(DEVICE)
    b = torch.randn(n, generator=g).to(dtype).to(DEVICE) if bias else None
    return delta, residual, norm_w, w, b


DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])  # no bf16 in the interpreter


@pytest.mark.interpreter
@pytest.mark.parametrize("n,k,block_n,steps,bias", [(1, 1, 4, 1, True), (63, 129, 4, 1, False), (33, 63, 1, 1, True),
                                                    (129, 63, 2, 8, True), (37, 1000, 8, 2, True)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_fold_matches_float64(n, k, block_n, steps, bias, dtype, poison):
    """y = norm(residual + delta) W^T + b and the new residual stream, every output element written; the residual
    is the eager `residual + delta` exactly (one rounding), the inputs untouched. steps > 1: a program walks several
    chunks of rows, the last program's partly or wholly past N."""
    delta, residual, norm_w, w, b = operands(n, k, dtype, bias)
    before = residual.clone(), delta.clone()
    out = poison(torch.empty(n, dtype=dtype, device=DEVICE))
    res_out = poison(torch.empty(k, dtype=dtype, device=DEVICE))
    y, s = add_rmsnorm_gemv(delta, residual, norm_w, 1e-5, w, b, block_n=block_n, steps=steps, out=out,
                            residual_out=res_out)
    assert y.shape == (1, 1, n) and s.shape == (1, 1, k)
    assert y.data_ptr() == out.data_ptr() and s.data_ptr() == res_out.data_ptr()
    y_ref, s_ref = add_rmsnorm_gemv_reference(delta, residual, norm_w, 1e-5, w, b)
    assert rel_rms(y_ref, y) < TOL[dtype]
    assert torch.equal(s, residual + delta)
    assert torch.equal(residual, before[0]) and torch.equal(delta, before[1])
    # the unfolded pair (the fused norm kernel, then the GEMV) rounds at the same points
    normed, _ = rmsnorm(delta, norm_w, 1e-5, residual=residual, use_kernel=True)
    y_apart = gemv(normed, w, b, block_n=block_n)
    assert rel_rms(y_apart, y) < TOL[dtype] / 10


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fold_without_delta_and_with_a_zero_centred_norm(dtype, poison):
    """delta None (the first layer's norm of the embedding): the residual comes back as is. offset 1 (qwen3_next's
    zero-centred weights): x / rms(x) * (1 + w)."""
    delta, residual, norm_w, w, b = operands(65, 127, dtype, bias=True, seed=1)
    out = poison(torch.empty(65, dtype=dtype, device=DEVICE))
    y, s = add_rmsnorm_gemv(None, residual, norm_w, 1e-6, w, b, out=out)
    assert s is residual
    assert rel_rms(add_rmsnorm_gemv_reference(None, residual, norm_w, 1e-6, w, b)[0], y) < TOL[dtype]
    zc = norm_w - 1  # the same scale stored zero-centred
    y_off, _ = add_rmsnorm_gemv(delta, residual, zc, 1e-6, w, b, offset=1.0)
    y_ref, _ = add_rmsnorm_gemv_reference(delta, residual, zc, 1e-6, w, b, offset=1.0)
    assert rel_rms(y_ref, y_off) < TOL[dtype]
    # and the offset is applied, not dropped: the same weights without it give another product
    assert rel_rms(y_ref, add_rmsnorm_gemv(delta, residual, zc, 1e-6, w, b)[0]) > 0.1


@pytest.mark.interpreter
def test_fold_reads_a_strided_weight_view():
    """Rows of a wider matrix (a row stride wider than K), as a view of a fused projection may have."""
    delta, residual, norm_w, _, _ = operands(1, 64, torch.float32, bias=False)
    w = torch.randn(40, 96, device=DEVICE)[:, :64]
    y, _ = add_rmsnorm_gemv(delta, residual, norm_w, 1e-5, w)
    assert rel_rms(add_rmsnorm_gemv_reference(delta, residual, norm_w, 1e-5, w)[0], y) < 1e-5


def test_fold_bad_input_and_shapes_it_declines():
    r, nw, w = torch.zeros(1, 16), torch.ones(16), torch.zeros(8, 16)
    with pytest.raises(ValueError, match="add_rmsnorm_gemv takes one row residual"):
        add_rmsnorm_gemv(None, torch.zeros(2, 16), nw, 1e-5, w)
    with pytest.raises(ValueError, match="add_rmsnorm_gemv takes one row residual"):
        add_rmsnorm_gemv(torch.zeros(1, 15), r, nw, 1e-5, w)
    with pytest.raises(ValueError, match="add_rmsnorm_gemv takes one row residual"):
        add_rmsnorm_gemv(None, r, torch.ones(15), 1e-5, w)
    with pytest.raises(ValueError, match="must not alias residual or delta"):
        add_rmsnorm_gemv(torch.zeros(1, 16), r, nw, 1e-5, w, residual_out=r)
    # the step's entry declines (None: norm and matmul apart) what the kernel does not take
    assert decode_add_norm_linear(None, torch.zeros(2, 1, 16), nw, 1e-5, 0.0, w) is None  # two rows
    assert decode_add_norm_linear(None, r, nw.half(), 1e-5, 0.0, w) is None  # mixed dtypes
    assert decode_add_norm_linear(None, r, nw, 1e-5, 0.0, w.T.contiguous().T) is None  # column-major weight
    # rows a program by width: the registers of 4 rows at 4096 (sm_90 compiles 4 rows at 8192 to 192 registers)
    assert [fold_block_n(k) for k in (63, 4096, 5000, 8192, MAX_K)] == [4, 4, 2, 2, 1]
    big = torch.zeros(1, MAX_K + 1)
    assert decode_add_norm_linear(None, big, torch.ones(MAX_K + 1), 1e-5, 0.0, torch.zeros(2, MAX_K + 1)) is None


@pytest.mark.interpreter
@pytest.mark.parametrize("n,m,block_n,steps,bias", [(1, 1, 1, 1, True), (63, 129, 2, 4, False), (129, 63, 4, 1, True)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_fold_matches_float64(n, m, block_n, steps, bias, dtype, poison):
    """(silu(gate) * up) W^T + b from the fused gate/up row, every output written, rounded as silu_mul + GEMV."""
    g = torch.Generator().manual_seed(n + m)
    gate_up = (2 * torch.randn(1, 1, 2 * m, generator=g)).to(dtype).to(DEVICE)
    w = (torch.randn(n, m, generator=g) / m**0.5).to(dtype).to(DEVICE)
    b = torch.randn(n, generator=g).to(dtype).to(DEVICE) if bias else None
    out = poison(torch.empty(n, dtype=dtype, device=DEVICE))
    y = silu_mul_gemv(gate_up, w, b, block_n=block_n, steps=steps, num_warps=4, out=out)
    assert y.shape == (1, 1, n) and y.data_ptr() == out.data_ptr()
    assert rel_rms(silu_mul_gemv_reference(gate_up, w, b), y) < TOL[dtype]
    assert rel_rms(gemv(silu_mul(gate_up, use_kernel=True), w, b), y) < TOL[dtype] / 10


def test_silu_fold_bad_input_and_shapes_it_declines():
    w = torch.zeros(8, 16)
    with pytest.raises(ValueError, match="silu_mul_gemv takes one row gate_up"):
        silu_mul_gemv(torch.zeros(1, 30), w)  # 2M = 30: M = 15, not w's 16
    with pytest.raises(ValueError, match="silu_mul_gemv takes one row gate_up"):
        silu_mul_gemv(torch.zeros(2, 32), w)
    assert decode_silu_linear(torch.zeros(2, 1, 32), w) is None  # two rows
    assert decode_silu_linear(torch.zeros(1, 32).half(), w) is None  # mixed dtypes
    assert decode_silu_linear(torch.zeros(1, 2 * MAX_K + 2), torch.zeros(2, MAX_K + 1)) is None


# ---- the fold in the model step -------------------------------------------------------------------------------

def engine_for(variant):
    """test_fast_decode's engines (llama; qwen2: q/k/v biases; qwen3: q/k norm, tied head), norms off 1 and biases
    off 0 so that a fold forgetting one of them differs; intermediate 96, not a power of two, for the down fold."""
    return fast_decode_engine(variant, arch={"intermediate_size": 96}, fast_decode="static")


def spy_fold(monkeypatch) -> list:
    """Count the step's folded calls ("norm", "silu"). They run 16 rows a program: the interpreter's time is per
    program, and the kernel tests above cover the other shapes."""
    calls = []
    monkeypatch.setattr(G, "add_rmsnorm_gemv",
                        lambda *a, **kw: calls.append("norm") or add_rmsnorm_gemv(*a, **kw, block_n=16))
    monkeypatch.setattr(G, "silu_mul_gemv",
                        lambda *a, **kw: calls.append("silu") or silu_mul_gemv(*a, **kw, block_n=8, steps=2))
    return calls


def run_step(engine, fold, ids, new, monkeypatch):
    """Greedy tokens and every step's logits through a static step with (or without) both folds; the kernels
    otherwise off (their references), so only the folds run through the interpreter. Counts folded calls."""
    calls = spy_fold(monkeypatch)
    fast = FastDecoder(engine, capture=False, use_kernels=False, fuse_weights=True, fold_norm=fold, fold_silu=fold)
    logits = []
    out = fast.generate(ids, new, lambda lg: logits.append(lg.clone()) or lg.argmax(-1))
    return out.tokens, logits, calls


@pytest.mark.interpreter
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_static_step_with_the_fold_equals_the_step_without(variant, monkeypatch):
    ids = torch.randint(0, 256, (1, 13), generator=torch.Generator().manual_seed(0))
    engine = engine_for(variant)
    ref, ref_logits, apart = run_step(engine, False, ids, 4, monkeypatch)
    got, got_logits, folded = run_step(engine, True, ids, 4, monkeypatch)
    layers = SMALL["num_hidden_layers"]
    assert apart == [] and folded.count("norm") == 3 * (2 * layers + 1)  # q/k/v, gate/up, head; 3 steps
    assert folded.count("silu") == 3 * layers
    assert torch.equal(ref, got)
    for a, b in zip(ref_logits, got_logits, strict=True):
        assert (a - b).abs().max().item() <= 1e-5


@pytest.mark.interpreter
def test_the_fold_declines_a_batch_and_unfused_weights(monkeypatch):
    """Two rows (cuBLAS territory) and separate q/k/v and gate/up weights keep the norm and the gate apart: same
    tokens, no folded call."""
    engine = engine_for("llama")
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(1))
    ref, _, _ = run_step(engine, False, ids, 4, monkeypatch)
    got, _, calls = run_step(engine, True, ids, 4, monkeypatch)
    assert calls == [] and torch.equal(ref, got)
    unfused = engine_for("llama")
    calls = spy_fold(monkeypatch)
    fast = FastDecoder(unfused, capture=False, use_kernels=False, fuse_weights=False, fold_norm=True, fold_silu=True)
    fast.generate(ids[:1], 3)
    assert calls == ["norm", "norm"]  # only the LM head (one matrix), 2 steps; no fused gate/up for the SiLU


# ---- GPU ---------------------------------------------------------------------------------------------------------

GPU_MODEL = dict(model_type="llama", vocab_size=4096, hidden_size=512, intermediate_size=1536, num_hidden_layers=4,
                 num_attention_heads=8, num_key_value_heads=2, head_dim=64, max_position_embeddings=8192,
                 rms_norm_eps=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("silu", [False, True])
def test_gpu_graph_with_the_fold_against_the_unfolded_eager_step(silu):
    """The captured step with the folds (the norm fold is the GPU default; the SiLU one opt-in) gives the tokens of
    the same step uncaptured, and the logits of the unfolded step run uncaptured (fold_norm=False) to bf16
    rounding."""
    from ollm_triton.registry import registry

    graph = load_engine(GPU_MODEL, device="cuda", dtype=torch.bfloat16, seed=0)
    static = load_engine(GPU_MODEL, device="cuda", dtype=torch.bfloat16, seed=0, fast_decode="static")
    assert graph.fast_decoder().fold_norm and not graph.fast_decoder().fold_silu
    graph._fast = FastDecoder(graph, capture=True, fold_silu=silu)
    static._fast = FastDecoder(static, capture=False, fuse_weights=True, fold_silu=silu)  # the same folds
    ids = torch.randint(0, 4096, (1, 300), generator=torch.Generator().manual_seed(0)).to("cuda")
    greedy = registry.build("decoder", "greedy")
    a, b = greedy.generate(graph, ids, 64), greedy.generate(static, ids, 64)
    assert torch.equal(a.tokens, b.tokens) and a.counters["fast_path_graph"] == 1.0
    unfolded = load_engine(GPU_MODEL, device="cuda", dtype=torch.bfloat16, seed=0, fast_decode="static")
    unfolded._fast = FastDecoder(unfolded, capture=False, fuse_weights=True, fold_norm=False)
    ref_logits, got_logits = [], []
    unfolded.fast_decoder().generate(ids, 2, lambda lg: ref_logits.append(lg.clone()) or lg.argmax(-1))
    graph.fast_decoder().generate(ids, 2, lambda lg: got_logits.append(lg.clone()) or lg.argmax(-1))
    for r, g in zip(ref_logits, got_logits, strict=True):  # the folds change the mean's reduction order only
        assert ((r - g).norm() / r.norm()).item() < 1e-2
