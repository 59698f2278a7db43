"""``heatlens explain --task segmentation | detection``: models, targets and panels per image.

Segmentation: the image goes through the model's preset; the region is the pixels the model
predicts as the class (``--class-idx``, default: the class it predicts at most pixels), held
fixed for every method (:class:`~heatlens.tasks.segmentation.ClassRegion` with that mask).

Detection: the image goes in as it is, ``(1, 3, H, W)`` in [0, 1] (torchvision's detectors
resize and normalise it themselves); the detections scoring at least ``--score-threshold``
(of label ``--class-idx`` when given) are explained together, their scores summed
(:class:`~heatlens.tasks.detection.BoxScore`), and drawn on the panel.

Images are explained one at a time, so that every method, perturbation methods included,
sees one image and its own region or boxes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
import torchvision
from PIL import Image
from torch import Tensor
from torchvision.transforms.v2 import functional as F

from heatlens.api import explain
from heatlens.explanation import Explanation
from heatlens.loading.models import LoadedModel, load_weights_file
from heatlens.loading.presets import IMAGENET, Preset
from heatlens.pictures.boxes import overlay_with_boxes
from heatlens.tasks.detection import BoxScore, detections_of
from heatlens.tasks.segmentation import ClassRegion, dense_scores

__all__ = ["Panel", "load_task_model", "task_panels"]

_FAMILIES = {"segmentation": torchvision.models.segmentation,
             "detection": torchvision.models.detection}


class ModelOptions(Protocol):
    """The model options of a command (``heatlens.cli.ModelSpec``)."""

    arch: str | None
    checkpoint: Path | None
    weights: str | None
    num_classes: int | None
    device: str

    def load(self) -> LoadedModel: ...


@dataclass(frozen=True)
class Panel:
    """One picture of the figure, its title, and the explanation it shows."""

    picture: Image.Image
    title: str
    result: Explanation


def load_task_model(task: str, spec: ModelOptions) -> LoadedModel:
    """The model for ``task``: a torchvision segmentation or detection model named by
    ``--arch`` (random init, a weights name such as ``DEFAULT``, which downloads, or a
    state-dict file as ``--weights``), else whatever ``spec.load()`` loads (``--model``)."""
    names = torchvision.models.list_models(module=_FAMILIES[task])
    if spec.checkpoint is not None or spec.arch not in names:
        if spec.checkpoint is None:
            raise ValueError(
                f"--task {task} needs a {task} model: a torchvision name ({', '.join(names)}) "
                "as --arch, or your own model file as --model"
            )
        return spec.load()
    arch = spec.arch
    head = {} if spec.num_classes is None else {"num_classes": spec.num_classes}
    known = list(torchvision.models.get_model_weights(arch).__members__)
    if spec.weights in known:
        enum = torchvision.models.get_model_weights(arch)[spec.weights]
        model = torchvision.models.get_model(arch, weights=enum, **head)
        name, labels = f"{arch} ({enum})", list(enum.meta["categories"])
        transforms = enum.transforms()
        side = getattr(transforms, "resize_size", None)  # segmentation: resize, no crop
        preset = IMAGENET if not side else Preset(side[0], side[0], tuple(transforms.mean),
                                                  tuple(transforms.std))
    else:
        model = torchvision.models.get_model(arch, weights=None, weights_backbone=None, **head)
        name, labels, preset = f"{arch} (random init)", None, IMAGENET
        if spec.weights is not None:
            path = Path(spec.weights)
            if not path.is_file():
                raise FileNotFoundError(
                    f"no weights file at {path}, and {spec.weights!r} is not a weights name of "
                    f"{arch} ({', '.join(known)})"
                )
            load_weights_file(model, path)
            name = f"{arch} ({path.name})"
    return LoadedModel(model.eval().to(spec.device), name, labels, preset)


def task_panels(task: str, loaded: LoadedModel, picture: Image.Image, methods: Sequence[str], *,
                class_idx: int | None, score_threshold: float, layer: str, alpha: float,
                cmap: str, device: str) -> list[Panel]:
    """One panel per method for ``picture``: the map over the image (boxes drawn for
    detection), titled with the method, class and score."""
    if task == "segmentation":
        return _segmentation_panels(loaded, picture, methods, class_idx, layer, alpha, cmap,
                                    device)
    if task == "detection":
        return _detection_panels(loaded, picture, methods, class_idx, score_threshold, layer,
                                 alpha, cmap, device)
    raise ValueError(f"task must be 'segmentation' or 'detection' here, not {task!r}")


def _each_method(methods: Sequence[str], run: Callable[[str], Explanation],
                 draw: Callable[[Explanation], Image.Image],
                 labels: Sequence[str] | None) -> list[Panel]:
    results = [run(method) for method in methods]
    return [Panel(draw(result), result.title(0, labels), result) for result in results]


def _segmentation_panels(loaded: LoadedModel, picture: Image.Image, methods: Sequence[str],
                         class_idx: int | None, layer: str, alpha: float, cmap: str,
                         device: str) -> list[Panel]:
    inputs, displays = loaded.preset(picture)
    inputs = inputs.to(device)
    with torch.no_grad():
        predicted = dense_scores(loaded.model(inputs)).argmax(dim=1)[0]
    if class_idx is None:
        class_idx = int(predicted.flatten().mode().values)
    target = ClassRegion(class_idx, predicted == class_idx)
    return _each_method(
        methods,
        lambda method: explain(loaded.model, inputs, method=method, target=target, layer=layer),
        lambda result: result.overlay(displays[0], 0, alpha, cmap),
        loaded.labels,
    )


def _detection_panels(loaded: LoadedModel, picture: Image.Image, methods: Sequence[str],
                      class_idx: int | None, score_threshold: float, layer: str, alpha: float,
                      cmap: str, device: str) -> list[Panel]:
    inputs = F.to_dtype(F.pil_to_tensor(picture), torch.float32, scale=True)[None].to(device)
    with torch.no_grad():
        (found,) = detections_of(loaded.model(inputs))
    boxes, scores, labels = _kept(found, class_idx, score_threshold)
    target = BoxScore(boxes, labels)
    return _each_method(
        methods,
        lambda method: explain(loaded.model, inputs, method=method, target=target, layer=layer),
        lambda result: overlay_with_boxes(picture, result.maps[0], boxes, labels, scores,
                                          names=loaded.labels, alpha=alpha, cmap=cmap),
        loaded.labels,
    )


def _kept(found: dict[str, Tensor], class_idx: int | None, threshold: float
          ) -> tuple[Tensor, Tensor, Tensor | None]:
    """The detections to explain: score at least ``threshold``, of label ``class_idx``."""
    keep = found["scores"] >= threshold
    labels = found.get("labels")
    if class_idx is not None:
        if labels is None:
            raise ValueError("--class-idx picks a label, but this detector returns no labels")
        keep &= labels == class_idx
    if not bool(keep.any()):
        of = "" if class_idx is None else f" with label {class_idx}"
        best = found["scores"][labels == class_idx] if class_idx is not None else found["scores"]
        top = f"the highest is {float(best.max()):.2f}" if best.numel() else "there are none"
        raise ValueError(
            f"no detection{of} scores at least --score-threshold {threshold} ({top}); lower "
            "--score-threshold"
        )
    return (found["boxes"][keep].cpu(), found["scores"][keep].cpu(),
            None if labels is None else labels[keep].cpu())
