"""Record activations at chosen layers for exactly one forward pass.

Hooks are registered, used and removed inside :func:`forward_with_capture` (through
:func:`~heatlens.engine.hooks.forward_hooks`); nothing is left on the user's model afterwards,
also when the forward pass raises (``docs/design.md``, promises 1 and 2). Gradients are taken
with :func:`torch.autograd.grad` with respect to the captured activations, so no ``.grad``
attribute of any parameter is touched (promise 1) and the call works inside ``torch.no_grad()``,
``torch.inference_mode()`` and with frozen parameters (promise 3).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from heatlens.engine.activations import FirstReads, Follower
from heatlens.engine.hooks import forward_hooks


@dataclass(frozen=True)
class Captured:
    """What one forward pass produced: the model output and the activation of each layer."""

    output: Any
    activations: dict[str, Tensor]
    inputs: Tensor
    followers: dict[str, str] = field(default_factory=dict)
    """For each layer followed by a functional activation, which and where (``"a functional
    ReLU in DenseNet.forward"``): its activation is that function's result."""


def forward_with_capture(
    model: nn.Module,
    inputs: Tensor,
    layers: Mapping[str, nn.Module],
    *,
    with_gradients: bool,
    input_gradients: bool = False,
    follow_activations: bool = True,
) -> Captured:
    """Run ``model(inputs)`` once and keep the output tensor of every module in ``layers``.

    With ``with_gradients=True`` the part of the network before the first captured layer runs
    without building an autograd graph; at that layer the activation becomes a leaf that requires
    gradients, and the rest of the network is recorded, so that
    ``torch.autograd.grad(score, activations)`` gives exactly d score / d activation. Each hook
    hands the next layer a clone of the activation, so an in-place operation further on
    (``out += identity`` or ``nn.ReLU(inplace=True)``) cannot change what was recorded.

    With ``follow_activations=True`` (the default) a functional activation that the model applies
    to a layer's output before anything else reads it (DenseNet's ``F.relu`` after
    ``features.norm5``) is taken as part of the layer: its result is the activation, as that is
    what the rest of the network reads (:mod:`heatlens.engine.activations`). Methods that need
    the module's own output (FullGrad's bias gradients) pass ``False``.

    With ``input_gradients=True`` the input becomes a leaf that requires gradients and the whole
    pass is recorded (``Captured.inputs`` is that leaf), for methods that also need d score / d x.

    Call it outside inference mode (``torch.inference_mode(False)``) with a normal tensor.
    Hooks act only on the calling thread (:func:`~heatlens.engine.hooks.forward_hooks`), so
    several threads may explain with one shared model at the same time. A module called several
    times in one pass is recorded at its last call.
    """
    recorded: dict[str, Tensor] = {}
    followers: dict[str, str] = {}
    reads = FirstReads() if follow_activations else None

    def follow(name: str) -> Follower:
        def take(how: str, run: Callable[[], Any], passed: Tensor) -> Any:
            result = run()
            followers[name] = how
            if result is not passed:  # out of place: keep the result, hand on a copy
                recorded[name] = result
                return result.clone()
            recorded[name] = kept = result.clone()  # in place: the caller goes on with `passed`
            if kept.requires_grad:
                passed.copy_(kept)  # ... whose graph must now run through what was recorded
            return passed

        return take

    def make_hook(name: str):
        def hook(module: nn.Module, args: Any, output: Any) -> Tensor | None:
            if not isinstance(output, Tensor):
                raise TypeError(
                    f"layer {name!r} ({type(module).__name__}) returns {type(output).__name__}, "
                    "not a tensor; choose a layer whose output is a feature map "
                    "(see `heatlens layers` or heatlens.candidate_layers(model, inputs))"
                )
            with reads.quiet() if reads is not None else nullcontext():
                if with_gradients:
                    torch.set_grad_enabled(True)  # undone when the surrounding no_grad() exits
                    if not output.requires_grad:
                        output = output.detach().requires_grad_(True)
                recorded[name] = output
                followers.pop(name, None)
                passed = output.clone()
            return passed if reads is None else reads.watch(passed, follow(name))

        return hook

    if input_gradients:
        inputs = inputs.detach().requires_grad_(True)
    with forward_hooks((module, make_hook(name)) for name, module in layers.items()), \
            reads if reads is not None else nullcontext(), \
            torch.set_grad_enabled(input_gradients):
        output = model(inputs)

    missing = [name for name in layers if name not in recorded]
    if missing:
        raise RuntimeError(
            f"layer(s) {missing} did not run during the forward pass, so nothing was captured. "
            "A scripted (torch.jit) or compiled (torch.compile) model does not call Python hooks: "
            "pass the original eager nn.Module instead; otherwise pick a layer that forward() uses."
        )
    return Captured(output=output, activations=recorded, inputs=inputs, followers=followers)


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
def output_replaced(module: nn.Module, value: Tensor, *, followed: bool = False
                    ) -> Iterator[None]:
    """For the calls made inside the block, ``module`` returns ``value`` instead of its output.

    Only calls on this thread whose output has ``value``'s shape after the batch dimension are
    replaced (a module called several times in one pass, such as a shared activation, is
    replaced where its output is the layer being explained). With ``followed=True`` the layer's
    activation is the result of the functional activation that follows it (see
    :func:`forward_with_capture`): ``value`` replaces that result, and the activation, which
    ``value`` has been through already, is not applied again.
    """
    feature_shape = value.shape[1:]
    reads = FirstReads() if followed else None

    def hook(module: nn.Module, args: Any, output: Any) -> Tensor | None:
        if not (isinstance(output, Tensor) and output.shape[1:] == feature_shape):
            return None
        if reads is None:
            return value
        # a clone: an in-place activation must not touch `value`
        return reads.watch(value.clone(), lambda how, run, watched: watched)

    with forward_hooks([(module, hook)]), reads if reads is not None else nullcontext():
        yield
