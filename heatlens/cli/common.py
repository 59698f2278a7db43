"""What the ``heatlens`` commands share: the model options, one-line errors, and one skeleton for
the commands that draw a figure, with one rule for ``--out``.

The rule for ``--out``, the same for every command:

* no ``--out``: a name made from the images and methods, in the current directory; an existing
  file is never overwritten (``-1``, ``-2``, ... is appended to the new file's name);
* ``--out`` an existing directory: that name, inside the directory, never overwriting;
* ``--out FILE``: exactly that file, replaced if it exists (the user named it). Its directory
  must exist and its suffix must be a format matplotlib writes (none: ``.png``).

Both ``--out`` and ``--rows`` are checked before any model is loaded or run.

Only click and the standard library are imported here, so that ``heatlens --help`` starts
fast; each command imports what its work needs when it runs.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from heatlens.loading.models import LoadedModel


@contextmanager
def reported() -> Iterator[None]:
    """Turn the errors that bad input raises into a one-line ``Error: ...`` and exit code 1."""
    try:
        yield
    except (OSError, ValueError, TypeError, RuntimeError, ImportError) as exc:
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
        from heatlens.loading.models import load_labels, load_model

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
                 help="Architecture: a torchvision or timm name [default: EfficientNet-Lite0 "
                      "trained on ImageNet, packaged]."),
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


def model_options(command: Callable[..., Any]) -> Callable[..., Any]:
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


def figure_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """``--rows``, ``--out`` and ``--show``, the options every figure command has."""
    for option in reversed((
        click.option("--rows", type=click.IntRange(min=1), default=1, show_default=True,
                     help="Rows of the figure grid."),
        click.option("-o", "--out", type=click.Path(path_type=Path), default=None,
                     help="Figure to write, replaced if it exists; a directory: the default "
                          "name inside it [default: heatlens_<image>[_<method>].png, never "
                          "overwriting]."),
        click.option("--show", is_flag=True, help="Also open the figure in a window."),
    )):
        command = option(command)
    return command


@dataclasses.dataclass(frozen=True)
class FigurePlan:
    """Where a figure command writes, decided before the work (see the module docstring)."""

    path: Path
    replace: bool


def start_figure(images: Sequence[Path], methods: Sequence[str], out: Path | None, rows: int,
                 panels_per_image: int) -> tuple[list[Path], FigurePlan]:
    """The images to explain (the packaged sample photo when none are given) and where the
    figure of their ``panels_per_image`` panels each goes, checked before the work."""
    from heatlens.loading.images import sample_image_path

    with reported():
        paths = list(images) or [sample_image_path()]
    name = default_name(paths, methods)
    return paths, plan_figure(out, name, rows, len(paths) * panels_per_image)


def plan_figure(out: Path | None, default_name: str, rows: int, panels: int) -> FigurePlan:
    """Check ``--out`` and ``--rows`` against the rule and the figure's ``panels``, before the
    work; a one-line error otherwise."""
    if rows > panels:
        raise click.UsageError(f"--rows {rows} is more than the {panels} panel"
                               f"{'s' if panels > 1 else ''} of the figure")
    if out is None:
        return FigurePlan(Path(default_name), replace=False)
    if out.is_dir():
        return FigurePlan(out / default_name, replace=False)
    if not out.parent.is_dir():
        raise click.ClickException(f"cannot write {out}: the directory {out.parent} does not "
                                   "exist")
    from matplotlib.backend_bases import FigureCanvasBase

    formats = FigureCanvasBase.get_supported_filetypes()
    if out.suffix and out.suffix[1:].lower() not in formats:
        raise click.ClickException(
            f"cannot write {out}: matplotlib does not write {out.suffix!r} files; use one of "
            f"{', '.join('.' + name for name in sorted(formats))}"
        )
    return FigurePlan(out, replace=True)


def make_figure(plan: FigurePlan, show: bool, work: Callable[[], Figure]) -> None:
    """The skeleton of a figure command: do the work (errors reported on one line), write the
    figure as planned, say where, and show it when asked."""
    from heatlens.pictures.overlays import save_figure

    with reported():
        figure = work()
        written = save_figure(figure, plan.path) if plan.replace else save_new(figure,
                                                                               plan.path)
    click.echo(f"wrote {written}")
    if show:
        show_figure(figure)


def default_name(paths: Sequence[Path], methods: Sequence[str]) -> str:
    """``heatlens_<image stem>[_<method>].png``: the method only when there is one."""
    stem = paths[0].stem if len(paths) == 1 else f"{paths[0].stem}_and_{len(paths) - 1}_more"
    suffix = f"_{methods[0]}" if len(methods) == 1 else ""
    return f"heatlens_{stem}{suffix}.png"


def save_new(figure: Figure, path: Path) -> Path:
    """Save at ``path``, or with ``-1``, ``-2``... appended to its stem when taken. The name is
    claimed by creating the file exclusively, so nothing is overwritten, even by another
    heatlens run at the same moment."""
    from heatlens.pictures.overlays import save_figure

    path = path.with_suffix(path.suffix or ".png")
    candidates = itertools.chain(
        [path], (path.with_name(f"{path.stem}-{n}{path.suffix}") for n in itertools.count(1))
    )
    claimed = next(candidate for candidate in candidates if _created(candidate))
    try:
        return save_figure(figure, claimed)
    except BaseException:
        claimed.unlink(missing_ok=True)
        raise


def _created(path: Path) -> bool:
    """Create an empty file at ``path`` unless something is there; whether it was created."""
    try:
        path.open("x").close()
    except FileExistsError:
        return False
    return True


def show_figure(figure: Figure) -> None:
    """Open the figure in a matplotlib window (blocks until it is closed)."""
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    window = plt.figure("heatlens", figsize=figure.get_size_inches())
    axes = window.add_axes((0, 0, 1, 1))
    axes.imshow(np.asarray(canvas.buffer_rgba()))
    axes.set_axis_off()
    plt.show()
