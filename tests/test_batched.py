"""Batched decode of sequences of different lengths (engine/batching.py): each row equals decoding it alone."""

import pytest
import torch

from ollm_triton.decoding.greedy import argmax_pick, decode_loop
from ollm_triton.engine import load_engine
from ollm_triton.engine.batching import generate_ragged

SMALL = dict(model_type="llama", vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5)
LENGTHS = (5, 17, 40)


def prompts(lengths=LENGTHS, seed=0, vocab=256):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g) for n in lengths]


def test_ragged_rows_equal_single_sequences():
    engine = load_engine(SMALL, seed=0)  # CPU: fast_path eager, so the batcher uses a static (uncaptured) step
    ps = prompts()
    got = generate_ragged(engine, ps, 10)
    assert got.tokens.shape == (3, 10) and got.counters["prompt_tokens"] == sum(LENGTHS)
    for b, p in enumerate(ps):
        alone = decode_loop(engine, p[None], 10, argmax_pick, None)
        assert torch.equal(got.tokens[b], alone.tokens[0]), b
    # the rows' K/V sit in one bucket, each up to its own length (prompt + 9 fed tokens); the rest stays zero
    bk = engine._ragged.buckets[3]
    for b, n in enumerate(LENGTHS):
        k = bk.cache.layers[1].k[b]
        assert k[:, : n + 9].abs().sum() > 0 and k[:, n + 9 :].abs().sum() == 0


def test_ragged_with_chunked_prefill_eos_and_sampling():
    engine = load_engine(SMALL, seed=0, prefill_chunk=8)
    ps = prompts(seed=1)
    free = generate_ragged(engine, ps, 8)
    eos = int(free.tokens[1, 2])  # row 1 stops after 3 tokens
    got = generate_ragged(engine, ps, 8, eos_id=eos)
    for b, p in enumerate(ps):
        alone = decode_loop(engine, p[None], 8, argmax_pick, eos)
        n = alone.tokens.shape[1]
        assert torch.equal(got.tokens[b, :n], alone.tokens[0]) and (got.tokens[b, n:] == eos).all()
    drawn = []

    def pick(logits):  # a sampler-style pick runs outside the step on its logits
        drawn.append(logits)
        return logits.argmax(-1)

    assert torch.equal(generate_ragged(engine, ps, 8, pick=pick).tokens, free.tokens) and len(drawn) == 8


def test_ragged_bad_input_is_one_line():
    engine = load_engine(SMALL, seed=0, attention="sliding_window")
    with pytest.raises(ValueError, match="needs the static decode step, and attention 'sliding_window'"):
        generate_ragged(engine, prompts(), 4)
    engine = load_engine(SMALL, seed=0)
    with pytest.raises(ValueError, match="at least one token"):
        generate_ragged(engine, [torch.tensor([1, 2]), torch.tensor([], dtype=torch.long)], 4)
    with pytest.raises(ValueError, match="at least one prompt"):
        generate_ragged(engine, [], 4)


GPU_MODEL = dict(model_type="llama", vocab_size=4096, hidden_size=512, intermediate_size=1536, num_hidden_layers=4,
                 num_attention_heads=8, num_key_value_heads=2, head_dim=64, max_position_embeddings=8192,
                 rms_norm_eps=1e-5)


@pytest.mark.gpu
def test_gpu_ragged_graph_equals_eager_step_and_single_rows():
    from ollm_triton.engine.fast_decode import FastDecoder

    graph = load_engine(GPU_MODEL, device="cuda", dtype=torch.bfloat16, seed=0)
    static = load_engine(GPU_MODEL, device="cuda", dtype=torch.bfloat16, seed=0, fast_decode="off")
    static._ragged = FastDecoder(static, capture=False, fuse_weights=True)  # same kernels, no capture
    ps = prompts((1, 63, 129, 1000), vocab=4096)
    a = generate_ragged(graph, ps, 48)
    b = generate_ragged(static, ps, 48)
    assert a.counters["fast_path_graph"] == 1.0 and torch.equal(a.tokens, b.tokens)
    # next to each row alone (batched matmuls round differently in bf16: compare the first step's logits)
    def recorder(store):
        return lambda lg: store.append(lg.clone()) or lg.argmax(-1)

    firsts = []
    generate_ragged(graph, ps, 2, pick=recorder(firsts))
    for i, p in enumerate(ps):
        single = []
        graph.fast_decoder().generate(p[None].cuda(), 2, recorder(single))
        for s, f in zip(single, firsts, strict=True):
            assert ((s[0] - f[i]).norm() / s[0].norm()).item() < 2e-2
