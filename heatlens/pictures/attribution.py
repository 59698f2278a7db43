"""Signed pictures of pixel attributions, with the meaning of Captum's ``visualize_image_attr``.

An attribution (``Explanation.raw[i]`` of an attribution method, ``(C, H, W)``) is summed over
channels, reduced to one sign (:data:`SIGNS`), divided by the value below which lie
``100 - outlier_perc`` percent of the total absolute attribution (the largest ones, ``outlier_perc``
percent of the total, saturate) and clipped: :func:`normalize_attribution`. The result is drawn in
one of five ways (:data:`METHODS`):

- ``heat_map``: the normalised map through a colormap (sign ``"all"``: red for negative, white
  for zero, green for positive, from -1 to 1; ``"positive"``: Greens; ``"negative"``: Reds;
  ``"absolute_value"``: Blues; from 0 to 1);
- ``blended_heat_map``: that heat map, with weight ``alpha_overlay``, over the image in grey;
- ``masked_image``: the image multiplied by the normalised map;
- ``alpha_scaling``: the image with the normalised map as its opacity, over white;
- ``original_image``: the image alone.

:func:`attribution_image` renders a picture pixel for pixel (a PIL image the size of the image,
or of the attribution when there is no image); :func:`attribution_figure` draws the same picture in
a matplotlib figure, with an optional title and colorbar; :func:`attribution_panels` puts several
methods and signs side by side. Figures are :class:`matplotlib.figure.Figure` objects built without
``pyplot``.

Two differences from Captum: the grey image under ``blended_heat_map`` keeps its true brightness
(Captum's ``imshow`` stretches it between its darkest and brightest pixel), and an all-zero
attribution gives an all-zero map instead of an error.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, TypedDict, Unpack

import numpy as np
import torch
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Colormap, LinearSegmentedColormap, Normalize
from matplotlib.figure import Figure
from PIL import Image

from heatlens.pictures.overlays import ImageLike, colormap, float64_values, to_rgb_array

if TYPE_CHECKING:
    from matplotlib.axes import Axes

__all__ = [
    "METHODS",
    "RED_WHITE_GREEN",
    "SIGNS",
    "attribution_figure",
    "attribution_image",
    "attribution_map",
    "attribution_panels",
    "auto_sign",
    "cumulative_sum_threshold",
    "normalize_attribution",
    "sign_colormap",
]

SIGNS = ("positive", "negative", "absolute_value", "all")
"""What part of an attribution a picture shows."""

METHODS = ("heat_map", "blended_heat_map", "masked_image", "alpha_scaling", "original_image")
"""How a picture shows it."""

_UNSIGNED_ONLY = ("masked_image", "alpha_scaling")  # they cannot show two signs
_HEAT_MAPS = ("heat_map", "blended_heat_map")  # the ones with a colormap (and a colorbar)

RED_WHITE_GREEN = LinearSegmentedColormap.from_list("RdWhGn", ["red", "white", "green"])
"""The diverging colormap of sign ``"all"`` (Captum's default): -1 red, 0 white, 1 green."""

_SIGN_COLORMAPS: dict[str, Colormap | str] = {
    "all": RED_WHITE_GREEN, "positive": "Greens", "negative": "Reds", "absolute_value": "Blues",
}

AttributionLike = np.ndarray | torch.Tensor
"""An attribution: ``(C, H, W)`` (or ``(H, W, C)`` with ``C`` of 1 or 3) or ``(H, W)``."""


# ------------------------------------------------------------------------------------------------
# Normalisation
# ------------------------------------------------------------------------------------------------


def attribution_map(attr: AttributionLike) -> np.ndarray:
    """The attribution summed over channels: an ``(H, W)`` float64 array.

    A 3-D attribution is channels-first ``(C, H, W)``, unless its last dimension is 1 or 3 and its
    first is not (Captum's ``(H, W, C)`` arrays).

    Raises:
        TypeError: For something other than a numpy array or torch tensor.
        ValueError: For other shapes, an empty attribution, or NaN or infinite values.
    """
    values = float64_values(attr, "attr")
    if values.ndim == 3:
        channels_last = values.shape[-1] in (1, 3) and values.shape[0] not in (1, 3)
        values = values.sum(axis=2 if channels_last else 0)
    if values.ndim != 2:
        msg = (
            f"attr must be (C, H, W) or (H, W), got shape {tuple(values.shape)}; for a batch "
            "pass one item, e.g. explanation.raw[0]"
        )
        raise ValueError(msg)
    if values.size == 0:
        raise ValueError("attr is empty")
    if not np.isfinite(values).all():
        raise ValueError("attr contains NaN or infinite values; check the method that made it")
    return values


def cumulative_sum_threshold(values: np.ndarray, percentile: float) -> float:
    """The smallest of the non-negative ``values`` such that it and all smaller values together
    make up at least ``percentile`` percent of their total (Captum's outlier threshold).

    With ``percentile=98``, the values above the threshold together hold at most 2 % of the
    total. All-zero values give 0.
    """
    if not 0 <= percentile <= 100:
        msg = f"percentile must be in [0, 100], got {percentile!r}"
        raise ValueError(msg)
    ordered = np.sort(np.asarray(values, dtype=np.float64), axis=None)
    running = np.cumsum(ordered)
    index = np.searchsorted(running, running[-1] * (percentile / 100.0), side="left")
    return float(ordered[min(index, ordered.size - 1)])


def _check_outlier_perc(outlier_perc: float) -> None:
    if isinstance(outlier_perc, bool) or not 0 <= outlier_perc <= 100:
        msg = f"outlier_perc must be a percentage in [0, 100], got {outlier_perc!r}"
        raise ValueError(msg)


def _check_sign(sign: str) -> None:
    if sign not in SIGNS:
        msg = f"unknown sign {sign!r}; choose one of {', '.join(SIGNS)}"
        raise ValueError(msg)


def normalize_attribution(
    attr: AttributionLike, sign: str = "absolute_value", outlier_perc: float = 2.0
) -> np.ndarray:
    """The attribution as an ``(H, W)`` map ready to colour, as Captum's ``_normalize_attr``.

    ``attr`` is summed over channels (:func:`attribution_map`), then reduced to ``sign``:

    - ``"all"``: kept as is; the result is in [-1, 1];
    - ``"positive"``: negative values set to 0; in [0, 1];
    - ``"negative"``: positive values set to 0 and the negative ones made magnitudes; in [0, 1];
    - ``"absolute_value"``: absolute values; in [0, 1].

    The values are divided by :func:`cumulative_sum_threshold` of their absolute values at
    ``100 - outlier_perc`` and clipped, so the largest ones, which hold ``outlier_perc`` percent of
    the total, saturate at 1 (or -1). A map with nothing of that sign is all zeros, never NaN.
    """
    _check_sign(sign)
    _check_outlier_perc(outlier_perc)
    values = attribution_map(attr)
    if sign == "positive":
        values = np.maximum(values, 0.0)
    elif sign == "negative":
        values = -np.minimum(values, 0.0)
    elif sign == "absolute_value":
        values = np.abs(values)
    threshold = cumulative_sum_threshold(np.abs(values), 100.0 - outlier_perc)
    if threshold == 0:  # every value is zero, or the threshold is one of many zeros
        return np.sign(values)
    return np.clip(values / threshold, -1.0, 1.0)


def auto_sign(attr: AttributionLike) -> str:
    """``"all"`` when the channel sum of ``attr`` has both positive and negative values,
    else ``"absolute_value"``."""
    values = attribution_map(attr)
    return "all" if values.max() > 0 > values.min() else "absolute_value"


def sign_colormap(sign: str) -> tuple[Colormap, float, float]:
    """The default colormap of ``sign`` and the values at its ends: ``(cmap, vmin, vmax)``."""
    _check_sign(sign)
    cmap = _SIGN_COLORMAPS[sign]
    low = -1.0 if sign == "all" else 0.0
    return (colormap(cmap) if isinstance(cmap, str) else cmap), low, 1.0


# ------------------------------------------------------------------------------------------------
# Rendering
# ------------------------------------------------------------------------------------------------


def _check_request(method: str, sign: str, image: ImageLike | None, alpha_overlay: float) -> None:
    if method not in METHODS:
        msg = f"unknown method {method!r}; choose one of {', '.join(METHODS)}"
        raise ValueError(msg)
    _check_sign(sign)
    if image is None and method != "heat_map":
        msg = f"method {method!r} draws on the image: pass image=, or use method='heat_map'"
        raise ValueError(msg)
    if sign == "all" and method in _UNSIGNED_ONLY:
        msg = (
            f"method {method!r} cannot show positive and negative attributions together; use "
            "sign 'positive', 'negative' or 'absolute_value', or method 'heat_map' or "
            "'blended_heat_map'"
        )
        raise ValueError(msg)
    if not 0.0 <= alpha_overlay <= 1.0:
        msg = f"alpha_overlay must be in [0, 1], got {alpha_overlay!r}"
        raise ValueError(msg)


def _resized(values: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """An ``(h, w)`` map resized (bilinear) to ``size`` = ``(H, W)``."""
    if values.shape == size:
        return values
    tensor = torch.from_numpy(values)[None, None]
    scaled = torch.nn.functional.interpolate(tensor, size=size, mode="bilinear",
                                             align_corners=False)
    return scaled[0, 0].numpy()


def _colours(values: np.ndarray, cmap: Colormap, vmin: float, vmax: float) -> np.ndarray:
    """``(H, W, 4)`` RGBA floats in [0, 1] of ``values`` through ``cmap`` from vmin to vmax."""
    return np.asarray(cmap(Normalize(vmin, vmax, clip=True)(values)), dtype=np.float64)


def _compose(norm: np.ndarray, rgb: np.ndarray | None, method: str, cmap: Colormap, vmin: float,
             vmax: float, alpha_overlay: float) -> np.ndarray:
    """The picture as ``(H, W, 3)`` floats in [0, 255]; transparent parts lie over white."""
    if method == "original_image":
        return rgb.astype(np.float64)
    if method == "masked_image":
        return rgb * norm[..., None]
    if method == "alpha_scaling":
        return rgb * norm[..., None] + 255.0 * (1.0 - norm[..., None])
    colours = _colours(norm, cmap, vmin, vmax)
    if method == "heat_map":
        alpha = colours[..., 3:]
        return 255.0 * (colours[..., :3] * alpha + (1.0 - alpha))
    grey = np.repeat(rgb.mean(axis=2, keepdims=True), 3, axis=2)
    alpha = alpha_overlay * colours[..., 3:]
    return grey * (1.0 - alpha) + 255.0 * colours[..., :3] * alpha


class PictureOptions(TypedDict, total=False):
    """How an attribution is drawn; the defaults are :func:`_render`'s (see
    :func:`attribution_image` for each)."""

    method: str
    sign: str
    outlier_perc: float
    cmap: str | Colormap | None
    alpha_overlay: float


def _render(attr: AttributionLike, image: ImageLike | None, *, method: str = "heat_map",
            sign: str = "absolute_value", outlier_perc: float = 2.0,
            cmap: str | Colormap | None = None, alpha_overlay: float = 0.5
            ) -> tuple[np.ndarray, ScalarMappable | None]:
    """The picture as ``(H, W, 3)`` uint8, and the colour scale of heat map methods."""
    _check_request(method, sign, image, alpha_overlay)
    norm = normalize_attribution(attr, sign, outlier_perc)
    rgb = None if image is None else to_rgb_array(image)
    if rgb is not None:
        norm = _resized(norm, rgb.shape[:2])
    default, vmin, vmax = sign_colormap(sign)
    colors = default if cmap is None else cmap if isinstance(cmap, Colormap) else colormap(cmap)
    picture = _compose(norm, rgb, method, colors, vmin, vmax, alpha_overlay)
    scale = ScalarMappable(Normalize(vmin, vmax), colors) if method in _HEAT_MAPS else None
    return np.rint(np.clip(picture, 0.0, 255.0)).astype(np.uint8), scale


def attribution_image(attr: AttributionLike, image: ImageLike | None = None,
                      **picture: Unpack[PictureOptions]) -> Image.Image:
    """A picture of the attribution ``attr`` as an RGB image, pixel for pixel, without axes.

    Args:
        attr: ``(C, H, W)`` or ``(H, W)`` numpy array or tensor (see :func:`attribution_map`),
            e.g. ``explanation.raw[0]``.
        image: the picture explained, anything :func:`heatlens.pictures.overlays.to_rgb_array`
            accepts (uint8 or floats in [0, 1]); needed by every method but ``"heat_map"``. When
            given, the result has its size (the normalised map is resized to it, bilinear).
        **picture: the options of :class:`PictureOptions`:

            - ``method``: one of :data:`METHODS` (see the module's description; default
              ``"heat_map"``).
            - ``sign``: one of :data:`SIGNS` (default ``"absolute_value"``); ``"all"`` does not
              go with ``"masked_image"`` or ``"alpha_scaling"``.
            - ``outlier_perc``: the percentage of the total absolute attribution, held by the
              largest values, that saturates (:func:`normalize_attribution`; default 2).
            - ``cmap``: a matplotlib colormap or its name for the heat map methods; ``None``
              (the default): the sign's own (:func:`sign_colormap`).
            - ``alpha_overlay``: weight of the heat map over the grey image in
              ``"blended_heat_map"`` (default 0.5).

    Raises:
        ValueError: for an unknown method, sign or colormap, a method that needs the image
            without one, sign ``"all"`` with ``"masked_image"`` or ``"alpha_scaling"``, or a bad
            attribution or image.
    """
    drawn, _ = _render(attr, image, **picture)
    return Image.fromarray(drawn)


def _draw(ax: Axes, picture: np.ndarray, scale: ScalarMappable | None, show_colorbar: bool,
          title: str | None) -> None:
    """Show ``picture`` on ``ax`` without ticks, with a colorbar below and a title."""
    ax.imshow(picture)
    ax.set_xticks([])
    ax.set_yticks([])
    if show_colorbar:
        from mpl_toolkits.axes_grid1 import make_axes_locatable

        bar = make_axes_locatable(ax).append_axes("bottom", size="5%", pad=0.1)
        if scale is None:  # keep the room so panels with and without a colorbar line up
            bar.set_axis_off()
        else:
            ax.figure.colorbar(scale, cax=bar, orientation="horizontal")
    if title:
        ax.set_title(title)


def attribution_figure(
    attr: AttributionLike,
    image: ImageLike | None = None,
    *,
    show_colorbar: bool = False,
    title: str | None = None,
    ax: Axes | None = None,
    figsize: tuple[float, float] = (6.0, 6.0),
    **picture: Unpack[PictureOptions],
) -> Figure:
    """The picture of :func:`attribution_image` in a matplotlib figure, like Captum's
    ``visualize_image_attr``.

    Args:
        attr, image, **picture: as in :func:`attribution_image`.
        show_colorbar: add a horizontal colorbar below the picture (heat map methods; the other
            methods keep an empty space there, so panels line up).
        title: the axes' title, or ``None`` for none.
        ax: draw on these axes instead of a new figure of ``figsize`` inches.

    Returns:
        The figure drawn on (``ax``'s when given). Save it with
        :func:`heatlens.pictures.overlays.save_figure`.
    """
    drawn, scale = _render(attr, image, **picture)
    if ax is None:
        figure = Figure(figsize=figsize)
        ax = figure.add_subplot()
    _draw(ax, drawn, scale, show_colorbar, title)
    return ax.figure.figure  # the root figure, also when ax is on a subfigure


def attribution_panels(
    attr: AttributionLike,
    image: ImageLike | None,
    methods: Sequence[str] = ("original_image", "blended_heat_map"),
    signs: Sequence[str] = ("all", "all"),
    titles: Sequence[str] | None = None,
    *,
    outlier_perc: float = 2.0,
    cmap: str | Colormap | None = None,
    alpha_overlay: float = 0.5,
    show_colorbar: bool = False,
    panel_size: float = 3.2,
) -> Figure:
    """Several pictures of one attribution side by side, like Captum's
    ``visualize_image_attr_multiple``: panel ``i`` shows ``methods[i]`` with ``signs[i]``.

    Args:
        attr, image: as in :func:`attribution_image`.
        methods, signs: one method and one sign per panel.
        titles: one title per panel, or ``None`` for none.
        outlier_perc, cmap, alpha_overlay, show_colorbar: as in :func:`attribution_figure`, the
            same for every panel.
        panel_size: width of a panel, in inches.
    """
    methods, signs = list(methods), list(signs)
    if not methods or len(methods) != len(signs):
        msg = (f"give at least one method and one sign per method; got {len(methods)} methods "
               f"and {len(signs)} signs")
        raise ValueError(msg)
    if titles is not None and len(titles) != len(methods):
        msg = f"got {len(methods)} methods but {len(titles)} titles; give one title per panel"
        raise ValueError(msg)
    if not panel_size > 0:
        msg = f"panel_size must be a positive number of inches, got {panel_size!r}"
        raise ValueError(msg)
    for method, sign in zip(methods, signs, strict=True):  # fail before drawing anything
        _check_request(method, sign, image, alpha_overlay)
    figure = Figure(figsize=(panel_size * len(methods), panel_size * 1.15))
    for index, (method, sign) in enumerate(zip(methods, signs, strict=True)):
        attribution_figure(attr, image, method=method, sign=sign, outlier_perc=outlier_perc,
                           cmap=cmap, alpha_overlay=alpha_overlay, show_colorbar=show_colorbar,
                           title=None if titles is None else titles[index],
                           ax=figure.add_subplot(1, len(methods), index + 1))
    figure.tight_layout()
    return figure
