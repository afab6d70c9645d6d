"""Sliding windows and attention sinks in the verify block's attention (kernels/attention_decode_varlen.py
`verify_attention`, gpt-oss speculative decoding, issue 18).

The float64 reference is written here from the definition, token by token: new token t of row b sits at position
p = held[b] + depth(t) (depth: how many earlier block tokens its mask row holds; t for a chain, the node's depth in
a tree) and sees the held slots s with p - window < s < held[b] and the new tokens j of its mask row whose position
held[b] + depth(j) is > p - window; head h's softmax has one more term exp(sinks[h]) in its denominator. Checked at
odd held lengths (1, 63, 129, 0), windows shorter than the block, than the context, and longer than the buffer,
sinks of both signs, chain and tree masks, NaN-poisoned outputs, NaN in the slots past held + T and in the blocks
before the window's first (the kernel must not read them), and held and mask rewritten in place between launches on
one set of tensors (what a replayed graph does).
"""

import math

import pytest
import torch

from ollm_triton.kernels.attention_decode_varlen import (
    BLOCK_N,
    verify_attention,
    verify_attention_kernel,
    verify_attention_reference,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

HQ, HKV, D, CAP = 4, 2, 16, 200
SINKS = {"none": None, "positive": torch.tensor([2.5, 0.3, 4.0, 1.0]), "mixed": torch.tensor([-3.0, 1.5, -0.5, 6.0])}


def chain(t: int) -> torch.Tensor:
    return torch.ones(t, t, dtype=torch.bool).tril()


def tree(t: int, seed: int) -> torch.Tensor:
    """Ancestor-or-self mask of a random tree whose node j > 0 hangs below a random earlier node."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.eye(t, dtype=torch.bool)
    for j in range(1, t):
        mask[j] |= mask[int(torch.randint(0, j, (1,), generator=g))]
    return mask


def definition(q, k, v, held, mask, window, sinks):
    """float64 from the module docstring's definition, one (row, new token, head) at a time."""
    b, hq, t, d = q.shape
    depth = [int(mask[j].sum()) - 1 for j in range(t)]
    out = torch.zeros(b, hq, t, d, dtype=torch.float64)
    for i, n in enumerate(held):
        for r in range(t):
            p = n + depth[r]
            lo = p - window + 1 if window else 0
            keys = [s for s in range(n) if s >= lo] + [n + j for j in range(t) if mask[r, j] and n + depth[j] >= lo]
            for h in range(hq):
                kv = h // (hq // k.shape[1])
                s = k[i, kv, keys].double() @ q[i, h, r].double() / math.sqrt(d)
                logits = torch.cat((s, sinks[h : h + 1].double())) if sinks is not None else s
                out[i, h, r] = torch.softmax(logits, 0)[: len(keys)] @ v[i, kv, keys].double()
    return out


def tensors(b, t, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, HQ, t, D, generator=g).to(dtype), torch.randn(b, HKV, CAP, D, generator=g).to(dtype),
            torch.randn(b, HKV, CAP, D, generator=g).to(dtype))


def poison_unread(k, v, held, t, window):
    """NaN where the kernel must not look: past held + T, and in the blocks wholly before the window's first key
    (that of the block's depth-0 token, the earliest of any row). Copies: the reference reads the clean ones."""
    k, v = k.clone(), v.clone()
    for i, n in enumerate(held):
        first_block = max(0, n + 1 - window) // BLOCK_N * BLOCK_N if window else 0
        for buf in (k, v):
            buf[i, :, n + t :] = float("nan")
            buf[i, :, :first_block] = float("nan")
    return k, v


# (T, held per row, tree, window, sinks, splits): windows 1 and 3 shorter than the block (its own tokens drop out),
# 40 inside the context of the long rows and past it for held 1, 150 longer than the context but for 129 + T, 500
# longer than the buffer; splits 5 leaves splits with nothing to read (they exit at once)
CASES = [
    (5, [1, 63, 129], False, 3, "mixed", 3),
    (7, [63, 129, 0], True, 3, "positive", 5),
    (1, [129, 1, 63], False, 1, "mixed", 2),
    (6, [129, 63, 1], True, 40, "none", 3),
    (4, [0, 129, 63], False, 150, "positive", 1),
    (3, [63, 1, 129], True, 500, "mixed", 3),
    (5, [129, 63, 1], True, 0, "mixed", 3),  # sinks alone
]


@pytest.mark.interpreter
@pytest.mark.parametrize("t, held, is_tree, window, sinks, splits", CASES)
def test_kernel_against_float64(t, held, is_tree, window, sinks, splits, poison):
    q, k, v = tensors(len(held), t, seed=t)
    mask, sinks = (tree(t, seed=window) if is_tree else chain(t)), SINKS[sinks]
    ref = definition(q, k, v, held, mask, window, sinks)
    kp, vp = poison_unread(k, v, held, t, window)
    out = poison(torch.empty_like(q))
    verify_attention_kernel(q, kp, vp, torch.tensor(held), mask, num_splits=splits, out=out, window=window,
                            sinks=sinks)
    assert (out.double() - ref).abs().max().item() < 2e-6


@pytest.mark.interpreter
def test_same_launch_other_lengths_and_masks(poison):
    """One set of tensors: held and the mask rewritten in place between launches (a longer context, a rollback, a
    chain then a tree), window 9 (shorter than most contexts) with mixed sinks; each launch equal to the definition
    at that length."""
    t = 6
    q, k, v = tensors(3, t, seed=11)
    held, mask = torch.zeros(3, dtype=torch.long), chain(t)
    out = torch.empty_like(q)
    for lens, m in (([1, 63, 129], chain(t)), ([129, 1, 63], tree(t, 1)), ([63, 129, 2], tree(t, 2))):
        held.copy_(torch.tensor(lens))
        mask.copy_(m)
        verify_attention_kernel(q, k, v, held, mask, num_splits=3, out=poison(out), window=9, sinks=SINKS["mixed"])
        assert (out.double() - definition(q, k, v, lens, m, 9, SINKS["mixed"])).abs().max().item() < 2e-6, lens


@pytest.mark.interpreter
def test_kernel_half_precision_positive_sinks(poison):
    """fp16 K/V, large positive sinks (most of each softmax goes to the sink), a tree under a short window."""
    t, held = 7, [63, 1, 129]
    q, k, v = tensors(3, t, torch.float16, seed=5)
    mask = tree(t, seed=9)
    out = poison(torch.empty_like(q))
    verify_attention_kernel(q, k, v, torch.tensor(held), mask, num_splits=2, out=out, window=4,
                            sinks=SINKS["positive"].half())
    assert (out.double() - definition(q, k, v, held, mask, 4, SINKS["positive"])).abs().max().item() < 2e-3


def test_reference_against_the_definition():
    """The PyTorch reference (the static verify blocks' CPU and baseline path) in float64, every window / sinks /
    mask combination; and bad arguments refused in one line."""
    t = 5
    q, k, v = tensors(3, t, seed=2)
    for window in (0, 1, 3, 40, 500):
        for sinks in SINKS.values():
            for mask in (chain(t), tree(t, seed=4)):
                for held in ([1, 63, 129], [0, 129, 2]):
                    got = verify_attention_reference(q, k, v, torch.tensor(held), mask, window=window, sinks=sinks,
                                                     compute_dtype=torch.float64)
                    ref = definition(q, k, v, held, mask, window, sinks)
                    assert (got - ref).abs().max().item() < 1e-12, (window, held)
    held = torch.tensor([1, 2, 3])
    with pytest.raises(ValueError, match=r"verify_attention window must be >= 0 keys"):
        verify_attention(q, k, v, held, chain(t), window=-1)
    with pytest.raises(ValueError, match=r"verify_attention sinks must be \[Hq\] = \[4\] logits"):
        verify_attention(q, k, v, held, chain(t), sinks=torch.zeros(2))
