"""Semantic segmentation: explain class ``c`` over a region of a per-pixel classifier.

A segmentation model returns class scores for every position, ``y`` of shape ``(B, K, *S)``
(torchvision's FCN, DeepLabV3 and LR-ASPP return ``{"out": y}``; Hugging Face models an object
with ``.logits``; others a tuple whose first element is ``y``). :class:`ClassRegion` turns them
into one score per image, so every CAM method explains "why is this region class ``c``":

    s_b = sum_p m_b(p) y_{b,c}(p)                        (reduction="sum", the default)
    s_b = sum_p m_b(p) y_{b,c}(p) / sum_p m_b(p)         (reduction="mean")

with ``m_b`` the region: a given mask (bool, or float weights), or by default the positions the
model predicts as ``c`` (``argmax_k y_{b,k}(p) = c``). The sum is the target of
pytorch-grad-cam's ``SemanticSegmentationTarget`` (J. Gildenblat, jacobgil/pytorch-grad-cam,
``utils/model_targets.py``), which applies Grad-CAM (Selvaraju et al., ICCV 2017, Eq. 1-2) to
segmentation this way; the mean puts regions of any size on the scale of one logit (it keeps
Score-CAM's ``variant="softmax"`` weights from saturating on large regions).

``layer="auto"`` on a torchvision segmentation model explains at the deepest stage its backbone
returns (``backbone.layer4`` of the ResNet models, ``backbone.16`` of the MobileNetV3 ones; see
:func:`heatlens.engine.layers.backbone_stage`), not at the head's K-channel score map.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from heatlens.engine.targets import Target, class_indices, primary_output

__all__ = ["ClassRegion", "dense_scores"]

Reduction = Literal["sum", "mean"]


def dense_scores(output: Any, what: str = "ClassRegion") -> Tensor:
    """The per-position class scores ``(B, K, *S)`` in a model output (see
    :func:`heatlens.engine.targets.primary_output`); a ``ValueError`` saying what to do
    otherwise."""
    try:
        scores = primary_output(output)
    except TypeError:
        raise ValueError(
            f"{what} needs per-position class scores (B, K, H, W): a tensor, a dict with an "
            f"'out' tensor, or a tuple whose first element is that tensor; this model returns "
            f"{_describe(output)}. For a detector use heatlens.BoxScore; for anything else pass "
            "target= as a callable that maps the output to one score per image"
        ) from None
    if scores.ndim < 3:
        raise ValueError(
            f"{what} needs per-position class scores (B, K, H, W); this model returns shape "
            f"{tuple(scores.shape)}, the scores of a classifier: explain a class of it with a "
            "class index target (target=3) instead"
        )
    return scores


def _describe(output: Any) -> str:
    if isinstance(output, list | tuple) and output:
        return f"a {type(output).__name__} of {type(output[0]).__name__}"
    return f"a {type(output).__name__}"


class ClassRegion(Target):
    """The scores of class ``c`` summed (or averaged) over a region of a segmentation output.

    ``s_b = sum_p m_b(p) y_{b,c}(p)`` for ``reduction="sum"`` (the target of pytorch-grad-cam's
    ``SemanticSegmentationTarget``), divided by ``sum_p m_b(p)`` for ``reduction="mean"``; see
    the module docstring.

    Args:
        index: the class ``c``: one ``int`` for every image, or one per image.
        mask: the region ``m``: ``None`` (the positions the model predicts as ``c``), or a bool
            or float array or tensor of the output's spatial shape ``(H, W)`` (the same region
            for every image) or ``(B, H, W)`` (one per image). torchvision's segmentation models
            return scores at the input's size, so there the mask is as large as the input.
        reduction: ``"sum"`` or ``"mean"`` over the region.

    With ``mask=None`` the region is taken from the output being scored: for gradient methods
    that is the input's own prediction; perturbation methods (Score-CAM, Ablation-CAM) take it
    anew from each perturbed input. To hold the region fixed, pass the prediction as the mask:
    ``mask = model(x)["out"].argmax(1) == c``.

    Per-image masks fit methods that score the batch as it is (gradient methods, Eigen-CAM).
    Perturbation methods score many copies of the images at once; there give one ``(H, W)``
    mask, or explain one image at a time.

    Raises:
        ValueError: (when explaining) for an output that is not per-position class scores, a
            class out of range, a mask whose shape does not match the output, or an empty
            region.
    """

    def __init__(self, index: int | Sequence[int] | Tensor,
                 mask: Tensor | np.ndarray | None = None, *,
                 reduction: Reduction = "sum") -> None:
        if index is None:
            raise TypeError("ClassRegion needs the class to explain: ClassRegion(index, mask)")
        if reduction not in ("sum", "mean"):
            raise ValueError(f"reduction must be 'sum' or 'mean', not {reduction!r}")
        if mask is not None:
            if isinstance(mask, np.ndarray):
                mask = torch.from_numpy(mask)
            if not isinstance(mask, Tensor):
                raise TypeError(
                    f"mask must be a bool or float tensor or numpy array, not "
                    f"{type(mask).__name__}"
                )
            if not (mask.dtype == torch.bool or mask.is_floating_point()):
                raise TypeError(f"mask must be bool or float (weights), got dtype {mask.dtype}")
            if not bool(torch.isfinite(mask.float()).all()) or bool((mask.float() < 0).any()):
                raise ValueError("mask weights must be finite and non-negative")
        self.index = index
        self.mask = mask
        self.reduction: Reduction = reduction

    def __repr__(self) -> str:
        region = "predicted" if self.mask is None else f"mask {tuple(self.mask.shape)}"
        return f"ClassRegion(index={self.index!r}, {region}, reduction={self.reduction!r})"

    def classes(self, output: Any, batch: int) -> Tensor:
        scores = dense_scores(output)
        if scores.shape[0] != batch:
            raise ValueError(
                f"the model returned class scores for {scores.shape[0]} images, not {batch}"
            )
        # the (B, K) scores at the first position: the shape the class checks read
        classes = class_indices(self.index, scores.flatten(2)[:, :, 0])
        if self.mask is not None:
            spatial = scores.ndim - 2
            if self.mask.ndim == spatial + 1 and self.mask.shape[0] != batch:
                raise ValueError(
                    f"got {self.mask.shape[0]} masks for a batch of {batch} images; pass one "
                    "mask per image, or a single mask of the output's spatial shape for all"
                )
        area = self._region(scores, classes).flatten(1).sum(dim=1)
        empty = (area <= 0).nonzero()
        if empty.numel():
            image = int(empty[0])
            where = ("the model predicts it nowhere in image" if self.mask is None
                     else "the mask is empty for image")
            raise ValueError(
                f"the region of class {int(classes[image])} is empty: {where} {image}, so "
                "there is nothing to explain. Pass a non-empty mask= or another class"
            )
        return classes

    def score(self, output: Any, classes: Tensor) -> Tensor:
        scores = dense_scores(output)
        region = self._region(scores, classes)
        picked = scores[torch.arange(scores.shape[0], device=scores.device), classes]
        total = (picked * region).flatten(1).sum(dim=1)
        if self.reduction == "sum":
            return total
        area = region.flatten(1).sum(dim=1)
        return torch.where(area > 0, total / area.clamp_min(torch.finfo(area.dtype).tiny), 0.0)

    def _region(self, scores: Tensor, classes: Tensor) -> Tensor:
        """``m`` as weights ``(N, *S)`` for the ``N`` images of ``scores``."""
        spatial = scores.shape[2:]
        shape = (-1, *[1] * len(spatial))
        if self.mask is None:
            return (scores.argmax(dim=1) == classes.reshape(shape)).to(scores.dtype)
        mask = self.mask.to(device=scores.device, dtype=scores.dtype)
        if mask.ndim not in (len(spatial), len(spatial) + 1) or mask.shape[-len(spatial):] != (
                spatial):
            size = tuple(spatial)
            raise ValueError(
                f"the mask has shape {tuple(self.mask.shape)}, but the model's class scores have "
                f"shape {tuple(scores.shape)}: give a mask of the spatial shape {size} (with a "
                f"batch dimension first for one per image), e.g. resized with torch.nn.functional."
                f"interpolate(mask[None, None].float(), size={size}, mode='nearest')[0, 0]"
            )
        if mask.ndim == len(spatial):
            return mask.expand(scores.shape[0], *spatial)
        if mask.shape[0] == scores.shape[0]:
            return mask
        if bool((mask == mask[:1]).all()):
            return mask[:1].expand(scores.shape[0], *spatial)
        raise ValueError(
            f"this method scores {scores.shape[0]} perturbed inputs at once, and "
            f"{mask.shape[0]} different per-image masks cannot be matched to them; explain one "
            "image at a time, pass one mask for all images, or use a gradient method"
        )
