"""The memory check before building: refuse in one line what cannot fit, in milliseconds, and let the rest through."""

import time
from pathlib import Path

import pytest
import torch
import yaml

from ollm_triton.engine.footprint import DoesNotFit, check_fits, estimate, model_config
from ollm_triton.registry import registry

ROOT = Path(__file__).resolve().parents[1]
GB = 1e9


def arch(name):
    for conf in (ROOT / "ollm_triton" / "conf", ROOT / "conf"):
        path = conf / "model" / f"{name}.yaml"
        if path.is_file():
            return yaml.safe_load(path.read_text())["arch"]
    raise FileNotFoundError(name)


def plugins(cache="dense", prefetch="resident", **prefetch_params):
    return registry.build("cache", cache), registry.build("prefetch", prefetch, prefetch_params)


def test_llama3_8b_on_a_24gb_cpu_refuses_in_milliseconds():
    codec, policy = plugins()
    seconds = []
    for _ in range(2):  # the first call imports what it reads (psutil, placement); the second is the check alone
        t0 = time.perf_counter()
        with pytest.raises(DoesNotFit) as e:
            check_fits(arch("llama3_8b"), dtype="auto", device="cpu", batch=1, context=2048 + 16, codec=codec,
                       prefetch=policy, name="llama3_8b", free=(24 * GB, 24 * GB))
        seconds.append(time.perf_counter() - t0)
    assert seconds[0] < 2 and seconds[1] < 0.05, seconds
    msg = str(e.value)
    assert "\n" not in msg and isinstance(e.value, ValueError)
    assert msg.startswith("llama3_8b does not fit: 1 x 2064 tokens need 33.")
    assert "weights 32.12 GB float32" in msg and "but 24.0 GB is free" in msg
    assert "use a GPU" in msg and "model=tiny_random" in msg


@pytest.mark.parametrize("big, tiny", [("qwen3_moe_30b", "tiny_qwen3_moe"), ("gpt_oss_20b", "tiny_gpt_oss"),
                                       ("qwen3_next_80b", "tiny_qwen3_next")])
def test_a_refused_model_points_to_a_small_one_of_its_architecture(big, tiny):
    """The refusal names the small preset of the same architecture, and that preset fits and runs on this CPU."""
    codec, policy = plugins()
    with pytest.raises(DoesNotFit) as e:
        check_fits(arch(big), dtype="auto", device="cpu", batch=1, context=592, codec=codec, prefetch=policy,
                   name=big, free=(24 * GB, 24 * GB))
    assert str(e.value).endswith(f"model={tiny}")
    assert arch(tiny)["model_type"] == arch(big)["model_type"]
    assert check_fits(arch(tiny), dtype="auto", device="cpu", batch=1, context=592, codec=codec,
                      prefetch=policy)["fits"]
    from ollm_triton.engine.engine import load_engine

    torch.manual_seed(0)
    engine = load_engine(arch(tiny), device="cpu")
    cache = engine.new_cache(max_len=8)
    logits = engine.forward(torch.arange(5)[None], cache)
    assert logits.shape == (1, 5, arch(tiny)["vocab_size"]) and torch.isfinite(logits).all()


def test_mxfp4_experts_count_as_the_bytes_the_engine_holds():
    """experts=mxfp4: the estimate's weights are the parameters the engine holds, byte for byte (codes and scales
    for the routed experts, float32 for the rest on this CPU); gpt-oss-20b comes to ~13.8 GB against ~41.8 in bf16."""
    from ollm_triton.engine.engine import load_engine

    codec, policy = plugins()
    est = check_fits(arch("tiny_gpt_oss"), dtype="auto", device="cpu", batch=1, context=0, codec=codec,
                     prefetch=policy, experts="mxfp4")
    engine = load_engine(arch("tiny_gpt_oss"), experts="mxfp4")
    held = {p.data_ptr(): p.numel() * p.element_size() for p in engine.model.parameters()}  # tied: once
    assert est["weights_bytes"] == sum(held.values())
    big = model_config(arch("gpt_oss_20b"))
    dense = estimate(big, dtype=torch.bfloat16, device="cpu", batch=1, context=0, codec=codec, prefetch=policy)
    packed = estimate(big.with_experts("mxfp4"), dtype=torch.bfloat16, device="cpu", batch=1, context=0, codec=codec,
                      prefetch=policy)
    assert (round(dense["weights_bytes"] / GB, 1), round(packed["weights_bytes"] / GB, 1)) == (41.8, 13.8)
    with pytest.raises(ValueError, match="keeps the experts resident"):
        check_fits(arch("tiny_gpt_oss"), dtype="auto", device="cpu", batch=1, context=0, codec=codec,
                   prefetch=registry.build("prefetch", "lookahead"), experts="mxfp4")
    # the run's `experts=mxfp4` reaches the memory check and the engine (build.py)
    from ollm_triton import OptimizedInference

    with OptimizedInference("tiny_gpt_oss", overrides=["experts=mxfp4"], device="cpu") as llm:
        assert llm.footprint["weights_bytes"] == est["weights_bytes"]
        assert llm.engine.config.expert_format == "mxfp4"


def test_llama3_8b_measured_against_this_machine():
    """Without injected numbers it reads psutil: float32 8B needs 32 GB, more than this CPU machine has."""
    import psutil

    if psutil.virtual_memory().available > 40 * GB:
        pytest.skip("this machine has room for 32 GB of weights")
    codec, policy = plugins()
    with pytest.raises(DoesNotFit, match="does not fit"):
        check_fits(arch("llama3_8b"), dtype="auto", device="cpu", batch=1, context=4096, codec=codec,
                   prefetch=policy)


def test_tiny_models_pass_and_return_the_estimate():
    codec, policy = plugins()
    est = check_fits(arch("tiny_random"), dtype="auto", device="cpu", batch=1, context=4096, codec=codec,
                     prefetch=policy)
    assert est["fits"] and est["weights_bytes"] == model_config(arch("tiny_random")).num_parameters() * 4
    assert est["kv_bytes"] == 2 * 2 * 64 * 4 * 4096 * 4  # K and V, 2 KV heads x 64, float32, 4 layers
    embedded = ROOT / "ollm_triton" / "assets" / "tiny-llama"
    if (embedded / "config.json").is_file():
        assert check_fits(str(embedded), dtype="auto", device="cpu", batch=1, context=4096, codec=codec,
                          prefetch=policy)["fits"]


def test_codec_and_prefill_chunk_shrink_the_estimate():
    cfg = model_config(arch("llama3_8b"))
    dense, policy = plugins()
    int4, _ = plugins("int4")
    kw = dict(dtype=torch.bfloat16, device=torch.device("cuda"), batch=1, context=131072, prefetch=policy)
    a = estimate(cfg, codec=dense, **kw)
    b = estimate(cfg, codec=int4, **kw)
    assert b["kv_bytes"] < a["kv_bytes"] / 3.5
    c = estimate(cfg, codec=dense, prefill_chunk=4096, **kw)
    # a chunk's own activations, plus what its attention holds over the 131k held keys (sdpa's masks: 1.6 GB)
    assert c["activation_bytes"] < a["activation_bytes"] / 6


def test_a_later_prompt_chunk_counts_the_keys_it_reads_and_the_masks_its_backend_declares():
    """At 128k in 4096-token chunks the last chunk concatenates the 127k held K/V with its own (4 KB a token a layer
    on Llama-3-8B shapes in bf16) and, with sdpa, holds a bool mask and its bf16 additive copy (3 B a pair); the
    Triton kernels on CUDA hold no mask; int4 also decodes the held tokens back (the memory study's 128k rows were
    1.9-2.4 GB over the estimate without this term)."""
    cfg = model_config(arch("llama3_8b"))
    dense, policy = plugins()
    t, s, per_token = 4096, 131072, 2 * 8 * 128 * 2
    kw = dict(dtype=torch.bfloat16, device=torch.device("cuda"), batch=1, context=s, prefetch=policy, prefill_chunk=t)
    sdpa, flash = registry.build("attention", "sdpa"), registry.build("attention", "flash")
    with_sdpa = estimate(cfg, codec=dense, attention=sdpa, **kw)
    assert with_sdpa["chunk_attention_bytes"] == per_token * s + t * s * 3
    assert estimate(cfg, codec=dense, **kw)["chunk_attention_bytes"] == with_sdpa["chunk_attention_bytes"]
    with_flash = estimate(cfg, codec=dense, attention=flash, **kw)
    assert with_flash["chunk_attention_bytes"] == per_token * s  # the kernels read a block schedule
    assert with_sdpa["device_bytes"] - with_flash["device_bytes"] == t * s * 3
    on_cpu = estimate(cfg, codec=dense, attention=flash, **{**kw, "device": torch.device("cpu")})
    assert on_cpu["chunk_attention_bytes"] == with_sdpa["chunk_attention_bytes"]  # the reference masks densely
    int4 = estimate(cfg, codec=plugins("int4")[0], attention=flash, **kw)
    assert int4["chunk_attention_bytes"] >= per_token * (s + s - t)  # the held tokens decoded, then concatenated
    one_shot = estimate(cfg, codec=dense, attention=sdpa, **{**kw, "prefill_chunk": 0})
    assert one_shot["chunk_attention_bytes"] == 0  # one forward attends to itself under is_causal


def test_gpu_checks_the_device_cap_and_suggests_streaming_or_int4():
    codec, policy = plugins()
    with pytest.raises(DoesNotFit) as e:  # 16 GB of bf16 weights under an 8 GB cap on an 80 GB card
        check_fits(arch("llama3_8b"), dtype="bfloat16", device="cuda", batch=1, context=4096, codec=codec,
                   prefetch=policy, device_memory_gb=8, free=(80 * GB, 200 * GB))
    msg = str(e.value)
    assert "of cuda memory" in msg and "(device_memory_gb=8)" in msg
    assert "+prefetch=lookahead prefetch.budget_gb=" in msg
    with pytest.raises(DoesNotFit, match=r"\+cache=int4, prefill_chunk=4096"):  # KV and activations of 8 x 128k
        check_fits(arch("llama3_8b"), dtype="bfloat16", device="cuda", batch=8, context=131072, codec=codec,
                   prefetch=policy, free=(80 * GB, 200 * GB))


def test_streaming_policy_is_checked_against_its_budget():
    codec, lookahead = plugins("dense", "lookahead", budget_gb=6.0)
    est = check_fits(arch("llama3_8b"), dtype="bfloat16", device="cuda", batch=1, context=4096, codec=codec,
                     prefetch=lookahead, device_memory_gb=8, free=(80 * GB, 200 * GB))
    # head (1.05 GB embeddings + 1.05 GB LM head) + 4 slots of 0.44 GB: under the budget, far under 16 GB
    assert 3 * GB < est["device_weights_bytes"] < 6 * GB and est["host_bytes"] == est["weights_bytes"]
    on_demand = registry.build("prefetch", "on_demand")
    one = estimate(model_config(arch("llama3_8b")), dtype=torch.bfloat16, device=torch.device("cuda"), batch=1,
                   context=0, codec=codec, prefetch=on_demand)
    assert one["device_weights_bytes"] < est["device_weights_bytes"]
    # the host must hold what a streaming policy keeps there
    with pytest.raises(DoesNotFit, match="host memory"):
        check_fits(arch("llama3_8b"), dtype="bfloat16", device="cuda", batch=1, context=4096, codec=codec,
                   prefetch=lookahead, free=(80 * GB, 8 * GB))


def test_kv_stored_on_the_host_counts_three_layers_on_the_device():
    """The moonshot run (Llama-3-8B at 128k within 8 GB): int4 KV with store=cpu waits on the host between layers, so
    the device holds at most three layers' KV (attending, prefetched, copying out); the rest counts as host memory."""
    lookahead = registry.build("prefetch", "lookahead", {"budget_gb": 8.0, "keep_head_on_device": True})
    kw = dict(dtype="bfloat16", device="cuda", batch=1, context=131096, prefetch=lookahead, device_memory_gb=8,
              prefill_chunk=4096, free=(80 * GB, 200 * GB), attention=registry.build("attention", "flash"))
    with pytest.raises(DoesNotFit, match=r"KV 4\.59 GB \(int4\)") as e:  # all 32 layers on the device: over 8 GB
        check_fits(arch("llama3_8b"), codec=registry.build("cache", "int4"), **kw)
    # the advice: the KV to the host, not the streaming the run already does
    assert "cache.store=cpu" in str(e.value) and "+prefetch=lookahead" not in str(e.value)
    with pytest.raises(DoesNotFit):  # sdpa's masks over 131k keys (1.6 GB a chunk) do not fit beside them
        check_fits(arch("llama3_8b"), codec=registry.build("cache", "int4", {"store": "cpu"}),
                   **{**kw, "attention": registry.build("attention", "sdpa")})
    est = check_fits(arch("llama3_8b"), codec=registry.build("cache", "int4", {"store": "cpu"}), **kw)
    per_layer = 4.59 * GB / 32
    assert est["kv_bytes"] == pytest.approx(3 * per_layer, rel=0.01)
    assert est["kv_host_bytes"] == pytest.approx(29 * per_layer, rel=0.01)
    assert est["host_bytes"] == est["host_weights_bytes"] + est["kv_host_bytes"]
    # on the CPU the store is the host itself: every layer counts there
    cpu = estimate(model_config(arch("tiny_random")), dtype=torch.float32, device=torch.device("cpu"), batch=1,
                   context=512, codec=registry.build("cache", "int4", {"store": "cpu"}),
                   prefetch=registry.build("prefetch", "resident"))
    assert cpu["kv_host_bytes"] == 0 and cpu["kv_bytes"] > 0
