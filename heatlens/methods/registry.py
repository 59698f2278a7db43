"""Method registry: canonical names and aliases, matched case-insensitively."""

from __future__ import annotations

import difflib
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from torch import nn

    from heatlens.methods.base import Explainer

E = TypeVar("E", bound="type[Explainer]")

_METHODS: dict[str, type[Explainer]] = {}
_ALIASES: dict[str, str] = {}


def _key(name: str) -> str:
    return name.strip().lower().replace("_", "").replace("-", "")


def register(cls: E) -> E:
    """Class decorator: make ``cls`` reachable by ``cls.name`` and each of ``cls.aliases``."""
    for alias in (cls.name, *cls.aliases):
        key = _key(alias)
        if key in _ALIASES and _ALIASES[key] != cls.name:
            raise ValueError(f"method name {alias!r} is taken by {_ALIASES[key]!r}")
        _ALIASES[key] = cls.name
    _METHODS[cls.name] = cls
    return cls


def list_methods() -> list[str]:
    """Canonical names of all registered methods, sorted."""
    return sorted(_METHODS)


def method_class(name: str) -> type[Explainer]:
    """The class registered under ``name`` or an alias (case, '-' and '_' ignored)."""
    key = _key(name)
    if key not in _ALIASES:
        close = difflib.get_close_matches(key, list(_ALIASES), n=3, cutoff=0.6)
        hint = f" Did you mean {', '.join(repr(_ALIASES[c]) for c in close)}?" if close else ""
        raise ValueError(
            f"unknown method {name!r}.{hint} Available: {', '.join(list_methods())}"
        )
    return _METHODS[_ALIASES[key]]


def create_explainer(name: str, model: nn.Module, **options: Any) -> Explainer:
    """Build the explainer registered as ``name`` for ``model``, passing ``options`` on."""
    return method_class(name)(model, **options)
