"""One registry for every plugin kind.

A plugin is a class registered under a short name together with a dataclass config schema:

    @dataclass
    class SlidingWindowConfig:
        window: int = 4096
        sink: int = 4

    @register("attention", "sliding_window", SlidingWindowConfig)
    class SlidingWindow(AttentionBackend):
        "Attend to `sink` initial tokens plus the last `window` tokens."
        def __init__(self, cfg: SlidingWindowConfig): ...

`registry.build(kind, name, params)` validates `params` against the schema (unknown field, wrong type:
one clear `PluginError` naming the plugin, the field and the expected type) and returns the instance.
Third-party packages add plugins through the entry-point group `ollm_triton.plugins`: each entry point
names a module (or a callable) that registers its plugins when imported (or called).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

KINDS = ("attention", "cache", "decoder", "prefetch", "context", "adapt", "task")
# The plugin a run uses for a kind the user did not choose (the baselines every other plugin is compared with).
BASELINES = {"attention": "sdpa", "cache": "dense", "decoder": "greedy", "prefetch": "resident", "context": "none",
             "adapt": "none"}  # adapt none: every strategy stays as launched
ENTRY_POINT_GROUP = "ollm_triton.plugins"

# Built-in plugin folders, imported on first use so that `import ollm_triton` stays cheap.
_BUILTIN_PACKAGES = (
    "ollm_triton.attention",
    "ollm_triton.cache",
    "ollm_triton.decoding",
    "ollm_triton.prefetch",
    "ollm_triton.context",
    "ollm_triton.adapt",
    "ollm_triton.tasks",
)


class PluginError(ValueError):
    """A plugin name or parameter that cannot be used. The message is one line meant for the user."""


@dataclass(frozen=True)
class EmptyConfig:
    """Schema of a plugin that takes no parameters."""


@dataclass(frozen=True)
class PluginSpec:
    kind: str
    name: str
    cls: type
    schema: type

    @property
    def description(self) -> str:
        """The first paragraph of the class docstring, on one line."""
        doc = (self.cls.__doc__ or "").strip()
        return " ".join(line.strip() for line in doc.split("\n\n")[0].splitlines()) if doc else ""

    def parameters(self) -> list[tuple[str, str, Any]]:
        """(name, type, default) of every schema field."""
        hints = typing.get_type_hints(self.schema)
        out = []
        for f in dataclasses.fields(self.schema):
            if f.default is not dataclasses.MISSING:
                default = f.default
            elif f.default_factory is not dataclasses.MISSING:
                default = f.default_factory()
            else:
                default = "<required>"
            out.append((f.name, _type_name(hints.get(f.name, f.type)), default))
        return out


class Registry:
    def __init__(self) -> None:
        self._plugins: dict[str, dict[str, PluginSpec]] = {k: {} for k in KINDS}
        self._loaded = False

    def register(self, kind: str, name: str, schema: type | None = None) -> Callable[[type], type]:
        if kind not in KINDS:
            raise PluginError(f"unknown plugin kind {kind!r}; kinds are: {', '.join(KINDS)}")
        schema = schema or EmptyConfig
        if not dataclasses.is_dataclass(schema):
            raise PluginError(f"{kind} {name!r}: config schema {schema!r} must be a dataclass")

        def decorator(cls: type) -> type:
            known = self._plugins[kind].get(name)
            if known is not None and known.cls is not cls:
                raise PluginError(f"{kind} {name!r} is registered twice ({known.cls.__module__} and {cls.__module__})")
            self._plugins[kind][name] = PluginSpec(kind, name, cls, schema)
            cls.plugin_name = name
            return cls

        return decorator

    def load(self) -> None:
        """Import the built-in plugins and every installed entry point (once)."""
        if self._loaded:
            return
        self._loaded = True
        from ollm_triton._discover import import_submodules

        for package in _BUILTIN_PACKAGES:  # every module of a plugin folder registers itself on import
            import_submodules(package)
        from importlib.metadata import entry_points

        for ep in entry_points(group=ENTRY_POINT_GROUP):
            try:
                target = ep.load()
            except Exception as e:  # a broken third-party plugin must not hide the others
                raise PluginError(f"plugin entry point {ep.name!r} ({ep.value}) failed to load: {e}") from e
            if callable(target) and not isinstance(target, type):
                target()

    def names(self, kind: str) -> list[str]:
        self.load()
        return sorted(self._plugins[kind])

    def get(self, kind: str, name: str) -> PluginSpec:
        self.load()
        if kind not in KINDS:
            raise PluginError(f"unknown plugin kind {kind!r}; kinds are: {', '.join(KINDS)}")
        spec = self._plugins[kind].get(name)
        if spec is None:
            raise PluginError(f"unknown {kind} plugin {name!r}; registered: {', '.join(self.names(kind))}")
        return spec

    def config(self, kind: str, name: str, params: Mapping[str, Any] | None = None) -> Any:
        """Validate `params` against the plugin's schema and return the schema instance."""
        spec = self.get(kind, name)
        return validate(spec, dict(params or {}))

    def build(self, kind: str, name: str, params: Mapping[str, Any] | None = None, **kwargs: Any) -> Any:
        """Validate and instantiate. Extra keyword arguments go to the plugin's constructor."""
        spec = self.get(kind, name)
        return spec.cls(validate(spec, dict(params or {})), **kwargs)

    def baseline(self, kind: str) -> str:
        """The baseline plugin name of a plugin kind (BASELINES)."""
        if kind not in BASELINES:
            raise PluginError(f"plugin kind {kind!r} has no baseline; kinds with one: {', '.join(BASELINES)}")
        return BASELINES[kind]

    def all(self) -> list[PluginSpec]:
        self.load()
        return [spec for kind in KINDS for _, spec in sorted(self._plugins[kind].items())]


def validate(spec: PluginSpec, params: dict[str, Any]) -> Any:
    hints = typing.get_type_hints(spec.schema)
    fields = {f.name: f for f in dataclasses.fields(spec.schema)}
    where = f"{spec.kind} {spec.name!r}"
    for key in params:
        if key not in fields:
            accepted = ", ".join(fields) or "none"
            raise PluginError(f"{where}: unknown parameter {key!r}; accepted: {accepted}")
    values = {}
    for key, value in params.items():
        expected = hints.get(key, fields[key].type)
        try:
            values[key] = _coerce(value, expected)
        except (TypeError, ValueError):
            raise PluginError(
                f"{where}: parameter {key!r} expects {_type_name(expected)}, got {value!r} ({type(value).__name__})"
            ) from None
    missing = [
        n
        for n, f in fields.items()
        if n not in values and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise PluginError(f"{where}: missing required parameter(s): {', '.join(missing)}")
    cfg = spec.schema(**values)
    check = getattr(cfg, "check", None)
    if check is not None:  # a schema may validate ranges and combinations: it raises ValueError with the reason
        try:
            check()
        except ValueError as e:
            raise PluginError(f"{where}: {e}") from None
    return cfg


def _coerce(value: Any, expected: Any) -> Any:
    """Check `value` against a type hint, converting only where no information is lost (int -> float)."""
    origin = typing.get_origin(expected)
    args = typing.get_args(expected)
    if expected is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        for arg in args:
            try:
                return _coerce(value, arg)
            except (TypeError, ValueError):
                continue
        raise TypeError
    if expected is type(None):
        if value is None:
            return None
        raise TypeError
    if origin is typing.Literal:
        if value in args:
            return value
        raise ValueError
    if origin in (list, tuple) or expected in (list, tuple):
        if isinstance(value, (str, bytes, Mapping)) or not hasattr(value, "__iter__"):
            raise TypeError
        items = list(value)
        if origin is tuple and args and args[-1] is not Ellipsis:  # fixed-length tuple[int, str]
            if len(args) != len(items):
                raise ValueError
            items = [_coerce(v, t) for v, t in zip(items, args, strict=True)]
        elif args:  # list[int] or tuple[int, ...]
            items = [_coerce(v, args[0]) for v in items]
        return tuple(items) if tuple in (origin, expected) else items
    if origin is dict or expected is dict:
        if not isinstance(value, Mapping):
            raise TypeError
        return dict(value)
    if expected is bool:
        if isinstance(value, bool):
            return value
        raise TypeError
    if expected is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise TypeError
    if expected is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise TypeError
    if expected is str:
        if isinstance(value, str):
            return value
        raise TypeError
    if isinstance(expected, type) and not isinstance(value, expected):
        raise TypeError
    return value


def _type_name(t: Any) -> str:
    if isinstance(t, type):
        return t.__name__
    return str(t).replace("typing.", "")


registry = Registry()
register = registry.register
