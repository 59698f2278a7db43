"""FullGrad: input-gradients and the bias-gradients of every layer, summed over the network."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor, nn

from heatlens.engine.capture import forward_with_capture, gradients_of
from heatlens.engine.layers import LayerSpec, resolve_layers
from heatlens.engine.maps import minmax, upsample
from heatlens.engine.targets import Target
from heatlens.explanation import Explanation
from heatlens.methods.augment import aug_smoothed
from heatlens.methods.base import Explainer, build_explanation
from heatlens.methods.principal import first_principal_component
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


def _scaled(maps: Tensor, eps: float = 1e-7) -> Tensor:
    """Each channel of ``(B, C, *s)`` maps scaled as ``(m - min) / (max - min + eps)`` (the
    ``eps`` damps channels whose range is tiny)."""
    flat = maps.flatten(2)
    low = flat.amin(dim=2, keepdim=True)
    return ((flat - low) / (flat.amax(dim=2, keepdim=True) - low + eps)).reshape(maps.shape)


def _resized(maps: Tensor, size: Sequence[int]) -> Tensor:
    """Each channel of ``(B, C, *s)`` maps resized to ``size`` (:func:`upsample`)."""
    return upsample(maps.flatten(0, 1), size).reshape(*maps.shape[:2], *size)


def eigen_grid(size: Sequence[int]) -> tuple[int, ...]:
    """The grid of FullGrad's ``eigen_smooth``: ``size // 8`` per axis; a ``ValueError`` where
    that leaves fewer than two positions (one position has no principal component)."""
    grid = tuple(s // 8 for s in size)
    if math.prod(grid) < 2:
        raise ValueError(
            f"FullGrad's eigen_smooth takes the principal component of its per-layer maps over "
            f"the positions of a grid 1/8 of the input's size; an input of {tuple(size)} leaves "
            f"{grid}, fewer than two positions. Use a larger input or eigen_smooth=False"
        )
    return grid


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

    Args:
        eigen_smooth: instead of the sum of the per-layer maps ``psi(|x_i * grad_{x_i} f|)`` (one
            per input channel ``i``) and ``sum_c psi(|b_lc * G_lc|)`` (one per layer ``l``), the
            first principal component of these maps, each scaled to [0, 1] again and resized
            to ``size // 8``, as the ``(positions, maps)`` matrix centred over positions (see
            :mod:`heatlens.methods.principal`); it is resized to the input and min-max scaled
            with no ReLU. This is what pytorch-grad-cam's ``FullGrad`` does with
            ``eigen_smooth=True`` (a component across layers, not channels, at 1/8 of the
            input's size), reproduced; the sign is the one that correlates with the sum of the
            maps, pytorch-grad-cam's is the SVD's.
        aug_smooth: the map averaged over six test-time augmentations (see
            :mod:`heatlens.methods.augment`), as pytorch-grad-cam's ``aug_smooth=True``.
    """

    name = "fullgrad"
    family = "pixel attributions"

    def __init__(self, model: nn.Module, layer: LayerSpec = "auto", *,
                 eigen_smooth: bool = False, aug_smooth: bool = False) -> None:
        super().__init__(model)
        self.layer = layer
        self.eigen_smooth = eigen_smooth
        self.aug_smooth = aug_smooth

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
        if self.eigen_smooth:
            eigen_grid(x.shape[2:])  # before any work
        if self.aug_smooth:
            return aug_smoothed(self._explain_once, self.model, x, target, with_gradients=True)
        return self._explain_once(x, target)

    def _explain_once(self, x: Tensor, target: Target) -> Explanation:
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
            terms = [(name, effective_bias(module).detach().reshape(1, -1, *[1] * (g.ndim - 2))
                      * g) for (name, module), g in zip(layers, grads[1:], strict=True)]
            raw.update((name, term.sum(dim=1)) for name, term in terms)

            def layer_maps() -> Iterator[Tensor]:
                """``(B, n, *size)``: the input's channels' maps, then each layer's. Resizing
                is linear, so a layer's channels are summed before it, not after."""
                yield _scaled(input_term.abs())
                for _, term in terms:
                    yield _resized(_scaled(term.abs()).sum(dim=1, keepdim=True), size)

            if self.eigen_smooth:
                stacked = _resized(_scaled(torch.cat(list(layer_maps()), dim=1)),
                                   eigen_grid(size))
                maps = minmax(upsample(first_principal_component(stacked), size))
            else:
                maps = minmax(sum(m.sum(dim=1) for m in layer_maps()))
        return build_explanation(self.name, maps, raw, captured.output, goal, classes, scores,
                                 ("input", *names), reason)
