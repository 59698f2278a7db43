"""``summary.png``: where the model looks, class by class.

For the run's first method, each image's map is made a heatmap the way the maps are shown
(positive part, scaled to ``[0, 1]``, resized to a common size), and the heatmaps are averaged
over the images predicted as each class: a class whose mean map sits off-centre, in a corner
or along a border deserves a look (``heatlens audit`` looks closer).
"""

from __future__ import annotations

import io
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from heatlens.datasets.results import Run
from heatlens.datasets.store import atomic_write

SIZE = 64
"""Side of the averaged maps."""
CLASSES = 16
"""Classes shown: the most often predicted."""


def mean_maps(run: Run, method: str) -> dict[int, tuple[np.ndarray, int]]:
    """For the :data:`CLASSES` most often predicted classes, the mean heatmap of ``method``'s
    maps over the images predicted as that class and how many there were."""
    rows = [row for row in run.index.to_pylist() if row["method"] == method]
    counts = Counter(row["predicted"] for row in rows)
    chosen = [cls for cls, _ in counts.most_common(CLASSES)]
    sums = {cls: torch.zeros(SIZE, SIZE) for cls in chosen}
    for row in rows:
        if row["predicted"] not in sums:
            continue
        heat = torch.from_numpy(run.map(row)).clamp_min(0)
        heat = heat / heat.max() if heat.max() > 0 else heat
        sums[row["predicted"]] += F.interpolate(heat[None, None], size=(SIZE, SIZE),
                                                mode="bilinear", align_corners=False)[0, 0]
    return {cls: ((sums[cls] / counts[cls]).numpy(), counts[cls]) for cls in chosen}


def write_summary(run: Run, path: Path) -> Path | None:
    """Draw the mean map per predicted class of the run's first method to ``path`` (replaced
    atomically); nothing when the run holds no row."""
    if len(run) == 0:
        return None
    from matplotlib.figure import Figure

    method = run.settings["methods"][0]
    means = mean_maps(run, method)
    names = dict(zip(run.index.column("predicted").to_pylist(),
                     run.index.column("predicted_name").to_pylist(), strict=True))
    columns = min(4, len(means))
    rows = -(-len(means) // columns)
    figure = Figure(figsize=(2.6 * columns, 3.0 * rows + 0.4), layout="constrained")
    for i, (cls, (mean, count)) in enumerate(means.items()):
        axes = figure.add_subplot(rows, columns, i + 1)
        axes.imshow(mean, cmap="jet", vmin=0, vmax=1)
        axes.set_title(f"{names.get(cls) or f'class {cls}'}\n{count} image"
                       f"{'s' if count > 1 else ''}", fontsize=9)
        axes.set_axis_off()
    figure.suptitle(f"mean {method} map per predicted class", fontsize=11)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    atomic_write(path, buffer.getvalue())
    return path
