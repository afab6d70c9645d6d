"""Chunked prefill (Engine.prefill): same last-token logits and cache as one shot, activations bounded by the chunk."""

import pytest
import torch

from ollm_triton.decoding.greedy import argmax_pick, decode_loop
from ollm_triton.engine import load_engine

SMALL = dict(model_type="llama", vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5)


def prompt(batch=2, t=100, seed=0):
    return torch.randint(0, 256, (batch, t), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("attention", ["sdpa", "flash"])
@pytest.mark.parametrize("chunk", [7, 16, 33, 99])
def test_chunked_equals_one_shot(attention, chunk):
    engine = load_engine(SMALL, attention=attention, seed=0)
    ids = prompt()
    full_cache, chunked_cache = engine.new_cache(2, 100), engine.new_cache(2, 100)
    full = engine.prefill(ids, full_cache, chunk=0)
    got = engine.prefill(ids, chunked_cache, chunk=chunk)
    assert got.shape == (2, 256) and got.dtype == torch.float32
    assert (full - got).abs().max().item() <= 1e-5
    assert chunked_cache.position == 100 and chunked_cache.layers[0].length == 100
    for a, b in zip(full_cache.layers, chunked_cache.layers, strict=True):
        ka, va = a.dense()
        kb, vb = b.dense()
        assert (ka - kb).abs().max().item() <= 1e-5 and (va - vb).abs().max().item() <= 1e-5


def test_activation_memory_is_bounded_by_the_chunk():
    engine = load_engine(SMALL, seed=0, prefill_chunk=24)
    widest = []
    hooks = [layer.mlp.register_forward_hook(lambda m, args, out: widest.append(args[0].shape[1]))
             for layer in engine.model.model.layers]
    engine.prefill(prompt(t=100), engine.new_cache(2, 100))  # the engine's default chunk
    assert max(widest) == 24 and sum(widest) == 100 * 2  # every token through each of the 2 MLPs, 24 at a time
    widest.clear()
    engine.prefill(prompt(t=100), engine.new_cache(2, 100), chunk=0)
    assert max(widest) == 100
    for h in hooks:
        h.remove()


def test_decode_loop_uses_the_engine_chunk():
    plain = load_engine(SMALL, seed=0)
    chunked = load_engine(SMALL, seed=0, prefill_chunk=17)
    ids = prompt(t=60)
    a = decode_loop(plain, ids, 8, argmax_pick, None)
    b = decode_loop(chunked, ids, 8, argmax_pick, None)
    assert torch.equal(a.tokens, b.tokens)
    assert chunked.describe()["prefill_chunk"] == 17


def test_bad_chunk_is_one_line():
    with pytest.raises(ValueError, match="prefill_chunk must be >= 0 tokens"):
        load_engine(SMALL, prefill_chunk=-1)
    engine = load_engine(SMALL)
    with pytest.raises(ValueError, match="prefill chunk must be >= 0 tokens"):
        engine.prefill(prompt(t=4), engine.new_cache(2, 4), chunk=-5)


@pytest.mark.gpu
def test_gpu_chunked_prefill_bounds_peak_memory():
    cfg = dict(SMALL, vocab_size=32000, hidden_size=1024, intermediate_size=4096, num_attention_heads=8,
               num_key_value_heads=2, max_position_embeddings=65536)
    engine = load_engine(cfg, device="cuda", dtype=torch.bfloat16, seed=0, attention="flash")
    ids = prompt(batch=1, t=16384).cuda()
    peaks, logits = {}, {}
    for chunk in (0, 2048):
        cache = engine.new_cache(1, 16384)
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        logits[chunk] = engine.prefill(ids, cache, chunk=chunk)
        torch.cuda.synchronize()
        peaks[chunk] = torch.cuda.max_memory_allocated() - base
        del cache
    rel = ((logits[0] - logits[2048]).norm() / logits[0].norm()).item()
    assert rel < 2e-2, rel
    assert peaks[2048] < 0.5 * peaks[0], peaks
