"""Reading a finished (or interrupted) run back: ``heatlens.load_run(RUN)``."""

from __future__ import annotations

import json
import os
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from heatlens.datasets.store import RUN_FILE, read_errors, read_rows


class Run:
    """A data-set run's results.

    Attributes:
        folder: the run's folder.
        settings: its ``run.json``.
        index: a ``pyarrow.Table``, one row per image and method (the columns are listed in
            the README's "Explaining a data set"); ``run.to_pandas()`` gives a DataFrame.
        errors: the files it could not use: dicts with ``path``, ``kind`` and ``reason``.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.settings: dict[str, Any] = json.loads((self.folder / RUN_FILE).read_text(
            encoding="utf-8"))
        table = read_rows(self.folder)
        self.errors: list[dict[str, str]] = read_errors(self.folder, table)
        if table is None:
            import pyarrow as pa

            table = pa.table({"path": pa.array([], pa.string()),
                              "method": pa.array([], pa.string())})
        self.index = table

    def __len__(self) -> int:
        return self.index.num_rows

    def __repr__(self) -> str:
        images = len(set(self.index.column("path").to_pylist()))
        return (f"Run({str(self.folder)!r}: {images} images, {len(self)} rows, "
                f"{len(self.errors)} errors)")

    def to_pandas(self) -> Any:
        """The index as a pandas DataFrame (needs pandas)."""
        return self.index.to_pandas()

    def row(self, row: int) -> dict[str, Any]:
        """Row ``row`` of the index as a dict."""
        if not 0 <= row < len(self):
            raise IndexError(f"row {row} is outside the index's {len(self)} rows")
        return self.index.slice(row, 1).to_pylist()[0]

    def map(self, row: int | dict[str, Any]) -> np.ndarray:
        """The map of an index row (its number or the row itself), float32 at the layer's
        resolution: the raw map for a CAM-like method, the scaled map otherwise (see
        :mod:`heatlens.datasets.compute`)."""
        entry = self.row(row) if isinstance(row, int) else row
        stored = _array(os.fspath(self.folder / entry["map_file"]))[entry["map_key"]]
        return stored.astype(np.float32) * np.float32(entry["map_scale"])


@lru_cache(maxsize=64)
def _array(path: str) -> np.ndarray:
    """One chunk's maps, memory-mapped (reading a map reads only its bytes)."""
    return np.load(path, mmap_mode="r")


def load_run(folder: str | os.PathLike[str]) -> Run:
    """Open the run in ``folder`` (written by ``heatlens explain-dir`` or
    :func:`heatlens.explain_dataset`).

    Raises:
        FileNotFoundError: no run there.
    """
    path = Path(folder)
    if not (path / RUN_FILE).is_file():
        raise FileNotFoundError(f"no heatlens run in {path}: it has no {RUN_FILE}")
    return Run(path)
