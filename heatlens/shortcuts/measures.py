"""Where an image's relevance lies: on the object (with boxes or masks), and in the border band
and corners of the image (always), where watermarks, scanner tokens and rulers sit.

Notation: ``L`` a map ``(H, W)``, ``L+ = max(L, 0)`` its positive part, ``O`` the object's
pixels, ``share(R) = sum_{p in R} L+_p / sum_p L+_p`` the share of the relevance in region ``R``.

* On the object, the localisation metrics of :mod:`heatlens.metrics.localisation`: relevance
  mass ``share(O)`` and relevance rank (Arras et al., 2022), the pointing game (Zhang et al.,
  2018, 15 px tolerance) and the **lift** ``share(O) / (|O| / (H W))``: how many times more
  relevance the object holds than a uniform map would give it (1: no preference for the object).
* The image's **border band**, the pixels within ``band`` of the image's side from an edge
  (``band = 0.1``: 36 % of the pixels), and eight **places** that tile it: four corner squares of
  side ``2 band`` and the four edge strips between them. An image's place is the one whose
  share is the largest multiple of its area (the most over-represented), with that share.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from heatlens.engine.maps import safe_divide
from heatlens.metrics.localisation import pointing_game, relevance_mass, relevance_rank

BAND = 0.1
"""Width of the border band, a fraction of the image's side."""
PLACES = ("top-left corner", "top-right corner", "bottom-left corner", "bottom-right corner",
          "top edge", "bottom edge", "left edge", "right edge")


def places(height: int, width: int, band: float = BAND) -> Tensor:
    """The eight places of the border band (see the module docstring), ``(8, H, W)`` bool in
    the order of :data:`PLACES`; their union is the band."""
    if not 0 < band < 0.25:
        raise ValueError(f"band must lie in (0, 0.25), got {band}")
    rows = (torch.arange(height) + 0.5) / height
    columns = (torch.arange(width) + 0.5) / width
    top, bottom = rows < band, rows > 1 - band
    left, right = columns < band, columns > 1 - band
    near_top, near_bottom = rows < 2 * band, rows > 1 - 2 * band
    near_left, near_right = columns < 2 * band, columns > 1 - 2 * band
    middle_rows, middle_columns = ~near_top & ~near_bottom, ~near_left & ~near_right
    band_pixels = top[:, None] | bottom[:, None] | left[None, :] | right[None, :]
    regions = [near_top[:, None] & near_left[None, :], near_top[:, None] & near_right[None, :],
               near_bottom[:, None] & near_left[None, :],
               near_bottom[:, None] & near_right[None, :],
               top[:, None] & middle_columns[None, :], bottom[:, None] & middle_columns[None, :],
               middle_rows[:, None] & left[None, :], middle_rows[:, None] & right[None, :]]
    return torch.stack([region & band_pixels for region in regions])


@dataclass(frozen=True)
class BorderMeasures:
    """Per image ``(B,)``: the share of relevance in the border band, the index of its place
    (into :data:`PLACES`) and that place's share."""

    band: Tensor
    place: Tensor
    place_share: Tensor


def border(maps: Tensor, band: float = BAND) -> BorderMeasures:
    """The border band's share and each image's place (see the module docstring) of ``maps``
    ``(B, H, W)``; an all-zero map scores 0 everywhere."""
    positive = maps.clamp_min(0).flatten(1).double()
    regions = places(*maps.shape[-2:], band).to(maps.device).flatten(1).double()  # (8, N)
    total = positive.sum(dim=1, keepdim=True)
    shares = safe_divide(positive @ regions.T, total)  # (B, 8)
    areas = regions.sum(dim=1) / regions.shape[1]
    in_band = safe_divide((positive * regions.amax(dim=0)).sum(dim=1), total[:, 0])
    place = (shares / areas).argmax(dim=1)
    return BorderMeasures(in_band.float(), place, shares.gather(1, place[:, None])[:, 0].float())


@dataclass(frozen=True)
class ObjectMeasures:
    """Per image ``(B,)``: relevance mass on the object, its lift, the pointing game's hit,
    relevance rank and the object's share of the image."""

    mass: Tensor
    lift: Tensor
    hit: Tensor
    rank: Tensor
    area: Tensor


def on_object(maps: Tensor, masks: Tensor, tolerance: float = 15) -> ObjectMeasures:
    """The localisation of ``maps`` ``(B, H, W)`` on the objects ``masks`` ``(B, H, W)`` bool
    (see the module docstring), each by :mod:`heatlens.metrics.localisation`."""
    mass = relevance_mass(maps, masks)
    area = masks.flatten(1).float().mean(dim=1)
    return ObjectMeasures(mass, mass / area, pointing_game(maps, masks, tolerance),
                          relevance_rank(maps, masks), area)
