"""Mixture-of-experts models (qwen3_moe, gpt_oss) in the native engine against transformers' own implementation.

A small random Qwen3-MoE (fp32; 8 experts, 2 routed per token, one dense MLP layer among three) is built with
transformers' class, its router weights scaled up so that routing is decisive (near-ties between experts would let
rounding pick a different expert in either implementation), its norms moved off 1. It is loaded into the engine
from `save_pretrained` (per-expert tensors: the official checkpoints' layout) and from its state dict (transformers
5's stacked `experts.gate_up_proj`), and run side by side: a 20-token prefill, then 16 greedy decode steps through
the engine's KV cache, batch 2. Max abs error <= 1e-4. The plugins that apply run the same sequence against their own
reference: flash against the engine's dense run, sliding_window against transformers' own sliding-window attention,
int8 against the dense run within the codec's quantisation loss.

gpt-oss the same way (window 8 on its sliding layers, sinks, YaRN, biased router, clamped SwiGLU), plus MXFP4 expert
weights dequantized on load against transformers' own dequantization, and the backends that cannot honour its
per-layer windows and sinks refusing in one line.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

from ollm_triton.conf import __file__ as conf_init
from ollm_triton.engine import CheckpointError, ModelConfig, load_engine
from ollm_triton.engine.footprint import estimate
from ollm_triton.engine.moe import MoE
from ollm_triton.kernels.mxfp4 import MXFP4
from ollm_triton.registry import registry

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_torch_thread")

TOL = 1e-4
PROMPT, STEPS, VOCAB = 20, 16, 256
QWEN3_MOE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
                 num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=8,
                 num_experts_per_tok=2, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[1],
                 max_position_embeddings=256, rms_norm_eps=1e-5)


def hf_qwen3_moe(**overrides):
    cfg = transformers.Qwen3MoeConfig(**{**QWEN3_MOE, **overrides})
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    model = transformers.Qwen3MoeForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(0.1 * torch.randn_like(p))
            elif name.endswith("mlp.gate.weight"):  # decisive routing: top-k gaps far above rounding
                p.normal_(0.0, 1.0)
    return model


@pytest.fixture(scope="module")
def qwen3_moe(tmp_path_factory):
    """(transformers model, save_pretrained directory, stacked state-dict directory)."""
    model = hf_qwen3_moe()
    per_expert = tmp_path_factory.mktemp("per_expert")
    model.save_pretrained(per_expert)
    stacked = tmp_path_factory.mktemp("stacked")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, stacked / "model.safetensors")
    (stacked / "config.json").write_text((per_expert / "config.json").read_text())
    return model, per_expert, stacked


def ids_for(seed=1):
    return torch.randint(0, VOCAB, (2, PROMPT), generator=torch.Generator().manual_seed(seed))


def transformers_run(model, ids):
    """Prefill, then STEPS greedy steps: the logits of every step [prefill [B, T, V], step 1 [B, 1, V], ...] and the
    tokens fed (transformers' own argmax)."""
    out, fed = [], []
    with torch.no_grad():
        ref = model(ids, use_cache=True)
        out.append(ref.logits)
        past = ref.past_key_values
        for _ in range(STEPS):
            token = out[-1][:, -1:].argmax(-1)
            fed.append(token)
            ref = model(token, past_key_values=past, use_cache=True)
            past = ref.past_key_values
            out.append(ref.logits)
    return out, fed


def engine_run(engine, ids, fed):
    cache = engine.new_cache(batch=ids.shape[0], max_len=PROMPT + STEPS)
    out = [engine.forward(ids, cache)]
    for token in fed:
        out.append(engine.forward(token, cache))
    return out, cache


def max_error(a, b):
    return max((x - y).abs().max().item() for x, y in zip(a, b, strict=True))


@pytest.fixture(scope="module")
def reference(qwen3_moe):
    model, _, _ = qwen3_moe
    return transformers_run(model, ids_for())


def recording(store):
    """A greedy pick that keeps each step's logits (float32 copies) in `store`."""
    def pick(logits):
        store.append(logits.float().clone())
        return logits.argmax(-1)
    return pick


@pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated")
@pytest.mark.parametrize("layout", ["per_expert", "stacked"])
def test_qwen3_moe_matches_transformers(qwen3_moe, reference, layout):
    model, per_expert, stacked = qwen3_moe
    engine = load_engine(per_expert if layout == "per_expert" else stacked, attention="sdpa", codec="dense")
    assert [type(layer.mlp) is MoE for layer in engine.model.model.layers] == [True, False, True]
    assert engine.num_parameters() == model.num_parameters() == engine.config.num_parameters()
    expected, fed = reference
    ours, cache = engine_run(engine, ids_for(), fed)
    assert cache.position == PROMPT + STEPS
    errors = [(o - e).abs().max().item() for o, e in zip(ours, expected, strict=True)]
    print(f"qwen3_moe ({layout}): max abs error prefill {errors[0]:.2e}, decode {max(errors[1:]):.2e}")
    assert max(errors) <= TOL, errors


def test_expert_paths_agree(qwen3_moe, reference):
    """The eager grouped path (the default), the naive per-expert reference and the Triton grouped kernels (the
    interpreter) give transformers' logits."""
    _, _, stacked = qwen3_moe
    expected, fed = reference
    engine = load_engine(stacked, attention="sdpa", codec="dense")
    moes = [layer.mlp for layer in engine.model.model.layers if isinstance(layer.mlp, MoE)]
    for path in ("naive", "kernel"):
        for m in moes:
            m.path = path
        ours, _ = engine_run(engine, ids_for(), fed[:2])
        assert max_error(ours, expected[:3]) <= TOL, path


def test_plugins_on_qwen3_moe(qwen3_moe, reference):
    _, _, stacked = qwen3_moe
    expected, fed = reference
    dense, _ = engine_run(load_engine(stacked, attention="sdpa", codec="dense"), ids_for(), fed)
    flash, _ = engine_run(load_engine(stacked, attention="flash", codec="dense"), ids_for(), fed)
    assert max_error(flash, dense) <= TOL
    # int8 with 16-token groups: the prompt is quantised, so logits move by the codec's loss, not more
    codec = registry.build("cache", "int8", {"group_size": 16, "residual": 4})
    quant, cache = engine_run(load_engine(stacked, attention="sdpa", codec=codec), ids_for(), fed)
    assert cache.layers[0].compressed_tokens > 0
    spread = torch.cat([d.flatten() for d in dense]).std().item()
    error = max_error(quant, dense)
    assert 0 < error <= 0.02 * spread, (error, spread)


@pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated")
def test_sliding_window_matches_transformers_window(tmp_path):
    """+attention=sliding_window (window 8, no sink) against transformers' own sliding-window Qwen3-MoE."""
    model = hf_qwen3_moe(use_sliding_window=True, sliding_window=8)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "model.safetensors")
    model.config.to_json_file(tmp_path / "config.json")
    expected, fed = transformers_run(model, ids_for())
    window = registry.build("attention", "sliding_window", {"window": 8, "sink": 0})
    ours, _ = engine_run(load_engine(tmp_path, attention=window, codec="dense"), ids_for(), fed)
    assert max_error(ours, expected) <= TOL


def test_missing_expert_tensor_names_it(qwen3_moe, tmp_path):
    _, per_expert, _ = qwen3_moe
    from safetensors.torch import load_file

    tensors = load_file(per_expert / "model.safetensors")
    del tensors["model.layers.2.mlp.experts.5.up_proj.weight"]
    save_file(tensors, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text((per_expert / "config.json").read_text())
    with pytest.raises(CheckpointError, match=r"model\.layers\.2\.mlp\.experts\.gate_up_proj") as err:
        load_engine(tmp_path)
    assert "\n" not in str(err.value) and "per-expert" in str(err.value)


def test_bad_moe_config_refuses_in_one_line(qwen3_moe):
    _, per_expert, _ = qwen3_moe
    hf = json.loads((per_expert / "config.json").read_text())
    with pytest.raises(ValueError, match="num_experts_per_tok must be in 1..num_experts") as err:
        ModelConfig.from_hf({**hf, "num_experts_per_tok": 9})
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="missing required field.*moe_intermediate_size"):
        ModelConfig.from_hf({k: v for k, v in hf.items() if k != "moe_intermediate_size"})


def test_qwen3_moe_30b_preset_counts_every_expert():
    """Qwen3-30B-A3B: 30.5B parameters stored, 3.3B read per token (Qwen's model card); the memory check counts
    all of them, and a MoE's activations by its k expert rows per token."""
    arch = yaml.safe_load((Path(conf_init).parent / "model" / "qwen3_moe_30b.yaml").read_text())["arch"]
    cfg = ModelConfig.from_hf(arch)
    moe_layers = sum(cfg.is_moe_layer(i) for i in range(cfg.num_layers))
    active = cfg.num_parameters() - moe_layers * (cfg.moe_layer_parameters() - cfg.moe_active_parameters())
    assert round(cfg.num_parameters() / 1e9, 1) == 30.5 and abs(active / 1e9 - 3.35) < 0.05
    dense, resident = registry.build("cache", "dense"), registry.build("prefetch", "resident")

    def est(c):
        return estimate(c, dtype=torch.bfloat16, device=torch.device("cpu"), batch=1, context=1024, codec=dense,
                        prefetch=resident)

    assert est(cfg)["weights_bytes"] == 2 * cfg.num_parameters()
    # each routed slot holds an intermediate row and an output row per token: 8 slots cost more than 1
    one_slot = ModelConfig.from_hf({**arch, "num_experts_per_tok": 1})
    grown = est(cfg)["activation_bytes"] - est(one_slot)["activation_bytes"]
    assert grown == 1024 * 7 * (3 * cfg.moe_intermediate_size + cfg.hidden_size) * 2


# ---- gpt-oss -------------------------------------------------------------------------------------------------------

# window 8 on the sliding layers, so a 20-token prompt and 16 steps run past it; YaRN with a short original context,
# so its ramp covers some of the 8 frequencies at head_dim 16
GPT_OSS = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=32, num_hidden_layers=2, head_dim=16,
               num_attention_heads=4, num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2,
               sliding_window=8, layer_types=["sliding_attention", "full_attention"], max_position_embeddings=256,
               rope_parameters={"rope_type": "yarn", "factor": 4.0, "beta_fast": 32.0, "beta_slow": 1.0,
                                "truncate": False, "original_max_position_embeddings": 64, "rope_theta": 10000.0})


def hf_gpt_oss():
    cfg = transformers.GptOssConfig(**GPT_OSS)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    model = transformers.GptOssForCausalLM(cfg).eval()
    with torch.no_grad():  # sinks and biases large enough to matter, decisive routing, norms off 1
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(0.1 * torch.randn_like(p))
            elif name.endswith("sinks") or name.endswith("bias"):
                p.normal_(0.0, 0.5)
            elif name.endswith("router.weight"):
                p.normal_(0.0, 1.0)
    return model


def save_checkpoint(model, path: Path, tensors: dict | None = None) -> Path:
    save_file(tensors or {k: v.contiguous() for k, v in model.state_dict().items()}, path / "model.safetensors")
    model.config.to_json_file(path / "config.json")
    return path


@pytest.fixture(scope="module")
def gpt_oss(tmp_path_factory):
    model = hf_gpt_oss()
    return model, save_checkpoint(model, tmp_path_factory.mktemp("gpt_oss")), transformers_run(model, ids_for())


def test_gpt_oss_fields_left_out_take_transformers_defaults():
    """A gpt_oss config.json without rms_norm_eps or attention_bias builds what transformers builds from it."""
    sparse = {k: v for k, v in GPT_OSS.items() if k not in ("rms_norm_eps", "attention_bias")}
    hf = transformers.GptOssConfig(**sparse)
    cfg = ModelConfig.from_hf({**sparse, "model_type": "gpt_oss"})
    assert (cfg.rms_norm_eps, cfg.attention_bias) == (hf.rms_norm_eps, hf.attention_bias) == (1e-5, True)


@pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated")
def test_gpt_oss_matches_transformers(gpt_oss):
    model, path, (expected, fed) = gpt_oss
    engine = load_engine(path, attention="sdpa", codec="dense")
    assert engine.config.layer_windows == (8, 0) and engine.config.attention_sinks
    assert engine.num_parameters() == model.num_parameters() == engine.config.num_parameters()
    ours, _ = engine_run(engine, ids_for(), fed)
    errors = [(o - e).abs().max().item() for o, e in zip(ours, expected, strict=True)]
    print(f"gpt_oss: max abs error prefill {errors[0]:.2e}, decode {max(errors[1:]):.2e}")
    assert max(errors) <= TOL, errors
    # the Triton expert kernels (interpreter) on the transposed interleaved layout with biases and the clamp
    for layer in engine.model.model.layers:
        layer.mlp.path = "kernel"
    ours, _ = engine_run(engine, ids_for(), fed[:1])
    assert max_error(ours, expected[:2]) <= TOL


def test_gpt_oss_int8_within_codec_loss(gpt_oss):
    _, path, (_, fed) = gpt_oss
    dense, _ = engine_run(load_engine(path, attention="sdpa", codec="dense"), ids_for(), fed)
    codec = registry.build("cache", "int8", {"group_size": 16, "residual": 4})
    quant, cache = engine_run(load_engine(path, attention="sdpa", codec=codec), ids_for(), fed)
    assert cache.layers[1].compressed_tokens > 0
    spread = torch.cat([d.flatten() for d in dense]).std().item()
    assert 0 < max_error(quant, dense) <= 0.02 * spread


def test_gpt_oss_dense_checkpoint_refuses_mxfp4_experts_in_one_line(gpt_oss):
    _, path, _ = gpt_oss
    with pytest.raises(CheckpointError, match="stores them otherwise; leave experts=dense") as err:
        load_engine(path, experts="mxfp4")
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("attention", ["sparse", "sliding_window"])  # flash declares both
def test_gpt_oss_refuses_backends_without_windows_or_sinks(gpt_oss, attention):
    _, path, _ = gpt_oss
    with pytest.raises(ValueError, match=r"gpt_oss needs .*does not declare `layer_window`") as err:
        load_engine(path, attention=attention)
    assert "\n" not in str(err.value) and str(err.value).endswith("backends that do: flash, sdpa")


def test_mxfp4_dequantization_matches_transformers():
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    from ollm_triton.engine.checkpoint import dequantize_mxfp4

    g = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, 256, (3, 10, 4, 16), generator=g, dtype=torch.uint8)
    scales = torch.randint(117, 137, (3, 10, 4), generator=g).to(torch.uint8)
    ref = convert_moe_packed_tensors(blocks, scales, dtype=torch.bfloat16)  # [E, in, out]
    ours = torch.stack([dequantize_mxfp4(blocks[e], scales[e], torch.bfloat16).T for e in range(3)])
    assert torch.equal(ours, ref)


@pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated")
def test_gpt_oss_mxfp4_checkpoint(tmp_path):
    """Expert weights stored as MXFP4 blocks + scales (the official checkpoints' layout) load dequantized: the engine
    then gives the logits of transformers' model holding the dequantized weights."""
    from ollm_triton.engine.checkpoint import dequantize_mxfp4

    model = hf_gpt_oss()
    tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(3)
    for name, p in model.named_parameters():
        if name.endswith("experts.gate_up_proj") or name.endswith("experts.down_proj"):
            e, n_in, n_out = p.shape  # stored [E, out, in / 32, 16] + [E, out, in / 32]
            blocks = torch.randint(0, 256, (e, n_out, n_in // 32, 16), generator=g, dtype=torch.uint8)
            scales = torch.randint(116, 121, (e, n_out, n_in // 32), generator=g).to(torch.uint8)
            with torch.no_grad():
                p.copy_(torch.stack([dequantize_mxfp4(blocks[i], scales[i], torch.float32).T for i in range(e)]))
            del tensors[name]
            tensors[f"{name}_blocks"], tensors[f"{name}_scales"] = blocks, scales
    path = save_checkpoint(model, tmp_path, tensors)
    expected, fed = transformers_run(model, ids_for())
    ours, _ = engine_run(load_engine(path, attention="sdpa", codec="dense"), ids_for(), fed[:2])
    assert max_error(ours, expected[:3]) <= TOL
    # kept as MXFP4 (experts="mxfp4"): the checkpoint's bytes on the model, dequantized per expert by the eager
    # path and read as bytes by the Triton kernels (interpreter); the same logits
    packed = load_engine(path, attention="sdpa", codec="dense", experts="mxfp4")
    experts = packed.model.model.layers[0].mlp.experts
    assert experts.gate_up_proj_blocks.dtype == torch.uint8 and not hasattr(experts, "gate_up_proj")
    assert packed.num_parameters() == model.num_parameters()
    ours, _ = engine_run(packed, ids_for(), fed[:2])
    assert max_error(ours, expected[:3]) <= TOL
    for layer in packed.model.model.layers:
        layer.mlp.path = "kernel"
    ours, _ = engine_run(packed, ids_for(), fed[:1])
    assert max_error(ours, expected[:2]) <= TOL
    for bad, match in [(dict(experts="fp4"), "accepted: dense, mxfp4"),
                       (dict(experts="mxfp4", prefetch="lookahead"), "keeps the experts resident")]:
        with pytest.raises(ValueError, match=match) as err:
            load_engine(path, **bad)
        assert "\n" not in str(err.value)


def test_gpt_oss_20b_preset():
    arch = yaml.safe_load((Path(conf_init).parent / "model" / "gpt_oss_20b.yaml").read_text())["arch"]
    cfg = ModelConfig.from_hf(arch)
    assert round(cfg.num_parameters() / 1e9, 1) == 20.9
    assert cfg.layer_windows == (128, 0) * 12 and cfg.attention_sinks and cfg.rope_scaling.kind == "yarn"
    hf = transformers.GptOssConfig(**{k: v for k, v in arch.items() if k != "model_type"})
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    inv_freq, factor = ROPE_INIT_FUNCTIONS["yarn"](hf)
    assert torch.equal(cfg.inv_freq(), inv_freq) and cfg.rope_attention_factor == factor


# ---- on the GPU: the MoE kernels inside the captured decode step ----------------------------------------------------

GPU_MOE = dict(model_type="qwen3_moe", vocab_size=4096, hidden_size=512, intermediate_size=1024,
               moe_intermediate_size=256, num_experts=32, num_experts_per_tok=4, norm_topk_prob=True,
               num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2, head_dim=64,
               max_position_embeddings=4096)


@pytest.mark.gpu
@pytest.mark.parametrize("batch", [1, 3])
def test_gpu_moe_graph_step_equals_uncaptured_and_eager(batch):
    """The whole decode step captured with the Triton expert kernels in it (no host sync: the grid is sized from
    N*k) gives the tokens of the same step uncaptured, and the eager grouped path's logits to bf16 rounding."""
    from ollm_triton.decoding.greedy import decode_loop
    from ollm_triton.engine.fast_decode import FastDecoder

    def decisive(engine):  # router logits far apart, so bf16 rounding of either path picks the same experts
        for layer in engine.model.model.layers:
            layer.mlp.gate.weight.mul_(50.0)
        return engine

    graph = decisive(load_engine(GPU_MOE, device="cuda", dtype=torch.bfloat16, seed=0))
    static = decisive(load_engine(GPU_MOE, device="cuda", dtype=torch.bfloat16, seed=0, fast_decode="static"))
    assert str(graph.fast_path) == "graph"
    static._fast = FastDecoder(static, capture=False, fuse_weights=True)
    ids = torch.randint(0, 4096, (batch, 200), generator=torch.Generator().manual_seed(0)).cuda()
    greedy = registry.build("decoder", "greedy")
    a, b = greedy.generate(graph, ids, 32), greedy.generate(static, ids, 32)
    assert torch.equal(a.tokens, b.tokens) and a.counters["fast_path_graph"] == 1.0
    eager = decisive(load_engine(GPU_MOE, device="cuda", dtype=torch.bfloat16, seed=0, fast_decode="off"))
    eager.kernels = False  # the eager grouped expert path, not the kernels
    ref, got = [], []
    decode_loop(eager, ids, 3, recording(ref), None)
    graph.fast_decoder().generate(ids, 3, recording(got))
    for r, g in zip(ref, got, strict=True):
        assert ((r - g).norm() / r.norm()).item() < 2e-2


def test_gpt_oss_static_and_piecewise_steps_keep_windows_and_sinks(gpt_oss):
    """dense's whole static step attends with each layer's window and sinks (static_window_sinks): transformers'
    logits at every step. A quantized codec's whole static step runs too (tests/test_kernels_quant_window_sinks.py
    checks its logits); the piecewise step (uncaptured on the CPU) runs each layer's attention through the backend
    with the layer's own window and sinks: the logits of the eager engine at every step."""
    from ollm_triton.decoding.greedy import decode_loop
    from ollm_triton.engine.fast_decode import capture_blocker

    _, path, (expected, fed) = gpt_oss
    whole = load_engine(path, fast_decode="static")
    assert capture_blocker(whole) is None and str(whole.fast_path) == "static"
    logits = []
    out = whole.fast_decoder().generate(ids_for(), STEPS + 1, recording(logits))
    assert torch.equal(out.tokens[:, :STEPS], torch.cat(fed, dim=1))
    assert max_error(logits, [expected[0][:, -1]] + [x[:, -1] for x in expected[1:]]) <= TOL
    int4 = registry.build("cache", "int4", {})  # its static step takes windows and sinks (Quant.static_window_sinks)
    assert capture_blocker(load_engine(path, codec=int4)) is None
    assert str(load_engine(path, codec=int4, fast_decode="static").fast_path) == "static"
    piecewise, eager = load_engine(path, fast_decode="piecewise"), load_engine(path, fast_decode="off")
    assert str(piecewise.fast_path) == "piecewise static"

    ref, got = [], []
    decode_loop(eager, ids_for(), 12, recording(ref), None)
    piecewise.fast_decoder().generate(ids_for(), 12, recording(got))
    assert piecewise.describe()["fast_path_steps"] > 0
    assert max_error(got, ref) <= TOL


def test_attention_sinks_against_float64(monkeypatch):
    """sdpa's sink attention, whole and in query chunks, against the closed form in float64: plain softmax attention
    scaled by Z / (Z + exp(sink)), Z the sum of exp(score) over the visible keys."""
    from ollm_triton.attention import sdpa
    from ollm_triton.attention.base import causal_mask

    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(2, 4, 37, 16, generator=g), torch.randn(2, 2, 50, 16, generator=g), \
        torch.randn(2, 2, 50, 16, generator=g)
    sinks = torch.randn(4, generator=g) * 2
    mask = causal_mask(37, 50, 13, "cpu", window=8)
    kr, vr = k.double().repeat_interleave(2, 1), v.double().repeat_interleave(2, 1)
    scores = (q.double() @ kr.transpose(-1, -2) / 4.0).masked_fill(~mask, float("-inf"))
    z = scores.exp().sum(-1, keepdim=True)
    ref = torch.softmax(scores, -1) @ vr * (z / (z + sinks.double().exp().view(1, 4, 1, 1)))
    whole = sdpa.attend_with_sinks(q, k, v, mask, sinks)
    monkeypatch.setattr(sdpa, "SINK_SCORES_BYTES", 4 * 2 * 4 * 50 * 5)  # chunks of 5 queries
    chunked = sdpa.attend_with_sinks(q, k, v, mask, sinks)
    assert (whole.double() - ref).abs().max() < 1e-5 and (chunked.double() - ref).abs().max() < 1e-5


@pytest.mark.gpu
def test_gpu_gpt_oss_piecewise_graphs_equal_uncaptured_and_eager():
    """On the GPU the piecewise step (asked for: auto now takes the whole step, whose kernels hold windows and sinks)
    runs gpt-oss with each layer's attention between captured segments: replayed segments give the tokens of the
    same step uncaptured, and the eager engine's logits to bf16 rounding."""
    from ollm_triton.decoding.greedy import decode_loop
    from ollm_triton.engine.fast_decode import FastDecoder

    arch = dict(model_type="gpt_oss", vocab_size=4096, hidden_size=512, intermediate_size=512, num_hidden_layers=4,
                head_dim=64, num_attention_heads=8, num_key_value_heads=2, num_local_experts=16,
                num_experts_per_tok=4, sliding_window=32, max_position_embeddings=4096,
                layer_types=["sliding_attention", "full_attention"] * 2,
                rope_parameters={"rope_type": "yarn", "factor": 8.0, "beta_fast": 32.0, "beta_slow": 1.0,
                                 "truncate": False, "original_max_position_embeddings": 512, "rope_theta": 150000.0})

    def decisive(engine):  # router logits far apart, so bf16 rounding of either path picks the same experts
        for layer in engine.model.model.layers:
            layer.mlp.router.weight.mul_(50.0)
            layer.self_attn.sinks.normal_(0.0, 1.0, generator=torch.Generator("cuda").manual_seed(1))
        return engine

    graph = decisive(load_engine(arch, device="cuda", dtype=torch.bfloat16, seed=0, fast_decode="piecewise"))
    assert graph.fast_path.mode == "piecewise" and graph.fast_path.captured
    uncaptured = decisive(load_engine(arch, device="cuda", dtype=torch.bfloat16, seed=0))
    uncaptured._fast = FastDecoder(uncaptured, capture=False, piecewise=True)
    ids = torch.randint(0, 4096, (2, 100), generator=torch.Generator().manual_seed(0)).cuda()
    greedy = registry.build("decoder", "greedy")
    a, b = greedy.generate(graph, ids, 24), greedy.generate(uncaptured, ids, 24)
    assert torch.equal(a.tokens, b.tokens)
    eager = decisive(load_engine(arch, device="cuda", dtype=torch.bfloat16, seed=0, fast_decode="off"))
    ref, got = [], []
    decode_loop(eager, ids, 3, recording(ref), None)
    graph.fast_decoder().generate(ids, 3, recording(got))
    for r, g in zip(ref, got, strict=True):
        assert ((r - g).norm() / r.norm()).item() < 2e-2


@pytest.mark.gpu
def test_gpu_gpt_oss_mxfp4_experts_whole_step_equal_dequantized():
    """experts=mxfp4 on the GPU, bf16, the engine's whole captured step: the tokens and logits of the same model
    with its MXFP4 experts dequantized to bf16 parameters (exact: every MXFP4 value is a bf16 number)."""
    arch = dict(model_type="gpt_oss", vocab_size=4096, hidden_size=512, intermediate_size=512, num_hidden_layers=4,
                head_dim=64, num_attention_heads=8, num_key_value_heads=2, num_local_experts=16,
                num_experts_per_tok=4, sliding_window=32, max_position_embeddings=4096,
                layer_types=["sliding_attention", "full_attention"] * 2)
    packed = load_engine(arch, device="cuda", dtype=torch.bfloat16, experts="mxfp4")
    dense = load_engine(arch, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        for p_layer, d_layer in zip(packed.model.model.layers, dense.model.model.layers, strict=True):
            p_layer.mlp.router.weight.mul_(50.0)  # decisive routing: both pick the same experts
            ex = p_layer.mlp.experts
            for name, param in d_layer.named_parameters():
                if name == "mlp.experts.gate_up_proj":
                    param.copy_(MXFP4(ex.gate_up_proj_blocks, ex.gate_up_proj_scales).dense(param.dtype, True))
                elif name == "mlp.experts.down_proj":
                    param.copy_(MXFP4(ex.down_proj_blocks, ex.down_proj_scales).dense(param.dtype, True))
                else:
                    param.copy_(p_layer.get_parameter(name))
        for name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
            dense.model.get_parameter(name).copy_(packed.model.get_parameter(name))
    ids = torch.randint(0, 4096, (1, 24), generator=torch.Generator().manual_seed(0))
    assert packed.fast_path.mode == dense.fast_path.mode == "graph"
    greedy = registry.build("decoder", "greedy")
    a, b = (greedy.generate(e, ids, 12) for e in (packed, dense))
    assert torch.equal(a.tokens, b.tokens)
    la, lb = (e.forward(ids.cuda(), e.new_cache(max_len=32)) for e in (packed, dense))
    assert ((la - lb).norm() / lb.norm()).item() < 1e-2
