"""KPCA-CAM: Eigen-CAM with the principal component taken in a kernel's feature space."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from heatlens.engine.layers import LayerSpec
from heatlens.methods.base import CAMExplainer
from heatlens.methods.principal import as_grid, centred_rows, orient
from heatlens.methods.registry import register

KERNELS = ("sigmoid", "rbf", "poly", "linear", "cosine")


def kernel_matrix(rows: Tensor, kernel: str, gamma: float, degree: int, coef0: float) -> Tensor:
    """``K`` ``(B, N, N)`` of the rows ``(B, N, C)``, as scikit-learn's ``pairwise_kernels``:
    ``tanh(g x.y + c0)``, ``exp(-g |x - y|^2)``, ``(g x.y + c0)^d``, ``x.y`` or
    ``x.y / (|x| |y|)``."""
    dots = rows @ rows.transpose(1, 2)
    if kernel == "sigmoid":
        return torch.tanh(gamma * dots + coef0)
    if kernel == "poly":
        return (gamma * dots + coef0) ** degree
    if kernel == "linear":
        return dots
    if kernel == "rbf":
        norms = rows.pow(2).sum(dim=2)
        return torch.exp(-gamma * (norms[:, :, None] + norms[:, None, :] - 2 * dots).clamp_min(0))
    norms = rows.norm(dim=2).where(rows.norm(dim=2) > 0, 1.0)
    return dots / (norms[:, :, None] * norms[:, None, :])


def kernel_principal_projection(rows: Tensor, kernel: str, gamma: float, degree: int,
                                coef0: float) -> Tensor:
    """``(B, N)``: each row's coordinate on the first kernel principal component,
    ``sqrt(lambda_1) u_1`` with ``(lambda_1, u_1)`` the leading eigenpair of the centred kernel
    ``K_c = (I - 1/N) K (I - 1/N)`` (Schoelkopf et al., 1998); ``lambda_1 < 0`` counts as 0."""
    matrix = kernel_matrix(rows, kernel, gamma, degree, coef0)
    matrix = matrix - matrix.mean(dim=1, keepdim=True)
    matrix = matrix - matrix.mean(dim=2, keepdim=True)
    values, vectors = torch.linalg.eigh(matrix)
    return vectors[:, :, -1] * values[:, -1:].clamp_min(0).sqrt()


@register
class KPCACAM(CAMExplainer):
    """KPCA-CAM (Karmani et al., "KPCA-CAM: Visual Explainability of Deep Computer Vision
    Models using Kernel PCA", arXiv 2410.00267, 2024): Eigen-CAM with kernel PCA. The
    positions' channel vectors ``x_ij`` (centred over positions) are compared by a kernel
    ``k(x, y)``; the map is each position's coordinate on the first principal component of the
    centred kernel matrix, ``sqrt(lambda_1) u_1`` (see :func:`kernel_principal_projection`).

    ``kernel`` is ``"sigmoid"`` (the default, ``tanh(gamma x.y + coef0)``), ``"rbf"``,
    ``"poly"``, ``"linear"`` (Eigen-CAM itself) or ``"cosine"``; ``gamma=None`` is
    ``1 / channels``, as scikit-learn's. Needs no gradient and no target. The sign is fixed as
    in Eigen-CAM (:func:`~heatlens.methods.principal.orient`: positive correlation with the
    channel sum); pytorch-grad-cam keeps scikit-learn's (the largest entry of ``u_1`` positive).
    """

    name = "kpcacam"
    aliases = ("kpca_cam",)
    needs_gradients = False
    needs_target = False

    def __init__(self, model: nn.Module, layer: LayerSpec = "auto", *, kernel: str = "sigmoid",
                 gamma: float | None = None, degree: int = 3, coef0: float = 1.0,
                 **options: Any) -> None:
        super().__init__(model, layer, **options)
        if kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {KERNELS}, not {kernel!r}")
        self.kernel, self.gamma, self.degree, self.coef0 = kernel, gamma, degree, coef0

    def cam(self, activations: Tensor, gradients: Tensor | None, classes: Tensor) -> Tensor:
        rows = centred_rows(activations)
        gamma = self.gamma if self.gamma is not None else 1.0 / rows.shape[2]
        projection = kernel_principal_projection(rows, self.kernel, gamma, self.degree,
                                                 self.coef0)
        return as_grid(orient(projection, activations), activations)
