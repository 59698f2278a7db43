"""heatlens: why did the vision model say that?

    import heatlens

    loaded = heatlens.load_model()  # EfficientNet-Lite0, ImageNet
    batch, shown = loaded.preset(heatlens.load_image(heatlens.sample_image_path()))
    heatlens.explain(loaded.model, batch).overlay(shown[0]).save("why.png")

The public names are the keys of ``_PUBLIC`` below and every method class of the registry
(``heatlens.GradCAM``, ...). Each is imported when first used, so ``import heatlens`` costs
almost nothing (torch, torchvision and matplotlib load only when a name needs them).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_PUBLIC = {
    # the front door, its result and the method classes' base
    "explain": "heatlens.api",
    "Explanation": "heatlens.explanation",
    "Explainer": "heatlens.methods.base",
    "NoiseTunnel": "heatlens.methods.tunnel",
    "create_explainer": "heatlens.methods.registry",
    "list_methods": "heatlens.methods.registry",
    "candidate_layers": "heatlens.engine.layers",
    # which map to trust
    "evaluate": "heatlens.metrics.evaluate",
    # whole data sets
    "explain_dataset": "heatlens.datasets.runner",
    "load_run": "heatlens.datasets.results",
    "Run": "heatlens.datasets.results",
    # shortcuts
    "audit": "heatlens.shortcuts.run",
    "AuditReport": "heatlens.shortcuts.report",
    # what to explain
    "Target": "heatlens.engine.targets",
    "ClassLogit": "heatlens.engine.targets",
    "ClassProbability": "heatlens.engine.targets",
    "BinaryOutput": "heatlens.engine.targets",
    "RegressionOutput": "heatlens.engine.targets",
    "CallableTarget": "heatlens.engine.targets",
    "ClassRegion": "heatlens.tasks.segmentation",
    "BoxScore": "heatlens.tasks.detection",
    # concepts
    "factorize": "heatlens.concepts.factorize",
    "Concepts": "heatlens.concepts.factorize",
    # models and images in
    "load_model": "heatlens.loading.models",
    "load_labels": "heatlens.loading.models",
    "LoadedModel": "heatlens.loading.models",
    "load_image": "heatlens.loading.images",
    "sample_image_path": "heatlens.loading.images",
    "Preset": "heatlens.loading.presets",
    "IMAGENET": "heatlens.loading.presets",
    # pictures
    "draw_boxes": "heatlens.pictures.boxes",
    "overlay_with_boxes": "heatlens.pictures.boxes",
}


def _method_classes() -> dict[str, str]:
    from heatlens.methods.registry import catalog

    return {info.class_name: info.module for info in catalog().values()}


def __getattr__(name: str) -> Any:
    if name == "__all__":
        return sorted([*_PUBLIC, *_method_classes(), "__version__"])
    module = _PUBLIC.get(name) or _method_classes().get(name)
    if module is None:
        raise AttributeError(f"module 'heatlens' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups find it directly
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__getattr__("__all__")})
