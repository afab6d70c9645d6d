"""`python -m ollm_triton.plugins`: every registered plugin with its parameters and one-line description."""

from __future__ import annotations

import sys

from ollm_triton.registry import KINDS, PluginError, registry


def describe(kind: str | None = None) -> str:
    lines = []
    for k in KINDS:
        if kind and k != kind:
            continue
        lines.append(f"{k}:")
        for name in registry.names(k):
            spec = registry.get(k, name)
            lines.append(f"  {name:18s} {spec.description}")
            for field, type_name, default in spec.parameters():
                lines.append(f"      {field}: {type_name} = {default!r}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("-h", "--help"):
        print("usage: python -m ollm_triton.plugins [list] [KIND]   kinds: " + ", ".join(KINDS))
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


if __name__ == "__main__":
    sys.exit(main())
