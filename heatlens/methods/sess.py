"""SESS: a CAM method run on patches of the image at several scales, the patch maps fused."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.transforms.functional import resize

from heatlens.engine.budget import DEFAULT_BUDGET, budget_bytes, items_per_chunk
from heatlens.engine.layers import LayerSpec
from heatlens.engine.maps import minmax
from heatlens.engine.targets import NO_CLASS, ClassLogit, Target
from heatlens.explanation import Explanation
from heatlens.methods.base import build_explanation
from heatlens.methods.registry import register
from heatlens.methods.sampling import probability_or_score
from heatlens.methods.wrapping import Wrapper


def window_starts(length: int, step: int, window: int) -> list[int]:
    """Where windows of ``window`` pixels start along ``length`` pixels, every ``step``; the last
    one is moved back so it ends at the border (all windows have the same size)."""
    starts = []
    for start in range(0, length, step):
        if start + window >= length:
            starts.append(max(length - window, 0))
            break
        starts.append(start)
    return starts


def gaussian_blur_reflect(maps: Tensor, size: int = 11, sigma: float = 5.0) -> Tensor:
    """``(B, H, W)`` maps blurred by a ``size`` x ``size`` Gaussian of ``sigma`` pixels, the
    border reflected without repeating the edge pixel (OpenCV's ``GaussianBlur`` default)."""
    offsets = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    kernel = torch.exp(-offsets**2 / (2 * sigma**2))
    kernel = (kernel / kernel.sum()).to(maps.dtype).to(maps.device)
    radius = size // 2
    out = F.pad(maps[:, None], (radius, radius, radius, radius), mode="reflect")
    out = F.conv2d(out, kernel.reshape(1, 1, 1, size))
    return F.conv2d(out, kernel.reshape(1, 1, size, 1))[:, 0]


@register
class SESS(Wrapper):
    """SESS, Saliency Enhancing with Scaling and Sliding (Tursun et al., ECCV 2022,
    arXiv 2207.01769): the maps ``M_P`` of a CAM method ``base`` (Grad-CAM by default) on square
    patches ``P`` of the image at several scales, weighted by the patch's score and fused:
    ``M = minmax(blur(mean_{P covering the pixel, R_P > theta} R_P))`` with
    ``R_P = resize(paste(s_P / max s * M_P))``.

    The image is resized so its shorter side is each of the ``scales`` (by default
    ``num_scales = 12`` sizes ``w, w + r w, w + 2 r w, ...`` with ``w`` the window, the shorter
    side of the input, and ``r = scale_step_ratio = 2/7``: 224, 288, ... for 224 pixels), and a
    square window of ``w`` pixels slides over each with stride ``step`` (``w`` by default). For
    each patch ``P``: its score ``s_P`` (the target's softmax probability, ``>= 0``); the patches
    below the ``pre_filter_ratio`` quantile of ``s`` are dropped; its map ``M_P`` by ``base``
    (in [0, 1]), weighted by ``s_P / max s``, pasted at its place in the scaled image (zeros
    elsewhere) and resized to the input: ``R_P``. Fusion (``pool="mean"``): each pixel is the
    mean of the ``R_P > theta`` that cover it; ``"max"``: their maximum. The fused map is
    blurred by an 11 x 11 Gaussian of sigma 5 (``smooth``) and min-max scaled.

    Follows pytorch-grad-cam 1.5.7's SESS step by step (its resizing: bilinear with
    antialiasing for the image, without for the pasted maps). The class of every patch is the
    one explained on the whole image (the arg-max of the whole image for ``target=None``).
    Patches run through ``base`` in chunks within ``memory_budget``.
    """

    name = "sess"

    def __init__(self, model: nn.Module, layer: LayerSpec = "auto", *, base: str | None = None,
                 scales: Sequence[int] | None = None, num_scales: int = 12,
                 scale_step_ratio: float = 2.0 / 7.0, window: int | None = None,
                 step: int | None = None, pre_filter_ratio: float = 0.0, theta: float = 0.0,
                 pool: str = "mean", smooth: bool = True, softmax_scores: bool = True,
                 memory_budget: int = DEFAULT_BUDGET, **options: Any) -> None:
        super().__init__(model, layer, base=base, **options)
        if pool not in ("mean", "max"):
            raise ValueError(f"pool must be 'mean' or 'max', not {pool!r}")
        if not 0.0 <= pre_filter_ratio < 1.0 or num_scales < 1:
            raise ValueError("pre_filter_ratio must be in [0, 1) and num_scales >= 1, got "
                             f"{pre_filter_ratio} and {num_scales}")
        self.scales, self.num_scales, self.scale_step_ratio = scales, num_scales, scale_step_ratio
        self.window, self.step, self.pre_filter_ratio = window, step, pre_filter_ratio
        self.theta, self.pool, self.smooth = theta, pool, smooth
        self.softmax_scores = softmax_scores
        self.memory_budget = budget_bytes(memory_budget)

    def scale_list(self, window: int) -> list[int]:
        """The shorter side of each scaled image."""
        if self.scales is not None:
            return [int(s) for s in self.scales]
        stride = round(window * self.scale_step_ratio)
        return [window + stride * i for i in range(self.num_scales)]

    def _explain(self, x: Tensor, target: Target) -> Explanation:
        if x.ndim != 4:
            raise ValueError(f"SESS slides windows over images (B, C, H, W), got {tuple(x.shape)}")
        with torch.no_grad():
            output = self.model(x)
        classes = target.classes(output, x.shape[0]).to(x.device)
        fused = torch.stack([self._one_image(x[i:i + 1], target, classes[i:i + 1])
                             for i in range(x.shape[0])])
        shown = gaussian_blur_reflect(fused) if self.smooth else fused
        with torch.no_grad():
            scores = target.score(output, classes)
        return build_explanation(self.name, minmax(shown), {"input": fused}, output, target,
                                 classes, scores, ("input",),
                                 f"SESS around {self.base.name}, patch maps fused at the input",
                                 {"base": self.base.name})

    def _patch_target(self, target: Target, cls: Tensor, count: int) -> Target:
        if isinstance(target, ClassLogit) and bool((cls != NO_CLASS).all()):
            return type(target)(cls.expand(count))
        return target

    def _one_image(self, image: Tensor, target: Target, cls: Tensor) -> Tensor:
        height, width = image.shape[2:]
        window = self.window or min(height, width)
        step = self.step or window
        patches, places = [], []
        for scale in self.scale_list(window):
            if scale < window:
                raise ValueError(f"every scale must be at least the window {window}, got {scale}")
            scaled = resize(image, [scale])
            for top in window_starts(scaled.shape[2], step, window):
                for left in window_starts(scaled.shape[3], step, window):
                    patches.append(scaled[0, :, top:top + window, left:left + window])
                    places.append((top, left, *scaled.shape[2:]))
        batch = torch.stack(patches)
        # the CAM engine records the graph from the explained layer on only, so a chunk is
        # sized as for inference
        chunk = items_per_chunk(self.model, batch[:1], self.memory_budget)
        scores = torch.cat([self._scores(batch[i:i + chunk], target, cls)
                            for i in range(0, len(batch), chunk)])
        order = scores.argsort()[int(len(scores) * self.pre_filter_ratio):]
        top = scores[order[-1]]
        weights = (scores[order] / top if top > 0 else torch.ones(len(order))).to(image.device)
        total = torch.zeros(height, width, device=image.device)
        counts = torch.zeros(height, width, device=image.device)
        for first in range(0, len(order), chunk):
            picked = order[first:first + chunk]
            maps = self.base(batch[picked], self._patch_target(target, cls, len(picked))).maps
            for patch_map, weight, index in zip(maps, weights[first:first + chunk], picked,
                                                strict=True):
                placed = self._pasted(patch_map * weight, places[int(index)], (height, width))
                if self.pool == "max":
                    total = torch.maximum(total, placed)
                else:
                    kept = placed > self.theta
                    total += placed * kept
                    counts += kept
        if self.pool == "max":
            return total
        return torch.where(counts > 0, total / counts.clamp_min(1), 0.0)

    def _scores(self, patches: Tensor, target: Target, cls: Tensor) -> Tensor:
        """Each patch's score: the target's softmax probability (or its score), at least 0."""
        goal = self._patch_target(target, cls, len(patches))
        with torch.no_grad():
            output = self.model(patches)
            classes = cls.expand(len(patches))
            if self.softmax_scores:
                scores = probability_or_score(output, goal, classes)
            else:
                scores = goal.score(output, classes).float()
        return scores.clamp_min(0).cpu()

    @staticmethod
    def _pasted(patch_map: Tensor, place: tuple[int, int, int, int],
                size: tuple[int, int]) -> Tensor:
        """``patch_map`` at its place in a zero map of the scaled image, resized to ``size``
        (bilinear, pixel centres aligned, no antialiasing)."""
        top, left, scaled_height, scaled_width = place
        full = patch_map.new_zeros(scaled_height, scaled_width)
        full[top:top + patch_map.shape[0], left:left + patch_map.shape[1]] = patch_map
        return F.interpolate(full[None, None], size=size, mode="bilinear",
                             align_corners=False)[0, 0]


