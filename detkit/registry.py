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

import collections.abc
import difflib
import importlib
import inspect
import types
import typing
from typing import Any, Callable, Sequence

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
            for name, p in inspect.signature(vars(base)["__init__"]).parameters.items():
                params.setdefault(name, p)
    return params


def check_kwargs(fn: Callable, kwargs: dict, path: str, owner: str, *,
                 also_valid: Sequence[str] = ()) -> None:
    """Raise ConfigError if ``kwargs`` has a key ``fn`` does not accept, or lacks a required one.

    ``also_valid``: keys of the same config node that the caller consumed before (a detector's
    ``num_classes``, ``backbone`` ...): a typo of one of them is suggested and they are listed
    among the valid arguments, so ``num_clases`` gets "did you mean 'num_classes'".
    """
    params = _parameters(fn)
    accepts_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    allowed = [n for n, p in params.items()
               if p.kind in (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
               and n not in ("self", "cls")]
    if not accepts_any:
        valid = sorted({*allowed, *also_valid})
        for key in kwargs:
            if key not in allowed:
                raise ConfigError(
                    f"{path}.{key}: '{owner}' has no argument '{key}'{closest(key, valid)}; "
                    f"valid arguments: {', '.join(valid)}")
    for name, p in params.items():
        if (name in allowed and p.default is inspect.Parameter.empty and name not in kwargs):
            raise ConfigError(f"{path}: '{owner}' needs the argument '{name}'")


def _type_hints(fn: Callable) -> dict[str, Any]:
    """Resolved annotations of ``fn`` (a class: its ``__init__`` and, through ``**kwargs``, its
    bases'); empty where they cannot be resolved, which turns the type check off rather than on."""
    functions = [fn]
    if inspect.isclass(fn):
        functions = [vars(c)["__init__"] for c in fn.__mro__ if c is not object and "__init__" in vars(c)]
    hints: dict[str, Any] = {}
    for function in functions:
        try:
            for name, hint in typing.get_type_hints(function).items():
                hints.setdefault(name, hint)
        except Exception:  # noqa: BLE001 - an unresolvable annotation: no check for that function
            continue
    return hints


_SEQUENCES = (list, tuple, collections.abc.Sequence)


def _fits(value: Any, hint: Any) -> bool:
    """Whether a config value can be ``hint``: plain scalars, mappings and sequences (with their
    item type) are checked; anything else (modules, callables, Literal ...) is accepted."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, a) for a in args)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if hint is dict or origin in (dict, collections.abc.Mapping):
        return isinstance(value, dict)
    if hint in _SEQUENCES or origin in _SEQUENCES:
        if not isinstance(value, (list, tuple)):
            return False
        item = args[0] if args and (origin is not tuple or (len(args) == 2 and args[1] is Ellipsis)) else Any
        return item is Any or all(_fits(v, item) for v in value)
    return True


def _type_name(hint: Any) -> str:
    if isinstance(hint, type):
        return hint.__name__
    return str(hint).replace("typing.", "").replace("collections.abc.", "")


def check_types(fn: Callable, kwargs: dict, path: str) -> None:
    """Raise ConfigError naming the key when a value cannot have its annotated type (e.g. a list
    for an ``int`` or a number for a ``dict``), before the constructor fails on it anonymously."""
    hints = _type_hints(fn)
    for key, value in kwargs.items():
        if key in hints and not _fits(value, hints[key]):
            raise ConfigError(f"{path}.{key}: expected {_type_name(hints[key])}, got {value!r} "
                              f"({type(value).__name__})")


def construct(obj: Callable, kwargs: dict, path: str, owner: str | None = None,
              errors: tuple[type[Exception], ...] = (TypeError, ValueError)) -> Any:
    """``obj(**kwargs)`` after ``check_kwargs``; ``errors`` raised by it become a ConfigError
    naming ``path`` (the step ``Registry.build`` and every ``from_config`` end with)."""
    name = owner or str(getattr(obj, "__name__", obj))
    check_kwargs(obj, kwargs, path, name)
    check_types(obj, kwargs, path)
    try:
        return obj(**kwargs)
    except DetkitError:   # ConfigError, or a DatasetError naming the user's file: already clear
        raise
    except errors as e:
        raise ConfigError(f"{path} ({name}): {e}") from e


class Registry:
    """A named table of classes (or factory functions) buildable from config dicts.

    ``loads``: modules whose import registers detkit's own entries (``detkit.models`` for the
    model parts). They are imported on the first lookup, so building from a registry works
    without importing them first (the registry module itself cannot import them: they import it).
    """

    def __init__(self, name: str, *, loads: Sequence[str] = ()):
        self.name = name
        self._table: dict[str, Callable] = {}
        self._pending_loads = list(loads)

    def _load_own_parts(self) -> None:
        while self._pending_loads:  # popped first: the import registers into this very registry
            importlib.import_module(self._pending_loads.pop(0))

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
        self._load_own_parts()
        if name not in self._table:
            raise ConfigError(
                f"{path}: unknown {self.name} type '{name}'{closest(name, self._table)}; "
                f"registered: {', '.join(sorted(self._table)) or '(none)'}")
        return self._table[name]

    def __contains__(self, name: str) -> bool:
        self._load_own_parts()
        return name in self._table

    def names(self) -> list[str]:
        self._load_own_parts()
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
        return construct(obj, kwargs, path, str(cfg["type"]))


BACKBONES = Registry("backbone", loads=["detkit.models"])
NECKS = Registry("neck", loads=["detkit.models"])
HEADS = Registry("head", loads=["detkit.models"])
DETECTORS = Registry("detector", loads=["detkit.models"])
DATASETS = Registry("dataset", loads=["detkit.data"])
TRANSFORMS = Registry("transform", loads=["detkit.data"])
EVALUATORS = Registry("evaluator", loads=["detkit.evaluation"])
ROI_POOLERS = Registry("roi_pooler", loads=["detkit.models"])
