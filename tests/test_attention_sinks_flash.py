"""gpt-oss attention (per-layer sliding window + per-head sink logits) on the Triton flash kernels (issue 18).

The prefill kernel with sinks and windows, and the split-K decode kernel whose merge adds the sinks, against a
float64 reference written here from the definition (softmax over [scores of keys p - window < s <= p, sink_h],
the sink's column dropped) on odd shapes, GQA 4:1, fp32/fp16 on the interpreter, NaN-poisoned outputs; the PyTorch
references the CPU runs take against the same definition. Then the `flash` backend (kernels forced on) on a tiny
gpt-oss against transformers' own logits over a prompt longer than the window and 8 decode steps; the backends that
do not honour the rule refusing it in one line; sdpa's chunked `attend_with_sinks` and the footprint's count of it.
bf16 at gpt-oss-20b attention shapes on the GPU: test_gpu_gpt_oss_shapes_bf16.
"""

import dataclasses
import math

import pytest
import torch

from ollm_triton.attention import sdpa as sdpa_module
from ollm_triton.attention.sdpa import attend_with_sinks, sink_attention_bytes
from ollm_triton.engine import load_engine
from ollm_triton.engine.footprint import forward_activation_bytes, model_config
from ollm_triton.kernels.attention_decode import decode_reference, flash_decode
from ollm_triton.kernels.attention_prefill import PrefillConfig, attention_reference, flash_prefill
from ollm_triton.kernels.attention_schedule import build_schedule, decode_block_ids
from ollm_triton.registry import registry

pytestmark = pytest.mark.usefixtures("one_torch_thread")

HQ, HKV, D = 8, 2, 16  # GQA 4:1
TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}
SINKS = torch.tensor([2.5, -3.0, 0.3, 6.0, -0.5, 1.5, 4.0, -8.0])  # both signs; 6 and 4 dominate short rows


def definition(q, k, v, q_offset, window, sinks):
    """float64 from the definition: query t at p = q_offset + t sees keys p - window < s <= p (window 0: s <= p);
    head h's softmax has one more column, sinks[h], dropped before the values."""
    b, hq, t, d = q.shape
    s = k.shape[2]
    g = hq // k.shape[1]
    kk, vv = k.double().repeat_interleave(g, 1), v.double().repeat_interleave(g, 1)
    scores = q.double() @ kk.transpose(-1, -2) / math.sqrt(d)
    p = torch.arange(t)[:, None] + q_offset
    key = torch.arange(s)[None, :]
    visible = (key <= p) & ((key > p - window) if window else True)
    scores = scores.masked_fill(~visible, float("-inf"))
    if sinks is not None:
        scores = torch.cat((scores, sinks.double().view(1, hq, 1, 1).expand(b, hq, t, 1)), dim=-1)
    probs = torch.softmax(scores, dim=-1)
    return (probs[..., :s] if sinks is not None else probs) @ vv


def rel_rms(a, ref):
    a, ref = a.double(), ref.double()
    return float((a - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt())


def qkv(t, s, dtype, seed=0, b=1, hq=HQ, hkv=HKV, d=D, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(b, h, n, d, generator=g).to(device, dtype) for h, n in ((hq, t), (hkv, s), (hkv, s)))


@pytest.mark.interpreter
@pytest.mark.parametrize("t, s, window, dtype, cfg", [
    (1, 1, 0, torch.float32, None),  # one key: the sink takes its share of a single score
    (63, 63, 8, torch.float32, None),
    (129, 129, 33, torch.float16, PrefillConfig(64, 64, 4, 2)),
    (129, 200, 0, torch.float32, PrefillConfig(16, 32, 4, 2, pack_gqa=True)),  # packed rows: per-row head's sink
    (63, 190, 33, torch.float16, PrefillConfig(8, 16, 4, 2, kv_desc=True, pack_gqa=True)),  # a chunk over a cache
    (1, 177, 8, torch.float32, None),  # a decode-sized call
])
def test_prefill_kernel_sinks_and_window_against_float64(t, s, window, dtype, cfg, poison):
    q, k, v = qkv(t, s, dtype, seed=t + s)
    bm, bn = (cfg.block_m, cfg.block_n) if cfg else (16 if t <= 16 else 32, 32)
    sched = build_schedule(t, s, s - t, bm, bn, window=window)
    out = poison(torch.empty_like(q))
    flash_prefill(q, k, v, sched, sinks=SINKS.to(dtype), config=cfg, out=out)
    ref = definition(q, k, v, s - t, window, SINKS.to(dtype))
    assert not out.isnan().any()
    assert rel_rms(out, ref) < TOL[dtype]
    # without the sink term the output is measurably different (the test above would see a broken epilogue)
    assert rel_rms(definition(q, k, v, s - t, window, None), ref) > 20 * TOL[dtype]


@pytest.mark.interpreter
@pytest.mark.parametrize("t, s, window, dtype, splits", [
    (1, 129, 33, torch.float32, 3),
    (1, 1, 0, torch.float16, 1),
    (3, 200, 8, torch.float16, 2),  # three new tokens: causal among them under the window
    (4, 63, 0, torch.float32, 3),
])
def test_decode_kernel_sinks_and_window_against_float64(t, s, window, dtype, splits, poison):
    q, k, v = qkv(t, s, dtype, seed=7 * s + t)
    ids = decode_block_ids(s, t, 64, window=window)
    out = poison(torch.empty_like(q))
    flash_decode(q, k, v, block_ids=ids, block_n=64, window=window, sinks=SINKS.to(dtype), num_splits=splits,
                 out=out)
    assert rel_rms(out, definition(q, k, v, s - t, window, SINKS)) < TOL[dtype]


def test_references_are_float64_exact():
    """The PyTorch paths the CPU runs: attention_reference and decode_reference with sinks, the `flash` backend's
    reference with a per-layer window, sdpa's attend_with_sinks in several chunks (fp32: its rounding is the
    inputs' dtype), each against the definition."""
    q, k, v = qkv(29, 61, torch.float64, seed=3)
    flash = registry.build("attention", "flash")
    for window in (0, 1, 8, 33, 100):
        ref = definition(q, k, v, 32, window, SINKS)
        mask = (torch.arange(61)[None, :] <= torch.arange(29)[:, None] + 32)
        if window:
            mask &= torch.arange(61)[None, :] > torch.arange(29)[:, None] + 32 - window
        got = attention_reference(q, k, v, mask, compute_dtype=torch.float64, sinks=SINKS)
        assert (got - ref).abs().max() < 1e-12
        got = flash.reference(q, k, v, q_offset=32, window=window, sinks=SINKS, compute_dtype=torch.float64)
        assert (got - ref).abs().max() < 1e-12
        got = decode_reference(q[:, :, -2:], k, v, compute_dtype=torch.float64, window=window, sinks=SINKS)
        assert (got - ref[:, :, -2:]).abs().max() < 1e-12
    # a speculative tree under the window: block tokens at their depths' positions (base.causal_mask), as sdpa;
    # the kernels' per-row rule does not know depths, so that call takes the reference even with kernels on
    tree = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 1, 0], [1, 0, 1, 1]], dtype=torch.bool)
    flash.use_kernels = True
    got = flash.prefill(q[:, :, -4:], k, v, q_offset=57, tree_mask=tree, window=5, sinks=SINKS)
    assert flash.last_path == "torch.reference"
    want = registry.build("attention", "sdpa").prefill(q[:, :, -4:], k, v, q_offset=57, tree_mask=tree, window=5,
                                                       sinks=SINKS)
    assert (got - want).abs().max() < 1e-5  # both compute in float32
    unwindowed = flash.prefill(q[:, :, -4:], k, v, q_offset=57, tree_mask=tree, sinks=SINKS)
    assert (unwindowed - want).abs().max() > 1e-2
    # the in-place softmax of sdpa's chunked path, forced into 4-row chunks
    q, k, v = (x.float() for x in (q, k, v))
    mask = torch.arange(61)[None, :] <= torch.arange(29)[:, None] + 32
    old = sdpa_module.SINK_SCORES_BYTES
    try:
        sdpa_module.SINK_SCORES_BYTES = 4 * 4 * HQ * 61
        assert sdpa_module.sink_chunk_rows(1, HQ, 61) == 4
        got = attend_with_sinks(q, k, v, mask, SINKS)
    finally:
        sdpa_module.SINK_SCORES_BYTES = old
    assert (got.double() - definition(q, k, v, 32, 0, SINKS)).abs().max() < 1e-5


# ---- the flash backend on a tiny gpt-oss against transformers --------------------------------------------------------

PROMPT, STEPS, VOCAB = 20, 8, 128  # the prompt is longer than layer 0's 8-key window
GPT_OSS = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=32, num_hidden_layers=2, head_dim=16,
               num_attention_heads=4, num_key_value_heads=1, num_local_experts=4, num_experts_per_tok=2,
               sliding_window=8, layer_types=["sliding_attention", "full_attention"], max_position_embeddings=256)


@pytest.fixture(scope="module")
def gpt_oss(tmp_path_factory):
    """(checkpoint directory, transformers' logits [prefill, step 1..], the tokens fed)."""
    transformers = pytest.importorskip("transformers")
    from safetensors.torch import save_file

    cfg = transformers.GptOssConfig(**GPT_OSS)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    model = transformers.GptOssForCausalLM(cfg).eval()
    with torch.no_grad():  # sinks large enough to matter (both signs), decisive routing
        for name, p in model.named_parameters():
            if name.endswith("sinks"):
                p.normal_(0.0, 2.0)
            elif name.endswith("router.weight"):
                p.normal_(0.0, 1.0)
    path = tmp_path_factory.mktemp("gpt_oss_flash")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path / "model.safetensors")
    model.config.to_json_file(path / "config.json")
    ids = torch.randint(0, VOCAB, (1, PROMPT), generator=torch.Generator().manual_seed(1))
    out, fed = [], []
    with torch.no_grad():
        ref = model(ids, use_cache=True)
        out.append(ref.logits)
        for _ in range(STEPS):
            fed.append(out[-1][:, -1:].argmax(-1))
            ref = model(fed[-1], past_key_values=ref.past_key_values, use_cache=True)
            out.append(ref.logits)
    return path, ids, out, fed


@pytest.mark.interpreter
@pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated")
def test_flash_kernels_give_transformers_gpt_oss_logits(gpt_oss):
    path, ids, expected, fed = gpt_oss
    engine = load_engine(path, attention="flash", codec="dense", fast_decode="off")
    assert engine.config.layer_windows == (8, 0) and engine.config.attention_sinks
    engine.attention.use_kernels = True  # the Triton kernels (the interpreter), not the CPU reference
    cache = engine.new_cache(batch=1, max_len=PROMPT + STEPS)
    ours = [engine.forward(ids, cache)]
    assert engine.attention.last_path == "triton.prefill"
    for token in fed:
        ours.append(engine.forward(token, cache))
    assert engine.attention.last_path == "triton.decode"
    errors = [(o - e).abs().max().item() for o, e in zip(ours, expected, strict=True)]
    assert max(errors) <= 1e-4, errors


@pytest.mark.parametrize("name, params", [
    ("sliding_window", {"window": 8, "sink": 0}), ("sparse", {"pattern": "local", "block_size": 16}),
    ("multiscale", {"window": 16, "scales": [8]}),
])
def test_backends_without_the_rule_refuse_it_in_one_line(gpt_oss, name, params):
    path = gpt_oss[0]
    backend = registry.build("attention", name, params)
    with pytest.raises(ValueError, match=r"gpt_oss needs .*does not declare `layer_window`") as err:
        load_engine(path, attention=backend)
    assert "\n" not in str(err.value)
    q, k, v = qkv(4, 4, torch.float32)
    with pytest.raises(ValueError, match=rf"attention '{name}' does not honour sink logits") as err:
        backend.prefill(q, k, v, q_offset=0, sinks=SINKS)
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match=r"does not honour a per-layer window"):
        backend.prefill(q, k, v, q_offset=0, window=2)


def test_footprint_counts_the_sink_attention_chunk():
    """gpt-oss-20b at 8k in 4096-token chunks: the baseline's sink attention holds one chunk of float32 scores
    (<= SINK_SCORES_BYTES) and its bf16 copy, and the estimate counts it; a model without sinks does not."""
    import yaml

    from ollm_triton.engine import footprint

    conf = footprint.__file__.rsplit("/engine/", 1)[0] + "/conf/model/gpt_oss_20b.yaml"
    with open(conf) as f:
        cfg = model_config(yaml.safe_load(f)["arch"])
    kw = dict(dtype=torch.bfloat16, device=torch.device("cuda"), batch=1, tokens=4096, context=8192)
    held = sink_attention_bytes(1, cfg.num_heads, 4096, 8192, 2)
    assert sdpa_module.SINK_SCORES_BYTES * 1.5 <= held <= sdpa_module.SINK_SCORES_BYTES * 1.6
    with_sinks = forward_activation_bytes(cfg, **kw)
    without = forward_activation_bytes(dataclasses.replace(cfg, attention_sinks=False), **kw)
    assert with_sinks - without == held + 4096 * 8192


@pytest.mark.gpu
@pytest.mark.parametrize("t, s, window", [(4096, 4096, 128), (4096, 8192, 0), (1000, 8192, 128)])
def test_gpu_gpt_oss_shapes_bf16(t, s, window, poison):
    """gpt-oss-20b's attention shapes (64 query / 8 KV heads, D 64) in bf16: the flash backend's prefill and a decode
    step against attention_reference in float32, and sdpa's chunked path."""
    q, k, v = qkv(t, s, torch.bfloat16, hq=64, hkv=8, d=64, device="cuda")
    sinks = torch.randn(64, generator=torch.Generator().manual_seed(5)).to("cuda", torch.bfloat16)
    flash = registry.build("attention", "flash")
    out = flash.prefill(q, k, v, q_offset=s - t, window=window, sinks=sinks)
    assert flash.last_path == "triton.prefill"
    ref = flash.reference(q, k, v, q_offset=s - t, window=window, sinks=sinks)
    assert rel_rms(out, ref) < TOL[torch.bfloat16]
    base = registry.build("attention", "sdpa")
    assert rel_rms(base.prefill(q, k, v, q_offset=s - t, window=window, sinks=sinks), ref) < TOL[torch.bfloat16]
    ids = decode_block_ids(s, 1, 64, window=window, device="cuda")
    one = poison(torch.empty_like(q[:, :, -1:]))
    flash_decode(q[:, :, -1:], k, v, block_ids=ids, window=window, sinks=sinks, out=one)
    assert rel_rms(one, ref[:, :, -1:]) < TOL[torch.bfloat16]
