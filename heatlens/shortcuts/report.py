"""What :func:`heatlens.audit` found, and how it is written: an HTML page with pictures, and
Parquet rows (one per image, one per class)."""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from heatlens.metrics.evaluate import needs_extra
from heatlens.metrics.html import STYLE, png_data_url


@dataclass(frozen=True, eq=False)
class ClusterSummary:
    """One SpRAy cluster of a class: its number, the rows of its images, its mean map, its
    exemplars (rows), and whether and why it is flagged."""

    number: int
    members: list[int]
    mean: np.ndarray
    exemplars: list[int]
    flagged: bool
    reason: str


@dataclass(eq=False)
class AuditReport:
    """The audit of a model on a data set.

    Attributes:
        images: one dict per image: path, class (explained), class_name, label, predicted,
            probability, band, place, place_share; with objects also mass, lift, hit, rank,
            object_area, p_without_object, p_object_only (masks: correct_same,
            correct_other); cluster, flagged and reason.
        classes: one dict per class, flagged first, then by the share of relevance off the
            object (see :mod:`heatlens.shortcuts.verdict`), each with its ``reasons``.
        clusters: per class name, its SpRAy clusters.
        flagged_classes: the names of the flagged classes, worst first.
        flagged_images: ``{"path", "class_name", "reason"}`` of each flagged image, worst first.
        problems: what could not be used or measured, in words.
        notes: what the audit could not measure with the input given.
        settings: method, seed, band, source.
    """

    images: list[dict[str, Any]]
    classes: list[dict[str, Any]]
    clusters: dict[str, list[ClusterSummary]]
    flagged_classes: list[str]
    flagged_images: list[dict[str, str]]
    problems: list[str]
    notes: list[str]
    settings: dict[str, Any]
    heat: np.ndarray = field(repr=False)
    thumbnails: list[np.ndarray] = field(repr=False)

    def summary(self) -> str:
        """The verdict in a few lines."""
        lines = [f"audited {len(self.images)} images in {len(self.classes)} classes with "
                 f"{self.settings['method']}"]
        if not self.flagged_classes:
            lines.append("no class flagged")
        for row in self.classes:
            if row["flagged"]:
                lines.append(f"flagged {row['class_name']!r}: " + "; ".join(row["reasons"]))
        lines += [f"note: {note}" for note in self.notes]
        lines += [f"problem: {problem}" for problem in self.problems[:10]]
        if len(self.problems) > 10:
            lines.append(f"... and {len(self.problems) - 10} more problems (see the report)")
        return "\n".join(lines)

    def save(self, folder: str | Path) -> Path:
        """Write ``report.html``, ``images.parquet`` and ``classes.parquet`` into ``folder``
        (created); returns the page's path."""
        needs_extra("pyarrow", "writing the audit's Parquet rows")
        import pyarrow as pa
        import pyarrow.parquet as pq

        out = Path(folder)
        out.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist(self.images), out / "images.parquet")
        rows = [{**row, "reasons": list(row["reasons"])} for row in self.classes]
        pq.write_table(pa.Table.from_pylist(rows), out / "classes.parquet")
        page = out / "report.html"
        page.write_text(self._html(), encoding="utf-8")
        return page

    def _html(self) -> str:
        parts = [f"<h1>heatlens audit</h1><p>{html.escape(self.summary().splitlines()[0])}</p>"]
        if self.notes or self.problems:
            items = "".join(f"<li>{html.escape(t)}</li>" for t in [*self.notes, *self.problems])
            parts.append(f"<h2>Notes and problems</h2><ul>{items}</ul>")
        parts.append("<h2>Classes, worst first</h2>" + self._table())
        for row in self.classes:
            parts.append(self._class_section(row))
        return (f"<!doctype html><html><head><meta charset='utf-8'><title>heatlens audit"
                f"</title><style>{STYLE}</style></head><body>{''.join(parts)}</body></html>")

    def _table(self) -> str:
        columns = [("class_name", "class"), ("images", "images"), ("off_object", "off object"),
                   ("band", "border band"), ("place", "place"), ("lift", "lift"),
                   ("kept", "p kept without object"), ("background_gap", "background gap"),
                   ("clusters", "clusters")]
        head = "".join(f"<th>{html.escape(title)}</th>" for _, title in columns)
        body = []
        for row in self.classes:
            cells = []
            for key, _ in columns:
                value = row.get(key)
                text = f"{value:.2f}" if isinstance(value, float) else (
                    "" if value is None else str(value))
                if key == "off_object" and value is not None:
                    text += f" [{row['off_object_low']:.2f}, {row['off_object_high']:.2f}]"
                cells.append(f"<td>{html.escape(text)}</td>")
            style = ' style="background:#fde8e8"' if row["flagged"] else ""
            body.append(f"<tr{style}>{''.join(cells)}</tr>")
        return f"<table><tr>{head}</tr>{''.join(body)}</table>"

    def _class_section(self, row: dict[str, Any]) -> str:
        name = row["class_name"]
        members = [i for i, image in enumerate(self.images) if image["class_name"] == name]
        title = f"<h2>{html.escape(name)}{' (flagged)' if row['flagged'] else ''}</h2>"
        reasons = "".join(f"<li>{html.escape(r)}</li>" for r in row["reasons"])
        figures = [self._figure(_heat(self.heat[members].mean(axis=0)),
                                f"mean map of {len(members)} images")]
        for cluster in self.clusters.get(name, []):
            caption = (f"cluster {cluster.number}: {len(cluster.members)} images"
                       + (f", flagged: {cluster.reason}" if cluster.flagged else ""))
            figures.append(self._figure(_heat(self.heat[cluster.members].mean(axis=0)),
                                        caption))
            figures += [self._figure(_overlay(self.thumbnails[i], self.heat[i]),
                                     f"{self.images[i]['path']}") for i in cluster.exemplars]
        return f"{title}<ul>{reasons}</ul>{''.join(figures)}"

    @staticmethod
    def _figure(picture: Image.Image, caption: str) -> str:
        return (f'<figure><img src="{png_data_url(picture.resize((128, 128)))}" '
                f'alt="{html.escape(caption)}"><figcaption>{html.escape(caption)}'
                "</figcaption></figure>")


def _heat(values: np.ndarray) -> Image.Image:
    import matplotlib

    top = float(values.max())
    scaled = values / top if top > 0 else values
    return Image.fromarray((matplotlib.colormaps["jet"](scaled)[..., :3] * 255).astype(np.uint8))


def _overlay(picture: np.ndarray, values: np.ndarray) -> Image.Image:
    return Image.blend(Image.fromarray(picture), _heat(values), 0.5)
