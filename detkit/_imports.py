"""Import every module of a package so that its ``@register`` decorators run, and re-export ``__all__``."""

from __future__ import annotations

import importlib
import pkgutil


def import_all(package_name: str, namespace: dict) -> list[str]:
    """Import each submodule of ``package_name`` (sorted) and copy its ``__all__`` into ``namespace``."""
    package = importlib.import_module(package_name)
    exported: list[str] = []
    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{package_name}.{info.name}")
        for name in getattr(module, "__all__", []):
            namespace[name] = getattr(module, name)
            exported.append(name)
    return exported
