"""Import every module of a plugin package, so a new plugin file registers itself without editing a list.

The rule: a plugin is a class decorated with `@register`; every module directly inside a plugin folder is imported,
and a module that registers nothing (shared machinery such as `cache/eviction.py` or `decoding/speculation.py`) is
simply imported too. Names say what a module is; no prefix decides what gets loaded.
"""

from __future__ import annotations

import importlib
import pkgutil


def import_submodules(package_name: str) -> None:
    package = importlib.import_module(package_name)
    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda m: m.name):
        if not info.ispkg:
            importlib.import_module(f"{package_name}.{info.name}")
