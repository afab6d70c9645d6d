"""The long-context embedded model (ollm_triton/assets/tiny-llama-16k) and the memory-bounded evaluation that
measured it (scripts/train_tiny_lm.py: chunked prefill through transformers' KV cache, batch sized from memory)."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
LONG = REPO / "ollm_triton" / "assets" / "tiny-llama-16k"

needs_long = pytest.mark.skipif(not (LONG / "config.json").is_file(), reason="tiny-llama-16k not in this checkout")


@pytest.fixture(scope="module")
def script(train_script):
    return train_script


@pytest.fixture(scope="module")
def model():
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(LONG), dtype=torch.float32, attn_implementation="sdpa").eval()


@needs_long
def test_asset_is_a_16k_model_with_its_card_found_by_the_model_preset():
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from ollm_triton.build import model_source
    from ollm_triton.run import CONF

    cfg = json.loads((LONG / "config.json").read_text())
    theta = (cfg.get("rope_parameters") or {}).get("rope_theta", cfg.get("rope_theta"))
    assert float(theta) == 1e6 and cfg["max_position_embeddings"] >= 16384
    assert all(f.stat().st_size <= 15 * 2**20 for f in LONG.glob("*.safetensors"))
    # one tokenizer for every embedded model: the perplexities of tiny and tiny_16k compare token for token
    assert (LONG / "tokenizer.json").read_bytes() == (LONG.parent / "tiny-llama" / "tokenizer.json").read_bytes()
    card = (LONG / "README.md").read_text()
    assert "16384" in card and "not shipped" in card and "CPU" in card
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        m = OmegaConf.to_container(compose(config_name="config", overrides=["model=tiny_16k"]), resolve=True)["model"]
    path, trained = model_source(m)
    assert Path(path) == LONG and trained


@needs_long
def test_engine_runs_the_asset_at_rope_base_1e6(model):
    from ollm_triton.engine import load_engine

    engine = load_engine(LONG, device="cpu", dtype=torch.float32)
    assert engine.config.rope_theta == 1e6
    x = torch.randint(3, model.config.vocab_size, (1, 63), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(x).logits
    got = engine.forward(x, engine.new_cache(batch=1, max_len=64))
    assert (got - ref).abs().max().item() <= 1e-3


@needs_long
def test_chunked_perplexity_agreement_and_greedy_match_one_full_forward(script, model):
    """Chunks of 32 over windows of 129 (the last chunk one token) against a float64 cross-entropy of a single
    full-length forward."""
    stream = np.random.default_rng(0).integers(3, model.config.vocab_size, 3 * 129).astype(np.int64)
    cpu = torch.device("cpu")
    got = script.perplexity(model, stream, 129, 10**9, cpu, batch=2, chunk=32)
    x = torch.from_numpy(stream.reshape(3, 129))
    with torch.no_grad():
        logits = model(input_ids=x, use_cache=False).logits.double()
    ref = F.cross_entropy(logits[:, :-1].flatten(0, 1), x[:, 1:].flatten(), reduction="sum").item()
    assert got["tokens"] == 3 * 128
    assert math.log(got["ppl"]) == pytest.approx(ref / (3 * 128), rel=1e-5)
    same = script.agreement(model, model, stream, 129, 10**9, cpu, batch=2, chunk=32)
    assert same == {"agreement": 1.0, "positions": 3 * 129}
    # greedy: the chunked prefill's continuation is the argmax of full forwards, one token appended at a time
    ids = x[:2, :65]
    want = ids
    with torch.no_grad():
        for _ in range(4):
            want = torch.cat([want, model(input_ids=want).logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(script.greedy(model, ids, 4, chunk=32), want[:, 65:])


def test_eval_batch_bounds_memory_by_the_context(script):
    from types import SimpleNamespace

    cfg = SimpleNamespace(num_hidden_layers=6, num_key_value_heads=2, num_attention_heads=6, head_dim=64,
                          hidden_size=384, vocab_size=8192)
    cpu = torch.device("cpu")
    h100 = 78 * 2**30
    sizes = {n: script.eval_batch(cfg, n, cpu, free=h100) for n in (4096, 16384, 32768, 131072)}
    assert sizes[4096] == 8 and sizes[131072] >= 1
    assert list(sizes.values()) == sorted(sizes.values(), reverse=True)
    # what the H100 run died of: batch 8 x 6 heads x 16384^2 fp32 scores = 48 GiB in one allocation; a chunked
    # batch's scores stay under half the memory at every length
    for n, b in sizes.items():
        assert b * 2 * 6 * min(script.EVAL_CHUNK, n) * n * 4 <= h100 / 2
    assert script.eval_batch(cfg, 16384, cpu, free=2**20) == 1
