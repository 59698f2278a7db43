"""Pictures of Deep Feature Factorization: concept regions in colour over the image, a legend.

Each pixel takes the colour of its strongest concept, with an opacity that grows with that
concept's strength, so the image shows through where no concept is present. Built on the
helpers of :mod:`heatlens.pictures.overlays` (no pyplot, no display needed).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from PIL import Image

from heatlens.engine.maps import upsample
from heatlens.pictures.overlays import (
    HeatmapLike,
    ImageLike,
    colormap,
    figure_grid,
    float64_values,
    to_rgb_array,
)

__all__ = ["concept_colors", "concept_figure", "concept_overlay"]


def concept_colors(count: int, cmap: str = "gist_rainbow") -> np.ndarray:
    """``count`` colours ``(count, 3)`` in [0, 1], taken at ``j / count`` along a matplotlib
    colormap (``gist_rainbow``, as in the DFF authors' code, gives well-separated hues)."""
    if count < 1:
        raise ValueError(f"need at least one concept colour, got count={count}")
    return colormap(cmap)(np.arange(count) / count)[:, :3]


def concept_overlay(image: ImageLike, maps: HeatmapLike, colors: np.ndarray, *,
                    image_weight: float = 0.3) -> Image.Image:
    """Colour each pixel of ``image`` by its strongest concept.

    With ``s = max_j m_j`` the strongest concept's value at a pixel (clipped to [0, 1]),
    ``j*`` that concept and ``a = (1 - image_weight) · s``::

        pixel = (1 - a) · image + a · colors[j*]

    so at full strength the picture is ``image_weight · image + (1 - image_weight) · colour``,
    and where no concept is present it is the image itself.

    Args:
        image: the picture, anything :func:`heatlens.pictures.overlays.to_rgb_array` accepts.
        maps: ``(k, h, w)`` concept strengths in [0, 1]; resized (bilinear) to the image.
        colors: ``(k, 3)`` colours in [0, 1], one per concept (:func:`concept_colors`).
        image_weight: weight of the image where a concept is at full strength, in [0, 1].
    """
    if not 0.0 <= image_weight <= 1.0:
        raise ValueError(
            f"image_weight must be in [0, 1] (1: only the image, 0: full-strength concepts "
            f"opaque), got {image_weight!r}"
        )
    rgb = to_rgb_array(image)
    values = torch.from_numpy(float64_values(maps, "maps"))
    if values.ndim != 3:
        raise ValueError(f"maps must be (k, h, w), got shape {tuple(values.shape)}")
    if len(colors) != values.shape[0]:
        raise ValueError(f"got {len(colors)} colours for {values.shape[0]} concepts")
    values = upsample(values, rgb.shape[:2]).clamp(0.0, 1.0)
    strength, strongest = values.max(dim=0)
    opacity = ((1.0 - image_weight) * strength).numpy()[..., None]
    painted = np.asarray(colors, dtype=np.float64)[strongest.numpy()] * 255.0
    blend = (1.0 - opacity) * rgb.astype(np.float64) + opacity * painted
    return Image.fromarray(np.rint(blend).astype(np.uint8))


def concept_figure(panels: Sequence[ImageLike], entries: Sequence[str], colors: np.ndarray, *,
                   titles: Sequence[str] | None = None, rows: int = 1) -> Figure:
    """The panels in a grid (:func:`heatlens.pictures.overlays.figure_grid`) and, below them, a
    legend with one coloured patch and text entry per concept."""
    if len(entries) != len(colors):
        raise ValueError(f"got {len(entries)} legend entries for {len(colors)} colours")
    figure = figure_grid(panels, titles, rows=rows)
    handles = [Patch(facecolor=tuple(color), label=entry)
               for color, entry in zip(colors, entries, strict=True)]
    columns = min(len(handles), math.ceil(len(panels) / rows))
    figure.legend(handles=handles, loc="outside lower center", ncols=columns, fontsize="small",
                  frameon=False)
    return figure
