"""``heatlens explain``: explain images with any method and write one figure of the panels."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from heatlens.cli.common import (
    ModelSpec,
    figure_options,
    make_figure,
    model_options,
    reported,
    start_figure,
)

if TYPE_CHECKING:
    import torch
    from matplotlib.figure import Figure

    from heatlens.engine.targets import TargetSpec
    from heatlens.explanation import Explanation

TASKS = ("classification", "segmentation", "detection")
"""The ``--task`` choices (see :mod:`heatlens.cli.tasks`)."""

VISUALS = ("auto", "heat_map", "blended_heat_map", "masked_image", "alpha_scaling")
"""The --visual choices: pictures of :mod:`heatlens.pictures.attribution`, or ``auto``."""

PICTURE_SIGNS = ("auto", "all", "positive", "negative", "absolute_value")
"""The --sign choices."""

NOISE_TUNNELS = ("smoothgrad", "smoothgrad_sq", "vargrad")
"""The --noise-tunnel choices (:class:`heatlens.NoiseTunnel`'s kinds)."""

_UNSIGNED_VISUALS = ("masked_image", "alpha_scaling")

_SIGN_LEGENDS = {
    "all": "red: negative, white: zero, green: positive attribution",
    "positive": "green: positive attribution",
    "negative": "red: negative attribution",
    "absolute_value": "blue: attribution magnitude",
}


@click.command()
@click.argument("images", nargs=-1, type=click.Path(path_type=Path))
@model_options
@click.option("--method", "methods", default="gradcam", show_default=True, metavar="A,B,...",
              help="Method(s), comma-separated (see `heatlens methods`).")
@click.option("--class-idx", default=None, metavar="N|NAME",
              help="Explain this class (an index, or a label name) instead of the predicted "
                   "one.")
@click.option("--top-k", type=click.IntRange(min=1), default=None,
              help="Explain each of the K most likely classes.")
@click.option("--noise-tunnel", type=click.Choice(NOISE_TUNNELS), default=None,
              help="Run each method on noisy copies of the image and combine the maps: their "
                   "mean (smoothgrad), mean square (smoothgrad_sq) or variance (vargrad).")
@click.option("--nt-samples", type=click.IntRange(min=1), default=10, show_default=True,
              help="Noisy copies per image with --noise-tunnel.")
@click.option("--task", type=click.Choice(TASKS), default="classification", show_default=True,
              help="segmentation: explain the pixels predicted as --class-idx (default: the "
                   "class predicted at most pixels); detection: explain the detections scoring "
                   "at least --score-threshold (of label --class-idx, if given), boxes drawn.")
@click.option("--score-threshold", type=click.FloatRange(0, 1), default=0.5, show_default=True,
              help="With --task detection: the least score of a detection to explain.")
@click.option("--layer", default="auto", show_default=True,
              help="Layer to explain (see `heatlens layers`).")
@click.option("--alpha", type=click.FloatRange(0, 1), default=0.5, show_default=True,
              help="Weight of the heatmap over the image.")
@click.option("--cmap", default=None,
              help="Matplotlib colormap [default: jet for CAM overlays; for signed pictures the "
                   "sign's: red-white-green, Greens, Reds or Blues].")
@click.option("--visual", type=click.Choice(VISUALS), default="auto", show_default=True,
              help="Picture of each map. auto: attribution methods (saliency, integrated "
                   "gradients, occlusion, ...) get a signed picture, blended_heat_map; CAM methods "
                   "the --cmap overlay.")
@click.option("--sign", type=click.Choice(PICTURE_SIGNS), default="auto", show_default=True,
              help="Which attributions a signed picture shows. auto: all (green positive, red "
                   "negative) when the map has both signs, else (and for masked_image and "
                   "alpha_scaling) absolute_value.")
@figure_options
def explain(images: tuple[Path, ...], spec: ModelSpec, methods: str, class_idx: str | None,
            top_k: int | None, noise_tunnel: str | None, nt_samples: int, task: str,
            score_threshold: float, layer: str, alpha: float, cmap: str | None, visual: str,
            sign: str, rows: int, out: Path | None, show: bool) -> None:
    """Explain IMAGE(s) (default: a sample photo) and write a figure.

    CAM methods are drawn as a heatmap over the image; attribution methods (saliency, input x
    gradient, integrated gradients, occlusion, ...) as a signed picture, positive evidence green
    and negative red over the image in grey (see --visual and --sign). Several images, methods or
    --top-k classes make one grid, a panel each, titled "<method> | <label> | <probability>"
    (with the image's name first when there are several images).
    """
    if class_idx is not None and top_k is not None:
        raise click.UsageError("use either --class-idx or --top-k, not both")
    if sign == "all" and visual in _UNSIGNED_VISUALS:
        raise click.UsageError(f"--visual {visual} cannot show both signs; use --sign positive, "
                               "negative or absolute_value")
    if task != "classification" and (top_k is not None or visual != "auto" or sign != "auto"
                                     or noise_tunnel is not None):
        raise click.UsageError(f"--top-k, --noise-tunnel, --visual and --sign do not apply to "
                               f"--task {task}")
    with reported():
        names = method_names(methods)
        if noise_tunnel is not None:
            _check_tunnelled(names)
    paths, plan = start_figure(images, names, out, rows, len(names) * (top_k or 1))
    tunnel = {"noise_tunnel": noise_tunnel, "nt_samples": nt_samples} if noise_tunnel else {}

    def classify() -> Figure:
        return _classification_figure(paths, spec, names, class_idx, top_k, tunnel, layer, alpha,
                                      cmap, visual, sign, rows)

    def by_task() -> Figure:
        return _task_figure(task, paths, spec, names, class_idx, score_threshold, layer, alpha,
                            cmap or "jet", rows)

    make_figure(plan, show, classify if task == "classification" else by_task)


def _classification_figure(paths: list[Path], spec: ModelSpec, names: list[str],
                           class_idx: str | None, top_k: int | None, tunnel: dict[str, Any],
                           layer: str, alpha: float, cmap: str | None, visual: str, sign: str,
                           rows: int) -> Figure:
    import torch

    from heatlens.api import explain as explain_inputs
    from heatlens.loading.images import load_image
    from heatlens.pictures.overlays import figure_grid

    pictures = [load_image(path) for path in paths]
    loaded = spec.load()
    click.echo(f"model: {loaded.name}")
    inputs, displays = loaded.preset(pictures)
    inputs = inputs.to(spec.device)
    with torch.no_grad():  # the output's shape, to check labels and classes before the work
        scores = _class_scores(loaded.model(inputs))
    _check_labels(loaded.labels, scores)
    targets = _targets(scores, class_idx, top_k, loaded.labels)
    results = [
        explain_inputs(loaded.model, inputs, method=name, target=target, layer=layer, **tunnel)
        for name in names
        for target in targets
    ]
    panels, titles, shown_signs = [], [], set()
    for index, path in enumerate(paths):
        for result in results:
            panel, shown = _panel(result, index, displays[index], visual, sign, alpha, cmap)
            panels.append(panel)
            shown_signs.add(shown)
            title = result.title(index, loaded.labels)
            titles.append(f"{path.name} | {title}" if len(paths) > 1 else title)
            click.echo(f"{path.name}: {title} (layer {', '.join(result.layers)})")
    figure = figure_grid(panels, titles, rows=rows)
    if cmap is None and visual in ("auto", "heat_map", "blended_heat_map"):
        _add_legend(figure, shown_signs)
    return figure


def _task_figure(task: str, paths: list[Path], spec: ModelSpec, names: list[str],
                 class_idx: str | None, score_threshold: float, layer: str, alpha: float,
                 cmap: str, rows: int) -> Figure:
    """``explain --task segmentation | detection``: one panel per image and method, each image
    explained on its own (see :mod:`heatlens.cli.tasks`)."""
    from heatlens.cli.tasks import load_task_model, task_panels
    from heatlens.loading.images import load_image
    from heatlens.pictures.overlays import figure_grid

    pictures = [load_image(path) for path in paths]
    loaded = load_task_model(task, spec)
    click.echo(f"model: {loaded.name}")
    index = None if class_idx is None else _class_index(class_idx, loaded.labels)
    panels, titles = [], []
    for path, picture in zip(paths, pictures, strict=True):
        for panel in task_panels(task, loaded, picture, names, class_idx=index,
                                 score_threshold=score_threshold, layer=layer, alpha=alpha,
                                 cmap=cmap, device=spec.device):
            panels.append(panel.picture)
            titles.append(f"{path.name} | {panel.title}" if len(paths) > 1 else panel.title)
            click.echo(f"{path.name}: {panel.title} (layer {', '.join(panel.result.layers)})")
    return figure_grid(panels, titles, rows=rows)


def _panel(result: Explanation, index: int, display: Any, visual: str, sign: str, alpha: float,
           cmap: str | None) -> tuple[Any, str | None]:
    """Panel ``index`` of ``result`` over ``display``, and the sign it shows (``None`` for a CAM
    overlay). Attribution methods, and CAM methods with a --visual, get a picture of
    :mod:`heatlens.pictures.attribution`: of the signed attribution, or of the CAM map."""
    from heatlens.pictures.attribution import attribution_image, auto_sign

    attributions = result.attributions
    if visual == "auto" and attributions is None:
        return result.overlay(display, index, alpha, cmap or "jet"), None
    values = attributions[index] if attributions is not None else result.maps[index]
    method = "blended_heat_map" if visual == "auto" else visual
    if sign == "auto":
        sign = "absolute_value" if method in _UNSIGNED_VISUALS else auto_sign(values)
    picture = attribution_image(values, display, method=method, sign=sign, cmap=cmap,
                                alpha_overlay=alpha)
    return picture, sign


def _add_legend(figure: Figure, signs: set[str | None]) -> None:
    """A line under the grid saying what the colours of its signed pictures mean."""
    lines = [_SIGN_LEGENDS[sign] for sign in ("all", "positive", "negative", "absolute_value")
             if sign in signs]
    if lines:
        figure.supxlabel("; ".join(lines), fontsize="medium")


def method_names(methods: str) -> list[str]:
    """Canonical names of the comma-separated ``methods``, without repeats (no import of the
    methods themselves, see :mod:`heatlens.methods.registry`)."""
    from heatlens.methods.registry import canonical_name

    requested = [name.strip() for name in methods.split(",") if name.strip()]
    if not requested:
        raise ValueError(f"--method {methods!r} names no method; see `heatlens methods`")
    return list(dict.fromkeys(canonical_name(name) for name in requested))


def _check_tunnelled(names: list[str]) -> None:
    from heatlens.methods.registry import method_class
    from heatlens.methods.tunnel import check_tunnelled

    for name in names:
        check_tunnelled(method_class(name))


def _class_scores(output: Any) -> torch.Tensor:
    from heatlens.engine.targets import primary_output

    return primary_output(output)


def _class_index(class_idx: str, labels: list[str] | None) -> int:
    """``--class-idx``: an index, or a label name looked up in the model's labels."""
    from heatlens.engine.targets import class_of_names

    text = class_idx.strip()
    if text.lstrip("-").isdigit():
        return int(text)
    index = class_of_names(text, labels)
    assert isinstance(index, int)
    return index


def _targets(scores: torch.Tensor, class_idx: str | None, top_k: int | None,
             labels: list[str] | None) -> list[TargetSpec]:
    """One target per panel group: the given class, the top ``k`` classes, or the prediction."""
    if top_k is None:
        return [None if class_idx is None else _class_index(class_idx, labels)]
    if scores.ndim != 2 or top_k > scores.shape[1]:
        raise ValueError(
            f"--top-k {top_k} needs a model with at least {top_k} class scores per image; this "
            f"model returns shape {tuple(scores.shape)}"
        )
    ranked = scores.topk(top_k, dim=1).indices
    return [ranked[:, rank] for rank in range(top_k)]


def _check_labels(labels: list[str] | None, scores: torch.Tensor) -> None:
    """A labels list must name every class of the model's ``(B, num_classes)`` output."""
    if labels is None or scores.ndim != 2:
        return
    if len(labels) != scores.shape[1]:
        raise ValueError(
            f"got {len(labels)} labels for a model with {scores.shape[1]} classes; give one "
            "label per class, in class-index order"
        )
