"""Perturbation attributions: occlusion and RISE. The model is only evaluated, never
differentiated; perturbed inputs are built and evaluated chunk by chunk within the memory budget,
in inference mode."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from heatlens.engine.budget import channels_last, items_per_chunk, progress
from heatlens.engine.layers import LayerSpec
from heatlens.engine.targets import Target
from heatlens.methods.attribution import AttributionExplainer
from heatlens.methods.incremental import (
    CutPlan,
    clean_features,
    cropped_outputs,
    plan_cut,
)
from heatlens.methods.registry import register
from heatlens.methods.sampling import probability_or_score, seeded_generator


def _per_dim(value: int | tuple[int, ...], x: Tensor, what: str) -> tuple[int, ...]:
    """A window or stride over ``(C, *spatial)``: an int for every spatial dimension, a tuple over
    the spatial dimensions (all channels at once), or a tuple over channels and spatial ones."""
    dims = x.ndim - 1
    if isinstance(value, int):
        value = (value,) * (dims - 1)
    value = tuple(int(v) for v in value)
    if len(value) == dims - 1:
        value = (x.shape[1], *value)
    if len(value) != dims or min(value) < 1:
        raise ValueError(
            f"{what} must be positive sizes for the {dims - 1} spatial dimensions (or the "
            f"channel and spatial ones), got {value}"
        )
    return value


@register
class Occlusion(AttributionExplainer):
    """Occlusion (Zeiler & Fergus, ECCV 2014, Sec. 4.2): a window slides over the input with
    ``stride``, the covered part is set to ``baseline``, and each element gets the mean, over
    the windows that cover it, of the score drop ``y_c(x) - y_c(x with the window occluded)``.

    Windows start at multiples of the stride and the last one in each dimension is cut at the
    border, so every element is covered (Captum's placement). ``window`` and ``stride`` are
    over the spatial dimensions (all channels occluded together) or over channels and spatial
    dimensions. The windows of a chunk are evaluated as one batch, in channels-last memory.

    With ``incremental=True`` (the default) the layers before a cut early in a CNN run only on
    a crop around each window (:mod:`heatlens.methods.incremental`); the result is the same up
    to float rounding, checked on three windows before use, and ``details["incremental_cut"]``
    names the cut (``None``: full passes).
    """

    name = "occlusion"
    aliases = ("occlusion_sensitivity",)

    def __init__(self, model: nn.Module, layer: LayerSpec = "auto", *,
                 window: int | tuple[int, ...] = 16, stride: int | tuple[int, ...] = 8,
                 baseline: float = 0.0, incremental: bool = True, **options: Any) -> None:
        super().__init__(model, layer, **options)
        self.window, self.stride, self.baseline = window, stride, baseline
        self.incremental = incremental

    def windows(self, x: Tensor) -> list[Tensor]:
        """For each dimension of ``(C, *spatial)``, a ``(positions, size)`` bool matrix: row ``p``
        marks the elements that window position ``p`` covers."""
        window, stride = _per_dim(self.window, x, "window"), _per_dim(self.stride, x, "stride")
        rows = []
        for size, w, s in zip(x.shape[1:], window, stride, strict=True):
            if w > size:
                raise ValueError(f"window {window} is larger than the input {tuple(x.shape[1:])}")
            if s > w and w < size:
                raise ValueError(f"stride {stride} is larger than the window {window}: elements "
                                 "between windows would never be occluded")
            starts = torch.arange(math.ceil((size - w) / s) + 1, device=x.device) * s
            index = torch.arange(size, device=x.device)
            rows.append((index >= starts[:, None]) & (index < starts[:, None] + w))
        return rows

    def attribute(self, x: Tensor, target: Target, classes: Tensor) -> tuple[Tensor, dict]:
        rows = self.windows(x)
        counts = [r.shape[0] for r in rows]
        total = math.prod(counts)
        batch = x.shape[0]
        step = max(1, items_per_chunk(self.model, x[:1], self.memory_budget,
                                      extra_per_item=x[0].numel() * 2) // batch)
        plan = plan_cut(self.model, x, rows) if self.incremental else None
        attribution = torch.zeros_like(x)
        covered = torch.zeros(x.shape[1:], device=x.device, dtype=x.dtype)
        with torch.inference_mode(), progress(
                total * batch, self.name, show=self.show_progress) as bar:
            if plan is None:
                clean = target.score(self.model(x), classes).float()
            else:
                output, features = clean_features(self.model, x, plan)
                clean = target.score(output, classes).float()
                plan = plan if self._crops_agree(x, target, classes, clean, plan, features,
                                                 rows, counts) else None

            def scores_of(positions: Tensor, masks: Tensor) -> Tensor:
                """``(B, n)`` scores with the windows at ``positions`` occluded."""
                labels = classes.repeat_interleave(positions.numel())
                if plan is None:
                    occluded = x[:, None] * (1 - masks) + self.baseline * masks  # (B,n,C,*S)
                    output = self.model(channels_last(occluded.flatten(0, 1)))
                else:
                    output = cropped_outputs(self.model, x, plan, features, rows, positions,
                                             self.baseline)
                return target.score(output, labels).float().reshape(batch, -1)

            for start in range(0, total, step):
                positions = torch.arange(start, min(start + step, total), device=x.device)
                masks = self._masks(rows, counts, positions, x.dtype)
                drop = (clean[:, None] - scores_of(positions, masks)).to(x.dtype)
                attribution += torch.einsum("bn,n...->b...", drop, masks)
                covered += masks.sum(dim=0)
                bar.update(positions.numel() * batch)
        details = {"incremental_cut": plan.name if plan is not None else None}
        return attribution / covered, details

    def _crops_agree(self, x: Tensor, target: Target, classes: Tensor, clean: Tensor,
                     plan: CutPlan, features: Tensor, rows: list[Tensor], counts: list[int]
                     ) -> bool:
        """Whether crops reproduce full passes for the first, middle and last window, to a
        thousandth of the score drop those windows cause (and float rounding of the score)."""
        total = math.prod(counts)
        positions = torch.tensor(sorted({0, total // 2, total - 1}), device=x.device)
        labels = classes.repeat_interleave(positions.numel())
        masks = self._masks(rows, counts, positions, x.dtype)
        occluded = (x[:, None] * (1 - masks) + self.baseline * masks).flatten(0, 1)
        full = target.score(self.model(occluded), labels).float()
        try:
            cropped = target.score(cropped_outputs(self.model, x, plan, features, rows,
                                                   positions, self.baseline), labels).float()
        except (RuntimeError, ValueError, IndexError):
            return False
        # exact up to float rounding: far below the score drops the windows cause
        drops = full - clean.repeat_interleave(positions.numel())
        allowed = 1e-3 * float(drops.abs().max()) + 1e-5 * float(full.abs().max())
        return float((cropped - full).abs().max()) <= allowed + 1e-6

    @staticmethod
    def _masks(rows: list[Tensor], counts: list[int], positions: Tensor,
               dtype: torch.dtype) -> Tensor:
        """Masks of the flat window ``positions`` (row-major over the dimensions)."""
        flat = positions
        mask = None
        for dim in reversed(range(len(rows))):
            index = flat % counts[dim]
            flat = flat // counts[dim]
            part = rows[dim][index].reshape(-1, *[1] * dim, rows[dim].shape[1],
                                            *[1] * (len(rows) - dim - 1))
            mask = part if mask is None else mask & part
        return mask.to(dtype)


@register
class RISE(AttributionExplainer):
    """RISE (Petsiuk et al., BMVC 2018, Eq. 6): ``S_c = 1/(N p) sum_i s_c(x * M_i) M_i`` over
    ``N = masks`` random masks. Each mask is a ``cells x cells`` grid of ones with probability
    ``p``, upsampled bilinearly to ``(cells + 1)`` cell sizes and cropped at a random shift of
    less than one cell; ``s_c`` is the class's softmax probability (the score, for targets that
    are not classes). Mask ``i`` is drawn from ``seed`` and ``i`` alone, the same for every
    image. The attribution is the same for every channel of an image.
    """

    name = "rise"

    def __init__(self, model: nn.Module, layer: LayerSpec = "auto", *, masks: int = 2000,
                 cells: int = 7, p: float = 0.5, seed: int = 0, **options: Any) -> None:
        super().__init__(model, layer, **options)
        if masks < 1 or cells < 1 or not 0 < p <= 1:
            raise ValueError(f"need masks >= 1, cells >= 1 and 0 < p <= 1; got {masks}, "
                             f"{cells}, {p}")
        self.masks, self.cells, self.p, self.seed = masks, cells, p, seed

    def random_masks(self, first: int, count: int, size: tuple[int, ...],
                     device: torch.device) -> Tensor:
        """Masks ``first ... first + count - 1``, ``(count, *size)`` in [0, 1]."""
        spatial = len(size)
        cell = [math.ceil(s / self.cells) for s in size]
        up = [(self.cells + 1) * c for c in cell]
        masks = []
        for i in range(first, first + count):
            generator = seeded_generator(self.seed, i, device)
            grid = (torch.rand((self.cells,) * spatial, generator=generator, device=device)
                    < self.p).float()
            shift = [int(torch.randint(0, c, (1,), generator=generator, device=device))
                     for c in cell]
            big = F.interpolate(grid[None, None], size=up, align_corners=False,
                                mode=("linear", "bilinear", "trilinear")[spatial - 1])[0, 0]
            masks.append(big[tuple(slice(s, s + n) for s, n in zip(shift, size, strict=True))])
        return torch.stack(masks)

    def attribute(self, x: Tensor, target: Target, classes: Tensor) -> tuple[Tensor, dict]:
        size = tuple(x.shape[2:])
        batch = x.shape[0]
        step = max(1, items_per_chunk(self.model, x[:1], self.memory_budget,
                                      extra_per_item=x[0, 0].numel() * 4) // batch)
        saliency = torch.zeros(batch, *size, device=x.device)
        with torch.inference_mode(), progress(
                self.masks * batch, self.name, show=self.show_progress) as bar:
            for first in range(0, self.masks, step):
                masks = self.random_masks(first, min(step, self.masks - first), size, x.device)
                n = masks.shape[0]
                masked = (x[:, None] * masks[None, :, None]).flatten(0, 1)
                output = self.model(channels_last(masked))
                scores = probability_or_score(output, target, classes.repeat_interleave(n))
                saliency += torch.einsum("bn,n...->b...", scores.reshape(batch, n), masks)
                bar.update(n * batch)
        saliency /= self.masks * self.p
        return saliency[:, None].expand_as(x).to(x.dtype).clone(), {}
