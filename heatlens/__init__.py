"""heatlens: why did the vision model say that?

    import heatlens

    loaded = heatlens.load_model()  # EfficientNet-Lite0, ImageNet
    batch, shown = loaded.preset(heatlens.load_image(heatlens.sample_image_path()))
    heatlens.explain(loaded.model, batch).overlay(shown[0]).save("why.png")
"""

from heatlens.api import explain
from heatlens.explanation import Explanation
from heatlens.images import load_image, sample_image_path
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
from heatlens.models import LoadedModel, load_labels, load_model
from heatlens.presets import IMAGENET, Preset
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
    "IMAGENET",
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
    "LoadedModel",
    "Preset",
    "RegressionOutput",
    "Target",
    "XGradCAM",
    "__version__",
    "candidate_layers",
    "create_explainer",
    "explain",
    "list_methods",
    "load_image",
    "load_labels",
    "load_model",
    "sample_image_path",
]
