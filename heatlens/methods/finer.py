"""Finer-CAM: the evidence for a class against its most similar classes."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from heatlens.engine.layers import LayerSpec
from heatlens.engine.targets import (
    ClassIndices,
    ClassLogit,
    ClassProbability,
    Target,
    class_indices,
    primary_output,
)
from heatlens.explanation import Explanation
from heatlens.methods.registry import register
from heatlens.methods.wrapping import Wrapper

SIMILAR = (1, 2, 3)
"""Ranks of the comparison classes by closeness of logit (rank 0 is the class itself)."""


class FinerTarget(Target):
    """Finer-CAM's score of class ``c`` (Zhang et al., CVPR 2025, with pytorch-grad-cam's
    weights): the classes ``d_j`` whose logits are closest to ``y_c`` (ranks ``similar`` in the
    order of ``|y_d - y_c|``, rank 0 being ``c``), weighted by their softmax probabilities
    ``p_j``: ``s = sum_j p_j (y_c - alpha y_{d_j}) / (sum_j p_j + 1e-9)``. The choice of ``d_j``
    is fixed by the output; ``p_j`` stays in the gradient, as in pytorch-grad-cam."""

    def __init__(self, index: ClassIndices | None = None, alpha: float = 1.0,
                 similar: Sequence[int] = SIMILAR) -> None:
        self.index, self.alpha, self.similar = index, alpha, tuple(similar)

    def classes(self, output: Any, batch: int) -> Tensor:
        return class_indices(self.index, primary_output(output))

    def compared(self, logits: Tensor, classes: Tensor) -> Tensor:
        """``(B, J)`` the comparison classes of each image."""
        distance = (logits.detach() - logits.detach().gather(1, classes[:, None])).abs()
        ranks = [r for r in self.similar if r < logits.shape[1]]
        return distance.argsort(dim=1)[:, ranks]

    def score(self, output: Any, classes: Tensor) -> Tensor:
        logits = primary_output(output)
        others = self.compared(logits, classes)
        weights = logits.softmax(dim=1).gather(1, others)
        gaps = logits.gather(1, classes[:, None]) - self.alpha * logits.gather(1, others)
        return (weights * gaps).sum(dim=1) / (weights.sum(dim=1) + 1e-9)


@register
class FinerCAM(Wrapper):
    """Finer-CAM (Zhang et al., "Finer-CAM: Spotting the Difference Reveals Finer Details for
    Visual Explanation", CVPR 2025): the map of ``base`` (Grad-CAM by default) for the score
    ``s = sum_j p_j (y_c - alpha y_{d_j}) / sum_j p_j`` of :class:`FinerTarget` instead of
    ``y_c``: what raises class ``c`` *over* its most similar classes ``d_j`` (by default those
    of logit ranks 1 to 3 nearest ``y_c``), the fine-grained difference. ``alpha = 0`` gives the
    base map of ``c`` (up to the weights), ``alpha = 1`` removes what ``c`` shares with them.

    ``target`` is the class ``c`` (the arg-max by default); ``similar`` the ranks compared.
    """

    name = "finercam"
    aliases = ("finer_cam",)

    def __init__(self, model: nn.Module, layer: LayerSpec = "auto", *, base: str | None = None,
                 alpha: float = 1.0, similar: Sequence[int] = SIMILAR, **options: Any) -> None:
        super().__init__(model, layer, base=base, **options)
        if not self.base.needs_target:
            raise TypeError(f"Finer-CAM compares classes, and {self.base.name} ignores the class")
        self.alpha, self.similar = alpha, tuple(similar)

    def _explain(self, x: Tensor, target: Target) -> Explanation:
        if not isinstance(target, ClassLogit) or isinstance(target, ClassProbability):
            raise TypeError("Finer-CAM explains a class against similar classes: pass target "
                            "as a class index (or None for the predicted class)")
        result = self.base(x, FinerTarget(target.index, self.alpha, self.similar))
        with torch.no_grad():
            logits = primary_output(result.output)
            compared = FinerTarget(None, self.alpha, self.similar).compared(logits,
                                                                         result.targets)
        return dataclasses.replace(result, method=self.name,
                                   details={**result.details, "compared_with": compared})
