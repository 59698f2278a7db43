"""FullGrad: input-gradients and the bias-gradients of every layer, summed over the network."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from heatlens.engine.capture import forward_with_capture, gradients_of
from heatlens.engine.layers import LayerSpec, resolve_layers
from heatlens.engine.maps import minmax, upsample
from heatlens.engine.targets import Target
from heatlens.explanation import Explanation
from heatlens.methods.base import Explainer, build_explanation
from heatlens.methods.registry import register

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def effective_bias(module: nn.Module) -> Tensor:
    """The bias a layer adds: a convolution's ``b``; for batch norm in eval mode,
    ``beta - mu * gamma / sqrt(var + eps)``."""
    if isinstance(module, _NORMS):
        scale = module.weight / torch.sqrt(module.running_var + module.eps)
        return module.bias - module.running_mean * scale
    return module.bias


def bias_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every convolution with a bias and every affine batch norm with running statistics."""
    return [
        (name, m) for name, m in model.named_modules()
        if (isinstance(m, _CONVS) and m.bias is not None)
        or (isinstance(m, _NORMS) and m.affine and m.running_mean is not None)
    ]


def _channel_sum_of_scaled(maps: Tensor, size: Sequence[int], eps: float = 1e-7) -> Tensor:
    """``(B, C, *s)`` non-negative maps: each channel scaled as ``(m - min) / (max - min + eps)``,
    upsampled, then summed over channels. The ``eps`` damps channels whose range is tiny."""
    batch, channels = maps.shape[:2]
    flat = maps.flatten(0, 1).flatten(1)
    low = flat.amin(dim=1, keepdim=True)
    scaled = (flat - low) / (flat.amax(dim=1, keepdim=True) - low + eps)
    scaled = upsample(scaled.reshape(batch * channels, *maps.shape[2:]), size)
    return scaled.reshape(batch, channels, *size).sum(dim=1)


@register
class FullGrad(Explainer):
    """FullGrad (Srinivas & Fleuret, NeurIPS 2019, Eq. 7): the full-gradient decomposition
    ``f(x) = grad_x f . x + sum_l sum_c grad_{b_lc} f . b_lc`` shown as
    ``M = psi(|x * grad_x f|) + sum_l sum_c psi(|b_lc * G_lc|)`` where ``G_lc`` is the gradient at
    the output of layer ``l``, channel ``c``, and ``psi`` scales each channel to [0, 1] as
    ``(m - min) / (max - min + 1e-7)`` and upsamples it to the input size; the sum is min-max
    scaled.

    Layers: every convolution with a bias and every batch norm (its effective bias, eval mode),
    or those named in ``layer``. ``psi`` per channel, with its ``eps``, is pytorch-grad-cam's
    choice, reproduced exactly; the authors' code scales each layer's channels together (with
    ``eps = 1e-6``) instead.
    """

    name = "fullgrad"
    family = "pixel attributions"

    def __init__(self, model: nn.Module, layer: LayerSpec = "auto") -> None:
        super().__init__(model)
        self.layer = layer

    def _layers(self, x: Tensor) -> tuple[list[tuple[str, nn.Module]], str]:
        if isinstance(self.layer, str) and self.layer == "auto":
            found = bias_layers(self.model)
            if not found:
                raise ValueError(
                    "FullGrad needs layers with a bias (convolutions with bias=True or batch "
                    "norm); this model has none. Use method='gradcam' or an input-gradient method."
                )
            return found, f"auto: all {len(found)} convolution and batch-norm layers with a bias"
        choice = resolve_layers(self.model, self.layer, x)
        for name, module in zip(choice.names, choice.modules, strict=True):
            if not (isinstance(module, _CONVS + _NORMS) and getattr(module, "bias", None)
                    is not None):
                raise ValueError(f"FullGrad needs layers with a bias; {name!r} "
                                 f"({type(module).__name__}) has none")
        return list(zip(choice.names, choice.modules, strict=True)), choice.reason

    def _explain(self, x: Tensor, target: Target) -> Explanation:
        layers, reason = self._layers(x)
        goal = target
        captured = forward_with_capture(self.model, x, dict(layers), with_gradients=True,
                                        input_gradients=True, follow_activations=False)
        classes = goal.classes(captured.output, x.shape[0]).to(x.device)
        with torch.enable_grad():
            scores = goal.score(captured.output, classes)
        names = [name for name, _ in layers]
        grads = gradients_of(scores, [captured.inputs, *(captured.activations[n] for n in names)],
                             ["input", *names])
        size = x.shape[2:]
        with torch.no_grad():
            input_term = x * grads[0]
            raw = {"input": input_term.sum(dim=1)}
            total = _channel_sum_of_scaled(input_term.abs(), size)
            for (name, module), grad in zip(layers, grads[1:], strict=True):
                bias = effective_bias(module).detach().reshape(1, -1, *[1] * (grad.ndim - 2))
                term = bias * grad
                raw[name] = term.sum(dim=1)
                total += _channel_sum_of_scaled(term.abs(), size)
            maps = minmax(total)
        return build_explanation(self.name, maps, raw, captured.output, goal, classes, scores,
                                 ("input", *names), reason)
