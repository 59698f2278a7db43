"""Gradient attributions: saliency, input x gradient, guided backpropagation, deconvnet,
Guided Grad-CAM and integrated gradients."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from heatlens.engine.budget import items_per_chunk, progress
from heatlens.engine.layers import LayerSpec
from heatlens.engine.maps import gaussian_blur, upsample
from heatlens.engine.targets import Target
from heatlens.methods.attribution import AttributionExplainer, broadcast_reference, input_gradients
from heatlens.methods.cam import GradCAM
from heatlens.methods.registry import register


@register
class Saliency(AttributionExplainer):
    """Saliency (Simonyan et al., 2014, Eq. 3): ``A = d y_c / d x``, signed; ``absolute=True``
    gives ``|d y_c / d x|`` (the paper's, and Captum's default)."""

    name = "saliency"
    aliases = ("gradient", "vanilla_gradient")

    def __init__(self, model: nn.Module, layer: LayerSpec = "auto", *, absolute: bool = False,
                 **options: Any) -> None:
        super().__init__(model, layer, **options)
        self.absolute = absolute

    def attribute(self, x: Tensor, target: Target, classes: Tensor) -> tuple[Tensor, dict]:
        grad, _ = self.chunked_gradients(x, target, classes)
        return (grad.abs() if self.absolute else grad), {}


@register
class InputXGradient(AttributionExplainer):
    """Input x gradient (Shrikumar et al., 2016): ``A = x * d y_c / d x``."""

    name = "input_x_gradient"
    aliases = ("gradient_x_input",)

    def attribute(self, x: Tensor, target: Target, classes: Tensor) -> tuple[Tensor, dict]:
        grad, _ = self.chunked_gradients(x, target, classes)
        return x * grad, {}


class _RuleReLU(torch.autograd.Function):
    """ReLU whose backward pass follows a modified rule:
    guided backpropagation ``g_in = relu(g_out) * [x > 0]``, deconvnet ``g_in = relu(g_out)``."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, guided: bool) -> Tensor:
        out = x.clamp_min(0)
        ctx.save_for_backward(out)
        ctx.guided = guided
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        (out,) = ctx.saved_tensors
        passed = grad.clamp_min(0)
        return (passed * (out > 0) if ctx.guided else passed), None


_RELUS = {torch.relu, torch.relu_, F.relu, F.relu_, Tensor.relu, Tensor.relu_}
_IN_PLACE = {torch.relu_, F.relu_, Tensor.relu_}


class ReLURule(TorchFunctionMode):
    """While active on this thread, every ReLU, whether an ``nn.ReLU`` module (in place or not)
    or ``torch.relu`` / ``F.relu`` / ``x.relu_()`` called in a forward method, computes
    ``max(x, 0)`` with the backward rule of :class:`_RuleReLU` (in place where the call was).
    Other activations (ReLU6, GELU) keep their gradient, as in Captum. Nothing of the model is
    changed."""

    def __init__(self, guided: bool) -> None:
        super().__init__()
        self.guided = guided

    def __torch_function__(self, func: Any, types: Any, args: tuple = (),
                           kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func not in _RELUS:
            return func(*args, **kwargs)
        x = args[0]
        out = _RuleReLU.apply(x, self.guided)
        if func in _IN_PLACE or kwargs.get("inplace"):  # F.relu passes inplace by keyword
            x.copy_(out)  # callers of an in-place ReLU may ignore its return value
            return x
        return out


@register
class GuidedBackprop(AttributionExplainer):
    """Guided backpropagation (Springenberg et al., ICLR 2015 workshop, Eq. in Fig. 1): the
    gradient ``d y_c / d x`` with every ReLU passing back only positive gradients where its
    input was positive, ``g_in = relu(g_out) * [x > 0]``."""

    name = "guided_backprop"
    aliases = ("guided_backpropagation",)
    guided = True

    def attribute(self, x: Tensor, target: Target, classes: Tensor) -> tuple[Tensor, dict]:
        grad, _ = self.chunked_gradients(x, target, classes, lambda: ReLURule(self.guided))
        return grad, {}


@register
class Deconvnet(GuidedBackprop):
    """Deconvnet (Zeiler & Fergus, ECCV 2014): the gradient with every ReLU replaced, on the way
    back, by a ReLU of the incoming gradient, ``g_in = relu(g_out)``."""

    name = "deconvnet"
    aliases = ("deconvolution",)
    guided = False


@register
class GuidedGradCAM(AttributionExplainer):
    """Guided Grad-CAM (Selvaraju et al., ICCV 2017, Sec. 3.1): guided backpropagation times
    the ReLU'd, unscaled Grad-CAM map upsampled to the input (``upsampling="bilinear"`` as in
    the paper; ``"nearest"`` is Captum's default)."""

    name = "guided_gradcam"
    uses_layer = True

    def __init__(self, model: nn.Module, layer: LayerSpec = "auto", *,
                 upsampling: str = "bilinear", **options: Any) -> None:
        super().__init__(model, layer, **options)
        if upsampling not in ("bilinear", "nearest"):
            raise ValueError(f"upsampling must be 'bilinear' or 'nearest', not {upsampling!r}")
        self.upsampling = upsampling

    def attribute(self, x: Tensor, target: Target, classes: Tensor) -> tuple[Tensor, dict]:
        cam = GradCAM(self.model, layer=self.layer)(x, target=target)
        if len(cam.layers) != 1:
            raise ValueError("Guided Grad-CAM takes one layer")
        grad, _ = self.chunked_gradients(x, target, classes, lambda: ReLURule(True))
        coarse = cam.raw.clamp_min(0)
        size = x.shape[2:]
        if self.upsampling == "nearest":
            fine = F.interpolate(coarse[:, None], size=tuple(size))[:, 0]  # mode="nearest"
        else:
            fine = upsample(coarse, size)
        return grad * fine[:, None], {"layer": cam.layers[0]}


RULES = ("riemann_left", "riemann_right", "riemann_middle", "riemann_trapezoid", "gausslegendre")


def integration_rule(rule: str, steps: int) -> tuple[Tensor, Tensor]:
    """Points ``alpha_i`` in [0, 1] and weights ``w_i`` of a quadrature rule for the integral
    over [0, 1]: Riemann sums (left, right, middle, trapezoid) or Gauss-Legendre."""
    if rule not in RULES:
        raise ValueError(f"rule must be one of {RULES}, not {rule!r}")
    if steps < (2 if rule == "riemann_trapezoid" else 1):
        raise ValueError(f"{rule} needs more steps than {steps}")
    if rule == "gausslegendre":
        nodes, weights = np.polynomial.legendre.leggauss(steps)
        return torch.from_numpy(0.5 * (nodes + 1)), torch.from_numpy(0.5 * weights)
    index = torch.arange(steps, dtype=torch.float64)
    weights = torch.full((steps,), 1 / steps, dtype=torch.float64)
    if rule == "riemann_trapezoid":
        alphas = index / (steps - 1)
        weights = torch.full((steps,), 1 / (steps - 1), dtype=torch.float64)
        weights[[0, -1]] /= 2
    else:
        offset = {"riemann_left": 0.0, "riemann_right": 1.0, "riemann_middle": 0.5}[rule]
        alphas = (index + offset) / steps
    return alphas, weights


BASELINES = ("zeros", "blur", "uniform")


@register
class IntegratedGradients(AttributionExplainer):
    """Integrated gradients (Sundararajan et al., ICML 2017, Eq. 1 and 3):
    ``A = (x - x') * int_0^1 d y_c / d x (x' + a (x - x')) da``, the integral by a quadrature rule
    ``sum_i w_i g(alpha_i)`` with ``steps`` points (Gauss-Legendre by default, or a Riemann sum).

    Completeness: ``sum A = y_c(x) - y_c(x')`` up to the rule's error, which is reported per image
    as ``Explanation.details["convergence_delta"] = sum A - (y_c(x) - y_c(x'))``.

    ``baseline``: ``"zeros"``, ``"blur"`` (the input blurred by a Gaussian of ``blur_sigma``
    pixels), ``"uniform"`` (uniform noise over each input's value range, seeded), or a tensor
    broadcastable to the inputs. The ``B * steps`` interpolated inputs run in chunks within
    ``memory_budget``. The trapezoid rule uses the textbook weights ``1 / (steps - 1)`` (halved
    at both ends); Captum's uses ``1 / steps``, which sums to ``(steps - 1) / steps``.
    """

    name = "integrated_gradients"
    aliases = ("ig",)

    def __init__(self, model: nn.Module, layer: LayerSpec = "auto", *, steps: int = 50,
                 rule: str = "gausslegendre", baseline: str | Tensor = "zeros",
                 blur_sigma: float = 8.0, seed: int = 0, **options: Any) -> None:
        super().__init__(model, layer, **options)
        integration_rule(rule, steps)  # validates
        if isinstance(baseline, str) and baseline not in BASELINES:
            raise ValueError(f"baseline must be one of {BASELINES} or a tensor, not {baseline!r}")
        self.steps, self.rule, self.baseline = steps, rule, baseline
        self.blur_sigma, self.seed = blur_sigma, seed

    def baseline_for(self, x: Tensor) -> Tensor:
        """The baseline ``x'`` for each input."""
        if isinstance(self.baseline, Tensor):
            return broadcast_reference(self.baseline, x)
        if self.baseline == "zeros":
            return torch.zeros_like(x)
        if self.baseline == "blur":
            return gaussian_blur(x, self.blur_sigma)
        generator = torch.Generator(device=x.device).manual_seed(self.seed)
        noise = torch.rand(x.shape[1:], generator=generator, device=x.device, dtype=x.dtype)
        low = x.flatten(1).amin(1).reshape(-1, *[1] * (x.ndim - 1))
        high = x.flatten(1).amax(1).reshape(-1, *[1] * (x.ndim - 1))
        return low + (high - low) * noise

    def attribute(self, x: Tensor, target: Target, classes: Tensor) -> tuple[Tensor, dict]:
        alphas, weights = (t.to(x.device, x.dtype) for t in integration_rule(self.rule,
                                                                             self.steps))
        base = self.baseline_for(x)
        batch, shape = x.shape[0], (-1, *[1] * x.ndim)
        step = max(1, items_per_chunk(self.model, x, self.memory_budget,
                                      with_gradients=True) // batch)
        average = torch.zeros_like(x)
        with progress(self.steps * batch, self.name, show=self.show_progress) as bar:
            for first in range(0, self.steps, step):  # a chunk of points at a time
                a, w = alphas[first : first + step], weights[first : first + step]
                points = base[None] + a.reshape(shape) * (x - base)[None]  # (k, B, C, *S)
                grads, _ = input_gradients(self.model, points.flatten(0, 1), target,
                                           classes.repeat(a.shape[0]))
                average += (w.reshape(shape) * grads.reshape(points.shape)).sum(dim=0)
                bar.update(points.shape[0] * batch)
        attributions = (x - base) * average
        with torch.no_grad():
            end_scores = target.score(self.model(torch.cat([x, base])), classes.repeat(2))
        gain = end_scores[: x.shape[0]] - end_scores[x.shape[0] :]
        delta = attributions.flatten(1).sum(1) - gain
        return attributions, {"convergence_delta": delta, "baseline": base}
