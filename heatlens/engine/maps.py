"""Map math: channel weighting, and the visible steps from a raw map to a picture (ReLU,
upsampling, min-max scaling, fusion).

All functions work on a whole batch ``(B, *spatial)`` with any number of spatial dimensions, in
torch, on the maps' device (``docs/design.md``, promises 5 to 7). :func:`per_channel` and
:func:`safe_divide` are the two steps every channel-weighted CAM shares.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

_MODES = {1: "linear", 2: "bilinear", 3: "trilinear"}


def spatial_dims(t: Tensor, first: int = 2) -> tuple[int, ...]:
    """The dimensions after batch and channel: ``(2, ..., t.ndim - 1)``."""
    return tuple(range(first, t.ndim))


def per_channel(weights: Tensor, activations: Tensor) -> Tensor:
    """``sum_k w_k A^k``: channel weights ``(B, C)`` applied to activations ``(B, C, *spatial)``."""
    return (weights.reshape(*weights.shape, *[1] * (activations.ndim - 2)) * activations).sum(1)


def safe_divide(numerator: Tensor, denominator: Tensor) -> Tensor:
    """``numerator / denominator`` where the denominator is non-zero, else 0."""
    nonzero = denominator != 0
    return numerator * nonzero / denominator.where(nonzero, 1.0)


def upsample(maps: Tensor, size: Sequence[int], *, align_corners: bool = False) -> Tensor:
    """Resize ``(B, *spatial)`` maps to ``size`` with one (bi/tri)linear ``interpolate`` call
    (by default ``align_corners=False``: pixel centres aligned)."""
    size = tuple(int(s) for s in size)
    if tuple(maps.shape[1:]) == size:
        return maps
    if len(size) not in _MODES:
        raise ValueError(f"cannot upsample maps with {len(size)} spatial dimensions (1 to 3)")
    return F.interpolate(maps[:, None].float(), size=size, mode=_MODES[len(size)],
                         align_corners=align_corners)[:, 0]


CONSTANT = 1e-5
"""A map whose values span at most this fraction of its largest magnitude is constant: the
differences are float rounding (a 1 x 1 map upsampled bilinearly), not a place."""


def constant_maps(maps: Tensor, eps: float = 1e-12) -> Tensor:
    """``(B,)`` bool: which of the ``(B, *spatial)`` maps hold one value, up to :data:`CONSTANT`
    of their largest magnitude (or ``eps``)."""
    flat = maps.reshape(maps.shape[0], -1).float()
    span = flat.amax(dim=1) - flat.amin(dim=1)
    return span <= (CONSTANT * flat.abs().amax(dim=1)).clamp_min(eps)


def minmax(maps: Tensor, eps: float = 1e-12) -> Tensor:
    """Scale each map to [0, 1]: ``(m - min m) / (max m - min m)``; a constant map (see
    :func:`constant_maps`) becomes zeros, never rounding noise stretched to [0, 1]."""
    flat = maps.reshape(maps.shape[0], -1).float()
    low = flat.amin(dim=1, keepdim=True)
    span = flat.amax(dim=1, keepdim=True) - low
    flat_constant = constant_maps(maps, eps)[:, None]
    scaled = torch.where(flat_constant, torch.zeros_like(flat),
                         (flat - low) / span.clamp_min(eps))
    return scaled.reshape(maps.shape)


def fuse_mean(maps: Sequence[Tensor]) -> Tensor:
    """Several layers' maps at one size: each min-max scaled, then their mean, scaled again.

    pytorch-grad-cam aggregates several layers the same way but scales each layer before
    upsampling, so its maps differ slightly (bilinear upsampling lowers interior peaks); scaling
    after upsampling keeps every layer's map exactly in [0, 1]. For one layer this is plain
    min-max scaling."""
    return minmax(torch.stack([minmax(m) for m in maps]).mean(dim=0))


def fuse_tanh_max(maps: Sequence[Tensor], gamma: float = 2.0) -> Tensor:
    """LayerCAM's fusion (Jiang et al., IEEE TIP 2021, Sec. III-C): each non-negative map is
    rescaled as ``tanh(gamma * M / max M)`` (``gamma = 2``) so that shallow layers' small values
    count, then the element-wise maximum is taken over layers and min-max scaled."""
    scaled = []
    for m in maps:
        peak = m.reshape(m.shape[0], -1).amax(dim=1).clamp_min(1e-12)
        scaled.append(torch.tanh(gamma * m / peak.reshape(-1, *([1] * (m.ndim - 1)))))
    return minmax(torch.stack(scaled).amax(dim=0))


FUSIONS = {"mean": fuse_mean, "tanh-max": fuse_tanh_max}


def gaussian_blur(x: Tensor, sigma: float) -> Tensor:
    """Each channel blurred by a Gaussian of ``sigma`` pixels along every spatial dimension
    (separable, edges replicated)."""
    if sigma <= 0:
        return x.clone()
    radius = max(1, math.ceil(3 * sigma))
    offsets = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = kernel / kernel.sum()
    channels, spatial = x.shape[1], x.ndim - 2
    conv = (F.conv1d, F.conv2d, F.conv3d)[spatial - 1]
    out = x
    for dim in range(spatial):
        shape = [1] * spatial
        shape[dim] = kernel.numel()
        weight = kernel.reshape(1, 1, *shape).repeat(channels, 1, *[1] * spatial)
        pad = [0, 0] * spatial
        pad[2 * (spatial - 1 - dim)] = pad[2 * (spatial - 1 - dim) + 1] = radius
        padded = F.pad(out, pad, mode="replicate")
        out = conv(padded, weight, groups=channels)
    return out
