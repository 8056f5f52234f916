"""YAML configs: ``_base_`` inheritance, ``a.b=value`` overrides, dumping, validation.

A config is data, never code: files are read with ``yaml.safe_load`` (a ``!!python/...`` tag is
refused). A file may list ``_base_: [a.yaml, b.yaml]`` (paths relative to that file, or absolute;
``~`` is expanded); bases are deep-merged in order, then the file itself on top. Bases may have
bases to any depth (your config on your config on a shipped COCO config); a file that reaches
itself again is an error naming the whole chain. A key ``_delete_: true`` inside a mapping
replaces the inherited mapping instead of merging into it.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any, Iterable

import yaml

from .registry import ConfigError, closest

__all__ = ["ConfigError", "load_config", "merge", "apply_overrides", "dump_config",
           "get_path", "check_keys"]


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except yaml.constructor.ConstructorError as e:
        raise ConfigError(f"{path}: unsupported YAML tag (configs are plain data; python tags are "
                          f"refused): {e.problem} {e.problem_mark}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    return data


def merge(base: dict, update: dict) -> dict:
    """Deep-merge ``update`` into a copy of ``base``; mappings merge, everything else replaces."""
    out = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and value.get("_delete_"):
            out[key] = {k: copy.deepcopy(v) for k, v in value.items() if k != "_delete_"}
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _load_with_bases(path: Path, chain: tuple[Path, ...]) -> dict:
    """``path`` merged over its bases; ``chain`` lists the files that (transitively) inherit it."""
    if path in chain:
        cycle = " -> ".join(str(p) for p in (*chain[chain.index(path):], path))
        raise ConfigError(f"_base_ cycle: {cycle}")
    data = _read_yaml(path)
    bases = data.pop("_base_", [])
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise ConfigError(f"{path}: _base_ must be a list of paths")
    merged: dict = {}
    for base in bases:
        base_path = (path.parent / Path(base).expanduser()).resolve()
        if not base_path.is_file():
            via = "".join(f"\n  inherited by {p}" for p in reversed(chain))
            raise ConfigError(f"{path}: _base_ file not found: {base} (resolved to {base_path}){via}")
        merged = merge(merged, _load_with_bases(base_path, (*chain, path)))
    return merge(merged, data)


def _parse_scalar(text: str, where: str) -> Any:
    try:
        return yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {where}: cannot parse value {text!r}: {e}") from None


def apply_overrides(cfg: dict, overrides: Iterable[str]) -> dict:
    """Apply ``a.b.c=value`` strings (value parsed as YAML) to a copy of ``cfg``.

    The parent mapping must exist; a new leaf key is allowed only where the parent already is a
    mapping (so ``model.backbone.depht=18`` fails with a suggestion instead of adding junk).
    List items are addressed by index: ``data.train.pipeline.0.p=0.5``.
    """
    cfg = copy.deepcopy(cfg)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key.path=value")
        key, text = item.split("=", 1)
        parts = key.strip().split(".")
        value = _parse_scalar(text, item)
        node: Any = cfg
        for i, part in enumerate(parts[:-1]):
            node = _step(node, part, ".".join(parts[: i + 1]))
        last = parts[-1]
        if isinstance(node, list):
            idx = _index(node, last, key)
            node[idx] = value
        elif isinstance(node, dict):
            if last not in node and node and not _is_open_mapping(node):
                raise ConfigError(f"override {key}: no key '{last}'{closest(last, node)}; "
                                  f"existing keys: {', '.join(map(str, node))}")
            node[last] = value
        else:
            raise ConfigError(f"override {key}: '{'.'.join(parts[:-1])}' is not a mapping")
    return cfg


def _is_open_mapping(node: dict) -> bool:
    """Mappings that build a registered class accept any of its keywords; the registry checks them."""
    return "type" in node


def _index(node: list, part: str, key: str) -> int:
    try:
        idx = int(part)
        node[idx]
    except (ValueError, IndexError):
        raise ConfigError(f"override {key}: '{part}' is not a valid index of a list of "
                          f"{len(node)} items") from None
    return idx


def _step(node: Any, part: str, where: str) -> Any:
    if isinstance(node, list):
        return node[_index(node, part, where)]
    if not isinstance(node, dict) or part not in node:
        options = node if isinstance(node, dict) else []
        raise ConfigError(f"override {where}: no key '{part}'{closest(part, options)}")
    return node[part]


def load_config(path: str | os.PathLike, overrides: Iterable[str] = ()) -> dict:
    """Read a YAML config with its ``_base_`` files and apply ``key.path=value`` overrides."""
    cfg = _load_with_bases(Path(path).expanduser().resolve(), chain=())
    return apply_overrides(cfg, overrides)


def dump_config(cfg: dict, path: str | os.PathLike | None = None) -> str:
    """YAML text of a resolved config (``load_config`` of it gives back the same dict)."""
    text = yaml.safe_dump(cfg, sort_keys=False, default_flow_style=None, allow_unicode=True)
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text, encoding="utf-8")
    return text


def get_path(cfg: dict, dotted: str, default: Any = ConfigError) -> Any:
    """``cfg['a']['b']`` for ``'a.b'``; raises ConfigError naming the path when absent and no default."""
    node: Any = cfg
    for i, part in enumerate(dotted.split(".")):
        if not isinstance(node, dict) or part not in node:
            if default is ConfigError:
                where = ".".join(dotted.split(".")[: i + 1])
                opts = node if isinstance(node, dict) else []
                raise ConfigError(f"config: missing key '{where}'{closest(part, opts)}")
            return default
        node = node[part]
    return node


def check_keys(node: dict, allowed: Iterable[str], path: str) -> None:
    """Raise ConfigError for a key of ``node`` outside ``allowed`` (for non-``type`` sections)."""
    allowed = list(allowed)
    for key in node:
        if key not in allowed:
            raise ConfigError(f"{path}.{key}: unknown key{closest(key, allowed)}; "
                              f"valid keys: {', '.join(allowed)}")
