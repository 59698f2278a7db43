"""Explanation methods, one module per family, reachable by name through the registry."""

from heatlens.methods.ablation import AblationCAM
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
from heatlens.methods.fullgrad import FullGrad
from heatlens.methods.gradients import (
    Deconvnet,
    GuidedBackprop,
    GuidedGradCAM,
    InputXGradient,
    IntegratedGradients,
    Saliency,
)
from heatlens.methods.perturbation import RISE, Occlusion
from heatlens.methods.registry import create_explainer, list_methods, method_class, register
from heatlens.methods.rollout import AttentionRollout, Chefer, GradientRollout
from heatlens.methods.score import ISCAM, SSCAM, ScoreCAM
from heatlens.methods.smooth import SmoothGradCAMPlusPlus

__all__ = [
    "CAM",
    "ISCAM",
    "RISE",
    "SSCAM",
    "AblationCAM",
    "AttentionRollout",
    "CAMExplainer",
    "Chefer",
    "Deconvnet",
    "EigenCAM",
    "EigenGradCAM",
    "Explainer",
    "FullGrad",
    "GradCAM",
    "GradCAMElementWise",
    "GradCAMPlusPlus",
    "GradientRollout",
    "GuidedBackprop",
    "GuidedGradCAM",
    "HiResCAM",
    "InputXGradient",
    "IntegratedGradients",
    "LayerCAM",
    "Occlusion",
    "Saliency",
    "ScoreCAM",
    "SmoothGradCAMPlusPlus",
    "XGradCAM",
    "create_explainer",
    "list_methods",
    "method_class",
    "register",
]
