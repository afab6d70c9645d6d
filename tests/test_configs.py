"""Compose every option of every config group, and validate every plugin's parameters against its schema."""

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from ollm_triton.registry import registry
from ollm_triton.run import PLUGIN_GROUPS, resolve_plugins, resolve_tasks

CONF = Path(__file__).resolve().parents[1] / "ollm_triton" / "conf"
APPENDED = set(PLUGIN_GROUPS)  # groups not in the primary defaults list: selected with +group=option
GROUPS = ["model", "task", "logger", "profile", "debug", *sorted(APPENDED)]


def options(group):
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def compose_with(*overrides):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


CASES = [(g, o) for g in GROUPS for o in options(g)]


@pytest.mark.parametrize("group, option", CASES, ids=[f"{g}={o}" for g, o in CASES])
def test_every_option_composes_and_validates(group, option):
    override = f"+{group}={option}" if group in APPENDED else f"{group}={option}"
    cfg = compose_with(override)
    resolved = OmegaConf.to_container(cfg, resolve=False)
    resolve_plugins(resolved)  # every plugin name registered, every parameter of the right type
    resolve_tasks(resolved)
    if group in APPENDED:
        kind = PLUGIN_GROUPS[group][0]
        assert cfg[group].name in registry.names(kind)


def test_every_registered_plugin_has_a_config_file():
    for group, (kind, _) in PLUGIN_GROUPS.items():
        missing = set(registry.names(kind)) - set(options(group))
        assert not missing, f"plugins without conf/{group}/<name>.yaml: {sorted(missing)}"


def test_every_parameter_is_in_its_config_file():
    """`prefetch.loader=staged` (no `+`) only works when the yaml names the field: Hydra's struct mode rejects
    overrides of keys the composed config does not have."""
    import dataclasses

    for group, (kind, _) in PLUGIN_GROUPS.items():
        for option in options(group):
            cfg = OmegaConf.load(CONF / group / f"{option}.yaml")
            schema = registry.get(kind, cfg.get("name", option)).schema
            fields = {f.name for f in dataclasses.fields(schema)} if dataclasses.is_dataclass(schema) else set()
            missing = fields - set(cfg)
            assert not missing, f"conf/{group}/{option}.yaml lacks {sorted(missing)}"


def test_defaults_leave_plugin_groups_out():
    cfg = compose_with()
    for group in APPENDED:
        assert group not in cfg, f"{group} must not be in the primary defaults list (+{group}=X must append it)"
    assert cfg.model.name == "tiny"
    assert set(cfg.task) == {"perplexity", "passkey", "throughput", "memory"}


def test_combined_plugins_and_single_task():
    cfg = compose_with("+decoder=sample", "decoder.temperature=0.5", "task=throughput", "debug=smoke")
    plugins = resolve_plugins(OmegaConf.to_container(cfg))
    assert plugins["decoder"] == {
        "name": "sample",
        "params": {"temperature": 0.5, "top_k": 0, "top_p": 0.95, "seed": 0},
        "default": False,
    }
    assert plugins["attention"]["name"] == "sdpa" and plugins["attention"]["default"]
    assert list(cfg.task) == ["throughput"] and cfg.smoke is True


LAUNCHER_PLUGINS = {
    "per_gpu": "hydra_plugins.hydra_joblib_launcher",
    "slurm": "hydra_plugins.hydra_submitit_launcher",
    "ray": "hydra_plugins.hydra_ray_launcher",
}


@pytest.mark.parametrize("launcher", options("hydra/launcher"))
def test_launcher_presets_compose(launcher):
    pytest.importorskip(LAUNCHER_PLUGINS[launcher], reason="install the `sweep` extra for this launcher")
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"hydra/launcher={launcher}"], return_hydra_config=True)
    assert "_target_" in cfg.hydra.launcher
