"""Pictures of explanations: colour heatmaps, blend them over photos, lay results out in grids.

Figures are built with :class:`matplotlib.figure.Figure` directly, never with ``pyplot``, so
nothing here needs a display, touches pyplot's global figure registry, or depends on the
matplotlib backend; functions can run in worker threads.
"""

from __future__ import annotations

import difflib
import math
import os
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import TypeAlias

import matplotlib
import numpy as np
import torch
from matplotlib.colors import Colormap
from matplotlib.figure import Figure
from PIL import Image

__all__ = ["colorize", "figure_grid", "image_grid", "overlay", "save_figure", "to_rgb_array"]

ImageLike: TypeAlias = Image.Image | np.ndarray | torch.Tensor
"""A picture: a PIL image, an (H, W, 3) or (H, W) array, or a (3, H, W) or (H, W, 3) tensor."""

HeatmapLike: TypeAlias = np.ndarray | torch.Tensor
"""A 2-D array or tensor of relevance values in [0, 1]."""

# Slack for float pictures computed in [0, 1] that land a rounding error outside it.
_FLOAT_TOLERANCE = 1e-3


def to_rgb_array(image: ImageLike) -> np.ndarray:
    """Return ``image`` as a new ``(H, W, 3)`` uint8 RGB array.

    Accepted inputs:

    - a PIL image (modes other than RGB go through ``Image.convert("RGB")``);
    - a numpy array ``(H, W, 3)`` or greyscale ``(H, W)``, uint8 or float in [0, 1];
    - a torch tensor ``(3, H, W)``, ``(H, W, 3)`` or ``(H, W)``, uint8 or float in [0, 1]
      (channels-first is assumed when the first dimension is 3).

    Float values are scaled by 255 and rounded.

    Raises:
        TypeError: For other types or dtypes.
        ValueError: For other shapes, or float values outside [0, 1] (such as a tensor still
            normalised for the model: undo that with ``Preset.unnormalize`` first).
    """
    if isinstance(image, Image.Image):
        return np.array(image if image.mode == "RGB" else image.convert("RGB"))
    if isinstance(image, torch.Tensor):
        tensor = image.detach().cpu()
        if tensor.is_floating_point():
            tensor = tensor.to(torch.float64)  # numpy has no bfloat16
        if tensor.ndim == 3 and tensor.shape[0] == 3:
            tensor = tensor.permute(1, 2, 0)
        array = tensor.numpy()
    elif isinstance(image, np.ndarray):
        array = image
    else:
        msg = f"expected a PIL image, numpy array or torch tensor, got {type(image).__name__}"
        raise TypeError(msg)

    if array.ndim == 2:
        array = np.stack([array] * 3, axis=-1)
    if array.ndim != 3 or array.shape[-1] != 3:
        msg = (
            f"expected an RGB picture of shape (H, W, 3), (3, H, W) (tensors) or greyscale "
            f"(H, W), got shape {tuple(image.shape)}; for a batch pass one item, e.g. batch[0]"
        )
        raise ValueError(msg)
    if array.dtype == np.uint8:
        return np.array(array)
    if not np.issubdtype(array.dtype, np.floating):
        msg = (
            f"expected uint8 values (0..255) or floats in [0, 1], got dtype {array.dtype}; "
            "convert with array.astype(np.uint8) or array / 255"
        )
        raise TypeError(msg)
    values = array.astype(np.float64)
    if not np.isfinite(values).all():
        msg = "the picture contains NaN or infinite values"
        raise ValueError(msg)
    if values.size and (values.min() < -_FLOAT_TOLERANCE or values.max() > 1 + _FLOAT_TOLERANCE):
        msg = (
            "float pictures must have values in [0, 1], "
            f"got values in [{values.min():.3g}, {values.max():.3g}]; "
            "undo model normalisation with Preset.unnormalize, or divide 0..255 values by 255"
        )
        raise ValueError(msg)
    return np.rint(values.clip(0.0, 1.0) * 255.0).astype(np.uint8)


def colorize(heatmap: HeatmapLike, cmap: str = "jet") -> np.ndarray:
    """Colour a 2-D heatmap with a matplotlib colormap.

    Args:
        heatmap: ``(H, W)`` array or tensor; values are expected in [0, 1] and clipped to it.
        cmap: Name of a matplotlib colormap, e.g. ``"jet"``, ``"viridis"``, ``"inferno"``.

    Returns:
        ``(H, W, 3)`` uint8 RGB array.

    Raises:
        ValueError: For an unknown colormap, a heatmap that is not 2-D, or NaN values.
    """
    colors = colormap(cmap)
    values = _heatmap_values(heatmap)
    return colors(values.clip(0.0, 1.0), bytes=True)[..., :3]


def overlay(
    image: ImageLike, heatmap: HeatmapLike, *, alpha: float = 0.5, cmap: str = "jet"
) -> Image.Image:
    """Blend a coloured heatmap over an image: ``(1 - alpha) * image + alpha * colours``.

    A heatmap of another size than the image is resized to it (bilinear) before colouring.
    For a pixel-exact overlay, pass the display image of the preset that made the model input
    (:meth:`heatlens.loading.presets.Preset.display`).

    Args:
        image: The picture, anything :func:`to_rgb_array` accepts.
        heatmap: ``(h, w)`` relevance values in [0, 1] (clipped to it).
        alpha: Weight of the heatmap colours, from 0 (only the image) to 1 (only the colours).
        cmap: Name of a matplotlib colormap.

    Returns:
        The blended RGB image, the size of ``image``.
    """
    if not 0.0 <= alpha <= 1.0:
        msg = f"alpha must be in [0, 1] (0: only the image, 1: only the heatmap), got {alpha!r}"
        raise ValueError(msg)
    rgb = to_rgb_array(image)
    values = _heatmap_values(heatmap)
    if values.shape != rgb.shape[:2]:
        resized = torch.nn.functional.interpolate(
            torch.from_numpy(values)[None, None],
            size=rgb.shape[:2],
            mode="bilinear",
            align_corners=False,
        )
        values = resized[0, 0].numpy()
    colours = colorize(values, cmap)
    blend = (1.0 - alpha) * rgb.astype(np.float64) + alpha * colours.astype(np.float64)
    return Image.fromarray(np.rint(blend).astype(np.uint8))


def figure_grid(
    panels: Sequence[ImageLike],
    titles: Sequence[str] | None = None,
    *,
    rows: int = 1,
    panel_size: float = 3.2,
) -> Figure:
    """Lay pictures out in a matplotlib figure, ``rows`` rows of ``ceil(n / rows)`` panels.

    Axes are hidden; each panel gets its title when ``titles`` is given. The figure is a plain
    :class:`~matplotlib.figure.Figure` (no pyplot): save it with :func:`save_figure`.

    Args:
        panels: The pictures, anything :func:`to_rgb_array` accepts.
        titles: One title per panel, or ``None`` for none.
        rows: Number of rows, from 1 to the number of panels.
        panel_size: Width and height of one panel, in inches.
    """
    count = _check_layout(panels, rows)
    if titles is not None and len(titles) != count:
        msg = f"got {count} panels but {len(titles)} titles; give one title per panel"
        raise ValueError(msg)
    if not panel_size > 0:
        msg = f"panel_size must be a positive number of inches, got {panel_size!r}"
        raise ValueError(msg)
    columns = math.ceil(count / rows)
    figure = Figure(figsize=(columns * panel_size, rows * panel_size), layout="constrained")
    for index, panel in enumerate(panels):
        axes = figure.add_subplot(rows, columns, index + 1)
        axes.imshow(to_rgb_array(panel))
        axes.set_axis_off()
        if titles is not None:
            axes.set_title(fitted_title(titles[index], panel_size))
    return figure


def fitted_title(title: str, width: float) -> str:
    """``title`` broken into lines that fit ``width`` inches at matplotlib's title size (about
    ten characters an inch), between its ``" | "`` parts where it can, so that the titles of
    neighbouring panels never run into each other."""
    columns = max(12, int(width * 10))
    lines: list[str] = []
    for part in title.split(" | "):
        if lines and len(lines[-1]) + 3 + len(part) <= columns:
            lines[-1] += " | " + part
        else:
            lines.extend(textwrap.wrap(part, columns) or [""])
    return "\n".join(lines)


def save_figure(fig: Figure, path: str | os.PathLike[str]) -> Path:
    """Save a figure at 100 dpi with a tight bounding box; the suffix picks the format.

    A path without a suffix is saved as PNG with ``.png`` appended.

    Returns:
        The path written.

    Raises:
        FileNotFoundError: If the parent directory does not exist (it is not created).
        ValueError: If the suffix is not a format matplotlib can write.
    """
    target = Path(path)
    if not target.suffix:
        target = target.with_suffix(".png")
    if not target.parent.is_dir():
        msg = f"cannot save {target}: the directory {target.parent} does not exist; create it first"
        raise FileNotFoundError(msg)
    file_format = target.suffix[1:].lower()
    supported = fig.canvas.get_supported_filetypes()
    if file_format not in supported:
        msg = (
            f"cannot save {target}: matplotlib does not write {target.suffix!r} files; "
            f"use one of {', '.join('.' + name for name in sorted(supported))}"
        )
        raise ValueError(msg)
    fig.savefig(target, format=file_format, dpi=100, bbox_inches="tight")
    return target


def image_grid(panels: Sequence[ImageLike], *, rows: int = 1, pad: int = 4) -> Image.Image:
    """Paste pictures into one image, ``rows`` rows of ``ceil(n / rows)`` cells, no titles.

    Every cell is as large as the largest panel; smaller panels are centred in their cell.
    ``pad`` white pixels separate the cells and surround the grid. Handy for Jupyter, which
    shows a returned PIL image inline.
    """
    count = _check_layout(panels, rows)
    if isinstance(pad, bool) or not isinstance(pad, int) or pad < 0:
        msg = f"pad must be a non-negative int (pixels), got {pad!r}"
        raise ValueError(msg)
    pictures = [Image.fromarray(to_rgb_array(panel)) for panel in panels]
    columns = math.ceil(count / rows)
    cell_width = max(picture.width for picture in pictures)
    cell_height = max(picture.height for picture in pictures)
    grid = Image.new(
        "RGB",
        (columns * cell_width + (columns + 1) * pad, rows * cell_height + (rows + 1) * pad),
        (255, 255, 255),
    )
    for index, picture in enumerate(pictures):
        row, column = divmod(index, columns)
        left = pad + column * (cell_width + pad) + (cell_width - picture.width) // 2
        top = pad + row * (cell_height + pad) + (cell_height - picture.height) // 2
        grid.paste(picture, (left, top))
    return grid


def _check_layout(panels: Sequence[ImageLike], rows: int) -> int:
    count = len(panels)
    if count == 0:
        msg = "no panels to lay out; pass at least one picture"
        raise ValueError(msg)
    if isinstance(rows, bool) or not isinstance(rows, int) or not 1 <= rows <= count:
        msg = f"rows must be an int from 1 to the number of panels ({count}), got {rows!r}"
        raise ValueError(msg)
    return count


def colormap(name: str) -> Colormap:
    """The matplotlib colormap ``name``; a ``ValueError`` suggesting close names otherwise."""
    try:
        return matplotlib.colormaps[name]
    except KeyError:
        known = sorted(matplotlib.colormaps)
        close = difflib.get_close_matches(name, known, n=3)
        suggestion = f"did you mean {', '.join(close)}? " if close else ""
        msg = (
            f"unknown colormap {name!r}; {suggestion}valid names include "
            "jet, turbo, viridis, inferno, magma, plasma, gray "
            "(all: sorted(matplotlib.colormaps))"
        )
        raise ValueError(msg) from None


def picture_maps(maps: torch.Tensor, index: int, *, per_map: int = 0) -> torch.Tensor:
    """``maps[index]`` for drawing: the index must exist and the maps be 2-D (after ``per_map``
    leading dimensions, such as a concept dimension); errors say what to do otherwise."""
    if not 0 <= index < maps.shape[0]:
        raise IndexError(f"index {index} is out of range for {maps.shape[0]} maps")
    picked = maps[index]
    if picked.ndim != 2 + per_map:
        raise ValueError(
            f"pictures need 2-D maps; this map has shape {tuple(picked.shape[per_map:])}. "
            "Use .maps directly for 1-D signals and 3-D volumes"
        )
    return picked


def float64_values(values: torch.Tensor | np.ndarray, what: str) -> np.ndarray:
    """A tensor or array as a float64 numpy array; a ``TypeError`` naming ``what`` otherwise."""
    if isinstance(values, torch.Tensor):
        return values.detach().cpu().to(torch.float64).numpy()
    if isinstance(values, np.ndarray):
        return values.astype(np.float64)
    msg = f"{what} must be a numpy array or torch tensor, got {type(values).__name__}"
    raise TypeError(msg)


def _heatmap_values(heatmap: HeatmapLike) -> np.ndarray:
    values = float64_values(heatmap, "heatmap")
    if values.ndim != 2:
        msg = (
            f"heatmap must be 2-D (H, W), got shape {tuple(values.shape)}; "
            "for a batch or a channel dimension pass one map, e.g. heatmap[0]"
        )
        raise ValueError(msg)
    if np.isnan(values).any():
        msg = "heatmap contains NaN values; check the explanation that produced it"
        raise ValueError(msg)
    return values
