"""``heatlens audit``: is the model looking at the object, class by class?"""

from __future__ import annotations

from pathlib import Path

import click

from heatlens.cli.common import ModelSpec, model_options, reported


@click.command("audit")
@click.argument("source", type=click.Path(path_type=Path))
@model_options
@click.option("--boxes", type=click.Path(path_type=Path), default=None, metavar="FILE",
              help="Object boxes: CSV rows path,x1,y1,x2,y2 or JSON {path: [[x1,y1,x2,y2], "
                   "...]}, in the image's pixels, path relative to SOURCE.")
@click.option("--masks", type=click.Path(path_type=Path), default=None, metavar="DIR",
              help="A folder mirroring SOURCE with one PNG per image, non-zero on the object.")
@click.option("--method", default="gradcam", show_default=True, help="Explanation method.")
@click.option("--target", type=click.Choice(("predicted", "label")), default="predicted",
              show_default=True, help="Explain and group by the prediction or the label.")
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("--workers", type=click.IntRange(min=0), default=2, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("-o", "--out", type=click.Path(path_type=Path), default=Path("heatlens_audit"),
              show_default=True, help="Folder for report.html, images.parquet and "
                                      "classes.parquet.")
def audit(source: Path, spec: ModelSpec, boxes: Path | None, masks: Path | None, method: str,
          target: str, batch_size: int, workers: int, seed: int, out: Path) -> None:
    """Audit the model on the images of SOURCE (a folder or a .csv/.txt list) for shortcuts:
    relevance in the border band and its corners, on the object (with --boxes or --masks),
    the class's probability with the object removed, and the maps of each class clustered
    (SpRAy). Prints the verdict and writes an HTML report with pictures and Parquet rows."""
    from heatlens.cli.explain import method_names
    from heatlens.metrics.evaluate import needs_extra
    from heatlens.shortcuts.run import audit as run_audit

    with reported():
        needs_extra("pyarrow", "the audit's Parquet output")
        name = method_names(method)[0]
        if boxes is not None and masks is not None:
            raise ValueError("give boxes or masks, not both")
        if not source.exists():
            raise FileNotFoundError(f"no folder or list of images at {source}")
        if out.exists() and not out.is_dir():
            raise ValueError(f"cannot write the report into {out}: it is a file; name a folder")
        loaded = spec.load()
        report = run_audit(loaded.model, source, boxes=boxes, masks=masks, method=name,
                           preset=loaded.preset, labels=loaded.labels, target=target,
                           batch_size=batch_size, workers=workers, seed=seed)
        page = report.save(out)
    click.echo(report.summary())
    click.echo(f"wrote {page}")
