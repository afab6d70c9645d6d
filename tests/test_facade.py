"""`OptimizedInference` (ollm_triton/facade.py): README's example runs as written; generate is the decoder strategy's
answer, stream and chat agree with it; arguments compose and fail as on the command line."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ollm_triton.registry import PluginError, registry
from ollm_triton.run import RunError

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "ollm_triton" / "assets" / "tiny-llama"
PROMPT = "def fibonacci(n):"


@pytest.fixture(scope="module")
def llm():
    from ollm_triton import OptimizedInference

    with OptimizedInference(device="cpu") as model:
        yield model


def readme_snippet() -> str:
    text = (REPO / "README.md").read_text()
    section = text.split("## From Python", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_example_runs(capsys):
    code = readme_snippet()
    assert "OptimizedInference" in code and len(code.strip().splitlines()) <= 6
    exec(compile(code, "README.md", "exec"), {})
    lines = capsys.readouterr().out.strip().splitlines()
    tok_s, _, kv = lines[-1].split()[0], None, lines[-1].split()[2]
    assert float(tok_s) > 0 and int(kv) > 0
    assert "".join(lines[:-1]).strip(), "no text generated"


def reference_answer(prompt: str, new: int) -> str:
    """The same model and strategy without the facade: load_engine + greedy + the tokenizer."""
    from ollm_triton.engine import load_engine

    engine = load_engine(str(TINY), device="cpu", dtype="auto")
    tok = engine.tokenizer
    out = registry.build("decoder", "greedy").generate(engine, torch.tensor([tok.encode(prompt)]), new,
                                                       eos_id=tok.eos_token_id)
    ids = out.tokens[0].tolist()
    ids = ids[: ids.index(tok.eos_token_id)] if tok.eos_token_id in ids else ids
    return tok.decode(ids, skip_special_tokens=True)


def test_generate_is_the_strategy_and_stream_agrees(llm):
    text = llm.generate(PROMPT, max_new_tokens=12)
    assert text == reference_answer(PROMPT, 12)
    s = llm.stats()
    assert s["path"] == "decoder strategy" and s["new_tokens"] == 12 and s["decode_tok_s"] > 0
    assert s["prompt_tokens"] == len(llm.tokenizer.encode(PROMPT))
    assert s["monitor/gpu"].startswith("unavailable") or s["monitor/gpu"]  # sampled, or why not
    pieces = list(llm.stream(PROMPT, max_new_tokens=12))
    assert len(pieces) > 3 and "".join(pieces) == text  # token by token, the same greedy answer
    assert llm.stats()["path"] == "scheduler (token by token)" and llm.stats()["new_tokens"] == 12
    # a stop string ends the answer before it, in both paths
    stop = text.strip().split()[1]
    cut = llm.generate(PROMPT, max_new_tokens=12, stop=[stop])
    assert cut == text[: text.index(stop)] == "".join(llm.stream(PROMPT, max_new_tokens=12, stop=[stop]))


def test_chat_renders_the_checkpoint_template(llm):
    messages = [{"role": "user", "content": "import os"}]
    template = json.loads((TINY / "tokenizer_config.json").read_text())["chat_template"]
    assert "### " in template  # the embedded template: '### role\ncontent\n' per message, then '### assistant\n'
    assert llm.chat(messages, max_new_tokens=6) == llm.generate("### user\nimport os\n### assistant\n", 6)


def test_memory_report_counts_the_last_cache(llm):
    import gc
    import weakref

    refs, build = [], llm.engine.new_cache

    def new_cache(*args, **kwargs):
        cache = build(*args, **kwargs)
        refs.append(weakref.ref(cache))
        return cache

    llm.engine.new_cache = new_cache
    try:
        llm.generate(PROMPT, max_new_tokens=8)
    finally:
        llm.engine.__dict__.pop("new_cache", None)
    gc.collect()
    assert refs and all(r() is None for r in refs), "the call's cache outlived it (memory_report reads its stats)"
    r = llm.memory_report()
    cfg = json.loads((TINY / "config.json").read_text())
    tokens = llm.stats()["prefilled_tokens"] + 8 - 1  # the last token is returned, never fed back
    per_token = 2 * cfg["num_hidden_layers"] * cfg["num_key_value_heads"] * cfg["head_dim"] * 4  # K and V, fp32
    assert r["kv_tokens_kept"] == tokens and r["kv_bytes"] == tokens * per_token
    assert r["weights_bytes"] == 4 * sum(p.numel() for p in llm.engine.model.parameters())
    assert r["footprint"]["fits"] and r["host_rss_bytes"] > r["weights_bytes"]
    list(llm.stream(PROMPT, max_new_tokens=4))  # the scheduler frees its cache: the codec's declared bytes
    r = llm.memory_report()
    assert r["kv_bytes"] == (llm.stats()["prefilled_tokens"] + 4) * per_token and "declared" in r["kv_bytes_source"]


def test_plugins_model_path_and_profile_compose():
    from ollm_triton.facade import OptimizedInference, compose, plugin_overrides

    with OptimizedInference(str(TINY), cache={"name": "int4", "residual": 16, "group_size": 16},
                            attention={"name": "sliding_window", "window": 64}, device="cpu") as llm:
        assert llm.config["model"]["source"] == str(TINY.resolve())
        assert llm.plugins["cache"]["name"] == "int4" and llm.plugins["cache"]["params"]["residual"] == 16
        assert llm.engine.codec.cfg.residual == 16 and llm.engine.attention.window == 64
        llm.generate(PROMPT * 8, max_new_tokens=4)
        assert llm.memory_report()["kv_tokens_compressed"] > 0  # the codec ran on the facade's cache
    # a profile adds groups: an override of one it added is `group=name`, of one it did not `+group=name`
    assert plugin_overrides("cache", "int8", appended=True) == ["cache=int8"]
    assert plugin_overrides("decoder", {"name": "sample", "temperature": 0.5}, appended=False) == \
        ["+decoder=sample", "decoder.temperature=0.5"]
    cfg = compose(["profile=memory_optimized", *plugin_overrides("cache", "int8", appended=True)])
    assert cfg.cache.name == "int8" and cfg.attention.name == "sliding_window"


def cli_error(argv, capsys, monkeypatch, tmp_path) -> str:
    """The line `python -m ollm_triton.run <argv>` prints, run in this process."""
    import ollm_triton.run as run

    monkeypatch.setattr(sys, "argv", ["ollm_triton.run", *argv, "logger=none", "task=throughput",
                                      f"hydra.run.dir={tmp_path}"])
    with pytest.raises(SystemExit) as e:
        run.main()
    assert e.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1].removeprefix("error: ")


BAD = [
    ({"cache": "int9"}, ["+cache=int9"]),
    ({"attention": {"name": "sliding_window", "window": "wide"}}, ["+attention=sliding_window",
                                                                   "attention.window=wide"]),
    ({"cache": {"name": "int4", "group_size": 0}}, ["+cache=int4", "cache.group_size=0"]),
    ({"model": "tiny_nonexistent"}, ["model=tiny_nonexistent"]),
    ({"overrides": ["+cahce=int4"]}, ["+cahce=int4"]),
]


@pytest.mark.parametrize("kwargs, argv", BAD, ids=[" ".join(a) for _, a in BAD])
def test_bad_arguments_fail_with_the_cli_line(kwargs, argv, capsys, monkeypatch, tmp_path):
    from ollm_triton.facade import OptimizedInference

    expected = cli_error(argv, capsys, monkeypatch, tmp_path)
    with pytest.raises((RunError, PluginError, ValueError)) as e:
        OptimizedInference(**{"device": "cpu", **kwargs})
    assert str(e.value) == expected and "\n" not in expected


def test_bad_call_arguments_are_one_line(llm):
    with pytest.raises(ValueError, match="max_new_tokens must be an integer >= 1"):
        llm.generate(PROMPT, max_new_tokens=0)
    with pytest.raises(ValueError, match=r"each in \[0, "):
        llm.generate([10**9])


def test_importing_the_package_stays_cheap():
    code = "import sys, ollm_triton; print(sorted(m for m in ('torch', 'hydra') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.stdout.strip() == "[]", out.stderr


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_the_gpu_stream_agrees_and_energy_is_measured():
    from ollm_triton import OptimizedInference

    with OptimizedInference(device="cuda") as llm:
        text = llm.generate(PROMPT, max_new_tokens=32)
        s = llm.stats()
        assert "".join(llm.stream(PROMPT, max_new_tokens=32)) == text
        assert s["decode_tok_s"] > 0 and s["new_tokens"] == 32
        if not s["monitor/gpu"].startswith("unavailable"):  # NVML present: every call has its energy
            assert s["monitor/energy_j"] > 0 and s["monitor/tokens_per_j"] == pytest.approx(32 / s["monitor/energy_j"])
        assert llm.memory_report()["device_peak_allocated_bytes"] > llm.memory_report()["weights_bytes"] // 2
