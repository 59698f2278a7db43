"""Record activations at chosen layers for exactly one forward pass.

Hooks are registered, used and removed inside :func:`forward_with_capture`; nothing is left on the
user's model afterwards, also when the forward pass raises (DESIGN promises 1 and 2). Gradients are
taken with :func:`torch.autograd.grad` with respect to the captured activations, so no ``.grad``
attribute of any parameter is touched (promise 1) and the call works inside ``torch.no_grad()``,
``torch.inference_mode()`` and with frozen parameters (promise 3).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn


@contextmanager
def buffers_kept(model: nn.Module) -> Iterator[None]:
    """Restore every buffer of the model afterwards when any module is in training mode.

    A forward pass in training mode updates batch-norm running statistics; explaining must not.
    In eval mode nothing is copied.
    """
    if not any(m.training for m in model.modules()):
        yield
        return
    saved = [(b, b.detach().clone()) for b in model.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in saved:
                buffer.copy_(value)


@dataclass(frozen=True)
class Captured:
    """What one forward pass produced: the model output and the activation of each layer."""

    output: Any
    activations: dict[str, Tensor]
    inputs: Tensor


def forward_with_capture(
    model: nn.Module,
    inputs: Tensor,
    layers: Mapping[str, nn.Module],
    *,
    with_gradients: bool,
    input_gradients: bool = False,
) -> Captured:
    """Run ``model(inputs)`` once and keep the output tensor of every module in ``layers``.

    With ``with_gradients=True`` the part of the network before the first captured layer runs
    without building an autograd graph; at that layer the activation becomes a leaf that requires
    gradients, and the rest of the network is recorded, so that
    ``torch.autograd.grad(score, activations)`` gives exactly d score / d activation. Each hook
    hands the next layer a clone of the activation, so an in-place operation further on
    (``out += identity`` or ``nn.ReLU(inplace=True)``) cannot change what was recorded.

    With ``input_gradients=True`` the input becomes a leaf that requires gradients and the whole
    pass is recorded (``Captured.inputs`` is that leaf), for methods that also need d score / d x.

    Call it outside inference mode (``torch.inference_mode(False)``) with a normal tensor.
    Hooks fire only on the calling thread, so several threads may explain with one shared model at
    the same time. A module called several times in one pass is recorded at its last call.
    """
    owner = threading.get_ident()
    recorded: dict[str, Tensor] = {}

    def make_hook(name: str):
        def hook(module: nn.Module, args: Any, output: Any) -> Tensor | None:
            if threading.get_ident() != owner:
                return None
            if not isinstance(output, Tensor):
                raise TypeError(
                    f"layer {name!r} ({type(module).__name__}) returns {type(output).__name__}, "
                    "not a tensor; choose a layer whose output is a feature map "
                    "(see `heatlens layers` or heatlens.candidate_layers(model, inputs))"
                )
            if with_gradients:
                torch.set_grad_enabled(True)  # undone when the surrounding no_grad() exits
                if not output.requires_grad:
                    output = output.detach().requires_grad_(True)
            recorded[name] = output
            return output.clone()

        return hook

    handles = []
    try:
        for name, module in layers.items():
            handles.append(module.register_forward_hook(make_hook(name)))
        if input_gradients:
            inputs = inputs.detach().requires_grad_(True)
        with torch.set_grad_enabled(input_gradients):
            output = model(inputs)
    finally:
        for handle in handles:
            handle.remove()

    missing = [name for name in layers if name not in recorded]
    if missing:
        raise RuntimeError(
            f"layer(s) {missing} did not run during the forward pass, so nothing was captured. "
            "A scripted (torch.jit) or compiled (torch.compile) model does not call Python hooks: "
            "pass the original eager nn.Module instead; otherwise pick a layer that forward() uses."
        )
    return Captured(output=output, activations=recorded, inputs=inputs)


def gradients_of(
    scores: Tensor, activations: Sequence[Tensor], names: Sequence[str]
) -> list[Tensor]:
    """d(sum of scores)/d(activation) for each activation; image i's score depends on image i only.

    Raises a ``ValueError`` naming the layer when the score does not depend on it.
    """
    if not scores.requires_grad:
        raise ValueError(
            f"the target score does not depend on layer(s) {list(names)}: no gradient can flow. "
            "Pick a layer that lies between the input and the output."
        )
    with torch.enable_grad():
        total = scores.sum()
    grads = torch.autograd.grad(total, list(activations), allow_unused=True)
    for name, grad in zip(names, grads, strict=True):
        if grad is None:
            raise ValueError(
                f"the target score does not depend on layer {name!r}: its gradient is empty. "
                "Pick a layer that lies between the input and the output."
            )
    return [g.detach() for g in grads]


@contextmanager
def output_replaced(module: nn.Module, value: Tensor) -> Iterator[None]:
    """For the calls made inside the block, ``module`` returns ``value`` instead of its output.

    Only calls on this thread whose output has ``value``'s shape after the batch dimension are
    replaced (a module called several times in one pass, such as a shared activation, is
    replaced where its output is the layer being explained). The hook is removed afterwards.
    """
    owner = threading.get_ident()
    feature_shape = value.shape[1:]

    def hook(module: nn.Module, args: Any, output: Any) -> Tensor | None:
        if threading.get_ident() == owner and isinstance(output, Tensor) and (
            output.shape[1:] == feature_shape
        ):
            return value
        return None

    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()
