"""What to explain: which scalar per image the explanation is taken of.

A target turns the model output into one score per image, ``(B,)``. ``target=`` in
:func:`heatlens.explain` accepts:

* ``None``: the arg-max class of each image; only for a ``(B, num_classes)`` score tensor.
* an ``int`` (or a NumPy integer, or a 0-d tensor): that class for every image (broadcast on
  purpose).
* a sequence, array or 1-D tensor of ``B`` ints: one class per image.
* a class name, or one per image, looked up in the labels given with ``labels=``.
* a callable ``output -> (B,) scores``.
* a :class:`Target` object: :class:`ClassLogit`, :class:`ClassProbability`,
  :class:`BinaryOutput`, :class:`RegressionOutput`.

A length mismatch or an out-of-range class is a ``ValueError`` naming both numbers.
"""

from __future__ import annotations

import difflib
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

NO_CLASS = -1
"""``Explanation.targets`` where a target has no class index (callables, regression)."""


_SCORE_KEYS = ("logits", "out")
"""Dict keys taken as the scores without asking: Hugging Face's and torchvision's."""


def primary_output(output: Any) -> Tensor:
    """The tensor to take scores from: the output itself; of a dict (or Hugging Face output),
    the entry ``"logits"`` or ``"out"`` (torchvision segmentation), or its only tensor; the first
    element of a tuple or list. A dict with several other tensors is ambiguous: the error asks
    for ``output=`` (see :func:`heatlens.engine.entry.output_selected`)."""
    if isinstance(output, Tensor):
        return output
    if isinstance(output, Mapping):
        for key in _SCORE_KEYS:
            if isinstance(output.get(key), Tensor):
                return output[key]
        tensors = [key for key, value in output.items() if isinstance(value, Tensor)]
        if len(tensors) == 1:
            return output[tensors[0]]
        if tensors:
            raise ValueError(
                f"the model returns a dict with the tensors {', '.join(map(repr, tensors))}: "
                f"which one holds the scores to explain? Say so with output= (for example "
                f"heatlens.explain(..., output={tensors[-1]!r}))"
            )
    if isinstance(output, Sequence) and output and isinstance(output[0], Tensor):
        return output[0]
    if hasattr(output, "logits") and isinstance(output.logits, Tensor):  # Hugging Face outputs
        return output.logits
    raise TypeError(
        f"cannot find a score tensor in the model output of type {type(output).__name__}; "
        "pass target= as a callable that maps the output to one score per image"
    )


class Target(ABC):
    """Maps a model output to one score per image, and names the class explained."""

    @abstractmethod
    def classes(self, output: Any, batch: int) -> Tensor:
        """``(B,)`` long: the class explained for each image, or ``NO_CLASS``. Validates."""

    @abstractmethod
    def score(self, output: Any, classes: Tensor) -> Tensor:
        """``(B,)`` differentiable scores for ``classes`` (from :meth:`classes`)."""


ClassIndex = int | np.integer
ClassIndices = ClassIndex | Sequence[ClassIndex] | Tensor | np.ndarray


def class_indices(index: ClassIndices | None, output: Tensor) -> Tensor:
    """``(B,)`` long class indices for a ``(B, num_classes)`` output: the arg-max for ``None``,
    one class for every image (an int, a NumPy integer, a 0-d tensor), or one per image."""
    batch = output.shape[0]
    if output.ndim != 2:
        if index is None:
            raise ValueError(
                f"target=None means the arg-max class, which needs a (B, num_classes) output; "
                f"this model returns shape {tuple(output.shape)}. Pass a target: a callable "
                "mapping the output to B scores, or a target object (heatlens.ClassRegion, ...)"
            )
        raise ValueError(
            f"a class index target needs a (B, num_classes) output; this model returns shape "
            f"{tuple(output.shape)}. Pass a callable target that maps the output to B scores"
        )
    num_classes = output.shape[1]
    if index is None:
        broken = (~torch.isfinite(output.detach())).any(dim=1).nonzero().flatten().tolist()
        if broken:
            raise ValueError(
                f"the model's scores for image {broken[0]} are NaN or infinite, so no class can "
                "be chosen as the prediction; check the model and its inputs"
            )
        return output.argmax(dim=1)
    if isinstance(index, bool | np.bool_):
        raise TypeError("target must be a class index (int), not a bool")
    if isinstance(index, int | np.integer):
        indices = torch.full((batch,), int(index), dtype=torch.long, device=output.device)
    else:
        indices = torch.as_tensor(np.asarray(index) if isinstance(index, np.ndarray) else index,
                                  device=output.device)
        if indices.is_floating_point() or indices.dtype == torch.bool:
            raise TypeError(f"target classes must be integers, got dtype {indices.dtype}")
        indices = indices.long().reshape(-1)
        if indices.numel() == 1:  # a 0-d tensor or a single item: one class for all
            indices = indices.expand(batch)
        if indices.numel() != batch:
            raise ValueError(
                f"got {indices.numel()} targets for a batch of {batch} images; pass one target "
                "per image, or a single int to use the same class for all"
            )
    bad = (indices < 0) | (indices >= num_classes)
    if bool(bad.any()):
        raise ValueError(
            f"target class {int(indices[bad][0])} is out of range: the model has {num_classes} "
            f"classes (valid indices 0 to {num_classes - 1})"
        )
    return indices


class ClassLogit(Target):
    """The pre-softmax score ``y_c`` of class ``c`` (Grad-CAM's choice, Selvaraju et al. 2017)."""

    def __init__(self, index: ClassIndices | None = None) -> None:
        self.index = index

    def classes(self, output: Any, batch: int) -> Tensor:
        return class_indices(self.index, primary_output(output))

    def score(self, output: Any, classes: Tensor) -> Tensor:
        return primary_output(output).gather(1, classes[:, None])[:, 0]


class ClassProbability(ClassLogit):
    """The softmax probability ``p_c = exp(y_c) / sum_k exp(y_k)`` of class ``c``."""

    def score(self, output: Any, classes: Tensor) -> Tensor:
        return primary_output(output).softmax(dim=1).gather(1, classes[:, None])[:, 0]


def _one_per_image(output: Any, what: str) -> Tensor:
    output = primary_output(output)
    if output.ndim == 1 or (output.ndim == 2 and output.shape[1] == 1):
        return output.reshape(-1)
    raise ValueError(
        f"{what} needs an output of shape (B,) or (B, 1); this model returns "
        f"{tuple(output.shape)}"
    )


class BinaryOutput(Target):
    """A single-logit binary classifier: ``sign * y`` (``sign=-1`` explains the negative class)."""

    def __init__(self, sign: int = 1) -> None:
        if sign not in (1, -1):
            raise ValueError(f"sign must be 1 or -1, not {sign}")
        self.sign = sign

    def classes(self, output: Any, batch: int) -> Tensor:
        values = _one_per_image(output, "BinaryOutput")
        return torch.full_like(values, int(self.sign > 0), dtype=torch.long)

    def score(self, output: Any, classes: Tensor) -> Tensor:
        return self.sign * _one_per_image(output, "BinaryOutput")


class RegressionOutput(Target):
    """Output ``index`` of a regression head, times ``sign`` (``-1``: what lowers the value)."""

    def __init__(self, index: int = 0, sign: int = 1) -> None:
        if sign not in (1, -1):
            raise ValueError(f"sign must be 1 or -1, not {sign}")
        self.index, self.sign = index, sign

    def classes(self, output: Any, batch: int) -> Tensor:
        output = primary_output(output)
        values = output.reshape(output.shape[0], -1)
        if not 0 <= self.index < values.shape[1]:
            raise ValueError(
                f"regression output index {self.index} is out of range: the model returns "
                f"{values.shape[1]} values per image"
            )
        return torch.full((output.shape[0],), NO_CLASS, dtype=torch.long, device=output.device)

    def score(self, output: Any, classes: Tensor) -> Tensor:
        output = primary_output(output)
        return self.sign * output.reshape(output.shape[0], -1)[:, self.index]


class CallableTarget(Target):
    """Any function ``output -> (B,)`` scores, applied to the model output as returned."""

    def __init__(self, fn: Callable[[Any], Tensor]) -> None:
        self.fn = fn

    def classes(self, output: Any, batch: int) -> Tensor:
        return torch.full((batch,), NO_CLASS, dtype=torch.long)

    def score(self, output: Any, classes: Tensor) -> Tensor:
        scores = self.fn(output)
        batch = classes.shape[0]
        if not isinstance(scores, Tensor) or scores.numel() != batch:
            got = tuple(scores.shape) if isinstance(scores, Tensor) else type(scores).__name__
            raise ValueError(
                f"a callable target must return one score per image, shape ({batch},); "
                f"it returned {got}"
            )
        return scores.reshape(-1)


class Untargeted(Target):
    """No target: for methods whose map does not depend on one (Eigen-CAM), on a model whose
    output has no class scores to take an arg-max of (a detector, a segmenter). The class is
    ``NO_CLASS`` and the score NaN."""

    def classes(self, output: Any, batch: int) -> Tensor:
        return torch.full((batch,), NO_CLASS, dtype=torch.long)

    def score(self, output: Any, classes: Tensor) -> Tensor:
        return torch.full((classes.shape[0],), float("nan"))


TargetSpec = (Target | ClassIndices | str | Sequence[str] | Callable[[Any], Tensor] | None)


def as_target(target: TargetSpec, labels: Sequence[str] | None = None) -> Target:
    """Normalise any accepted ``target=`` value to a :class:`Target`. A class name (or one per
    image) is looked up in ``labels``."""
    if isinstance(target, Target):
        return target
    if isinstance(target, str) or (isinstance(target, Sequence) and target
                                   and all(isinstance(t, str) for t in target)):
        return ClassLogit(class_of_names(target, labels))
    if target is None or isinstance(target, int | np.integer | Sequence | Tensor | np.ndarray):
        return ClassLogit(target)
    if callable(target):
        return CallableTarget(target)
    raise TypeError(
        f"target must be None, an int, a sequence of ints, a tensor, a class name, a callable or "
        f"a heatlens target object, not {type(target).__name__}"
    )


def class_of_names(names: str | Sequence[str], labels: Sequence[str] | None) -> int | list[int]:
    """The class index of a label name (or of each of several), case and spaces ignored."""
    if labels is None:
        raise ValueError(
            f"target={names!r} names a class, but no class names are known here: pass "
            "labels= (for example heatlens.load_model().labels), or the class index"
        )
    index = {_plain(label): i for i, label in reversed(list(enumerate(labels)))}

    def one(name: str) -> int:
        if _plain(name) in index:
            return index[_plain(name)]
        close = difflib.get_close_matches(name, list(labels), n=3, cutoff=0.6)
        hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
        raise ValueError(f"no class is named {name!r} among the {len(labels)} labels.{hint}")

    return one(names) if isinstance(names, str) else [one(name) for name in names]


def _plain(name: str) -> str:
    return " ".join(name.lower().replace("_", " ").split())
