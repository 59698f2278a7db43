"""What an evaluation found: scores per metric and source, curves, sanity verdicts, and the
summary that ranks the sources with bootstrap intervals."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

HIGHER_IS_BETTER = {
    "deletion": False, "deletion_lerf": True, "insertion": True, "aopc": True, "road": True,
    "average_drop": False, "increase": True, "pointing_game": True, "energy_inside": True,
    "relevance_mass": True, "relevance_rank": True, "infidelity": False,
    "max_sensitivity": False,
}
"""For each metric, whether a higher score means a more faithful (or better placed, or more
robust) map."""


@dataclass(frozen=True)
class Summary:
    """One metric for one source over the images: the mean and its bootstrap interval."""

    mean: float
    low: float
    high: float
    images: int


def bootstrap_interval(values: Tensor, *, seed: int = 0, resamples: int = 1000,
                       level: float = 0.95) -> Summary:
    """The mean of ``values`` ``(B,)`` and its percentile bootstrap interval (Efron &
    Tibshirani, "An Introduction to the Bootstrap", 1993, Ch. 13): the ``(1 - level) / 2`` and
    ``(1 + level) / 2`` quantiles of the means of ``resamples`` resamples drawn with
    replacement (seeded). NaN values (an image where the metric is undefined) are left out."""
    kept = values[~torch.isnan(values)].double()
    if kept.numel() == 0:
        return Summary(float("nan"), float("nan"), float("nan"), 0)
    mean = float(kept.mean())
    if kept.numel() == 1:
        return Summary(mean, mean, mean, 1)
    generator = torch.Generator().manual_seed(seed)
    picks = torch.randint(0, kept.numel(), (resamples, kept.numel()), generator=generator)
    means = kept.cpu()[picks].mean(dim=1)
    tail = (1 - level) / 2
    low, high = torch.quantile(means, torch.tensor([tail, 1 - tail], dtype=means.dtype))
    return Summary(mean, float(low), float(high), kept.numel())


@dataclass(frozen=True)
class Report:
    """What :func:`heatlens.evaluate` measured.

    Attributes:
        scores: ``scores[metric][source]`` is ``(B,)``, one value per image. The sources are the
            explanations evaluated (by method name) and then the controls.
        curves: ``curves[name][source]`` is ``(x, y)``: ``x`` ``(n,)`` the fraction of pixels
            changed, ``y`` ``(B, n)`` the score (``"deletion"``, ``"deletion_lerf"``,
            ``"insertion"``, ``"road_morf"``, ``"road_lerf"``).
        sources: the explanations' names, in order.
        controls: the control maps' names (``"random"``, ``"gaussian"``, ``"edges"``).
        classes: ``(B,)`` the class each image was evaluated for.
        sanity: ``sanity[source]``, the sanity checks' results (see :mod:`heatlens.metrics.sanity`).
        protocol: how pixels were removed and inserted, in words.
        notes: what else a reader should know (metrics that did not apply, and why).
        seed: the seed of every random draw.
    """

    scores: dict[str, dict[str, Tensor]]
    curves: dict[str, dict[str, tuple[Tensor, Tensor]]]
    sources: list[str]
    controls: list[str]
    classes: Tensor
    sanity: dict[str, list[Any]] = field(default_factory=dict)
    protocol: str = ""
    notes: list[str] = field(default_factory=list)
    seed: int = 0

    def of(self, source: str) -> dict[str, Tensor]:
        """``{metric: (B,)}`` for one source."""
        if source not in [*self.sources, *self.controls]:
            raise KeyError(f"no source {source!r}; this report has "
                           f"{', '.join([*self.sources, *self.controls])}")
        return {metric: by_source[source] for metric, by_source in self.scores.items()
                if source in by_source}

    def summary(self) -> dict[str, dict[str, Summary]]:
        """``summary[metric][source]``: the mean over the images and its 95 % interval."""
        return {metric: {source: bootstrap_interval(values, seed=self.seed)
                         for source, values in by_source.items()}
                for metric, by_source in self.scores.items()}

    def ranking(self, metric: str) -> list[str]:
        """The explanations (controls left out) from best to worst by their mean ``metric``."""
        means = {source: s.mean for source, s in self.summary()[metric].items()
                 if source in self.sources}
        return sorted(means, key=means.__getitem__, reverse=HIGHER_IS_BETTER[metric])

    def table(self) -> str:
        """A plain-text table: one row per source (explanations, then controls), one column per
        metric, ``mean [low, high]``; the best explanation of each metric marked ``*``."""
        summary = self.summary()
        metrics = list(self.scores)
        best = {metric: self.ranking(metric)[0] for metric in metrics if self.ranking(metric)}
        header = ["source", *(f"{m} ({'higher' if HIGHER_IS_BETTER[m] else 'lower'} is better)"
                              for m in metrics)]
        rows = [header]
        for source in [*self.sources, *self.controls]:
            cells = [source if source in self.sources else f"{source} (control)"]
            for metric in metrics:
                s = summary[metric].get(source)
                mark = "*" if best.get(metric) == source else ""
                cells.append("n/a" if s is None else
                             f"{s.mean:.3f} [{s.low:.3f}, {s.high:.3f}]{mark}")
            rows.append(cells)
        widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
                 for row in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        verdicts = [f"sanity, {source}: {r.reason}" for source, results in self.sanity.items()
                    for r in results]
        protocol = [f"protocol: {self.protocol}"] if self.protocol else []
        return "\n".join([*lines, *protocol, *verdicts, *self.notes])

    def rows(self, names: Sequence[str] | None = None) -> list[dict[str, Any]]:
        """One row per image and source: ``image`` (its index, or ``names[i]``), ``source``,
        ``control`` (bool), ``class`` and one column per metric."""
        rows = []
        for source in [*self.sources, *self.controls]:
            for i in range(self.classes.shape[0]):
                row: dict[str, Any] = {"image": names[i] if names is not None else i,
                                       "source": source, "control": source in self.controls,
                                       "class": int(self.classes[i])}
                for metric, by_source in self.scores.items():
                    if source in by_source:
                        row[metric] = float(by_source[source][i])
                rows.append(row)
        return rows


def merged(reports: Sequence[Report]) -> Report:
    """One report of several made on consecutive batches of images with the same sources,
    metrics and settings: scores and curves joined along the images, sanity results listed."""
    first = reports[0]
    scores = {metric: {source: torch.cat([r.scores[metric][source] for r in reports])
                       for source in by_source}
              for metric, by_source in first.scores.items()}
    curves = {name: {source: (x, torch.cat([r.curves[name][source][1] for r in reports]))
                     for source, (x, _) in by_source.items()}
              for name, by_source in first.curves.items()}
    sanity = {source: [result for r in reports for result in r.sanity.get(source, [])]
              for source in first.sanity}
    notes = list(dict.fromkeys(note for r in reports for note in r.notes))
    return Report(scores, curves, first.sources, first.controls,
                  torch.cat([r.classes for r in reports]), sanity, first.protocol, notes,
                  first.seed)
