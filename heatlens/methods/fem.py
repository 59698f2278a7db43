"""FEM, the Feature Explanation Method: channels weighted by how often they fire far above
their own mean."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from heatlens.engine.layers import LayerSpec
from heatlens.engine.maps import spatial_dims
from heatlens.methods.base import WeightedCAM
from heatlens.methods.registry import register


@register
class FEM(WeightedCAM):
    """FEM (Fuad et al., "Features understanding in 3D CNNs for actions recognition in video",
    IPTA 2020): with ``mu_k`` and ``sigma_k`` the mean and standard deviation of channel ``k``
    over positions, ``w_k = mean_ij [A^k_ij > mu_k + k sigma_k]`` (the share of positions where
    the channel stands ``k`` standard deviations above its mean; ``k = 2`` by default) and
    ``M = sum_k w_k A^k``.

    Needs no gradient and no target (the map is the same for every class). ``sigma`` is the
    population standard deviation, as pytorch-grad-cam computes it with NumPy.
    """

    name = "fem"
    aliases = ("feature_explanation_method",)
    needs_gradients = False
    needs_target = False

    def __init__(self, model: nn.Module, layer: LayerSpec = "auto", *, k: float = 2.0,
                 **options: Any) -> None:
        super().__init__(model, layer, **options)
        self.k = k

    def channel_weights(self, activations: Tensor, gradients: Tensor | None,
                        classes: Tensor) -> Tensor:
        dims = spatial_dims(activations)
        std, mean = torch.std_mean(activations, dim=dims, correction=0, keepdim=True)
        threshold = mean + self.k * std
        return (activations > threshold).to(activations.dtype).mean(dim=dims)

