"""scripts/train_tiny_lm.py's long-context continuation at toy sizes on the CPU: --init carries the checkpoint's
weights into a model whose config and rotary frequencies use the new RoPE base and context, --max-seconds stops both
loops and still saves, and scripts/make_model_card.py writes the cards from the log alone; the quality_long preset
composes onto the long model at 8k-32k and onto the shipped model at short lengths under debug=smoke."""

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
TOKENIZER = REPO / "ollm_triton" / "assets" / "tiny-llama" / "tokenizer.json"
sys.path.insert(0, str(REPO / "scripts"))
pytestmark = pytest.mark.skipif(not TOKENIZER.is_file(), reason="embedded tokenizer not shipped")

TOY = ["--smoke", "--context", "128", "--short-context", "64", "--short-frac", "0.5", "--batch-tokens", "256",
       "--max-docs", "3", "--max-eval-docs", "1", "--eval-tokens", "256", "--passkey-lengths", "128",
       "--passkey-samples", "1", "--max-needles", "2", "--multikey-pairs", "2", "--rope-theta", "1e6",
       "--names", "long,long-draft"]


@pytest.fixture(scope="module")
def inits(tmp_path_factory):
    """A toy target and draft saved as checkpoints at context 64, RoPE base 1e4, with the shipped tokenizer."""
    from train_tiny_lm import Arch, make_model

    root = tmp_path_factory.mktemp("init")
    for name, arch in (("t", Arch(32, 2, 2, 1, 64, head_dim=16)), ("d", Arch(32, 1, 2, 1, 32, head_dim=16))):
        make_model(arch, 8192, 64, 1e4, seed=1).save_pretrained(str(root / name))
        shutil.copy(TOKENIZER, root / name)
    return root


def load(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)


def test_init_continues_the_weights_with_the_new_rope_base_and_a_card_from_the_log(inits, tmp_path):
    import make_model_card
    import train_tiny_lm

    out = tmp_path / "out"
    # lr 0 and no weight decay: training must leave the initial weights exactly as loaded
    log = train_tiny_lm.main([*TOY, "--init", str(inits / "t"), "--init-draft", str(inits / "d"), "--lr", "0",
                              "--weight-decay", "0", "--target-steps", "2", "--draft-steps", "1", "--out", str(out)])
    for name, init in (("long", "t"), ("long-draft", "d")):
        config = json.loads((out / name / "config.json").read_text())
        assert config["rope_parameters"]["rope_theta"] == 1e6 and config["max_position_embeddings"] == 128
        new, old = load(out / name), load(inits / init)
        for (k, a), (_, b) in zip(new.state_dict().items(), old.state_dict().items(), strict=True):
            assert torch.equal(a, b.to(torch.bfloat16).float()), k  # saved in bf16
        # the rotary frequencies follow the new base, not the checkpoint's (a buffer rebuilt from the config)
        d = config["head_dim"]
        want = 1.0 / (1e6 ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
        torch.testing.assert_close(new.model.rotary_emb.inv_freq.double(), want, rtol=1e-6, atol=0)
    assert log["target"]["init"]["rope_theta"] == 1e4 and log["target"]["init"]["context"] == 64
    assert log["target"]["training"]["steps"] == 2 and not log["target"]["training"]["stopped_by_max_seconds"]

    for card in (out / "long" / "README.md", out / "long-draft" / "README.md"):
        card.unlink()
    make_model_card.main(["--log", str(out / "train_log.json"), "--folder", str(out)])
    card = (out / "long" / "README.md").read_text()
    assert "continued from `t` (trained at context 64, RoPE base 10000) with the RoPE base raised to 1e+06" in card
    assert "| trained context / RoPE theta | 128 / 1e+06 |" in card and "1 to 2 key-value pairs" in card
    assert f"**{log['target']['eval']['perplexity']['ppl']:.2f}**" in card and "TODO" not in card
    assert "Multi-key retrieval (2 key-value pairs" in card and set(log["target"]["eval"]["multikey"]["by_length"]) == {
        "128"} and "multikey" not in log["draft"]["eval"]


def test_max_seconds_stops_both_loops_and_saves(inits, tmp_path):
    import train_tiny_lm

    out = tmp_path / "out"
    log = train_tiny_lm.main([*TOY, "--init", str(inits / "t"), "--target-steps", "50", "--draft-steps", "50",
                              "--max-seconds", "0.01", "--skip-eval", "--out", str(out)])
    for name in ("target", "draft"):
        t = log[name]["training"]
        assert t["stopped_by_max_seconds"] and t["steps"] < t["planned_steps"] == 50 and t["tokens_seen"] == t[
            "steps"] * 256
    assert (out / "long" / "config.json").is_file() and (out / "long-draft" / "config.json").is_file()


def test_init_with_another_vocabulary_is_refused(inits, tmp_path):
    import train_tiny_lm
    from tokenizers import Tokenizer, models

    Tokenizer(models.BPE(vocab={"a": 0, "b": 1, "<|eos|>": 2}, merges=[])).save(str(tmp_path / "tok.json"))
    with pytest.raises(ValueError, match="--init model has vocab 8192, the tokenizer 3"):
        train_tiny_lm.main([*TOY, "--init", str(inits / "t"), "--tokenizer", str(tmp_path / "tok.json"),
                            "--target-steps", "1", "--out", str(tmp_path)])


def test_quality_long_preset_measures_the_long_model_at_8k_to_32k_and_smoke_shrinks_it():
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from ollm_triton.run import CONF

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        full, smoke = (OmegaConf.to_container(compose(config_name="config", overrides=o), resolve=True) for o in (
            ["+experiment=quality_long", "+cache=int4"], ["+experiment=quality_long", "+cache=int4", "debug=smoke"]))
    assert full["model"]["source"] == "embedded:tiny-llama-16k" and smoke["model"]["source"] == "embedded:tiny-llama"
    assert list(full["task"]) == list(smoke["task"]) == ["perplexity", "passkey", "multikey"]
    for task in ("passkey", "multikey"):
        assert full["task"][task]["lengths"] == [8192, 16384, 32768] and max(smoke["task"][task]["lengths"]) <= 320
    assert full["task"]["perplexity"]["max_length"] == 16384 and full["task"]["multikey"]["num_pairs"] == 16
