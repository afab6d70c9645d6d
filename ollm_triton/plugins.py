"""`python -m ollm_triton.plugins [KIND]`: every registered plugin, what each parameter means, and its default.

The defaults printed are the schema's, which are what a run composes (ollm_triton/config_nodes.py generates the
Hydra nodes from the same schemas). A parameter's description is the `# ...` comment on its dataclass field (the
trailing one, else the comment block just above it). Yaml presets that extend a plugin and the profiles that select
it are listed under it with the values they set.
"""

from __future__ import annotations

import dataclasses
import inspect
import io
import sys
import tokenize
from functools import cache
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from ollm_triton.registry import BASELINES, KINDS, PluginError, registry

CONF = Path(__file__).parent / "conf"


@cache
def _class_comments(cls: type) -> dict[str, str]:
    """{field: comment} for the fields declared in `cls`'s own body (not its bases)."""
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):  # defined in a string or an interactive session: no comments to read
        return {}
    lines = source.splitlines()
    tokens = list(tokenize.generate_tokens(io.StringIO(source).readline))
    body_indent = None
    out: dict[str, str] = {}
    for i, tok in enumerate(tokens):
        if tok.type != tokenize.NAME or i + 1 >= len(tokens) or tokens[i + 1].string != ":":
            continue
        row, col = tok.start
        if lines[row - 1][:col].strip():  # not the first thing on its line: not a field declaration
            continue
        if body_indent is None:
            if col == 0:
                continue
            body_indent = col
        if col != body_indent or tok.string in out:
            continue
        trailing = [t.string for t in tokens[i:] if t.start[0] == row and t.type == tokenize.COMMENT]
        if trailing:
            text = trailing[0].lstrip("#").strip()
            for follow in lines[row:]:  # continuation: comment-only, indented past the field or its text aligned
                stripped = follow.strip()
                aligned = stripped.startswith("#  ") or len(follow) - len(follow.lstrip()) > col
                if stripped.startswith("#") and aligned:
                    text += " " + stripped.lstrip("#").strip()
                else:
                    break
        else:  # a comment block above the field: its first sentence
            block = []
            for above in reversed(lines[: row - 1]):
                if above.strip().startswith("#") and len(above) - len(above.lstrip()) == col:
                    block.insert(0, above.strip().lstrip("#").strip())
                else:
                    break
            text = " ".join(block)
            cut = text.find(". ")
            text = text[: cut + 1] if cut > 0 else text
        out[tok.string] = text
    return out


def field_descriptions(schema: type) -> dict[str, str]:
    """{field: one-line description} for every field of a dataclass schema, inherited fields included."""
    out: dict[str, str] = {}
    if not dataclasses.is_dataclass(schema):
        return out
    for f in dataclasses.fields(schema):
        for cls in schema.__mro__:
            if f.name in cls.__dict__.get("__annotations__", {}):
                out[f.name] = _class_comments(cls).get(f.name, "")
                break
    return out


def presets() -> dict[tuple[str, str], list[str]]:
    """{(kind, plugin): ["<how it is selected>: <the values it sets>"]} from the packaged yaml presets and profiles."""
    found: dict[tuple[str, str], list[str]] = {}
    for kind in KINDS:  # presets under the kind's own group: `defaults: [<plugin>, _self_]` plus what differs
        for path in sorted((CONF / kind).glob("*.yaml")):
            cfg = OmegaConf.load(path)
            bases = [d for d in cfg.get("defaults", []) if isinstance(d, str) and d != "_self_"]
            values = {k: v for k, v in OmegaConf.to_container(cfg).items() if k not in ("defaults", "name")}
            option = f"+{kind}={path.stem}" if kind != "task" else f"task={path.stem}"
            for base in bases:
                found.setdefault((kind, base), []).append(f"{option}: {_values(values)}")
    for group in ("profile", "experiment"):  # `# @package _global_` files that select plugins: `- /cache: int4`
        for path in sorted((CONF / group).glob("*.yaml")):
            cfg = OmegaConf.load(path)
            for entry in cfg.get("defaults", []):
                if isinstance(entry, DictConfig):
                    for key, name in entry.items():
                        kind = str(key).lstrip("/").removeprefix("override ").lstrip("/")
                        if kind in KINDS and isinstance(name, str):
                            values = OmegaConf.to_container(cfg.get(kind, {})) if kind in cfg else {}
                            note = f"{group}={path.stem} selects it: {_values(values)}"
                            found.setdefault((kind, name), []).append(note)
    return found


def _values(values: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in values.items()) or "the defaults"


def describe(kind: str | None = None) -> str:
    lines = []
    used = presets()
    for k in KINDS:
        if kind and k != kind:
            continue
        how = "task=[a,b], task.<name>.<param>=V" if k == "task" else f"+{k}=<name>, {k}.<param>=V"
        lines.append(f"{k}:  ({how})")
        for name in registry.names(k):
            spec = registry.get(k, name)
            baseline = f"  [baseline: runs when +{k} is not given]" if BASELINES.get(k) == name else ""
            lines.append(f"  {name:18s} {spec.description}{baseline}")
            notes = field_descriptions(spec.schema)
            for field, type_name, default in spec.parameters():
                value = list(default) if isinstance(default, tuple) else default
                note = f"  # {notes[field]}" if notes.get(field) else ""
                lines.append(f"      {field}: {type_name} = {value!r}{note}")
            for preset in used.get((k, name), []):
                lines.append(f"      preset {preset}" if preset.startswith("+") else f"      {preset}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("-h", "--help"):
        print("usage: python -m ollm_triton.plugins [list] [KIND]   kinds: " + ", ".join(KINDS))
        print("Every registered plugin: its parameters with type, default (what a run uses) and meaning.")
        return 0
    args = [a for a in argv if a != "list"]
    kind = args[0] if args else None
    if kind is not None and kind not in KINDS:
        print(f"error: unknown plugin kind {kind!r}; kinds are: {', '.join(KINDS)}", file=sys.stderr)
        return 2
    try:
        print(describe(kind))
    except PluginError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


__all__ = ["describe", "field_descriptions", "main", "presets"]

if __name__ == "__main__":
    sys.exit(main())
