"""The speculation loop's host side: the incremental n-gram index, the host eos rule, host greedy acceptance, and
one device-to-host read per iteration. Each against an independent reference (a plain scan, greedy's emit_step,
the tensor form of the rule). Tiny random model, CPU, a few seconds."""

import random

import pytest
import torch
from torch.overrides import TorchFunctionMode

from ollm_triton.decoding.drafters import LookupDrafter
from ollm_triton.decoding.speculation import EmittedTokens, accept_greedy
from ollm_triton.engine import load_engine
from ollm_triton.engine.generation import emit_step
from ollm_triton.registry import registry

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny matmuls (conftest)


def scan_lookup(row: list[int], m: int, max_ngram: int, min_ngram: int) -> list[int]:
    """Reference: the tokens after the most recent earlier occurrence of the longest matching tail n-gram."""
    length = len(row)
    for n in range(min(max_ngram, length - 1), min_ngram - 1, -1):
        tail = row[length - n :]
        for start in range(length - 1 - n, -1, -1):  # windows with a continuation, latest first
            if row[start : start + n] == tail:
                return row[start + n : start + n + m]
    return []


@pytest.mark.parametrize("max_ngram,min_ngram", [(3, 1), (2, 2), (4, 2)])
def test_incremental_lookup_matches_a_rescan(max_ngram, min_ngram):
    rng = random.Random(max_ngram * 10 + min_ngram)
    rows = [[rng.randrange(4) for _ in range(rng.randrange(1, 7))] for _ in range(3)]  # small vocab: many matches
    d = LookupDrafter(max_ngram, min_ngram)
    d.start(torch.zeros(3, 1, dtype=torch.long), None, 0, None)
    d.extend([list(r) for r in rows])
    hits = 0
    for _ in range(60):
        m = rng.randrange(1, 6)
        # rows of unequal length are not a loop state: keep them equal, as the loop does
        length = len(rows[0])
        if any(len(r) != length for r in rows):
            chunk = [[rng.randrange(4) for _ in range(max(len(x) for x in rows) - len(r))] for r in rows]
        else:
            drafts, _ = d.propose(None, length, m, None)
            want = [scan_lookup(r, m, max_ngram, min_ngram) for r in rows]
            width = max(len(w) for w in want)
            if width == 0:
                assert drafts is None
            else:
                hits += 1
                assert [x[: len(w)] for x, w in zip(drafts, want, strict=True)] == want
                assert all(len(x) == width for x in drafts)  # padded to the widest row
            c = rng.randrange(1, 5)
            chunk = [[rng.randrange(4) for _ in range(c)] for _ in rows]
        d.extend(chunk)
        for r, new in zip(rows, chunk, strict=True):
            r.extend(new)
    assert hits > 20  # the comparison ran on real matches


def test_lookup_refuses_a_missed_extend():
    d = LookupDrafter(2, 1)
    d.start(torch.zeros(1, 1, dtype=torch.long), None, 0, None)
    d.extend([[1, 2, 1]])
    with pytest.raises(RuntimeError, match="extend"):
        d.propose(None, 4, 2, None)


@pytest.mark.parametrize("eos", [None, 3])
def test_host_eos_rule_matches_greedy_emit_step(eos):
    rng = random.Random(7)
    for _ in range(20):
        batch, max_new = rng.randrange(1, 4), rng.randrange(1, 12)
        stream = [[rng.randrange(5) for _ in range(max_new + 6)] for _ in range(batch)]
        out = EmittedTokens(batch, max_new, eos)
        at = 0
        while not out.finished:
            c = rng.randrange(1, 5)
            out.extend([s[at : at + c] for s in stream])
            at += c
        # reference: greedy's loop, one token per step
        ref = torch.empty(batch, max_new, dtype=torch.long)
        done = torch.zeros(batch, dtype=torch.bool)
        n = 0
        for n in range(1, max_new + 1):
            _, finished = emit_step(ref, n, torch.tensor([s[n - 1] for s in stream]), done, eos)
            if finished:
                break
        assert torch.equal(out.result(torch.device("cpu")), ref[:, :n]), (stream, eos)


def test_host_greedy_acceptance_matches_the_tensor_rule():
    gen = torch.Generator().manual_seed(3)
    for m in (0, 1, 4, 7):
        target = torch.randint(0, 3, (6, m + 1), generator=gen)
        drafts = torch.where(torch.rand(6, m, generator=gen) < 0.7, target[:, :m], torch.randint(0, 3, (6, m),
                                                                                                   generator=gen))
        want = (drafts == target[:, :m]).long().cumprod(-1).sum(-1)
        assert accept_greedy(drafts.tolist(), target.tolist()) == want.tolist()


# ------------------------------------------------------------------------------------- one read per iteration

V = 40
ARCH = dict(model_type="llama", vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False)
HOST_READS = {"tolist", "item", "cpu", "__bool__", "__int__", "__float__", "__index__", "nonzero", "equal"}


class HostReads(TorchFunctionMode):
    """Counts calls that read a tensor's values on the host: each is a device sync when the tensor is on CUDA."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.count += getattr(func, "__name__", "") in HOST_READS
        return func(*args, **(kwargs or {}))


@pytest.fixture(scope="module")
def engine():
    eng = load_engine(ARCH, device="cpu", dtype=torch.float32, seed=1)
    with torch.no_grad():
        eng.model.lm_head.weight.mul_(40.0)
    return eng


@pytest.mark.parametrize("name,params,path", [
    ("prompt_lookup", {"num_candidates": 4, "max_ngram": 2}, "static"),  # host drafts, the CUDA-graph path's steps
    ("self_speculative", {"draft_layers": 1, "num_candidates": 2}, "static"),  # device drafts, same steps
    ("prompt_lookup", {"num_candidates": 4, "max_ngram": 2}, "off"),  # eager target
])
def test_one_host_read_per_iteration(engine, name, params, path):
    prompt = torch.tensor([[3, 9, 4, 3, 9, 4, 3, 9, 4, 3, 9]])
    s = registry.build("decoder", name, {**params, "fast_path": path})
    reads, iterations = [], []
    for new in (6, 20):  # the difference removes the per-call reads (prefill, first token, prompt to the host)
        with HostReads() as counter:
            g = s.generate(engine, prompt, new, eos_id=None)
        reads.append(counter.count)
        iterations.append(g.counters["iterations"])
    assert iterations[1] > iterations[0]
    assert reads[1] - reads[0] == iterations[1] - iterations[0], (reads, iterations)


@pytest.mark.gpu
@pytest.mark.parametrize("name,params", [("speculative", {"num_candidates": 3}),
                                         ("self_speculative", {"draft_layers": 1, "num_candidates": 3}),
                                         ("tree", {"depth": 3, "branching": 2, "width": 3})])
def test_cuda_draft_chains_and_tree_expansions_are_captured(name, params):
    """On CUDA the greedy draft chain and the tree expansion replay one graph each (a failed capture would fall back
    to uncaptured steps silently but for one stderr line): every captured function has its graph, tokens are
    greedy's (float32)."""
    from ollm_triton.decoding.static_steps import Captured, Chain, static_model

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    target, draft = (load_engine(ARCH, device="cuda", dtype=torch.float32, seed=1) for _ in range(2))
    with torch.no_grad():
        target.model.lm_head.weight.mul_(40.0)
        draft.model.lm_head.weight.mul_(40.0)  # the target's weights: drafts accepted, chains of every length
    assert str(target.fast_path) == "graph", target.fast_path
    kwargs = {"draft_engine": draft} if name != "self_speculative" else {}
    s = registry.build("decoder", name, {**params, "fast_path": "auto"}, **kwargs)
    prompt = torch.tensor([[3, 9, 4, 3, 9, 4, 3, 9, 4, 3, 9]], device="cuda")
    ref = registry.build("decoder", "greedy").generate(target, prompt, 24).tokens
    out = s.generate(target, prompt, 24)
    assert torch.equal(out.tokens, ref) and out.counters["fast_path_graph"] == 1
    sms = [static_model(e, 1, 64, capture=True) for e in (target, draft)]
    fused = [v for sm in sms for v in sm.steps.values() if isinstance(v, Chain | Captured)]
    assert all(sm.capture for sm in sms) and fused and all(v.graph is not None for v in fused)
