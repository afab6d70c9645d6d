"""The expert-streaming prefetch policy (prefetch/experts.py) on tiny random MoE models, on the CPU.

Against independent references: logits equal the all-resident run (qwen3_moe and qwen3_next, prefill + decode), a
cache smaller than a token's experts still gives them (rounds, evictions), the counters match an LRU simulated here
over the routing a resident run records, the held bytes stay inside the budget, and the memory check admits
Qwen3-Next-80B's shapes within 8 GB and refuses them where they do not fit, in one line. host_dtype=fp8: the logits
equal a resident run whose experts took the same fp8 round trip (kernels/fp8_rows.py), the counters move the
compressed bytes, and the host-memory check admits the full 48-layer Qwen3-Next-80B on a 128 GB host (bf16 refused).
"""

from __future__ import annotations

from collections import Counter, OrderedDict

import pytest
import torch

from ollm_triton.engine import load_engine
from ollm_triton.engine.footprint import DoesNotFit, check_fits
from ollm_triton.engine.moe import Router
from ollm_triton.kernels.fp8_rows import BLOCK, fp8_round_trip
from ollm_triton.registry import PluginError, registry

pytestmark = pytest.mark.usefixtures("one_torch_thread")

QWEN3_MOE = dict(model_type="qwen3_moe", vocab_size=128, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
                 num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_experts=8,
                 num_experts_per_tok=2, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[1],
                 max_position_embeddings=128, rms_norm_eps=1e-5)
QWEN3_NEXT = dict(model_type="qwen3_next", vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, linear_num_key_heads=2,
                  linear_num_value_heads=4, linear_key_head_dim=8, linear_value_head_dim=8, linear_conv_kernel_dim=4,
                  num_experts=6, num_experts_per_tok=2, moe_intermediate_size=16, shared_expert_intermediate_size=16,
                  norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[2], full_attention_interval=2,
                  max_position_embeddings=128, rms_norm_eps=1e-6, partial_rotary_factor=0.25)
# gpt-oss: the transposed interleaved expert layout with biases (four tensors a cache row)
GPT_OSS = dict(model_type="gpt_oss", vocab_size=128, hidden_size=32, intermediate_size=16, num_hidden_layers=2,
               head_dim=8, num_attention_heads=4, num_key_value_heads=2, num_local_experts=6, num_experts_per_tok=2,
               sliding_window=4, layer_types=["sliding_attention", "full_attention"], max_position_embeddings=128,
               rope_parameters={"rope_type": "yarn", "factor": 4.0, "beta_fast": 32.0, "beta_slow": 1.0,
                                "truncate": False, "original_max_position_embeddings": 32, "rope_theta": 10000.0})
MODELS = {"qwen3_moe": QWEN3_MOE, "qwen3_next": QWEN3_NEXT, "gpt_oss": GPT_OSS}
PROMPT = torch.tensor([[3, 17, 9, 64, 2, 101, 40]])
STEPS = 4
GB = 1e9


def experts(**params):
    return registry.build("prefetch", "experts", {"headroom_gb": 0.0, **params})


def round_trip_experts(experts_module):
    """The resident reference of host_dtype=fp8: each expert's parameter, flattened per expert, through fp8 and back
    (kernels/fp8_rows.py, tested against float64 there; the policy pads each parameter of a row alike)."""
    for p in experts_module.parameters():
        back = fp8_round_trip(p.detach().reshape(p.shape[0], -1)).reshape(p.shape)
        assert not torch.equal(back, p)  # the round trip changes the weights (else this reference proves nothing)
        p.data.copy_(back)


def run(cfg, prefetch=None, prompt=PROMPT, steps=STEPS, path="auto", round_trip=False, **kw):
    """Greedy prefill + decode: (logits of every forward, stats). path: the MoE blocks' expert path; round_trip:
    the experts of a resident run through fp8 and back."""
    engine = load_engine(cfg, prefetch=prefetch, **kw)
    for layer in engine.model.model.layers:
        if hasattr(layer.mlp, "experts"):  # a MoE block (an instance attribute: the class default stays "auto")
            layer.mlp.path = path
            if round_trip:
                round_trip_experts(layer.mlp.experts)
    prompt = prompt.to(engine.device)
    cache = engine.new_cache(1, 32)
    outs = [engine.forward(prompt, cache)]
    for _ in range(steps):
        outs.append(engine.forward(outs[-1][:, -1:].argmax(-1), cache))
    stats = engine.prefetch.stats()
    engine.close()
    return outs, stats


@pytest.fixture(scope="module")
def resident():
    return {name: run(cfg)[0] for name, cfg in MODELS.items()}


@pytest.mark.parametrize("model,predict", [("qwen3_moe", "router"), ("qwen3_moe", "none"), ("qwen3_next", "router"),
                                           ("gpt_oss", "router")])
def test_logits_equal_resident(model, predict, resident):
    """A cache holding every expert: prefill and decode bit-identical to the resident run."""
    outs, st = run(MODELS[model], experts(predict=predict))
    for ref, got in zip(resident[model], outs, strict=True):
        assert torch.equal(ref, got)
    assert st["accesses"] == st["hits"] + st["misses"] and st["demand_loads"] > 0
    assert (st["prefetch_issued"] > 0) == (predict == "router")
    assert st["bytes_moved"] == (st["demand_loads"] + st["prefetch_issued"]) * st["expert_bytes"]


@pytest.mark.parametrize("model,slots", [("qwen3_moe", 1), ("qwen3_moe", 3), ("qwen3_next", 1)])
def test_small_cache_evicts_and_stays_right(model, slots, resident):
    """Fewer slots than a token's experts (1 < k = 2) or than a prefill's: rounds of at most `slots` experts."""
    outs, st = run(MODELS[model], experts(max_cached_experts=slots))
    for ref, got in zip(resident[model], outs, strict=True):
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-6)
    assert st["cache_slots"] == slots and st["evictions"] > 0
    moe_layers = 2 if model == "qwen3_moe" else 3
    assert st["rounds"] > moe_layers * (1 + STEPS)  # some step needed more experts than the cache holds


# the bench's proportions at a tiny size (scripts/bench_expert_stream.py on Qwen3-Next-80B shapes: 512 experts, 10 a
# token, ~9 cache rows a layer, 4 MoE layers sharing one cache, router prediction on, a 64-token prompt needing ~11
# rounds a layer): 64 experts, 8 a token, 29 rows for 4 MoE layers, a 24-token prompt
BENCH_LIKE = dict(QWEN3_NEXT, hidden_size=64, num_experts=64, num_experts_per_tok=8, mlp_only_layers=[],
                  full_attention_interval=4)


@pytest.mark.parametrize("host_dtype", ["model", "fp8"])
def test_bf16_prefill_in_rounds_equals_resident(host_dtype):
    """Issue 18: a bf16 prefill needing more experts than the cache holds runs in rounds, and its logits, then a
    teacher-forced decode's, equal the resident run's bit for bit (fp8: the resident run of the round-tripped
    experts). Summing each round's [N, hidden] output instead rounded every partial sum to bf16 (logits 3e-3 apart
    here; 0.45 after 4 layers of the 80B's shapes, where random routers' near-ties flip)."""
    ids = torch.randint(0, BENCH_LIKE["vocab_size"], (1, 32), generator=torch.Generator().manual_seed(0))

    def teacher_forced(prefetch=None):
        engine = load_engine(BENCH_LIKE, prefetch=prefetch, dtype=torch.bfloat16, fast_decode="off")
        if prefetch is None and host_dtype == "fp8":
            for layer in engine.model.model.layers:
                round_trip_experts(layer.mlp.experts)
        cache = engine.new_cache(1, 40)
        outs = [engine.forward(ids[:, :24], cache)] + [engine.forward(ids[:, i:i + 1], cache) for i in range(24, 32)]
        stats = engine.prefetch.stats()
        engine.close()
        return torch.cat(outs, dim=1), stats

    ref, _ = teacher_forced()
    got, st = teacher_forced(experts(max_cached_experts=29, host_dtype=host_dtype, predict="router"))
    assert torch.equal(got, ref)
    assert st["rounds"] > 4 * 9 and st["evictions"] > 0 and st["prefetch_issued"] > 0  # rounds in the prefill


@pytest.mark.interpreter
def test_triton_expert_kernels_on_the_cache():
    """The path a GPU takes (the grouped Triton kernels, here the interpreter) reads the cache's strided [C, ...]
    views by slot id: gpt-oss (biases, interleaved layout), 3 slots so the prefill runs in rounds, bit for bit (a
    kernel row is computed alike whatever the rest of its BLOCK_M tile holds, so rounds keep each pair's value)."""
    ref, _ = run(GPT_OSS, prompt=PROMPT[:, :5], steps=1, path="kernel")
    outs, st = run(GPT_OSS, experts(max_cached_experts=3), prompt=PROMPT[:, :5], steps=1, path="kernel")
    for a, b in zip(ref, outs, strict=True):
        assert torch.equal(a, b)
    assert st["rounds"] > 2 * 2


@pytest.mark.interpreter
def test_streamed_prefill_tiles_as_the_resident_run(monkeypatch):
    """Issue 18: the kernels' BLOCK_M follows the routing (N x k pairs over the model's E), not the call. A 40-token
    prefill over 4 experts, 2 a token, is 80 pairs > 16 x 4: BLOCK_M 64 resident. Streamed through 3 slots it runs
    in rounds of one routing slot at a time, 40 pairs over 3 cache rows (<= 16 x 3), which tiled at 16 when the
    call's shapes chose (a row's value depends on its tile on a GPU). Every streamed call now tiles at 64 and the
    bf16 logits equal the resident run's bit for bit. (The interpreter cannot show the bits move: its bf16 dot
    rounds them away, and its float32 dot (numpy) depends on a row's position in the tile, which rounds change
    anyway; test_cuda_long_prefill_tiles_as_the_resident_run checks the bits on a GPU.)"""
    import ollm_triton.kernels.moe as moe_kernels

    tiles = []
    align = moe_kernels.align_pairs
    monkeypatch.setattr(moe_kernels, "align_pairs", lambda e, n, bm: tiles.append(bm) or align(e, n, bm))
    cfg = dict(QWEN3_MOE, num_experts=4)
    ids = torch.randint(0, cfg["vocab_size"], (1, 40), generator=torch.Generator().manual_seed(1))

    def prefill(prefetch=None):
        engine = load_engine(cfg, prefetch=prefetch, dtype=torch.bfloat16)
        for layer in engine.model.model.layers:
            if hasattr(layer.mlp, "experts"):
                layer.mlp.path = "kernel"
        out = engine.forward(ids, engine.new_cache(1, 48))
        stats = engine.prefetch.stats()
        engine.close()
        return out, stats

    ref, _ = prefill()
    assert tiles == [64, 64]  # two MoE layers, one call each
    got, st = prefill(experts(max_cached_experts=3, predict="none"))
    assert st["rounds"] > 2 and tiles[2:] and set(tiles[2:]) == {64}
    assert torch.equal(got, ref)


def recorded_routing(cfg, prompt, steps):
    """The distinct experts of every MoE layer at every forward of a resident run, recorded at the router."""
    seen = []
    original = Router.forward

    def spy(self, x, linear=torch.nn.functional.linear):
        w, e = original(self, x, linear)
        seen.append(sorted(set(e.reshape(-1).tolist())))
        return w, e

    Router.forward = spy
    try:
        run(cfg, prompt=prompt, steps=steps)
    finally:
        Router.forward = original
    return seen


def simulate(routing, moe_layers, slots, eviction):
    """(hits, misses) of a cache of `slots` rows over `routing`: LRU, or LFU by routed count (ties: least recent)."""
    rows, routed, hits, misses = OrderedDict(), Counter(), 0, 0
    for i, needed in enumerate(routing):
        layer = moe_layers[i % len(moe_layers)]
        routed.update((layer, e) for e in needed)
        for e in needed:
            if (layer, e) in rows:
                if eviction != "fifo":  # the control: no refresh on a hit
                    rows.move_to_end((layer, e))
                hits += 1
        for e in needed:
            if (layer, e) not in rows:
                if len(rows) == slots:
                    others = [k for k in rows if not (k[0] == layer and k[1] in needed)]
                    victim = min(others, key=lambda k: routed[k]) if eviction == "lfu" else others[0]
                    del rows[victim]
                rows[(layer, e)] = True
                misses += 1
    return hits, misses


@pytest.mark.parametrize("eviction", ["lru", "lfu"])
def test_counters_match_a_simulated_cache(eviction):
    """predict=none, 6 slots, batch-1 decode (2 experts a layer): hits, loads and bytes equal the cache simulated
    here over the routing a resident run records; an expert row is its three projections' bytes."""
    prompt, steps, slots = PROMPT[:, :1], 10, 6
    routing = recorded_routing(QWEN3_MOE, prompt, steps)
    hits, misses = simulate(routing, [0, 2], slots, eviction)
    # the two rules and first-in-first-out part ways on this routing (16, 17, 15 hits), so the test tells them apart
    assert len({simulate(routing, [0, 2], slots, rule) for rule in ("lru", "lfu", "fifo")}) == 3
    _, st = run(QWEN3_MOE, experts(predict="none", max_cached_experts=slots, eviction=eviction), prompt=prompt,
                steps=steps)
    h, m = QWEN3_MOE["hidden_size"], QWEN3_MOE["moe_intermediate_size"]
    assert st["expert_bytes"] == 3 * h * m * 4  # gate, up, down in float32 (both multiples of the row alignment)
    assert (st["cache_hits"], st["demand_loads"], st["prefetch_issued"]) == (hits, misses, 0)
    assert st["hit_rate"] == pytest.approx(hits / (hits + misses))
    assert st["bytes_moved"] == misses * st["expert_bytes"]
    assert st["tokens"] == 1 + steps and st["bytes_per_token"] == pytest.approx(st["bytes_moved"] / (1 + steps))


def test_same_token_twice_hits_every_expert():
    """The same token at the same position routes identically: the second forward moves nothing."""
    engine = load_engine(QWEN3_MOE, prefetch=experts(predict="none"))
    token = PROMPT[:, :1]
    engine.forward(token, engine.new_cache(1, 4))
    first = engine.prefetch.stats()
    engine.forward(token, engine.new_cache(1, 4))
    second = engine.prefetch.stats()
    engine.close()
    assert first["cache_hits"] == 0 and first["demand_loads"] == first["accesses"] == 2 * 2  # 2 MoE layers x k
    assert second["cache_hits"] - first["cache_hits"] == first["accesses"]
    assert second["bytes_moved"] == first["bytes_moved"]


def test_budget_is_respected():
    """budget_gb sized for the dense part + 3.5 experts holds 3 slots; the held bytes never exceed the budget, and
    a budget below the dense part refuses in one line."""
    probe = load_engine(QWEN3_MOE)
    moe_ids = {id(p) for layer in probe.model.model.layers if hasattr(layer.mlp, "experts")
               for p in layer.mlp.experts.parameters()}
    dense = sum(p.numel() * 4 for p in probe.model.parameters() if id(p) not in moe_ids)  # tied: none
    probe.close()
    row = 3 * QWEN3_MOE["hidden_size"] * QWEN3_MOE["moe_intermediate_size"] * 4
    budget = dense + 3.5 * row
    engine = load_engine(QWEN3_MOE, prefetch=experts(budget_gb=budget / GB))
    st = engine.prefetch.stats()
    assert st["dense_bytes"] == dense and st["cache_slots"] == 3
    assert engine.prefetch.cache.numel() * 4 == 3 * row
    assert st["device_weight_bytes"] == dense + 3 * row <= budget
    cache = engine.new_cache(1, 32)
    engine.forward(PROMPT, cache)
    assert engine.prefetch.stats()["device_weight_bytes"] <= budget and engine.prefetch.stats()["rounds"] > 2
    engine.close()
    with pytest.raises(PluginError, match=r"^prefetch experts: budget_gb=.* leaves no room for one .* MB expert "
                                          r"after the .* GB dense part.*raise budget_gb$"):
        load_engine(QWEN3_MOE, prefetch=experts(budget_gb=(dense + 0.5 * row) / GB))


QWEN3_NEXT_80B = dict(QWEN3_NEXT, vocab_size=151936, hidden_size=2048, intermediate_size=5120, num_hidden_layers=48,
                      num_attention_heads=16, num_key_value_heads=2, head_dim=256, linear_num_key_heads=16,
                      linear_num_value_heads=32, linear_key_head_dim=128, linear_value_head_dim=128, num_experts=512,
                      num_experts_per_tok=10, moe_intermediate_size=512, shared_expert_intermediate_size=512,
                      mlp_only_layers=[], full_attention_interval=4, max_position_embeddings=262144)


def fits(prefetch, free_device_gb, arch=QWEN3_NEXT_80B):
    dense = registry.build("cache", "dense")
    return check_fits(arch, dtype="bfloat16", device="cuda", batch=1, context=4096, codec=dense,
                      prefetch=prefetch, free=(int(free_device_gb * GB), int(1000 * GB)))


def test_memory_check_counts_the_budget_not_the_model():
    """qwen3_next_80b (~160 GB bf16) with budget_gb=8: ~7.5 GB of weights on the device, admitted on a GPU with
    room for it, refused on one without; a budget under its ~4.8 GB dense part refuses before anything is built."""
    est = fits(registry.build("prefetch", "experts", {"budget_gb": 8.0}), 80)
    assert est["weights_bytes"] > 150 * GB and est["device_weights_bytes"] == pytest.approx(7.5 * GB)
    with pytest.raises(DoesNotFit, match="does not fit"):
        fits(registry.build("prefetch", "experts", {"budget_gb": 8.0}), 7)
    with pytest.raises(PluginError, match=r"leaves no room for any expert after the 4\.\d+ GB dense part"):
        fits(registry.build("prefetch", "experts", {"budget_gb": 4.0}), 80)
    resident = fits(registry.build("prefetch", "resident"), 1000)
    assert resident["device_weights_bytes"] == resident["weights_bytes"]


def test_default_predicts_nothing():
    """`+prefetch=experts` without a predict: none (the H100 table in experiments/prefetch/README.md: the router's
    guess moved 1.5x the bytes for 10% fewer tok/s on random weights)."""
    assert experts().cfg.predict == "none"


def test_bad_input_refused():
    dense = dict(QWEN3_MOE, model_type="qwen3")
    with pytest.raises(PluginError, match=r"^prefetch experts: model qwen3 has no mixture-of-experts layers.*"
                                          r"\+prefetch=lookahead"):
        load_engine(dense, prefetch=experts())
    engine = load_engine(QWEN3_MOE, prefetch=experts())
    with pytest.raises(RuntimeError, match="ran outside before_layer/after_layer"):  # no hooks: no layer index
        engine.model.step(PROMPT, lambda i, q, k, v, **kw: q.transpose(1, 2))
    engine.close()
    for params, field in [({"predict": "stats"}, "predict must be one of router, none"),
                          ({"budget_gb": 0.0}, "budget_gb must be > 0"),
                          ({"max_cached_experts": -1}, "max_cached_experts must be >= 0"),
                          ({"prefetch_per_token": -2}, "prefetch_per_token must be >= 0"),
                          ({"eviction": "fifo"}, "eviction must be one of lru, lfu"),
                          ({"host_dtype": "int4"}, "host_dtype must be one of model, fp8, got 'int4'"),
                          ({"tier": "disk"}, "unknown parameter 'tier'")]:
        with pytest.raises(PluginError, match=field):
            registry.build("prefetch", "experts", params)


# Qwen3-30B-A3B's expert shape (hidden 2048, 768 wide: 9.4 MB a row in bf16), 32 experts, 3 MoE layers: copies take
# tens of microseconds, so the side stream's ordering (a copy after the compute reading the slot, the compute after
# its copies) is what keeps the logits right
GPU_MOE = dict(QWEN3_MOE, vocab_size=512, hidden_size=2048, intermediate_size=2048, moe_intermediate_size=768,
               num_attention_heads=16, num_key_value_heads=4, head_dim=128, num_experts=32, num_experts_per_tok=4,
               mlp_only_layers=[], num_hidden_layers=3)


@pytest.mark.gpu
@pytest.mark.parametrize("predict", ["router", "none"])
def test_cuda_side_stream_bf16_equals_resident(predict):
    """bf16 on CUDA through the Triton expert kernels: decode steps (one round each: 4 experts, 6 slots) equal the
    resident run bit for bit while rows are evicted and refilled under the compute; the pinned host rows, the
    stall clock and the held bytes are what they claim."""
    def go(prefetch):
        engine = load_engine(GPU_MOE, prefetch=prefetch, device="cuda", dtype=torch.bfloat16)
        cache = engine.new_cache(1, 64)
        outs = [engine.forward(PROMPT[:, :1].cuda(), cache)]
        for _ in range(12):
            outs.append(engine.forward(outs[-1][:, -1:].argmax(-1), cache))
        torch.cuda.synchronize()
        return engine, outs

    ref_engine, ref = go(None)
    ref_engine.close()
    engine, outs = go(experts(max_cached_experts=6, predict=predict))
    policy = engine.prefetch
    st = policy.stats()
    assert policy.host_pinned()
    for a, b in zip(ref, outs, strict=True):
        assert torch.equal(a, b)
    assert st["evictions"] > 0 and st["rounds"] == 3 * 13 and st["stall_s"] >= 0.0
    assert (st["prefetch_issued"] > 0) == (predict == "router")
    assert st["bytes_moved"] == (st["demand_loads"] + st["prefetch_issued"]) * st["expert_bytes"]
    assert policy.cache.numel() * 2 == 6 * st["expert_bytes"]
    engine.close()


@pytest.mark.gpu
@pytest.mark.parametrize("host_dtype", ["model", "fp8"])
def test_cuda_bf16_prefill_in_rounds_equals_resident(host_dtype):
    """Issue 18 on the path the bench takes: a 7-token bf16 prefill over 32 experts with 6 cache slots (rounds in
    every layer, copies on the side stream) and 4 decode steps, through the Triton expert kernels, equal the resident
    run (fp8: its round-tripped experts) bit for bit."""
    ref, _ = run(GPU_MOE, round_trip=host_dtype == "fp8", device="cuda", dtype=torch.bfloat16)
    outs, st = run(GPU_MOE, experts(max_cached_experts=6, host_dtype=host_dtype), device="cuda",
                   dtype=torch.bfloat16)
    for a, b in zip(ref, outs, strict=True):
        assert torch.equal(a, b)
    assert st["rounds"] > 3 * (1 + STEPS) and st["evictions"] > 0


def check_batched_copy(cfg, host_dtype, device, dtype):
    """Several misses of one layer brought in as one batch, their slots out of order (not the experts' order, not
    consecutive), into a cache that is NaN until loaded: each slot then holds its expert's weights exactly as the
    resident model has them (fp8: their round trip), the slots outside the batch stay NaN. Returns the policy's
    stats."""
    ref = load_engine(cfg, device=device, dtype=dtype)
    engine = load_engine(cfg, prefetch=experts(host_dtype=host_dtype, predict="none"), device=device, dtype=dtype)
    policy = engine.prefetch
    layer = policy.moe_layers[-1]
    rows = [(5, 6), (1, 0), (2, 3), (3, 4), (4, 5), (0, 9)]  # (expert, slot): experts 2-5 into slots 3-6
    policy.forget()  # every slot free, NaN
    policy._free = [s for s in policy._free if s not in {slot for _, slot in rows}]
    policy._copy(layer, rows)
    if policy.cuda:
        torch.cuda.synchronize()
    got, want = policy.blocks[layer].experts, ref.model.model.layers[layer].mlp.experts
    for name in policy.entries:
        w = want._parameters[name].detach()
        if host_dtype == "fp8":
            w = fp8_round_trip(w.reshape(w.shape[0], -1)).reshape(w.shape)
        c = got._parameters[name]
        for e, slot in rows:
            assert torch.equal(c[slot], w[e]), (name, e, slot)
        untouched = [s for s in range(policy.num_slots) if s not in {slot for _, slot in rows}]
        assert c[untouched].isnan().all()
    st = policy.stats()
    engine.close()
    assert st["demand_loads"] == 0 and st["bytes_moved"] == len(rows) * st["expert_bytes"]
    assert st["copy_batches"] == 1
    return st


@pytest.mark.parametrize("host_dtype", ["model", "fp8"])
def test_a_layers_misses_move_as_one_batch(host_dtype):
    check_batched_copy(dict(QWEN3_MOE, num_experts=12), host_dtype, "cpu", torch.float32)


@pytest.mark.gpu
@pytest.mark.parametrize("host_dtype", ["model", "fp8"])
def test_cuda_a_layers_misses_move_as_one_batch(host_dtype):
    """On the copy stream: bf16 rows go straight into their slots, one copy per run consecutive on the host and in
    the cache (experts 2-5 into slots 3-6: 3 copies for 6 rows); fp8 through the staging buffer of k = 4 rows,
    two chunks (one copy per host run in each: experts 0-3, then 4-5), each dequantized by one launch."""
    st = check_batched_copy(dict(GPU_MOE, num_experts=12), host_dtype, "cuda", torch.bfloat16)
    assert st["memcpys"] == (3 if host_dtype == "model" else 2)
    assert st["copy_s"] > 0 and (st["dequant_s"] > 0) == (host_dtype == "fp8")


@pytest.mark.gpu
def test_cuda_long_prefill_tiles_as_the_resident_run():
    """Issue 18 on a GPU: a 136-token bf16 prefill over 32 experts, 4 a token (544 pairs > 16 x 32: BLOCK_M 64),
    streamed through 10 slots in rounds of 136 pairs over 10 rows (which tiled at 16 before), through the Triton
    kernels: the logits and a teacher-forced decode equal the resident run bit for bit."""
    ids = torch.randint(0, GPU_MOE["vocab_size"], (1, 140), generator=torch.Generator().manual_seed(2)).cuda()

    def go(prefetch=None):
        engine = load_engine(GPU_MOE, prefetch=prefetch, device="cuda", dtype=torch.bfloat16)
        cache = engine.new_cache(1, 160)
        outs = [engine.forward(ids[:, :136], cache)] + [engine.forward(ids[:, i:i + 1], cache) for i in range(136, 140)]
        stats = engine.prefetch.stats()
        engine.close()
        return torch.cat(outs, dim=1), stats

    ref, _ = go()
    got, st = go(experts(max_cached_experts=10, predict="none"))
    assert st["rounds"] > 3 * 5
    assert torch.equal(got, ref)


def rel_rms(ref: torch.Tensor, out: torch.Tensor) -> float:
    ref, out = ref.double(), out.double()
    return ((ref - out).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt()).item()


@pytest.mark.parametrize("model,slots", [("qwen3_moe", 0), ("qwen3_next", 0), ("gpt_oss", 0), ("qwen3_moe", 3)])
def test_fp8_host_rows_equal_the_round_tripped_resident_run(model, slots, resident):
    """host_dtype=fp8: every forward equals a resident run whose experts took the fp8 round trip (bit for bit with
    a cache holding every expert; rounds sum in another order: 1e-6); the rows hold and move codes + scales, a
    quarter of float32's bytes; the error against the unchanged resident run is small and nonzero."""
    policy = experts(host_dtype="fp8", max_cached_experts=slots)
    outs, st = run(MODELS[model], policy)
    ref, _ = run(MODELS[model], round_trip=True)
    for a, b in zip(ref, outs, strict=True):
        if slots:
            torch.testing.assert_close(b, a, rtol=0, atol=1e-6)
        else:
            assert torch.equal(a, b)
    row = st["expert_cache_bytes"] / 4  # elements a row (float32 model)
    assert row % BLOCK == 0 and st["expert_bytes"] == row + row / BLOCK * 4  # codes, then a float32 scale per 128
    assert st["bytes_moved"] == (st["demand_loads"] + st["prefetch_issued"]) * st["expert_bytes"] > 0
    last = torch.cat([o[:, -1] for o in outs])
    err = rel_rms(torch.cat([o[:, -1] for o in resident[model]]), last)
    assert 0 < err < 0.05  # tiny random models: ~0.1% (qwen3_moe, qwen3_next), ~2% (gpt_oss)


def test_experts_are_stored_as_they_load():
    """load_engine hands each parameter to keep_weight as it is drawn: the routed experts go into the host rows at
    once and the model keeps a storage-free placeholder (so an 80B model never sits on the host in bf16); every
    other parameter goes to the compute device."""
    policy = experts(host_dtype="fp8")
    kept = {}
    original = policy.keep_weight

    def spy(model, name, value, device):
        out = original(model, name, value, device)
        kept[name] = (out.device.type, len(policy.host))
        return out

    policy.keep_weight = spy
    engine = load_engine(QWEN3_NEXT, prefetch=policy)
    routed = {n for n in kept if ".mlp.experts." in n}
    assert len(routed) == 3 * 2 and all(kept[n][0] == "meta" for n in routed)  # 3 MoE layers x (gate_up, down)
    assert all(kept[n][0] == "cpu" for n in kept if n not in routed)
    assert [kept[n][1] for n in sorted(routed)][::2] == [1, 2, 3]  # a layer's rows exist once its first expert came
    host = sum(h.numel() for h in policy.host.values())
    assert host == 3 * QWEN3_NEXT["num_experts"] * policy.host_row_bytes
    assert all(p.device.type == "cpu" for p in engine.model.parameters())  # the cache views replaced the placeholders
    engine.close()


def test_memory_check_admits_the_fp8_80b_on_a_128_gb_host():
    """Qwen3-Next-80B's 48 layers: 77.3 B routed expert weights. As bf16 on the host, 154.6 GB: refused on a 128 GB
    host; as fp8, 77.3 GB of codes + 1.2 GB of bf16 scales (the dense part goes to the device): admitted."""
    dense = registry.build("cache", "dense")
    experts_params = 48 * 512 * 3 * 2048 * 512

    def host_check(host_dtype):
        policy = registry.build("prefetch", "experts", {"budget_gb": 8.0, "host_dtype": host_dtype})
        return check_fits(QWEN3_NEXT_80B, dtype="bfloat16", device="cuda", batch=1, context=4096, codec=dense,
                          prefetch=policy, free=(80 * GB, 128 * GB))

    est = host_check("fp8")
    assert est["host_weights_bytes"] == pytest.approx(experts_params * (1 + 2 / BLOCK))
    assert est["host_weights_bytes"] < 80 * GB and est["device_weights_bytes"] == pytest.approx(7.5 * GB)
    with pytest.raises(DoesNotFit, match=r"need 154\.6 GB of host memory \(the weights a streaming policy keeps "
                                         r"there\) \(weights 154\.6\d GB as the prefetch policy stores them\)"):
        host_check("model")


@pytest.mark.gpu
@pytest.mark.parametrize("predict", ["router", "none"])
def test_cuda_fp8_rows_equal_the_round_tripped_resident(predict):
    """bf16 on CUDA: codes copied on the side stream into one staging row and dequantized by the Triton kernel into
    the slot; decode steps with evictions equal the round-tripped resident run bit for bit, and a miss moves
    P + P/64 bytes, not 2P."""
    def go(prefetch, round_trip=False):
        return run(GPU_MOE, prefetch, prompt=PROMPT[:, :1], steps=12, round_trip=round_trip, device="cuda",
                   dtype=torch.bfloat16)

    ref, _ = go(None, round_trip=True)
    outs, st = go(experts(max_cached_experts=6, predict=predict, host_dtype="fp8"))
    for a, b in zip(ref, outs, strict=True):
        assert torch.equal(a, b)
    assert st["evictions"] > 0 and st["expert_bytes"] == st["expert_cache_bytes"] / 2 * (1 + 2 / BLOCK)
    assert st["bytes_moved"] == (st["demand_loads"] + st["prefetch_issued"]) * st["expert_bytes"]
