"""heatlens: why did the vision model say that?

    import heatlens

    loaded = heatlens.load_model()  # EfficientNet-Lite0, ImageNet
    batch, shown = loaded.preset(heatlens.load_image(heatlens.sample_image_path()))
    heatlens.explain(loaded.model, batch).overlay(shown[0]).save("why.png")
"""

from heatlens.api import explain
from heatlens.concepts.factorize import Concepts, factorize
from heatlens.engine.layers import candidate_layers
from heatlens.engine.targets import (
    BinaryOutput,
    CallableTarget,
    ClassLogit,
    ClassProbability,
    RegressionOutput,
    Target,
)
from heatlens.explanation import Explanation
from heatlens.loading.images import load_image, sample_image_path
from heatlens.loading.models import LoadedModel, load_labels, load_model
from heatlens.loading.presets import IMAGENET, Preset
from heatlens.methods import (
    CAM,
    ISCAM,
    RISE,
    SSCAM,
    AblationCAM,
    AttentionRollout,
    Chefer,
    Deconvnet,
    EigenCAM,
    EigenGradCAM,
    Explainer,
    FullGrad,
    GradCAM,
    GradCAMElementWise,
    GradCAMPlusPlus,
    GradientRollout,
    GuidedBackprop,
    GuidedGradCAM,
    HiResCAM,
    InputXGradient,
    IntegratedGradients,
    LayerCAM,
    Occlusion,
    Saliency,
    ScoreCAM,
    SmoothGradCAMPlusPlus,
    XGradCAM,
    create_explainer,
    list_methods,
)
from heatlens.methods.tunnel import NoiseTunnel
from heatlens.pictures.boxes import draw_boxes, overlay_with_boxes
from heatlens.tasks.detection import BoxScore
from heatlens.tasks.segmentation import ClassRegion

__version__ = "0.1.0"

__all__ = [
    "CAM",
    "IMAGENET",
    "ISCAM",
    "RISE",
    "SSCAM",
    "AblationCAM",
    "AttentionRollout",
    "BinaryOutput",
    "BoxScore",
    "CallableTarget",
    "Chefer",
    "ClassLogit",
    "ClassProbability",
    "ClassRegion",
    "Concepts",
    "Deconvnet",
    "EigenCAM",
    "EigenGradCAM",
    "Explainer",
    "Explanation",
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
    "LoadedModel",
    "NoiseTunnel",
    "Occlusion",
    "Preset",
    "RegressionOutput",
    "Saliency",
    "ScoreCAM",
    "SmoothGradCAMPlusPlus",
    "Target",
    "XGradCAM",
    "__version__",
    "candidate_layers",
    "create_explainer",
    "draw_boxes",
    "explain",
    "factorize",
    "list_methods",
    "load_image",
    "load_labels",
    "load_model",
    "overlay_with_boxes",
    "sample_image_path",
]
