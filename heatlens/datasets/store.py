"""A run's folder: its settings, its results in whole chunks, and reading them back.

Layout of ``RUN/``::

    run.json                   the settings (what makes the results what they are)
    parts/rows-<T>.parquet     the index rows of one chunk      (T: time, writer, chunk number)
    parts/errors-<T>.parquet   the files that chunk could not use
    maps/<method>/<T>.npy      that chunk's maps, (n, h, w) float16, one row per image
    index.parquet              all rows, one per image and method (gathered from parts/)
    errors.csv                 every file that could not be used, and why

Every file is written under a temporary name and renamed into place, the maps before the rows
that point at them, so a run killed at any moment leaves only whole chunks: a chunk counts once
its rows file exists. ``index.parquet`` and ``errors.csv`` are gathered from ``parts/`` when a
run ends (also when it is interrupted with Ctrl-C, and at the start of the next run after a
kill); :func:`load_run` reads ``parts/`` itself, so it is always up to date. Where an image was
explained twice (its file changed between runs), the later row wins.
"""

from __future__ import annotations

import csv
import io
import json
import os
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from heatlens.metrics.evaluate import needs_extra

RUN_FILE = "run.json"
COMPARED = ("model_fingerprint", "preset", "target", "layer", "metrics", "seed")
"""Settings that must match for a run to go on in an existing folder (methods may be added)."""


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename, so
    ``path`` is either absent, as it was, or complete."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with temporary.open("wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


class RunFolder:
    """Writes a run's chunks and gathers its index (see the module docstring).

    Args:
        folder: ``RUN``; created if missing.
        settings: this run's settings (``run.json``); where the folder holds a run already, the
            :data:`COMPARED` settings must be the same, and the methods are merged.
    """

    def __init__(self, folder: Path, settings: dict[str, Any]) -> None:
        needs_extra("pyarrow", "a data-set run's index.parquet")
        self.folder = Path(folder)
        if self.folder.exists() and not self.folder.is_dir():
            raise ValueError(f"cannot write the run into {self.folder}: it is a file; name a "
                             "folder")
        self.settings = self._merged(settings)
        self.writer = f"{uuid.uuid4().hex[:8]}"
        self.chunks = 0

    def _merged(self, settings: dict[str, Any]) -> dict[str, Any]:
        file = self.folder / RUN_FILE
        if not file.is_file():
            if self.folder.is_dir() and any(self.folder.iterdir()):
                raise ValueError(f"{self.folder} is not empty and holds no {RUN_FILE}: it is "
                                 "not a heatlens run; name a new folder")
            return settings
        before = json.loads(file.read_text(encoding="utf-8"))
        changed = [key for key in COMPARED if before.get(key) != settings.get(key)]
        if changed:
            what = "; ".join(f"{key} was {before.get(key)!r}, now {settings.get(key)!r}"
                             for key in changed)
            raise ValueError(f"{self.folder} holds a run with other settings ({what}); its "
                             "results would not be comparable: give a new --out for a separate "
                             "run, or the same settings to resume it")
        methods = list(dict.fromkeys([*before.get("methods", []), *settings["methods"]]))
        return {**before, **settings, "methods": methods}

    def start(self) -> None:
        """Write ``run.json`` and gather what an earlier, killed run left in ``parts/``."""
        self.folder.mkdir(parents=True, exist_ok=True)
        atomic_write(self.folder / RUN_FILE,
                     json.dumps(self.settings, indent=2, sort_keys=True).encode())
        self.gather()

    def done(self, methods: Sequence[str]) -> dict[str, str]:
        """``name -> sha256`` of the images the run holds for every one of ``methods``."""
        table = read_rows(self.folder)
        if table is None:
            return {}
        held: dict[str, dict[str, str]] = {}
        for name, sha, method in zip(table.column("path").to_pylist(),
                                     table.column("sha256").to_pylist(),
                                     table.column("method").to_pylist(), strict=True):
            held.setdefault(name, {})[method] = sha
        return {name: next(iter(shas.values())) for name, shas in held.items()
                if all(m in shas for m in methods) and len(set(shas.values())) == 1}

    def write(self, rows: list[dict[str, Any]], maps: dict[str, np.ndarray],
              errors: list[dict[str, str]]) -> None:
        """Write one chunk: each method's maps (rows point at them by ``map_file`` and
        ``map_key``), then its errors, then its rows."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        stamp = f"{time.time_ns():020d}-{self.writer}-{self.chunks:05d}"
        self.chunks += 1
        written = {}
        for method, array in maps.items():
            relative = f"maps/{method}/{stamp}.npy"
            buffer = io.BytesIO()
            np.save(buffer, np.ascontiguousarray(array, dtype=np.float16))
            atomic_write(self.folder / relative, buffer.getvalue())
            written[method] = relative
        counters: dict[str, int] = {}
        for row in rows:
            method = row["method"]
            row["map_file"] = written[method]
            row["map_key"] = counters.get(method, 0)
            counters[method] = row["map_key"] + 1
        if errors:
            atomic_write(self.folder / "parts" / f"errors-{stamp}.parquet",
                         _parquet(pa.Table.from_pylist(errors), pq))
        if rows:
            atomic_write(self.folder / "parts" / f"rows-{stamp}.parquet",
                         _parquet(pa.Table.from_pylist(rows), pq))

    def gather(self) -> None:
        """Write ``index.parquet`` and ``errors.csv`` from ``parts/``."""
        import pyarrow.parquet as pq

        table = read_rows(self.folder)
        if table is not None:
            atomic_write(self.folder / "index.parquet", _parquet(table, pq))
        errors = read_errors(self.folder, table)
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=["path", "kind", "reason"],
                                lineterminator="\n")
        writer.writeheader()
        writer.writerows(errors)
        atomic_write(self.folder / "errors.csv", buffer.getvalue().encode())


def _parquet(table: Any, pq: Any) -> bytes:
    sink = io.BytesIO()
    pq.write_table(table, sink)
    return sink.getvalue()


def _parts(folder: Path, kind: str) -> Iterator[Path]:
    """The chunk files of one kind, oldest first (their names start with the time)."""
    yield from sorted((folder / "parts").glob(f"{kind}-*.parquet"))


def read_rows(folder: Path) -> Any:
    """All rows of a run as a ``pyarrow.Table``, one per image and method (the latest where an
    image was explained twice), sorted by path and method; ``None`` when there are none."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    tables = [pq.read_table(part) for part in _parts(folder, "rows")]
    if not tables:
        return None
    table = pa.concat_tables(tables, promote_options="permissive")
    latest: dict[tuple[str, str], int] = {}
    for i, key in enumerate(zip(table.column("path").to_pylist(),
                                table.column("method").to_pylist(), strict=True)):
        latest[key] = i
    order = sorted(latest, key=lambda key: key)
    return table.take([latest[key] for key in order])


def read_errors(folder: Path, rows: Any) -> list[dict[str, str]]:
    """The files a run could not use, one per path (the latest reason), without those that
    were explained since (``rows``, from :func:`read_rows`), sorted by path."""
    import pyarrow.parquet as pq

    explained = set() if rows is None else set(rows.column("path").to_pylist())
    latest: dict[str, dict[str, str]] = {}
    for part in _parts(folder, "errors"):
        for error in pq.read_table(part).to_pylist():
            latest[error["path"]] = error
    return [latest[path] for path in sorted(latest) if path not in explained]
