"""The class activation map family: each method is how it turns activations ``A`` and gradients
``G = dy/dA`` (both ``(B, C, *spatial)``) into a signed map ``(B, *spatial)``.

Notation: ``k`` indexes channels, ``ij`` (any number of) spatial positions, ``y`` the target score.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from heatlens.engine.heads import find_head, only_linear
from heatlens.engine.layers import LayerSpec, module_by_name
from heatlens.engine.maps import safe_divide, spatial_dims
from heatlens.methods.base import CAMExplainer, LayerCall, WeightedCAM
from heatlens.methods.principal import first_principal_component
from heatlens.methods.registry import register

__all__ = ["first_principal_component"]  # kept importable from here


@register
class CAM(WeightedCAM):
    """CAM (Zhou et al., CVPR 2016, Eq. 2): ``M_c = sum_k w^c_k A^k`` with ``w^c`` the row of the
    final linear layer for class ``c``.

    Exact only for a head of global average pooling followed by one linear layer. By default the
    head is found and proved at each call (:func:`heatlens.engine.heads.find_head`: it must
    reproduce the model's output from the pooled activations of the layer explained); ``fc``
    names its linear layer instead. Needs no gradient. On such a model Grad-CAM equals CAM up to
    the factor ``1 / (number of positions)`` (Selvaraju et al., ICCV 2017, Sec. 3.1).
    """

    name = "cam"
    needs_gradients = False

    def __init__(self, model: nn.Module, layer: LayerSpec = "auto", *,
                 fc: str | nn.Module | None = None, **options: Any) -> None:
        super().__init__(model, layer, **options)
        if isinstance(fc, str):
            fc = module_by_name(self.model, fc)
        if fc is not None and not isinstance(fc, nn.Linear):
            raise TypeError(f"fc must name an nn.Linear layer, not a {type(fc).__name__}")
        if fc is None and not any(isinstance(m, nn.Linear) for m in self.model.modules()):
            raise ValueError(
                "CAM needs a head of global average pooling followed by one nn.Linear layer, and "
                "this model has no nn.Linear. Grad-CAM works on any model and equals CAM on "
                "those that have such a head: use method='gradcam'."
            )
        self.fc = fc

    def layer_weights(self, call: LayerCall) -> Tensor:
        fc = self.fc if self.fc is not None else self._head(call)
        channels = call.activations.shape[1]
        if fc.in_features != channels:
            raise ValueError(
                f"CAM needs the linear layer to read the pooled {channels} channels of the layer "
                f"explained, but it takes {fc.in_features} features: the head is not global "
                "average pooling + linear at this layer. Use method='gradcam' instead."
            )
        classes = call.classes
        if bool((classes < 0).any()) or bool((classes >= fc.out_features).any()):
            raise ValueError(
                f"CAM needs class indices in 0..{fc.out_features - 1} of the linear layer"
            )
        return fc.weight[classes]

    @staticmethod
    def _head(call: LayerCall) -> nn.Linear:
        try:
            head, _ = find_head(call.model, call.activations, call.prediction, call.name)
        except ValueError as exc:
            raise ValueError(
                f"CAM needs a head of global average pooling followed by one nn.Linear layer at "
                f"the layer explained: {exc} Grad-CAM works on any model and equals CAM on those "
                "that have such a head: use method='gradcam' (or pass fc= to name the layer)."
            ) from None
        linear = only_linear(head)
        if linear is None:
            raise ValueError(
                f"CAM needs a head of global average pooling followed by one nn.Linear layer; "
                f"this model's head is {type(head).__name__} with more than one layer. Use "
                "method='gradcam'."
            )
        return linear


@register
class GradCAM(WeightedCAM):
    """Grad-CAM (Selvaraju et al., ICCV 2017, Eq. 1-2):
    ``alpha_k = mean_ij G^k_ij``, ``M = sum_k alpha_k A^k``."""

    name = "gradcam"

    def channel_weights(self, activations: Tensor, gradients: Tensor | None,
                        classes: Tensor) -> Tensor:
        assert gradients is not None
        return gradients.mean(dim=spatial_dims(gradients))


@register
class GradCAMPlusPlus(WeightedCAM):
    """Grad-CAM++ (Chattopadhay et al., WACV 2018, Eq. 19, with ``Y = exp(y)``):
    ``a^k_ij = G_ij^2 / (2 G_ij^2 + sum_ab A^k_ab G_ij^3)`` (0 where the denominator is 0),
    ``w_k = sum_ij a^k_ij relu(G^k_ij)``, ``M = sum_k w_k A^k``."""

    name = "gradcam++"
    aliases = ("gradcampp", "gradcam_plus_plus")

    def channel_weights(self, activations: Tensor, gradients: Tensor | None,
                        classes: Tensor) -> Tensor:
        assert gradients is not None
        dims = spatial_dims(activations)
        g2 = gradients.pow(2)
        g3 = g2 * gradients
        total = activations.sum(dim=dims, keepdim=True)
        alpha = safe_divide(g2, 2 * g2 + total * g3)
        return (alpha * gradients.clamp_min(0)).sum(dim=dims)


@register
class XGradCAM(WeightedCAM):
    """XGrad-CAM (Fu et al., BMVC 2020, Eq. 15):
    ``alpha_k = sum_ij (A^k_ij / sum_ab A^k_ab) G^k_ij`` (0 where ``sum_ab A^k_ab = 0``),
    ``M = sum_k alpha_k A^k``."""

    name = "xgradcam"

    def channel_weights(self, activations: Tensor, gradients: Tensor | None,
                        classes: Tensor) -> Tensor:
        assert gradients is not None
        dims = spatial_dims(activations)
        return safe_divide((gradients * activations).sum(dim=dims), activations.sum(dim=dims))


@register
class LayerCAM(CAMExplainer):
    """LayerCAM (Jiang et al., IEEE TIP 2021, Eq. 5-6): ``M = sum_k relu(G^k) * A^k`` element-wise.
    Several layers fuse by ``tanh(2 M / max M)`` then element-wise maximum (Sec. III-C)."""

    name = "layercam"
    default_fusion = "tanh-max"

    def terms(self, activations: Tensor, gradients: Tensor | None, classes: Tensor) -> Tensor:
        assert gradients is not None
        return gradients.clamp_min(0) * activations


@register
class HiResCAM(CAMExplainer):
    """HiResCAM (Draelos & Carin, 2020, Eq. 3): ``M = sum_k G^k * A^k`` element-wise; faithful
    to the score for heads of the form pooling + linear."""

    name = "hirescam"

    def terms(self, activations: Tensor, gradients: Tensor | None, classes: Tensor) -> Tensor:
        assert gradients is not None
        return gradients * activations


@register
class GradCAMElementWise(CAMExplainer):
    """Grad-CAM element-wise (as in pytorch-grad-cam): ``M = sum_k relu(G^k * A^k)``,
    HiResCAM with the ReLU inside the channel sum."""

    name = "gradcam_elementwise"
    aliases = ("elementwise",)

    def terms(self, activations: Tensor, gradients: Tensor | None, classes: Tensor) -> Tensor:
        assert gradients is not None
        return (gradients * activations).clamp_min(0)


@register
class EigenCAM(CAMExplainer):
    """Eigen-CAM (Muhammad & Yeasin, IJCNN 2020, Eq. 5): the activations projected on their first
    principal component. Needs no gradient and no target; the sign is made deterministic (see
    :func:`first_principal_component`)."""

    name = "eigencam"
    needs_gradients = False
    needs_target = False

    def cam(self, activations: Tensor, gradients: Tensor | None, classes: Tensor) -> Tensor:
        return first_principal_component(activations)


@register
class EigenGradCAM(CAMExplainer):
    """EigenGrad-CAM (as in pytorch-grad-cam): the first principal component of ``G * A``,
    class-specific through the gradient, sign fixed as in Eigen-CAM."""

    name = "eigengradcam"

    def cam(self, activations: Tensor, gradients: Tensor | None, classes: Tensor) -> Tensor:
        assert gradients is not None
        return first_principal_component(gradients * activations)
