"""Test-time augmentation smoothing of a CAM (pytorch-grad-cam's ``aug_smooth=True``).

The map of ``x`` is the mean over augmentations ``t`` of ``t^-1(map(t(x)))``: ``t`` flips the
input left-right (the last axis) or not, and multiplies its values by 0.9, 1.0 or 1.1 (six
augmentations, the ``ttach`` defaults pytorch-grad-cam uses: a pixel-value factor, not a spatial
scale); ``t^-1`` flips the map back. Each map is the method's own, in [0, 1]; their mean is not
rescaled, so a pixel reaches 1 only where every augmentation puts the peak, as in
pytorch-grad-cam.

Chosen differently from pytorch-grad-cam: with ``target=None`` every augmentation explains the
class predicted on the un-augmented input (pytorch-grad-cam takes each augmented copy's own
arg-max); ``.raw`` and the scores are the un-augmented input's.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from torch import Tensor, nn

from heatlens.engine.budget import DEFAULT_BUDGET, items_per_chunk
from heatlens.engine.targets import NO_CLASS, ClassLogit, Target
from heatlens.explanation import Explanation

FACTORS = (0.9, 1.0, 1.1)
AUGMENTATIONS = tuple((flip, factor) for flip in (False, True) for factor in FACTORS)
"""``(flip, factor)`` pairs, ``(False, 1.0)`` the identity."""


def augment(x: Tensor, flip: bool, factor: float) -> Tensor:
    """``x`` flipped along its last axis (if ``flip``) and multiplied by ``factor``."""
    flipped = x.flip(-1) if flip else x
    return flipped * factor if factor != 1.0 else flipped


def aug_smoothed(explain_once: Callable[[Tensor, Target], Explanation], model: nn.Module,
                 x: Tensor, target: Target, *, with_gradients: bool,
                 memory_budget: int = DEFAULT_BUDGET) -> Explanation:
    """The explanation of ``x`` by ``explain_once`` with its maps averaged over
    :data:`AUGMENTATIONS`; the augmented copies run in chunks within ``memory_budget``."""
    clean = explain_once(x, target)
    batch = x.shape[0]
    fixed = isinstance(target, ClassLogit) and bool((clean.targets != NO_CLASS).all())
    others = [a for a in AUGMENTATIONS if a != (False, 1.0)]
    step = max(1, items_per_chunk(model, x[:1], memory_budget,
                                  with_gradients=with_gradients) // batch)
    total = clean.maps.clone()
    for first in range(0, len(others), step):
        chunk = others[first:first + step]
        goal = type(target)(clean.targets.repeat(len(chunk))) if fixed else target
        part = explain_once(torch.cat([augment(x, *a) for a in chunk]), goal)
        for (flip, _), maps in zip(chunk, part.maps.reshape(len(chunk), *clean.maps.shape),
                                   strict=True):
            total += maps.flip(-1) if flip else maps
    details = {**clean.details, "aug_smooth": [f"{'flip, ' if flip else ''}x{factor}"
                                               for flip, factor in AUGMENTATIONS]}
    return dataclasses.replace(clean, maps=total / len(AUGMENTATIONS), details=details)
