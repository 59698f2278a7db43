"""GradientSHAP: expected gradients over random references and random points on the path."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from heatlens.engine.budget import progress, recorded_bytes
from heatlens.engine.layers import LayerSpec
from heatlens.engine.targets import Target
from heatlens.methods.attribution import (
    OnePassAttribution,
    PassResult,
    classes_and_scores,
    input_gradients,
    reference_distribution,
)
from heatlens.methods.registry import register
from heatlens.methods.sampling import seeded_generator

DRAWS = ("heatlens", "captum")


class Draws:
    """The random draws of ``samples`` samples for each of ``batch`` inputs, rows ``i * samples +
    s`` (input ``i``, sample ``s``): a reference index into ``count`` references, a point
    ``alpha`` in [0, 1), and Gaussian noise of standard deviation ``stdev`` on the input."""

    def __init__(self, kind: str, seed: int, samples: int, batch: int, count: int,
                 stdev: float, x: Tensor) -> None:
        self.kind, self.seed, self.samples, self.stdev, self.x = kind, seed, samples, stdev, x
        rows = batch * samples
        if kind == "captum":  # Captum 0.9's order, after np.random.seed(s); torch.manual_seed(s)
            state = np.random.RandomState(seed)
            self.index = torch.as_tensor(state.choice(count, rows), device=x.device)
            generator = torch.Generator().manual_seed(seed)
            spread = torch.tensor(stdev).repeat(rows, *x.shape[1:])
            self.noise = torch.normal(0, spread, generator=generator).to(x.device)
            self.alpha = torch.as_tensor(state.uniform(0.0, 1.0, rows)).to(x)
            return
        per_sample = [seeded_generator(seed, s, torch.device("cpu")) for s in range(samples)]
        index = torch.stack([torch.randint(count, (), generator=g) for g in per_sample])
        alpha = torch.stack([torch.rand((), generator=g, dtype=torch.float64)
                             for g in per_sample])
        self.index, self.alpha = index.repeat(batch).to(x.device), alpha.repeat(batch).to(x)
        self.noise = None

    def noise_of(self, rows: Tensor) -> Tensor | float:
        """The input noise of ``rows``: sample ``s``'s noise is drawn from ``seed`` and ``s``
        alone (the same for every image) unless the draws are Captum's."""
        if self.stdev == 0:
            return 0.0
        if self.noise is not None:
            return self.noise[rows]
        return torch.stack([
            torch.randn(self.x.shape[1:], dtype=self.x.dtype, device=self.x.device,
                        generator=seeded_generator(self.seed, 1_000_000 + int(s),
                                                   self.x.device))
            for s in rows % self.samples]) * self.stdev


@register
class GradientShap(OnePassAttribution):
    """GradientSHAP (Lundberg & Lee, NeurIPS 2017; expected gradients, Erion et al., 2021):
    ``A = E[(x + e - x') * d y_c / d x (x' + a (x + e - x'))]`` over a reference ``x'`` drawn
    uniformly from ``baseline`` (a distribution ``(K, C, *spatial)``), ``a ~ U[0, 1)`` and
    ``e ~ N(0, stdev^2)``, estimated from ``samples`` draws per input (Captum's
    ``GradientShap``: ``n_samples`` is ``samples``, ``stdevs`` is ``stdev``, in input units).

    Its expectation is the integrated gradients of each reference, averaged over the references
    (SHAP values of the linearised model); ``details["convergence_delta"]`` is
    ``sum A - (y_c(x) - mean_k y_c(x'_k))`` per image, which shrinks as samples grow. It costs a
    forward pass over the ``K`` references (in the pass over the inputs that finds the classes
    and scores); ``delta=False`` skips it, and the delta (as Captum by default): worth it when
    ``K`` is large, as a background set of a hundred images is.

    ``draws="heatlens"``: sample ``s`` (its reference, point and noise) comes from ``seed`` and
    ``s`` alone, so it is the same for every image and independent of chunking.
    ``draws="captum"`` draws exactly as Captum 0.9 does after ``np.random.seed(seed);
    torch.manual_seed(seed)`` (from private generators seeded so, the global state untouched),
    to reproduce a Captum result. The ``B * samples`` gradients run in passes of equal size
    within the memory budget.
    """

    name = "gradient_shap"
    aliases = ("gradshap", "expected_gradients")

    def __init__(self, model: nn.Module, layer: LayerSpec = "auto", *,
                 baseline: str | Tensor = "zeros", samples: int = 5, stdev: float = 0.0,
                 seed: int = 0, draws: str = "heatlens", delta: bool = True,
                 **options: Any) -> None:
        super().__init__(model, layer, **options)
        if isinstance(baseline, str) and baseline != "zeros":
            raise ValueError(f"baseline must be 'zeros' or a tensor (K, C, *spatial) of "
                             f"references, not {baseline!r}")
        if draws not in DRAWS:
            raise ValueError(f"draws must be one of {DRAWS}, not {draws!r}")
        if not isinstance(delta, bool):
            raise TypeError(f"delta must be True or False, not {delta!r}")
        if samples < 1 or stdev < 0:
            raise ValueError(f"need samples >= 1 and stdev >= 0, got {samples} and {stdev}")
        self.baseline, self.samples, self.stdev = baseline, samples, stdev
        self.seed, self.draws, self.delta = seed, draws, delta

    def fits_one_pass(self, x: Tensor) -> bool:
        return True  # the first pass is one forward pass over the inputs and references

    def attribute_pass(self, x: Tensor, target: Target, classes: Tensor | None) -> PassResult:
        references = (torch.zeros_like(x[:1]) if isinstance(self.baseline, str)
                      else reference_distribution(self.baseline, x))
        batch, count = x.shape[0], references.shape[0]
        with torch.no_grad():
            if self.delta:
                both = self.model(torch.cat([x, references]))
                output = both[:batch] if isinstance(both, Tensor) else self.model(x)
            else:
                output = self.model(x)
            classes, scores = classes_and_scores(output, target, classes, batch)
        draws = Draws(self.draws, self.seed, self.samples, batch, count, self.stdev, x)

        def points(chunk: Tensor) -> tuple[Tensor, Tensor]:
            noisy = x[chunk // self.samples] + draws.noise_of(chunk)
            begin = references[draws.index[chunk]]
            a = draws.alpha[chunk].reshape(-1, *[1] * (x.ndim - 1))
            return a * noisy + (1 - a) * begin, noisy - begin

        sums, rows = torch.zeros_like(x), torch.arange(batch * self.samples, device=x.device)
        with progress(rows.numel(), self.name, show=self.show_progress) as bar:
            for chunk in rows.tensor_split(-(-rows.numel() // self._rows_per_chunk(x))):
                inputs, spans = points(chunk)
                grads, _ = input_gradients(self.model, inputs, target,
                                           classes[chunk // self.samples])
                sums.index_add_(0, chunk // self.samples, spans * grads)
                bar.update(chunk.numel())
        attributions = sums / self.samples
        details: dict[str, Tensor] = {"baseline": references}
        if self.delta:
            with torch.no_grad():
                start = torch.stack([target.score(both, c.expand(batch + count))[batch:].mean()
                                     for c in classes])
            details["convergence_delta"] = attributions.flatten(1).sum(1) - (scores - start)
        return PassResult(attributions, output, classes, scores, details)

    def _rows_per_chunk(self, x: Tensor) -> int:
        """How many drawn inputs one gradient pass holds within the memory budget: what its
        graph keeps, measured (:func:`~heatlens.engine.budget.recorded_bytes`), and four more
        inputs' worth each (the point, its span ``x + e - x'``, the gradient and their
        product). The rows are split into passes of equal size (at most this many)."""
        per_row = recorded_bytes(self.model, x[:1]) + 4 * x[0].numel() * x.element_size()
        return max(1, self.memory_budget // per_row)
