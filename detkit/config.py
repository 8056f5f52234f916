"""YAML configs: ``_base_`` inheritance, ``a.b=value`` overrides, dumping, validation.

A config is data, never code: files are read with :func:`load_yaml` (``yaml.safe_load`` plus
YAML 1.2 floats, so ``lr: 1e-4`` is a number, not the string PyYAML's YAML 1.1 makes of it;
a ``!!python/...`` tag is refused). A file may list ``_base_: [a.yaml, b.yaml]`` (paths
relative to that file, or absolute; ``~`` is expanded); bases are deep-merged in order, then
the file itself on top. Bases may have bases to any depth (your config on your config on a
shipped COCO config); a file that reaches itself again is an error naming the whole chain.
A key ``_delete_: true`` inside a mapping replaces the inherited mapping instead of merging
into it.

Segmentation has one key for the ignored mask value: ``data.ignore_index`` (255 when absent).
:func:`load_config` copies it to every place that needs it (see :func:`propagate_ignore_index`),
so the resolved config shows them all; a conflicting value set by hand is an error.
``data.image_size`` is the one key for the input size (see :func:`propagate_image_size`).
"""

from __future__ import annotations

import copy
import os
import re
from pathlib import Path
from typing import Any, Callable, Iterable

import yaml

from .registry import ConfigError, closest

__all__ = ["ConfigError", "load_config", "load_yaml", "merge", "apply_overrides", "dump_config",
           "get_path", "check_keys", "propagate_ignore_index", "propagate_image_size"]

# Where data.ignore_index goes: the Segmentor's head (loss), the SegEvaluator (scores), the
# SemanticSegDataset nodes (mask checks) and the mask padding of the resize transforms.
_IGNORE_TARGETS = {"SegEvaluator": "ignore_index", "SemanticSegDataset": "ignore_index",
                   "Letterbox": "mask_pad_value", "PadToMultiple": "mask_pad_value"}


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads YAML 1.2 exponent floats without a dot (``1e-4``, ``5E+3``)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+.0123456789"))


def load_yaml(stream) -> Any:
    """``yaml.safe_load`` with YAML 1.2 floats: ``1e-4`` is 0.0001 (PyYAML alone: the string '1e-4')."""
    return yaml.load(stream, Loader=_Loader)


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            data = load_yaml(f)
    except yaml.constructor.ConstructorError as e:
        raise ConfigError(f"{path}: unsupported YAML tag (configs are plain data; python tags are "
                          f"refused): {e.problem} {e.problem_mark}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start}); save the config as UTF-8") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    return data


def merge(base: dict, update: dict) -> dict:
    """Deep-merge ``update`` into a copy of ``base``; mappings merge, everything else replaces.

    A mapping of ``update`` with ``_delete_: true`` replaces the one of ``base``; every
    ``_delete_`` key is removed from the result (at any depth, also where nothing was inherited).
    """
    out = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and not value.get("_delete_") and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = _without_delete(value)
    return out


def _without_delete(value: Any) -> Any:
    """A deep copy of ``value`` without ``_delete_`` keys (they only steer :func:`merge`)."""
    if isinstance(value, dict):
        return {k: _without_delete(v) for k, v in value.items() if k != "_delete_"}
    if isinstance(value, list):
        return [_without_delete(v) for v in value]
    return copy.deepcopy(value)


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
        return load_yaml(text) if text.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {where}: cannot parse value {text!r}: {e}") from None


def apply_overrides(cfg: dict, overrides: Iterable[str]) -> dict:
    """Apply ``a.b.c=value`` strings (value parsed as YAML) to a copy of ``cfg``.

    The parent mapping must exist; a new leaf key is allowed only where the parent already is a
    mapping (so ``model.backbone.depht=18`` fails with a suggestion instead of adding junk).
    List items are addressed by index: ``data.train.pipeline.0.p=0.5``. A mapping value merges
    into the mapping already there exactly as a file does, so ``_delete_: true`` inside it
    replaces instead (``'data.train.dataset={_delete_: true, type: YoloDetection, ...}'``).
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
            node[idx] = _merged_value(node[idx], value)
        elif isinstance(node, dict):
            if last not in node and node and not _is_open_mapping(node) \
                    and ".".join(parts) not in _OPTIONAL_KEYS:
                raise ConfigError(f"override {key}: no key '{last}'{closest(last, node)}; "
                                  f"existing keys: {', '.join(map(str, node))}")
            node[last] = _merged_value(node.get(last), value)
        else:
            raise ConfigError(f"override {key}: '{'.'.join(parts[:-1])}' is not a mapping")
    return cfg


# Keys a config may leave out that ``--set`` may still add (read with a default where used).
_OPTIONAL_KEYS = ("data.image_size",)


def _merged_value(current: Any, value: Any) -> Any:
    """An override value as a file would leave it: a mapping merges into ``current`` (or replaces
    it with ``_delete_: true``); anything else replaces."""
    return merge({"v": current}, {"v": value})["v"]


def _is_open_mapping(node: dict) -> bool:
    """Mappings that build a registered class accept any of its keywords, and a data split (it has
    a ``dataset``) any split key (``subset``, ``skip_bad_images`` ...); their builders check them."""
    return "type" in node or "dataset" in node


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


def load_config(path: str | os.PathLike, overrides: Iterable[str] = (), *,
                before_overrides: Callable[[dict], dict] | None = None) -> dict:
    """Read a YAML config with its ``_base_`` files and apply ``key.path=value`` overrides.

    ``before_overrides``: a step between the files and the overrides (``--data`` replaces the
    datasets there, so that ``--set`` still has the last word).
    """
    cfg = _load_with_bases(Path(path).expanduser().resolve(), chain=())
    if before_overrides is not None:
        cfg = before_overrides(cfg)
    return propagate_image_size(propagate_ignore_index(apply_overrides(cfg, overrides)))


# Where data.image_size goes: the size of every letterbox / mosaic, the short edge of a resize.
_SIZE_KEYS = {"Letterbox": "size", "Mosaic": "size"}


def propagate_image_size(cfg: dict) -> dict:
    """``data.image_size: S`` (one key for the input size) into every data split (in place):
    ``Letterbox`` and ``Mosaic`` ``size`` become S; a ``ResizeShortestEdge`` is scaled so that its
    largest ``short_edge`` is S (a multi-scale list and ``max_size`` keep their ratios to it:
    800 / [640..800] / 1333 at S=512 -> 512 / [410..512] / 853). Applying it twice changes nothing."""
    data = cfg.get("data")
    if not isinstance(data, dict) or data.get("image_size") is None:
        return cfg
    size = data["image_size"]
    if isinstance(size, bool) or not isinstance(size, int) or size < 32:
        raise ConfigError(f"data.image_size: expected a size in pixels >= 32, got {size!r}")
    splits = {k: v for k, v in data.items() if isinstance(v, dict) and ("pipeline" in v or "dataset" in v)}
    for node, _ in _typed_nodes(splits):
        if node["type"] in _SIZE_KEYS:
            node[_SIZE_KEYS[node["type"]]] = size
        elif node["type"] == "ResizeShortestEdge":
            edges = node.get("short_edge", 800)
            listed = edges if isinstance(edges, list) else [edges]
            factor = size / max(listed)
            scaled = [int(round(e * factor)) for e in listed]
            node["short_edge"] = scaled if isinstance(edges, list) else scaled[0]
            if node.get("max_size", 1333):
                node["max_size"] = int(round(node.get("max_size", 1333) * factor))
    return cfg


def propagate_ignore_index(cfg: dict) -> dict:
    """Copy ``data.ignore_index`` into ``model.head`` of a Segmentor, the SegEvaluator, the
    SemanticSegDataset nodes and Letterbox / PadToMultiple ``mask_pad_value`` (in place; returns
    ``cfg``). A different value already set at one of those keys is a ConfigError naming it."""
    data = cfg.get("data")
    if not isinstance(data, dict) or data.get("ignore_index") is None:
        return cfg
    value = data["ignore_index"]
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 255:
        raise ConfigError(f"data.ignore_index: expected a mask value 0..255, got {value!r}")
    targets: list[tuple[dict, str, str]] = []
    model = cfg.get("model")
    if isinstance(model, dict) and model.get("type") == "Segmentor" and isinstance(model.get("head"), dict):
        targets.append((model["head"], "ignore_index", "model.head"))
    for node, where in _typed_nodes({"evaluation": cfg.get("evaluation"), "data": data}):
        if node["type"] in _IGNORE_TARGETS:
            targets.append((node, _IGNORE_TARGETS[node["type"]], where))
    for node, key, where in targets:
        if node.get(key, value) != value:
            raise ConfigError(f"{where}.{key} is {node[key]} but data.ignore_index is {value}; set the "
                              f"ignored label only as data.ignore_index")
        node[key] = value
    return cfg


def _typed_nodes(node: Any, where: str = "") -> list[tuple[dict, str]]:
    """Every mapping with a ``type`` key inside ``node`` (dicts and lists), with its key path."""
    found = []
    items: Iterable[tuple[Any, Any]]
    if isinstance(node, dict):
        if isinstance(node.get("type"), str):
            found.append((node, where))
        items = node.items()
    elif isinstance(node, list):
        items = ((str(i), v) for i, v in enumerate(node))
    else:
        return []
    for key, child in items:
        found += _typed_nodes(child, f"{where}.{key}" if where else str(key))
    return found


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
