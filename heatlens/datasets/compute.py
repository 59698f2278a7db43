"""The work a run does on one batch, the same for every engine: explain it with each method (one
explainer per method for the whole run), score the maps, and turn the results into index rows
and maps to store.

What is stored of a map (at the layer's resolution, float16): for a method explaining one layer
with a map over its positions (the CAM family, FullGrad, attention methods), the signed raw map
``Explanation.raw`` divided by its largest magnitude, with that factor in the row's
``map_scale``, so ``stored * map_scale`` is the raw map (float16 keeps 3 significant digits
and cannot overflow in ``[-1, 1]``); for the others (pixel attributions, several layers fused),
the scaled map ``Explanation.maps`` in ``[0, 1]`` at the input's resolution, ``map_scale = 1``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from heatlens.explanation import Explanation
from heatlens.methods.base import Explainer
from heatlens.methods.registry import create_explainer

TOP = 5
"""Classes listed in a row's ``top5``."""


@dataclass
class BatchResult:
    """One batch's results: one row per image and method (the fields that depend on the model,
    not on the file), and each method's ``(B, h, w)`` float16 maps, still on the model's device."""

    rows: list[dict[str, Any]]
    maps: dict[str, Tensor]
    explanations: dict[str, Explanation]


class Explaining:
    """Explain and score batches with ``methods`` (see the module docstring).

    Args:
        model: the model, in eval mode, on its device.
        methods: method names (canonical).
        layer: the layer to explain (``"auto"``: each method's own choice).
        metrics: metric names (canonical) scored per map; ``()`` for none.
        seed: the metrics' seed.
        labels: class names by index, for the ``*_name`` columns.
    """

    def __init__(self, model: nn.Module, methods: Sequence[str], layer: Any, metrics:
                 Sequence[str], seed: int, labels: Sequence[str] | None) -> None:
        self.model, self.metrics, self.seed = model, tuple(metrics), seed
        self.labels = None if labels is None else list(labels)
        self.explainers: dict[str, Explainer] = {
            name: create_explainer(name, model, layer=layer) for name in methods}

    def __call__(self, inputs: Tensor, targets: Tensor | int | None) -> BatchResult:
        """Explain ``inputs`` ``(B, C, H, W)`` for ``targets`` (``None``: the prediction)."""
        explanations, seconds = {}, {}
        for name, explainer in self.explainers.items():
            start = time.perf_counter()
            explanations[name] = explainer(inputs, target=targets)
            seconds[name] = time.perf_counter() - start
        scores = self._scores(inputs, explanations, seconds)
        first = next(iter(explanations.values()))
        if first.output is None or first.output.ndim != 2:
            raise ValueError("a data-set run needs a classifier's (B, classes) scores; the "
                             "model returned " + ("no scores" if first.output is None else
                                                  f"shape {tuple(first.output.shape)}"))
        probabilities = first.output.float().softmax(dim=1)
        best = probabilities.topk(min(TOP, probabilities.shape[1]), dim=1)
        rows, maps = [], {}
        for name, e in explanations.items():
            stored, scale = stored_map(e)
            maps[name] = stored
            for i in range(len(e)):
                top = [{"class": int(c), "name": self._name(int(c)), "probability": float(p)}
                       for c, p in zip(best.indices[i], best.values[i], strict=True)]
                rows.append({
                    "predicted": int(best.indices[i, 0]),
                    "predicted_name": self._name(int(best.indices[i, 0])),
                    "top5": top,
                    "target": int(e.targets[i]),
                    "target_name": self._name(int(e.targets[i])),
                    "score": float(e.scores[i]),
                    "probability": None if e.probabilities is None else float(
                        e.probabilities[i]),
                    "method": name,
                    "layer": ",".join(e.layers),
                    "map_scale": float(scale[i]),
                    **{metric: float(values[i]) for metric, values in scores[name].items()},
                    "seconds": seconds[name] / len(e),
                })
        return BatchResult(rows, maps, explanations)

    def _scores(self, inputs: Tensor, explanations: dict[str, Explanation],
                seconds: dict[str, float]) -> dict[str, dict[str, Tensor]]:
        """Each metric per method, ``(B,)``, in one evaluation of all the methods' maps; its
        time is shared equally among the methods."""
        if not self.metrics:
            return {name: {} for name in explanations}
        from heatlens.metrics.evaluate import evaluate

        start = time.perf_counter()
        report = evaluate(self.model, inputs, explanations, self.metrics, seed=self.seed,
                          controls=(), show_progress=False)
        for name in explanations:
            seconds[name] += (time.perf_counter() - start) / len(explanations)
        return {name: {metric: report.scores[metric][name].detach().cpu()
                       for metric in report.scores} for name in explanations}

    def _name(self, index: int) -> str | None:
        return self.labels[index] if self.labels is not None and 0 <= index < len(
            self.labels) else None


def stored_map(e: Explanation) -> tuple[Tensor, Tensor]:
    """The maps to store, ``(B, h, w)`` float16 on the model's device, and their ``(B,)``
    scales (see the module docstring)."""
    raw = e.raw_by_layer.get(e.layers[0]) if len(e.layers) == 1 else None
    if raw is None or raw.ndim != e.maps.ndim or raw.shape[0] != len(e):
        return e.maps.to(torch.float16), torch.ones(len(e))
    flat = raw.detach().float().flatten(1)
    scale = flat.abs().amax(dim=1).nan_to_num()
    divided = raw.detach().float() / scale.clamp_min(torch.finfo(torch.float32).tiny).view(
        -1, *([1] * (raw.ndim - 1)))
    return divided.to(torch.float16), scale.cpu()
