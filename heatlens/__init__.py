"""heatlens: why did the vision model say that?

>>> import heatlens
>>> explanation = heatlens.explain(model, batch, method="gradcam")  # doctest: +SKIP
>>> explanation.overlay(image).save("why.png")  # doctest: +SKIP
"""

from heatlens.api import explain
from heatlens.explanation import Explanation
from heatlens.layers import candidate_layers
from heatlens.methods import (
    CAM,
    EigenCAM,
    EigenGradCAM,
    Explainer,
    GradCAM,
    GradCAMElementWise,
    GradCAMPlusPlus,
    HiResCAM,
    LayerCAM,
    XGradCAM,
    create_explainer,
    list_methods,
)
from heatlens.targets import (
    BinaryOutput,
    CallableTarget,
    ClassLogit,
    ClassProbability,
    RegressionOutput,
    Target,
)

__version__ = "0.1.0"

__all__ = [
    "CAM",
    "BinaryOutput",
    "CallableTarget",
    "ClassLogit",
    "ClassProbability",
    "EigenCAM",
    "EigenGradCAM",
    "Explainer",
    "Explanation",
    "GradCAM",
    "GradCAMElementWise",
    "GradCAMPlusPlus",
    "HiResCAM",
    "LayerCAM",
    "RegressionOutput",
    "Target",
    "XGradCAM",
    "__version__",
    "candidate_layers",
    "create_explainer",
    "explain",
    "list_methods",
]
