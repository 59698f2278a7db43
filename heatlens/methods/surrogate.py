"""Surrogate models over interpretable features: LIME and KernelSHAP.

An image is cut into ``F`` features (a grid of patches, superpixels, or the user's mask); a
sample ``z`` in ``{0, 1}^F`` keeps the features where ``z = 1`` and sets the others to the
baseline; the model scores each sample, and a weighted linear model of the scores on ``z`` is
fitted per image. Its coefficients are the attributions, painted back on the features.
Samples are evaluated chunk by chunk within the memory budget, in inference mode, with a
progress bar for long runs.
"""

from __future__ import annotations

import math
from abc import abstractmethod
from typing import Any

import torch
from torch import Generator, Tensor, nn

from heatlens.engine.budget import channels_last, items_per_chunk, progress
from heatlens.engine.layers import LayerSpec
from heatlens.engine.targets import Target
from heatlens.methods.attribution import AttributionExplainer, broadcast_reference
from heatlens.methods.features import feature_mask
from heatlens.methods.registry import register
from heatlens.methods.sampling import seeded_generator

DRAWS = ("heatlens", "captum")
SURROGATES = ("linear", "lasso")


def weighted_linear_fit(z: Tensor, y: Tensor, w: Tensor, alpha: float = 0.0,
                        iterations: int = 20_000, tol: float = 1e-12) -> tuple[Tensor, Tensor]:
    """Coefficients ``b`` and intercept ``c`` minimising
    ``1 / (2 sum w) sum_i w_i (y_i - c - z_i . b)^2 + alpha ||b||_1`` (scikit-learn's
    ``LinearRegression`` for ``alpha = 0``, its ``Lasso(alpha)`` otherwise, with
    ``sample_weight=w``), in float64: least squares in closed form; the lasso by accelerated
    proximal gradient (FISTA, Beck & Teboulle, 2009) run to convergence."""
    z, y, w = z.double(), y.double(), w.double()
    share = w / w.sum()
    z_mean, y_mean = share @ z, share @ y
    zc, yc = (z - z_mean) * share.sqrt()[:, None], (y - y_mean) * share.sqrt()
    if alpha == 0:
        coef = torch.linalg.lstsq(zc, yc[:, None], driver="gelsd").solution[:, 0]
    else:
        gram, corr = zc.T @ zc, zc.T @ yc
        step = 1 / float(torch.linalg.eigvalsh(gram).max().clamp_min(1e-30))
        coef = momentum = torch.zeros_like(corr)
        t = 1.0
        for _ in range(iterations):
            moved = momentum - step * (gram @ momentum - corr)
            new = moved.sign() * (moved.abs() - step * alpha).clamp_min(0)
            t_next = (1 + math.sqrt(1 + 4 * t * t)) / 2
            momentum = new + (t - 1) / t_next * (new - coef)
            done = float((new - coef).abs().max()) <= tol
            coef, t = new, t_next
            if done:
                break
    return coef, y_mean - z_mean @ coef


class SurrogateExplainer(AttributionExplainer):
    """Samples ``z`` over features, the model's scores of them, and a weighted linear fit.

    Subclasses define the draw of one sample (:meth:`draw`) and the weight of each
    (:meth:`weights`).

    Args:
        features: ``"grid"`` (square patches of ``patch`` pixels), ``"slic"`` or
            ``"felzenszwalb"`` superpixels (scikit-image, imported only then), or an integer
            tensor of feature ids broadcastable to the inputs ``(B, C, *spatial)`` (Captum's
            ``feature_mask``).
        samples: samples per image (Captum's ``n_samples``).
        baseline: what a removed feature becomes: a number, ``"blur"`` or a tensor.
        seed, draws: ``draws="heatlens"`` draws sample ``s`` from ``seed`` and ``s`` alone (the
            same for every image, independent of chunking); ``draws="captum"`` draws as Captum
            0.9 does after ``torch.manual_seed(seed)`` (image after image), from a private
            generator.
        surrogate: ``"linear"`` (weighted least squares) or ``"lasso"`` (L1 penalty ``alpha``).
        segment_options: keyword arguments of scikit-image's segmentation function.
    """

    default_surrogate = "linear"

    def __init__(self, model: nn.Module, layer: LayerSpec = "auto", *,
                 features: str | Tensor = "grid", patch: int = 16, segments: int = 50,
                 segment_options: dict[str, Any] | None = None, samples: int = 200,
                 baseline: float | str | Tensor = 0.0, seed: int = 0, draws: str = "heatlens",
                 surrogate: str | None = None, alpha: float = 0.01, **options: Any) -> None:
        super().__init__(model, layer, **options)
        if draws not in DRAWS:
            raise ValueError(f"draws must be one of {DRAWS}, not {draws!r}")
        surrogate = surrogate or self.default_surrogate
        if surrogate not in SURROGATES:
            raise ValueError(f"surrogate must be one of {SURROGATES}, not {surrogate!r}")
        if samples < 2 or patch < 1:
            raise ValueError(f"need samples >= 2 and patch >= 1, got {samples} and {patch}")
        self.features, self.patch, self.segments = features, patch, segments
        self.segment_options = segment_options or {}
        self.samples, self.baseline, self.seed, self.draws = samples, baseline, seed, draws
        self.surrogate, self.alpha = surrogate, alpha

    @abstractmethod
    def draw(self, generator: Generator, count: int, index: int) -> Tensor:
        """Sample number ``index`` of one image, ``(count,)`` bool over its features."""

    @abstractmethod
    def weights(self, z: Tensor, x: Tensor, perturbed: Tensor) -> Tensor:
        """``(n,)`` weights of the samples ``z`` ``(n, F)`` of image ``x`` ``(C, *S)``, whose
        perturbed inputs are ``perturbed`` ``(n, C, *S)``."""

    def _samples(self, batch: int, counts: list[int]) -> list[Tensor]:
        """Per image, the ``(samples, F_i)`` bool samples."""
        if self.draws == "captum":
            generator = torch.Generator().manual_seed(self.seed)
            drawn = []
            for f in counts:
                drawn.append(torch.stack([self.draw(generator, f, s)
                                          for s in range(self.samples)]))
                # Captum's fit of each image's surrogate takes from the global generator: its
                # DataLoader's iterator one int64, its nn.Linear(F, 1) init F + 1 uniforms
                torch.empty((), dtype=torch.int64).random_(generator=generator)
                torch.empty(1, f).uniform_(generator=generator)
                torch.empty(1).uniform_(generator=generator)
            return drawn
        per_sample = [seeded_generator(self.seed, s, torch.device("cpu"))
                      for s in range(self.samples)]
        shared = {f: torch.stack([self.draw(g, f, s) for s, g in enumerate(per_sample)])
                  for f in sorted(set(counts))}
        return [shared[f] for f in counts]

    def _reference(self, x: Tensor) -> Tensor:
        if isinstance(self.baseline, Tensor):
            return broadcast_reference(self.baseline, x)
        if self.baseline == "blur":
            from heatlens.engine.maps import gaussian_blur

            return gaussian_blur(x, 8.0)
        if isinstance(self.baseline, str):
            raise ValueError(f"baseline must be a number, 'blur' or a tensor, not "
                             f"{self.baseline!r}")
        return torch.full_like(x, float(self.baseline))

    def attribute(self, x: Tensor, target: Target, classes: Tensor) -> tuple[Tensor, dict]:
        mask = feature_mask(x, self.features, self.patch, self.segments,
                            self.segment_options)  # (B, C, *S) long
        counts = [int(m.max()) + 1 for m in mask]
        if min(counts) < 2:
            given = self.features if isinstance(self.features, str) else "a mask"
            raise ValueError(
                f"{self.name} needs at least 2 features per image; image "
                f"{counts.index(min(counts))} has {min(counts)} (features={given!r}, patch="
                f"{self.patch}, input {tuple(x.shape[2:])}): use a smaller patch or more segments")
        drawn = self._samples(x.shape[0], counts)
        reference = self._reference(x)
        step = items_per_chunk(self.model, x[:1], self.memory_budget,
                               extra_per_item=x[0].numel() * 4)
        attributions = torch.zeros_like(x)
        coefficients = []
        with torch.inference_mode(), progress(x.shape[0] * self.samples, self.name,
                                              show=self.show_progress) as bar:
            for i, z in enumerate(drawn):
                kept = [part[:, mask[i]] for part in z.split(step)]  # (n, C, *S) per chunk
                perturbed = [torch.where(k, x[i], reference[i]) for k in kept]
                scores = []
                for part in perturbed:
                    output = self.model(channels_last(part))
                    scores.append(target.score(output, classes[i].expand(part.shape[0])).float())
                    bar.update(part.shape[0])
                weights = self.weights(z, x[i], torch.cat(perturbed))
                coef, _ = weighted_linear_fit(z.float(), torch.cat(scores), weights,
                                              self.alpha if self.surrogate == "lasso" else 0.0)
                coefficients.append(coef.to(x.dtype))
                attributions[i] = coefficients[-1][mask[i]]
        return attributions, {"feature_mask": mask, "coefficients": coefficients}


@register
class KernelShap(SurrogateExplainer):
    """Kernel SHAP (Lundberg & Lee, NeurIPS 2017, Theorem 2; Captum's ``KernelShap``): the
    weighted linear fit ``y(z) ~ phi_0 + sum_j phi_j z_j`` whose weights are the Shapley kernel
    ``pi(z) = (F - 1) / (C(F, |z|) |z| (F - |z|))``; its coefficients ``phi_j`` approximate
    the Shapley values of the ``F`` features (a grid of patches by default, or superpixels).

    The variant, Captum's: the kernel is sampled rather than weighted. The first two samples
    are all features kept and all removed (weight ``1e6``, standing for the infinite kernel
    weight that enforces ``phi_0 = y(0)`` and ``sum phi = y(x) - y(0)``); each other sample
    draws its size ``k`` with probability proportional to ``(F - 1) / (k (F - k))`` and then
    ``k`` features uniformly (weight 1), and the fit is ordinary weighted least squares.
    Efficiency: ``sum_j phi_j = y(x) - y(baseline)`` up to ``1e-6`` of the other samples' pull.
    """

    name = "kernel_shap"
    infinite_weight = 1e6

    def draw(self, generator: Generator, count: int, index: int) -> Tensor:
        if index < 2:
            return torch.full((count,), index == 0)
        sizes = torch.arange(count, dtype=torch.float)
        probs = torch.tensor(count - 1) / (sizes * (count - sizes))
        probs[0] = 0.0
        k = int(torch.multinomial((probs / probs.sum(-1, keepdim=True))[None], 1, True,
                                  generator=generator))
        values = torch.randn(1, count, generator=generator)
        return (values > torch.kthvalue(values, count - k).values.item())[0]

    def weights(self, z: Tensor, x: Tensor, perturbed: Tensor) -> Tensor:
        size = z.sum(dim=1)
        ends = (size == 0) | (size == z.shape[1])
        return torch.where(ends, self.infinite_weight, 1.0).double()


@register
class Lime(SurrogateExplainer):
    """LIME (Ribeiro, Singh & Guestrin, KDD 2016, Eq. 1-3; Captum's ``Lime``): a sparse linear
    model ``y(z) ~ c + sum_j b_j z_j`` fitted to samples ``z`` that keep each feature with
    probability 1/2, weighted by the proximity of the perturbed image ``x_z`` to ``x``,
    ``pi(z) = exp(-d(x, x_z)^2 / (2 w^2))`` with ``d`` the cosine distance of the flattened
    images (or the Euclidean one) and kernel width ``w = 1`` (Captum's defaults). The fit is
    the lasso with penalty ``alpha = 0.01`` (Captum's ``SkLearnLasso(alpha=0.01)``; the
    objective ``1 / (2 sum pi) sum pi (y - c - z . b)^2 + alpha ||b||_1``), solved to
    convergence (scikit-learn stops at a duality gap of ``1e-4``); ``surrogate="linear"``
    fits weighted least squares instead. The coefficients ``b_j`` are the attributions.
    """

    name = "lime"
    default_surrogate = "lasso"

    def __init__(self, model: nn.Module, layer: LayerSpec = "auto", *, kernel_width: float = 1.0,
                 distance: str = "cosine", **options: Any) -> None:
        super().__init__(model, layer, **options)
        if distance not in ("cosine", "euclidean"):
            raise ValueError(f"distance must be 'cosine' or 'euclidean', not {distance!r}")
        self.kernel_width, self.distance = kernel_width, distance

    def draw(self, generator: Generator, count: int, index: int) -> Tensor:
        return torch.bernoulli(torch.full((1, count), 0.5), generator=generator)[0].bool()

    def weights(self, z: Tensor, x: Tensor, perturbed: Tensor) -> Tensor:
        flat, others = x.flatten().double(), perturbed.flatten(1).double()
        if self.distance == "cosine":
            d = 1 - torch.nn.functional.cosine_similarity(others, flat[None], dim=1, eps=1e-8)
        else:
            d = (others - flat).norm(dim=1)
        return torch.exp(-(d**2) / (2 * self.kernel_width**2))
