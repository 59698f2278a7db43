"""Object detection: explain the score of a box.

A detector returns, for each image, boxes ``(N, 4)`` as ``(x1, y1, x2, y2)`` in input pixels,
their scores ``(N,)`` and labels ``(N,)``: torchvision's Faster R-CNN, RetinaNet and FCOS return
exactly that, a list of dicts ``{"boxes", "scores", "labels"}`` (in ``eval()`` mode, on a batch
tensor ``(B, 3, H, W)`` in [0, 1], which they read as a list of images). Any other detector fits
through ``parse=``, a function that converts its output to that form.

:class:`BoxScore` matches the predicted boxes to reference boxes ``r`` and scores the match:

    s_b = sum_r [ score(d_r) + IoU(r, d_r) if with_iou ]

    d_r = argmax { score(d) : label(d) = label(r), IoU(r, d) >= t }

the sum over the references of the score of their match: the most confident prediction with the
same label that overlaps the reference at IoU threshold ``t``, the one that non-maximum
suppression keeps for that object. A reference without a match adds nothing (and is an error on
the input itself, see :meth:`BoxScore.classes`). This follows pytorch-grad-cam's
``FasterRCNNBoxScoreTarget`` (J. Gildenblat, jacobgil/pytorch-grad-cam), with two differences:
it matches the prediction of largest IoU, which in a dense output before suppression (every
window of a sliding-window detector) is often a window of low confidence rather than the
detection; and it always adds the IoU, which here is optional (``with_iou=True``), so that by
default the explained value is the detection's own score. Grad-CAM (Selvaraju et al., ICCV 2017,
Eq. 1-2) of this score shows which
features raised the detection's confidence: torchvision computes scores differentiably from the
backbone features (the box selection and non-maximum suppression only pick indices).

Eigen-CAM (Muhammad & Yeasin, IJCNN 2020) needs no gradient; it is the choice for detectors
whose scores do not carry one (post-processing outside torch, or a cascade such as MTCNN). The
box target still tells what is explained, and the explanation reports its score.

``layer="auto"`` on a torchvision detector explains at the deepest stage of the backbone body
(``backbone.body.layer4`` of the ResNet-50-FPN models): every FPN level, and so every box, is
computed from it (see :func:`heatlens.engine.layers.backbone_stage`). torchvision resizes the image
and pads it at the bottom and right to a multiple of 32 before the backbone; the map, stretched over
that padded extent, is off by less than 32 resized pixels at the far edges, which is less than one
cell of that stride-32 layer. """

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torchvision.ops import box_iou

from heatlens.engine.targets import NO_CLASS, Target

__all__ = ["BoxScore", "detections_of"]

Detections = list[Mapping[str, Tensor]]
"""One dict per image: ``"boxes"`` ``(N, 4)`` as (x1, y1, x2, y2), ``"scores"`` ``(N,)`` and,
where the detector has classes, ``"labels"`` ``(N,)``."""

BoxesLike = Tensor | np.ndarray | Sequence[float] | Sequence[Sequence[float]]
LabelsLike = int | Tensor | np.ndarray | Sequence[int]


def detections_of(output: Any, parse: Callable[[Any], Detections] | None = None) -> Detections:
    """The per-image detections in a model output (after ``parse``, when given), checked.

    Raises:
        ValueError: when the output is not a list of dicts with ``boxes`` ``(N, 4)`` and
            ``scores`` ``(N,)`` (and ``labels`` ``(N,)`` where present), saying what to pass.
    """
    detections = parse(output) if parse is not None else output
    fix = (
        "Detection targets need one dict per image with 'boxes' (N, 4) as (x1, y1, x2, y2), "
        "'scores' (N,) and 'labels' (N,), the output of torchvision's detectors in eval() mode; "
        "for another detector pass parse= a function that converts its output to that form"
    )
    if not isinstance(detections, list | tuple) or not all(
            isinstance(d, Mapping) for d in detections):
        kind = type(detections).__name__
        if isinstance(detections, Tensor):
            kind += f" of shape {tuple(detections.shape)}"
        source = "parse= returned" if parse is not None else "the model returns"
        raise ValueError(f"{source} a {kind}. {fix}")
    for index, found in enumerate(detections):
        boxes, scores = found.get("boxes"), found.get("scores")
        labels = found.get("labels")
        if not (isinstance(boxes, Tensor) and boxes.ndim == 2 and boxes.shape[1] == 4
                and isinstance(scores, Tensor) and scores.shape == boxes.shape[:1]
                and (labels is None or (isinstance(labels, Tensor)
                                        and labels.shape == boxes.shape[:1]))):
            shapes = {k: tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__
                      for k, v in found.items()}
            raise ValueError(f"the detections of image {index} are {shapes}. {fix}")
    return list(detections)


def _as_boxes(boxes: Any, what: str) -> Tensor:
    boxes = torch.as_tensor(np.asarray(boxes) if isinstance(boxes, list | tuple) else boxes,
                            dtype=torch.float32)
    if boxes.ndim == 1:
        boxes = boxes[None]
    if boxes.ndim != 2 or boxes.shape[1] != 4 or boxes.shape[0] == 0:
        raise ValueError(
            f"{what} must be boxes (N, 4) as (x1, y1, x2, y2) with N >= 1, got shape "
            f"{tuple(boxes.shape)}"
        )
    if not bool(torch.isfinite(boxes).all()) or bool((boxes[:, 2:] <= boxes[:, :2]).any()):
        raise ValueError(f"{what} must be finite boxes with x1 < x2 and y1 < y2: {boxes}")
    return boxes


def _as_labels(labels: Any, count: int, what: str) -> Tensor | None:
    if labels is None:
        return None
    labels = torch.as_tensor(labels).reshape(-1)
    if labels.is_floating_point() or labels.dtype == torch.bool:
        raise TypeError(f"{what} must be integers, got dtype {labels.dtype}")
    if labels.numel() == 1:
        labels = labels.expand(count)
    if labels.numel() != count:
        raise ValueError(f"got {labels.numel()} {what} for {count} boxes; give one per box")
    return labels.long()


class BoxScore(Target):
    """The score of the detections that match reference boxes (see the module docstring).

    ``s_b = sum_r score(d_r) [+ IoU(r, d_r)]``: for each reference box ``r``, ``d_r`` is the
    most confident predicted box with the same label (any label when ``labels`` is ``None``)
    that overlaps ``r`` at IoU ``>= iou_threshold``.

    Args:
        boxes: the reference boxes as (x1, y1, x2, y2) in input pixels: one box ``(4,)`` or
            boxes ``(N, 4)`` for every image, or one ``(N_b, 4)`` tensor or array per image
            (a list of them, or a ``(B, N, 4)`` tensor).
        labels: their labels: ``None`` (any), one ``int`` for all, or one per box (a list of
            those per image when ``boxes`` is per image).
        iou_threshold: the least IoU at which a prediction matches a reference.
        with_iou: add the matched IoU to the score, as pytorch-grad-cam's
            ``FasterRCNNBoxScoreTarget`` does; it makes the map also show what placed the box.
        parse: converts the model output to :data:`Detections`; ``None`` for torchvision's
            output.

    The class reported in ``Explanation.targets`` is the matched label when all references of
    an image share one, else ``NO_CLASS``. Per-image references fit methods that score the batch
    as it is (gradient methods, Eigen-CAM); perturbation methods score many copies at once,
    so there give the same references for all images, or explain one image at a time.

    Raises:
        ValueError: (when explaining) when the output holds no detections in the expected form,
            or a reference box matches no prediction (naming the box, the best IoU found and
            what to change).
    """

    def __init__(self, boxes: BoxesLike | Sequence[BoxesLike],
                 labels: LabelsLike | Sequence[LabelsLike] | None = None, *,
                 iou_threshold: float = 0.5, with_iou: bool = False,
                 parse: Callable[[Any], Detections] | None = None) -> None:
        if not 0 < iou_threshold <= 1:
            raise ValueError(f"iou_threshold must be in (0, 1], got {iou_threshold}")
        per_image = (isinstance(boxes, list | tuple) and bool(boxes)
                     and isinstance(boxes[0], Tensor | np.ndarray)) or (
                         isinstance(boxes, Tensor | np.ndarray) and boxes.ndim == 3)
        if per_image:
            split = isinstance(labels, list | tuple) or (
                isinstance(labels, Tensor | np.ndarray) and labels.ndim == 2)
            given = list(labels) if split else [labels] * len(boxes)
            if len(given) != len(boxes):
                raise ValueError(f"got labels for {len(given)} images and boxes for "
                                 f"{len(boxes)}; give one entry per image")
            self.boxes = [_as_boxes(b, f"the boxes of image {i}") for i, b in enumerate(boxes)]
            self.labels = [_as_labels(lab, len(b), f"labels of image {i}")
                           for i, (lab, b) in enumerate(zip(given, self.boxes, strict=True))]
        else:
            self.boxes = [_as_boxes(boxes, "boxes")]
            self.labels = [_as_labels(labels, len(self.boxes[0]), "labels")]
        self.per_image = bool(per_image)
        self.iou_threshold = iou_threshold
        self.with_iou = with_iou
        self.parse = parse

    def __repr__(self) -> str:
        count = sum(len(b) for b in self.boxes)
        scope = f"{len(self.boxes)} images" if self.per_image else "every image"
        return (f"BoxScore({count} boxes for {scope}, iou_threshold={self.iou_threshold}, "
                f"with_iou={self.with_iou})")

    def classes(self, output: Any, batch: int) -> Tensor:
        detections = detections_of(output, self.parse)
        if len(detections) != batch:
            raise ValueError(f"the model returned detections for {len(detections)} images, "
                             f"not {batch}")
        if self.per_image and len(self.boxes) != batch:
            raise ValueError(f"got reference boxes for {len(self.boxes)} images for a batch of "
                             f"{batch} images; give one entry per image, or one set for all")
        classes = []
        for index, found in enumerate(detections):
            boxes, labels = self._references(index)
            best, matched, _ = self._match(found, boxes, labels)
            if not bool(matched.all()):
                raise self._unmatched(index, found, boxes, labels, int((~matched).nonzero()[0]))
            kinds = found["labels"][best].unique() if "labels" in found else torch.empty(0)
            classes.append(int(kinds[0]) if kinds.numel() == 1 else NO_CLASS)
        return torch.tensor(classes, dtype=torch.long)

    def score(self, output: Any, classes: Tensor) -> Tensor:
        detections = detections_of(output, self.parse)
        if self.per_image and len(detections) != len(self.boxes) and len(self.boxes) > 1:
            raise ValueError(
                f"this method scores {len(detections)} perturbed inputs at once, and reference "
                f"boxes for {len(self.boxes)} different images cannot be matched to them; "
                "explain one image at a time, give one set of boxes for all, or use a gradient "
                "method"
            )
        scores = []
        for index, found in enumerate(detections):
            boxes, labels = self._references(index if len(self.boxes) > 1 else 0)
            if found["boxes"].shape[0] == 0:  # nothing detected in a perturbed input
                scores.append(found["scores"].sum())
                continue
            best, matched, iou = self._match(found, boxes, labels)
            value = (found["scores"][best] * matched).sum()
            if self.with_iou:
                value = value + (iou * matched).sum()
            scores.append(value)
        return torch.stack(scores)

    def _references(self, index: int) -> tuple[Tensor, Tensor | None]:
        if not self.per_image:
            return self.boxes[0], self.labels[0]
        return self.boxes[index], self.labels[index]

    def _match(self, found: Mapping[str, Tensor], boxes: Tensor, labels: Tensor | None
               ) -> tuple[Tensor, Tensor, Tensor]:
        """For each reference: the index of its match, whether it matched, and the IoU."""
        predicted = found["boxes"]
        boxes = boxes.to(device=predicted.device, dtype=predicted.dtype)
        if predicted.shape[0] == 0:
            nothing = torch.zeros(boxes.shape[0], dtype=torch.long, device=predicted.device)
            return nothing, nothing.bool(), predicted.new_zeros(boxes.shape[0])
        overlap = box_iou(boxes, predicted)  # (R, N)
        allowed = overlap.detach() >= self.iou_threshold
        if labels is not None:
            if "labels" not in found:
                raise ValueError("reference labels were given, but the detections have no "
                                 "'labels'; pass labels=None")
            allowed &= labels.to(found["labels"].device)[:, None] == found["labels"][None]
        confidence = found["scores"].detach().float()[None].expand_as(allowed)
        best = torch.where(allowed, confidence, -torch.inf).argmax(dim=1)
        matched = allowed.gather(1, best[:, None])[:, 0]
        return best, matched, overlap.gather(1, best[:, None])[:, 0]

    def _unmatched(self, index: int, found: Mapping[str, Tensor], boxes: Tensor,
                   labels: Tensor | None, reference: int) -> ValueError:
        box = [round(float(v), 1) for v in boxes[reference]]
        label = "" if labels is None else f" with label {int(labels[reference])}"
        predicted = found["boxes"]
        if predicted.shape[0] == 0:
            seen = "the model detected nothing in it"
        else:
            overlap = box_iou(boxes[reference : reference + 1].to(predicted),
                              predicted.detach())[0]
            seen = f"the best IoU of any detection is {float(overlap.max()):.2f}"
            if labels is not None and "labels" in found:
                same = found["labels"] == labels[reference].to(found["labels"].device)
                best_same = float(overlap[same].max()) if bool(same.any()) else 0.0
                seen += f", of a detection with that label {best_same:.2f}"
        return ValueError(
            f"reference box {box}{label} of image {index} matches no detection at IoU >= "
            f"{self.iou_threshold} ({seen}). Lower iou_threshold, check the label, or lower the "
            "detector's score threshold (torchvision: box_score_thresh= for Faster R-CNN, "
            "score_thresh= for RetinaNet and FCOS) so that the box is among its detections"
        )
