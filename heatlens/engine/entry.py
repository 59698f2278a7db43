"""The entry protocol of every call that runs the user's model: one place for what is checked
before the work starts and what is guaranteed after it.

:func:`model_to_explain` is called when an explainer is made, :func:`entered` around each call:

1. the module that does the work: ``torch.compile``'s original module, ``nn.DataParallel``'s
   and ``DistributedDataParallel``'s ``.module`` (same weights, same math); a scripted module is
   refused, as it runs no Python hooks;
2. the input as a batch ``(B, C, *spatial)``, checked before any expensive work: a float tensor
   of the model's parameter dtype, with finite values (the error names the images that are not);
3. a warning naming the modules left in training mode (``model.eval(); model.layer4.train()``
   makes a map depend on the rest of the batch);
4. for the call: the model's buffers restored afterwards when a module is in training mode,
   inference mode left (gradients flow from inside ``torch.inference_mode()``), an inference
   tensor cloned, and, where the model returns a dict or tuple, the entry chosen by ``output=``
   handed on as the model's output (:func:`output_selected`).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from heatlens.engine.hooks import forward_hooks
from heatlens.engine.notices import warn

OutputKey = str | int
"""Which entry of a dict, tuple or list output holds the scores to explain."""

_WRAPPERS = (nn.DataParallel, nn.parallel.DistributedDataParallel)


def model_to_explain(model: Any) -> nn.Module:
    """The module that does the work (see the module docstring, step 1)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, not {type(model).__name__}")
    if isinstance(model, torch.jit.ScriptModule):
        raise TypeError(
            "this model is scripted (torch.jit): scripted modules do not run the Python hooks "
            "that capture activations. Explain the eager nn.Module you scripted it from."
        )
    while True:
        if isinstance(model, _WRAPPERS):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):  # torch.compile
            model = model._orig_mod
        else:
            return model


@contextmanager
def entered(model: nn.Module, inputs: Any, *, output: OutputKey | None = None
            ) -> Iterator[Tensor]:
    """Check ``inputs`` and yield them as a batch to explain ``model`` on (steps 2 to 4)."""
    x = as_batch(inputs, model)
    training = warn_if_training(model)
    with buffers_kept(model, training), torch.inference_mode(False), \
            output_selected(model, output):
        yield x.clone() if x.is_inference() else x


def model_device(model: nn.Module) -> torch.device:
    """Where the model's parameters live (the CPU for a model without parameters)."""
    first = next(model.parameters(), None)
    return torch.device("cpu") if first is None else first.device


def as_batch(inputs: Any, model: nn.Module) -> Tensor:
    """Check ``inputs`` and return it as a batch ``(B, C, *spatial)``.

    A single input ``(C, *spatial)`` gains a batch dimension; which case applies is read from the
    model's first convolution (its number of spatial dimensions), else a 3-D tensor is one image.
    """
    if not isinstance(inputs, Tensor):
        raise TypeError(
            f"inputs must be a torch.Tensor (B, C, *spatial), not {type(inputs).__name__}; "
            "load and preprocess images with heatlens.load_image and heatlens.IMAGENET"
        )
    if not inputs.is_floating_point():
        raise TypeError(
            f"inputs must be a preprocessed float tensor, got dtype {inputs.dtype}; "
            "preprocess images with heatlens.IMAGENET (or your model's own transforms)"
        )
    conv = next((m for m in model.modules() if isinstance(m, nn.modules.conv._ConvNd)), None)
    batched_ndim = len(conv.kernel_size) + 2 if conv is not None else 4
    if inputs.ndim == batched_ndim - 1:
        inputs = inputs.unsqueeze(0)
    elif inputs.ndim != batched_ndim and conv is not None:
        raise ValueError(
            f"inputs have shape {tuple(inputs.shape)}, but the model's first convolution "
            f"({type(conv).__name__}) takes (B, C, {', '.join(['...'] * (batched_ndim - 2))}) "
            f"batches of {batched_ndim} dimensions"
        )
    if inputs.ndim < 3:
        raise ValueError(
            f"inputs have shape {tuple(inputs.shape)}; expected (B, C, *spatial) with at least "
            "one spatial dimension"
        )
    if inputs.shape[0] == 0:
        raise ValueError("inputs hold an empty batch (B = 0)")
    _check_dtype(inputs, model)
    _check_finite(inputs)
    return inputs


def _check_dtype(inputs: Tensor, model: nn.Module) -> None:
    weight = next((p for p in model.parameters() if p.is_floating_point()), None)
    if weight is not None and weight.dtype != inputs.dtype:
        to = {torch.float32: "float()", torch.float64: "double()", torch.float16: "half()",
              torch.bfloat16: "bfloat16()"}.get(weight.dtype, f"to({weight.dtype})")
        raise TypeError(
            f"inputs are {inputs.dtype} but the model's parameters are {weight.dtype}; convert "
            f"the inputs to match: inputs.{to}"
        )


def _check_finite(inputs: Tensor) -> None:
    if torch.isfinite(inputs.sum()):  # NaN or inf anywhere makes the sum so; one cheap pass
        return  # (a sum that overflows falls through to the count, which finds nothing)
    bad = (~torch.isfinite(inputs)).flatten(1).sum(dim=1)
    images = bad.nonzero().flatten().tolist()
    if images:
        which = ", ".join(str(i) for i in images[:5]) + (" ..." if len(images) > 5 else "")
        raise ValueError(
            f"image{'s' if len(images) > 1 else ''} {which} of the batch of {inputs.shape[0]} "
            f"hold{'' if len(images) > 1 else 's'} NaN or infinite values ({int(bad.sum())} of "
            f"{inputs[0].numel() * len(images)}): no map of them would mean anything. Check the "
            "preprocessing, or replace them (torch.nan_to_num)"
        )


def warn_if_training(model: nn.Module) -> bool:
    """Warn, naming them, when the model or any of its modules is in training mode; whether
    any is."""
    if not any(module.training for module in model.modules()):
        return False
    training = [name for name, module in model.named_modules() if module.training]
    if training[0] == "":
        what = "the model is in training mode"
    else:
        found = set(training)
        top = [n for n in training if not any(p in found for p in _parents(n))]
        shown = ", ".join(repr(n) for n in top[:3]) + (" ..." if len(top) > 3 else "")
        what = (f"module{'s' if len(top) > 1 else ''} {shown} of the model "
                f"{'are' if len(top) > 1 else 'is'} in training mode")
    warn(
        f"{what} (dropout and batch-norm statistics make the prediction, and the map, depend on "
        "the rest of the batch); call model.eval() before explaining. heatlens leaves the modes "
        "as they are."
    )
    return True


def _parents(name: str) -> Iterator[str]:
    parts = name.split(".")
    return (".".join(parts[:cut]) for cut in range(1, len(parts)))


@contextmanager
def buffers_kept(model: nn.Module, training: bool | None = None) -> Iterator[None]:
    """Restore every buffer of the model afterwards when any module is in training mode
    (``training``, when the caller knows it already; ``None``: look).

    A forward pass in training mode updates batch-norm running statistics; explaining must not.
    In eval mode nothing is copied.
    """
    if not (any(m.training for m in model.modules()) if training is None else training):
        yield
        return
    saved = [(b, b.detach().clone()) for b in model.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in saved:
                buffer.copy_(value)


@contextmanager
def output_selected(model: nn.Module, output: OutputKey | None) -> Iterator[None]:
    """For the calls made inside the block on this thread, ``model`` returns the entry ``output``
    of what it returns (a dict key, a tuple or list index, or an attribute); nothing changes
    for ``output=None``."""
    if output is None:
        yield
        return
    if not isinstance(output, str | int) or isinstance(output, bool):
        raise TypeError(f"output must be a dict key (str) or a tuple index (int), not "
                        f"{type(output).__name__}")
    with forward_hooks([(model, lambda module, args, result: select_output(result, output))]):
        yield


def select_output(result: Any, key: OutputKey) -> Any:
    """Entry ``key`` of a model's ``result``; a ``ValueError`` naming the entries there are."""
    if isinstance(result, Mapping):
        if key in result:
            return result[key]
        raise ValueError(f"output={key!r} is not an entry of the model's output; it has "
                         f"{', '.join(repr(k) for k in result)}")
    if isinstance(result, Sequence) and not isinstance(result, str) and isinstance(key, int):
        if -len(result) <= key < len(result):
            return result[key]
        raise ValueError(f"output={key} is out of range: the model returns {len(result)} "
                         "values")
    if isinstance(key, str) and hasattr(result, key):
        return getattr(result, key)
    raise ValueError(
        f"output={key!r} names an entry of a dict (a key) or of a tuple (an index), but the "
        f"model returns a {type(result).__name__}; leave output= out"
    )
