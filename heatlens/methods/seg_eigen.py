"""Seg-Eigen-CAM: Eigen-CAM of the gradient-weighted activations, for segmentation models."""

from __future__ import annotations

from torch import Tensor

from heatlens.methods.base import CAMExplainer
from heatlens.methods.principal import as_grid, peak_positive, principal_projection
from heatlens.methods.registry import register


@register
class SegEigenCAM(CAMExplainer):
    """Seg-Eigen-CAM (Chung & Ying, Applied Sciences 15(13) 7562, 2025, Eq. 10-13): the first
    principal component of ``|G| * A`` (Eq. 10: the absolute gradient keeps both signs of
    evidence, element-wise, for the pixel-wise targets of segmentation), its sign chosen so that
    the value of largest magnitude is positive (Eq. 13: negated where ``|min| > |max|``).

    For a segmenter explain a region's score: ``target=heatlens.ClassRegion(...)`` or a callable
    such as ``lambda out: (out[:, c] * mask).sum((1, 2))`` (pytorch-grad-cam's
    ``SemanticSegmentationTarget``); on a classifier it takes the class logit like Grad-CAM.
    """

    name = "segeigencam"
    aliases = ("seg_eigen_cam",)

    def cam(self, activations: Tensor, gradients: Tensor | None, classes: Tensor) -> Tensor:
        assert gradients is not None
        features = gradients.abs() * activations
        return as_grid(peak_positive(principal_projection(features)), features)
