"""Explanation methods, one module per family, reachable by name through the registry.

Importing this package imports no method: :func:`method_class` and :func:`create_explainer`
import a method's module when it is first asked for (see :mod:`heatlens.methods.registry`).
"""

from heatlens.methods.registry import (
    canonical_name,
    catalog,
    create_explainer,
    list_methods,
    method_class,
    method_info,
    method_options,
    register,
)

__all__ = [
    "canonical_name",
    "catalog",
    "create_explainer",
    "list_methods",
    "method_class",
    "method_info",
    "method_options",
    "register",
]
