"""The engine shared by all methods: input checks, layer resolution, capture, targets, maps."""

from __future__ import annotations

import warnings
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from heatlens.engine.capture import buffers_kept, forward_with_capture, gradients_of
from heatlens.engine.layers import LayerSpec, resolve_layers
from heatlens.engine.maps import FUSIONS, minmax, upsample
from heatlens.engine.targets import (
    NO_CLASS,
    BinaryOutput,
    Target,
    TargetSpec,
    Untargeted,
    as_target,
    primary_output,
)
from heatlens.engine.tokens import TokenLayout, infer_layout
from heatlens.explanation import Explanation


def as_batch(inputs: Tensor, model: nn.Module) -> Tensor:
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
        return inputs.unsqueeze(0)
    if inputs.ndim != batched_ndim and conv is not None:
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
    return inputs


def target_probabilities(output: Any, target: Target, classes: Tensor) -> Tensor | None:
    """Softmax probability of each image's class for ``(B, K)`` scores; sigmoid for a binary
    output; ``None`` where a probability has no meaning."""
    try:
        scores = primary_output(output).detach()
    except TypeError:
        return None
    if isinstance(target, BinaryOutput):
        return torch.sigmoid(target.score(scores, classes)).float()
    if scores.ndim == 2 and scores.shape[1] > 1 and bool((classes != NO_CLASS).all()):
        return scores.float().softmax(dim=1).gather(1, classes[:, None])[:, 0]
    return None


@dataclass(frozen=True)
class LayerCall:
    """What one call knows when a method turns one layer into a map."""

    model: nn.Module
    inputs: Tensor
    target: Target
    classes: Tensor
    scores: Tensor
    name: str
    module: nn.Module
    activations: Tensor
    """``(B, C, *spatial)``; a transformer layer's tokens rearranged to their grid."""
    gradients: Tensor | None
    layout: TokenLayout | None = None
    """How the layer's own output holds the grid (``None``: it is a feature map)."""
    output: Tensor | None = None
    """The layer's own output, as the model passes it on."""


class Explainer(ABC):
    """A method bound to a model: call it on inputs, get an :class:`Explanation`.

    Holds no hooks and no per-call state between calls, so it can be reused in a loop, shared
    by threads, and used as a context manager (which releases nothing, as nothing is held).
    """

    name: ClassVar[str]
    aliases: ClassVar[tuple[str, ...]] = ()

    def __init__(self, model: nn.Module) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, not {type(model).__name__}")
        if isinstance(model, torch.jit.ScriptModule):
            raise TypeError(
                "this model is scripted (torch.jit): scripted modules do not run the Python hooks "
                "that capture activations. Explain the eager nn.Module you scripted it from."
            )
        # torch.compile wraps the module: explain the module it wraps (same weights, same math).
        self.model: nn.Module = getattr(model, "_orig_mod", model)

    def __call__(self, inputs: Tensor, target: TargetSpec = None) -> Explanation:
        """Explain ``inputs`` ``(B, C, *spatial)`` for ``target`` (see
        :mod:`heatlens.engine.targets`).

        The model's buffers are restored afterwards when it is in training mode (batch-norm
        statistics do not move), and the call works from inside ``torch.inference_mode()``."""
        x = as_batch(inputs, self.model)
        warn_if_training(self.model)
        with buffers_kept(self.model), torch.inference_mode(False):
            return self._explain(x.clone() if x.is_inference() else x, target)

    @abstractmethod
    def _explain(self, x: Tensor, target: TargetSpec) -> Explanation:
        """The method's work on a checked batch, outside inference mode."""

    def __enter__(self) -> Explainer:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}(model={type(self.model).__name__})"


def warn_if_training(model: nn.Module) -> None:
    if model.training:
        warnings.warn(
            "the model is in training mode (dropout and batch-norm statistics change the "
            "prediction); call model.eval() before explaining. heatlens leaves the mode as it is.",
            stacklevel=3,
        )


class CAMExplainer(Explainer):
    """Class activation maps from one or more layers' activations (and their gradients).

    A subclass states its math in :meth:`cam`; this class does the rest: resolve the layers,
    capture activations for one forward pass, take the target scores and their gradients
    w.r.t. the activations, then ``maps = fusion(upsample(relu(cam)))`` per layer.

    Args:
        model: any ``nn.Module``; it is left exactly as it was.
        layer: ``"auto"``, a dotted module name, a module, or a list of these.
        relu: apply ReLU to the raw map before scaling (the papers' choice) — the raw map in
            ``Explanation.raw`` stays signed either way.
        fusion: how several layers combine: ``"mean"`` of the min-max scaled maps, or
            ``"tanh-max"`` (LayerCAM's). ``None`` picks the method's default.
    """

    needs_gradients: ClassVar[bool] = True
    needs_target: ClassVar[bool] = True
    """``False``: the map does not depend on the target, so ``target=None`` works on any output."""
    default_fusion: ClassVar[str] = "mean"

    def __init__(self, model: nn.Module, layer: LayerSpec = "auto", *, relu: bool = True,
                 fusion: str | None = None) -> None:
        super().__init__(model)
        self.layer = layer
        self.relu = relu
        self.fusion = fusion or self.default_fusion
        if self.fusion not in FUSIONS:
            raise ValueError(f"fusion must be one of {sorted(FUSIONS)}, not {self.fusion!r}")

    def cam(self, activations: Tensor, gradients: Tensor | None, classes: Tensor) -> Tensor:
        """The signed map ``(B, *spatial)`` from activations and gradients ``(B, C, *spatial)``.

        A method defines this, or :meth:`layer_map` when it needs more."""
        raise NotImplementedError(f"{type(self).__name__} defines neither cam() nor layer_map()")

    def postprocess(self, raw: dict[str, Tensor], x: Tensor) -> Tensor:
        """Raw maps by layer to ``maps`` in [0, 1] at the input's size: ReLU (unless
        ``relu=False``), upsampling, min-max scaling, and the fusion of several layers."""
        size = x.shape[2:]
        shown = [upsample(m.clamp_min(0) if self.relu else m, size) for m in raw.values()]
        return minmax(shown[0]) if len(shown) == 1 else FUSIONS[self.fusion](shown)

    def layer_map(self, call: LayerCall) -> Tensor:
        """The signed map of one layer. Methods that need more than the activations and
        gradients (the model, the inputs, the target) override this instead of :meth:`cam`."""
        return self.cam(call.activations, call.gradients, call.classes)

    def _explain(self, x: Tensor, target: TargetSpec) -> Explanation:
        choice = resolve_layers(self.model, self.layer, x)
        goal = as_target(target)
        captured = forward_with_capture(
            self.model, x, choice.as_dict(), with_gradients=self.needs_gradients
        )
        try:
            classes = goal.classes(captured.output, x.shape[0]).to(x.device)
        except (ValueError, TypeError):
            if target is not None or self.needs_target:
                raise
            goal = Untargeted()  # e.g. Eigen-CAM on a detector: the map needs no class
            classes = goal.classes(captured.output, x.shape[0]).to(x.device)
        acts = [captured.activations[name] for name in choice.names]
        layouts = [feature_layout(self.model, name, act, x)
                   for name, act in zip(choice.names, acts, strict=True)]
        with torch.set_grad_enabled(self.needs_gradients):
            scores = goal.score(captured.output, classes)
            grads = (
                gradients_of(scores, acts, choice.names)
                if self.needs_gradients
                else [None] * len(acts)
            )
        calls = [
            LayerCall(self.model, x, goal, classes, scores.detach(), name, module,
                      as_map(layout, act.detach()), as_map(layout, grad), layout, act.detach())
            for name, module, act, grad, layout in zip(choice.names, choice.modules, acts, grads,
                                                       layouts, strict=True)
        ]
        with torch.no_grad():
            raw = {call.name: self.layer_map(call).float() for call in calls}
            maps = self.postprocess(raw, x)
        tokens = {call.name: call.layout.describe(tuple(call.output.shape))
                  for call in calls if call.layout is not None}
        return build_explanation(self.name, maps, raw, captured.output, goal, classes, scores,
                                 choice.names, choice.reason,
                                 {"token_layout": tokens} if tokens else None)


def feature_layout(model: nn.Module, name: str, output: Tensor, x: Tensor) -> TokenLayout | None:
    """The token layout of a transformer layer's output (``None`` for a feature map
    ``(B, C, *spatial)``); a ``ValueError`` for an output that is neither."""
    layout = infer_layout(model, output, x)
    if layout is None and output.ndim < 3:
        raise ValueError(
            f"layer {name!r} outputs shape {tuple(output.shape)}, not a feature map "
            "(B, C, *spatial) nor the tokens of a patch grid; choose an earlier layer (see "
            "`heatlens layers`)"
        )
    return layout


def as_map(layout: TokenLayout | None, output: Tensor | None) -> Tensor | None:
    """``output`` as ``(B, C, *spatial)``: a transformer layer's tokens rearranged."""
    return output if layout is None or output is None else layout.to_map(output)


def build_explanation(method: str, maps: Tensor, raw: dict[str, Tensor], output: Any,
                      goal: Target, classes: Tensor, scores: Tensor, layers: tuple[str, ...],
                      reason: str, details: dict[str, Any] | None = None) -> Explanation:
    """Assemble an :class:`Explanation` from one call's results."""
    try:
        scores_out = primary_output(output).detach()
    except TypeError:
        scores_out = None
    return Explanation(
        maps=maps,
        raw_by_layer=raw,
        targets=classes,
        scores=scores.detach(),
        probabilities=target_probabilities(output, goal, classes),
        layers=layers,
        method=method,
        layer_reason=reason,
        output=scores_out,
        details=details or {},
    )
