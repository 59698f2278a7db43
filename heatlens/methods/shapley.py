"""ShapleyCAM: channel weights from the gradient and a Hessian-vector product."""

from __future__ import annotations

from contextlib import ExitStack, suppress

import torch
from torch import Tensor, nn

from heatlens.engine.attention import attention_recorded, switched
from heatlens.engine.capture import Captured, gradients_of
from heatlens.engine.maps import spatial_dims
from heatlens.methods.base import WeightedCAM
from heatlens.methods.registry import register


def shapley_gradients(scores: Tensor, activations: list[Tensor], names: tuple[str, ...]
                      ) -> list[Tensor]:
    """``G - (1/2) H A`` for each layer's activation ``A`` (its own layout), with
    ``G = dy/dA`` (``y`` the sum of the scores) taken with its graph and the Hessian-vector
    product ``H A`` (``H = d^2 y / dA^2``) as the gradient of ``G . A`` with ``A`` held fixed.
    Where ``G`` does not depend on ``A`` (a network piecewise linear after the layer),
    ``H A = 0``."""
    if not scores.requires_grad:
        return gradients_of(scores, activations, names)  # raises: no gradient can flow
    firsts = torch.autograd.grad(scores.sum(), activations, create_graph=True,
                                 allow_unused=True)
    if any(first is None for first in firsts):
        return gradients_of(scores, activations, names)  # raises, naming the layer
    combined = []
    for act, grad in zip(activations, firsts, strict=True):
        hvp = None
        if grad.requires_grad:
            (hvp,) = torch.autograd.grad(grad, act, grad_outputs=act.detach(),
                                         retain_graph=True, allow_unused=True)
        combined.append(grad.detach() if hvp is None else grad.detach() - 0.5 * hvp)
    return combined


def eager_attention(model: nn.Module) -> ExitStack:
    """A context in which a transformer's attention runs its written-out softmax: torch's fused
    attention has no second derivative (``scaled_dot_product_attention`` on CPU raises
    "derivative for aten::_scaled_dot_product_flash_attention_for_cpu_backward is not
    implemented" in a double backward). Global attention is switched by
    :func:`~heatlens.engine.attention.attention_recorded`; every other module with timm's
    ``fused_attn`` switch (Swin's windowed ``WindowAttention``, ...) gets ``fused_attn = False``
    for the call (restored afterwards). Nothing changes for a model without attention."""
    stack = ExitStack()
    with suppress(ValueError):  # no global attention module (none at all, or windowed ones)
        stack.enter_context(attention_recorded(model))
    for module in model.modules():
        if getattr(module, "fused_attn", None) is True:
            stack.enter_context(switched(module, "fused_attn", False))
    return stack


@register
class ShapleyCAM(WeightedCAM):
    """ShapleyCAM (Cai et al., "CAMs as Shapley Value-based Explainers", arXiv 2501.06261,
    2025): the Shapley value of each activation, approximated to second order in a Taylor
    expansion of the score around ``A``, gives
    ``w_k = mean_ij (G - (1/2) H A)^k_ij`` with ``G = dy/dA`` and ``H A`` the Hessian-vector
    product ``(d^2 y / dA^2) A``; ``M = sum_k w_k A^k``.

    Where the network after the layer is piecewise linear (ReLU, max-pooling, batch norm in eval
    mode) and the score a logit, ``H A = 0`` and ShapleyCAM is Grad-CAM; it differs through
    smooth activations (SiLU, GELU, softmax attention) or a smooth score such as
    ``heatlens.ClassProbability``. The product costs a double backward from the score to the
    layer, in the one forward pass that captures the layer.

    On transformers the layer's tokens are laid out as a grid (:mod:`heatlens.engine.tokens`:
    a ViT's patch tokens, Swin's channels-last maps), and attention runs its eager path for the
    double backward (:func:`eager_attention`), windowed attention included.
    """

    name = "shapleycam"
    aliases = ("shapley_cam",)

    def capture(self, x: Tensor, layers: dict[str, nn.Module]) -> Captured:
        with eager_attention(self.model):
            return super().capture(x, layers)

    def layer_gradients(self, scores: Tensor, activations: list[Tensor],
                        names: tuple[str, ...]) -> list[Tensor]:
        """``G - (1/2) H A`` (:func:`shapley_gradients`) in place of ``G``."""
        return shapley_gradients(scores, activations, names)

    def channel_weights(self, activations: Tensor, gradients: Tensor | None,
                        classes: Tensor) -> Tensor:
        """``mean_ij (G - (1/2) H A)^k_ij``; ``gradients`` holds ``G - (1/2) H A``."""
        assert gradients is not None
        return gradients.mean(dim=spatial_dims(gradients))
