"""Score-CAM and its smoothed and integrated variants: channel weights from the model's score on
the input masked by each channel's upsampled activation. No gradient is used.

For channel ``k`` of the layer's activations ``A`` (one image ``X``), the mask is
``H^k = minmax(U(A^k))`` (``U`` upsampling to the input size; a constant channel gives ``H^k = 0``)
and the map is ``M = sum_k w_k A^k``. The methods differ in ``w_k``. Masked inputs are built chunk
by chunk within ``memory_budget`` bytes; every pass runs in inference mode. As weighted CAMs
(:class:`~heatlens.methods.base.WeightedCAM`) they take ``eigen_smooth`` (the first principal
component of the terms ``w_k A^k``) and ``aug_smooth`` (test-time augmentation), as
pytorch-grad-cam's ``ScoreCAM`` does.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn

from heatlens.engine.budget import (
    DEFAULT_BUDGET,
    budget_bytes,
    channels_last,
    items_per_chunk,
    progress,
)
from heatlens.engine.layers import LayerSpec
from heatlens.engine.maps import minmax, upsample
from heatlens.methods.base import LayerCall, WeightedCAM
from heatlens.methods.registry import register
from heatlens.methods.sampling import probability_or_score, seeded_generator

VARIANTS = ("probability", "softmax")


def unit_masks(activations: Tensor, size: tuple[int, ...], *, align_corners: bool = False
               ) -> Tensor:
    """``(B, n, *s)`` activations to ``(B, n, *size)`` masks: each channel upsampled to ``size``
    and min-max scaled to [0, 1]; a constant channel gives an all-zero mask."""
    batch, channels = activations.shape[:2]
    masks = minmax(upsample(activations.flatten(0, 1), size, align_corners=align_corners))
    return masks.reshape(batch, channels, *size)


class ScoreFamily(WeightedCAM):
    """Shared engine of Score-CAM, SS-CAM and IS-CAM.

    Args:
        variant: ``"probability"``: ``w_k`` is the mean over samples of the target class's
            softmax probability on the masked input (the Score-CAM authors' weighting; for a
            target that is not a class, the target score). ``"softmax"``: ``w_k`` is the
            softmax over channels of the mean target score, with masks upsampled with
            ``align_corners=True`` (pytorch-grad-cam's choices, reproduced exactly).
        memory_budget: bytes that one chunk of masked inputs may use.
        seed: seeds the noise of noisy variants (reproducible; the same noise for every image,
            so an image's map does not depend on the rest of the batch).
        show_progress: ``None`` shows a bar for long runs in a terminal.
        eigen_smooth, aug_smooth: as for every CAM
            (:class:`~heatlens.methods.base.CAMExplainer`); with ``aug_smooth`` the masked
            passes run for each of the six augmented copies.
    """

    family = "perturbation CAMs"
    needs_gradients = False
    samples: int = 1
    zero_mask_stays_zero: ClassVar[bool] = True

    def __init__(self, model: nn.Module, layer: LayerSpec = "auto", *,
                 variant: str = "probability", memory_budget: int = DEFAULT_BUDGET,
                 seed: int = 0, show_progress: bool | None = None, relu: bool = True,
                 fusion: str | None = None, eigen_smooth: bool = False,
                 aug_smooth: bool = False) -> None:
        super().__init__(model, layer, relu=relu, fusion=fusion, eigen_smooth=eigen_smooth,
                         aug_smooth=aug_smooth)
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, not {variant!r}")
        self.variant = variant
        self.memory_budget = budget_bytes(memory_budget)
        self.seed = seed
        self.show_progress = show_progress

    def perturb(self, masks: Tensor, first_channel: int) -> Tensor:
        """``(B, n, *S)`` masks of channels ``first_channel ...`` to ``(B, n, samples, *S)``."""
        return masks[:, :, None]

    def masked_scores(self, call: LayerCall, output: object, classes: Tensor) -> Tensor:
        """Per masked input: the target's probability (``"probability"``) or its score."""
        if self.variant == "probability":
            return probability_or_score(output, call.target, classes)
        return call.target.score(output, classes).float()

    def layer_weights(self, call: LayerCall) -> Tensor:
        """``w`` ``(B, C)``: the mean over samples of the masked inputs' scores (their softmax
        over channels for ``variant="softmax"``)."""
        acts, x = call.activations, call.inputs
        batch, channels = acts.shape[:2]
        size = tuple(x.shape[2:])
        spatial = tuple(range(2, acts.ndim))
        varies = acts.amax(dim=spatial) > acts.amin(dim=spatial)  # (B, C): mask not all zero
        mask_bytes = x[0, 0].numel() * 4 * self.samples
        per_chunk = items_per_chunk(self.model, x[:1], self.memory_budget,
                                    extra_per_item=mask_bytes)
        step = max(1, per_chunk // (batch * self.samples))
        totals = torch.zeros(batch, channels, device=x.device)
        with torch.inference_mode():
            if self.zero_mask_stays_zero and not bool(varies.all()):
                zero_score = self.masked_scores(call, self.model(torch.zeros_like(x)), call.classes)
                totals += (~varies) * zero_score[:, None] * self.samples
            bar = progress(int(varies.sum()) * self.samples if self.zero_mask_stays_zero
                           else batch * channels * self.samples, self.name, show=self.show_progress)
            with bar:
                for start in range(0, channels, step):
                    stop = min(start + step, channels)
                    masks = self.perturb(unit_masks(acts[:, start:stop], size,
                                                    align_corners=self.variant == "softmax"),
                                         start)
                    keep = (varies[:, start:stop] if self.zero_mask_stays_zero
                            else torch.ones_like(varies[:, start:stop]))
                    rows = keep[:, :, None].expand(-1, -1, self.samples).reshape(-1)
                    if not bool(rows.any()):
                        continue
                    masked = x[:, None, None] * masks[:, :, :, None]  # (B, n, S, C_in, *size)
                    masked = masked.flatten(0, 2)[rows]
                    classes = call.classes.repeat_interleave(rows.numel() // batch)[rows]
                    scores = self.masked_scores(call, self.model(channels_last(masked)), classes)
                    chunk = torch.zeros(rows.numel(), device=x.device)
                    chunk[rows] = scores
                    totals[:, start:stop] += chunk.reshape(batch, -1, self.samples).sum(dim=2)
                    bar.update(int(rows.sum()))
        weights = totals / self.samples
        return weights.softmax(dim=1) if self.variant == "softmax" else weights


@register
class ScoreCAM(ScoreFamily):
    """Score-CAM (Wang et al., CVPRW 2020, Eq. 6-8): ``w_k = s_c(X * H^k)``, the target's score
    on the input masked by channel ``k``, ``M = relu(sum_k w_k A^k)``.

    The default ``variant="probability"`` is the authors' weighting: ``s_c`` is the softmax
    probability of class ``c`` (their code uses no baseline term). ``variant="softmax"`` is the
    channel softmax of the logits that pytorch-grad-cam uses, ``w = softmax_k(y_c(X * H^k))``:
    it makes weights sum to 1 but lets a few channels dominate. Channels whose activation is
    constant have an all-zero mask; their shared score is computed once.
    """

    name = "scorecam"


@register
class SSCAM(ScoreFamily):
    """SS-CAM (Wang, Naidu et al., 2020, "Smoothed Score-CAM", Eq. 5-7): Score-CAM with each mask
    smoothed by Gaussian noise, ``w_k = (1/N) sum_i s_c(X * (H^k + e_i))``, ``e_i ~ N(0, sigma^2)``
    per pixel. The paper adds noise either to the mask or to the input; this is the mask
    version, with ``N = samples`` (default 10) and ``sigma = noise`` (default 0.2, on masks that
    span [0, 1]). The noise for channel ``k`` is drawn from ``seed`` and ``k`` alone.
    """

    name = "sscam"
    aliases = ("smooth_scorecam",)
    zero_mask_stays_zero = False

    def __init__(self, model: nn.Module, layer: LayerSpec = "auto", *, samples: int = 10,
                 noise: float = 0.2, **options: object) -> None:
        super().__init__(model, layer, **options)  # type: ignore[arg-type]
        if samples < 1 or noise < 0:
            raise ValueError(f"samples must be >= 1 and noise >= 0, got {samples} and {noise}")
        self.samples, self.noise = samples, noise

    def perturb(self, masks: Tensor, first_channel: int) -> Tensor:
        noise = torch.stack([
            torch.randn((self.samples, *masks.shape[2:]), device=masks.device,
                        generator=seeded_generator(self.seed, first_channel + k, masks.device))
            for k in range(masks.shape[1])
        ])  # (n, N, *S), the same for every image
        return masks[:, :, None] + self.noise * noise[None]


@register
class ISCAM(ScoreFamily):
    """IS-CAM (Naidu et al., 2020, "Integrated Score-CAM", Eq. 4-5): the score integrated along
    the path from an empty mask to the full mask, as integrated gradients does for the input:
    ``w_k = (1/N) sum_{i=1..N} s_c(X * (i/N) H^k)`` with ``N = samples`` (default 10).

    The paper writes the path as a sum of scaled masks and can be read two ways; this is the
    Riemann sum of the path integral above, whose masks stay in [0, 1]. torch-cam instead scales
    the mask by the running sum ``sum_{j<=i} j/N``, which leaves [0, 1]; that is not followed.
    """

    name = "iscam"
    aliases = ("integrated_scorecam",)

    def __init__(self, model: nn.Module, layer: LayerSpec = "auto", *, samples: int = 10,
                 **options: object) -> None:
        super().__init__(model, layer, **options)  # type: ignore[arg-type]
        if samples < 1:
            raise ValueError(f"samples must be >= 1, got {samples}")
        self.samples = samples

    def perturb(self, masks: Tensor, first_channel: int) -> Tensor:
        steps = torch.arange(1, self.samples + 1, device=masks.device) / self.samples
        return masks[:, :, None] * steps.reshape(1, 1, -1, *[1] * (masks.ndim - 2))
