"""Browsing data-set runs (``heatlens serve --runs DIR``): their index, filtered and sorted, and
any image with its map.

``DIR`` is one run folder (it holds ``run.json``) or a folder of them. The page names a run by
the name listed here and a row by its number, never by a path: the files read are the run's own
(its index and, for a row, the map file the index names, which must lie inside the run folder)
and the row's image, looked up inside the source folder the run recorded and used only when
its SHA-256 is the one the run explained. Anything else is refused.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from heatlens.app.workbench import encode_map
from heatlens.datasets.results import Run, load_run
from heatlens.datasets.store import RUN_FILE
from heatlens.engine.maps import minmax, upsample
from heatlens.loading.images import load_image
from heatlens.loading.presets import Preset
from heatlens.metrics.html import png_data_url

LISTED = ("path", "label_name", "predicted_name", "correct", "probability", "method")
"""The columns a row of the list shows; the metrics' columns are added."""
PAGE = 50
"""Rows per page of the list, by default."""


class RunShelf:
    """The runs under ``folder``, by name (each loaded when first asked for, again when its
    chunks change).

    Raises:
        FileNotFoundError: no run in ``folder``.
    """

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder).resolve()
        if (self.folder / RUN_FILE).is_file():
            found = {self.folder.name: self.folder}
        elif self.folder.is_dir():
            found = {p.parent.name: p.parent for p in sorted(self.folder.glob(f"*/{RUN_FILE}"))}
        else:
            found = {}
        if not found:
            raise FileNotFoundError(f"no data-set run in {folder}: give a folder written by "
                                    "`heatlens explain-dir --out`, or a folder of them")
        self.runs = found
        self._loaded: dict[str, tuple[float, Run]] = {}

    def run(self, name: str) -> Run:
        """The run called ``name``; a ``KeyError`` for a name not listed."""
        folder = self.runs.get(name)
        if folder is None:
            raise KeyError(f"no run called {name!r}; the runs here are "
                           f"{', '.join(sorted(self.runs))}")
        changed = max((p.stat().st_mtime for p in (folder / "parts").glob("*")), default=0.0)
        kept = self._loaded.get(name)
        if kept is None or kept[0] != changed:
            kept = self._loaded[name] = (changed, load_run(folder))
        return kept[1]

    def listing(self) -> list[dict[str, Any]]:
        """Each run: name, model, methods, metrics, images, rows and errors."""
        listed = []
        for name in sorted(self.runs):
            run = self.run(name)
            listed.append({
                "run": name, "model": run.settings.get("model", ""),
                "methods": run.settings.get("methods", []),
                "metrics": run.settings.get("metrics", []),
                "images": len(set(run.index.column("path").to_pylist())), "rows": len(run),
                "errors": len(run.errors), "classes": _classes(run),
            })
        return listed

    def rows(self, name: str, *, label: str | None = None, predicted: str | None = None,
             correct: bool | None = None, method: str | None = None, sort: str | None = None,
             descending: bool = False, offset: int = 0, limit: int = PAGE) -> dict[str, Any]:
        """The run's rows that pass the filters (true class, predicted class, right or wrong,
        method), sorted by a column (a metric, ``probability``, ...), one page of them; each
        row carries its number in the index (``row``), which :meth:`entry` takes."""
        run = self.run(name)
        metrics = list(run.settings.get("metrics", []))
        sortable = {"probability", "score", "seconds", *metrics} & set(run.index.column_names)
        if sort is not None and sort not in sortable:
            raise ValueError(f"cannot sort by {sort!r}; sortable columns: "
                             f"{', '.join(sorted(sortable))}")
        tests: list[Callable[[dict[str, Any]], bool]] = []
        if label is not None:
            tests.append(lambda row: row.get("label_name") == label)
        if predicted is not None:
            tests.append(lambda row: row.get("predicted_name") == predicted)
        if correct is not None:
            tests.append(lambda row: row.get("correct") is correct)
        if method is not None:
            tests.append(lambda row: row.get("method") == method)
        chosen = [(number, row) for number, row in enumerate(run.index.to_pylist())
                  if all(test(row) for test in tests)]
        if sort is not None:
            present = [item for item in chosen if _number(item[1].get(sort)) is not None]
            missing = [item for item in chosen if _number(item[1].get(sort)) is None]
            present.sort(key=lambda item: _number(item[1][sort]), reverse=descending)
            chosen = present + missing  # rows without the value last, either way
        shown = [*LISTED, *metrics]
        return {
            "run": name, "total": len(chosen), "offset": offset, "columns": ["row", *shown],
            "rows": [{"row": number, **{c: _plain(row.get(c)) for c in shown}}
                     for number, row in chosen[offset:offset + limit]],
        }

    def entry(self, name: str, number: int) -> dict[str, Any]:
        """Row ``number`` of the run, with the maps of every method the run holds for its image
        (float32 in [0, 1] at the preset's crop size, as the explain view's maps; the row's own
        first) and the image as the model saw it, where the source still holds that exact file.

        Raises:
            KeyError: an unknown run. IndexError: no such row. PermissionError: the index
            points outside the run (a map) or outside the source folder (an image).
        """
        run = self.run(name)
        row = run.row(number)
        settings = run.settings["preset"]
        preset = Preset(**{**settings, "mean": tuple(settings["mean"]),
                           "std": tuple(settings["std"])})
        rows = run.index.to_pylist()
        same = [number] + [i for i, other in enumerate(rows) if i != number
                           and (other["path"], other["sha256"]) == (row["path"], row["sha256"])]
        maps = [{"row": i, "method": rows[i]["method"],
                 "map": encode_map(_scaled_map(run, rows[i], preset.crop))} for i in same]
        shown, note = _shown(run, row, preset)
        return {
            "run": name, "row": number, "fields": {k: _plain(v) for k, v in row.items()},
            "height": preset.crop, "width": preset.crop, "maps": maps, "shown": shown,
            "note": note,
        }


def _scaled_map(run: Run, row: dict[str, Any], side: int) -> np.ndarray:
    """A stored map as the explain view shows maps: its positive part, upsampled to the crop
    and scaled to [0, 1]; its file must lie inside the run folder."""
    map_file = (run.folder / row["map_file"]).resolve()
    if not map_file.is_relative_to(run.folder.resolve()):
        raise PermissionError(f"a row of {run.folder.name} names a map file outside the run "
                              "folder; it is not read")
    heat = torch.from_numpy(run.map(row)).float()[None].clamp_min(0)
    return minmax(upsample(heat, (side, side)))[0].numpy()


def _classes(run: Run) -> dict[str, list[str]]:
    names = run.index.column_names
    return {column: sorted({v for v in run.index.column(column).to_pylist() if v is not None})
            for column in ("label_name", "predicted_name") if column in names}


def _shown(run: Run, row: dict[str, Any], preset: Preset) -> tuple[str | None, str]:
    """The row's image as the model saw it (a PNG ``data:`` URL) and, without one, why."""
    source = Path(str(run.settings.get("source", "")))
    roots = [source] if source.is_absolute() else [Path.cwd() / source,
                                                   run.folder.parent / source]
    root = next((r.resolve() for r in roots if r.is_dir()), None)
    if root is None:
        return None, f"the source folder {source} is not reachable from here"
    path = (root / str(row["path"])).resolve()
    if not path.is_relative_to(root):
        raise PermissionError(f"the row's path {row['path']!r} lies outside the source folder; "
                              "it is not read")
    if not path.is_file():
        return None, f"{row['path']} is no longer in {root}"
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != row.get("sha256"):
        return None, f"{row['path']} has changed since the run explained it"
    image = load_image(data, max_pixels=int(run.settings.get("max_pixels", 89_478_485)))
    return png_data_url(preset.display(image)), ""


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return None if math.isnan(value) else float(value)


def _plain(value: Any) -> Any:
    """A value JSON can carry (NaN becomes ``None``)."""
    if isinstance(value, float) and math.isnan(value):
        return None
    return value
