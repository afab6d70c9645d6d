"""Qwen3-Next in the native engine against transformers' Qwen3NextForCausalLM (fp32, small random config).

The config mixes both token mixers (Gated DeltaNet and gated full attention, full_attention_interval 2), MoE layers
with a shared expert and one dense MLP layer (mlp_only_layers), grouped value heads in the linear layers and
partial RoPE; every weight, norms included, is drawn at random so that a (1 + w) norm read as w, a rotated tail
of the head or a missing output gate shows. The engine runs a prefill and 16 single-token decode steps through its
cache; transformers runs the whole sequence at once (its chunked gated delta rule) and also step by step through
its own cache.
"""

import pytest
import torch

from ollm_triton.cache.state import StateLayer
from ollm_triton.engine import load_engine
from ollm_triton.engine.config import ModelConfig, UnsupportedModelError
from ollm_triton.registry import registry

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_torch_thread")

V, PROMPT, STEPS = 128, 11, 16
ATOL = 1e-4


def hf_config(**over):
    from transformers import Qwen3NextConfig

    base = dict(vocab_size=V, hidden_size=64, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4,
                linear_key_head_dim=16, linear_value_head_dim=8, linear_conv_kernel_dim=4, num_experts=4,
                num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=24,
                mlp_only_layers=[2], full_attention_interval=2, max_position_embeddings=256)
    return Qwen3NextConfig(**{**base, **over})


@pytest.fixture(scope="module")
def hf_model():
    from transformers import Qwen3NextForCausalLM

    torch.manual_seed(0)
    model = Qwen3NextForCausalLM(hf_config()).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            # norms, decays and time steps well away from their init values: a misread one cannot hide
            p.normal_(0.0, 0.1 if any(s in name for s in ("norm", "A_log", "dt_bias")) else 0.05)
    return model


def engine_for(hf_model, codec=None, **kw):
    engine = load_engine(hf_model.config.to_dict(), codec=codec, **kw)
    missing, unexpected = engine.model.load_state_dict(hf_model.state_dict(), strict=False)
    assert not missing and not unexpected, (missing, unexpected)
    return engine


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, V, (1, PROMPT + STEPS), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def reference(hf_model, ids):
    with torch.no_grad():
        return hf_model(ids).logits


def run_engine(engine, ids, cache=None):
    """Prefill PROMPT tokens, then one token at a time -> logits [1, T, V] and the cache."""
    cache = cache or engine.new_cache(batch=ids.shape[0], max_len=64)
    out = [engine.forward(ids[:, :PROMPT], cache)]
    out += [engine.forward(ids[:, t : t + 1], cache) for t in range(PROMPT, ids.shape[1])]
    return torch.cat(out, dim=1), cache


def test_config_reads_the_hybrid_fields(hf_model):
    cfg = ModelConfig.from_hf(hf_model.config.to_dict())
    assert cfg.layer_types == ("linear_attention", "full_attention", "linear_attention", "full_attention")
    assert cfg.rotary_dim == 4 and cfg.attn_output_gate and cfg.norm_offset == 1.0
    assert cfg.shared_expert_intermediate_size == 24 and cfg.mlp_only_layers == (2,)
    assert cfg.num_parameters() == sum(p.numel() for p in hf_model.parameters())


def test_transformers_own_cache_agrees_with_its_full_forward(hf_model, ids, reference):
    """The reference itself: transformers' prefill + cached decode equals its one-shot forward."""
    with torch.no_grad():
        out = hf_model(ids[:, :PROMPT], use_cache=True)
        cache, logits = out.past_key_values, [out.logits]
        for t in range(PROMPT, ids.shape[1]):
            out = hf_model(ids[:, t : t + 1], past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            logits.append(out.logits)
    assert (torch.cat(logits, 1) - reference).abs().max() <= ATOL


@pytest.mark.parametrize("codec", ["dense", "streaming", "h2o", "snapkv"])
def test_logits_match_transformers(hf_model, ids, reference, codec):
    """Lossless storage on the attention layers (the eviction codecs with a budget above the context keep every
    token): prefill and 16 decode steps within 1e-4 of transformers."""
    params = {} if codec == "dense" else {"budget": 64}
    engine = engine_for(hf_model, codec=registry.build("cache", codec, params))
    logits, cache = run_engine(engine, ids)
    assert (logits - reference).abs().max() <= ATOL
    assert engine.describe()["linear_attention_path"].startswith("torch reference")
    kinds = [isinstance(layer, StateLayer) for layer in cache.layers]
    assert kinds == [True, False, True, False]  # the codec holds the attention layers only
    assert all(layer.length == ids.shape[1] for layer in cache.layers)
    assert cache.kv_length == ids.shape[1]


def test_kv_length_reads_an_attention_layer(hf_model, ids):
    """An evicting codec on the attention layers: kv_length is what they hold, not the state layers' token count."""
    engine = engine_for(hf_model, codec=registry.build("cache", "streaming", {"budget": 16, "sink": 4}))
    _, cache = run_engine(engine, ids)
    assert cache.layers[0].length == ids.shape[1] and cache.kv_length == cache.layers[1].length <= 17


@pytest.mark.parametrize("codec, tol", [("int8", 0.02), ("int4", 0.5), ("int2", 1.0)])
def test_lossy_codecs_compress_the_attention_layers(hf_model, ids, reference, codec, tol):
    """A quantizing codec runs on the attention layers (and only there): it compressed tokens, the logits stay
    within its loss of transformers' (measured: int8 0.004, int4 0.25, int2 0.38 on logits of magnitude ~1.5) and
    differ from them."""
    engine = engine_for(hf_model, codec=registry.build("cache", codec, {"group_size": 16, "residual": 0}))
    logits, cache = run_engine(engine, ids)
    err = (logits - reference).abs().max().item()
    assert 1e-4 < err <= tol
    assert all(cache.layers[i].compressed_tokens > 0 for i in (1, 3))
    assert all(cache.layers[i].compressed_tokens == 0 for i in (0, 2))
    assert cache.stats()["kv_tokens_compressed"] == cache.layers[1].compressed_tokens  # read from an attention layer


def test_cache_stats_count_the_state(hf_model, ids):
    engine = engine_for(hf_model)
    _, cache = run_engine(engine, ids)
    stats = cache.stats()
    state = sum(cache.layers[i].stored_bytes() for i in (0, 2))
    kv = 2 * 2 * 16 * ids.shape[1] * 4 * 2  # K and V, 2 KV heads of 16, fp32, two attention layers
    # conv state [1, 2*2*16 + 4*8, 3] and recurrent state [1, 4, 16, 8], fp32, per linear layer
    assert state == 2 * ((2 * 2 * 16 + 4 * 8) * 3 + 4 * 16 * 8) * 4
    assert stats["kv_stored_bytes"] == kv + state
    assert stats["kv_state_bytes"] == state
    assert stats["kv_tokens_kept"] == ids.shape[1]


def test_rows_match_single_sequences(hf_model, ids):
    """forward_rows (continuous batching: each row its own cache) equals each sequence alone."""
    engine = engine_for(hf_model)
    other = torch.randint(0, V, ids.shape, generator=torch.Generator().manual_seed(2))
    alone = [run_engine(engine, x)[0] for x in (ids, other)]
    caches = [engine.new_cache(1, 64) for _ in range(2)]
    both = torch.cat((ids, other))
    for c, x in zip(caches, both, strict=True):
        engine.forward(x[None, :PROMPT], c)
    steps = [engine.decode_rows(both[:, t], caches) for t in range(PROMPT, ids.shape[1])]
    got = torch.stack(steps, dim=1)
    for b in range(2):
        assert (got[b] - alone[b][0, PROMPT:]).abs().max() <= 1e-5


def test_rollback_to_any_token_of_a_verify_block(hf_model, ids):
    """A 5-token block after the prompt, truncated to k of its tokens, then continued, equals feeding only those k
    tokens; earlier than the block's start is refused in one line."""
    engine = engine_for(hf_model)
    block = ids[:, PROMPT : PROMPT + 5]
    nxt = ids[:, PROMPT + 5 : PROMPT + 6]
    for keep in (0, 1, 3, 5):
        ref_cache = engine.new_cache(1, 64)
        engine.forward(ids[:, :PROMPT], ref_cache)
        if keep:
            engine.forward(block[:, :keep], ref_cache)
        ref = engine.forward(nxt, ref_cache)
        cache = engine.new_cache(1, 64)
        engine.forward(ids[:, :PROMPT], cache)
        engine.forward(block, cache)
        cache.truncate(PROMPT + keep)
        got = engine.forward(nxt, cache)
        assert (got - ref).abs().max() <= 1e-5, keep
    with pytest.raises(NotImplementedError, match="kept its states at .* cannot roll back to 9") as e:
        cache.truncate(PROMPT - 2)
    assert "\n" not in str(e.value)


@pytest.fixture(scope="module")
def engines(hf_model):
    target = engine_for(hf_model)
    draft = load_engine(hf_model.config.to_dict(), seed=7)  # other random weights: drafts get rejected
    return target, draft


DECODERS = {
    "speculative": ({"num_candidates": 3}, True),
    "prompt_lookup": ({"num_candidates": 4, "max_ngram": 2}, False),
    "self_speculative": ({"draft_layers": 2, "num_candidates": 3}, False),
}


@pytest.mark.parametrize("name", list(DECODERS))
def test_speculative_decoders_roll_the_state_back(engines, name):
    """Linear speculative decoders verify blocks and roll the recurrent state back on rejection: tokens equal
    greedy's."""
    target, draft = engines
    prompt = torch.tensor([[3, 9, 4, 3, 9, 4, 3, 9, 4, 3, 9]])  # repetitive: prompt_lookup finds drafts
    ref = registry.build("decoder", "greedy").generate(target, prompt, 20).tokens
    params, needs_draft = DECODERS[name]
    strategy = registry.build("decoder", name, params, **({"draft_engine": draft} if needs_draft else {}))
    out = strategy.generate(target, prompt, 20)
    assert torch.equal(out.tokens, ref)
    rate = out.counters["acceptance_rate"]
    assert 0 <= rate < 1 and out.counters["mean_drafted"] > 0  # some drafts were rejected: the state rolled back


def test_tree_decoding_is_refused_in_one_line(engines):
    target, draft = engines
    strategy = registry.build("decoder", "tree", {"depth": 2, "branching": 2, "width": 2}, draft_engine=draft)
    with pytest.raises(ValueError, match="tree of drafts cannot be verified through a linear-attention layer") as e:
        strategy.generate(target, torch.tensor([[1, 2, 3]]), 4)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("mode", ["auto", "static", "piecewise"])
def test_static_decode_step_is_refused_with_the_model_named(hf_model, mode):
    engine = engine_for(hf_model, fast_decode=mode)
    assert engine.fast_path.mode == "eager"
    assert "qwen3_next has 2 linear-attention layers" in engine.fast_path.reason


@pytest.mark.parametrize("over, match", [
    ({"layer_types": ["linear_attention", "full_attention", "mamba", "full_attention"]}, "layer_types must name"),
    ({"layer_types": ["full_attention"] * 3}, "for each of the 4 layers"),
])
def test_bad_hybrid_configs_refuse_in_one_line(over, match):
    d = hf_config().to_dict()
    d.update(over)
    with pytest.raises(UnsupportedModelError, match=match) as e:
        ModelConfig.from_hf(d)
    assert "\n" not in str(e.value)


def test_partial_rotary_is_refused_on_other_model_types():
    d = dict(model_type="llama", vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
             num_attention_heads=4, partial_rotary_factor=0.5)
    with pytest.raises(UnsupportedModelError, match="partial_rotary_factor 0.5 is not supported"):
        ModelConfig.from_hf(d)


def test_checkpoint_directory_loads(hf_model, ids, reference, tmp_path):
    """model=hf on a qwen3_next checkpoint: transformers' save_pretrained (safetensors) loads into the engine."""
    hf_model.save_pretrained(tmp_path)
    engine = load_engine(str(tmp_path))
    logits, _ = run_engine(engine, ids)
    assert (logits - reference).abs().max() <= ATOL


def test_memory_check_counts_the_state_not_kv_on_linear_layers():
    from pathlib import Path

    import yaml

    import ollm_triton
    from ollm_triton.engine.footprint import estimate
    from ollm_triton.engine.linear_attention import state_bytes

    arch = yaml.safe_load((Path(ollm_triton.__file__).parent / "conf/model/qwen3_next_80b.yaml").read_text())["arch"]
    cfg = ModelConfig.from_hf(arch)
    assert cfg.linear_layers == 36 and abs(cfg.num_parameters() / 1e9 - 79.7) < 0.1
    dense = registry.build("cache", "dense")
    est = estimate(cfg, dtype=torch.bfloat16, device=torch.device("cpu"), batch=1, context=32768, codec=dense,
                   prefetch=registry.build("prefetch", "resident"))
    kv = 12 * 2 * 2 * 256 * 2 * 32768  # 12 attention layers, K and V, 2 KV heads of 256, bf16
    state = 36 * state_bytes(cfg, 1, torch.bfloat16)
    assert state == 36 * ((2 * 16 * 128 + 32 * 128) * 3 * 2 + 32 * 128 * 128 * 4)
    assert est["kv_bytes"] == kv + state and est["state_bytes"] == state
    speculative = estimate(cfg, dtype=torch.bfloat16, device=torch.device("cpu"), batch=1, context=32768,
                           codec=dense, prefetch=registry.build("prefetch", "resident"), state_rollback_tokens=16)
    assert speculative["state_bytes"] == 17 * state  # the state and the 16 lengths a verify block may roll back
    from ollm_triton.engine.footprint import DoesNotFit, check_fits

    with pytest.raises(DoesNotFit, match=r"^qwen3_next_80b does not fit: .* need 3\d\d\.\d GB of host memory") as e:
        check_fits(arch, dtype="auto", device="cpu", batch=1, context=4096, codec=dense, name="qwen3_next_80b",
                   prefetch=registry.build("prefetch", "resident"), free=(24e9, 24e9))
    assert "\n" not in str(e.value)
    # streamed by expert on a GPU machine with a 128 GB host: bf16 rows (155 GB) do not fit there, fp8 rows do
    kw = dict(dtype="auto", device="cuda", batch=1, context=576, codec=dense, free=(80e9, 128e9))
    with pytest.raises(DoesNotFit, match=r"host memory .* to run it: prefetch\.host_dtype=fp8 \(.* 78\.5 GB\)"):
        check_fits(arch, prefetch=registry.build("prefetch", "experts", {"budget_gb": 8.0}), **kw)
    fp8 = check_fits(arch, prefetch=registry.build("prefetch", "experts", {"budget_gb": 8, "host_dtype": "fp8"}), **kw)
    assert fp8["fits"] and fp8["host_bytes"] < 0.9 * 128e9


@pytest.mark.interpreter
def test_fused_kernel_path_matches_transformers(hf_model, ids, reference):
    """The engine's Triton path (what a CUDA device runs: fused RMSNorm where the norm is not zero-centred, RoPE on
    the rotated quarter only, SiLU-gate, the grouped MoE kernels) under the interpreter: prefill + 3 steps."""
    engine = engine_for(hf_model)
    engine.kernels = True
    short = ids[:, : PROMPT + 3]
    logits, _ = run_engine(engine, short)
    assert engine.kernel_path.startswith("triton:")
    assert (logits - reference[:, : PROMPT + 3]).abs().max() <= ATOL


def test_engine_cache_bytes_is_what_a_cache_stores(hf_model, ids):
    """Engine.cache_bytes (the server's admission): the codec's bytes on the attention layers + the states."""
    engine = engine_for(hf_model)
    _, cache = run_engine(engine, ids)
    assert engine.cache_bytes(ids.shape[1]) == cache.stats()["kv_stored_bytes"]
    from ollm_triton.serve.scheduler import Scheduler

    # a served request's cache also keeps one earlier state per linear-attention layer (its rollback): admission
    # counts what the rows hold, not only what the sequence stores
    scheduler = Scheduler(engine)
    _, served = run_engine(engine, ids, scheduler.rows.allocate(64))
    held = scheduler.rows.bytes_held([served])
    assert held > served.stats()["kv_stored_bytes"]
    assert scheduler.kv_bytes(ids.shape[1]) == held


@pytest.mark.parametrize("backend", registry.names("attention"))
def test_every_attention_backend_runs_the_attention_layers(hf_model, ids, reference, backend):
    """Each backend's prefill and decode on the gated attention layers; at 27 tokens no default window or sparse
    pattern masks anything, so every one must give transformers' logits."""
    engine = load_engine(hf_model.config.to_dict(), attention=registry.build("attention", backend))
    engine.model.load_state_dict(hf_model.state_dict(), strict=False)
    logits, _ = run_engine(engine, ids)
    assert (logits - reference).abs().max() <= ATOL


def test_kept_states_are_bounded_and_can_be_switched_off(hf_model, ids):
    engine = engine_for(hf_model)
    _, cache = run_engine(engine, ids)
    layer = cache.layers[0]
    cache.truncate(ids.shape[1] - 3)  # three single steps back: kept
    assert len(layer._kept) <= engine.decode_max_tokens + 1
    engine.state_rollback_tokens = 0  # a run that never rolls back keeps no old states
    _, cache = run_engine(engine, ids)
    assert len(cache.layers[0]._kept) == 1
    with pytest.raises(NotImplementedError, match="cannot roll back to"):
        cache.truncate(ids.shape[1] - 1)
    engine.state_rollback_tokens = None  # the engine's default again: greedy's loop asks for none itself
    from ollm_triton.tasks.base import CacheWatch

    with CacheWatch(engine) as watch:
        registry.build("decoder", "greedy").generate(engine, ids[:, :PROMPT], 4)
    states = [layer for layer in watch.caches[0].layers if not layer.holds_kv]
    assert states and all(len(layer._kept) == 1 for layer in states)
    from ollm_triton.engine.slots import CacheRows

    _, cache = run_engine(engine, ids, CacheRows(engine).allocate(64))  # a served request's cache
    assert all(len(layer._kept) == 2 for layer in cache.layers if not layer.holds_kv)
    cache.truncate(ids.shape[1] - 1)  # the scheduler's rollback of one failed decode step


@pytest.mark.gpu
@pytest.mark.parametrize("use_fla", [False, True])
def test_cuda_engine_matches_the_cpu_engine(use_fla):
    """On CUDA (fused Triton kernels, and fla's gated-delta kernels when installed) the engine gives the CPU
    engine's logits (which the tests above tie to transformers), fp32, prefill + 16 steps. fla may run its fp32
    dots in tf32: 2e-3 there."""
    from ollm_triton.engine.linear_attention import GatedDeltaNet
    from ollm_triton.kernels.gated_delta import fla_available

    if use_fla and not fla_available(torch.device("cuda")):
        pytest.skip("flash-linear-attention (the `linear` extra) is not installed")
    cfg = hf_config().to_dict()
    cpu = load_engine(cfg, seed=3)
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for p in cpu.model.parameters():  # norms and decays off their init values too
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    gpu = load_engine(cfg, device="cuda", dtype=torch.float32)
    gpu.model.load_state_dict(cpu.model.state_dict())
    ids = torch.randint(0, V, (1, PROMPT + STEPS), generator=torch.Generator().manual_seed(5))
    want, _ = run_engine(cpu, ids)
    try:
        GatedDeltaNet.use_fla = use_fla  # the CPU engine ran the reference
        got, _ = run_engine(gpu, ids.cuda())
    finally:
        GatedDeltaNet.use_fla = None
    assert gpu.kernel_path.startswith("triton:")
    assert (got.cpu() - want).abs().max() <= (2e-3 if use_fla else 1e-4)


@pytest.mark.parametrize("chunk", [4, 9])
def test_chunked_prefill_equals_one_shot(hf_model, ids, reference, chunk):
    """A prompt in chunks hands the conv and recurrent states from chunk to chunk: the last token's logits are the
    one-shot prefill's."""
    engine = engine_for(hf_model)
    cache = engine.new_cache(1, 64)
    last = engine.prefill(ids[:, :PROMPT + STEPS], cache, chunk=chunk)
    assert (last - reference[:, -1]).abs().max() <= ATOL
