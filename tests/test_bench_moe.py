"""scripts/bench_moe.py's transformers section on the CPU (--small: the presets' tiny stand-ins in float32): the
engine's runner path and transformers' own GptOssForCausalLM / Qwen3MoeForCausalLM run on the very same tensors, and
their first-step logits agree with the eager engine's to float32 rounding, so a row of the GPU table compares one
model computed two ways. The static cache + torch.compile subprocess is left out (its compile alone takes ~25 s
here; run by hand: `python scripts/bench_moe.py --small --transformers --no-experts --no-step`)."""

import importlib.util
import types
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_torch_thread")

REPO = Path(__file__).resolve().parents[1]
MODELS = ["qwen3_moe_30b", "gpt_oss_20b"]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_moe", REPO / "scripts" / "bench_moe.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def rows(bench, tmp_path_factory):
    args = types.SimpleNamespace(small=True, model=MODELS, prompt=512, new=64, repeats=2, layers=0, no_compile=True,
                                 out=str(tmp_path_factory.mktemp("bench_moe") / "bench_moe.json"))
    return bench.hf_rows(args)


def test_engine_and_transformers_rows_for_each_model(rows):
    assert [(r["model"], r["path"].split(":")[0].split(" ")[0]) for r in rows] == [
        (m, p) for m in MODELS for p in ("engine", "transformers")]
    for r in rows:
        assert "failed" not in r.get("note", ""), r
        assert r["tok_s"] > 0 and r["ms"] == pytest.approx(1e3 / r["tok_s"])
        assert (r["prompt"], r["new_tokens"], r["layers"]) == (24, 6, 2)


def test_transformers_and_engine_logits_agree_on_the_shared_weights(rows):
    """transformers' prefill and first decode step (fed the engine's token) against the eager engine: float32
    rounding only (a wrong weight, layout, norm or rotary would be ~1e-2 or more)."""
    for r in rows:
        assert r["step_rel_l2"] < 1e-5, r
        if r["path"].startswith("transformers"):
            assert r["prefill_rel_l2"] < 1e-5, r
            assert "experts" in r["note"] and "attention" in r["note"]


def test_table_names_both_paths_and_the_speed_ratio(bench, rows):
    payload = {"hf_rows": rows, "small": True}
    text = "\n".join(bench.hf_table(payload, "head"))
    for model in MODELS:
        lines = [line for line in text.splitlines() if line.startswith(f"| {model} |")]
        assert len(lines) == 2 and "| 1.00 |" in lines[0]  # the engine against itself
        engine, hf = (next(r["tok_s"] for r in rows if r["model"] == model and r["path"].startswith(p))
                      for p in ("engine", "transformers"))
        assert f"| {engine / hf:.2f} |" in lines[1]
