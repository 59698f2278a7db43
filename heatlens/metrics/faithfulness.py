"""Faithfulness: does changing the pixels a map calls important change the prediction?

All metrics here rank the pixels of each map, change them a step at a time and score the
changed images with :func:`heatlens.metrics.perturbed.perturbed_scores` (the class
probability by default). Maps are ``(S, B, *spatial)``: ``S`` sources (methods and controls)
for a batch of ``B`` inputs; pixels are ranked by value, ties by position (a stable sort).

* **Deletion** and **insertion** (Petsiuk, Das & Saenko, "RISE", BMVC 2018, Sec. 4.1): the most
  relevant pixels are removed (set to a substrate) or inserted (into a blurred copy) ``step`` at
  a time; with ``x_i`` the fraction of pixels changed and ``y_i`` the score,
  ``AUC = sum_i (x_{i+1} - x_i) (y_i + y_{i+1}) / 2`` (the trapezoid rule). A faithful map has a
  low deletion AUC and a high insertion AUC. ``order="lerf"`` removes the least relevant first,
  the control of the same map.
* **AOPC** (Samek et al., "Evaluating the visualization of what a deep neural network has
  learned", IEEE TNNLS 2017, Eq. 12): ``1/(L+1) sum_{k=0}^{L} (y_0 - y_k)`` on the deletion
  curve (its most-relevant-first steps; the paper's patches are here the curve's steps).
* **ROAD** (Rong, Leemann, Borisov, Kasneci & Kasneci, ICML 2022): at each fraction ``p`` the
  pixels are removed most relevant first (MoRF: the map at least its ``1 - p`` quantile) or
  least relevant first (LeRF: at most its ``p`` quantile) and filled in by noisy linear
  imputation (:mod:`heatlens.metrics.imputation`), which leaves no sharp holes for the model to
  react to. ``ROAD = mean_p (y_LeRF(p) - y_MoRF(p)) / 2``, higher is more faithful.
* **Average drop** and **increase in confidence** (Chattopadhay et al., Grad-CAM++, WACV 2018,
  Sec. 5.1): with ``Y`` the score of the image and ``O`` that of the image multiplied by its map
  (in [0, 1]), ``drop = max(0, Y - O) / Y`` and ``increase = [Y < O]``, per image.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from heatlens.engine.maps import gaussian_blur
from heatlens.engine.targets import Target
from heatlens.methods.sampling import seeded_generator
from heatlens.metrics.imputation import noisy_linear_impute
from heatlens.metrics.perturbed import perturbed_scores

ORDERS = ("morf", "lerf")
ROAD_FRACTIONS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


@dataclass(frozen=True)
class Protocol:
    """How deletion removes and insertion inserts pixels.

    Attributes:
        name: ``"heatlens"`` or ``"rise"``.
        step: pixels changed per step: a fraction of the pixels (``0 < step < 1``) or a count.
        substrate: the value a deleted pixel takes, in the input's units (0 is the mean colour
            of inputs normalised by their dataset's mean and deviation).
        blur: the blurred copy that insertion starts from.
        description: one sentence for reports.
    """

    name: str
    step: float
    substrate: float
    blur: Callable[[Tensor], Tensor]
    description: str


def heatlens_protocol(step: float = 0.01, substrate: float = 0.0, blur_sigma: float = 5.0
                      ) -> Protocol:
    """Steps of ``step`` (1 % of the pixels by default), deletion to ``substrate``, insertion
    from a Gaussian blur of ``blur_sigma`` pixels (edges replicated)."""
    if not (0 < step < 1 or (step >= 1 and float(step).is_integer())):
        raise ValueError(f"step must be a fraction of the pixels (0 < step < 1) or a whole "
                         f"number of pixels, not {step!r}")
    what = f"{step:.0%} of the pixels" if step < 1 else f"{int(step)} pixels"
    return Protocol(
        "heatlens", step, substrate, lambda x: gaussian_blur(x, blur_sigma),
        f"{what} a step; deletion to {substrate:g}, insertion from a Gaussian blur of "
        f"{blur_sigma:g} px",
    )


def rise_blur(x: Tensor, size: int = 11, sigma: float = 5.0) -> Tensor:
    """RISE's insertion start: each channel convolved with a ``size x size`` kernel, zero padding.
    The kernel is what ``scipy.ndimage.gaussian_filter(delta, sigma)`` makes of a centred delta
    in a ``size x size`` array (mode "reflect": the Gaussian, truncated at ``4 sigma``, folded
    back at the array's edges), as the RISE authors build it."""
    radius = int(4 * sigma + 0.5)
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float64)
    weights = torch.exp(-0.5 * (offsets / sigma) ** 2)
    weights = weights / weights.sum()
    position = offsets.long() + size // 2
    period = 2 * size  # "reflect" (half-sample symmetric): d c b a | a b c d | d c b a
    position = position % period
    position = torch.where(position >= size, period - 1 - position, position)
    line = torch.zeros(size, dtype=torch.float64).index_add_(0, position, weights)
    kernel = (line[:, None] * line[None, :]).to(x.dtype)
    channels = x.shape[1]
    return F.conv2d(x, kernel.expand(channels, 1, size, size), padding=size // 2,
                    groups=channels)


RISE_PROTOCOL = Protocol(
    "rise", 224, 0.0, rise_blur,
    "RISE's settings (Petsiuk et al., BMVC 2018): 224 pixels a step, deletion to zeros, "
    "insertion from the image convolved with an 11 x 11 Gaussian of sigma 5",
)


@dataclass(frozen=True)
class Curve:
    """Scores along a perturbation: ``x`` ``(n,)`` the fraction of pixels changed, ``y``
    ``(S, B, n)`` the score of each source's map for each image."""

    x: Tensor
    y: Tensor

    def auc(self) -> Tensor:
        """``(S, B)``: the area under each curve by the trapezoid rule."""
        return torch.trapezoid(self.y, self.x, dim=-1)


def ranks(maps: Tensor, *, most_first: bool = True) -> Tensor:
    """``(S, B, N)``: each pixel's place in its map's order, 0 first; the most relevant first
    (or the least), ties by position."""
    flat = maps.flatten(2)
    order = torch.argsort(flat, dim=-1, descending=most_first, stable=True)
    places = torch.arange(flat.shape[-1], device=flat.device).expand_as(order)
    return torch.empty_like(order).scatter_(-1, order, places)


def step_curve(model: nn.Module, x: Tensor, maps: Tensor, classes: Tensor, target: Target, *,
               mode: str, protocol: Protocol, order: str = "morf", **run: Any) -> Curve:
    """The deletion (``mode="deletion"``) or insertion curve of every map (see the module
    docstring). ``run``: ``memory_budget``, ``show_progress``, ``probability``."""
    if mode not in ("deletion", "insertion"):
        raise ValueError(f"mode must be 'deletion' or 'insertion', not {mode!r}")
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, not {order!r}")
    sources, batch = maps.shape[:2]
    pixels = math.prod(maps.shape[2:])
    counts = step_counts(protocol.step, pixels).to(x.device)
    steps = counts.numel() - 1
    changed_at = ranks(maps, most_first=order == "morf")
    changed = torch.full_like(x, protocol.substrate) if mode == "deletion" else x
    start = x if mode == "deletion" else protocol.blur(x)
    points = steps + 1

    def build(first: int, stop: int) -> tuple[Tensor, Tensor]:
        index = torch.arange(first, stop, device=x.device)
        source, image, step = index // (batch * points), index // points % batch, index % points
        mask = changed_at[source, image] < counts[step][:, None]
        mask = mask.reshape(-1, 1, *x.shape[2:])
        return torch.where(mask, changed[image], start[image]), classes[image]

    scores = perturbed_scores(model, x[:1], sources * batch * points, build, target,
                              description=mode, **run)
    return Curve(counts.float() / pixels, scores.reshape(sources, batch, points))


def step_counts(step: float, pixels: int) -> Tensor:
    """How many pixels are changed after each step, from 0 to all: ``step`` a fraction gives
    ``round(1 / step)`` even steps (``round(i N / n)``); a count, that many pixels a step (the
    last step takes what is left)."""
    if step < 1:
        steps = max(1, round(1 / step))
        return torch.round(torch.arange(steps + 1, dtype=torch.float64) * pixels / steps).long()
    steps = math.ceil(pixels / int(step))
    return (torch.arange(steps + 1) * int(step)).clamp(max=pixels)


def aopc(deletion: Curve) -> Tensor:
    """``(S, B)``: the mean drop from the unperturbed score along a deletion curve (Samek et al.
    2017, Eq. 12)."""
    return (deletion.y[..., :1] - deletion.y).mean(dim=-1)


def road_removed(maps: Tensor, fraction: float, order: str) -> Tensor:
    """``(S, B, *spatial)`` bool: the pixels ROAD removes at ``fraction``, ranked most relevant
    first (``"morf"``) or least relevant first (``"lerf"``), ties by position.

    How many: as many as a threshold at the ``1 - fraction`` quantile (most relevant first: the
    map at least that value) or at the ``fraction`` quantile (least relevant first: at most it)
    would take from ``N`` distinct values, with linear interpolation as NumPy's percentile,
    which pytorch-grad-cam uses; so without ties the set is exactly pytorch-grad-cam's, and with
    ties (a constant map, a flat region) it is still that many pixels, never the whole image."""
    pixels = math.prod(maps.shape[2:])
    positions = torch.arange(pixels, dtype=torch.float64)
    if order == "morf":
        count = int((positions >= torch.quantile(positions, 1 - fraction)).sum())
    else:
        count = int((positions <= torch.quantile(positions, fraction)).sum())
    return (ranks(maps, most_first=order == "morf") < count).reshape(maps.shape)


def road_curves(model: nn.Module, x: Tensor, maps: Tensor, classes: Tensor, target: Target, *,
                fractions: Sequence[float] = ROAD_FRACTIONS, noise: float = 0.01,
                seed: int = 0, **run: Any) -> tuple[Curve, Curve]:
    """ROAD's most-relevant-first and least-relevant-first curves (see the module docstring).
    The noise of copy ``q`` (its imputed pixels plus ``noise`` times a standard normal draw) is
    drawn from ``seed`` and ``q`` alone, so chunking does not change it."""
    if not fractions or not all(0 < f < 1 for f in fractions):
        raise ValueError(f"ROAD fractions must lie strictly between 0 and 1, got {fractions}")
    sources, batch = maps.shape[:2]
    count = len(fractions)
    removed = torch.stack([torch.stack([road_removed(maps, f, order) for f in fractions], dim=2)
                           for order in ORDERS], dim=2)  # (S, B, 2, P, *spatial)

    def build(first: int, stop: int) -> tuple[Tensor, Tensor]:
        index = torch.arange(first, stop, device=x.device)
        image = index // (2 * count) % batch
        holes = removed.reshape(-1, *x.shape[2:])[index]
        filled = noisy_linear_impute(x[image], holes, noise=0.0)
        draws = torch.stack([torch.randn(x.shape[1:], device=x.device, dtype=x.dtype,
                                         generator=seeded_generator(seed, int(q), x.device))
                             for q in index])
        return filled + noise * draws * holes[:, None], classes[image]

    scores = perturbed_scores(model, x[:1], sources * batch * 2 * count, build, target,
                              description="road", **run).reshape(sources, batch, 2, count)
    axis = torch.tensor(fractions, dtype=torch.float32, device=x.device)
    return Curve(axis, scores[:, :, 0]), Curve(axis, scores[:, :, 1])


def road(morf: Curve, lerf: Curve) -> Tensor:
    """``(S, B)``: ``mean_p (y_LeRF(p) - y_MoRF(p)) / 2``; higher is more faithful."""
    return ((lerf.y - morf.y) / 2).mean(dim=-1)


def confidence_change(model: nn.Module, x: Tensor, maps: Tensor, classes: Tensor,
                      target: Target, **run: Any) -> tuple[Tensor, Tensor]:
    """Average drop and increase in confidence, per map and image, ``(S, B)`` each (see the
    module docstring); ``maps`` lie in [0, 1] and multiply every channel."""
    sources, batch = maps.shape[:2]
    masked = maps[:, :, None] * x[None]  # (S, B, C, *spatial)
    stack = torch.cat([x, masked.flatten(0, 1)])

    def build(first: int, stop: int) -> tuple[Tensor, Tensor]:
        return stack[first:stop], classes.repeat(sources + 1)[first:stop]

    scores = perturbed_scores(model, x[:1], stack.shape[0], build, target,
                              description="average drop", **run)
    clean, kept = scores[:batch], scores[batch:].reshape(sources, batch)
    drop = (clean - kept).clamp_min(0) / clean.clamp_min(torch.finfo(clean.dtype).tiny)
    return drop, (kept > clean).float()
