"""Interpretable features of an image for the surrogate methods (LIME, KernelSHAP): a grid of
patches, superpixels (SLIC, Felzenszwalb; scikit-image, imported only when asked for), or the
user's own mask of feature ids."""

from __future__ import annotations

import importlib
import math
from typing import Any

import numpy as np
import torch
from torch import Tensor

SEGMENTERS = ("slic", "felzenszwalb")


def grid_features(x: Tensor, patch: int) -> Tensor:
    """Feature ids of square patches of ``patch`` pixels (cut at the border), numbered in
    row-major order over the spatial grid, the same for every channel and image:
    ``(B, C, *spatial)`` long."""
    ids = torch.zeros((), dtype=torch.long, device=x.device)
    for size in x.shape[2:]:
        cells = math.ceil(size / patch)
        ids = ids[..., None] * cells + torch.arange(size, device=x.device) // patch
    return ids.expand(x.shape)


def superpixels(x: Tensor, how: str, segments: int, options: dict[str, Any]) -> Tensor:
    """Superpixel ids of each image ``(B, C, H, W)`` by scikit-image's ``slic`` (about
    ``segments`` of them) or ``felzenszwalb``, on the image scaled to [0, 1]; renumbered
    ``0 ... F_i - 1``; ``(B, C, H, W)`` long, the same for every channel."""
    if x.ndim != 4:
        raise ValueError(f"superpixels need images (B, C, H, W), not shape {tuple(x.shape)}")
    try:
        segmentation = importlib.import_module("skimage.segmentation")
    except ImportError:
        raise ImportError(f"features={how!r} needs scikit-image, which is not installed: "
                          "pip install 'heatlens[superpixels]' (or use features='grid')") from None
    masks = []
    for image in x.detach().float().cpu():
        low, high = image.min(), image.max()
        picture = ((image - low) / (high - low).clamp_min(1e-12)).permute(1, 2, 0).numpy()
        if how == "slic":
            labels = segmentation.slic(picture, **{"n_segments": segments, "start_label": 0,
                                                   "channel_axis": -1, **options})
        else:
            labels = segmentation.felzenszwalb(picture, **{"channel_axis": -1, **options})
        _, ids = np.unique(labels, return_inverse=True)
        masks.append(torch.from_numpy(ids.reshape(labels.shape)).long())
    return torch.stack(masks)[:, None].expand(x.shape).to(x.device)


def feature_mask(x: Tensor, features: str | Tensor, patch: int = 16, segments: int = 50,
                 options: dict[str, Any] | None = None) -> Tensor:
    """The feature id of every input element, ``(B, C, *spatial)`` long: ``"grid"``,
    ``"slic"``, ``"felzenszwalb"`` or a tensor of non-negative integer ids broadcastable to
    the inputs (Captum's ``feature_mask``)."""
    if isinstance(features, Tensor):
        if features.is_floating_point() or features.dtype == torch.bool:
            raise TypeError(f"a feature mask holds integer ids, not {features.dtype}")
        try:
            mask = torch.broadcast_to(features.to(x.device).long(), x.shape)
        except RuntimeError:
            raise ValueError(f"feature mask of shape {tuple(features.shape)} does not broadcast "
                             f"to the inputs' shape {tuple(x.shape)}") from None
        if int(mask.min()) < 0:
            raise ValueError("feature ids must be >= 0")
        return mask
    if features == "grid":
        return grid_features(x, patch)
    if features in SEGMENTERS:
        return superpixels(x, features, segments, options or {})
    raise ValueError(f"features must be 'grid', {' or '.join(map(repr, SEGMENTERS))} or a "
                     f"tensor of feature ids, not {features!r}")
