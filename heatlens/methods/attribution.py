"""The engine of pixel attributions: a signed attribution for every input element.

An attribution method returns ``(B, C, *spatial)``; the :class:`~heatlens.Explanation` keeps it
signed and unscaled as ``raw_by_layer["input"]`` and shows ``maps`` = the absolute value of the
channel sum scaled as Captum's default picture does (:func:`percentile_scale`, 2 % outliers).
Signed pictures come from :mod:`heatlens.pictures.attribution`.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from heatlens.engine.budget import DEFAULT_BUDGET, budget_bytes, items_per_chunk, progress
from heatlens.engine.layers import LayerSpec
from heatlens.engine.targets import Target
from heatlens.explanation import Explanation
from heatlens.methods.base import Explainer, build_explanation

OUTLIER_PERCENT = 2.0


def percentile_scale(maps: Tensor, outlier_percent: float = OUTLIER_PERCENT) -> Tensor:
    """Divide each non-negative map by the value at which the sorted values' running total
    reaches ``100 - outlier_percent`` % of the whole (Captum's threshold), and clip to [0, 1];
    the few largest values saturate. An all-zero map stays zero."""
    flat = maps.flatten(1).float()
    values = flat.sort(dim=1).values
    running = values.cumsum(dim=1)
    reach = running[:, -1:] * (1 - outlier_percent / 100)
    index = (running < reach).sum(dim=1, keepdim=True).clamp(max=flat.shape[1] - 1)
    top = values.gather(1, index)
    scaled = torch.where(top > 0, flat / top.clamp_min(1e-30), torch.zeros_like(flat))
    return scaled.clamp(0, 1).reshape(maps.shape)


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
        goal = target
        with torch.no_grad():
            output = self.model(x)
            classes = goal.classes(output, x.shape[0]).to(x.device)
            scores = goal.score(output, classes)
        attributions, details = self.attribute(x, goal, classes)
        with torch.no_grad():
            maps = self.postprocess({"input": attributions}, x)
        return build_explanation(self.name, maps, {"input": attributions.detach()}, output, goal,
                                 classes, scores, ("input",), "attributions on the input",
                                 details)

    def postprocess(self, raw: dict[str, Tensor], x: Tensor) -> Tensor:
        """The attributions ``raw["input"]`` to ``maps`` (see :func:`attribution_maps`)."""
        return attribution_maps(raw["input"])

    def chunked_gradients(self, inputs: Tensor, target: Target, classes: Tensor,
                          rule: Callable[[], Any] | None = None) -> tuple[Tensor, Tensor]:
        """Gradients of the target scores w.r.t. each of ``inputs`` (``(N, C, *spatial)``, with
        one class each), and the scores, in chunks within the memory budget."""
        per_chunk = items_per_chunk(self.model, inputs[:1], self.memory_budget,
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
