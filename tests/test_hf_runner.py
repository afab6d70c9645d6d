"""The runner on transformers' own forward: `model=hf_transformers model.source=...` (ollm_triton/hf/engine.py).

- the embedded model's perplexity through transformers' forward equals the native engine's (dense: to 1e-4
  relative; int8 with a short residual, so most scored tokens read int8 keys: to 1e-3, and the same tokens scored
  against lossy storage);
- an architecture the engine does not run (a random Gemma-2 saved to a directory; a random Phi-3 from model.arch)
  runs the default tasks under debug=smoke with a compressing codec, the quality tasks refusing for lack of a
  tokenizer;
- what transformers' forward cannot run refuses in one line before anything loads;
- (tests/test_hf_bridge.py, gpu: decode steps under the runner's adapter run the codec's fused kernel and score as
  the dense() path does; there because the GPU box may have no hydra.)
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("hydra")  # the GPU box has no hydra unless the lead installs its wheel

from hydra import compose, initialize_config_dir  # noqa: E402

from ollm_triton.registry import PluginError, registry  # noqa: E402
from ollm_triton.run import CONF, RunError, run_job  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated:FutureWarning")
ASSET = Path(__file__).resolve().parents[1] / "ollm_triton" / "assets" / "tiny-llama"
BRIDGE = ["model=hf_transformers", f"model.source={ASSET}"]
# windows of 64 tokens every 32 (debug=smoke: 128 tokens of text): 127 tokens scored, most of them in 16-token
# decode blocks over the stored cache
PPL = ["task=perplexity", "task.perplexity.max_length=64", "task.perplexity.stride=32"]
INT8 = ["+cache=int8", "cache.residual=16", "cache.group_size=16"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_torch_thread):
    """A tiny model: a second intra-op thread only waits on the shared CPU (runs went from 40 s to 5 s)."""


def run(tmp_path, *overrides):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config",
                      overrides=["logger=none", "debug=smoke", "device=cpu", "monitor.enabled=false", *overrides])
    return run_job(cfg, tmp_path)


def test_embedded_model_perplexity_through_transformers_equals_the_engines(tmp_path):
    native = run(tmp_path, "model=tiny", *PPL)["metrics"]
    bridged = run(tmp_path, *BRIDGE, *PPL)
    assert bridged["model"]["runtime"] == "transformers" and bridged["model"]["attn_implementation"] == "ollm_sdp"
    assert bridged["model"]["model_class"] == "LlamaForCausalLM"
    m = bridged["metrics"]
    assert m["perplexity/tokens_scored"] == native["perplexity/tokens_scored"] > 100
    assert abs(m["perplexity/ppl"] / native["perplexity/ppl"] - 1) < 1e-4

    native8 = run(tmp_path, "model=tiny", *PPL, *INT8)["metrics"]
    m8 = run(tmp_path, *BRIDGE, *PPL, *INT8)["metrics"]
    assert m8["perplexity/tokens_scored_lossy_cache"] == native8["perplexity/tokens_scored_lossy_cache"] > 50
    assert abs(m8["perplexity/ppl"] / native8["perplexity/ppl"] - 1) < 1e-3
    assert m8["perplexity/ppl"] != m["perplexity/ppl"]  # the int8 keys were read


def test_the_runs_attention_backend_is_transformers_attn_implementation(tmp_path):
    window = ["+attention=sliding_window", "attention.window=16", "attention.sink=2"]
    native = run(tmp_path, "model=tiny", *PPL, *window)["metrics"]
    bridged = run(tmp_path, *BRIDGE, *PPL, *window)
    assert bridged["model"]["attn_implementation"] == "ollm_sliding_window[sink=2,window=16]"
    m = bridged["metrics"]
    assert m["perplexity/keys_masked"] == native["perplexity/keys_masked"] > 0.3
    assert abs(m["perplexity/ppl"] / native["perplexity/ppl"] - 1) < 1e-4


def save_gemma2(directory: Path) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model("gemma2", vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16,
                               sliding_window=4096, attn_logit_softcapping=None, max_position_embeddings=512,
                               pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").save_pretrained(directory)
    return directory


def test_gemma2_runs_every_task_with_int4(tmp_path):
    from ollm_triton.engine import SUPPORTED_MODEL_TYPES

    assert "gemma2" not in SUPPORTED_MODEL_TYPES
    source = save_gemma2(tmp_path / "gemma2")
    record = run(tmp_path, "model=hf_transformers", f"model.source={source}", "+cache=int4", "cache.residual=16",
                 "cache.group_size=16", "task.throughput.prompt=random", "task.memory.prompt=random")
    assert record["model"]["model_class"] == "Gemma2ForCausalLM" and record["footprint"] is None
    assert set(record["refused"]) == {"perplexity", "passkey"}  # no tokenizer in a random model's directory
    m = record["metrics"]
    assert m["throughput/decode_tok_s"] > 0 and m["throughput/new_tokens"] == 4
    # the memory task's cache held int4 blocks: 64 + 2 tokens, all but the 16-token residual window compressed
    assert m["memory/kv_tokens_seen"] == m["memory/context_len"] == 66
    assert m["memory/kv_tokens_compressed"] >= 48 and m["memory/kv_stored_bytes"] < m["memory/kv_original_bytes"] / 2
    assert m["memory/plugin_effect"].startswith("cache int4")


def test_a_random_transformers_config_runs_from_model_arch(tmp_path):
    arch = ("{model_type: phi3, vocab_size: 256, hidden_size: 64, intermediate_size: 128, num_hidden_layers: 2, "
            "num_attention_heads: 4, num_key_value_heads: 2, max_position_embeddings: 512, pad_token_id: 0}")
    record = run(tmp_path, "model=hf_transformers", "model.source=random", f"+model.arch={arch}",
                 "+cache=streaming", "cache.budget=24", "cache.sink=4", "task=memory", "+decoder=sample")
    assert record["model"]["model_class"] == "Phi3ForCausalLM" and not record["model"]["trained"]
    m = record["metrics"]
    assert m["memory/kv_tokens_seen"] == 66 and m["memory/kv_tokens_kept"] <= 24 + 16  # budget + one decode block
    assert m["memory/kv_tokens_evicted"] == 66 - m["memory/kv_tokens_kept"]


@pytest.mark.parametrize("override, words", [
    ("+prefetch=on_demand", ["prefetch 'on_demand'", "resident_weights", "+prefetch=resident"]),
    ("+decoder=prompt_lookup", ["decoder 'prompt_lookup'", "forward_only", "greedy, sample"]),
    ("fast_decode=graph", ["fast_decode='graph'", "accepted: auto, off"]),
    ("model.runtime=vllm", ["model.runtime='vllm'", "accepted: engine, transformers"]),
])
def test_what_transformers_cannot_run_refuses_in_one_line(tmp_path, override, words):
    with pytest.raises((PluginError, RunError)) as excinfo:
        run(tmp_path, *BRIDGE, "task=memory", override)
    msg = str(excinfo.value)
    assert "\n" not in msg and all(w in msg for w in words), msg


def test_every_forward_only_decoder_is_one_the_adapter_can_drive():
    """A decoder declaring forward_only must not reach for the native engine's internals: greedy and sample do."""
    assert {n for n in registry.names("decoder") if registry.get("decoder", n).cls.forward_only} == {"greedy", "sample"}
