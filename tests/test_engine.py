"""The native engine against transformers' own implementation, and its checkpoint loading.

For each supported model type a small random-weight model is built with transformers' model class (every parameter,
norm weights and biases included, perturbed away from its initial value so that a missing norm or bias shows),
saved with `save_pretrained` (safetensors), loaded through `load_engine`, and run side by side in fp32: a 20-token
prefill, then 16 single-token decode steps, each with its own cache, batch 2. Max abs error <= 1e-4.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from ollm_triton.engine import CheckpointError, ModelConfig, UnsupportedModelError, load_engine
from ollm_triton.registry import registry

transformers = pytest.importorskip("transformers")

TOL = 1e-4
PROMPT, STEPS = 20, 16
SMALL = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5)

CASES = {
    # Llama-3.1 rope scaling with a short original context, so all three frequency bands occur at head_dim 16
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(
        num_hidden_layers=3, rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 64})),
    # an explicit head_dim that differs from hidden / heads (Mistral-Nemo style)
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(head_dim=32)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(rope_theta=1000000.0)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=16, tie_word_embeddings=True)),
}


def hf_model(model_type: str, seed: int = 0, **overrides):
    cfg_name, cls_name, extra = CASES[model_type]
    cfg = getattr(transformers, cfg_name)(**{**SMALL, **extra, **overrides})
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = getattr(transformers, cls_name)(cfg).eval()
    with torch.no_grad():  # move norms off 1 and biases off 0, so that forgetting one of them fails the comparison
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(0.1 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.normal_(0.0, 0.1)
    return model


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """model_type -> (transformers model, checkpoint directory)."""
    out = {}
    for model_type in CASES:
        model = hf_model(model_type)
        path = tmp_path_factory.mktemp(model_type)
        model.save_pretrained(path)
        out[model_type] = (model, path)
    return out


def sdpa_dense():
    return dict(attention=registry.build("attention", "sdpa"), codec=registry.build("cache", "dense"))


# `past_key_values` is renamed `cache` after 5.17 (the GPU box's version); the old name works on both
@pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated")
@pytest.mark.parametrize("model_type", list(CASES))
def test_logits_match_transformers(saved, model_type):
    model, path = saved[model_type]
    engine = load_engine(path, **sdpa_dense(), device="cpu", dtype=torch.float32)
    assert engine.config.model_type == model_type
    assert engine.num_parameters() == model.num_parameters() == engine.config.num_parameters()

    ids = torch.randint(0, SMALL["vocab_size"], (2, PROMPT + STEPS), generator=torch.Generator().manual_seed(1))
    cache = engine.new_cache(batch=2, max_len=PROMPT + STEPS)
    with torch.no_grad():
        ref = model(ids[:, :PROMPT], use_cache=True)
        ours = engine.forward(ids[:, :PROMPT], cache)
        assert ours.dtype == torch.float32 and ours.shape == (2, PROMPT, SMALL["vocab_size"])
        errors = [(ours - ref.logits).abs().max().item()]
        past = ref.past_key_values
        for i in range(PROMPT, PROMPT + STEPS):
            ref = model(ids[:, i : i + 1], past_key_values=past, use_cache=True)
            past = ref.past_key_values
            errors.append((engine.forward(ids[:, i : i + 1], cache) - ref.logits).abs().max().item())
    assert cache.position == PROMPT + STEPS and cache.layers[0].length == PROMPT + STEPS
    print(f"{model_type}: max abs error prefill {errors[0]:.2e}, decode {max(errors[1:]):.2e}")
    assert max(errors) <= TOL, f"{model_type}: max abs error per step {errors}"


def test_sharded_checkpoint_matches_single_file(saved, tmp_path):
    model, single = saved["llama"]
    model.save_pretrained(tmp_path, max_shard_size="100KB")
    shards = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    assert len(shards) > 1 and (tmp_path / "model.safetensors.index.json").is_file(), shards
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(2))
    a, b = load_engine(single, **sdpa_dense()), load_engine(tmp_path, **sdpa_dense())
    assert torch.equal(a.forward(ids, a.new_cache(2, 16)), b.forward(ids, b.new_cache(2, 16)))


def test_tied_embeddings_share_one_tensor(saved):
    model, path = saved["qwen3"]
    stored = load_file(path / "model.safetensors")
    engine = load_engine(path, **sdpa_dense())
    assert engine.config.tie_word_embeddings
    assert engine.model.lm_head.weight is engine.model.model.embed_tokens.weight
    assert torch.equal(engine.model.lm_head.weight, stored["model.embed_tokens.weight"])
    # counted once, as transformers counts it
    assert engine.num_parameters() == model.num_parameters()


def test_missing_tensor_names_it(saved, tmp_path):
    _, path = saved["qwen2"]
    tensors = load_file(path / "model.safetensors")
    del tensors["model.layers.1.self_attn.k_proj.bias"]
    save_file(tensors, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.self_attn\.k_proj\.bias") as err:
        load_engine(tmp_path, **sdpa_dense())
    assert "\n" not in str(err.value)


def test_missing_tensor_in_a_shard_names_tensor_and_file(saved, tmp_path):
    model, _ = saved["mistral"]
    model.save_pretrained(tmp_path, max_shard_size="100KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    name = "model.layers.0.mlp.up_proj.weight"
    shard = index["weight_map"][name]
    tensors = load_file(tmp_path / shard)
    del tensors[name]
    save_file(tensors, tmp_path / shard)
    with pytest.raises(CheckpointError, match=rf"{name}.*{shard}"):
        load_engine(tmp_path, **sdpa_dense())


def test_shape_mismatch_names_tensor_and_file(saved, tmp_path):
    _, path = saved["llama"]
    cfg = json.loads((path / "config.json").read_text())
    cfg["intermediate_size"] = 96
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "model.safetensors").symlink_to(path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"gate_proj\.weight.*model\.safetensors.*\[128, 64\].*\[96, 64\]"):
        load_engine(tmp_path, **sdpa_dense())


def test_unsupported_model_type_names_supported_ones(saved, tmp_path):
    with pytest.raises(UnsupportedModelError) as err:
        ModelConfig.from_hf({**SMALL, "model_type": "gpt2"})
    msg = str(err.value)
    assert "gpt2" in msg and all(t in msg for t in ("llama", "mistral", "qwen2", "qwen3")) and "\n" not in msg
    _, path = saved["llama"]
    cfg = json.loads((path / "config.json").read_text())
    cfg["model_type"] = "falcon"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError, match="falcon.*llama, mistral, qwen2, qwen3"):
        load_engine(tmp_path)
    with pytest.raises(UnsupportedModelError, match="rope type 'longrope'; supported: default, linear, llama3, yarn"):
        ModelConfig.from_hf({**SMALL, "model_type": "qwen2", "rope_scaling": {"type": "longrope", "factor": 4.0}})


def test_missing_directory_and_config_are_one_line(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist") as err:
        load_engine(tmp_path / "nowhere")
    assert "\n" not in str(err.value)
    with pytest.raises(CheckpointError, match="no config.json"):
        load_engine(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**SMALL, "model_type": "llama"}))
    (tmp_path / "pytorch_model.bin").write_bytes(b"never unpickled")
    with pytest.raises(CheckpointError, match="no \\*.safetensors.*pytorch_model.bin.*never loaded"):
        load_engine(tmp_path)


def test_hub_id_offline_fails_with_one_line(tmp_path):
    # a fresh interpreter, so that huggingface_hub reads HF_HUB_OFFLINE at import as it would in a real run
    code = (
        "from ollm_triton.engine.checkpoint import resolve_source, CheckpointError\n"
        "try:\n    resolve_source('someone/some-model')\nexcept CheckpointError as e:\n    print('ERR', e)\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    lines = [line for line in out.stdout.splitlines() if line.startswith("ERR")]
    assert len(lines) == 1 and "someone/some-model" in lines[0] and "hub" in lines[0], out.stdout + out.stderr
    assert "HF_HUB_OFFLINE" in lines[0]


def test_config_layouts_4x_and_5x_agree():
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    old = {**SMALL, "model_type": "llama", "rope_theta": 500000.0,
           "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                            "original_max_position_embeddings": 64}}
    new_hf = transformers.LlamaConfig(**old)
    new = new_hf.to_dict()
    assert "rope_parameters" in new
    a, b = ModelConfig.from_hf(old), ModelConfig.from_hf(new)
    skip = ("bos_token_id", "eos_token_id", "checkpoint_dtype")  # class defaults, not layout
    assert {k: v for k, v in a.to_dict().items() if k not in skip} == {
        k: v for k, v in b.to_dict().items() if k not in skip}
    assert a.rope_theta == 500000.0 and a.rope_scaling.kind == "llama3" and a.head_dim == 16
    ref, _ = ROPE_INIT_FUNCTIONS["llama3"](new_hf, "cpu")
    assert torch.equal(a.inv_freq(), ref)

    linear = {**SMALL, "model_type": "mistral", "rope_theta": 1e6, "rope_scaling": {"type": "linear", "factor": 2.0}}
    cfg = ModelConfig.from_hf(linear)
    base = ModelConfig.from_hf({**SMALL, "model_type": "mistral", "rope_theta": 1e6})
    assert cfg.rope_scaling.kind == "linear" and torch.equal(cfg.inv_freq(), base.inv_freq() / 2)

    qwen2 = ModelConfig.from_hf({**SMALL, "model_type": "qwen2", "sliding_window": 128, "use_sliding_window": False})
    assert qwen2.qkv_bias and not qwen2.attention_bias and qwen2.extra["sliding_window"] == 128
    assert ModelConfig.from_hf({**SMALL, "model_type": "qwen3", "head_dim": 128}).head_dim == 128


def test_random_weights_are_seeded_and_typed():
    cfg = {**SMALL, "model_type": "qwen3", "head_dim": 16}
    a = load_engine(cfg, seed=3, dtype=torch.bfloat16)
    b = load_engine(cfg, seed=3, dtype="bfloat16")
    c = load_engine(cfg, seed=4, dtype=torch.bfloat16)
    pa, pb, pc = (dict(e.model.named_parameters()) for e in (a, b, c))
    assert all(p.dtype == torch.bfloat16 and p.device.type == "cpu" for p in pa.values())
    assert all(torch.equal(pa[n], pb[n]) for n in pa)
    assert not torch.equal(pa["model.layers.0.mlp.up_proj.weight"], pc["model.layers.0.mlp.up_proj.weight"])
    w = pa["model.layers.1.self_attn.q_proj.weight"].float()
    assert abs(w.std().item() - 0.02) < 0.002 and torch.equal(pa["model.norm.weight"], torch.ones(64).bfloat16())
    assert torch.equal(pa["model.layers.0.self_attn.q_norm.weight"], torch.ones(16).bfloat16())
    assert a.forward(torch.tensor([[1, 2, 3]]), a.new_cache(1, 8)).dtype == torch.float32


def _random_engine(**kw):
    return load_engine({**SMALL, "model_type": "llama", "num_hidden_layers": 2}, seed=0, **sdpa_dense(), **kw)


def test_multi_token_decode_and_chunked_prefill_match_one_shot():
    engine = _random_engine()
    ids = torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(5))
    full = engine.forward(ids, engine.new_cache(1, 40))
    cache = engine.new_cache(1, 40)
    parts = [engine.forward(ids[:, :10], cache),  # first chunk: prefill
             engine.forward(ids[:, 10:14], cache),  # T=4 <= decode_max_tokens: append, then decode
             engine.forward(ids[:, 14:34], cache),  # T=20: chunked prefill over dense past + exact chunk
             *(engine.forward(ids[:, i : i + 1], cache) for i in range(34, 40))]
    assert (torch.cat(parts, dim=1) - full).abs().max().item() <= 1e-5


def test_causal_tree_mask_equals_no_mask_and_truncate_rolls_back():
    engine = _random_engine()
    ids = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(6))
    cache = engine.new_cache(1, 32)
    engine.forward(ids[:, :12], cache)
    plain = engine.forward(ids[:, 12:], cache)
    cache.truncate(12)
    tree = engine.forward(ids[:, 12:], cache, tree_mask=torch.ones(4, 4, dtype=torch.bool).tril())
    assert (plain - tree).abs().max().item() <= 1e-5 and cache.position == 16
    # two sibling drafts at the same depth: each sees the prefix only, as if decoded alone after it
    cache.truncate(12)
    sib = engine.forward(ids[:, 12:14], cache, positions=torch.tensor([12, 12]),
                         tree_mask=torch.eye(2, dtype=torch.bool))
    cache.truncate(12)
    alone = engine.forward(ids[:, 13:14], cache)
    assert (sib[:, 0] - plain[:, 0]).abs().max().item() <= 1e-5
    assert (sib[:, 1] - alone[:, 0]).abs().max().item() <= 1e-5


def test_prefetch_hooks_bracket_every_layer():
    from ollm_triton.prefetch.base import PrefetchPolicy

    class Recorder(PrefetchPolicy):
        def __init__(self):
            self.calls = []

        def setup(self, model, device):
            self.calls.append("setup")

        def before_layer(self, i):
            self.calls.append(f"+{i}")

        def after_layer(self, i):
            self.calls.append(f"-{i}")

    policy = Recorder()
    engine = _random_engine(prefetch=policy)
    engine.forward(torch.tensor([[1, 2]]), engine.new_cache(1, 4))
    assert policy.calls == ["setup", "+0", "-0", "+1", "-1"]


def test_describe_last_only_bad_device_and_close():
    engine = _random_engine()
    info = engine.describe()
    assert info["model_type"] == "llama" and info["attention"] == "sdpa" and info["cache"] == "dense"
    assert info["num_parameters"] == engine.config.num_parameters() and info["dtype"] == "float32"
    cache = engine.new_cache(1, 8)
    last = engine.forward(torch.tensor([[5, 6, 7]]), cache, last_only=True)
    assert last.shape == (1, 1, 256)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            _random_engine(device="cuda")
    engine.close()
    assert engine.model is None
    with pytest.raises(RuntimeError, match="closed"):
        engine.forward(torch.tensor([[1]]), cache)


def test_tokenizer_from_checkpoint(saved, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    words = ["<s>", "</s>", "hello", "world", "long", "context"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="</s>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    _, path = saved["llama"]
    for f in ("config.json", "model.safetensors"):
        (tmp_path / f).symlink_to(path / f)
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    engine = load_engine(tmp_path, **sdpa_dense())
    t = engine.tokenizer
    assert t.bos_token_id == 0 and t.eos_token_id == 1 and t.add_bos  # the post-processor prepends BOS
    assert t.encode("hello long context") == [0, 2, 4, 5]
    assert t.decode([2, 3]) == "hello world"
    assert engine.describe()["tokenizer_add_bos"] is True
