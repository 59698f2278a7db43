"""``heatlens concepts``: Deep Feature Factorization of images, drawn as coloured concepts."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import click

from heatlens.cli.common import ModelSpec, figure_options, make_figure, model_options, start_figure

if TYPE_CHECKING:
    from matplotlib.figure import Figure


@click.command("concepts")
@click.argument("images", nargs=-1, type=click.Path(path_type=Path))
@model_options
@click.option("--n-components", type=click.IntRange(min=1), default=5, show_default=True,
              help="Number of concepts to find (NMF components).")
@click.option("--top-k", type=click.IntRange(min=1), default=2, show_default=True,
              help="Classes named per concept.")
@click.option("--layer", default="auto", show_default=True,
              help="Layer to factorize (see `heatlens layers`).")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed of the factorization (same seed, same concepts).")
@click.option("--image-weight", type=click.FloatRange(0, 1), default=0.3, show_default=True,
              help="Weight of the image where a concept is at full strength.")
@click.option("--cmap", default="gist_rainbow", show_default=True,
              help="Matplotlib colormap the concept colours are taken from.")
@figure_options
def concepts(images: tuple[Path, ...], spec: ModelSpec, n_components: int, top_k: int,
             layer: str, seed: int, image_weight: float, cmap: str, rows: int,
             out: Path | None, show: bool) -> None:
    """Find concepts in IMAGE(s) (default: a sample photo) with Deep Feature Factorization.

    The layer's activations over all images are factorized into --n-components concepts
    (Collins et al., ECCV 2018); each is named by the model's classifier. The figure colours
    each pixel by its strongest concept, with a legend of each concept's top classes.
    """
    paths, plan = start_figure(images, ["concepts"], out, rows, 1)

    def work() -> Figure:
        from heatlens.concepts.factorize import factorize
        from heatlens.loading.images import load_image

        pictures = [load_image(path) for path in paths]
        loaded = spec.load()
        click.echo(f"model: {loaded.name}")
        inputs, displays = loaded.preset(pictures)
        found = factorize(loaded.model, inputs.to(spec.device), n_components, layer,
                          top_k=top_k, seed=seed)
        click.echo(f"layer: {found.layer}; relative reconstruction error "
                   f"{found.relative_error:.3f} after {found.iterations} iterations")
        for line in found.legend(loaded.labels):
            click.echo(f"concept {line}")
        return found.figure(displays, labels=loaded.labels, titles=[p.name for p in paths],
                            image_weight=image_weight, cmap=cmap, rows=rows)

    make_figure(plan, show, work)
