"""The transformers bridge (ollm_triton/hf): codecs as a transformers Cache, backends under AttentionInterface.

- transformers' generate with CompressedKVCache(codec) against the native engine with the same codec on the
  embedded model: token for token for dense and int8; for the lossy codecs the same logits at every step within
  the codec's tolerance (both sides store the same K/V up to float rounding, so the codec's rounding bins agree
  except where that rounding sits on a bin edge);
- every registered codec through a Cache on Gemma-2 (random config; the engine does not serve it): logits against
  DynamicCache within the codec's tolerance, and compression_stats against the bytes the layers hold;
- the one-line refusals; the source document's usage example; the version check.
"""

from __future__ import annotations

import importlib
import math
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache  # noqa: E402

from ollm_triton.engine import load_engine  # noqa: E402
from ollm_triton.hf import CompressedKVCache, attention_name  # noqa: E402
from ollm_triton.hf.attention import backend_of  # noqa: E402
from ollm_triton.hf.cache import needs_scores  # noqa: E402
from ollm_triton.registry import PluginError, registry  # noqa: E402

# transformers 5.25 renamed past_key_values to cache (the old name works until 6.0); the source's spelling is kept
pytestmark = pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated:FutureWarning")
ASSET = Path(__file__).resolve().parents[1] / "ollm_triton" / "assets" / "tiny-llama"
PROMPT, NEW = 72, 10  # cluster encodes in blocks of 64 tokens past its residual window
# Small groups and windows so that every codec compresses or evicts within PROMPT + NEW tokens.
PARAMS = {
    "dense": {},
    "int8": {"group_size": 16, "residual": 8},
    "int4": {"group_size": 16, "residual": 8},
    "int2": {"group_size": 16, "residual": 8},
    "quant": {"bits": 4, "group_size": 16, "residual": 8},
    "cluster": {"num_clusters": 16, "residual": 4, "iters": 4},
    "streaming": {"budget": 24, "sink": 4},
    "h2o": {"budget": 24},
    "snapkv": {"budget": 24, "window": 8},
}
# max |logit difference| between the engine and transformers with the same codec (embedded model, float32)
ENGINE_TOL = {"int4": 2e-3, "int2": 2e-2, "quant": 2e-3, "cluster": 5e-2, "streaming": 1e-4, "h2o": 1e-4,
              "snapkv": 1e-4}
# max |logit difference| between a codec and DynamicCache on the random Gemma-2 (lossless: float rounding)
CACHE_TOL = {"dense": 1e-4, "int8": 5e-3, "int4": 5e-2, "int2": 0.3, "quant": 5e-2, "cluster": 0.5}


def codec_params(name: str) -> dict:
    if name not in PARAMS:
        pytest.fail(f"codec {name!r} has no test parameters in tests/test_hf_bridge.py: add it to PARAMS")
    return PARAMS[name]


@pytest.fixture(scope="module")
def prompt_ids() -> torch.Tensor:
    return torch.randint(3, 8000, (1, PROMPT), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def hf_models() -> dict:
    """The embedded model under transformers' sdpa and under the bridged sdpa backend (queries reach the cache)."""
    return {impl: AutoModelForCausalLM.from_pretrained(ASSET, dtype=torch.float32, attn_implementation=impl).eval()
            for impl in ("sdpa", "ollm_sdp")}


def impl_for(codec) -> str:
    """Scoring codecs need the queries, which only an ollm_* attention implementation hands to the cache."""
    return "ollm_sdp" if needs_scores(codec.new_layer(_spec())) else "sdpa"


def _spec():
    from ollm_triton.cache.base import LayerSpec

    return LayerSpec(batch=1, kv_heads=2, head_dim=64, dtype=torch.float32, device=torch.device("cpu"), max_len=64)


def hf_generate(model, cache, ids):
    out = model.generate(ids, past_key_values=cache, max_new_tokens=NEW, do_sample=False, output_logits=True,
                         return_dict_in_generate=True)
    return out.sequences[0, ids.shape[1]:], torch.stack(out.logits, dim=1)[0].float()


@pytest.fixture(scope="module")
def engine():
    """The native engine on the embedded model; each test sets its codec and attention (weights loaded once)."""
    return load_engine(ASSET, device="cpu")


def with_plugins(engine, codec: str, attention: str = "sdpa", attention_params: dict | None = None):
    engine.codec = registry.build("cache", codec, codec_params(codec))
    engine.attention = registry.build("attention", attention, attention_params or {})
    return engine


@torch.inference_mode()
def engine_logits(engine, name: str, ids: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """The engine's logits at every step, fed transformers' tokens: [NEW, V]."""
    engine = with_plugins(engine, name)
    cache = engine.new_cache(max_len=PROMPT + NEW)
    out = [engine.prefill(ids, cache)]
    for tok in tokens[:-1]:
        out.append(engine.forward(tok.view(1, 1), cache)[:, -1])
    return torch.cat(out).float()


@pytest.mark.parametrize("name", ["dense", "int8"])
def test_generate_matches_the_engine_token_for_token(name, hf_models, prompt_ids, engine):
    cache = CompressedKVCache(name, **codec_params(name))
    tokens, _ = hf_generate(hf_models["sdpa"], cache, prompt_ids)
    native = registry.build("decoder", "greedy").generate(with_plugins(engine, name), prompt_ids, NEW)
    assert tokens.tolist() == native.tokens[0].tolist()
    if name == "int8":
        assert cache.compression_stats.tokens_compressed > 0  # the codec did quantize


@pytest.mark.parametrize("name", sorted(ENGINE_TOL))
def test_lossy_codecs_give_the_engines_logits_at_every_step(name, hf_models, prompt_ids, engine):
    codec = registry.build("cache", name, codec_params(name))
    cache = CompressedKVCache(codec)
    tokens, logits = hf_generate(hf_models[impl_for(codec)], cache, prompt_ids)
    stats = cache.compression_stats
    assert stats.tokens_compressed + stats.tokens_evicted > 0, f"{name} neither compressed nor evicted"
    ref = engine_logits(engine, name, prompt_ids, tokens)
    assert logits.shape == ref.shape
    err = (logits - ref).abs().max(dim=-1).values  # per step
    assert float(err.max()) < ENGINE_TOL[name], f"{name}: per-step max |logit diff| {err.tolist()}"


@pytest.mark.parametrize("name", ["streaming", "h2o"])
def test_direct_forwards_take_positions_from_tokens_seen_not_held(name, hf_models, prompt_ids, engine):
    """model(ids, past_key_values=cache) step by step (no generate): RoPE positions come from get_seq_length, which
    must count the tokens seen once the codec has evicted some."""
    codec = registry.build("cache", name, codec_params(name))
    model = hf_models[impl_for(codec)]
    tokens = torch.randint(3, 8000, (NEW - 1,), generator=torch.Generator().manual_seed(4))
    cache = CompressedKVCache(codec)
    with torch.inference_mode():
        out = [model(prompt_ids, past_key_values=cache).logits[0, -1:]]
        for tok in tokens:
            out.append(model(tok.view(1, 1), past_key_values=cache).logits[0, -1:])
    assert cache.compression_stats.tokens_evicted > 0
    ref = engine_logits(engine, name, prompt_ids, torch.cat((tokens, tokens[-1:])))
    assert float((torch.cat(out).float() - ref).abs().max()) < ENGINE_TOL[name]


# ------------------------------------------------------------------------------ an architecture the engine lacks


def gemma2(impl: str, sliding_window: int = 4096):
    cfg = AutoConfig.for_model("gemma2", vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=3,
                               num_attention_heads=4, num_key_value_heads=2, head_dim=32, query_pre_attn_scalar=24,
                               sliding_window=sliding_window, attn_logit_softcapping=None,
                               max_position_embeddings=512, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32, attn_implementation=impl).eval()


@pytest.fixture(scope="module")
def gemma_models() -> dict:
    return {"eager": gemma2("eager"), "ollm_fa": gemma2("ollm_fa")}


@torch.inference_mode()
def stepwise(model, cache, ids: torch.Tensor, prompt: int) -> torch.Tensor:
    """Logits of a prompt forward then one forward per token: [T, V]."""
    out = [model(ids[:, :prompt], past_key_values=cache).logits[0]]
    for i in range(prompt, ids.shape[1]):
        out.append(model(ids[:, i : i + 1], past_key_values=cache).logits[0])
    return torch.cat(out).float()


def held_tensor_bytes(layer) -> int:
    """Bytes of every tensor a codec layer holds (a storage tier's wrapper holds the codec's layer in `inner`)."""
    while hasattr(layer, "inner"):
        layer = layer.inner
    return sum(t.numel() * t.element_size() for t in vars(layer).values() if isinstance(t, torch.Tensor))


def test_gemma2_is_not_an_engine_architecture():
    from ollm_triton.engine import SUPPORTED_MODEL_TYPES

    assert "gemma2" not in SUPPORTED_MODEL_TYPES


@pytest.mark.parametrize("name", registry.names("cache"))
def test_every_codec_round_trips_through_a_cache_on_gemma2(name, gemma_models):
    ids = torch.randint(3, 500, (1, PROMPT + NEW), generator=torch.Generator().manual_seed(1))
    codec = registry.build("cache", name, codec_params(name))
    impl = "ollm_fa" if needs_scores(codec.new_layer(_spec())) else "eager"
    model = gemma_models[impl]
    ref_cache = DynamicCache(config=model.config)
    ref = stepwise(model, ref_cache, ids, PROMPT)
    cache = CompressedKVCache(codec)
    got = stepwise(model, cache, ids, PROMPT)
    assert got.shape == ref.shape
    stats = cache.compression_stats
    assert stats.tokens_seen == PROMPT + NEW
    if name in CACHE_TOL:
        assert float((got - ref).abs().max()) < CACHE_TOL[name], name
        for slot, ref_layer in zip(cache.layers, ref_cache.layers, strict=True):  # what it reads back
            k, v = slot.inner.dense()
            assert k.shape == ref_layer.keys.shape
            tol = CACHE_TOL[name] * 10  # per element, against the exact keys and values
            assert float((k - ref_layer.keys).abs().max()) < tol and float((v - ref_layer.values).abs().max()) < tol
    else:  # an eviction codec: it keeps what its budget says and reads the rest as evicted
        assert stats.tokens_evicted > 0 and stats.tokens_held + stats.tokens_evicted == stats.tokens_seen
        assert torch.isfinite(got).all()
    # compression_stats against the bytes held
    dense_bytes = sum(layer.keys.nbytes + layer.values.nbytes for layer in ref_cache.layers)
    assert stats.original_bytes == dense_bytes
    assert stats.compressed_bytes == sum(layer.stored_bytes() for layer in cache.codec_layers())
    assert stats.compressed_bytes <= sum(held_tensor_bytes(layer) for layer in cache.codec_layers())
    assert math.isclose(stats.compression_ratio, dense_bytes / stats.compressed_bytes)
    assert math.isclose(stats.compressed_mb, stats.compressed_bytes / 1e6)
    if name == "dense":
        assert stats.compressed_bytes == dense_bytes
    elif name in ("int8", "int4", "int2", "quant", "cluster"):
        assert stats.tokens_compressed > 0 and stats.compressed_bytes < dense_bytes


@pytest.mark.parametrize("name", ["dense", "int4"])
def test_bridged_attention_on_gemma2_matches_transformers_eager(name, gemma_models):
    """ollm_fa against transformers' eager attention over the same codec: Gemma-2 scales queries by
    query_pre_attn_scalar**-0.5, not head_dim**-0.5, which the bridge folds into q."""
    ids = torch.randint(3, 500, (1, PROMPT + NEW), generator=torch.Generator().manual_seed(5))
    got = stepwise(gemma_models["ollm_fa"], CompressedKVCache(name, **codec_params(name)), ids, PROMPT)
    ref = stepwise(gemma_models["eager"], CompressedKVCache(name, **codec_params(name)), ids, PROMPT)
    assert float((got - ref).abs().max()) < 1e-4


def test_gemma2_sliding_layers_use_transformers_masks_over_a_compressed_cache():
    model = gemma2("eager", sliding_window=16)  # windows shorter than the prompt: the masks do the windowing
    ids = torch.randint(3, 500, (1, PROMPT + NEW), generator=torch.Generator().manual_seed(2))
    ref = stepwise(model, DynamicCache(config=model.config), ids, PROMPT)
    got = stepwise(model, CompressedKVCache("dense"), ids, PROMPT)
    assert float((got - ref).abs().max()) < 1e-4


# ------------------------------------------------------------------------------------------ attention backends


def test_every_attention_plugin_is_an_attention_implementation():
    from transformers import AttentionInterface

    for name in registry.names("attention"):
        impl = attention_name(name)
        assert impl in AttentionInterface._global_mapping
        assert "flash" not in impl and "sdpa" not in impl  # transformers would take it for its own kernel


def test_a_backend_with_parameters_matches_the_engine(prompt_ids, engine):
    params = {"window": 16, "sink": 2}
    impl = attention_name("sliding_window", **params)
    assert impl == "ollm_sliding_window[sink=2,window=16]"
    model = AutoModelForCausalLM.from_pretrained(ASSET, dtype=torch.float32, attn_implementation=impl).eval()
    tokens, logits = hf_generate(model, CompressedKVCache("int8", **PARAMS["int8"]), prompt_ids)
    engine = with_plugins(engine, "int8", "sliding_window", params)
    assert tokens.tolist() == registry.build("decoder", "greedy").generate(engine, prompt_ids, NEW).tokens[0].tolist()
    assert backend_of(impl).last_path == "torch.reference"  # the backend itself ran, decode steps included
    dense = AutoModelForCausalLM.from_pretrained(ASSET, dtype=torch.float32, attn_implementation="sdpa").eval()
    dense_logits = hf_generate(dense, DynamicCache(config=dense.config), prompt_ids)[1]
    assert float((logits - dense_logits).abs().max()) > 0.1  # the window did mask keys


@pytest.mark.gpu
def test_decode_over_a_quantized_cache_runs_the_codecs_fused_kernel():
    impl = attention_name("flash")
    model = AutoModelForCausalLM.from_pretrained(ASSET, dtype=torch.bfloat16, attn_implementation=impl).cuda().eval()
    ids = torch.randint(3, 8000, (1, 300), generator=torch.Generator().manual_seed(0)).cuda()
    cache = CompressedKVCache("int4", group_size=64, residual=64)
    tokens, logits = hf_generate(model, cache, ids)
    assert backend_of(impl).last_path == "fused:QuantLayer"
    engine = load_engine(ASSET, attention="flash", codec=registry.build("cache", "int4", {"group_size": 64,
                                                                                          "residual": 64}),
                         device="cuda", dtype="bfloat16")
    ours = registry.build("decoder", "greedy").generate(engine, ids, NEW).tokens[0].tolist()
    # transformers' layers and the engine's round bf16 differently: the greedy runs agree token for token until a
    # step whose two best logits (transformers') are a near-tie, 1% of the top logit apart at most
    parted = next((i for i, (a, b) in enumerate(zip(tokens.tolist(), ours, strict=True)) if a != b), None)
    if parted is not None:
        top2 = logits[parted].topk(2).values
        assert (top2[0] - top2[1]).item() <= 1e-2 * top2[0].abs().item(), (parted, top2.tolist())
    # and fed transformers' tokens, the engine's logits are transformers' to bf16 rounding at every step
    cache2 = engine.new_cache(max_len=ids.shape[1] + NEW)
    with torch.inference_mode():
        step = [engine.prefill(ids, cache2)]
        step += [engine.forward(t.view(1, 1), cache2)[:, -1] for t in tokens[:-1]]
    for i, (want, got) in enumerate(zip(logits, torch.cat(step).float(), strict=True)):
        assert ((want - got).norm() / want.norm()).item() < 3e-2, i


@pytest.mark.gpu
def test_decode_under_the_bridge_runs_the_codecs_fused_kernel_and_scores_as_the_dense_path():
    """Perplexity through the runner's adapter on CUDA with int4: decode blocks run the codec's fused kernel, and
    the score equals the same run with the backend attending over the codec's dense() (its fused decode off)."""
    from ollm_triton.hf.attention import backend_of
    from ollm_triton.hf.engine import load_transformers_engine
    from ollm_triton.tasks.perplexity import score

    def engine(fused: bool):
        eng = load_transformers_engine(ASSET, attention="sdpa", codec=registry.build("cache", "int4", {}),
                                       prefetch=registry.build("prefetch", "resident"), device="cuda",
                                       dtype="bfloat16")
        eng.attention.fused_codec_decode = fused  # the backend instance is shared by name: set it per run
        return eng

    ids = torch.randint(3, 8000, (1024,), generator=torch.Generator().manual_seed(0))
    try:
        fused = engine(True)
        got = score(fused, ids, 512, 256, 16)
        assert fused.describe()["decode_attention_path"] == "fused:QuantLayer"
        eager = engine(False)
        ref = score(eager, ids, 512, 256, 16)
        assert not eager.describe()["decode_attention_path"].startswith("fused:")
    finally:
        backend_of("ollm_sdp").__dict__.pop("fused_codec_decode", None)  # back to the class's declaration
    assert got.scored == ref.scored and got.scored_lossy == ref.scored_lossy > 0
    assert abs(got.nll / ref.nll - 1) < 2e-3  # bf16: the kernel's accumulation order against SDPA's


# ----------------------------------------------------------------------------------------- refusals, one line


def one_line(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg
    return msg


@pytest.mark.parametrize("name", ["h2o", "snapkv"])
def test_a_scoring_codec_refuses_attention_that_hides_the_queries(name, hf_models, prompt_ids):
    with pytest.raises(PluginError) as e:
        hf_models["sdpa"](prompt_ids, past_key_values=CompressedKVCache(name))
    assert "ollm_" in one_line(e) and name in one_line(e)


@pytest.mark.parametrize("kwargs, words", [
    ({"compression_method": "quantization", "bits": 3}, "bits"),
    ({"compression_method": "zip"}, "compression_method"),
    ({"codec": "int4", "residual": -1}, "residual"),
    ({"codec": "int4", "resdual": 8}, "unknown parameter"),
    ({"codec": "h2o", "store": "disk"}, "cache_dir"),
])
def test_wrong_spellings_refuse_with_one_line(kwargs, words):
    codec = kwargs.pop("codec", None)
    with pytest.raises(PluginError) as e:
        CompressedKVCache(codec, **kwargs)
    assert words in one_line(e)


def test_a_bridged_backend_refuses_what_it_cannot_apply(prompt_ids):
    model = gemma2("ollm_fa", sliding_window=16)
    with pytest.raises(PluginError) as e:
        model(torch.randint(3, 500, (1, 20)), past_key_values=CompressedKVCache())
    assert "sliding window of 16" in one_line(e)


def test_beam_search_refuses(hf_models, prompt_ids):
    cache = CompressedKVCache()
    hf_models["sdpa"](prompt_ids, past_key_values=cache)
    with pytest.raises(NotImplementedError) as e:
        cache.reorder_cache(torch.tensor([0]))
    assert "beam search" in one_line(e)


# ------------------------------------------------------------------------------------ the source's usage example


def test_the_source_usage_example_runs(tmp_path, hf_models):
    model = hf_models["sdpa"]
    input_ids = torch.randint(3, 8000, (1, 300), generator=torch.Generator().manual_seed(3))
    cache = CompressedKVCache(compression_method="quantization", bits=8, cache_dir=str(tmp_path / "kv"))
    outputs = model(input_ids, past_key_values=cache)
    outputs = model(outputs.logits[:, -1:].argmax(-1), past_key_values=cache)  # a decode step through the disk tier
    ratio = cache.compression_stats.compression_ratio
    assert cache.codec_name == "int8" and cache.params == {"store": "disk", "cache_dir": str(tmp_path / "kv")}
    assert 1.2 < ratio < 2.0  # int8 codes + scales, the newest residual tokens in float32
    for layer in cache.codec_layers():  # the disk tier writes on its I/O thread
        assert layer.last_offload == "disk"
        layer._pending.result()
    assert len(list((tmp_path / "kv").glob("*.bin"))) == model.config.num_hidden_layers  # one file a layer
    ref = model(input_ids, past_key_values=DynamicCache(config=model.config)).logits
    assert torch.allclose(ref[:, -1], model(input_ids, past_key_values=CompressedKVCache("int8")).logits[:, -1],
                          atol=1e-4)  # a prompt attends at full precision


def test_the_version_check_names_the_supported_range(monkeypatch):
    import ollm_triton.hf as hf

    monkeypatch.setattr(hf, "version", lambda name: "4.57.1")
    with pytest.raises(ImportError) as e:
        hf._check_transformers()
    assert hf.SUPPORTED in one_line(e) and "4.57.1" in one_line(e)
    monkeypatch.undo()
    assert importlib.import_module("ollm_triton.hf").TRANSFORMERS_VERSION == transformers.__version__


def test_a_bridged_backend_refuses_padding(hf_models):
    ids = torch.randint(3, 8000, (2, 12), generator=torch.Generator().manual_seed(6))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding in the first row
    model = AutoModelForCausalLM.from_pretrained(ASSET, dtype=torch.float32, attn_implementation="ollm_fa").eval()
    model(ids, attention_mask=torch.ones_like(ids), past_key_values=CompressedKVCache())  # no padding: runs
    with pytest.raises(PluginError) as e:
        model(ids, attention_mask=mask, past_key_values=CompressedKVCache())
    assert "padding" in one_line(e)
