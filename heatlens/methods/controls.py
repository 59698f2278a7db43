"""Controls that show what a map looks like without the evidence a method claims to read:
SobelCAM (the image's edges, no model) and RandomCAM (random channel weights, no target).

A map that scores like these controls (on a metric, or by eye) shows nothing the model used.
Both reuse the control maps of :mod:`heatlens.metrics.controls`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from heatlens.engine.layers import LayerSpec
from heatlens.engine.maps import minmax
from heatlens.engine.targets import Target, Untargeted
from heatlens.explanation import Explanation
from heatlens.methods.base import Explainer, WeightedCAM, build_explanation
from heatlens.methods.registry import register
from heatlens.methods.sampling import seeded_generator
from heatlens.metrics.controls import edge_map, random_map


def control_explanation(method: str, x: Tensor, raw: Tensor, reason: str) -> Explanation:
    """An explanation whose map is ``minmax(raw)``, a model-blind map ``(B, H, W)`` at the
    input's size. The model is not run: no class, score or probability is reported (the target
    is ignored, as a control ignores the model)."""
    goal = Untargeted()
    classes = goal.classes(None, x.shape[0]).to(x.device)
    return build_explanation(method, minmax(raw), {"input": raw.float()}, None, goal, classes,
                             goal.score(None, classes), ("input",), reason)


@register
class SobelCAM(Explainer):
    """SobelCAM (pytorch-grad-cam's ``sobel_cam``, a control after Adebayo et al., "Sanity
    Checks for Saliency Maps", NeurIPS 2018): the input's edges, ``M = sqrt(G_x^2 + G_y^2)``
    with ``G_x = S_x * I``, ``G_y = S_y * I`` the 3 x 3 Sobel filters on the grey image
    ``I = mean_c x_c`` (:func:`heatlens.metrics.controls.edge_map`), min-max scaled. Ignores
    the model.

    Variant: pytorch-grad-cam's function takes an 8-bit RGB picture, makes it grey with the
    luma weights ``0.299 R + 0.587 G + 0.114 B``, combines the filters as
    ``(|G_x| + |G_y|) / 2`` rounded and saturated to 8 bits, and reflects the border; this map
    is the gradient magnitude of the tensor the model sees, in float, with the border repeated.
    """

    name = "sobelcam"
    family = "controls"
    aliases = ("sobel",)
    reads_model = False

    def __init__(self, model: nn.Module, layer: LayerSpec = "auto") -> None:
        super().__init__(model)

    def _explain(self, x: Tensor, target: Target) -> Explanation:
        if x.ndim != 4:
            raise ValueError(f"SobelCAM needs images (B, C, H, W), got shape {tuple(x.shape)}")
        return control_explanation(self.name, x, edge_map(x),
                                   "model-blind control: the input's Sobel edges")


@register
class RandomCAM(WeightedCAM):
    """RandomCAM (pytorch-grad-cam's control): ``M = sum_k w_k A^k`` with random channel weights
    ``w_k ~ U(-1, 1)``, drawn for each image from ``seed`` (a new ``seed`` draws new weights).
    The map shows the layer's activations in random combination: what a CAM looks like that
    reads neither the gradient nor the target.

    ``model_blind=True`` ignores the model as well: the map is uniform noise per pixel,
    ``M_ij ~ U[0, 1)`` (:func:`heatlens.metrics.controls.random_map`).
    """

    name = "randomcam"
    family = "controls"
    aliases = ("random",)
    needs_gradients = False
    needs_target = False

    def __init__(self, model: nn.Module, layer: LayerSpec = "auto", *, seed: int = 0,
                 model_blind: bool = False, **options: Any) -> None:
        super().__init__(model, layer, **options)
        self.seed, self.model_blind = seed, model_blind

    def channel_weights(self, activations: Tensor, gradients: Tensor | None,
                        classes: Tensor) -> Tensor:
        generator = seeded_generator(self.seed, 0, activations.device)
        draws = torch.rand(activations.shape[:2], generator=generator, device=activations.device)
        return 2 * draws - 1

    def _explain(self, x: Tensor, target: Target) -> Explanation:
        if not self.model_blind:
            return super()._explain(x, target)
        if x.ndim != 4:
            raise ValueError(f"model_blind needs images (B, C, H, W), got {tuple(x.shape)}")
        noise = random_map(x.shape[0], x.shape[2:],
                           seeded_generator(self.seed, 0, x.device))
        return control_explanation(self.name, x, noise, "model-blind control: uniform noise")
