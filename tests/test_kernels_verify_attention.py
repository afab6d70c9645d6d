"""The verify block's attention (kernels/attention_decode_varlen.py `verify_attention`): T new tokens per sequence
over its held keys (a device length) and the block's own keys under a chain or tree mask (a device tensor).

Checked against a float64 loop written here (each new token's visible key list, plain softmax), on odd shapes, with
NaN in every slot past held + T (a kernel that reads past the length fails) and NaN-poisoned outputs; the same
launch replayed with other lengths and masks written into the same tensors (what a captured graph sees); and the
engine's static verify step (StaticBlockMixer) with the kernel equal to its SDPA baseline."""

import math

import pytest
import torch

from ollm_triton.decoding.static_steps import StaticModel
from ollm_triton.engine import load_engine, mixers
from ollm_triton.kernels.attention_decode_varlen import (
    verify_attention,
    verify_attention_kernel,
    verify_attention_reference,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def rel_rms(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    return ((out - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt()).item()


def randn(*shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype).to(DEVICE)


def chain(t: int) -> torch.Tensor:
    return torch.ones(t, t, dtype=torch.bool, device=DEVICE).tril()


def tree(t: int, seed: int) -> torch.Tensor:
    """Ancestor-or-self mask of a random tree whose node j > 0 hangs below a random earlier node."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.eye(t, dtype=torch.bool)
    for j in range(1, t):
        parent = int(torch.randint(0, j, (1,), generator=g))
        mask[j] |= mask[parent]
    return mask.to(DEVICE)


def naive(q, k, v, held, mask) -> torch.Tensor:
    """float64: new token t of row b attends keys 0..held[b]-1 and held[b] + j for each j with mask[t, j]."""
    b, hq, t, d = q.shape
    group = hq // k.shape[1]
    out = torch.zeros(b, hq, t, d, dtype=torch.float64)
    for i in range(b):
        kk = k[i].double().cpu().repeat_interleave(group, 0)  # [Hq, cap, D]
        vv = v[i].double().cpu().repeat_interleave(group, 0)
        n = int(held[i])
        for j in range(t):
            keys = list(range(n)) + [n + c for c in range(t) if mask[j, c]]
            s = torch.einsum("hd,hsd->hs", q[i, :, j].double().cpu(), kk[:, keys]) / math.sqrt(d)
            out[i, :, j] = torch.einsum("hs,hsd->hd", torch.softmax(s, -1), vv[:, keys])
    return out


def poison_past(k, v, held, t):
    """NaN in every slot past each row's held + T keys: the kernel must never read them."""
    for i, n in enumerate(held.tolist()):
        k[i, :, n + t :] = float("nan")
        v[i, :, n + t :] = float("nan")


# (T, held per row, cap, Hq, Hkv, D, dtype, tree, splits): held 1, 63, 129 and 0 (a block at the start); GROUP * T
# rows of 2 (padded to 16) up to 128 (the largest program); splits None = the launch's own choice, 5 = more splits
# than some rows have blocks (those exit at once)
CASES = [
    (1, [1, 63], 80, 4, 2, 16, torch.float32, False, 5),
    (3, [129, 0], 140, 6, 2, 32, torch.float16, False, None),
    (7, [63, 129], 150, 6, 3, 16, torch.float32, True, 5),
    (16, [100], 130, 8, 1, 16, torch.float32, True, 1),
]


@pytest.mark.interpreter
@pytest.mark.parametrize("t, held, cap, hq, hkv, d, dtype, is_tree, splits", CASES)
def test_verify_matches_float64(t, held, cap, hq, hkv, d, dtype, is_tree, splits, poison):
    b = len(held)
    q = randn(b, hq, t, d, dtype=dtype, seed=1)
    k, v = randn(b, hkv, cap, d, dtype=dtype, seed=2), randn(b, hkv, cap, d, dtype=dtype, seed=3)
    lens = torch.tensor(held, device=DEVICE)
    mask = tree(t, seed=t) if is_tree else chain(t)
    ref = naive(q, k, v, lens, mask)
    # the module's reference (the SDPA baseline the engine falls back to) is the same function
    assert rel_rms(verify_attention_reference(q, k, v, lens, mask, compute_dtype=torch.float64), ref) < 1e-12
    poison_past(k, v, lens, t)
    out = poison(torch.empty_like(q))
    verify_attention_kernel(q, k, v, lens, mask, num_splits=splits, out=out)
    assert rel_rms(out, ref) < TOL[dtype]


@pytest.mark.interpreter
def test_same_launch_other_lengths_and_masks(poison):
    """One set of tensors, as a captured graph holds them: held and mask rewritten in place between launches
    (a longer context, a rollback to a shorter one, a chain then a tree), each launch equal to its own reference."""
    t, cap = 5, 200
    q = randn(2, 4, t, 16, dtype=torch.float32, seed=4)
    k, v = randn(2, 2, cap, 16, dtype=torch.float32, seed=5), randn(2, 2, cap, 16, dtype=torch.float32, seed=6)
    held = torch.tensor([1, 1], device=DEVICE)
    mask = chain(t)
    out = torch.empty_like(q)
    for lengths, m in (([1, 70], chain(t)), ([128, 63], tree(t, 1)), ([9, 195], tree(t, 2)), ([64, 2], chain(t))):
        held.copy_(torch.tensor(lengths))
        mask.copy_(m)
        poison(out)
        verify_attention_kernel(q, k, v, held, mask, num_splits=3, out=out)
        assert rel_rms(out, naive(q, k, v, held, mask)) < TOL[torch.float32], lengths


def test_bad_input_names_the_argument():
    q, kc = torch.zeros(2, 4, 3, 16), torch.zeros(2, 2, 8, 16)
    with pytest.raises(ValueError, match=r"block_mask must be bool \[T, T\] = \[3, 3\]"):
        verify_attention(q, kc, kc, torch.ones(2, dtype=torch.long), torch.ones(3, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"held must be \[B\] = \[2\]"):
        verify_attention(q, kc, kc, torch.ones(3, dtype=torch.long), torch.ones(3, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="does not fit the cache"):
        verify_attention(q[:, :3], kc, kc, torch.ones(2, dtype=torch.long), torch.ones(3, 3, dtype=torch.bool))


# ---- the engine's static verify step -------------------------------------------------------------------------------

ARCH = dict(model_type="llama", vocab_size=97, hidden_size=64, intermediate_size=80, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5)


@pytest.mark.interpreter
def test_static_block_step_with_the_kernel_equals_sdpa(monkeypatch):
    """A tiny engine's T = 6 verify block over a 70-token context (head dim 16), chain and tree: logits with the
    kernel (under the interpreter) equal the SDPA path's in float32, and the kernel really ran in every layer."""
    engine = load_engine(ARCH, seed=0, fast_decode="static")
    calls = []
    kernel = mixers.verify_attention_kernel
    monkeypatch.setattr(mixers, "verify_attention_kernel", lambda *a, **kw: calls.append(1) or kernel(*a, **kw))
    prompt = torch.randint(0, ARCH["vocab_size"], (1, 70), generator=torch.Generator().manual_seed(0))
    logits = {}
    for on in (False, True):
        sm = StaticModel(engine, batch=1, max_len=90, capture=False)
        sm.attention_kernel = on
        sm.prefill(prompt)
        for is_tree in (False, True):
            st = sm.step(6, tree=is_tree)
            st.tokens.copy_(torch.arange(6)[None] + 11)
            st.base.fill_(70)
            if is_tree:
                st.mask.copy_(tree(6, seed=3))
                st.offsets.copy_(st.mask.sum(1) - 1)  # a node's depth
            sm.run(st)
            logits[on, is_tree] = st.logits.clone()
    assert len(calls) == 2 * ARCH["num_hidden_layers"]
    for is_tree in (False, True):
        assert rel_rms(logits[True, is_tree], logits[False, is_tree]) < 1e-5
    assert rel_rms(logits[True, True], logits[True, False]) > 1e-3  # the tree is another block: the mask was read


# ---- GPU: bf16 on Llama-3-8B attention shapes, under CUDA graph replays --------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("t", [1, 2, 7, 16])
def test_gpu_bf16_8b_shapes(t, poison):
    dt, cap = torch.bfloat16, 8192 + 64
    held = torch.tensor([1, 4095, 8000], device=DEVICE)
    q = randn(3, 32, t, 128, dtype=dt, seed=7)
    k, v = randn(3, 8, cap, 128, dtype=dt, seed=8), randn(3, 8, cap, 128, dtype=dt, seed=9)
    for mask in (chain(t), tree(t, seed=t)):
        ref = verify_attention_reference(q, k, v, held, mask, compute_dtype=torch.float64)
        out = poison(torch.empty_like(q))
        verify_attention_kernel(q, k, v, held, mask, out=out)
        assert rel_rms(out, ref) < TOL[dt]


@pytest.mark.gpu
def test_gpu_graph_replays_follow_the_device_length():
    """One captured launch at a 32k capacity; held grows, rolls back and the mask turns into a tree between
    replays: every replay equals the float64 reference at that length."""
    dt, b, t, cap = torch.bfloat16, 1, 8, 32768 + 64
    k, v = randn(b, 8, cap, 128, dtype=dt, seed=10), randn(b, 8, cap, 128, dtype=dt, seed=11)
    q = randn(b, 32, t, 128, dtype=dt, seed=12)
    held, mask = torch.tensor([100], device=DEVICE), chain(t)
    out = torch.empty_like(q)
    verify_attention_kernel(q, k, v, held, mask, out=out)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        verify_attention_kernel(q, k, v, held, mask, out=out)
    for step, n in enumerate([1, 100, 4097, 32768, 20000, 63]):
        held.fill_(n)
        mask.copy_(tree(t, seed=step) if step % 2 else chain(t))
        q.copy_(randn(b, 32, t, 128, dtype=dt, seed=100 + step))
        out.fill_(float("nan"))
        graph.replay()
        ref = verify_attention_reference(q, k, v, held, mask, compute_dtype=torch.float64)
        assert rel_rms(out, ref) < TOL[dt], n


@pytest.mark.gpu
def test_gpu_captured_verify_steps_equal_sdpa_at_every_length():
    """The speculative decoders' captured T = 5 step (chain and tree) on a float32 engine of head dim 64, replayed
    at contexts 40, 300, 129 and 1000 (one graph, base rewritten between replays): the kernel's logits equal the
    SDPA path's (a second StaticModel with attention_kernel=False, fed the same blocks, so both buffers hold the
    same K/V throughout)."""
    arch = dict(ARCH, hidden_size=256, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048)
    engine = load_engine(arch, device="cuda", dtype=torch.float32, seed=0)
    prompt = torch.randint(0, arch["vocab_size"], (1, 1000), generator=torch.Generator().manual_seed(1)).cuda()
    models = {}
    for on in (True, False):
        sm = StaticModel(engine, batch=1, max_len=1100, capture=True)
        sm.attention_kernel = on
        sm.prefill(prompt)
        models[on] = sm
    assert models[True].kernels, "the engine's kernels are on on CUDA: the kernel path is under test"
    for is_tree in (False, True):
        logits = {}
        for on, sm in models.items():
            st = sm.step(5, tree=is_tree)
            st.tokens.copy_(torch.arange(5, device="cuda")[None] + 7)
            if is_tree:
                st.mask.copy_(tree(5, seed=4))
                st.offsets.copy_(st.mask.sum(1) - 1)
            for base in (40, 300, 129, 1000):
                st.base.fill_(base)
                sm.run(st)
                logits[on, base] = st.logits.clone()
            assert st.graph is not None
        for base in (40, 300, 129, 1000):
            assert rel_rms(logits[True, base], logits[False, base]) < 1e-5, (is_tree, base)
