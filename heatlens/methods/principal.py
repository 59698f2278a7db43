"""Principal components of a layer's features, as Eigen-CAM and its relatives use them.

``features`` ``(B, C, *spatial)`` become, per image, ``X`` ``(N, C)``: one row per position
(``N`` positions), centred over the positions. A map is the projection of every row on one
direction ``v``, ``m = X v`` ``(N,)``, reshaped to the grid. The sign of a principal direction is
arbitrary; :func:`orient` and :func:`peak_positive` fix it in two ways.
"""

from __future__ import annotations

import torch
from torch import Tensor


def centred_rows(features: Tensor) -> Tensor:
    """``(B, C, *spatial)`` to ``(B, N, C)`` in float64, each channel centred over positions
    (NaN set to 0, as pytorch-grad-cam does before its SVD)."""
    flat = torch.nan_to_num(features.flatten(2).transpose(1, 2).double(), nan=0.0)
    return flat - flat.mean(dim=1, keepdim=True)


def principal_projection(features: Tensor) -> Tensor:
    """``X v_1`` ``(B, N)`` in float64: the centred rows projected on the first right singular
    vector of ``X`` (the first principal direction), sign as the SVD returns it."""
    centred = centred_rows(features)
    _, _, vh = torch.linalg.svd(centred, full_matrices=False)
    return (centred @ vh[:, 0, :, None])[..., 0]


def orient(projection: Tensor, features: Tensor) -> Tensor:
    """``projection`` ``(B, N)`` with the sign that makes it correlate positively with the
    channel sum ``sum_k F^k`` of ``features`` (the salient region, or the plain map when the
    features are a CAM's per-channel terms, comes out positive); where that correlation is 0,
    the sign that makes its largest-magnitude entry positive."""
    energy = features.flatten(2).double().sum(dim=1)
    agreement = (projection * (energy - energy.mean(dim=1, keepdim=True))).sum(dim=1)
    peak = projection.gather(1, projection.abs().argmax(dim=1, keepdim=True))[:, 0]
    sign = torch.where(agreement != 0, agreement.sign(), peak.sign())
    return projection * torch.where(sign == 0, 1.0, sign)[:, None]


def peak_positive(projection: Tensor) -> Tensor:
    """``projection`` ``(B, N)`` negated where ``|min| > |max|`` (Seg-Eigen-CAM's Eq. 13: the
    extreme value is made positive)."""
    flip = projection.amin(dim=1).abs() > projection.amax(dim=1).abs()
    return torch.where(flip[:, None], -projection, projection)


def as_grid(projection: Tensor, features: Tensor) -> Tensor:
    """``(B, N)`` back to ``(B, *spatial)`` of ``features``, in their dtype."""
    return projection.to(features.dtype).reshape(features.shape[0], *features.shape[2:])


def first_principal_component(features: Tensor) -> Tensor:
    """Each position's channel vector projected on the first principal component, ``X v_1``
    reshaped to ``(B, *spatial)``; the sign fixed by :func:`orient` (the projection correlates
    positively with the channel sum ``sum_k A^k``)."""
    return as_grid(orient(principal_projection(features), features), features)
