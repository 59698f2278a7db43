"""Methods that run another CAM method and transform what it gives (Finer-CAM, SESS,
RefineCAM): the wrapped method is named by ``base=`` and takes the options the wrapper does not.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from heatlens.engine.layers import LayerSpec
from heatlens.methods.base import CAMExplainer, Explainer
from heatlens.methods.registry import create_explainer


class Wrapper(Explainer):
    """An explainer around a CAM method ``base`` (a registry name or alias), built with
    ``layer`` and the remaining ``options``; the wrapper's result is named after itself."""

    family = "gradient CAMs"
    default_base = "gradcam"

    def __init__(self, model: nn.Module, layer: LayerSpec = "auto", *, base: str | None = None,
                 **options: Any) -> None:
        super().__init__(model)
        inner = create_explainer(base or self.default_base, model, layer=layer, **options)
        if not isinstance(inner, CAMExplainer) or isinstance(inner, Wrapper):
            raise TypeError(f"{self.name} runs around a CAM method (gradcam, gradcam++, "
                            f"scorecam, ...), not {inner.name}")
        self.base: CAMExplainer = inner
