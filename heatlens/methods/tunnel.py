"""A noise tunnel around any method: SmoothGrad, SmoothGrad-squared and VarGrad; and SmoothGrad
itself, saliency in the tunnel, under the name users type."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from heatlens.engine.budget import DEFAULT_BUDGET, budget_bytes, items_per_chunk
from heatlens.engine.layers import LayerSpec
from heatlens.engine.targets import NO_CLASS, ClassLogit, Target
from heatlens.explanation import Explanation
from heatlens.methods.attribution import AttributionExplainer
from heatlens.methods.base import CAMExplainer, Explainer
from heatlens.methods.gradients import Saliency
from heatlens.methods.registry import register
from heatlens.methods.sampling import input_noise

KINDS = ("smoothgrad", "smoothgrad_sq", "vargrad")


class NoiseTunnel(Explainer):
    """Run ``explainer`` on ``samples`` noisy copies ``x + e_i`` of each input and combine the raw
    maps: ``"smoothgrad"`` their mean (Smilkov et al., 2017, Eq. 2), ``"smoothgrad_sq"`` the mean
    of their squares, ``"vargrad"`` their variance (Adebayo et al., 2018). The combined raw maps
    then go through the method's own post-processing.

    ``e_i ~ N(0, sigma^2)`` with ``sigma = noise * (max x - min x)`` per image (``noise`` is a
    fraction of the input's range; SmoothGrad suggests 0.1 to 0.2). Noise sample ``i`` comes from
    ``seed`` and ``i`` and is the same for every image. The class explained is the clean input's,
    for every noisy copy. Copies run in chunks within ``memory_budget``.
    """

    def __init__(self, explainer: Explainer, kind: str = "smoothgrad", *, samples: int = 10,
                 noise: float = 0.15, seed: int = 0,
                 memory_budget: int = DEFAULT_BUDGET) -> None:
        check_tunnelled(explainer)
        super().__init__(explainer.model)
        if kind not in KINDS:
            raise ValueError(f"noise tunnel kind must be one of {KINDS}, not {kind!r}")
        if samples < 1 or noise < 0:
            raise ValueError(f"samples must be >= 1 and noise >= 0, got {samples} and {noise}")
        self.explainer, self.kind = explainer, kind
        self.samples, self.noise, self.seed = samples, noise, seed
        self.memory_budget = budget_bytes(memory_budget)
        self.name = getattr(type(self), "name", None) or f"{explainer.name}+{kind}"

    def _explain(self, x: Tensor, target: Target) -> Explanation:
        clean = self.explainer(x, target)
        goal = target
        fixed = isinstance(goal, ClassLogit) and bool((clean.targets != NO_CLASS).all())
        batch = x.shape[0]
        step = max(1, items_per_chunk(self.model, x[:1], self.memory_budget,
                                      with_gradients=True) // batch)
        layers: dict[str, list[Tensor]] = {}
        for first in range(0, self.samples, step):
            count = min(step, self.samples - first)
            noisy = (x[None] + input_noise(x, self.noise, self.seed, first, count)).flatten(0, 1)
            # every copy explains the clean input's class
            copies_goal = type(goal)(clean.targets.repeat(count)) if fixed else goal
            part = self.explainer(noisy, copies_goal)
            for name, raw in part.raw_by_layer.items():
                layers.setdefault(name, []).append(raw.reshape(count, batch, *raw.shape[1:]))
        raw = {name: self._combine(torch.cat(parts)) for name, parts in layers.items()}
        with torch.no_grad():
            maps = self.explainer.postprocess(raw, x)
        return Explanation(maps=maps, raw_by_layer=raw, targets=clean.targets,
                           scores=clean.scores, probabilities=clean.probabilities,
                           layers=clean.layers, method=self.name,
                           layer_reason=clean.layer_reason, output=clean.output,
                           details={"noise": self.noise, "samples": self.samples})

    def _combine(self, samples: Tensor) -> Tensor:
        if self.kind == "smoothgrad":
            return samples.mean(dim=0)
        if self.kind == "smoothgrad_sq":
            return samples.pow(2).mean(dim=0)
        return samples.var(dim=0, unbiased=False)


def check_tunnelled(explainer: Explainer | type[Explainer]) -> None:
    """A noise tunnel runs around one CAM or attribution method (not around another tunnel)."""
    cls = explainer if isinstance(explainer, type) else type(explainer)
    if issubclass(cls, NoiseTunnel):
        raise TypeError(f"{cls.name} is a noise tunnel already ({cls.__name__}); put the method "
                        "it runs (saliency) in the tunnel instead")
    if not issubclass(cls, CAMExplainer | AttributionExplainer):
        raise TypeError(
            f"a noise tunnel needs a CAM or attribution method, not {cls.__name__}"
        )


@register
class SmoothGrad(NoiseTunnel):
    """SmoothGrad (Smilkov et al., "SmoothGrad: removing noise by adding noise", 2017, Eq. 2):
    the saliency ``d y_c / d x`` averaged over ``samples`` noisy copies ``x + e_i``,
    ``e_i ~ N(0, sigma^2)``, ``sigma = noise * (max x - min x)``; the same as
    ``explain(..., method="saliency", noise_tunnel="smoothgrad")``. ``absolute=True`` averages
    ``|d y_c / d x|`` instead (see :class:`~heatlens.methods.gradients.Saliency`)."""

    name = "smoothgrad"
    family = "pixel attributions"

    def __init__(self, model: nn.Module, layer: LayerSpec = "auto", *, samples: int = 10,
                 noise: float = 0.15, seed: int = 0, absolute: bool = False,
                 memory_budget: int = DEFAULT_BUDGET, show_progress: bool | None = None) -> None:
        saliency = Saliency(model, layer, absolute=absolute, memory_budget=memory_budget,
                            show_progress=show_progress)
        super().__init__(saliency, "smoothgrad", samples=samples, noise=noise, seed=seed,
                         memory_budget=memory_budget)
