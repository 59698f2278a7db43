"""``heatlens explain-dir``: explain every image of a folder or a list into a resumable run."""

from __future__ import annotations

import signal
from pathlib import Path

import click

from heatlens.cli.common import ModelSpec, model_options, reported


@click.command("explain-dir")
@click.argument("source", type=click.Path(path_type=Path))
@model_options
@click.option("-o", "--out", type=click.Path(path_type=Path), required=True, metavar="RUN",
              help="The run folder: created, or resumed when it holds this run already.")
@click.option("--method", "methods", default="gradcam", show_default=True, metavar="A,B,...",
              help="Methods (see `heatlens methods`).")
@click.option("--target", default="predicted", show_default=True,
              metavar="predicted|label|N",
              help="The class to explain: the prediction, the image's label (class folders "
                   "or the list's label column), or class N.")
@click.option("--layer", default="auto", show_default=True, help="Layer to explain.")
@click.option("--metrics", default="", metavar="A,B,...",
              help="Evaluation metrics per map, a column each (deletion, insertion, road, "
                   "average_drop, ...).")
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--workers", type=click.IntRange(min=0), default=2, show_default=True,
              help="Processes decoding images while the model runs.")
@click.option("--overlays", is_flag=True,
              help="Also write PNG overlays into RUN/overlays/, mirroring SOURCE.")
@click.option("--shard", default=None, metavar="K/N",
              help="Explain only the K-th of N parts of the images (run N of these, any "
                   "where, into the same RUN).")
@click.option("--engine", type=click.Choice(("local", "ray")), default="local",
              show_default=True, help="ray: Ray Data with a pool of model actors "
                                      "(pip install 'heatlens[ray]').")
@click.option("--ray-address", default=None, metavar="ADDR",
              help="Join this Ray cluster (default: start a local Ray).")
@click.option("--max-pixels", type=click.IntRange(min=1), default=None,
              help="Larger images are listed in errors.csv [default: 89,478,485].")
@click.option("--chunk-images", type=click.IntRange(min=1), default=256, show_default=True,
              help="Images per chunk file (one is also written every minute): the most a "
                   "killed run can lose.")
@click.option("--seed", type=int, default=0, show_default=True, help="The metrics' seed.")
def explain_dir(source: Path, spec: ModelSpec, out: Path, methods: str, target: str,
                layer: str, metrics: str, batch_size: int, workers: int, overlays: bool,
                shard: str | None, engine: str, ray_address: str | None,
                max_pixels: int | None, chunk_images: int, seed: int) -> None:
    """Explain every image of SOURCE (a folder, searched recursively, or a .csv/.txt list of
    paths) into the run folder RUN.

    RUN gets index.parquet (one row per image and method: prediction, top-5, target, score,
    metrics, where its map is), the maps (float16, at the layer's resolution), errors.csv
    (files that could not be used, and why), summary.png (the mean map per predicted class)
    and run.json. Run the same command again after an interruption: finished images are
    skipped. Read it back with heatlens.load_run(RUN).
    """
    from heatlens.cli.explain import method_names
    from heatlens.datasets.runner import explain_dataset
    from heatlens.datasets.sources import parse_shard
    from heatlens.loading.images import DEFAULT_MAX_PIXELS
    from heatlens.metrics.evaluate import metric_names, needs_extra

    with reported():
        needs_extra("pyarrow", "explain-dir's index.parquet")
        names = method_names(methods)
        wanted = metric_names(metrics) if metrics.strip() else []
        part = None if shard is None else parse_shard(shard)
        if out.exists() and not out.is_dir():
            raise ValueError(f"cannot write the run into {out}: it is a file; name a folder")
        if not source.exists():
            raise FileNotFoundError(f"no folder or list of images at {source}")
        loaded = spec.load()
    click.echo(f"model: {loaded.name}")
    signal.signal(signal.SIGTERM, _interrupt)  # a scheduler's stop: keep the finished batches
    try:
        with reported():
            run = explain_dataset(
                loaded.model, source, out, names, preset=loaded.preset, labels=loaded.labels,
                target=target, layer=layer, metrics=wanted, batch_size=batch_size,
                workers=workers, overlays=overlays, shard_of=part, engine=engine,
                ray_address=ray_address, seed=seed, chunk_images=chunk_images,
                max_pixels=max_pixels or DEFAULT_MAX_PIXELS, model_name=loaded.name)
    except KeyboardInterrupt:
        click.echo(f"\ninterrupted: the finished images are kept in {out}; run the same "
                   "command again to finish", err=True)
        raise SystemExit(130) from None
    images = len(set(run.index.column("path").to_pylist()))
    click.echo(f"{images} images explained with {', '.join(names)} in {out} "
               f"({len(run.errors)} could not be used: {out / 'errors.csv'})")


def _interrupt(number: int, frame: object) -> None:
    """SIGTERM as Ctrl-C: the run writes the batches it has finished, then stops."""
    raise KeyboardInterrupt
