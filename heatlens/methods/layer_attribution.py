"""Attributions at a hidden layer: gradient x activation, integrated gradients and conductance.

Each returns the attribution of every unit of one layer, ``(B, C, *spatial)`` at the layer's
resolution, as ``Explanation.raw_by_layer[layer]``; ``maps`` are its channel sum, ReLU'd,
upsampled to the input and scaled to [0, 1], as the CAMs' are. ``layer=`` is resolved as for the
CAMs (``"auto"``, a dotted name or a module; :mod:`heatlens.engine.layers`), and the activation
is what the rest of the network reads (a functional activation that follows the layer is part of
it, see :func:`~heatlens.engine.capture.forward_with_capture`).
"""

from __future__ import annotations

from abc import abstractmethod
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor, nn

from heatlens.engine.budget import progress, recorded_bytes
from heatlens.engine.capture import forward_with_capture, gradients_of, output_replaced
from heatlens.engine.hooks import forward_hooks
from heatlens.engine.layers import LayerSpec, resolve_layers
from heatlens.engine.maps import minmax, upsample
from heatlens.engine.targets import Target
from heatlens.explanation import Explanation
from heatlens.methods.attribution import (
    AttributionExplainer,
    PassResult,
    broadcast_reference,
    classes_and_scores,
)
from heatlens.methods.base import build_explanation, with_followers
from heatlens.methods.gradients import integration_rule
from heatlens.methods.registry import register


def layer_gradients(model: nn.Module, inputs: Tensor, name: str, module: nn.Module,
                    target: Target, classes: Tensor | None) -> tuple[Tensor, Tensor, PassResult]:
    """The layer's activation on ``inputs`` and the gradient of the target scores w.r.t. it,
    with the pass's output, classes (``None``: read from the output) and scores, and
    ``details["followed_by"]``, the functional activation that follows the layer (or ``""``)."""
    captured = forward_with_capture(model, inputs, {name: module}, with_gradients=True)
    activation = captured.activations[name]
    with torch.enable_grad():
        classes, scores = classes_and_scores(captured.output, target, classes, inputs.shape[0])
    (grad,) = gradients_of(scores, [activation], [name])
    follower = captured.followers.get(name, "")
    return activation.detach(), grad, PassResult(grad, captured.output, classes,
                                                 scores.detach(), {"followed_by": follower})


class LayerAttributionExplainer(AttributionExplainer):
    """Attributions of one hidden layer's units. A subclass defines :meth:`attribute_layer`.

    Args:
        model: any ``nn.Module``; it is left exactly as it was.
        layer: ``"auto"``, a dotted module name or a module (one layer).
        memory_budget: bytes that one chunk of the method's model passes may use.
        show_progress: ``None`` shows a bar for long runs in a terminal.
    """

    family = "layer attributions"
    uses_layer = True

    @abstractmethod
    def attribute_layer(self, x: Tensor, target: Target, classes: Tensor | None, name: str,
                        module: nn.Module) -> PassResult:
        """``(B, C, *spatial)`` attributions of the layer's units for ``classes`` (``None``:
        the target's classes on the model's output, read from the method's own first pass)."""

    def _layer(self, x: Tensor) -> tuple[str, nn.Module, str]:
        choice = resolve_layers(self.model, self.layer, x)
        if len(choice.names) != 1:
            raise ValueError(f"{self.name} attributes to one layer, not {list(choice.names)}")
        return choice.names[0], choice.modules[0], choice.reason

    def attribute(self, x: Tensor, target: Target, classes: Tensor) -> tuple[Tensor, dict]:
        """The attributions at the layer (not the input), with ``details["layer"]``."""
        name, module, _ = self._layer(x)
        result = self.attribute_layer(x, target, classes, name, module)
        return result.attributions, {**result.details, "layer": name}

    def _explain(self, x: Tensor, target: Target) -> Explanation:
        name, module, reason = self._layer(x)
        result = self.attribute_layer(x, target, None, name, module)
        raw = {name: result.attributions.detach()}
        with torch.no_grad():
            maps = self.postprocess(raw, x)
        follower = result.details.get("followed_by", "")
        return build_explanation(self.name, maps, raw, result.output, target, result.classes,
                                 result.scores, (name,),
                                 with_followers(reason, {name: follower} if follower else {}),
                                 result.details)

    def postprocess(self, raw: dict[str, Tensor], x: Tensor) -> Tensor:
        """The channel sum of the layer's attributions, ReLU'd, upsampled to the input and
        min-max scaled (the CAMs' pictures)."""
        (attributions,) = raw.values()
        return minmax(upsample(attributions.sum(dim=1).clamp_min(0).float(), x.shape[2:]))

    def reference(self, x: Tensor) -> Tensor:
        """The input baseline ``x'`` of path methods: zeros or the tensor ``baseline``."""
        baseline = getattr(self, "baseline", "zeros")
        return torch.zeros_like(x) if isinstance(baseline, str) else broadcast_reference(
            baseline, x)


@register
class LayerGradientXActivation(LayerAttributionExplainer):
    """Layer gradient x activation (Shrikumar et al., 2016, at a hidden layer; Captum's
    ``LayerGradientXActivation``): ``A_k = a_k * d y_c / d a_k`` for every unit ``a_k`` of the
    layer's activation."""

    name = "layer_gradient_x_activation"
    aliases = ("layer_gradient_x_input", "layer_input_x_gradient")

    def attribute_layer(self, x: Tensor, target: Target, classes: Tensor | None, name: str,
                        module: nn.Module) -> PassResult:
        activation, grad, result = layer_gradients(self.model, x, name, module, target,
                                                   classes)
        return replace(result, attributions=activation * grad)


class _PathAtLayer(LayerAttributionExplainer):
    """Options shared by the path methods at a layer: the input baseline and the quadrature."""

    def __init__(self, model: nn.Module, layer: LayerSpec = "auto", *, steps: int = 50,
                 rule: str = "gausslegendre", baseline: str | Tensor = "zeros",
                 **options: Any) -> None:
        super().__init__(model, layer, **options)
        integration_rule(rule, steps)  # validates
        if isinstance(baseline, str) and baseline != "zeros":
            raise ValueError(f"baseline must be 'zeros' or a tensor, not {baseline!r}")
        self.steps, self.rule, self.baseline = steps, rule, baseline

    def ends(self, x: Tensor, target: Target, classes: Tensor | None, name: str,
             module: nn.Module) -> tuple[Tensor, PassResult]:
        """One pass without gradients over the inputs and the baseline: the reference
        ``x'``, and the layer's activations ``[a(x); a(x')]`` with the output on ``x``, its
        classes and scores; ``details`` holds the baseline's scores and the follower."""
        reference, batch = self.reference(x), x.shape[0]
        with torch.no_grad():
            both = forward_with_capture(self.model, torch.cat([x, reference]), {name: module},
                                        with_gradients=False)
            output = both.output[:batch] if isinstance(both.output, Tensor) else None
            if output is None:
                output = self.model(x)
            classes, scores = classes_and_scores(output, target, classes, batch)
            base = target.score(both.output, classes.repeat(2))[batch:]
        return reference, PassResult(both.activations[name].detach(), output, classes, scores,
                                     {"reference_scores": base,
                                      "followed_by": both.followers.get(name, "")})

    def completed(self, result: PassResult, attributions: Tensor, **details: Any) -> PassResult:
        """``result`` of :meth:`ends` with the attributions and their completeness delta."""
        gain = result.scores - result.details["reference_scores"]
        return replace(result, attributions=attributions, details={
            "convergence_delta": attributions.flatten(1).sum(1) - gain,
            "followed_by": result.details["followed_by"], **details})

    def chunks(self, x: Tensor, module: nn.Module, points: int) -> list[slice]:
        """The ``points`` points of the path in chunks of equal size, each within the memory
        budget for the whole batch. The network before the layer runs without a graph and the
        graph is recorded from the layer on, so a point costs what
        :func:`~heatlens.engine.budget.recorded_bytes` measures for that pass, and its input."""
        per_point = recorded_bytes(self.model, x[:1], module) + x[0].numel() * x.element_size()
        most = max(1, self.memory_budget // per_point // x.shape[0])
        count = -(-points // most)
        return [slice(i * points // count, (i + 1) * points // count) for i in range(count)]


def _record_from_here(module: nn.Module, args: Any, output: Any) -> None:
    """A forward hook that starts recording gradients at the layer: the network before it
    runs without a graph (undone when the surrounding ``no_grad`` block exits)."""
    torch.set_grad_enabled(True)


@register
class LayerIntegratedGradients(_PathAtLayer):
    """Layer integrated gradients (Sundararajan et al., ICML 2017, Eq. 1, along the path of the
    layer's activation; Captum's ``LayerIntegratedGradients``): with ``a = a(x)`` and
    ``a' = a(x')`` the layer's activations on the input and on the baseline,
    ``A = (a - a') * int_0^1 d y_c / d a (a' + t (a - a')) dt``, the integral by the quadrature
    rule of :class:`~heatlens.methods.gradients.IntegratedGradients` (``steps`` points,
    Gauss-Legendre by default, Captum's default too).

    The straight path is taken in the layer's activation space: the layer's output is replaced
    by each point of the path (the network before it runs on the input, without recording
    gradients). Completeness: ``sum A = y_c(x; a) - y_c(x; a')``, the change of the score when
    the layer's activation goes from ``a'`` to ``a``, up to the rule's error; where every path
    from the input to the output passes through the layer (a stage of a CNN, not a convolution
    inside a residual block) that is ``y_c(x) - y_c(x')``, and ``details["convergence_delta"]``
    reports ``sum A - (y_c(x) - y_c(x'))`` per image.
    """

    name = "layer_integrated_gradients"
    aliases = ("layer_ig",)

    def attribute_layer(self, x: Tensor, target: Target, classes: Tensor | None, name: str,
                        module: nn.Module) -> PassResult:
        alphas, weights = (t.to(x.device, x.dtype) for t in integration_rule(self.rule,
                                                                             self.steps))
        batch = x.shape[0]
        _, ends = self.ends(x, target, classes, name, module)
        a, a_ref = ends.attributions[:batch], ends.attributions[batch:]
        follower = ends.details["followed_by"]
        shape = (-1, *[1] * a.ndim)
        average = torch.zeros_like(a)
        with progress(self.steps * batch, self.name, show=self.show_progress) as bar:
            for part in self.chunks(x, module, self.steps):
                t, w = alphas[part], weights[part]
                points = (a_ref[None] + t.reshape(shape) * (a - a_ref)[None]).flatten(0, 1)
                leaf = points.requires_grad_(True)
                with torch.no_grad(), output_replaced(module, leaf, followed=bool(follower)), \
                        forward_hooks([(module, _record_from_here)]):
                    output = self.model(x.repeat(t.shape[0], *[1] * (x.ndim - 1)))
                    scores = target.score(output, ends.classes.repeat(t.shape[0]))
                (grads,) = gradients_of(scores, [leaf], [name])
                average += (w.reshape(shape) * grads.reshape(-1, *a.shape)).sum(dim=0)
                bar.update(t.shape[0] * batch)
        return self.completed(ends, (a - a_ref) * average)


@register
class LayerConductance(_PathAtLayer):
    """Layer conductance (Dhamdhere, Sundararajan & Yan, "How Important Is a Neuron?",
    ICLR 2019, Eq. 2; Captum's ``LayerConductance``): the flow of integrated gradients through
    each unit ``a_k`` of the layer,
    ``Cond_k = sum_i (x_i - x'_i) int_0^1 d y_c / d a_k * d a_k / d x_i dt``
    ``= int_0^1 d y_c / d a_k (p(t)) * d a_k(p(t)) / dt dt`` on the input path
    ``p(t) = x' + t (x - x')``, computed as Captum does by the chain rule over ``steps + 1``
    points ``t_0 < ... < t_steps`` of the quadrature rule:
    ``Cond_k = sum_j d y_c / d a_k (p(t_j)) (a_k(p(t_{j+1})) - a_k(p(t_j)))``.

    Completeness: where every path from the input to the output passes through the layer,
    ``sum_k Cond_k`` approaches ``y_c(x) - y_c(x')`` as the points fill [0, 1]
    (``details["convergence_delta"]``; the rule's points do not reach 0 and 1 exactly).
    """

    name = "layer_conductance"
    aliases = ("conductance",)

    def attribute_layer(self, x: Tensor, target: Target, classes: Tensor | None, name: str,
                        module: nn.Module) -> PassResult:
        alphas, _ = integration_rule(self.rule, self.steps + 1)
        alphas = alphas.to(x.device, x.dtype)
        reference, ends = self.ends(x, target, classes, name, module)
        batch, shape = x.shape[0], (-1, *[1] * x.ndim)
        total = torch.zeros_like(ends.attributions[:batch])
        previous: tuple[Tensor, Tensor] | None = None  # activation and gradient at the last t
        with progress((self.steps + 1) * batch, self.name, show=self.show_progress) as bar:
            for part in self.chunks(x, module, self.steps + 1):
                t = alphas[part]
                points = (reference[None] + t.reshape(shape) * (x - reference)[None])
                acts, grads, _ = layer_gradients(self.model, points.flatten(0, 1), name, module,
                                                 target, ends.classes.repeat(t.shape[0]))
                acts = acts.reshape(t.shape[0], batch, *acts.shape[1:])
                grads = grads.reshape(acts.shape)
                if previous is not None:
                    acts, grads = torch.cat([previous[0], acts]), torch.cat([previous[1], grads])
                total += (grads[:-1] * (acts[1:] - acts[:-1])).sum(dim=0)
                previous = acts[-1:], grads[-1:]
                bar.update(t.shape[0] * batch)
        return self.completed(ends, total)
