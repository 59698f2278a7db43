"""What every method is: an :class:`Explainer` bound to a model, and the CAM engine
(:class:`CAMExplainer`) that the class activation maps share: resolve the layers, capture one
forward pass, take the target's scores and gradients, turn each layer into a map, scale it."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from heatlens.engine.capture import Captured, forward_with_capture, gradients_of
from heatlens.engine.entry import OutputKey, as_batch, entered, model_to_explain
from heatlens.engine.layers import LayerSpec, resolve_layers
from heatlens.engine.maps import FUSIONS, constant_maps, minmax, per_channel, upsample
from heatlens.engine.notices import warn
from heatlens.engine.targets import (
    NO_CLASS,
    BinaryOutput,
    ClassLogit,
    Target,
    TargetSpec,
    Untargeted,
    as_target,
    primary_output,
)
from heatlens.engine.tokens import TokenLayout, as_map, layer_layout
from heatlens.explanation import Explanation
from heatlens.methods.augment import aug_smoothed
from heatlens.methods.principal import first_principal_component


def target_probabilities(output: Any, target: Target, classes: Tensor) -> Tensor | None:
    """Softmax probability of each image's class for ``(B, K)`` scores; sigmoid for a binary
    output; ``None`` where a probability has no meaning."""
    try:
        scores = primary_output(output).detach()
    except (TypeError, ValueError):
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
    follower: str = ""
    """The functional activation whose result is the activation (see
    :mod:`heatlens.engine.activations`), or ``""``."""
    prediction: Any = None
    """The model's output for the batch."""


class Explainer(ABC):
    """A method bound to a model: call it on inputs, get an :class:`Explanation`.

    Holds no hooks and no per-call state between calls, so it can be reused in a loop, shared
    by threads, and used as a context manager (which releases nothing, as nothing is held).
    """

    name: ClassVar[str]
    aliases: ClassVar[tuple[str, ...]] = ()
    family: ClassVar[str] = "other methods"
    """The group a method is listed in (the web app's method picker)."""
    reads_model: ClassVar[bool] = True
    """``False`` for a model-blind control: a call checks the inputs but neither runs nor
    inspects the model (no training-mode warning, no buffer guard: nothing can change)."""

    def __init__(self, model: nn.Module) -> None:
        self.model: nn.Module = model_to_explain(model)

    def __call__(self, inputs: Tensor, target: TargetSpec = None, *,
                 labels: Sequence[str] | None = None, output: OutputKey | None = None
                 ) -> Explanation:
        """Explain ``inputs`` ``(B, C, *spatial)`` for ``target`` (see
        :mod:`heatlens.engine.targets`; a class name is looked up in ``labels``). ``output``
        names the entry of a dict or tuple output that holds the scores.

        Inputs are checked before any work, the model's buffers are restored afterwards when it
        is in training mode (batch-norm statistics do not move), and the call works from inside
        ``torch.inference_mode()`` (:func:`heatlens.engine.entry.entered`)."""
        goal = as_target(target, labels)
        if not self.reads_model:
            return self._explain(as_batch(inputs, self.model), goal)
        with entered(self.model, inputs, output=output) as x:
            return self._explain(x, goal)

    @abstractmethod
    def _explain(self, x: Tensor, target: Target) -> Explanation:
        """The method's work on a checked batch, outside inference mode."""

    def __enter__(self) -> Explainer:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}(model={type(self.model).__name__})"


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
        eigen_smooth: the raw map is the first principal component of the per-channel terms
            ``T^k`` whose channel sum is the map (``w_k A^k``, or ``relu(G^k) A^k`` ...), instead
            of their sum ``sum_k T^k``: each position's vector ``T_ij`` projected on the first
            principal direction of the centred ``(positions, channels)`` matrix, which removes
            what the channels do not share (pytorch-grad-cam's ``eigen_smooth=True``). The
            sign is the one that correlates positively with the plain map
            (:func:`~heatlens.methods.principal.orient`); pytorch-grad-cam's is the SVD's.
        aug_smooth: the map averaged over test-time augmentation, as pytorch-grad-cam's
            ``aug_smooth=True``: the input flipped left-right or not, times the pixel-value
            factors 0.9, 1.0 and 1.1 (six copies), each copy's map flipped back; the mean is not
            rescaled (see :mod:`heatlens.methods.augment`).
    """

    family = "gradient CAMs"
    needs_gradients: ClassVar[bool] = True
    needs_target: ClassVar[bool] = True
    """``False``: the map does not depend on the target, so ``target=None`` works on any output."""
    default_fusion: ClassVar[str] = "mean"

    def __init__(self, model: nn.Module, layer: LayerSpec = "auto", *, relu: bool = True,
                 fusion: str | None = None, eigen_smooth: bool = False,
                 aug_smooth: bool = False) -> None:
        super().__init__(model)
        self.layer = layer
        self.relu = relu
        self.fusion = fusion or self.default_fusion
        if self.fusion not in FUSIONS:
            raise ValueError(f"fusion must be one of {sorted(FUSIONS)}, not {self.fusion!r}")
        if eigen_smooth and not self.has_terms():
            raise ValueError(
                f"eigen_smooth takes the principal component of a map's per-channel terms, and "
                f"{self.name} states none (its map is not a sum over channels); use it with "
                "gradcam, gradcam++, xgradcam, layercam, hirescam, cam, ..."
            )
        self.eigen_smooth = eigen_smooth
        self.aug_smooth = aug_smooth

    @classmethod
    def has_terms(cls) -> bool:
        """Whether the method states its per-channel terms (:meth:`terms`), as ``eigen_smooth``
        needs."""
        return (cls.terms is not CAMExplainer.terms
                or cls.layer_terms is not CAMExplainer.layer_terms)

    def terms(self, activations: Tensor, gradients: Tensor | None, classes: Tensor) -> Tensor:
        """The per-channel terms ``T`` ``(B, C, *spatial)`` whose channel sum is the map."""
        raise NotImplementedError(f"{type(self).__name__} states no per-channel terms")

    def layer_terms(self, call: LayerCall) -> Tensor:
        """:meth:`terms` of one layer; methods that need more than ``A``, ``G`` and the classes
        override this instead."""
        return self.terms(call.activations, call.gradients, call.classes)

    def cam(self, activations: Tensor, gradients: Tensor | None, classes: Tensor) -> Tensor:
        """The signed map ``(B, *spatial)`` from activations and gradients ``(B, C, *spatial)``.

        A method defines this, or :meth:`terms` (the map is then their sum over channels), or
        :meth:`layer_map` when it needs more."""
        if not self.has_terms():
            raise NotImplementedError(
                f"{type(self).__name__} defines neither cam(), terms() nor layer_map()")
        return self.terms(activations, gradients, classes).sum(dim=1)

    def postprocess(self, raw: dict[str, Tensor], x: Tensor) -> Tensor:
        """Raw maps by layer to ``maps`` in [0, 1] at the input's size: ReLU (unless
        ``relu=False``), upsampling, min-max scaling, and the fusion of several layers. A map
        that is constant at its layer stays constant (zeros), with a warning."""
        shown = {name: m.clamp_min(0) if self.relu else m for name, m in raw.items()}
        for name, m in shown.items():
            warn_if_constant(m, name)
        size = x.shape[2:]
        scaled = [upsample(m, size) for m in shown.values()]
        return minmax(scaled[0]) if len(scaled) == 1 else FUSIONS[self.fusion](scaled)

    def layer_map(self, call: LayerCall) -> Tensor:
        """The signed map of one layer. Methods that need more than the activations and
        gradients (the model, the inputs, the target) override this instead of :meth:`cam`."""
        return self.cam(call.activations, call.gradients, call.classes)

    def layer_raw(self, call: LayerCall) -> Tensor:
        """The raw map of one layer: :meth:`layer_map`, or with ``eigen_smooth`` the first
        principal component of :meth:`layer_terms`."""
        if self.eigen_smooth:
            return first_principal_component(self.layer_terms(call))
        return self.layer_map(call)

    def _explain(self, x: Tensor, target: Target) -> Explanation:
        if self.aug_smooth:
            return aug_smoothed(self._explain_once, self.model, x, target,
                                with_gradients=self.needs_gradients)
        return self._explain_once(x, target)

    def capture(self, x: Tensor, layers: dict[str, nn.Module]) -> Captured:
        """One forward pass with ``layers`` captured, recorded for gradients from the first of
        them on when the method needs gradients. Methods that need the pass run differently
        (eager attention for a second derivative) override this."""
        return forward_with_capture(self.model, x, layers, with_gradients=self.needs_gradients)

    def layer_gradients(self, scores: Tensor, activations: list[Tensor],
                        names: tuple[str, ...]) -> list[Tensor]:
        """What :attr:`LayerCall.gradients` holds for each layer, in the layer's own layout:
        ``G = d(sum of scores)/dA``. A method whose weights need more of the graph than ``G``
        (a Hessian-vector product) overrides this."""
        return gradients_of(scores, activations, names)

    def _explain_once(self, x: Tensor, target: Target) -> Explanation:
        choice = resolve_layers(self.model, self.layer, x)
        captured = self.capture(x, choice.as_dict())
        goal = target
        try:
            classes = goal.classes(captured.output, x.shape[0]).to(x.device)
        except (ValueError, TypeError):
            if not isinstance(goal, ClassLogit) or goal.index is not None or self.needs_target:
                raise
            goal = Untargeted()  # e.g. Eigen-CAM on a detector: the map needs no class
            classes = goal.classes(captured.output, x.shape[0]).to(x.device)
        acts = [captured.activations[name] for name in choice.names]
        layouts = [layer_layout(self.model, name, act, x)
                   for name, act in zip(choice.names, acts, strict=True)]
        with torch.set_grad_enabled(self.needs_gradients):
            scores = goal.score(captured.output, classes)
            grads = (
                self.layer_gradients(scores, acts, choice.names)
                if self.needs_gradients
                else [None] * len(acts)
            )
        calls = [
            LayerCall(self.model, x, goal, classes, scores.detach(), name, module,
                      as_map(layout, act.detach()), as_map(layout, grad), layout, act.detach(),
                      captured.followers.get(name, ""), captured.output)
            for name, module, act, grad, layout in zip(choice.names, choice.modules, acts, grads,
                                                       layouts, strict=True)
        ]
        with torch.no_grad():
            raw = {call.name: self.layer_raw(call).float() for call in calls}
            maps = self.postprocess(raw, x)
        details: dict[str, Any] = {}
        tokens = {call.name: call.layout.describe(tuple(call.output.shape))
                  for call in calls if call.layout is not None}
        if tokens:
            details["token_layout"] = tokens
        if captured.followers:
            details["followed_by"] = dict(captured.followers)
        return build_explanation(self.name, maps, raw, captured.output, goal, classes, scores,
                                 choice.names, with_followers(choice.reason, captured.followers),
                                 details)


class WeightedCAM(CAMExplainer):
    """A CAM whose map is ``M = sum_k w_k A^k``, one weight per channel: a method states ``w``
    ``(B, C)`` in :meth:`channel_weights`, or in :meth:`layer_weights` when it needs more than
    ``A``, ``G`` and the classes. Its per-channel terms are ``w_k A^k``."""

    def channel_weights(self, activations: Tensor, gradients: Tensor | None,
                        classes: Tensor) -> Tensor:
        """The weights ``w`` ``(B, C)``."""
        raise NotImplementedError(f"{type(self).__name__} defines no channel weights")

    def layer_weights(self, call: LayerCall) -> Tensor:
        """:meth:`channel_weights` of one layer."""
        return self.channel_weights(call.activations, call.gradients, call.classes)

    def layer_map(self, call: LayerCall) -> Tensor:
        return per_channel(self.layer_weights(call).to(call.activations.dtype), call.activations)

    def layer_terms(self, call: LayerCall) -> Tensor:
        weights = self.layer_weights(call).to(call.activations.dtype)
        return weights.reshape(*weights.shape, *[1] * (call.activations.ndim - 2)) * (
            call.activations)


def with_followers(reason: str, followers: dict[str, str]) -> str:
    """``reason`` for the layer choice, and which layers are taken after the functional
    activation that follows them."""
    notes = [f"'{name}' is followed by {how}, so its activation is that function's result, "
             "what the rest of the network reads" for name, how in followers.items()]
    return "; ".join([reason, *notes])


def warn_if_constant(maps: Tensor, layer: str) -> None:
    """Warn when some of the ``(B, *spatial)`` maps of ``layer`` hold one value: they show no
    place and are drawn as zeros (all zero after the ReLU: no positive evidence there)."""
    constant = constant_maps(maps)
    zero = constant & (maps.flatten(1).abs().amax(dim=1) == 0)
    grid = " x ".join(str(s) for s in maps.shape[1:])
    for which, what in ((zero, "is zero everywhere: no position of the layer raises the "
                                "target's score (no positive evidence there)"),
                        (constant & ~zero, f"holds one value at all its {grid} positions: it "
                                           "shows no place, so it is drawn as zeros")):
        images = which.nonzero().flatten().tolist()
        if images:
            warn(f"the map of image{'s' if len(images) > 1 else ''} "
                 f"{', '.join(map(str, images))} at layer {layer!r} {what}. Explain a layer "
                 "with a spatial feature map (layer='auto'), or another class")


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
