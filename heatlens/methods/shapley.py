"""ShapleyCAM: channel weights from the gradient and a Hessian-vector product."""

from __future__ import annotations

from contextlib import ExitStack, suppress

import torch
from torch import Tensor, nn

from heatlens.engine.attention import attention_recorded
from heatlens.engine.capture import forward_with_capture
from heatlens.engine.maps import spatial_dims
from heatlens.engine.tokens import as_map
from heatlens.methods.base import LayerCall, WeightedCAM
from heatlens.methods.registry import register


def gradient_and_hvp(call: LayerCall) -> tuple[Tensor, Tensor]:
    """``G = dy/dA`` and ``H A`` (``H = d^2 y / dA^2``) at the layer of ``call``, in the layer's
    own layout: one forward pass recorded from the layer on, the gradient taken with its graph,
    and the Hessian-vector product as the gradient of ``G . A`` with ``A`` held fixed. Where
    ``G`` does not depend on ``A`` (a network piecewise linear after the layer), ``H A = 0``."""
    with eager_attention(call.model):
        captured = forward_with_capture(call.model, call.inputs, {call.name: call.module},
                                        with_gradients=True)
    acts = captured.activations[call.name]
    with torch.enable_grad():
        score = call.target.score(captured.output, call.classes).sum()
        (grad,) = torch.autograd.grad(score, acts, create_graph=True)
        hvp = None
        if grad.requires_grad:
            (hvp,) = torch.autograd.grad(grad, acts, grad_outputs=acts.detach(),
                                         allow_unused=True)
    return grad.detach(), torch.zeros_like(grad) if hvp is None else hvp.detach()


def eager_attention(model: nn.Module) -> ExitStack:
    """A context in which a transformer's attention runs its written-out softmax (fused
    attention has no second derivative in torch); nothing for a model without attention."""
    stack = ExitStack()
    with suppress(ValueError):  # no attention module, or windowed attention: left as it is
        stack.enter_context(attention_recorded(model))
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
    ``heatlens.ClassProbability``. The product costs one more forward pass from the layer on and
    a double backward.
    """

    name = "shapleycam"
    aliases = ("shapley_cam",)
    needs_gradients = False  # the gradient is taken here, with its graph

    def layer_weights(self, call: LayerCall) -> Tensor:
        grad, hvp = gradient_and_hvp(call)
        combined = as_map(call.layout, grad - 0.5 * hvp)
        return combined.mean(dim=spatial_dims(combined))
