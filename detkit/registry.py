"""Name -> class registries and the one mechanism that builds objects from config dicts.

A config node is a dict with a ``type`` key naming a registered class; every other key is a
keyword argument of that class. ``Registry.build`` checks the keywords against the class
signature, so a typo such as ``num_clases`` is an error naming the key path and the closest
valid keyword instead of being silently ignored.

A class may define ``from_config(cls, cfg: dict, *, path: str, **extra)`` when it is composed of
other registered parts (a detector holds a backbone, a neck and heads); ``build`` then hands it the
config node (without ``type``) and it builds its children. Constructors themselves stay typed and
keyword-only and never read a config.
"""

from __future__ import annotations

import difflib
import inspect
from typing import Any, Callable

from .errors import DetkitError


class ConfigError(DetkitError, ValueError):
    """A configuration problem: bad key, unknown type, malformed value, missing file."""


def closest(name: str, candidates) -> str:
    """`` (did you mean 'x'?)`` for the closest candidate, or an empty string."""
    match = difflib.get_close_matches(str(name), [str(c) for c in candidates], n=1, cutoff=0.5)
    return f" (did you mean '{match[0]}'?)" if match else ""


def _parameters(fn: Callable) -> dict[str, inspect.Parameter]:
    """Keyword parameters of ``fn``; for a class whose ``__init__`` passes ``**kwargs`` on to its
    base class, the base's parameters too (so typos are caught through one level of subclassing)."""
    params = dict(inspect.signature(fn).parameters)
    if inspect.isclass(fn):
        for base in fn.__mro__[1:]:
            if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
                break
            if base is object or "__init__" not in vars(base):
                continue
            params = {k: p for k, p in params.items() if p.kind is not inspect.Parameter.VAR_KEYWORD}
            for name, p in inspect.signature(base.__init__).parameters.items():
                params.setdefault(name, p)
    return params


def check_kwargs(fn: Callable, kwargs: dict, path: str, owner: str) -> None:
    """Raise ConfigError if ``kwargs`` has a key ``fn`` does not accept, or lacks a required one."""
    params = _parameters(fn)
    accepts_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    allowed = [n for n, p in params.items()
               if p.kind in (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
               and n not in ("self", "cls")]
    if not accepts_any:
        for key in kwargs:
            if key not in allowed:
                raise ConfigError(
                    f"{path}.{key}: '{owner}' has no argument '{key}'{closest(key, allowed)}; "
                    f"valid arguments: {', '.join(sorted(allowed))}")
    for name, p in params.items():
        if (name in allowed and p.default is inspect.Parameter.empty and name not in kwargs):
            raise ConfigError(f"{path}: '{owner}' needs the argument '{name}'")


def construct(obj: Callable, kwargs: dict, path: str, owner: str | None = None,
              errors: tuple[type[Exception], ...] = (TypeError, ValueError)) -> Any:
    """``obj(**kwargs)`` after ``check_kwargs``; ``errors`` raised by it become a ConfigError
    naming ``path`` (the step ``Registry.build`` and every ``from_config`` end with)."""
    owner = owner or getattr(obj, "__name__", str(obj))
    check_kwargs(obj, kwargs, path, owner)
    try:
        return obj(**kwargs)
    except DetkitError:   # ConfigError, or a DatasetError naming the user's file: already clear
        raise
    except errors as e:
        raise ConfigError(f"{path} ({owner}): {e}") from e


class Registry:
    """A named table of classes (or factory functions) buildable from config dicts."""

    def __init__(self, name: str):
        self.name = name
        self._table: dict[str, Callable] = {}

    def register(self, name: str | None = None) -> Callable:
        """Decorator: ``@BACKBONES.register()`` registers under the class name."""

        def deco(obj: Callable) -> Callable:
            key = name or obj.__name__
            if key in self._table:
                raise KeyError(f"{self.name} registry: '{key}' is already registered "
                               f"(by {self._table[key].__module__})")
            self._table[key] = obj
            return obj

        return deco

    def get(self, name: str, path: str = "type") -> Callable:
        if name not in self._table:
            raise ConfigError(
                f"{path}: unknown {self.name} type '{name}'{closest(name, self._table)}; "
                f"registered: {', '.join(sorted(self._table)) or '(none)'}")
        return self._table[name]

    def __contains__(self, name: str) -> bool:
        return name in self._table

    def names(self) -> list[str]:
        return sorted(self._table)

    def build(self, cfg: dict, path: str | None = None, **extra: Any) -> Any:
        """Build ``cfg['type']`` with the other keys (plus ``extra``) as keyword arguments.

        ``path`` is the dotted key path of ``cfg`` in the whole config, used in error messages.
        ``extra`` carries values the parent computes (``input_shapes``, ``num_classes``); a key
        given both ways is an error.
        """
        path = path or self.name
        if not isinstance(cfg, dict):
            raise ConfigError(f"{path}: expected a mapping with a 'type' key, got {type(cfg).__name__}")
        if "type" not in cfg:
            raise ConfigError(f"{path}: missing 'type' (one of: {', '.join(self.names())})")
        kwargs = {k: v for k, v in cfg.items() if k != "type"}
        obj = self.get(cfg["type"], f"{path}.type")
        for key in extra:
            if key in kwargs:
                raise ConfigError(f"{path}.{key}: set by detkit from the other parts of the model; "
                                  f"remove it from the config")
        if hasattr(obj, "from_config"):
            return obj.from_config(kwargs, path=path, **extra)
        kwargs.update(extra)
        return construct(obj, kwargs, path, cfg["type"])


BACKBONES = Registry("backbone")
NECKS = Registry("neck")
HEADS = Registry("head")
DETECTORS = Registry("detector")
DATASETS = Registry("dataset")
TRANSFORMS = Registry("transform")
EVALUATORS = Registry("evaluator")
ROI_POOLERS = Registry("roi_pooler")
