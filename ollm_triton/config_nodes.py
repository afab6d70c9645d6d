"""Hydra structured configs generated from the plugin registry: the dataclass schemas are the one source of defaults.

For every registered plugin this module builds a dataclass node (a `name` field, then the schema's fields with their
defaults and types) and stores it in Hydra's ConfigStore:

    attention/cache/decoder/prefetch  group <kind>, option <plugin name>   (+cache=int4, -m +cache=dense,int8,int4)
    task                              group task, option <name>, package task.<name>   (task=[perplexity,memory])

so `+cache=int4 cache.residual=64` composes against the schema and a misspelt field or a value of the wrong type
fails at composition. A yaml file under ollm_triton/conf/<group>/ may add a preset under another name; it extends a
node through its defaults list (`defaults: [int4, _self_]`) and holds only what differs (tests/test_configs.py).

The nodes are module attributes (created on import), so a launcher that pickles the ConfigStore into worker processes
(joblib, submitit, ray) finds their classes again. A field type OmegaConf cannot hold (Literal, a class) is stored
as Any: the registry still validates it before anything is built.
"""

from __future__ import annotations

import dataclasses
import re
import sys
import typing
from typing import Any

from omegaconf import OmegaConf

from ollm_triton.registry import BASELINES, registry

PLUGIN_GROUPS = tuple(BASELINES)  # Hydra group = plugin kind for the four plugin kinds; task is a group of its own
_stored = False


def _omegaconf_type(hint: Any, default: Any) -> Any:
    """`hint` when OmegaConf can type a node with it, else Any."""
    probe = dataclasses.make_dataclass("Probe", [("x", hint, _field(default))])
    try:
        OmegaConf.structured(probe)
    except Exception:  # an annotation OmegaConf does not support (Literal, arbitrary classes): untyped
        return Any
    return hint


def _field(default: Any) -> Any:
    if isinstance(default, (list, dict, tuple, set)):
        return dataclasses.field(default_factory=lambda d=default: type(default)(d))
    return dataclasses.field(default=default)


def _attribute(kind: str, name: str) -> str:
    return re.sub(r"\W", "_", f"{kind}__{name}")


def node_class(kind: str, name: str) -> type:
    """The structured-config dataclass of one plugin (created on first use, cached as a module attribute)."""
    attr = _attribute(kind, name)
    module = sys.modules[__name__]
    cls = getattr(module, attr, None)
    if cls is not None:
        return cls
    spec = registry.get(kind, name)
    hints = typing.get_type_hints(spec.schema)
    fields: list[tuple[str, Any, Any]] = []
    if kind != "task":  # a task's name is its key (task.perplexity.chunk); a plugin group's node names its plugin
        fields.append(("name", str, dataclasses.field(default=name)))
    for f in dataclasses.fields(spec.schema):
        if f.name == "name" and kind != "task":
            raise TypeError(f"{kind} {name!r}: a schema field may not be called `name` (the node's plugin name)")
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = "???"  # OmegaConf's mandatory value: composing without it fails, naming the key
        hint = hints.get(f.name, f.type)
        fields.append((f.name, _omegaconf_type(hint, default), _field(default)))
    cls = dataclasses.make_dataclass(attr, fields)
    cls.__module__ = __name__
    cls.__qualname__ = attr
    cls.plugin_kind, cls.plugin_name = kind, name
    setattr(module, attr, cls)
    return cls


def store() -> None:
    """Put one node per registered plugin into Hydra's ConfigStore (once per process)."""
    global _stored
    if _stored:
        return
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    for kind in (*PLUGIN_GROUPS, "task"):
        for name in registry.names(kind):
            package = f"task.{name}" if kind == "task" else kind
            cs.store(group=kind, name=name, node=node_class(kind, name), package=package)
    from ollm_triton.monitor import MonitorConfig  # the run's `monitor:` section (config.yaml: monitor: default)

    cs.store(group="monitor", name="default", node=MonitorConfig, package="monitor")
    _stored = True


store()


def _if_smoke(smoke_value: Any, full_value: Any, *, _root_: Any) -> Any:
    """`${if_smoke:A,B}`: A when the run's `smoke` is set (debug=smoke), else B. A study preset
    (conf/experiment/<study>.yaml, appended with +experiment=) composes after `debug=` in the defaults order, so
    debug=smoke cannot override what the preset sets; its sweep chooses the model and the lengths through this."""
    return smoke_value if _root_.get("smoke") else full_value


if not OmegaConf.has_resolver("if_smoke"):
    OmegaConf.register_new_resolver("if_smoke", _if_smoke)
