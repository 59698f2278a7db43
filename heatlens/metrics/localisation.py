"""Localisation: does a saliency map fall on the object? Four scores of maps against
ground-truth object regions, and the boxes-to-masks step that makes those regions.

Every metric takes ``maps`` ``(B, H, W)`` (any real values) and ``masks`` ``(B, H, W)`` bool
(True = object) of the same size, and returns ``(B,)`` scores, computed in torch for the whole
batch on the maps' device. Maps and masks should be at the image's resolution (upsample the maps
with :func:`heatlens.engine.maps.upsample`), so that pixel counts and distances mean what they
meant in the papers.

Notation: ``L`` a map, ``O`` the object's pixels (the mask), ``N = H W``, ``K = |O|``.

Input checks, the same for all four (``docs/design.md``, promise 12): maps and masks of
different shapes, a mask that is not bool, a map holding NaN or inf, and an empty mask (no
object pixel: every score is undefined there) raise a one-line ``ValueError`` or ``TypeError``
naming the image. A constant map (values equal up to :data:`heatlens.engine.maps.CONSTANT` of
their largest magnitude, i.e. float rounding) is scored, not refused, with a warning: an
explanation that found nothing (Grad-CAM after its ReLU, for a class without evidence) must not
abort the evaluation of a whole data set. Each metric's docstring says what it returns then.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from heatlens.engine.maps import constant_maps, safe_divide
from heatlens.engine.notices import warn
from heatlens.metrics.controls import image_size

BoxesLike = Tensor | Sequence[Any]
"""Boxes per image: one ``(B, 4)`` or ``(B, n, 4)`` tensor or array, or a list of ``B`` entries
(tensors, arrays or lists), each ``(n_i, 4)`` or ``(4,)`` for one box."""


def boxes_to_masks(boxes: BoxesLike, size: Sequence[int], *,
                   device: torch.device | str | None = None) -> Tensor:
    """Object masks ``(B, H, W)`` bool from boxes ``(x1, y1, x2, y2)`` in pixels; an image's mask
    is the union of its boxes.

    Pixel convention: pixel ``(row i, column j)`` covers the square ``[j, j + 1) x [i, i + 1)``,
    and a box covers the pixels whose centre ``(j + 0.5, i + 0.5)`` lies in
    ``[x1, x2) x [y1, y2)``. For integer coordinates that is columns ``x1 .. x2 - 1`` and rows
    ``y1 .. y2 - 1``, the slice ``mask[y1:y2, x1:x2]`` (torchvision's and COCO's continuous
    coordinates; a box ``(0, 0, W, H)`` covers the whole image). A Pascal VOC box in inclusive
    pixel indices ``(xmin, ymin, xmax, ymax)`` is ``(xmin - 1, ymin - 1, xmax, ymax)`` here.

    ``boxes``: a ``(B, 4)`` tensor or array (one box per image), a ``(B, n, 4)`` one (``n`` per
    image), or a list of ``B`` entries, each ``(n_i, 4)`` or ``(4,)`` (several boxes per image
    allowed). ``size``: ``(H, W)``. The masks are on ``device`` (default: the boxes' device when
    they come as one tensor, else the CPU).

    Raises ``ValueError`` for a wrong shape, an image with no box, a coordinate that is NaN or
    inf, a box with ``x1 >= x2`` or ``y1 >= y2``, a box reaching outside the image (clip it
    first) and a box that covers no pixel centre.
    """
    height, width = image_size(size)
    per_image = _boxes_per_image(boxes)
    if device is None:
        device = boxes.device if isinstance(boxes, Tensor) else "cpu"
    for i, image_boxes in enumerate(per_image):
        for j, box in enumerate(image_boxes.tolist()):
            _check_box(box, i, j, height, width)
    counts = torch.tensor([len(b) for b in per_image])
    owner = torch.repeat_interleave(counts).to(device)  # box -> its image: 0 (n_0 times), 1, ...
    x1, y1, x2, y2 = torch.cat(per_image).to(device).unbind(dim=1)
    columns = torch.arange(width, device=device, dtype=torch.float64) + 0.5
    rows = torch.arange(height, device=device, dtype=torch.float64) + 0.5
    in_x = (columns >= x1[:, None]) & (columns < x2[:, None])  # (n, W)
    in_y = (rows >= y1[:, None]) & (rows < y2[:, None])  # (n, H)
    covered = (in_y[:, :, None] & in_x[:, None, :]).flatten(1).float()  # (n, H W)
    union = torch.zeros(len(per_image), height * width, device=device)
    union.index_add_(0, owner, covered)
    return (union > 0).reshape(len(per_image), height, width)


def pointing_game(maps: Tensor, masks: Tensor, tolerance: float = 15) -> Tensor:
    """The pointing game (Zhang et al., "Top-down Neural Attention by Excitation Backprop",
    IJCV 2018): ``hit = 1`` if the map's maximum ``argmax L`` lies on the object or within
    ``tolerance`` pixels of it, ``dist(argmax L, O) <= tolerance``, else ``0``; the accuracy of a
    data set is the mean of the hits. ``(B,)`` float 1.0 / 0.0.

    The distance is Euclidean between pixel centres, to the nearest object pixel: the object is
    dilated by a disc of radius ``tolerance``. The 15 px default is the paper's (at the image's
    resolution); ``tolerance=0`` asks for the maximum on the object itself.

    Negative values are values like any other: only where the maximum is matters.
    Ties: a map whose maximum is reached at several pixels scores a hit only if every one of them
    is within reach (a map cannot win by spreading its peak). A constant map has no maximum
    point, points at nothing, and scores 0 (with a warning).

    Quantus 0.6 (``quantus.PointingGame``) differs: it has no tolerance (``tolerance=0`` here),
    counts a hit when *any* tied maximum is on the object (so a constant map always hits), and
    scores an empty mask as a hit (its NaN is cast to ``True``); here an empty mask is an error.
    """
    if isinstance(tolerance, bool) or not isinstance(tolerance, numbers.Real) or not (
            math.isfinite(tolerance) and tolerance >= 0):
        raise ValueError(f"pointing_game needs a tolerance >= 0 in pixels, got {tolerance!r}")
    maps, masks = _checked(maps, masks, "pointing_game")
    reach = _dilate(masks, float(tolerance)).flatten(1)
    flat = maps.flatten(1)
    peaks = flat == flat.amax(dim=1, keepdim=True)
    hits = ~(peaks & ~reach).any(dim=1)
    constant = _constant(maps, "pointing_game", "points at nothing and scores 0 (a miss)")
    return (hits & ~constant).to(maps.dtype)


def energy_inside(maps: Tensor, masks: Tensor) -> Tensor:
    """The energy-based pointing game (Wang et al., "Score-CAM", CVPRW 2020, Sec. 4.3): the share
    of the map's energy that falls on the object, ``sum_{p in O} L_p / sum_p L_p``. ``(B,)`` in
    [0, 1].

    The energy is of a non-negative map, as Score-CAM's maps are (ReLU, then min-max scaling):
    a map with a negative value raises ``ValueError``; pass the maps after ReLU
    (``Explanation.maps``), or use :func:`relevance_mass`, which counts the positive part of a
    signed map and equals this on non-negative maps. A constant positive map scores the object's
    share of the image, ``K / N``; a map of zeros has no energy, on the object or elsewhere, and
    scores 0 (with a warning).
    """
    maps, masks = _checked(maps, masks, "energy_inside")
    lowest = maps.flatten(1).amin(dim=1)
    if bool((lowest < 0).any()):
        i = int((lowest < 0).nonzero()[0, 0])
        raise ValueError(
            f"energy_inside: map {i} has negative values (down to {float(lowest[i]):.3g}), and "
            "the energy is of a non-negative map: pass the maps after ReLU (Explanation.maps), "
            "or use relevance_mass, which counts the positive part of a signed map"
        )
    return _share_inside(maps, masks, "energy_inside")


def relevance_mass(maps: Tensor, masks: Tensor) -> Tensor:
    """Relevance mass accuracy (Arras, Osman, Samek, "CLEVR-XAI", Information Fusion 2022): the
    share of the positive relevance that lies on the object,
    ``R_within / R_total = sum_{p in O} max(L_p, 0) / sum_p max(L_p, 0)``. ``(B,)`` in [0, 1].

    Negative values count as 0, as in the paper's heatmaps (its pooling "sum,pos" keeps the
    positive part of the channel sum; its other poolings are non-negative): relevance against
    the class is not mass on or off the object. A map with no positive value scores 0 (with a
    warning): no relevance lies on the object.

    Quantus 0.6 (``quantus.RelevanceMassAccuracy`` with ``abs=False``) divides the signed sums,
    ``sum_{p in O} L_p / sum_p L_p``; on a map with negative values that can leave [0, 1] (the
    total can be near 0 or negative). On non-negative maps the two agree.
    """
    maps, masks = _checked(maps, masks, "relevance_mass")
    return _share_inside(maps.clamp_min(0), masks, "relevance_mass")


def relevance_rank(maps: Tensor, masks: Tensor) -> Tensor:
    """Relevance rank accuracy (Arras, Osman, Samek, "CLEVR-XAI", Information Fusion 2022): with
    ``P_K`` the ``K = |O|`` pixels of highest relevance, the fraction of them on the object,
    ``|P_K intersect O| / K``. ``(B,)`` in [0, 1].

    Values are ranked as they are: a negative pixel ranks below a zero one.
    Ties at the ``K``-th value: the tied pixels share the places left among the top ``K`` evenly,
    so the score is its expectation over a random order of the ties,
    ``(|{L_p > t} intersect O| + s |{L_p = t} intersect O| / |{L_p = t}|) / K``, with ``t`` the
    ``K``-th highest value and ``s = K - |{L_p > t}|`` the places left. It does not depend on the
    order of the pixels in memory. A constant map ranks no pixel above another and scores the
    chance level ``K / N`` (with a warning).

    Quantus 0.6 (``quantus.RelevanceRankAccuracy``) takes the first ``K`` of ``numpy.argsort``,
    which orders ties arbitrarily (its default sort is not stable), so a map with ties at the
    ``K``-th value scores whatever that order gives; without such ties the two agree.
    """
    maps, masks = _checked(maps, masks, "relevance_rank")
    flat, inside = maps.flatten(1), masks.flatten(1)
    k = inside.sum(dim=1)
    kth = flat.sort(descending=True).values.gather(1, (k - 1)[:, None])
    above, tied = flat > kth, flat == kth
    dtype = maps.dtype
    places = k - above.sum(dim=1)
    # one cast to the maps' dtype; the integer counts meet it by type promotion
    share_of_ties = (tied & inside).sum(dim=1) / tied.sum(dim=1).to(dtype)
    score = ((above & inside).sum(dim=1) + places * share_of_ties) / k
    constant = _constant(maps, "relevance_rank", "ranks no pixel above another and scores "
                                                 "the chance level K / (H W)")
    return torch.where(constant, k.to(dtype) / flat.shape[1], score)


def _share_inside(maps: Tensor, masks: Tensor, metric: str) -> Tensor:
    """``sum_{p in O} L_p / sum_p L_p`` for non-negative maps; 0 where the map is all zeros."""
    flat = maps.flatten(1)
    total = flat.sum(dim=1)
    inside = (flat * masks.flatten(1)).sum(dim=1)
    nothing = total == 0
    if bool(nothing.any()):
        warn(f"{metric}: map(s) {_indices(nothing)} hold no positive value, so none of it lies on "
             "the object: they score 0")
    return safe_divide(inside, total)


def _dilate(masks: Tensor, radius: float) -> Tensor:
    """The pixels whose centre is within ``radius`` (Euclidean) of an object pixel's centre."""
    r = math.floor(radius)
    if r == 0:
        return masks
    offsets = torch.arange(-r, r + 1, device=masks.device)
    disc = (offsets[:, None] ** 2 + offsets[None, :] ** 2 <= radius**2).float()
    counts = F.conv2d(masks[:, None].float(), disc[None, None], padding=r)[:, 0]
    return counts > 0.5


def _constant(maps: Tensor, metric: str, outcome: str) -> Tensor:
    """``(B,)`` bool: the constant maps, with a warning naming them and what they score."""
    constant = constant_maps(maps)
    if bool(constant.any()):
        warn(f"{metric}: map(s) {_indices(constant)} are constant: a constant map {outcome}")
    return constant


def _indices(flags: Tensor) -> str:
    found = flags.nonzero()[:, 0].tolist()
    shown = ", ".join(str(i) for i in found[:10])
    return shown + (f" and {len(found) - 10} more" if len(found) > 10 else "")


def _checked(maps: Tensor, masks: Tensor, metric: str) -> tuple[Tensor, Tensor]:
    """The checks every metric makes (promise 12); returns float maps and bool masks on the
    maps' device."""
    if not isinstance(maps, Tensor) or not isinstance(masks, Tensor):
        raise TypeError(f"{metric} takes maps and masks as torch tensors, got "
                        f"{type(maps).__name__} and {type(masks).__name__}: use torch.as_tensor")
    if maps.ndim != 3:
        hint = ("drop the channel with maps[:, 0]" if maps.ndim == 4 and maps.shape[1] == 1
                else "add the batch dimension with maps[None]" if maps.ndim == 2
                else "pass one map per image")
        raise ValueError(f"{metric} takes maps (B, H, W), got shape {tuple(maps.shape)}: {hint}")
    if masks.dtype != torch.bool:
        raise TypeError(f"{metric} takes masks of dtype bool (True = object), got {masks.dtype}: "
                        "pass masks > 0.5, or boxes_to_masks(boxes, (H, W))")
    if masks.shape != maps.shape:
        raise ValueError(
            f"{metric}: maps are {tuple(maps.shape)} but masks are {tuple(masks.shape)}; they "
            "must match: upsample the maps to the image size (heatlens.engine.maps.upsample) or "
            "make the masks at the maps' size"
        )
    if maps.dtype not in (torch.float32, torch.float64):
        maps = maps.float()
    bad = ~torch.isfinite(maps)
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        what = "NaN" if bool(maps[i].isnan().any()) else "inf"
        raise ValueError(f"{metric}: map {i} holds {what}: fix the explanation that made it, or "
                         f"leave image {i} out")
    masks = masks.to(maps.device)
    empty = ~masks.flatten(1).any(dim=1)
    if bool(empty.any()):
        i = int(empty.nonzero()[0, 0])
        raise ValueError(f"{metric}: mask {i} is empty (no object pixel), where the score is "
                         f"undefined: leave image {i} out, or check its box or segmentation")
    return maps, masks


def _boxes_per_image(boxes: BoxesLike) -> list[Tensor]:
    """The boxes as a list of ``(n_i, 4)`` float64 tensors, one per image."""
    if isinstance(boxes, Tensor) or hasattr(boxes, "__array__"):
        array = torch.as_tensor(boxes)
        if array.ndim == 2 and array.shape[1] == 4:
            array = array[:, None]
        if array.ndim != 3 or array.shape[2] != 4 or array.shape[0] == 0:
            raise ValueError(
                f"boxes as one tensor must be (B, 4) (one box per image) or (B, n, 4), got shape "
                f"{tuple(array.shape)}; for several boxes per image pass a list of (n_i, 4)"
            )
        if array.shape[1] == 0:
            raise ValueError(f"boxes of shape {tuple(array.shape)} give no image a box; every "
                             "image needs at least one (leave images without an object out)")
        return list(array.detach().cpu().double().unbind(0))
    if not isinstance(boxes, Sequence) or isinstance(boxes, str) or len(boxes) == 0:
        raise ValueError("boxes must be a (B, 4) tensor or a list with one entry of (n_i, 4) "
                         f"boxes per image, got {type(boxes).__name__} {boxes!r:.60}")
    per_image = []
    for i, entry in enumerate(boxes):
        try:
            array = torch.as_tensor(entry, dtype=torch.float64)
        except (TypeError, ValueError, RuntimeError):
            raise ValueError(f"boxes of image {i} are not numbers in a (n, 4) array: "
                             f"{entry!r:.60}") from None
        if array.ndim == 1 and array.shape[0] == 4:
            array = array[None]
        if array.ndim == 2 and array.shape[0] == 0:
            raise ValueError(f"image {i} has no box; every image needs at least one (leave "
                             "images without an object out)")
        if array.ndim != 2 or array.shape[1] != 4:
            raise ValueError(f"boxes of image {i} must be (n, 4) as (x1, y1, x2, y2), got shape "
                             f"{tuple(array.shape)}")
        per_image.append(array.detach().cpu())
    return per_image


def _check_box(box: list[float], image: int, index: int, height: int, width: int) -> None:
    x1, y1, x2, y2 = box
    coords = ", ".join(f"{v:g}" for v in box)
    where = f"box {index} of image {image} is ({coords})"
    if not all(math.isfinite(v) for v in box):
        raise ValueError(f"{where}: coordinates must be finite numbers")
    if x1 >= x2 or y1 >= y2:
        raise ValueError(
            f"{where}: boxes are (x1, y1, x2, y2) with x1 < x2 and y1 < y2 (for (x, y, w, h) "
            "boxes use torchvision.ops.box_convert(boxes, 'xywh', 'xyxy'))"
        )
    if x1 < 0 or y1 < 0 or x2 > width or y2 > height:
        raise ValueError(
            f"{where}, outside the image of {height} x {width} (H x W), where 0 <= x1 < x2 <= "
            f"{width} and 0 <= y1 < y2 <= {height}: clip it with "
            "torchvision.ops.clip_boxes_to_image, or check the size"
        )
    if math.ceil(x1 - 0.5) >= math.ceil(x2 - 0.5) or math.ceil(y1 - 0.5) >= math.ceil(y2 - 0.5):
        raise ValueError(
            f"{where}, which covers no pixel centre (a box covers the pixels whose centre lies "
            "in [x1, x2) x [y1, y2)): widen it"
        )
