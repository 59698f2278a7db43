"""The engine of pixel attributions: a signed attribution for every input element.

An attribution method returns ``(B, C, *spatial)``; the :class:`~heatlens.Explanation` keeps it
signed and unscaled as ``raw_by_layer["input"]`` and shows ``maps`` = the absolute value of the
channel sum scaled as Captum's default picture does (:func:`percentile_scale`, 2 % outliers).
Signed pictures come from :mod:`heatlens.pictures.attribution`.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from heatlens.engine.budget import DEFAULT_BUDGET, budget_bytes, items_per_chunk, progress
from heatlens.engine.layers import LayerSpec
from heatlens.engine.targets import Target, primary_output
from heatlens.explanation import Explanation
from heatlens.methods.base import Explainer, build_explanation

OUTLIER_PERCENT = 2.0


def percentile_scale(maps: Tensor, outlier_percent: float = OUTLIER_PERCENT) -> Tensor:
    """Divide each non-negative map by the value at which the sorted values' running total
    reaches ``100 - outlier_percent`` % of the whole (Captum's threshold), and clip to [0, 1];
    the few largest values saturate. An all-zero map stays zero.

    With ``0 <= outlier_percent < 100`` the threshold's index, the number of running totals
    below the reach, is at most ``n - 1`` (the last total is the whole, not below it), and the
    threshold is 0 only for an all-zero map, which the floor of the divisor keeps at 0."""
    if not 0 <= outlier_percent < 100:
        raise ValueError(f"outlier_percent must be in [0, 100), not {outlier_percent!r}")
    flat = maps.flatten(1).float()
    values = flat.sort(dim=1).values
    running = values.cumsum(dim=1)
    reach = running[:, -1:] * (1 - outlier_percent / 100)
    top = values.gather(1, (running < reach).sum(dim=1, keepdim=True))
    return (flat / top.clamp_min(1e-30)).clamp(0, 1).reshape(maps.shape)


def attribution_maps(attributions: Tensor) -> Tensor:
    """``(B, C, *spatial)`` attributions to ``(B, *spatial)`` maps in [0, 1]."""
    return percentile_scale(attributions.sum(dim=1).abs())


class AttributionExplainer(Explainer):
    """Attributions on the input. A subclass defines :meth:`attribute`.

    Args:
        model: any ``nn.Module``; it is left exactly as it was.
        layer: only ``"auto"``; methods that use a layer (Guided Grad-CAM) accept a name.
        memory_budget: bytes that one chunk of the method's model passes may use.
        show_progress: ``None`` shows a bar for long runs in a terminal.
    """

    family = "pixel attributions"
    uses_layer = False

    def __init__(self, model: nn.Module, layer: LayerSpec = "auto", *,
                 memory_budget: int = DEFAULT_BUDGET, show_progress: bool | None = None) -> None:
        super().__init__(model)
        if not self.uses_layer and not (isinstance(layer, str) and layer == "auto"):
            raise ValueError(f"{self.name} attributes to the input: layer= does not apply")
        self.layer = layer
        self.memory_budget = budget_bytes(memory_budget)
        self.show_progress = show_progress

    @abstractmethod
    def attribute(self, x: Tensor, target: Target, classes: Tensor) -> tuple[Tensor, dict]:
        """``(B, C, *spatial)`` attributions of ``classes`` and a dict of extra results."""

    def _explain(self, x: Tensor, target: Target) -> Explanation:
        with torch.no_grad():
            output = self.model(x)
            classes = target.classes(output, x.shape[0]).to(x.device)
            scores = target.score(output, classes)
        attributions, details = self.attribute(x, target, classes)
        with torch.no_grad():
            maps = self.postprocess({"input": attributions}, x)
        return build_explanation(self.name, maps, {"input": attributions.detach()}, output,
                                 target, classes, scores, ("input",), "attributions on the input",
                                 details)

    def postprocess(self, raw: dict[str, Tensor], x: Tensor) -> Tensor:
        """The attributions ``raw["input"]`` to ``maps`` (see :func:`attribution_maps`)."""
        return attribution_maps(raw["input"])

    def chunked_gradients(self, inputs: Tensor, target: Target, classes: Tensor,
                          rule: Callable[[], Any] | None = None) -> tuple[Tensor, Tensor]:
        """Gradients of the target scores w.r.t. each of ``inputs`` (``(N, C, *spatial)``, with
        one class each), and the scores, in chunks within the memory budget."""
        per_chunk = items_per_chunk(self.model, inputs, self.memory_budget,
                                    with_gradients=True)
        grads, scores = [], []
        with progress(inputs.shape[0], self.name, show=self.show_progress) as bar:
            for start in range(0, inputs.shape[0], per_chunk):
                part = inputs[start : start + per_chunk]
                g, s = input_gradients(self.model, part, target,
                                       classes[start : start + per_chunk], rule)
                grads.append(g)
                scores.append(s)
                bar.update(part.shape[0])
        return torch.cat(grads), torch.cat(scores)


def input_gradients(model: nn.Module, x: Tensor, target: Target, classes: Tensor,
                    rule: Callable[[], Any] | None = None) -> tuple[Tensor, Tensor]:
    """``d y_c / d x`` for each input and its class, and the scores ``y_c``. ``rule`` is a
    context (a torch function mode) that changes how gradients pass some operations."""
    leaf = x.detach().requires_grad_(True)
    with torch.enable_grad():
        if rule is None:
            output = model(leaf)
        else:
            with rule():
                output = model(leaf)
        scores = target.score(output, classes)
        total = scores.sum()
    if not total.requires_grad:
        raise ValueError("the target score does not depend on the input: no gradient can flow")
    (grad,) = torch.autograd.grad(total, leaf)
    return grad, scores.detach()


def broadcast_reference(reference: Tensor, x: Tensor, what: str = "baseline") -> Tensor:
    """A reference tensor (a baseline) given by the user, on ``x``'s device and dtype and
    broadcast to ``x``'s shape; a ``ValueError`` saying both shapes when it does not fit."""
    try:
        return torch.broadcast_to(reference.to(x), x.shape)
    except RuntimeError:
        raise ValueError(f"{what} of shape {tuple(reference.shape)} does not broadcast to the "
                         f"inputs' shape {tuple(x.shape)}") from None


def reference_distribution(reference: Tensor, x: Tensor) -> Tensor:
    """A distribution of references ``(K, C, *spatial)`` for inputs ``x`` ``(B, C, *spatial)``
    (a single ``(C, *spatial)`` reference is a distribution of one)."""
    reference = reference.to(x)
    if reference.ndim == x.ndim - 1:
        reference = reference[None]
    if reference.ndim != x.ndim or reference.shape[1:] != x.shape[1:]:
        raise ValueError(f"baselines must be (K, {', '.join(map(str, x.shape[1:]))}) to go "
                         f"with inputs of shape {tuple(x.shape)}, not {tuple(reference.shape)}")
    return reference


def with_input(func: Callable[..., Any], rest: tuple = (), kwargs: dict | None = None
               ) -> Callable[..., Any]:
    """``func(x, *rest, **kwargs)`` as a function of its first argument(s) ``x``: an operation
    caught by a torch function mode, to be run again on other inputs."""
    kwargs = kwargs or {}

    def call(*xs: Any) -> Any:
        return func(*xs, *rest, **kwargs)

    return call


@dataclass(frozen=True)
class PassResult:
    """What one attribution pass gives: the attributions, and the model's output on the inputs
    with the class explained for each image and its score (read from that output)."""

    attributions: Tensor
    output: Any
    classes: Tensor
    scores: Tensor
    details: dict


class OnePassAttribution(AttributionExplainer):
    """An attribution method whose own pass over the inputs gives the model's output, from
    which the class explained is read, sparing :class:`AttributionExplainer`'s separate pass.
    A subclass defines :meth:`attribute_pass`, which takes the classes when they are known
    (``None``: read them from the output) and :meth:`fits_one_pass`."""

    @abstractmethod
    def attribute_pass(self, x: Tensor, target: Target, classes: Tensor | None) -> PassResult:
        """The attributions of ``x`` for ``classes`` (or the target's classes on the output)."""

    def fits_one_pass(self, x: Tensor) -> bool:
        """Whether the whole batch runs in one pass (otherwise the classes come first)."""
        return x.shape[0] <= items_per_chunk(self.model, x, self.memory_budget,
                                             with_gradients=True)

    def attribute(self, x: Tensor, target: Target, classes: Tensor) -> tuple[Tensor, dict]:
        result = self.attribute_pass(x, target, classes)
        return result.attributions, result.details

    def _explain(self, x: Tensor, target: Target) -> Explanation:
        if not self.fits_one_pass(x):
            return super()._explain(x, target)
        result = self.attribute_pass(x, target, None)
        with torch.no_grad():
            maps = self.postprocess({"input": result.attributions}, x)
        return build_explanation(self.name, maps, {"input": result.attributions.detach()},
                                 result.output, target, result.classes, result.scores,
                                 ("input",), "attributions on the input", result.details)


def classes_and_scores(output: Any, target: Target, classes: Tensor | None, batch: int
                       ) -> tuple[Tensor, Tensor]:
    """The classes (given, or the target's on ``output``) and their scores, differentiable."""
    if classes is None:
        classes = target.classes(output, batch).to(primary_output(output).device)
    return classes, target.score(output, classes)
