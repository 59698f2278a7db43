"""The ``heatlens`` command: explain images with class activation maps, list methods and layers.

``heatlens explain`` with no arguments explains the packaged sample photo with the default model
(EfficientNet-Lite0, ImageNet), offline. Bad input (a missing or unreadable file, an unknown
architecture or method, a class out of range, ...) ends with a one-line ``Error: ...`` message and
exit code 1 instead of a traceback; anything else, a bug, keeps its traceback.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import itertools
import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click
import numpy as np
import torch
from matplotlib.figure import Figure

from heatlens import __version__
from heatlens.api import explain as explain_inputs
from heatlens.cli.tasks import TASKS, load_task_model, task_panels
from heatlens.concepts.factorize import factorize
from heatlens.engine.layers import auto_layer, candidate_layers
from heatlens.engine.targets import TargetSpec, primary_output
from heatlens.explanation import Explanation
from heatlens.loading.images import load_image, sample_image_path
from heatlens.loading.models import DEFAULT_ARCH, LoadedModel, load_labels, load_model
from heatlens.methods import list_methods, method_class
from heatlens.methods.attribution import AttributionExplainer
from heatlens.pictures.attribution import attribution_image, auto_sign
from heatlens.pictures.overlays import figure_grid, save_figure


@contextmanager
def _reported() -> Iterator[None]:
    """Turn the errors that bad input raises into a one-line ``Error: ...`` and exit code 1."""
    try:
        yield
    except (OSError, ValueError, TypeError, RuntimeError) as exc:
        raise click.ClickException(" ".join(str(exc).split()) or type(exc).__name__) from exc


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """The model options of a command, loaded on demand with :meth:`load`."""

    arch: str | None
    checkpoint: Path | None
    weights: str | None
    num_classes: int | None
    labels: Path | None
    trust_pickle: bool
    device: str

    def load(self) -> LoadedModel:
        """Load the labels file (if any) and the model; the labels file replaces the model's."""
        labels = None if self.labels is None else load_labels(self.labels)
        loaded = load_model(
            self.arch,
            weights=self.weights,
            checkpoint=self.checkpoint,
            num_classes=self.num_classes,
            trust_pickle=self.trust_pickle,
            device=self.device,
        )
        return loaded if labels is None else dataclasses.replace(loaded, labels=labels)


_MODEL_OPTIONS = (
    click.option("--arch", metavar="NAME", default=None,
                 help=f"Architecture: {DEFAULT_ARCH} (the default), a torchvision or timm name."),
    click.option("--model", "checkpoint", type=click.Path(path_type=Path), default=None,
                 metavar="FILE",
                 help="Your own model file: a state dict (with --arch, --num-classes) or a "
                      "pickled model (with --trust-pickle)."),
    click.option("--weights", metavar="FILE|NAME", default=None,
                 help="A state-dict file for --arch, or DEFAULT / a torchvision weights name "
                      "(downloads)."),
    click.option("--num-classes", type=click.IntRange(min=1), default=None,
                 help="Number of classes of a fine-tuned head."),
    click.option("--labels", type=click.Path(path_type=Path), default=None, metavar="FILE",
                 help="Class names: one per line, or JSON."),
    click.option("--trust-pickle", is_flag=True,
                 help="Allow a pickled whole model in --model. Unpickling can run arbitrary "
                      "code: only for files you trust."),
    click.option("--device", default="cpu", show_default=True, help="cpu or cuda."),
)


def _model_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """Add the model options to a command, which receives them as ``spec: ModelSpec``."""

    @functools.wraps(command)
    def wrapper(*args: Any, arch: str | None, checkpoint: Path | None, weights: str | None,
                num_classes: int | None, labels: Path | None, trust_pickle: bool, device: str,
                **kwargs: Any) -> Any:
        spec = ModelSpec(arch, checkpoint, weights, num_classes, labels, trust_pickle, device)
        return command(*args, spec=spec, **kwargs)

    for option in reversed(_MODEL_OPTIONS):
        wrapper = option(wrapper)
    return wrapper


VISUALS = ("auto", "heat_map", "blended_heat_map", "masked_image", "alpha_scaling")
"""The --visual choices: pictures of :mod:`heatlens.pictures.attribution`, or ``auto``."""

PICTURE_SIGNS = ("auto", "all", "positive", "negative", "absolute_value")
"""The --sign choices."""

_UNSIGNED_VISUALS = ("masked_image", "alpha_scaling")

_SIGN_LEGENDS = {
    "all": "red: negative, white: zero, green: positive attribution",
    "positive": "green: positive attribution",
    "negative": "red: negative attribution",
    "absolute_value": "blue: attribution magnitude",
}


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="heatlens")
def main() -> None:
    """Why did the vision model say that? Class activation maps for image classifiers."""


@main.command()
@click.argument("images", nargs=-1, type=click.Path(path_type=Path))
@_model_options
@click.option("--method", "methods", default="gradcam", show_default=True, metavar="A,B,...",
              help="Method(s), comma-separated (see `heatlens methods`).")
@click.option("--class-idx", type=int, default=None,
              help="Explain this class instead of the predicted one.")
@click.option("--top-k", type=click.IntRange(min=1), default=None,
              help="Explain each of the K most likely classes.")
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
@click.option("--rows", type=click.IntRange(min=1), default=1, show_default=True,
              help="Rows of the figure grid.")
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Figure to write (overwritten) [default: heatlens_<image>[_<method>].png, "
                   "never overwriting].")
@click.option("--show", is_flag=True, help="Also open the figure in a window.")
def explain(images: tuple[Path, ...], spec: ModelSpec, methods: str, class_idx: int | None,
            top_k: int | None, task: str, score_threshold: float, layer: str, alpha: float,
            cmap: str | None, visual: str, sign: str, rows: int, out: Path | None,
            show: bool) -> None:
    """Explain IMAGE(s) (default: a sample photo) and write a figure.

    CAM methods are drawn as a heatmap over the image; attribution methods (saliency, input x
    gradient, integrated gradients, occlusion, ...) as a signed picture, positive evidence green
    and negative red over the image in grey (see --visual and --sign). Several images, methods or
    --top-k classes make one grid, a panel each, titled "<method> | <label> | <probability>".
    """
    if class_idx is not None and top_k is not None:
        raise click.UsageError("use either --class-idx or --top-k, not both")
    if sign == "all" and visual in _UNSIGNED_VISUALS:
        raise click.UsageError(f"--visual {visual} cannot show both signs; use --sign positive, "
                               "negative or absolute_value")
    if out is not None and not out.parent.is_dir():  # fail before the work, not after it
        raise click.ClickException(f"cannot write {out}: the directory {out.parent} does not exist")
    if task != "classification":
        if top_k is not None or visual != "auto" or sign != "auto":
            raise click.UsageError(f"--top-k, --visual and --sign do not apply to --task {task}")
        _explain_task(task, images, spec, methods, class_idx, score_threshold, layer, alpha,
                      cmap or "jet", rows, out, show)
        return
    with _reported():
        names = _method_names(methods)
        paths = list(images) or [sample_image_path()]
        pictures = [load_image(path) for path in paths]
        loaded = spec.load()
        click.echo(f"model: {loaded.name}")
        inputs, displays = loaded.preset(pictures)
        inputs = inputs.to(spec.device)
        targets = _targets(loaded.model, inputs, class_idx, top_k)
        results = [
            explain_inputs(loaded.model, inputs, method=name, target=target, layer=layer)
            for name in names
            for target in targets
        ]
        _check_labels(loaded.labels, results[0])
        panels, titles, shown_signs = [], [], set()
        for index, path in enumerate(paths):
            for result in results:
                panel, shown = _panel(result, index, displays[index], visual, sign, alpha, cmap)
                panels.append(panel)
                shown_signs.add(shown)
                titles.append(result.title(index, loaded.labels))
                click.echo(f"{path.name}: {titles[-1]} (layer {', '.join(result.layers)})")
        figure = figure_grid(panels, titles, rows=rows)
        if cmap is None and visual in ("auto", "heat_map", "blended_heat_map"):
            _add_legend(figure, shown_signs)
        written = save_figure(figure, out) if out is not None else _save_new(
            figure, _default_name(paths, names)
        )
    click.echo(f"wrote {written}")
    if show:
        _show(figure)


def _explain_task(task: str, images: tuple[Path, ...], spec: ModelSpec, methods: str,
                  class_idx: int | None, score_threshold: float, layer: str, alpha: float,
                  cmap: str, rows: int, out: Path | None, show: bool) -> None:
    """``explain --task segmentation | detection``: one panel per image and method, each image
    explained on its own (see :mod:`heatlens.tasks`)."""
    with _reported():
        names = _method_names(methods)
        paths = list(images) or [sample_image_path()]
        loaded = load_task_model(task, spec)
        click.echo(f"model: {loaded.name}")
        panels, titles = [], []
        for path in paths:
            for panel in task_panels(task, loaded, load_image(path), names, class_idx=class_idx,
                                     score_threshold=score_threshold, layer=layer, alpha=alpha,
                                     cmap=cmap, device=spec.device):
                panels.append(panel.picture)
                titles.append(panel.title)
                click.echo(f"{path.name}: {panel.title} (layer {', '.join(panel.result.layers)})")
        figure = figure_grid(panels, titles, rows=rows)
        written = save_figure(figure, out) if out is not None else _save_new(
            figure, _default_name(paths, names)
        )
    click.echo(f"wrote {written}")
    if show:
        _show(figure)


def _panel(result: Explanation, index: int, display: Any, visual: str, sign: str, alpha: float,
           cmap: str | None) -> tuple[Any, str | None]:
    """Panel ``index`` of ``result`` over ``display``, and the sign it shows (``None`` for a CAM
    overlay). Attribution methods, and CAM methods with a --visual, get a picture of
    :mod:`heatlens.pictures.attribution`: of the signed attribution, or of the CAM map."""
    attribution = issubclass(method_class(result.method), AttributionExplainer)
    if visual == "auto" and not attribution:
        return result.overlay(display, index, alpha, cmap or "jet"), None
    values = result.raw_by_layer["input"][index] if attribution else result.maps[index]
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


def _method_names(methods: str) -> list[str]:
    """Canonical names of the comma-separated ``methods``, without repeats."""
    requested = [name.strip() for name in methods.split(",") if name.strip()]
    if not requested:
        raise ValueError(f"--method {methods!r} names no method; see `heatlens methods`")
    return list(dict.fromkeys(method_class(name).name for name in requested))


def _targets(model: torch.nn.Module, inputs: torch.Tensor, class_idx: int | None,
             top_k: int | None) -> list[TargetSpec]:
    """One target per panel group: the given class, the top ``k`` classes, or the prediction."""
    if top_k is None:
        return [class_idx]
    with torch.no_grad():
        scores = primary_output(model(inputs))
    if scores.ndim != 2 or top_k > scores.shape[1]:
        raise ValueError(
            f"--top-k {top_k} needs a model with at least {top_k} class scores per image; this "
            f"model returns shape {tuple(scores.shape)}"
        )
    ranked = scores.topk(top_k, dim=1).indices
    return [ranked[:, rank] for rank in range(top_k)]


def _check_labels(labels: Sequence[str] | None, result: Explanation) -> None:
    """A labels list must name every class of the model's ``(B, num_classes)`` output."""
    output = result.output
    if labels is None or output is None or output.ndim != 2:
        return
    if len(labels) != output.shape[1]:
        raise ValueError(
            f"got {len(labels)} labels for a model with {output.shape[1]} classes; give one "
            "label per class, in class-index order"
        )


def _default_name(paths: Sequence[Path], methods: Sequence[str]) -> str:
    """``heatlens_<image stem>[_<method>].png``: the method only when there is one."""
    stem = paths[0].stem if len(paths) == 1 else f"{paths[0].stem}_and_{len(paths) - 1}_more"
    suffix = f"_{methods[0]}" if len(methods) == 1 else ""
    return f"heatlens_{stem}{suffix}.png"


def _save_new(figure: Figure, name: str) -> Path:
    """Save under ``name`` in the current directory, or ``-1``, ``-2``... appended to its stem
    when taken. The name is claimed by creating the file exclusively, so nothing is overwritten,
    even by another heatlens run at the same moment."""
    base = Path(name)
    candidates = itertools.chain(
        [base], (base.with_name(f"{base.stem}-{n}{base.suffix}") for n in itertools.count(1))
    )
    path = next(candidate for candidate in candidates if _created(candidate))
    try:
        return save_figure(figure, path)
    except BaseException:
        path.unlink(missing_ok=True)
        raise


def _created(path: Path) -> bool:
    """Create an empty file at ``path`` unless something is there; whether it was created."""
    try:
        path.open("x").close()
    except FileExistsError:
        return False
    return True


def _show(figure: Figure) -> None:
    """Open the figure in a matplotlib window (blocks until it is closed)."""
    import matplotlib.pyplot as plt
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    window = plt.figure("heatlens", figsize=figure.get_size_inches())
    axes = window.add_axes((0, 0, 1, 1))
    axes.imshow(np.asarray(canvas.buffer_rgba()))
    axes.set_axis_off()
    plt.show()


@main.command("concepts")
@click.argument("images", nargs=-1, type=click.Path(path_type=Path))
@_model_options
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
@click.option("--rows", type=click.IntRange(min=1), default=1, show_default=True,
              help="Rows of the figure grid.")
@click.option("-o", "--out", "--savefig", "out", type=click.Path(path_type=Path), default=None,
              help="Figure to write; never overwritten: -1, -2, ... is appended when the name is "
                   "taken [default: heatlens_<image>_concepts.png].")
@click.option("--show", is_flag=True, help="Also open the figure in a window.")
def concepts_command(images: tuple[Path, ...], spec: ModelSpec, n_components: int, top_k: int,
                     layer: str, seed: int, image_weight: float, cmap: str, rows: int,
                     out: Path | None, show: bool) -> None:
    """Find concepts in IMAGE(s) (default: a sample photo) with Deep Feature Factorization.

    The layer's activations over all images are factorized into --n-components concepts
    (Collins et al., ECCV 2018); each is named by the model's classifier. The figure colours
    each pixel by its strongest concept, with a legend of each concept's top classes.
    """
    if out is not None and not out.parent.is_dir():  # fail before the work, not after it
        raise click.ClickException(f"cannot write {out}: the directory {out.parent} does not exist")
    with _reported():
        paths = list(images) or [sample_image_path()]
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
        figure = found.figure(displays, labels=loaded.labels, titles=[p.name for p in paths],
                              image_weight=image_weight, cmap=cmap, rows=rows)
        written = _save_new(figure, str(out or _default_name(paths, ["concepts"])))
    click.echo(f"wrote {written}")
    if show:
        _show(figure)


@main.command("methods")
def methods_command() -> None:
    """List the explanation methods: name, aliases and what each computes."""
    rows = []
    for name in list_methods():
        cls = method_class(name)
        aliases = f" ({', '.join(cls.aliases)})" if cls.aliases else ""
        summary = (inspect.getdoc(cls) or "").split("\n\n")[0]
        plain = re.sub(r":\w+:`([^`]*)`", r"\1", summary).replace("``", "")
        rows.append((name + aliases, " ".join(plain.split())))
    width = max(len(left) for left, _ in rows)
    for left, summary in rows:
        click.echo(f"{left:<{width}}  {summary}")


@main.command("layers")
@_model_options
@click.option("--size", type=click.IntRange(min=1), default=None,
              help="Side of the square probe input [default: the model's input size].")
def layers_command(spec: ModelSpec, size: int | None) -> None:
    """List the layers that output spatial feature maps, marking the automatic choice (*)."""
    with _reported():
        loaded = spec.load()
        side = size or loaded.preset.crop
        probe = torch.zeros(1, 3, side, side, device=spec.device)
        candidates = candidate_layers(loaded.model, probe)
        chosen, reason = auto_layer(loaded.model, probe)
    click.echo(f"model: {loaded.name}, input (1, 3, {side}, {side})")
    table = [("", "LAYER", "TYPE", "OUTPUT")] + [
        ("*" if c.name == chosen else "" if c.output_depends else "-", c.name, c.module_type,
         str(c.shape))
        for c in candidates
    ]
    widths = [max(len(row[column]) for row in table) for column in range(3)]
    for *cells, shape in table:
        click.echo("  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + "  " + shape)
    click.echo(f"* automatic choice: {reason}")
    if not all(c.output_depends for c in candidates):
        click.echo("- the model's output does not depend on this layer")
