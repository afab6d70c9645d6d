"""The plugin registry: validation messages, unknown names, listing, third-party entry points."""

import os
import subprocess
import sys
import textwrap
from dataclasses import dataclass

import pytest

from ollm_triton.registry import PluginError, Registry, registry


@dataclass
class WindowConfig:
    window: int = 4096
    sink: int = 4
    scale: float = 1.0
    pattern: str = "local"
    scales: list[int] | None = None

    def check(self):
        if self.window < 1:
            raise ValueError(f"window must be >= 1, got {self.window}")


def make_registry():
    reg = Registry()
    reg._loaded = True  # no built-ins: a registry of exactly what the test registers

    @reg.register("attention", "toy", WindowConfig)
    class Toy:
        """A toy backend."""

        def __init__(self, cfg):
            self.cfg = cfg

    return reg


def test_build_validates_and_converts():
    reg = make_registry()
    obj = reg.build("attention", "toy", {"window": 128, "scale": 2, "scales": [2, 4]})
    assert obj.cfg.window == 128 and obj.cfg.scale == 2.0 and isinstance(obj.cfg.scale, float)
    assert obj.cfg.scales == [2, 4]


@pytest.mark.parametrize(
    "params, words",
    [
        ({"window": "big"}, ["attention 'toy'", "'window'", "expects int", "'big'"]),
        ({"window": 1.5}, ["'window'", "expects int"]),
        ({"window": True}, ["'window'", "expects int"]),
        ({"scales": [1, "x"]}, ["'scales'", "list[int] | None"]),
        ({"windw": 3}, ["unknown parameter 'windw'", "accepted: window, sink, scale, pattern, scales"]),
        ({"window": 0}, ["attention 'toy'", "window must be >= 1"]),
    ],
)
def test_bad_parameter_names_plugin_field_and_type(params, words):
    reg = make_registry()
    with pytest.raises(PluginError) as e:
        reg.build("attention", "toy", params)
    for w in words:
        assert w in str(e.value)
    assert "\n" not in str(e.value)


def test_unknown_name_lists_registered():
    reg = make_registry()
    with pytest.raises(PluginError, match=r"unknown attention plugin 'nope'; registered: toy"):
        reg.get("attention", "nope")
    with pytest.raises(PluginError, match="unknown plugin kind"):
        reg.get("attn", "toy")


def test_builtin_baselines_registered():
    assert "sdpa" in registry.names("attention")
    assert "dense" in registry.names("cache")
    assert {"greedy", "sample"} <= set(registry.names("decoder"))
    assert "resident" in registry.names("prefetch")
    assert {"perplexity", "throughput", "memory"} <= set(registry.names("task"))


def _install_fake_distribution(root):
    """A distribution on sys.path with an `ollm_triton.plugins` entry point, as pip would leave it."""
    (root / "toy_ollm_plugin.py").write_text(
        textwrap.dedent('''
        from dataclasses import dataclass
        from ollm_triton.registry import register
        from ollm_triton.cache.dense import Dense

        @dataclass
        class ToyConfig:
            level: int = 3

        @register("cache", "toy_thirdparty", ToyConfig)
        class ToyCodec(Dense):
            """A third-party codec added through an entry point."""
            def __init__(self, cfg):
                from ollm_triton.cache.dense import DenseConfig
                super().__init__(DenseConfig())
                self.level = cfg.level
    ''')
    )
    dist = root / "toy_ollm_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: toy-ollm-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[ollm_triton.plugins]\ntoy = toy_ollm_plugin\n")


def test_entry_point_plugin(tmp_path, monkeypatch):
    _install_fake_distribution(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    registry.load()
    # the toy plugin lands in the global registry; undo that after the test, so later tests see the built-in set
    monkeypatch.setitem(registry._plugins, "cache", dict(registry._plugins["cache"]))
    reg = Registry()
    reg.load()
    # the module registers into the global registry (that is what third-party code imports); the entry point
    # must have been imported by load()
    assert "toy_ollm_plugin" in sys.modules
    assert registry.get("cache", "toy_thirdparty").description.startswith("A third-party codec")
    codec = registry.build("cache", "toy_thirdparty", {"level": 5})
    assert codec.level == 5


def test_plugins_listing_command_shows_third_party(tmp_path):
    _install_fake_distribution(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    out = subprocess.run(
        [sys.executable, "-m", "ollm_triton.plugins"], capture_output=True, text=True, env=env, timeout=120
    )
    assert out.returncode == 0, out.stderr
    for word in (
        "attention:",
        "sdpa",
        "cache:",
        "dense",
        "toy_thirdparty",
        "level: int = 3",
        "decoder:",
        "greedy",
        "task:",
    ):
        assert word in out.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "ollm_triton.plugins", "codecs"], capture_output=True, text=True, timeout=120
    )
    assert bad.returncode == 2 and "unknown plugin kind 'codecs'" in bad.stderr


@dataclass
class _DocumentedBase:
    store: str = "device"  # where it lives


@dataclass
class _Documented(_DocumentedBase):
    window: int = 64  # keys visible behind a query
    # Tokens per step. A longer explanation follows here
    # and goes on.
    chunk: int = 0
    plain: int = 1
    wrapped: float = 0.5  # first part,
    #                      second part


def test_field_descriptions_come_from_the_schema_comments():
    from ollm_triton.plugins import field_descriptions

    assert field_descriptions(_Documented) == {
        "store": "where it lives",  # inherited
        "window": "keys visible behind a query",  # trailing
        "chunk": "Tokens per step.",  # the block above: its first sentence
        "plain": "",
        "wrapped": "first part, second part",  # continued on the next line
    }


def test_plugins_listing_shows_what_a_run_composes():
    """Each parameter line carries the default a run composes (the node generated from the same schema) and the
    field's comment; the baselines are marked."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from ollm_triton.plugins import describe
    from ollm_triton.run import CONF

    text = describe()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        tasks = OmegaConf.to_container(compose(config_name="config").task)
        int4 = OmegaConf.to_container(compose(config_name="config", overrides=["+cache=int4"]).cache)
    assert f"max_tokens: int = {tasks['perplexity']['max_tokens']!r}  # score at most" in text
    assert f"residual: int = {int4['residual']!r}  # most recent tokens kept" in text
    for name, params in tasks.items():
        for key, value in params.items():
            assert f"      {key}: " in text and f"= {value!r}" in text, (name, key)
    for kind in ("attention", "cache", "decoder", "prefetch"):
        assert f"[baseline: runs when +{kind} is not given]" in text
    assert "profile=memory_optimized selects it" in text
