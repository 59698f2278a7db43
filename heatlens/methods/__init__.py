"""Explanation methods, one module per family, reachable by name through the registry."""

from heatlens.methods.base import CAMExplainer, Explainer
from heatlens.methods.cam import (
    CAM,
    EigenCAM,
    EigenGradCAM,
    GradCAM,
    GradCAMElementWise,
    GradCAMPlusPlus,
    HiResCAM,
    LayerCAM,
    XGradCAM,
)
from heatlens.methods.registry import create_explainer, list_methods, method_class, register

__all__ = [
    "CAM",
    "CAMExplainer",
    "EigenCAM",
    "EigenGradCAM",
    "Explainer",
    "GradCAM",
    "GradCAMElementWise",
    "GradCAMPlusPlus",
    "HiResCAM",
    "LayerCAM",
    "XGradCAM",
    "create_explainer",
    "list_methods",
    "method_class",
    "register",
]
