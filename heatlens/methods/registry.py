"""Method registry: canonical names and aliases, matched case-insensitively, with ``-`` and ``_``
ignored (``"Grad-CAM++"``, ``"gradcampp"`` and ``"gradcam++"`` are one method).

Names follow one style: the paper's name of the method in lower case, its words joined by ``_``,
a hyphenated name such as Grad-CAM or Score-CAM counting as one word (``gradcam``,
``integrated_gradients``, ``attention_rollout``, ``smooth_gradcam++``). Since separators are
ignored, the spellings of earlier versions (``integratedgradients``) still name their method.

The built-in methods are known without importing them: :func:`catalog` reads the ``name``,
``aliases`` and docstring of every class decorated with :func:`register` from the source of this
package, so that listing methods (``heatlens methods``) and starting the command line need no
torch; a method's module is imported when the method is first asked for (:func:`method_class`).
Classes of the user's, decorated with :func:`register`, join at run time.
"""

from __future__ import annotations

import ast
import difflib
import importlib
import inspect
import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from torch import nn

    from heatlens.methods.base import Explainer

E = TypeVar("E", bound="type[Explainer]")

_METHODS: dict[str, type[Explainer]] = {}  # registered at run time, by canonical name
_ALIASES: dict[str, str] = {}  # key of a name or alias -> canonical name, run-time classes

_ANCHOR_OPTIONS = {
    "n_steps": "steps", "baselines": "baseline", "method": "rule", "target_layers": "layer",
    "target_layer": "layer", "sliding_window_shapes": "window", "strides": "stride",
    "nt_samples": "samples", "stdevs": "noise", "internal_batch_size": "memory_budget",
    "batch_size": "memory_budget", "n_samples": "samples",
}
"""Option names of Captum and pytorch-grad-cam, and what heatlens calls them."""


@dataclass(frozen=True)
class MethodInfo:
    """A registered method, as its source states it."""

    name: str
    aliases: tuple[str, ...]
    module: str
    """The module that defines it, such as ``"heatlens.methods.cam"``."""
    class_name: str
    doc: str
    """The class docstring: the equation, the paper, the variant chosen."""

    @property
    def summary(self) -> str:
        """The docstring's first paragraph on one line, without reST markup."""
        first = re.sub(r":\w+:`~?([^`]*)`", r"\1", self.doc.split("\n\n")[0])
        return " ".join(first.replace("``", "").split())


def key(name: str) -> str:
    """The form names are matched in: lower case, without ``-``, ``_`` and spaces."""
    return name.strip().lower().replace("_", "").replace("-", "").replace(" ", "")


@cache
def catalog() -> dict[str, MethodInfo]:
    """The built-in methods by canonical name, read from this package's source (no import)."""
    found: dict[str, MethodInfo] = {}
    for path in sorted(Path(__file__).parent.glob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in tree.body:
            if isinstance(node, ast.ClassDef) and any(
                    isinstance(d, ast.Name) and d.id == "register" for d in node.decorator_list):
                fields = _literal_fields(node)
                found[fields["name"]] = MethodInfo(
                    fields["name"], tuple(fields.get("aliases", ())),
                    f"{__package__}.{path.stem}", node.name, ast.get_docstring(node) or "")
    return found


def _literal_fields(node: ast.ClassDef) -> dict[str, Any]:
    fields = {}
    for statement in node.body:
        if (isinstance(statement, ast.Assign) and len(statement.targets) == 1
                and isinstance(statement.targets[0], ast.Name)
                and statement.targets[0].id in ("name", "aliases")):
            fields[statement.targets[0].id] = ast.literal_eval(statement.value)
    if "name" not in fields:
        raise RuntimeError(f"registered method {node.name} states no literal `name = ...`")
    return fields


@cache
def _built_in_aliases() -> dict[str, str]:
    aliases: dict[str, str] = {}
    for info in catalog().values():
        for alias in (info.name, *info.aliases):
            if aliases.setdefault(key(alias), info.name) != info.name:
                raise RuntimeError(f"method name {alias!r} is taken by {aliases[key(alias)]!r}")
    return aliases


def register(cls: E) -> E:
    """Class decorator: make ``cls`` reachable by ``cls.name`` and each of ``cls.aliases``."""
    built_in = _built_in_aliases()
    for alias in (cls.name, *cls.aliases):
        owner = _ALIASES.get(key(alias)) or built_in.get(key(alias))
        if owner is not None and owner != cls.name:
            raise ValueError(f"method name {alias!r} is taken by {owner!r}")
        _ALIASES[key(alias)] = cls.name
    _METHODS[cls.name] = cls
    return cls


def list_methods() -> list[str]:
    """Canonical names of all registered methods, sorted."""
    return sorted({*catalog(), *_METHODS})


def canonical_name(name: str) -> str:
    """The canonical name of a method name or alias; a ``ValueError`` with close matches."""
    if not isinstance(name, str):
        raise TypeError(f"method must be a name (str), not {type(name).__name__}")
    aliases = {**_built_in_aliases(), **_ALIASES}
    found = aliases.get(key(name))
    if found is None:
        close = difflib.get_close_matches(key(name), list(aliases), n=3, cutoff=0.6)
        hint = f" Did you mean {', '.join(repr(aliases[c]) for c in close)}?" if close else ""
        raise ValueError(
            f"unknown method {name!r}.{hint} Available: {', '.join(list_methods())}"
        )
    return found


def method_info(name: str) -> MethodInfo:
    """What the source says of a method (name, aliases, docstring), without importing it."""
    canonical = canonical_name(name)
    if canonical in catalog():
        return catalog()[canonical]
    cls = _METHODS[canonical]
    return MethodInfo(cls.name, tuple(cls.aliases), cls.__module__, cls.__qualname__,
                      inspect.getdoc(cls) or "")


def method_class(name: str) -> type[Explainer]:
    """The class registered under ``name`` or an alias (case, '-' and '_' ignored)."""
    canonical = canonical_name(name)
    if canonical not in _METHODS:
        importlib.import_module(catalog()[canonical].module)  # its @register fills _METHODS
    return _METHODS[canonical]


def method_options(cls: type) -> list[str]:
    """The keyword options a method class takes, from its constructor and those it passes its
    ``**options`` on to."""
    names: list[str] = []
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        parameters = list(inspect.signature(init).parameters.values())[2:]  # self, model
        names += [p.name for p in parameters
                  if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        if not any(p.kind == p.VAR_KEYWORD for p in parameters):
            break
    return list(dict.fromkeys(names))


def create_explainer(name: str, model: nn.Module, **options: Any) -> Explainer:
    """Build the explainer registered as ``name`` for ``model``, passing ``options`` on.

    An option the method does not take is a ``TypeError`` listing the options it does take
    (and, for Captum's and pytorch-grad-cam's names, what heatlens calls them)."""
    cls = method_class(name)
    known = method_options(cls)
    unknown = [option for option in options if option not in known]
    if unknown:
        option = unknown[0]
        if option in _ANCHOR_OPTIONS and _ANCHOR_OPTIONS[option] in known:
            hint = f" (it is called {_ANCHOR_OPTIONS[option]!r} here)"
        else:
            close = difflib.get_close_matches(option, known, n=2, cutoff=0.6)
            hint = f" (did you mean {' or '.join(map(repr, close))}?)" if close else ""
        raise TypeError(f"{cls.name} has no option {option!r}{hint}; its options are "
                        f"{', '.join(known)}")
    return cls(model, **options)
