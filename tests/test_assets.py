"""The shipped checkpoints (ollm_triton/assets/tiny-llama, tiny-llama-draft): loadable by transformers and by the
native engine with matching logits, within the issue's size and shape limits, sharing one tokenizer."""

import json
import math
from pathlib import Path

import pytest
import torch

ASSETS = Path(__file__).resolve().parent.parent / "ollm_triton" / "assets"
TARGET, DRAFT = ASSETS / "tiny-llama", ASSETS / "tiny-llama-draft"
TEXT = 'def greet(name):\n    """Say hello."""\n    return f"hello {name}"\n\n\nclass Point:\n    x: int = 0\n'

pytestmark = pytest.mark.skipif(not (TARGET / "config.json").is_file(), reason="embedded models not trained yet")


def n_params(folder: Path) -> int:
    from safetensors import safe_open

    total = 0
    for f in folder.glob("*.safetensors"):
        with safe_open(str(f), "pt") as s:
            total += sum(math.prod(s.get_slice(k).get_shape()) for k in s.keys())
    return total


def test_files_shapes_and_sizes():
    for folder in (TARGET, DRAFT):
        for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "README.md"):
            assert (folder / name).is_file(), f"{folder.name}/{name}"
        shards = list(folder.glob("*.safetensors"))
        assert shards and all(f.stat().st_size <= 15 * 2**20 for f in shards)
    cfg = json.loads((TARGET / "config.json").read_text())
    assert cfg["model_type"] == "llama" and cfg["head_dim"] == 64
    assert cfg["num_key_value_heads"] < cfg["num_attention_heads"]
    assert cfg["max_position_embeddings"] >= 4096
    assert sum(f.stat().st_size for f in TARGET.glob("*.safetensors")) <= 40e6
    assert n_params(DRAFT) <= n_params(TARGET) / 5
    assert (TARGET / "tokenizer.json").read_bytes() == (DRAFT / "tokenizer.json").read_bytes()


@pytest.mark.parametrize("folder", [TARGET, DRAFT], ids=["target", "draft"])
def test_transformers_and_engine_agree(folder):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ollm_triton.engine import load_engine

    hf_tok = AutoTokenizer.from_pretrained(str(folder))
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    engine = load_engine(folder, device="cpu", dtype=torch.float32)
    ids = engine.tokenizer.encode(TEXT)
    assert ids == hf_tok(TEXT, add_special_tokens=False)["input_ids"]
    assert engine.tokenizer.decode(ids) == TEXT
    x = torch.tensor([ids])
    with torch.no_grad():
        ref = model(x).logits
    cache = engine.new_cache(batch=1, max_len=len(ids) + 4)
    got = engine.forward(x, cache)
    assert (got - ref).abs().max().item() <= 1e-3
    # and the model is trained: the text is far more likely than under a uniform guess
    nll = torch.nn.functional.cross_entropy(ref[0, :-1], x[0, 1:]).item()
    assert nll < 0.6 * torch.log(torch.tensor(float(model.config.vocab_size))).item()
