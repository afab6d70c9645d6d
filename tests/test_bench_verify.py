"""The speculative verify block reads each weight once (one matmul of T rows per weight matrix, not T passes), its
logits equal T single-token steps' in float32, and scripts/bench_verify.py's modelled speed-up is the standard
formula; plus a CPU smoke run of the script."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ollm_triton.decoding.static_steps import StaticModel
from ollm_triton.engine import load_engine
from ollm_triton.engine.fast_decode import fuse_projections

REPO = Path(__file__).resolve().parents[1]
ARCH = dict(model_type="llama", vocab_size=97, hidden_size=48, intermediate_size=80, num_hidden_layers=3,
            num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_verify", REPO / "scripts" / "bench_verify.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def weight_matrices(model) -> dict[int, str]:
    """data_ptr -> name of every matrix a step must multiply by (fused q/k/v and gate/up when present); the
    embedding table is only indexed, so it counts only as the (tied) LM head."""
    out = {}
    for i, layer in enumerate(model.model.layers):
        attn, mlp = layer.self_attn, layer.mlp
        qkv = [("qkv", attn.qkv_weight)] if attn.qkv_weight is not None else [
            (n, getattr(attn, f"{n}_proj").weight) for n in "qkv"]
        gate_up = [("gate_up", mlp.gate_up_weight)] if mlp.gate_up_weight is not None else [
            ("gate", mlp.gate_proj.weight), ("up", mlp.up_proj.weight)]
        for name, w in [*qkv, ("o", attn.o_proj.weight), *gate_up, ("down", mlp.down_proj.weight)]:
            out[w.data_ptr()] = f"layer {i} {name}"
    out[model.lm_head.weight.data_ptr()] = "lm_head"
    return out


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("t", [1, 5])
def test_verify_block_reads_each_weight_once(t, fused):
    engine = load_engine(ARCH, seed=0, fast_decode="static")
    if fused:
        fuse_projections(engine.model)
    sm = StaticModel(engine, batch=1, max_len=40, capture=False)
    calls = []

    def counting(x, w, b=None):
        calls.append((w.data_ptr(), x.shape[:-1].numel()))
        return F.linear(x, w, b)

    sm.linear = counting
    sm.prefill(torch.randint(0, ARCH["vocab_size"], (1, 11)))
    st = sm.step(t)
    st.base.fill_(11)
    sm.run(st)
    expected = weight_matrices(engine.model)
    assert sorted(p for p, _ in calls) == sorted(expected), "each weight matrix in exactly one matmul"
    assert {rows for _, rows in calls} == {t}, "every matmul takes the block's T rows at once"


def test_block_logits_equal_single_steps_fp32(bench):
    """bench_verify's check on odd shapes (context 13, T = 7), float32: block = T static single steps = T of
    greedy's decode steps, to float32 rounding; a block whose mask hid its own earlier tokens would differ."""
    engine = load_engine(ARCH, seed=0, fast_decode="static")
    steps = bench.Steps(engine, context=13, max_block=7, replays=7)
    r = bench.block_check(steps, 7)
    assert r["rel_l2_vs_static_singles"] < 1e-5 and r["rel_l2_vs_greedy_steps"] < 1e-5, r
    assert r["argmax_agree_vs_static_singles"] == 1.0 and r["argmax_agree_vs_greedy_steps"] == 1.0
    st = steps.sm.step(7)  # break the block on purpose: a diagonal-only mask must be caught
    with torch.inference_mode():
        st.mask.copy_(torch.eye(7, dtype=torch.bool))
    broken = bench.block_check(steps, 7)
    assert broken["rel_l2_vs_static_singles"] > 1e-3, broken


def test_modelled_speedup_is_the_standard_formula(bench):
    # a = 0.5, k = 3: 1 + 0.5 + 0.25 + 0.125 tokens per verification, against 3 drafts at 0.1 and a verify of 1.2
    r = bench.modelled(0.5, 3, 0.1, 1.2)
    assert r["expected_tokens"] == pytest.approx(1.875)
    assert r["speedup"] == pytest.approx(1.875 / 1.5)
    assert r["speedup_if_verify_cost_one_step"] == pytest.approx(1.875 / 1.3)
    assert bench.modelled(1.0, 4, 0.0, 1.0)["speedup"] == pytest.approx(5.0)  # every draft accepted, free drafts


def test_bench_verify_small_runs_every_section(bench, tmp_path):
    out = tmp_path / "verify.json"
    bench.main(["--small", "--contexts", "9", "--tokens", "1", "--max-k", "1", "--replays", "1", "--repeats", "1",
                "--new-tokens", "4", "--prompt-tokens", "16", "--lookup-new", "4", "--out", str(out)])
    record = json.loads(out.read_text())
    for key in ("command", "date", "device_name", "torch", "triton", "git_sha", "formula"):
        assert record[key], key
    sections = record["sections"]
    failed = {k: v.get("error") or v.get("skipped") for k, v in sections.items() if "error" in v or "skipped" in v}
    assert not failed, failed
    assert set(sections) == {"bandwidth", "verify", "check_fp32", "draft", "acceptance", "model", "lookup"}
    assert set(sections["verify"]["9"]["blocks"]) == {"1", "2"}  # T = k + 1 for k = 1 is always measured
    assert sections["check_fp32"]["rel_l2_vs_static_singles"] < 1e-5
    assert sections["acceptance"]["label"] == "measured, embedded pair" and 0 <= sections["acceptance"]["a"] <= 1
    assert sections["lookup"]["equals_greedy"]
    assert record["table"][-1].startswith("| best at assumed a")
