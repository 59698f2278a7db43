"""``heatlens compare``: rank explanation methods on images by faithfulness (and localisation,
with boxes), beside model-blind controls; a table, an HTML report, CSV and Parquet rows."""

from __future__ import annotations

import csv
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from heatlens.cli.common import ModelSpec, model_options, reported

if TYPE_CHECKING:
    from PIL import Image

    from heatlens.loading.models import LoadedModel
    from heatlens.metrics.faithfulness import Protocol

@click.command("compare")
@click.argument("sources", nargs=-1, type=click.Path(path_type=Path))
@model_options
@click.option("--methods", default="gradcam,gradcam++,scorecam", show_default=True,
              metavar="A,B,...", help="Methods to compare (see `heatlens methods`).")
@click.option("--metrics", default="deletion,insertion,road,average_drop", show_default=True,
              metavar="A,B,...",
              help="Metrics: deletion, insertion, road, aopc, average_drop, increase, "
                   "deletion_lerf; with --boxes: pointing_game, energy_inside, relevance_mass, "
                   "relevance_rank; infidelity, max_sensitivity, sanity.")
@click.option("--boxes", type=click.Path(path_type=Path), default=None, metavar="FILE",
              help="Object boxes: CSV rows path,x1,y1,x2,y2 or JSON {path: [[x1,y1,x2,y2], "
                   "...]} in the pixels of the (upright) image; path as given or relative to "
                   "the folder.")
@click.option("--protocol", type=click.Choice(("heatlens", "rise")), default="heatlens",
              show_default=True,
              help="rise: the RISE paper's deletion and insertion (224 pixels a step, blur "
                   "11/5).")
@click.option("--step", type=float, default=0.01, show_default=True,
              help="Deletion and insertion: pixels changed per step, a fraction (0.01: 100 "
                   "steps) or a count (224); ignored with --protocol rise.")
@click.option("--batch-size", type=click.IntRange(min=1), default=4, show_default=True,
              help="Images explained and scored together.")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed of every random draw (controls, ROAD noise, bootstrap).")
@click.option("-o", "--out", type=click.Path(path_type=Path), default=None,
              help="Folder for report.html, scores.csv and scores.parquet [default: "
                   "heatlens_compare, never overwriting: heatlens_compare-1, ...].")
def compare(sources: tuple[Path, ...], spec: ModelSpec, methods: str, metrics: str,
            boxes: Path | None, protocol: str, step: float, batch_size: int, seed: int,
            out: Path | None) -> None:
    """Rank METHODS on IMAGE(s) or the images of DIR(s) (default: a sample photo).

    Every method explains every image; each map is scored by each metric, beside three
    model-blind controls (a random map, a centred Gaussian, the image's edges) scored the same
    way. Prints the ranking (mean over the images with a 95 % bootstrap interval) and writes an
    HTML report with the table, the curves and every image's maps, and one row per image and
    method as CSV and Parquet.
    """
    from heatlens.cli.explain import method_names
    from heatlens.metrics.evaluate import metric_names, needs_extra
    from heatlens.metrics.faithfulness import RISE_PROTOCOL, heatlens_protocol

    with reported():
        names = method_names(methods)
        wanted = metric_names(metrics)
        chosen = RISE_PROTOCOL if protocol == "rise" else heatlens_protocol(step=step)
        needs_extra("pyarrow", "compare writes scores.parquet")
        paths, roots = _images(sources)
        objects = None if boxes is None else _read_boxes(boxes, paths, roots)
    folder = _folder(out)
    with reported():
        _run(spec, paths, roots, objects, names, wanted, chosen, batch_size, seed, folder)


def _images(sources: tuple[Path, ...]) -> tuple[list[Path], dict[Path, Path]]:
    """The image files, in order, and for each the folder it was found in (for names)."""
    from heatlens.datasets.sources import IMAGE_SUFFIXES
    from heatlens.loading.images import sample_image_path

    if not sources:
        sample = sample_image_path()
        return [sample], {sample: sample.parent}
    paths, roots = [], {}
    for source in sources:
        if source.is_dir():
            found = sorted(p for p in source.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise ValueError(f"the folder {source} holds no image "
                                 f"({', '.join(IMAGE_SUFFIXES)})")
            for path in found:
                paths.append(path)
                roots[path] = source
        elif source.exists():
            paths.append(source)
            roots[source] = source.parent
        else:
            raise FileNotFoundError(f"no image or folder at {source}")
    return paths, roots


def _name(path: Path, roots: dict[Path, Path]) -> str:
    return path.relative_to(roots[path]).as_posix()


def _read_boxes(file: Path, paths: list[Path], roots: dict[Path, Path]
                ) -> dict[Path, list[list[float]]]:
    """Boxes by image path from a CSV or JSON file (see the --boxes help)."""
    from heatlens.loading.objects import read_boxes

    by_name = {_name(p, roots): p for p in paths} | {str(p): p for p in paths}
    found: dict[Path, list[list[float]]] = {}
    for name, boxes in read_boxes(file).items():
        if name not in by_name:
            raise ValueError(f"the boxes file {file} names {name!r}, which is not among the "
                             "images compared")
        found.setdefault(by_name[name], []).extend(boxes)
    missing = [_name(p, roots) for p in paths if p not in found]
    if missing:
        raise ValueError(f"the boxes file {file} has no box for {missing[0]}"
                         + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))
    return found


def _folder(out: Path | None) -> Path:
    """The report folder: ``--out`` (created if needed), else a new ``heatlens_compare[-N]``."""
    if out is not None:
        if out.exists() and not out.is_dir():
            raise click.ClickException(f"cannot write the report into {out}: it is a file; "
                                       "name a folder")
        if not out.parent.is_dir():
            raise click.ClickException(f"cannot write {out}: the directory {out.parent} does "
                                       "not exist")
        out.mkdir(exist_ok=True)
        return out
    for n in range(10_000):
        folder = Path("heatlens_compare" + (f"-{n}" if n else ""))
        try:
            folder.mkdir()
        except FileExistsError:
            continue
        return folder
    raise click.ClickException("could not create a report folder: heatlens_compare-* are taken")


def _batches(paths: list[Path], size: int) -> Iterator[list[Path]]:
    for start in range(0, len(paths), size):
        yield paths[start:start + size]


def _run(spec: ModelSpec, paths: list[Path], roots: dict[Path, Path],
         objects: dict[Path, list[list[float]]] | None, methods: list[str], metrics: list[str],
         protocol: Protocol, batch_size: int, seed: int, folder: Path) -> None:
    import torch

    from heatlens.api import explain
    from heatlens.engine.budget import progress
    from heatlens.loading.images import load_image
    from heatlens.metrics.evaluate import evaluate
    from heatlens.metrics.html import write_html
    from heatlens.metrics.report import merged

    loaded = spec.load()
    click.echo(f"model: {loaded.name}")
    reports, panels, names, skipped = [], [], [], []
    bar = progress(len(paths) * len(methods), "compare", show=sys.stderr.isatty())
    with bar:
        for group in _batches(paths, batch_size):
            pictures, kept = [], []
            for path in group:
                try:
                    pictures.append(load_image(path))
                    kept.append(path)
                except (OSError, ValueError) as exc:
                    skipped.append(f"{_name(path, roots)}: {exc}")
                    bar.update(len(methods))
            if not kept:
                continue
            inputs, displays = loaded.preset(pictures)
            inputs = inputs.to(spec.device)
            explanations = []
            for method in methods:
                explanations.append(explain(loaded.model, inputs, method))
                bar.update(len(kept))
            boxes = None if objects is None else [
                loaded.preset.boxes(torch.tensor(objects[p]), picture.size)
                for p, picture in zip(kept, pictures, strict=True)]
            reports.append(evaluate(loaded.model, inputs, explanations, metrics, boxes=boxes,
                                    seed=seed, protocol=protocol))
            names += [_name(p, roots) for p in kept]
            panels += _panels(kept, roots, displays, explanations, loaded)
    if not reports:
        raise ValueError("no image could be read: " + "; ".join(skipped))
    report = merged(reports)
    click.echo(report.table())
    for line in skipped:
        click.echo(f"skipped {line}")
    rows = report.rows(names)
    _write_rows(rows, folder)
    details = [f"model: {loaded.name}", f"methods: {', '.join(methods)}",
               f"images: {len(names)}" + (f" ({len(skipped)} skipped)" if skipped else "")]
    page = write_html(report, folder / "report.html", title="heatlens compare", panels=panels,
                      details=details)
    click.echo(f"wrote {page}, {folder / 'scores.csv'} and {folder / 'scores.parquet'}")


def _panels(paths: list[Path], roots: dict[Path, Path], displays: list[Image.Image],
            explanations: list[Any], loaded: LoadedModel
            ) -> list[tuple[str, list[tuple[str, Image.Image]]]]:
    """Per image, each method's map over it, titled with method, class and probability."""
    return [(_name(path, roots),
             [(e.title(i, loaded.labels), e.overlay(display, i)) for e in explanations])
            for i, (path, display) in enumerate(zip(paths, displays, strict=True))]


def _write_rows(rows: list[dict[str, Any]], folder: Path) -> None:
    columns = list(dict.fromkeys(key for row in rows for key in row))
    with (folder / "scores.csv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError("writing scores.parquet needs pyarrow: pip install "
                          "'heatlens[metrics]'") from None
    table = pa.Table.from_pylist(rows, schema=None)
    pq.write_table(table, folder / "scores.parquet")
