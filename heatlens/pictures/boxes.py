"""Boxes on pictures: detections drawn with their labels, over an image or a heatmap overlay.

Drawn with Pillow; the image conversions and the heatmap overlay are
:mod:`heatlens.pictures.overlays`'s.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw

from heatlens.pictures.overlays import HeatmapLike, ImageLike, float64_values, overlay, to_rgb_array

__all__ = ["box_caption", "draw_boxes", "overlay_with_boxes"]

BOX_COLOURS = ((255, 255, 255), (255, 64, 64), (64, 160, 255), (255, 200, 0), (0, 220, 120),
               (220, 80, 255))
"""Outline colours, picked by label (white for boxes without one), readable over jet maps."""


def box_caption(label: int | None, score: float | None,
                names: Sequence[str] | None = None) -> str:
    """``"<name or class N> 0.97"``: the label's name where known, and the score."""
    parts = []
    if label is not None:
        known = names is not None and 0 <= label < len(names)
        parts.append(names[label] if known else f"class {label}")
    if score is not None:
        parts.append(f"{score:.2f}")
    return " ".join(parts)


def draw_boxes(image: ImageLike, boxes: torch.Tensor | np.ndarray | Sequence[Sequence[float]],
               labels: torch.Tensor | np.ndarray | Sequence[int] | None = None,
               scores: torch.Tensor | np.ndarray | Sequence[float] | None = None, *,
               names: Sequence[str] | None = None, width: int = 2) -> Image.Image:
    """A copy of ``image`` with each box outlined and captioned (label name and score).

    Args:
        image: the picture, anything :func:`heatlens.pictures.overlays.to_rgb_array` accepts.
        boxes: ``(N, 4)`` as (x1, y1, x2, y2) in the picture's pixels.
        labels: ``N`` class indices (colour and caption), or ``None``.
        scores: ``N`` scores for the captions, or ``None``.
        names: class names by index, for the captions.
        width: outline width in pixels.
    """
    corners = _floats(boxes, "boxes")
    if corners.size == 0:
        corners = corners.reshape(0, 4)
    if corners.ndim != 2 or corners.shape[1] != 4:
        raise ValueError(f"boxes must have shape (N, 4) as (x1, y1, x2, y2), got "
                         f"{tuple(corners.shape)}")
    count = corners.shape[0]
    label_list = _per_box(labels, count, "labels")
    score_list = _per_box(scores, count, "scores")
    if isinstance(width, bool) or not isinstance(width, int) or width < 1:
        raise ValueError(f"width must be a positive int (pixels), got {width!r}")
    picture = Image.fromarray(to_rgb_array(image))
    pen = ImageDraw.Draw(picture)
    for index, (x1, y1, x2, y2) in enumerate(corners.tolist()):
        label = None if label_list is None else int(label_list[index])
        score = None if score_list is None else float(score_list[index])
        colour = BOX_COLOURS[0] if label is None else BOX_COLOURS[1 + label % (
            len(BOX_COLOURS) - 1)]
        pen.rectangle((x1, y1, x2, y2), outline=colour, width=width)
        caption = box_caption(label, score, names)
        if caption:
            left, top, right, bottom = pen.textbbox((x1, y1), caption)
            lift = min(bottom - top + 2, y1)  # above the box, inside the picture
            pen.rectangle((left, top - lift, right + 2, bottom - lift + 2), fill=colour)
            pen.text((x1 + 1, y1 - lift + 1), caption, fill=(0, 0, 0))
    return picture


def overlay_with_boxes(image: ImageLike, heatmap: HeatmapLike, boxes: torch.Tensor | np.ndarray,
                       labels: torch.Tensor | np.ndarray | Sequence[int] | None = None,
                       scores: torch.Tensor | np.ndarray | Sequence[float] | None = None, *,
                       names: Sequence[str] | None = None, alpha: float = 0.5,
                       cmap: str = "jet", width: int = 2) -> Image.Image:
    """The heatmap blended over ``image`` (:func:`heatlens.pictures.overlays.overlay`), then the
    boxes drawn on top (:func:`draw_boxes`)."""
    return draw_boxes(overlay(image, heatmap, alpha=alpha, cmap=cmap), boxes, labels, scores,
                      names=names, width=width)


def _per_box(values: torch.Tensor | np.ndarray | Sequence[float] | None, count: int,
             what: str) -> list[float] | None:
    if values is None:
        return None
    flat = _floats(values, what).reshape(-1)
    if flat.shape[0] != count:
        raise ValueError(f"got {flat.shape[0]} {what} for {count} boxes; give one per box")
    return flat.tolist()


def _floats(values: torch.Tensor | np.ndarray | Sequence[float], what: str) -> np.ndarray:
    if isinstance(values, torch.Tensor | np.ndarray):
        return float64_values(values, what)
    return np.asarray(values, dtype=np.float64)
