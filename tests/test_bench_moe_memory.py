"""The memory table's GPT-OSS-20B and Qwen3-Next-80B rows (conf/experiment/memory_rows/, appended to the memory
study): each preset sweeps its model at 8k and 32k with baseline, KV quantization, KV pruning and streaming, and
the sets run end to end on tiny stand-ins of both model types (the real shapes need a GPU): expert streaming moves
experts from the host rows, pruning stores fewer KV bytes than the baseline of the same run."""

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from ollm_triton.run import CONF, check_top_level_keys, resolve_plugins, run_job

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SETS = {p.stem for p in (CONF / "experiment" / "plugins").glob("*.yaml")}
TINY = {  # the presets' model types at sizes a CPU runs in a second
    "gpt_oss_20b": dict(vocab_size=512, hidden_size=64, intermediate_size=40, num_local_experts=8,
                        num_experts_per_tok=2, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2,
                        head_dim=16, sliding_window=8, layer_types="[sliding_attention,full_attention]"),
    "qwen3_next_80b": dict(vocab_size=512, hidden_size=64, intermediate_size=96, num_attention_heads=4,
                           num_key_value_heads=2, head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4,
                           linear_key_head_dim=16, linear_value_head_dim=16, num_experts=16, num_experts_per_tok=4,
                           moe_intermediate_size=32, shared_expert_intermediate_size=32, num_hidden_layers=4),
}


def composed(*overrides, hydra=False):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides), return_hydra_config=hydra)


@pytest.mark.parametrize("model", sorted(TINY))
def test_rows_preset_sweeps_its_model_at_8k_and_32k(model):
    rows = ["+experiment=memory", f"+experiment/memory_rows={model}"]
    full, smoke = (OmegaConf.to_container(composed(*rows, *extra, hydra=True).hydra.sweeper.params, resolve=True)
                   for extra in ([], ["debug=smoke"]))
    assert full["model"] == smoke["model"] == model  # the preset's, not the memory study's llama3_8b
    assert (full["task.memory.context_len"], smoke["task.memory.context_len"]) == ("8192,32768", "64")
    sets = full["+experiment/plugins"].split(",")
    assert sets[0] == "baseline" and {"kv_int4", "kv_snapkv", "prefetch_experts"} <= set(sets) <= SETS
    # gpt-oss: flash (all_combined's attention) honours its windows and sinks; Qwen3-Next's preset leaves it out
    assert ("all_combined" in sets) == (model == "gpt_oss_20b")
    if model == "qwen3_next_80b":  # resident, the 48-layer model fits no single GPU: cut, 3 linear : 1 full
        assert full["model.arch.num_hidden_layers"] == "8"
    # the new set composes with the model into the registered policy and its parameters (tests/test_experiments.py
    # composes every set with llama3_8b)
    cfg = composed(*rows, f"model={model}", "+experiment/plugins=prefetch_experts")
    check_top_level_keys(cfg)
    prefetch = resolve_plugins(OmegaConf.to_container(cfg, resolve=True))["prefetch"]
    assert prefetch["name"] == "experts" and prefetch["params"]["budget_gb"] == 8.0
    assert prefetch["params"]["host_dtype"] == "fp8"


@pytest.mark.parametrize("model", sorted(TINY))
def test_streaming_and_pruning_rows_run_on_a_tiny_model(model, tmp_path):
    arch = [f"model.arch.{k}={v}" for k, v in TINY[model].items()]
    base = ["+experiment=memory", f"+experiment/memory_rows={model}", f"model={model}", *arch, "logger=none",
            "debug=smoke", "device=cpu", "monitor.enabled=false"]
    stream = run_job(composed(*base, "+experiment/plugins=prefetch_experts"), tmp_path / "stream")
    m = stream["metrics"]
    assert stream["status"] == "ok" and stream["plugins"]["prefetch"]["name"] == "experts"
    assert m["memory/context_len"] == 64 + 2  # debug=smoke: a 64-token prompt, 2 decode steps
    assert m["prefetch/misses"] > 0 and m["prefetch/accesses"] >= m["prefetch/misses"]  # from the host rows
    pruned = run_job(composed(*base, "+experiment/plugins=kv_snapkv"), tmp_path / "pruned")["metrics"]
    assert pruned["memory/kv_stored_bytes"] < pruned["memory/kv_original_bytes"]
    assert pruned["memory/kv_original_bytes"] == m["memory/kv_stored_bytes"]  # the same cache, dense, when streamed
