"""Compose every option of every config group; the plugin schemas are the one source of defaults (their Hydra nodes
are generated from the registry), and a yaml preset may only say what differs from its schema."""

import dataclasses

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from ollm_triton.config_nodes import PLUGIN_GROUPS
from ollm_triton.registry import BASELINES, registry
from ollm_triton.run import CONF, check_top_level_keys, resolve_plugins, resolve_tasks

APPENDED = set(PLUGIN_GROUPS)  # groups not in the primary defaults list: selected with +group=option
SCHEMA_GROUPS = (*PLUGIN_GROUPS, "task")  # groups whose options are (or extend) registry nodes
YAML_GROUPS = ["model", "logger", "profile", "debug"]


def yaml_options(group, conf=CONF):
    return sorted(p.stem for p in (conf / group).glob("*.yaml"))


def options(group):
    if group in SCHEMA_GROUPS:
        return sorted(set(registry.names(group)) | set(yaml_options(group)))
    return yaml_options(group)


def compose_with(*overrides, conf=CONF):
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


CASES = [(g, o) for g in [*YAML_GROUPS, *SCHEMA_GROUPS] for o in options(g)]


@pytest.mark.parametrize("group, option", CASES, ids=[f"{g}={o}" for g, o in CASES])
def test_every_option_composes_and_validates(group, option):
    override = f"+{group}={option}" if group in APPENDED else f"{group}={option}"
    cfg = compose_with(override)
    resolved = OmegaConf.to_container(cfg, resolve=False)
    check_top_level_keys(cfg)
    resolve_plugins(resolved)  # every plugin name registered, every parameter of the right type
    resolve_tasks(resolved)
    if group in APPENDED:
        assert cfg[group].name in registry.names(group)


def _defaults(schema):
    out = {}
    for f in dataclasses.fields(schema):
        value = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        out[f.name] = list(value) if isinstance(value, tuple) else value
    return out


@pytest.mark.parametrize("kind", SCHEMA_GROUPS)
def test_every_plugin_node_holds_its_schema_defaults(kind):
    """What a run composes is what the schema says (and what `python -m ollm_triton.plugins` prints)."""
    for name in registry.names(kind):
        assert f"{name}.yaml" in ConfigStore.instance().repo[kind], f"no config node {kind}/{name}"
        if kind == "task":
            composed = OmegaConf.to_container(compose_with(f"task={name}").task[name])
        else:
            composed = OmegaConf.to_container(compose_with(f"+{kind}={name}")[kind])
            assert composed.pop("name") == name
        assert composed == _defaults(registry.get(kind, name).schema), f"{kind}/{name}"


def yaml_problems(path, group):
    """Why a preset yaml under a plugin or task group disagrees with its schema ([] when it agrees): it must extend
    a registered node through its defaults list, set only the schema's fields, and only values that differ."""
    cfg = OmegaConf.to_container(OmegaConf.load(path))
    where = f"{group}/{path.name}"
    if path.stem in registry.names(group):
        return [f"{where} hides the generated node of {group} {path.stem!r}: name the preset differently"]
    bases = [d for d in cfg.pop("defaults", []) if d != "_self_"]
    if len(bases) != 1 or not isinstance(bases[0], str) or bases[0] not in registry.names(group):
        return [f"{where} must extend one registered {group} node in its defaults list (defaults: [<name>, _self_])"]
    defaults = _defaults(registry.get(group, bases[0]).schema)
    problems = []
    if cfg.pop("name", bases[0]) != bases[0]:
        problems.append(f"{where}: `name` differs from the node it extends ({bases[0]})")
    for key, value in cfg.items():
        if key not in defaults:
            problems.append(f"{where}: {key!r} is not a field of {group} {bases[0]!r}; fields: {', '.join(defaults)}")
        elif value == defaults[key]:
            problems.append(f"{where}: {key}={value!r} equals the schema default: drop it")
    return problems


def test_every_yaml_preset_agrees_with_its_schema():
    problems = [p for g in SCHEMA_GROUPS for path in sorted((CONF / g).glob("*.yaml")) for p in yaml_problems(path, g)]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize(
    "text, name, words",
    [
        ("defaults: [int4, _self_]\ngroup_size: 128\n", "int4_same", "equals the schema default"),
        ("defaults: [int4, _self_]\ngroup_sise: 64\n", "int4_typo", "not a field of cache 'int4'"),
        ("name: int4\ngroup_size: 64\n", "int4", "hides the generated node"),
        ("name: int4\ngroup_size: 64\n", "int4_flat", "must extend one registered cache node"),
    ],
    ids=["redundant-default", "unknown-field", "shadows-node", "no-base"],
)
def test_yaml_check_catches_disagreement(tmp_path, text, name, words):
    path = tmp_path / f"{name}.yaml"
    path.write_text(text)
    assert any(words in p for p in yaml_problems(path, "cache")), yaml_problems(path, "cache")


def test_a_preset_extends_its_node(tmp_path):
    """The documented way to add a preset: it composes against the schema (types checked) and says only what differs."""
    conf = tmp_path / "conf"
    import shutil

    shutil.copytree(CONF, conf)
    (conf / "cache").mkdir(exist_ok=True)
    (conf / "cache" / "int4_g64.yaml").write_text("defaults: [int4, _self_]\ngroup_size: 64\n")
    assert yaml_problems(conf / "cache" / "int4_g64.yaml", "cache") == []
    cfg = compose_with("+cache=int4_g64", "cache.residual=32", conf=conf)
    assert cfg.cache.name == "int4" and cfg.cache.group_size == 64 and cfg.cache.residual == 32
    assert cfg.cache.symmetric is False  # the rest from the schema
    with pytest.raises(ConfigCompositionException):
        compose_with("+cache=int4_g64", "cache.group_size=big", conf=conf)


@pytest.mark.parametrize(
    "overrides",
    [
        ["+cache=int4", "cache.residul=64"],  # a field the schema does not have
        ["+cache=int4", "cache.residual=abc"],  # a value of the wrong type
        ["+decoder=sample", "decoder.top_k=1.5"],
        ["task=perplexity", "task.perplexity.chunk=many"],
        ["+prefetch=lookahead", "prefetch.workers=null"],  # not Optional in the schema
        ["cache=int4"],  # a plugin group is appended with +, not overridden
    ],
)
def test_wrong_field_or_type_fails_at_composition(overrides):
    with pytest.raises(ConfigCompositionException):
        compose_with(*overrides)


def test_overrides_keep_working():
    cfg = compose_with("+cache=int4", "cache.residual=64", "task=perplexity", "task.perplexity.chunk=256",
                       "+prefetch=lookahead", "prefetch.budget_gb=8", "+attention=multiscale",
                       "attention.scales=[32,512]")
    assert cfg.cache.residual == 64 and cfg.cache.name == "int4"
    assert cfg.task.perplexity.chunk == 256 and list(cfg.task) == ["perplexity"]
    assert cfg.prefetch.budget_gb == 8.0 and cfg.prefetch.cache_dir is None
    plugins = resolve_plugins(OmegaConf.to_container(cfg))
    assert plugins["attention"]["params"]["scales"] == [32, 512]
    assert plugins["decoder"] == {"name": "greedy", "params": {}, "default": True}


def test_every_registered_plugin_has_a_config_node():
    for kind in SCHEMA_GROUPS:
        missing = set(registry.names(kind)) - {n.removesuffix(".yaml") for n in ConfigStore.instance().repo[kind]}
        assert not missing, f"plugins without a {kind}/<name> node: {sorted(missing)}"


def test_plugin_groups_are_the_registry_baselines():
    assert set(PLUGIN_GROUPS) == set(BASELINES)
    cfg = OmegaConf.to_container(compose_with())
    assert {g: p["name"] for g, p in resolve_plugins(cfg).items()} == BASELINES


def test_defaults_leave_plugin_groups_out():
    cfg = compose_with()
    for group in APPENDED:
        assert group not in cfg, f"{group} must not be in the primary defaults list (+{group}=X must append it)"
    assert cfg.model.name == "tiny"
    assert set(cfg.task) == {"perplexity", "passkey", "throughput", "memory"}


def test_combined_plugins_and_single_task():
    cfg = compose_with("+decoder=sample", "decoder.temperature=0.5", "task=throughput", "debug=smoke")
    plugins = resolve_plugins(OmegaConf.to_container(cfg))
    assert plugins["decoder"] == {  # the schema's defaults: the model's own distribution, no filter
        "name": "sample",
        "params": {"temperature": 0.5, "top_k": 0, "top_p": 1.0, "seed": 0},
        "default": False,
    }
    assert plugins["attention"]["name"] == "sdpa" and plugins["attention"]["default"]
    assert list(cfg.task) == ["throughput"] and cfg.smoke is True


LAUNCHER_PLUGINS = {
    "per_gpu": "hydra_plugins.hydra_joblib_launcher",
    "slurm": "hydra_plugins.hydra_submitit_launcher",
    "ray": "hydra_plugins.hydra_ray_launcher",
}


@pytest.mark.parametrize("launcher", yaml_options("hydra/launcher"))
def test_launcher_presets_compose(launcher):
    pytest.importorskip(LAUNCHER_PLUGINS[launcher], reason="install the `sweep` extra for this launcher")
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"hydra/launcher={launcher}"], return_hydra_config=True)
    assert "_target_" in cfg.hydra.launcher


def test_config_nodes_survive_pickling_into_a_worker():
    """joblib/submitit/ray send the ConfigStore to worker processes: the generated node classes must unpickle."""
    import pickle

    node = ConfigStore.instance().repo["cache"]["int4.yaml"].node
    assert OmegaConf.to_container(pickle.loads(pickle.dumps(node))) == OmegaConf.to_container(node)
