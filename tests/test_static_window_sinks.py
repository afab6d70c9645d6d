"""Sliding windows and attention sinks inside the whole static decode step (gpt-oss, issue 18).

The varlen decode kernel (kernels/attention_decode_varlen.py) takes a per-layer window whose first key is found on
the device from each row's length, and the split merge (kernels/decode_merge.py) adds each head's sink term; both
against a float64 reference written here from the definition (softmax over [scores of the window's keys, sink], the
sink column dropped), at odd lengths, windows shorter and longer than the context, sinks of both signs, poisoned
outputs, and the lengths changed in place between calls on one set of tensors (what a replayed graph does). Then
the gpt_oss tiny random model's whole static step (uncaptured on the CPU) against the eager engine's logits over a
prompt and decode steps that run past its 8-key window; on the GPU the same step captured. Last, speculative
decoding on the same model through the static verify blocks (their window and sinks: tests/test_verify_window_sinks.py):
greedy's tokens, uncaptured on the CPU, captured in bf16 on the GPU.
"""

import pytest
import torch

from ollm_triton.decoding.greedy import decode_loop
from ollm_triton.engine import load_engine
from ollm_triton.engine.fast_decode import FastDecoder, capture_blocker
from ollm_triton.kernels.attention_decode_varlen import decode_varlen, decode_varlen_kernel, decode_varlen_reference
from ollm_triton.registry import registry

pytestmark = pytest.mark.usefixtures("one_torch_thread")

B, HQ, HKV, D, CAP = 3, 4, 2, 16, 192
LENGTHS = ([1, 63, 129], [129, 1, 64], [192, 7, 8])  # one set of tensors, lengths changed in place between calls


def windowed_sink_attention(q, k, v, lengths, window, sinks):
    """float64, row by row and head by head from the definition: softmax over the scores of keys
    [max(0, L - window), L) and the sink logit, the sink's share dropped."""
    out = torch.zeros(q.shape, dtype=torch.float64)
    for b, n in enumerate(lengths):
        lo = max(0, n - window) if window else 0
        for h in range(HQ):
            kv = h // (HQ // HKV)
            s = k[b, kv, lo:n].double() @ q[b, h].double() / D**0.5
            logits = torch.cat((s, sinks[h : h + 1].double())) if sinks is not None else s
            p = torch.softmax(logits, 0)[: n - lo]
            out[b, h] = p @ v[b, kv, lo:n].double()
    return out


def tensors(seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, HQ, D, generator=g), torch.randn(B, HKV, CAP, D, generator=g),
            torch.randn(B, HKV, CAP, D, generator=g))


SINKS = {"none": None, "positive": torch.tensor([2.5, 0.3, 4.0, 1.0]), "mixed": torch.tensor([-3.0, 1.5, -0.5, 6.0])}


@pytest.mark.interpreter
@pytest.mark.parametrize("window, sinks, splits", [
    (0, "mixed", 3),  # sinks alone; at length 1 two of the three splits see nothing
    (1, "none", 3),
    (7, "mixed", 3),  # at 129 and 64 the window spans a block edge; at 192 it starts in the last block
    (128, "positive", 1),  # longer than some rows (1, 63, 8), shorter than others (129, 192)
    (500, "mixed", 2),  # longer than the buffer: every key
])
def test_kernel_window_and_sinks_against_float64(window, sinks, splits, poison):
    q, k, v = tensors()
    sinks = SINKS[sinks]
    lengths = torch.zeros(B, dtype=torch.int32)
    out = poison(torch.empty_like(q))
    for lens in LENGTHS:
        lengths.copy_(torch.tensor(lens))  # in place: the kernel reads them on the device, as a graph replays
        ref = windowed_sink_attention(q, k, v, lens, window, sinks)
        decode_varlen_kernel(q, k, v, lengths, num_splits=splits, out=out, window=window, sinks=sinks)
        assert (out.double() - ref).abs().max().item() < 2e-6, lens


@pytest.mark.interpreter
def test_kernel_positive_sinks_half_precision(poison):
    """fp16 K/V with large positive sinks (the sink takes most of the softmax): the merge's running max starts at
    the sink, not at a split's lse."""
    q, k, v = (t.half() for t in tensors(seed=3))
    lengths = torch.tensor([1, 63, 129], dtype=torch.int32)
    out = poison(torch.empty_like(q))
    decode_varlen_kernel(q, k, v, lengths, num_splits=3, out=out, window=7, sinks=SINKS["positive"].half())
    ref = windowed_sink_attention(q, k, v, [1, 63, 129], 7, SINKS["positive"])
    assert (out.double() - ref).abs().max().item() < 2e-3


def test_reference_and_refusals():
    """The PyTorch reference (the static step's CPU path) against the definition, and bad arguments in one line."""
    q, k, v = tensors(seed=1)
    for window in (0, 1, 7, 128):
        for sinks in SINKS.values():
            for lens in LENGTHS:
                got = decode_varlen_reference(q, k, v, torch.tensor(lens), compute_dtype=torch.float64, window=window,
                                              sinks=sinks)
                ref = windowed_sink_attention(q, k, v, lens, window, sinks)
                assert (got - ref).abs().max().item() < 1e-12
    with pytest.raises(ValueError, match=r"window must be >= 0 keys"):
        decode_varlen(q, k, v, torch.tensor(LENGTHS[0]), window=-1)
    with pytest.raises(ValueError, match=r"sinks must be \[Hq\] = \[4\]"):
        decode_varlen(q, k, v, torch.tensor(LENGTHS[0]), sinks=torch.zeros(2))


# ---- the gpt_oss model's whole static step --------------------------------------------------------------------------

# window 8 on layer 0 (a 5-token prompt and 18 steps run past it), sinks set after loading (both signs)
GPT_OSS = dict(model_type="gpt_oss", vocab_size=128, hidden_size=32, intermediate_size=16, num_hidden_layers=2,
               head_dim=16, num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
               sliding_window=8, layer_types=["sliding_attention", "full_attention"], max_position_embeddings=128)
PROMPT_LEN, STEPS = 5, 18


def gpt_oss(**kw):
    engine = load_engine(GPT_OSS, seed=0, **kw)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in engine.model.model.layers:
            layer.self_attn.sinks.copy_(2.0 * torch.randn(layer.self_attn.sinks.shape, generator=g))
            layer.mlp.router.weight.mul_(20.0)  # decisive routing: both paths pick the same experts
    return engine


def recording(store):
    def pick(logits):
        store.append(logits.float().clone())
        return logits.argmax(-1)
    return pick


def prompt(batch=2):
    return torch.randint(0, 128, (batch, PROMPT_LEN), generator=torch.Generator().manual_seed(2))


@pytest.fixture(scope="module")
def eager_logits():
    ref = []
    decode_loop(gpt_oss(fast_decode="off"), prompt(), STEPS, recording(ref), None)
    return ref


def test_gpt_oss_whole_static_step_equals_eager(eager_logits):
    """dense declares `static_window_sinks`: the whole step runs (no piecewise), with each layer's window and sinks,
    and every step's logits are the eager engine's (sdpa's windowed sink attention) to fp32 rounding."""
    engine = gpt_oss(fast_decode="static")
    assert capture_blocker(engine) is None and str(engine.fast_path) == "static"
    got = []
    out = engine.fast_decoder().generate(prompt(), STEPS, recording(got))
    assert len(got) == STEPS and engine.fast_decoder().steps == STEPS - 1
    assert out.counters["fast_path_graph"] == 0 and out.counters["fast_path_piecewise"] == 0  # uncaptured
    assert max((a - b).abs().max().item() for a, b in zip(got, eager_logits, strict=True)) <= 1e-5


@pytest.mark.interpreter
def test_gpt_oss_whole_static_step_with_the_kernels(eager_logits):
    """The same step through the Triton kernels (the interpreter): the varlen kernel's window and the merge's sinks
    where a graph would run them, past the window."""
    engine = gpt_oss(fast_decode="static")
    fast = FastDecoder(engine, capture=False, use_kernels=True, fuse_weights=True)
    got = []
    fast.generate(prompt(), 9, recording(got))  # positions 5..12: past layer 0's 8-key window
    assert fast.attention_path == "triton.decode_varlen (static step)"
    assert max((a - b).abs().max().item() for a, b in zip(got, eager_logits[:9], strict=True)) <= 1e-4


def test_quantized_codec_runs_the_whole_step_and_a_codec_without_windows_is_refused(monkeypatch):
    """int4's static step takes the window and sinks (tests/test_kernels_quant_window_sinks.py checks its numbers):
    the whole step runs; a codec that declared none would be refused with the reason, piecewise still running."""
    from ollm_triton.cache.quant import Quant

    assert str(gpt_oss(codec=registry.build("cache", "int4", {}), fast_decode="static").fast_path) == "static"
    monkeypatch.setattr(Quant, "static_window_sinks", property(lambda self: False))
    engine = gpt_oss(codec=registry.build("cache", "int4", {}), fast_decode="static")
    assert engine.fast_path.mode == "eager"
    assert "cache 'int4' declares no static step with windows and sinks" in engine.fast_path.reason
    assert str(gpt_oss(codec=registry.build("cache", "int4", {}), fast_decode="piecewise").fast_path) == \
        "piecewise static"


def noisy_copy(noise=0.1, **kw):
    """A draft for the gpt_oss target: its weights plus relative Gaussian noise (acceptance partial, not nil)."""
    draft = gpt_oss(**kw)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in draft.model.parameters():
            if p.dim() > 1:
                p.add_(torch.randn(p.shape, generator=g).to(p) * p.float().std().to(p.dtype) * noise)
    return draft


def test_speculative_static_verify_is_lossless():
    """The static verify blocks (StaticBlockMixer -> verify_attention) take each layer's window and sinks: auto
    picks them for a speculative decoder on gpt-oss, and greedy speculation gives greedy's tokens over 24 new ones
    (past layer 0's 8-key window): blocks of 5 all accepted (the target as its own draft, batch 2), partly accepted
    and rolled back (a noisy draft), and a tree (its tokens windowed by their depth, not their slot)."""
    from ollm_triton.decoding.static_steps import resolve_fast_path

    engine = gpt_oss(fast_decode="static")
    assert resolve_fast_path("auto", engine) == "static" and resolve_fast_path("static", engine) == "static"
    draft = noisy_copy()
    greedy = registry.build("decoder", "greedy")
    for name, params, drafter, ids in (("speculative", {"num_candidates": 4}, gpt_oss(), prompt()),
                                       ("speculative", {"num_candidates": 4}, draft, prompt(1)),
                                       ("tree", {"depth": 3, "branching": 2, "width": 3}, draft, prompt(1))):
        ref = greedy.generate(engine, ids, 24).tokens
        out = registry.build("decoder", name, {**params, "fast_path": "auto"}, draft_engine=drafter).generate(
            engine, ids, 24)
        assert out.counters["fast_path_static"] == 1 and out.counters["fast_path_graph"] == 0
        assert out.counters["mean_accepted_length"] > 2.5, (name, out.counters["mean_accepted_length"])
        assert torch.equal(out.tokens, ref), (name, out.tokens.tolist(), ref.tolist())


def test_eager_tree_verify_windows_by_depth():
    """The eager verify's mask (attention/base.py causal_mask, what sdpa attends with): a tree node at depth d sits at
    position q_offset + d and sees, within the window, the held keys and its own ancestors by their positions; with
    a chain mask it is the plain causal mask. Then the tree decoder with fast_path=off on gpt-oss gives greedy's
    tokens (it did not when the window was applied by slot and the tree overwrote the block columns)."""
    from ollm_triton.attention.base import causal_mask

    parent = [-1, 0, 0, 1, 1, 2]  # a root, two children, each child's children: depths 0 1 1 2 2 2
    t, held = len(parent), 7
    tree = torch.zeros(t, t, dtype=torch.bool)
    depth = []
    for i, p in enumerate(parent):
        tree[i, i] = True
        if p >= 0:
            tree[i] |= tree[p]
        depth.append(0 if p < 0 else depth[p] + 1)
    for window in (0, 2, 3, 5):
        want = torch.zeros(t, held + t, dtype=torch.bool)
        for i in range(t):
            pos = held + depth[i]
            for k in range(held + t):
                kpos, ok = (k, True) if k < held else (held + depth[k - held], bool(tree[i, k - held]))
                want[i, k] = ok and kpos <= pos and (not window or kpos > pos - window)
        assert torch.equal(causal_mask(t, held + t, held, "cpu", tree, window), want), window
    engine, ids = gpt_oss(fast_decode="off"), prompt(1)
    ref = registry.build("decoder", "greedy").generate(engine, ids, 24).tokens
    out = registry.build("decoder", "tree", {"depth": 3, "branching": 2, "width": 3, "fast_path": "off"},
                         draft_engine=noisy_copy()).generate(engine, ids, 24)
    assert torch.equal(out.tokens, ref), (out.tokens.tolist(), ref.tolist())


def gpt_oss_on_gpu(codec=None, **more):
    """The tiny gpt-oss in bf16 on the GPU, its sinks drawn at scale 2 and its router weights scaled 20x (sharp
    routing, sinks that take real probability mass); `codec` builds the cache codec (None: the default)."""
    engine = load_engine(GPT_OSS, seed=0, device="cuda", dtype=torch.bfloat16,
                         **({} if codec is None else {"codec": codec()}), **more)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in engine.model.model.layers:
            layer.self_attn.sinks.copy_(2.0 * torch.randn(layer.self_attn.sinks.shape, generator=g))
            layer.mlp.router.weight.mul_(20.0)
    return engine


def check_captured_gpt_oss(prompt_len: int, new: int, eager_steps: int, codec=None):
    """On the GPU (bf16, window 8 and sinks): the whole step captured as one CUDA graph gives the tokens of the
    same step uncaptured over `new` steps, and the eager engine's logits to bf16 rounding over `eager_steps`, a row
    compared while both runs fed it the same tokens (each feeds back its own argmax: a bf16 near-tie of this random
    model's flat logits may part them; the step where they part is still compared).

    bf16 rounding here: every compared step within 5e-2 relative L2 and their mean within 1e-2. The router's
    weights are scaled 20x (sharp routing), so a bf16 near-tie between two experts moves one step's logits by a few
    percent without any step after it departing: on an H100 the int4 run's row 0 read 2.4e-2 at one step, 3e-3 to
    1e-2 at the other 29, and the dense step up to 1.1e-2 (experiments/moe/logits_diag.py int4; moe README
    section 2). A wrong window, sink, scale or flush departs at every step after it."""

    def on_gpu(**more):
        return gpt_oss_on_gpu(codec, **more)

    graph, static, eager = on_gpu(), on_gpu(fast_decode="static"), on_gpu(fast_decode="off")
    assert str(graph.fast_path) == "graph"
    static._fast = FastDecoder(static, capture=False, fuse_weights=True)
    ids = torch.randint(0, 128, (2, prompt_len), generator=torch.Generator().manual_seed(0)).cuda()
    greedy = registry.build("decoder", "greedy")
    a, b = greedy.generate(graph, ids, new), greedy.generate(static, ids, new)
    assert torch.equal(a.tokens, b.tokens)
    assert a.counters["fast_path_graph"] == 1 and a.counters["fast_path_piecewise"] == 0
    ref, got = [], []
    decode_loop(eager, ids, eager_steps, recording(ref), None)
    graph.fast_decoder().generate(ids, eager_steps, recording(got))
    together, errors = torch.ones(ids.shape[0], dtype=torch.bool), []
    for step, (r, g) in enumerate(zip(ref, got, strict=True)):
        for row in together.nonzero().flatten().tolist():
            errors.append(((r[row] - g[row]).norm() / r[row].norm()).item())
            assert errors[-1] < 5e-2, (step, row, errors[-1])
        together &= (r.argmax(-1) == g.argmax(-1)).cpu()
    assert sum(errors) / len(errors) < 1e-2, errors


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_gpt_oss_captured_whole_step_equals_eager():
    """The whole dense step captured, past the window (check_captured_gpt_oss)."""
    check_captured_gpt_oss(prompt_len=40, new=64, eager_steps=12)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_gpt_oss_captured_speculation_equals_greedy():
    """The speculative verify blocks captured as CUDA graphs (bf16, the verify kernel with window 8 and sinks) on
    a 40-token prompt, 48 new tokens: greedy's tokens, row by row, up to where the two first part, and they may part
    only at a near-tie of greedy's own logits there (top two within bf16 rounding of the largest)."""
    kw = dict(device="cuda", dtype=torch.bfloat16)
    engine, eager = gpt_oss(**kw), gpt_oss(fast_decode="off", **kw)
    assert str(engine.fast_path) == "graph"
    ids = torch.randint(0, 128, (2, 40), generator=torch.Generator().manual_seed(0)).cuda()
    greedy = registry.build("decoder", "greedy")
    for name, params, drafter, rows in (("speculative", {"num_candidates": 4}, gpt_oss(**kw), ids),
                                        ("tree", {"depth": 3, "branching": 2, "width": 3}, noisy_copy(**kw), ids[:1])):
        ref = greedy.generate(engine, rows, 48).tokens
        out = registry.build("decoder", name, {**params, "fast_path": "auto"}, draft_engine=drafter).generate(
            engine, rows, 48)
        assert out.counters["fast_path_graph"] == 1, name
        for row in range(rows.shape[0]):
            differ = (out.tokens[row] != ref[row]).nonzero()
            if differ.numel() == 0:
                continue
            i = int(differ[0])
            with torch.no_grad():
                logits = eager.forward(torch.cat((rows[row : row + 1], ref[row : row + 1, :i]), 1),
                                       eager.new_cache(batch=1, max_len=rows.shape[1] + i + 1))[0, -1].float()
            top = logits.topk(2).values
            assert (top[0] - top[1]).item() <= 2e-2 * logits.abs().max().item(), (name, row, i)
