"""The static-buffer decode step (engine/fast_decode.py) against the engine's ordinary decode loop.

On the CPU the step runs eagerly ("static" mode, the code path a CUDA graph captures): greedy tokens must equal the
ordinary loop's exactly and every step's logits must agree to fp32 rounding, for the model variants the step
handles (GQA llama, qwen2 biases, qwen3 q/k-norm with tied embeddings). On the GPU, graph replay must equal the
same step run eagerly, token for token.
"""

import pytest
import torch

from ollm_triton.decoding.greedy import argmax_pick, decode_loop
from ollm_triton.engine import load_engine
from ollm_triton.engine.fast_decode import FastDecoder, FastPath, capture_blocker, fuse_projections
from ollm_triton.registry import registry

SMALL = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5)
VARIANTS = {
    "llama": dict(model_type="llama"),
    "qwen2": dict(model_type="qwen2"),
    "qwen3": dict(model_type="qwen3", head_dim=16, tie_word_embeddings=True),
}


def engine_for(variant="llama", arch=None, **kw):
    """SMALL of one variant (arch: fields over it), norms and biases randomised."""
    engine = load_engine({**SMALL, **VARIANTS[variant], **(arch or {})}, seed=1, **kw)
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():  # norms off 1 and biases off 0, so that a step forgetting one of them differs
        for name, p in engine.model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(0.2 * torch.randn(p.shape, generator=gen))
            elif name.endswith(".bias"):
                p.copy_(0.2 * torch.randn(p.shape, generator=gen))
    return engine


def prompt(batch=2, t=19, seed=0):
    return torch.randint(0, 256, (batch, t), generator=torch.Generator().manual_seed(seed))


def recording_pick(store):
    def pick(logits):
        store.append(logits.clone())
        return logits.argmax(-1)
    return pick


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_static_step_equals_the_decode_loop(variant):
    eager = engine_for(variant, fast_decode="off")
    static = engine_for(variant, fast_decode="static")
    assert str(static.fast_path) == "static" and str(eager.fast_path) == "eager (fast_decode=off)"
    ids = prompt()
    ref_logits, got_logits = [], []
    ref = decode_loop(eager, ids, 12, recording_pick(ref_logits), None)
    got = decode_loop(static, ids, 12, recording_pick(got_logits), None)  # pick outside the step (samplers' path)
    assert torch.equal(ref.tokens, got.tokens)
    for a, b in zip(ref_logits, got_logits, strict=True):
        assert (a - b).abs().max().item() <= 1e-5
    greedy = registry.build("decoder", "greedy").generate(static, ids, 12)  # argmax inside the step
    assert torch.equal(greedy.tokens, ref.tokens)
    info = static.describe()
    assert info["fast_path"] == "static" and info["fast_path_steps"] == 22 and info["fused_kernels"] == "torch"
    assert info["fast_path_matmul"] == "torch" and info["fast_path_fold"] == "none"  # no kernels: nothing folded
    # the static step wrote the same K/V the loop appended (row 0, layer 1, every position fed)
    bk = static.fast_decoder().buckets[2]
    cache = eager.new_cache(2, 64)
    eager.forward(torch.cat((ids, ref.tokens[:, :-1]), 1), cache)
    n = ids.shape[1] + 11
    assert bk.cache.layers[1].length == n
    assert (bk.cache.layers[1].k[:, :, :n] - cache.layers[1].k[:, :, :n]).abs().max().item() <= 1e-5


@pytest.mark.interpreter
def test_static_step_with_fused_kernels_and_weights_under_the_interpreter():
    eager = engine_for("qwen3", fast_decode="off")
    fused = engine_for("qwen3", fast_decode="off")
    fused.kernels = True  # prefill through the fused kernels too (the interpreter here)
    ids = prompt(batch=2, t=9)
    ref_logits, got_logits = [], []
    ref = decode_loop(eager, ids, 5, recording_pick(ref_logits), None)
    fast = FastDecoder(fused, capture=False, use_kernels=True, fuse_weights=True)
    got = fast.generate(ids, 5, recording_pick(got_logits))
    assert torch.equal(ref.tokens, got.tokens) and fused.kernel_path.startswith("triton")
    for a, b in zip(ref_logits, got_logits, strict=True):
        assert (a - b).abs().max().item() <= 1e-4


def test_fused_projections_are_views_and_keep_logits():
    engine = engine_for("qwen2")
    ids = prompt(batch=1, t=7)
    before = engine.forward(ids, engine.new_cache(1, 8))
    n_params = sum(p.numel() for p in engine.model.parameters())
    fuse_projections(engine.model)
    attn, mlp = engine.model.model.layers[0].self_attn, engine.model.model.layers[0].mlp
    assert attn.qkv_weight.shape == (64 + 2 * 32, 64) and mlp.gate_up_weight.shape == (256, 64)
    assert attn.k_proj.weight.data_ptr() == attn.qkv_weight[64:].data_ptr()  # a view, no second copy
    assert attn.qkv_bias is not None and sum(p.numel() for p in engine.model.parameters()) == n_params
    after = engine.forward(ids, engine.new_cache(1, 8))
    assert (before - after).abs().max().item() <= 1e-5


def test_eos_sampling_and_bucket_reuse():
    eager = engine_for(fast_decode="off")
    static = engine_for(fast_decode="static")
    ids = prompt(batch=2, t=11, seed=3)
    free = registry.build("decoder", "greedy").generate(eager, ids, 10).tokens
    eos = int(free[0, 3])  # row 0 stops at step 4; row 1 keeps going unless it meets it too
    for decoder in (registry.build("decoder", "greedy"), registry.build("decoder", "sample", {"seed": 7})):
        a = decoder.generate(eager, ids, 10, eos_id=eos)
        b = decoder.generate(static, ids, 10, eos_id=eos)
        assert torch.equal(a.tokens, b.tokens) and a.counters["target_forwards"] == b.counters["target_forwards"]
    fast = static.fast_decoder()
    bucket = fast.buckets[2]
    decode_loop(static, prompt(batch=2, t=30), 5, argmax_pick, None)  # fits the bucket's capacity: reused
    assert fast.buckets[2] is bucket and bucket.capacity == 1024
    decode_loop(static, prompt(batch=1, t=5), 3, argmax_pick, None)
    assert set(fast.buckets) == {1, 2}


@pytest.mark.parametrize("codec", ["int4", "int2"])
def test_quantized_static_step_equals_the_decode_loop(codec, monkeypatch):
    """A quantized codec's static step (the residual window written in place, a full group quantized on the host
    after the step, the varlen fused decode): the ordinary loop's tokens and logits, past two group flushes, rows of
    one length and rows of different lengths (each row's split point computed on the device). The host tells the
    layers a length only when a window filled (`sync_due`) and at the end, not after every step."""
    from ollm_triton.cache.quant import QuantLayer
    from ollm_triton.engine.batching import generate_ragged

    told = []
    set_length = QuantLayer.set_length
    monkeypatch.setattr(QuantLayer, "set_length", lambda self, n: (told.append(n), set_length(self, n))[1])

    params = {"residual": 16, "group_size": 16}
    eager = engine_for(fast_decode="off", codec=registry.build("cache", codec, params))
    static = engine_for(fast_decode="static", codec=registry.build("cache", codec, params))
    assert str(static.fast_path) == "static"
    ids = prompt(batch=2, t=21)
    ref_logits, got_logits = [], []
    ref = decode_loop(eager, ids, 40, recording_pick(ref_logits), None)
    got = decode_loop(static, ids, 40, recording_pick(got_logits), None)
    assert told == [32, 32, 48, 48, 60, 60]  # 2 layers: windows full at 16 + 16 and 32 + 16 tokens, then the end
    assert torch.equal(ref.tokens, got.tokens)
    for a, b in zip(ref_logits, got_logits, strict=True):
        assert (a - b).abs().max().item() <= 1e-4
    layer = static.fast_decoder().buckets[2].cache.layers[0]
    # the prompt stayed in the window; two groups flushed by steps
    assert layer.n_quant == 32 and layer.length == 21 + 39
    assert static.describe()["decode_attention_path"] == "torch.quant_decode_varlen_reference (static step)"
    prompts = [prompt(batch=1, t=t, seed=t)[0] for t in (5, 33, 18)]
    rows = generate_ragged(static, prompts, 30)
    for p, row in zip(prompts, rows.tokens, strict=True):
        assert torch.equal(row, decode_loop(eager, p[None], 30, argmax_pick, None).tokens[0])


@pytest.mark.interpreter
def test_quantized_static_step_with_the_varlen_kernel_under_the_interpreter():
    """int4's static step with its fused kernels (the varlen quantized decode, its quantized and residual splits)
    through the interpreter: the eager loop's tokens and logits across a window flush (30 + 3 tokens, groups of 16)."""
    params = {"residual": 16, "group_size": 16}
    eager = engine_for(fast_decode="off", codec=registry.build("cache", "int4", params))
    static = engine_for(fast_decode="static", codec=registry.build("cache", "int4", params))
    ids = prompt(batch=1, t=30)
    ref_logits, got_logits = [], []
    ref = decode_loop(eager, ids, 4, recording_pick(ref_logits), None)
    fast = FastDecoder(static, capture=False, use_kernels=True, fuse_weights=True)
    fast.linear = torch.nn.functional.linear  # the GEMV kernels are another test's (and most of the interpreter time)
    got = fast.generate(ids, 4, recording_pick(got_logits))
    assert fast.attention_path == "triton.quant_decode_varlen (static step)"
    assert fast.buckets[1].cache.layers[0].n_quant == 16  # the window filled at 32 tokens and was flushed
    assert torch.equal(ref.tokens, got.tokens)
    for a, b in zip(ref_logits, got_logits, strict=True):
        assert (a - b).abs().max().item() <= 1e-4


@pytest.mark.parametrize("variant,plugins", [
    ("llama", dict(codec="int4")),  # a quantized codec: codes flushed every group, fused decode on a GPU
    ("qwen3", dict(codec="h2o")),  # an eviction codec: observes the step's queries, frees memory
    ("qwen2", dict(attention="sliding_window")),  # a windowed backend
])
def test_piecewise_step_equals_the_decode_loop(variant, plugins):
    """The piecewise step (segments that a GPU captures, each layer's attention eager between them) runs any codec
    and backend; uncaptured on the CPU it must give the ordinary loop's tokens and logits, rows of a batch too."""
    eager = engine_for(variant, fast_decode="off", **plugins)
    pw = engine_for(variant, fast_decode="piecewise", **plugins)
    assert str(pw.fast_path) == "piecewise static" and pw.fast_decoder().piecewise
    ids = prompt(batch=2, t=150)  # past int4's first quantized group (residual 128 + group 128 by default)
    ref_logits, got_logits = [], []
    ref = decode_loop(eager, ids, 140, recording_pick(ref_logits), None)
    got = decode_loop(pw, ids, 140, recording_pick(got_logits), None)
    assert torch.equal(ref.tokens, got.tokens)
    for a, b in zip(ref_logits, got_logits, strict=True):
        assert (a - b).abs().max().item() <= 1e-4
    info = pw.describe()
    assert info["fast_path"] == "piecewise static" and info["fast_path_steps"] == 139
    # a second generation starts from a fresh cache of the codec
    again = decode_loop(pw, ids, 20, argmax_pick, None)
    assert torch.equal(again.tokens, ref.tokens[:, :20])


def test_fast_path_says_why_not():
    cpu_auto = engine_for()
    assert str(cpu_auto.fast_path).startswith("eager (cpu: CUDA graphs need a CUDA device")
    assert cpu_auto.fast_decoder() is None and cpu_auto.describe()["fast_path_steps"] == 0
    cases = {
        "attention 'sliding_window' is not dense causal": dict(attention="sliding_window"),
        "cache 'h2o' declares no static decode step": dict(codec="h2o"),
        "cache 'int4' declares no static decode step": dict(
            codec=registry.build("cache", "int4", {"preallocate": False})),
    }
    for params in ({"dtype": "float16"}, {"preallocate": False}):  # a dense cache the step cannot write in place
        cases[f"cache 'dense' declares no static decode step {params}"] = dict(
            codec=registry.build("cache", "dense", params))
    for reason, plugins in cases.items():
        reason = reason.split(" {")[0]
        engine = engine_for(fast_decode="static", **plugins)
        assert str(engine.fast_path).startswith(f"eager ({reason}") and engine.fast_decoder() is None
        assert capture_blocker(engine).startswith(reason)
    assert str(engine_for(fast_decode="static", attention="flash").fast_path) == "static"
    assert str(engine_for(fast_decode="piecewise", codec="int4").fast_path) == "piecewise static"
    assert str(engine_for(fast_decode="static", codec="int4").fast_path) == "static"
    streamed = engine_for(fast_decode="piecewise", prefetch="on_demand")
    assert str(streamed.fast_path).startswith("eager (prefetch 'on_demand' moves weights")
    assert not streamed.fast_decoder()
    accepted = "accepted: auto, graph, static, piecewise, off"
    with pytest.raises(ValueError, match=f"fast_decode='fastest' is not accepted; {accepted}"):
        engine_for(fast_decode="fastest")
    with pytest.raises(ValueError, match="needs a CUDA engine"):
        FastDecoder(cpu_auto, capture=True)


# ---- GPU ---------------------------------------------------------------------------------------------------------

GPU_MODEL = dict(model_type="llama", vocab_size=4096, hidden_size=512, intermediate_size=1536, num_hidden_layers=4,
                 num_attention_heads=8, num_key_value_heads=2, head_dim=64, max_position_embeddings=8192,
                 rms_norm_eps=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("batch", [1, 3])
def test_gpu_graph_replay_equals_eager_step(batch):
    graph = load_engine(GPU_MODEL, device="cuda", dtype=torch.bfloat16, seed=0)
    static = load_engine(GPU_MODEL, device="cuda", dtype=torch.bfloat16, seed=0, fast_decode="static")
    assert str(graph.fast_path) == "graph" and str(static.fast_path) == "static"
    ids = prompt(batch=batch, t=300).to("cuda") % 4096
    # the static engine runs the same kernels and fused weights, only without capture
    static._fast = FastDecoder(static, capture=False, fuse_weights=True)
    greedy = registry.build("decoder", "greedy")
    a = greedy.generate(graph, ids, 64)
    b = greedy.generate(static, ids, 64)
    assert torch.equal(a.tokens, b.tokens)
    assert a.counters["fast_path_graph"] == 1.0 and a.counters["graph_capture_s"] > 0
    again = greedy.generate(graph, ids, 64)  # replays the captured graph: no second capture
    assert torch.equal(again.tokens, a.tokens) and again.counters["graph_capture_s"] == 0
    info = graph.describe()
    assert info["fast_path"] == "graph" and info["fused_kernels"].startswith("triton")
    assert info["fast_path_matmul"].startswith("triton:gemv") and info["fast_path_fold"] == "norm"
    # next to the unfused eager engine: same logits to bf16 rounding at the first decode step
    eager = load_engine(GPU_MODEL, device="cuda", dtype=torch.bfloat16, seed=0, fast_decode="off")
    ref_logits, got_logits = [], []
    decode_loop(eager, ids, 2, recording_pick(ref_logits), None)
    graph.fast_decoder().generate(ids, 2, recording_pick(got_logits))
    for r, g in zip(ref_logits, got_logits, strict=True):
        assert ((r - g).norm() / r.norm()).item() < 2e-2


@pytest.mark.gpu
@pytest.mark.parametrize("codec", ["int4", "int8"])
def test_gpu_quantized_whole_graph_equals_its_uncaptured_step(codec):
    """A quantized codec's decode step captured whole (the residual write and the varlen fused decode inside the
    graph, a full window quantized on the host between replays): the same tokens as the same step uncaptured, and
    the eager engine's logits to bf16 rounding."""
    graph = load_engine(GPU_MODEL, device="cuda", dtype=torch.bfloat16, seed=0, codec=codec)
    static = load_engine(GPU_MODEL, device="cuda", dtype=torch.bfloat16, seed=0, codec=codec)
    assert str(graph.fast_path) == "graph"
    static._fast = FastDecoder(static, capture=False, fuse_weights=True)
    ids = prompt(batch=3, t=300).to("cuda") % 4096
    greedy = registry.build("decoder", "greedy")
    a = greedy.generate(graph, ids, 300)  # past two window flushes (residual 128 + group 128)
    b = greedy.generate(static, ids, 300)
    assert torch.equal(a.tokens, b.tokens) and a.counters["fast_path_graph"] == 1.0
    assert graph.describe()["decode_attention_path"] == "triton.quant_decode_varlen (static step)"
    eager = load_engine(GPU_MODEL, device="cuda", dtype=torch.bfloat16, seed=0, fast_decode="off", codec=codec)
    ref_logits, got_logits = [], []
    decode_loop(eager, ids, 3, recording_pick(ref_logits), None)
    graph.fast_decoder().generate(ids, 3, recording_pick(got_logits))
    for r, g in zip(ref_logits, got_logits, strict=True):
        assert ((r - g).norm() / r.norm()).item() < 2e-2


@pytest.mark.gpu
def test_gpu_capture_leaves_a_window_one_short_of_full_alone():
    """A 255-token int4 prompt leaves its window one token short of full (residual 128 + group 128): the capture's
    warm-up steps must not write into it (a step at pos + 1 maps to window slot 128, a held token). The captured
    engine then holds exactly the K/V of the same step run uncaptured."""
    graph = load_engine(GPU_MODEL, device="cuda", dtype=torch.bfloat16, seed=0, codec="int4")
    static = load_engine(GPU_MODEL, device="cuda", dtype=torch.bfloat16, seed=0, codec="int4")
    static._fast = FastDecoder(static, capture=False, fuse_weights=True)
    ids = prompt(batch=1, t=255).to("cuda") % 4096
    greedy = registry.build("decoder", "greedy")
    a, b = greedy.generate(graph, ids, 8), greedy.generate(static, ids, 8)
    assert torch.equal(a.tokens, b.tokens) and a.counters["fast_path_graph"] == 1.0
    for got, want in zip(graph.fast_decoder().buckets[1].cache.layers, static.fast_decoder().buckets[1].cache.layers,
                         strict=True):
        assert got.n_quant == want.n_quant == 128
        for x, y in zip(got.dense(), want.dense(), strict=True):
            assert torch.equal(x, y)


@pytest.mark.gpu
@pytest.mark.parametrize("plugins", [dict(codec=("int4", {"preallocate": False})),
                                     dict(attention="sliding_window", codec=("int8", {}))])
def test_gpu_piecewise_graph_equals_its_uncaptured_step(plugins):
    """auto picks the piecewise step for plugins the whole graph cannot hold; replaying its segment graphs (with the
    fused quantized decode between them) gives the same tokens as running the same segments uncaptured."""
    plugins = {**plugins, "codec": registry.build("cache", *plugins["codec"])}
    graph = load_engine(GPU_MODEL, device="cuda", dtype=torch.bfloat16, seed=0, **plugins)
    static = load_engine(GPU_MODEL, device="cuda", dtype=torch.bfloat16, seed=0, **plugins)
    assert str(graph.fast_path).startswith("piecewise graph (")
    static._fast = FastDecoder(static, capture=False, fuse_weights=True, piecewise=True)
    static.fast_path = FastPath("piecewise", captured=False)
    ids = prompt(batch=1, t=300).to("cuda") % 4096
    greedy = registry.build("decoder", "greedy")
    a = greedy.generate(graph, ids, 200)  # past a quantized group flush (residual 128 + group 128)
    b = greedy.generate(static, ids, 200)
    assert torch.equal(a.tokens, b.tokens) and a.counters["fast_path_piecewise"] == 1
    assert a.counters["fast_path_graph"] == 0  # segments, not the whole step as one graph
    # next to the eager engine: the same logits to bf16 rounding at the first decode steps
    eager = load_engine(GPU_MODEL, device="cuda", dtype=torch.bfloat16, seed=0, fast_decode="off", **plugins)
    ref_logits, got_logits = [], []
    decode_loop(eager, ids, 3, recording_pick(ref_logits), None)
    graph.fast_decoder().generate(ids, 3, recording_pick(got_logits))
    for r, g in zip(ref_logits, got_logits, strict=True):
        assert ((r - g).norm() / r.norm()).item() < 2e-2


@pytest.mark.parametrize("v", [128256, 4096, 7, 32000, 1])
def test_argmax_rows_matches_argmax_with_ties(v):
    """The two-pass argmax of the graph step returns torch's index, the first maximum, ties included."""
    from ollm_triton.engine.fast_decode import argmax_rows

    device = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(v)
    for _ in range(10):
        x = torch.randint(0, 4, (3, v), generator=g).to(torch.bfloat16).to(device)  # many ties
        assert torch.equal(argmax_rows(x), x.argmax(-1))
    x = torch.randn(2, v, generator=g).to(device)
    assert torch.equal(argmax_rows(x), x.argmax(-1))


def test_a_third_party_plugin_declares_its_way_onto_the_static_step():
    """The fast path reads declarations, not names: a codec and a backend registered under other names that declare
    `static_buffers` / `dense_causal` get the static step; the same classes without the declaration do not."""
    from ollm_triton.attention.sdpa import SDPA
    from ollm_triton.cache.dense import Dense, DenseConfig

    class MyDense(Dense):
        plugin_name = "my_dense"

    class MyAttention(SDPA):
        plugin_name = "my_attention"

    declared = engine_for(fast_decode="static", codec=MyDense(DenseConfig()), attention=MyAttention())
    assert str(declared.fast_path) == "static"
    ids = prompt(batch=1)
    ref = decode_loop(engine_for(fast_decode="off"), ids, 6, argmax_pick, None)
    assert torch.equal(decode_loop(declared, ids, 6, argmax_pick, None).tokens, ref.tokens)
    MyDense.static_buffers = False
    MyAttention.dense_causal = False
    undeclared = engine_for(fast_decode="static", codec=MyDense(DenseConfig()), attention=MyAttention())
    assert str(undeclared.fast_path) == "eager (attention 'my_attention' is not dense causal: the static step " \
                                        "cannot stand in for its decode)"
    MyAttention.dense_causal = True
    assert capture_blocker(engine_for(codec=MyDense(DenseConfig()), attention=MyAttention())) == \
        "cache 'my_dense' declares no static decode step"
