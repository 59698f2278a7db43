"""``heatlens.explain_dataset``: explain every image of a folder, a list or a Dataset into a run
folder that survives interruption and answers queries (see :mod:`heatlens.datasets.store`).

The work of a batch (:class:`~heatlens.datasets.compute.Explaining`) is the same for both
engines: ``"local"`` decodes in DataLoader workers while the model runs in this process;
``"ray"`` (:mod:`heatlens.datasets.on_ray`) decodes in Ray tasks and explains in a pool of
actors, each holding the model, while this process writes what comes back.
"""

from __future__ import annotations

import hashlib
import io
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from heatlens import __version__
from heatlens.datasets.compute import BatchResult, Explaining
from heatlens.datasets.reading import Loaded, Reader, batches
from heatlens.datasets.results import Run, load_run
from heatlens.datasets.sources import Item, Source, SourceLike, open_source, shard
from heatlens.datasets.store import RunFolder, atomic_write
from heatlens.engine.entry import model_device, model_to_explain
from heatlens.loading.images import DEFAULT_MAX_PIXELS
from heatlens.loading.presets import IMAGENET, Preset
from heatlens.methods.registry import canonical_name
from heatlens.metrics.evaluate import metric_names, needs_extra

ENGINES = ("local", "ray")
CHUNK_IMAGES = 256
"""Images per chunk file: what a killed run can lose at most."""
CHUNK_SECONDS = 60.0
"""A chunk is also written once this long has passed since the last (slow methods, metrics)."""


def explain_dataset(model: nn.Module, source: SourceLike, out: str | Path,
                    methods: str | Sequence[str] = ("gradcam",), *, preset: Preset = IMAGENET,
                    labels: Sequence[str] | None = None, target: str | int = "predicted",
                    layer: Any = "auto", metrics: Sequence[str] = (), batch_size: int = 32,
                    workers: int = 2, overlays: bool = False,
                    shard_of: tuple[int, int] | None = None, engine: str = "local",
                    ray_address: str | None = None, seed: int = 0,
                    max_pixels: int = DEFAULT_MAX_PIXELS, chunk_images: int = CHUNK_IMAGES,
                    show_progress: bool | None = None, model_name: str = "") -> Run:
    """Explain every image of ``source`` with each of ``methods`` into the run folder ``out``.

    Running it again with the same settings finishes what is missing: images the run holds
    (same path, same content hash) for every method are skipped. New methods may be added to
    a run; other changed settings are refused (give a new ``out``).

    Args:
        model: a classifier returning ``(B, classes)`` scores, on its device; it is left as it
            was.
        source: a folder (recursive; class sub-folders give labels), a ``.csv``/``.txt`` list
            of paths with optional labels, or a torch ``Dataset`` of images or
            ``(image, label)`` (see :mod:`heatlens.datasets.sources`).
        out: the run folder (created; an existing run is resumed).
        methods: method names (:func:`heatlens.list_methods`), or one comma-separated string.
        preset: the preprocessing of PIL images (a Dataset's tensors are used as they are).
        labels: class names by index: the ``*_name`` columns, and class-named folders.
        target: ``"predicted"`` (the top class), ``"label"`` (the source's label) or a class
            index.
        layer: the layer to explain (``"auto"``: each method's choice).
        metrics: evaluation metrics scored per map (``"deletion"``, ``"insertion"``, ...),
            a column each.
        batch_size: images per forward pass.
        workers: DataLoader processes decoding images (0: none).
        overlays: also write PNG overlays into ``out/overlays/``, mirroring the source.
        shard_of: ``(K, N)``: only the K-th of N parts of the images (by a hash of the name).
        engine: ``"local"`` or ``"ray"`` (needs ``heatlens[ray]``).
        ray_address: a Ray cluster to join; ``None`` starts a local Ray.
        seed: the metrics' seed.
        max_pixels: larger images are listed in ``errors.csv`` (decompression bombs).
        chunk_images: images per chunk file (a chunk is also written every minute).
        show_progress: a progress bar (``None``: when standard error is a terminal).
        model_name: how ``run.json`` names the model.

    Returns:
        The run (:func:`heatlens.load_run`).
    """
    plan = _plan(model, source, out, methods, preset, labels, target, layer, metrics,
                 batch_size, workers, shard_of, engine, seed, max_pixels, chunk_images,
                 model_name)
    plan.folder.start()
    done = plan.folder.done(plan.methods)
    if engine == "ray":
        from heatlens.datasets.on_ray import results_on_ray

        results = results_on_ray(plan, done, ray_address, overlays)
    else:
        results = _results_here(plan, done, overlays)
    _write_all(plan, results, overlays, show_progress)
    run = load_run(plan.folder.folder)
    from heatlens.datasets.summary import write_summary

    write_summary(run, plan.folder.folder / "summary.png")
    return run


@dataclass
class Plan:
    """Everything a run needs, checked before any image is read."""

    model: nn.Module
    source: Source
    items: list[Item]
    folder: RunFolder
    methods: list[str]
    preset: Preset
    labels: list[str] | None
    target: str | int
    layer: Any
    metrics: list[str]
    batch_size: int
    workers: int
    seed: int
    max_pixels: int
    chunk_images: int
    settings: dict[str, Any] = field(default_factory=dict)

    def explaining(self) -> Explaining:
        """The batch work, with one explainer per method for the whole run."""
        return Explaining(self.model, self.methods, self.layer, self.metrics, self.seed,
                          self.labels)

    def reader(self, done: dict[str, str], displays: bool) -> Reader:
        return Reader(self.source, self.items, self.preset, done, self.max_pixels, displays)

    def targets(self, loaded: Sequence[Loaded], device: torch.device) -> Tensor | int | None:
        """What to explain for a batch: ``None`` (the prediction), a class, or each label."""
        if self.target == "predicted":
            return None
        if self.target != "label":
            return int(self.target)
        found = [self.source.class_index(item.label, self.labels, strict=True)
                 for item in loaded]
        return torch.tensor(found, device=device)


def _plan(model: nn.Module, source: SourceLike, out: str | Path,
          methods: str | Sequence[str], preset: Preset, labels: Sequence[str] | None,
          target: str | int, layer: Any, metrics: Sequence[str], batch_size: int,
          workers: int, shard_of: tuple[int, int] | None, engine: str, seed: int,
          max_pixels: int, chunk_images: int, model_name: str) -> Plan:
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; use one of {', '.join(ENGINES)}")
    if engine == "ray":
        needs_extra("ray", "the Ray engine", extra="ray")
    for name, value, least in (("batch_size", batch_size, 1), ("workers", workers, 0),
                               ("chunk_images", chunk_images, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ValueError(f"{name} must be an int of at least {least}, got {value!r}")
    names = [canonical_name(m.strip()) for m in (
        methods.split(",") if isinstance(methods, str) else methods) if m.strip()]
    if not names:
        raise ValueError("give at least one method, for example methods=('gradcam',)")
    chosen_metrics = metric_names(list(metrics)) if metrics else []
    target = _checked_target(target)
    model = model_to_explain(model)
    found = open_source(source)
    items = list(found.items) if shard_of is None else shard(found.items, *shard_of)
    if target == "label" and found.dataset is None:
        for item in items:
            if item.label is None:
                raise ValueError(f"--target label: {item.name} has no label; put the images in "
                                 "class folders or give a label column in the list")
            found.class_index(item.label, labels, strict=True)
    fingerprint = model_fingerprint(model)
    settings = {
        "heatlens_version": __version__, "model": model_name or type(model).__name__,
        "model_fingerprint": fingerprint, "preset": _preset_settings(preset),
        "target": target, "layer": str(layer), "metrics": chosen_metrics, "seed": seed,
        "methods": names, "source": found.description, "max_pixels": max_pixels,
        "shard": None if shard_of is None else f"{shard_of[0]}/{shard_of[1]}",
    }
    folder = RunFolder(Path(out), settings)
    return Plan(model, found, items, folder, names, preset,
                None if labels is None else list(labels), target, layer, chosen_metrics,
                batch_size, workers, seed, max_pixels, chunk_images, folder.settings)


def _checked_target(target: str | int) -> str | int:
    if isinstance(target, bool):
        raise ValueError(f"target must be 'predicted', 'label' or a class index, got {target!r}")
    if isinstance(target, int | np.integer):
        return int(target)
    text = str(target).strip()
    if text.lstrip("-").isdigit():
        return int(text)
    if text not in ("predicted", "label"):
        raise ValueError(f"target must be 'predicted', 'label' or a class index, got {target!r}")
    return text


def _preset_settings(preset: Preset) -> dict[str, Any]:
    return {"resize": preset.resize, "crop": preset.crop, "mean": list(preset.mean),
            "std": list(preset.std), "interpolation": preset.interpolation}


def model_fingerprint(model: nn.Module) -> str:
    """A SHA-256 of the model's class, and its parameters' and buffers' names, shapes, types
    and values: the same model gives the same fingerprint, in any process."""
    digest = hashlib.sha256(type(model).__qualname__.encode())
    for name, tensor in model.state_dict().items():
        if not isinstance(tensor, Tensor):
            continue
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy())
    return digest.hexdigest()[:16]


@dataclass
class Explained:
    """What an engine hands back for one batch: the images read (and skipped or unusable) and,
    for those usable, their results."""

    loaded: list[Loaded]
    result: BatchResult | None


def _results_here(plan: Plan, done: dict[str, str], overlays: bool) -> Iterator[Explained]:
    """The local engine: DataLoader workers decode, this process explains."""
    explaining = plan.explaining()
    device = model_device(plan.model)
    for loaded in batches(plan.reader(done, overlays), plan.batch_size, plan.workers):
        usable = [entry for entry in loaded if entry.tensor is not None]
        if not usable:
            yield Explained(loaded, None)
            continue
        inputs = torch.stack([entry.tensor for entry in usable]).to(device)
        yield Explained(loaded, explaining(inputs, plan.targets(usable, device)))


def _write_all(plan: Plan, results: Iterable[Explained], overlays: bool,
               show_progress: bool | None) -> None:
    """Write the engine's results in chunks, with a progress bar. On an interruption (Ctrl-C,
    an error) the batches taken whole are written before it goes on; a batch caught halfway
    is dropped, and done again by the next run."""
    from tqdm.auto import tqdm

    show = sys.stderr.isatty() if show_progress is None else show_progress
    pending = Pending(plan)
    bar = tqdm(total=len(plan.items), desc="explain", unit="img", disable=not show,
               dynamic_ncols=True)
    try:
        with bar:
            for explained in results:
                pending.add(explained, overlays)
                bar.update(len(explained.loaded))
                bar.set_postfix(errors=len(pending.errors_seen), refresh=False)
                if pending.images >= plan.chunk_images or pending.age() >= CHUNK_SECONDS:
                    pending.flush()
    finally:
        pending.flush()
        plan.folder.gather()


class Pending:
    """Results waiting to be written as one chunk."""

    def __init__(self, plan: Plan) -> None:
        self.plan, self.images = plan, 0
        self.rows: list[dict[str, Any]] = []
        self.maps: dict[str, list[Tensor]] = {}
        self.errors: list[dict[str, str]] = []
        self.errors_seen: set[str] = set()
        self.taken: tuple[int, int, dict[str, int]] = (0, 0, {})
        self.whole = True
        self.since = time.monotonic()

    def age(self) -> float:
        """Seconds since the last chunk was written."""
        return time.monotonic() - self.since

    def add(self, explained: Explained, overlays: bool) -> None:
        """Take one batch: rows completed with each image's file fields, maps, errors. Only
        once the whole batch is taken does it count (see :meth:`flush`)."""
        self.whole = False
        for entry in explained.loaded:
            if entry.error:
                self.errors.append({"path": entry.item.name, "kind": entry.kind,
                                    "reason": entry.error})
                self.errors_seen.add(entry.item.name)
        result = explained.result
        if result is not None:
            usable = [entry for entry in explained.loaded if entry.tensor is not None]
            for i, row in enumerate(result.rows):  # method by method, image by image
                self.rows.append(self._row(usable[i % len(usable)], row))
            for method, maps in result.maps.items():
                self.maps.setdefault(method, []).append(maps)
            if overlays:
                self._overlays(usable, result)
            self.images += len(usable)
        self.taken = (len(self.rows), len(self.errors), {m: len(v) for m, v in
                                                          self.maps.items()})
        self.whole = True

    def _row(self, entry: Loaded, row: dict[str, Any]) -> dict[str, Any]:
        settings = self.plan.settings
        label = self.plan.source.class_index(entry.label, self.plan.labels)
        return {
            "path": entry.item.name, "sha256": entry.sha256, "width": entry.width,
            "height": entry.height, "label": label, "label_name": self._label_name(entry, label),
            **row,
            "correct": None if label is None else row["predicted"] == label,
            "seed": self.plan.seed, "heatlens_version": settings["heatlens_version"],
            "model_fingerprint": settings["model_fingerprint"],
        }

    def _label_name(self, entry: Loaded, label: int | None) -> str | None:
        """The label as the source wrote it, or the model's name for an index."""
        names = self.plan.labels
        if entry.label is None or not entry.label.strip().lstrip("-").isdigit():
            return entry.label
        return names[label] if names and label is not None and 0 <= label < len(names) else None

    def _overlays(self, usable: list[Loaded], result: BatchResult) -> None:
        from PIL import Image

        for method, e in result.explanations.items():
            for i, entry in enumerate(usable):
                if entry.display is None:
                    continue
                picture = e.overlay(Image.fromarray(entry.display), i)
                name = Path(entry.item.name)
                target = (self.plan.folder.folder / "overlays" / name.parent
                          / f"{name.stem}.{method}.png")
                buffer = io.BytesIO()
                picture.save(buffer, format="PNG")
                atomic_write(target, buffer.getvalue())

    def flush(self) -> None:
        """Write the batches taken whole as one chunk (nothing when there are none); what a
        batch interrupted while being taken left behind is dropped."""
        rows, errors, maps = self.taken
        if not self.whole:
            self.rows, self.errors = self.rows[:rows], self.errors[:errors]
            self.maps = {m: v[:maps[m]] for m, v in self.maps.items() if m in maps}
        if self.rows or self.errors:
            arrays = {m: torch.cat(v).cpu().numpy() for m, v in self.maps.items()}
            self.plan.folder.write(self.rows, arrays, self.errors)
        self.rows, self.maps, self.errors, self.images = [], {}, [], 0
        self.taken, self.whole, self.since = (0, 0, {}), True, time.monotonic()
