"""Slot rows of one static quantized cache (engine/slots.py `SlotRows`), driven directly: the host tells a row's
layers its length only after the steps that filled its window (`CacheLayer.sync_due`: one check a row and step, not
one call a layer), and a released row is told its final length before it is copied. Correctness of the tokens
through the scheduler is tests/test_scheduler.py's."""

import pytest
import torch

from ollm_triton.cache import dense as dense_module
from ollm_triton.cache import quant as quant_module
from ollm_triton.cache.quant import QuantLayer
from ollm_triton.engine import load_engine
from ollm_triton.engine.slots import SlotRows
from ollm_triton.registry import registry

SMALL = dict(model_type="llama", vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5)


def test_slot_rows_tell_the_layers_only_when_a_window_fills(monkeypatch):
    params = {"residual": 16, "group_size": 16}
    engine = load_engine(SMALL, seed=1, fast_decode="static", codec=registry.build("cache", "int4", params))
    rows = SlotRows(engine, max_batch=4, max_context=96)
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 256, (1, t), generator=gen) for t in (5, 30, 17)]  # windows of 5, 30 and 17
    caches = [rows.allocate(p.shape[1] + 20) for p in prompts]
    tokens = []
    for cache, p in zip(caches, prompts, strict=True):
        tokens.append(rows.prefill([cache], p).argmax(-1))
        cache.position = p.shape[1]
    told = []
    set_length = QuantLayer.set_length
    monkeypatch.setattr(QuantLayer, "set_length", lambda self, n: (told.append((id(self), n)), set_length(self, n))[1])
    steps = 14
    for _ in range(steps):
        _, argmax = rows.decode(caches, torch.cat(tokens), [True] * 3)
        tokens = list(argmax[:, None].unbind(0))
    # windows fill at 32 tokens (16 + 16), then 48: the 30-token row at step 2, the 17-token row at step 15 (not
    # reached), the 5-token row never; 2 layers each. Per layer and step it would be 3 x 2 x 14 = 84 calls.
    assert sorted(n for _, n in told) == [32, 32]
    assert [c.layers[0].length for c in caches] == [5, 32, 17]  # the others lag until a due step or release
    kept = [rows.release(c) for c in caches]
    for c, p, copy, quantized in zip(caches, prompts, kept, (0, 16, 0), strict=True):
        n = p.shape[1] + steps  # 19, 44, 31 tokens: one group quantized in the row that passed 32
        assert copy.position == n and all(layer.length == n for layer in c.layers + copy.layers)
        assert c.layers[0].n_quant == copy.layers[0].n_quant == quantized


@pytest.mark.parametrize("codec", ["dense", "int4"])
def test_idle_rows_attend_one_key(monkeypatch, codec):
    """A bucket's idle rows step at the scratch position (past every request): their output is dropped, so they
    attend one key instead of a full-capacity row, which would set the step's time now that the varlen kernels'
    work follows each row's length. Busy rows keep their own lengths and split points."""
    engine = load_engine(SMALL, seed=1, fast_decode="static", codec=codec)
    rows = SlotRows(engine, max_batch=4, max_context=300)
    seen = []
    if codec == "int4":
        ref = quant_module.quant_decode_varlen_ref
        monkeypatch.setattr(quant_module, "quant_decode_varlen_ref",
                            lambda q, *a, **kw: (seen.append((a[8], a[9])), ref(q, *a, **kw))[1])
    else:
        ref = dense_module.decode_varlen
        monkeypatch.setattr(dense_module, "decode_varlen",
                            lambda q, k, v, n, **kw: (seen.append(n.tolist()), ref(q, k, v, n, **kw))[1])
    caches = [rows.allocate(290) for _ in range(3)]  # slots 0, 1, 2: the step runs the 4-row bucket
    for cache, n in zip(caches, (280, 3, 140), strict=True):
        rows.prefill([cache], torch.randint(0, 256, (1, n), generator=torch.Generator().manual_seed(n)))
        cache.position = n
    logits, _ = rows.decode([caches[0], caches[2]], torch.tensor([1, 2]), [True, True])  # slot 1 idle this step
    assert torch.isfinite(logits).all() and len(seen) == 2  # one call a layer
    if codec == "int4":  # residual 128 + group 128: 280 -> 128 quantized; the idle rows (1 and 3) hold none
        assert seen[0] == ([128, 0, 0, 0], [281, 1, 141, 1])
    else:
        assert seen[0] == [281, 1, 141, 1]
