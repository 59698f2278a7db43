"""DeepLIFT's rescale rule (Shrikumar et al., ICML 2017) and DeepLIFT-SHAP.

The rule is attached for one call only, as a torch function mode (:class:`RescaleRule`): the
model's modules are never wrapped, hooked or copied. The reference ``x'`` runs first, without
gradients, and the mode records the input and output of every nonlinearity in call order; the
input then runs with the mode replacing each nonlinearity, in the same order, by one whose
backward pass is the rescale rule against the recorded reference values.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from heatlens.engine.budget import items_per_chunk, progress
from heatlens.engine.layers import LayerSpec
from heatlens.engine.maps import gaussian_blur
from heatlens.engine.targets import Target
from heatlens.methods.attribution import (
    OnePassAttribution,
    PassResult,
    broadcast_reference,
    classes_and_scores,
    reference_distribution,
    with_input,
)
from heatlens.methods.registry import register

EPS = 1e-10
"""Where ``|x - x'|`` is below this, a nonlinearity passes its ordinary gradient (Captum's
default)."""

_RELUS = {torch.relu, torch.relu_, F.relu, F.relu_, Tensor.relu, Tensor.relu_}
_IN_PLACE = {torch.relu_, F.relu_, Tensor.relu_, F.elu_, F.leaky_relu_, F.hardtanh_}
_ELEMENTWISE = _RELUS | {
    torch.sigmoid, F.sigmoid, Tensor.sigmoid, torch.tanh, F.tanh, Tensor.tanh, F.elu, F.elu_,
    F.leaky_relu, F.leaky_relu_, F.softplus, F.hardtanh, F.hardtanh_, F.relu6, F.gelu, F.silu,
    F.hardswish, F.hardsigmoid, F.mish, F.selu, F.celu,
}
_POOLS = {F.max_pool1d, F.max_pool2d, F.max_pool3d}


def _out_of_place(func: Any, args: tuple, kwargs: dict) -> Callable[[Tensor], Tensor]:
    """The nonlinearity ``func(x, *args[1:], **kwargs)`` as a function of ``x`` alone, never in
    place."""
    if func in _RELUS:
        return torch.relu
    if func in _IN_PLACE:
        func = getattr(F, func.__name__.rstrip("_"))
    rest = {k: v for k, v in kwargs.items() if k != "inplace"}
    if len(args) > 1 and func in (F.elu, F.leaky_relu, F.hardtanh, F.relu6, F.selu, F.celu):
        args = args[:-1] if isinstance(args[-1], bool) else args  # a positional `inplace`
    return with_input(func, args[1:], rest) if (args[1:] or rest) else func


def _is_in_place(func: Any, args: tuple, kwargs: dict) -> bool:
    return func in _IN_PLACE or bool(kwargs.get("inplace")) or (
        len(args) > 1 and isinstance(args[-1], bool) and args[-1] and func in _ELEMENTWISE)


def _pool_of(func: Any, args: tuple, kwargs: dict) -> Callable[[Tensor], tuple[Tensor, Tensor]]:
    """Max pooling ``func(x, ...)`` as a function of ``x`` returning values and indices."""
    rest = dict(kwargs, return_indices=True)
    names = ("kernel_size", "stride", "padding", "dilation", "ceil_mode")
    rest.update(zip(names, args[1:], strict=False))
    return partial(func, **rest)


def _scatter_back(values: Tensor, indices: Tensor, shape: torch.Size) -> Tensor:
    """Sum ``values`` ``(N, C, *out)`` into zeros of ``shape`` ``(N, C, *in)`` at the flat
    spatial ``indices`` of max pooling; overlapping windows add up."""
    out = values.new_zeros(*shape[:2], shape[2:].numel())
    out.scatter_add_(2, indices.flatten(2), values.flatten(2))
    return out.reshape(shape)


class _Rescale(torch.autograd.Function):
    """An elementwise nonlinearity ``y = f(x)`` whose backward pass is the rescale rule
    ``dy/dx := (f(x) - f(x')) / (x - x')`` (the ordinary ``f'(x)`` where ``|x - x'| < eps``)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, fn: Callable[[Tensor], Tensor], x_ref: Tensor,
                y_ref: Tensor, eps: float) -> Tensor:
        y = fn(x)
        ctx.save_for_backward(x - x_ref, y - y_ref, x_ref)  # x itself may change in place
        ctx.fn, ctx.eps = fn, eps
        return y

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        dx, dy, x_ref = ctx.saved_tensors
        close = dx.abs() < ctx.eps
        rescaled = grad * dy / dx
        if bool(close.any()):
            with torch.enable_grad():
                leaf = (x_ref + dx).requires_grad_(True)
                (local,) = torch.autograd.grad(ctx.fn(leaf), leaf, grad)
            rescaled = torch.where(close, local, rescaled)
        return rescaled, None, None, None, None


class _RescalePool(torch.autograd.Function):
    """Max pooling whose backward pass gives each input its share of the output's change
    (Shrikumar et al., Sec. 3.5; Captum's rule): with ``m = max(y, y')`` the change
    ``y - y' = (m - y') + (y - m)`` goes back to the input's arg-max for the first part and to
    the reference's arg-max for the second, then is divided by ``x - x'``."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, pool: Callable[[Tensor], tuple[Tensor, Tensor]],
                x_ref: Tensor, y_ref: Tensor, index_ref: Tensor, eps: float) -> Tensor:
        y, index = pool(x)
        ctx.save_for_backward(x - x_ref, y, index, y_ref, index_ref)
        ctx.eps = eps
        return y

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        dx, y, index, y_ref, index_ref = ctx.saved_tensors
        top = torch.maximum(y, y_ref)
        change = (_scatter_back(grad * (top - y_ref), index, dx.shape)
                  + _scatter_back(grad * (y - top), index_ref, dx.shape))
        rescaled = torch.where(dx.abs() < ctx.eps, _scatter_back(grad, index, dx.shape),
                               change / dx)
        return rescaled, None, None, None, None, None


class RescaleRule(TorchFunctionMode):
    """While active on this thread, elementwise activations (ReLU in every spelling, sigmoid,
    tanh, ELU, leaky ReLU, softplus, ReLU6/hardtanh, GELU, SiLU, hard-swish, hard-sigmoid, Mish,
    SELU, CELU) and max pooling, as modules or functions, are recorded (``references=None``: the
    reference pass) or compute their usual value with the rescale rule's backward pass against
    the recorded reference values, matched by call order. Nothing of the model is changed."""

    def __init__(self, references: list[tuple[Tensor, ...]] | None = None,
                 eps: float = EPS) -> None:
        super().__init__()
        self.recording = references is None
        self.references: list[tuple[Tensor, ...]] = [] if references is None else references
        self.calls = 0
        self.eps = eps

    def __torch_function__(self, func: Any, types: Any, args: tuple = (),
                           kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        pooled = func in _POOLS and not kwargs.get("return_indices") and not (
            len(args) > 6 and args[6])
        if not (pooled or func in _ELEMENTWISE) or not isinstance(args[0], Tensor):
            return func(*args, **kwargs)
        x = args[0]
        fn = _pool_of(func, args, kwargs) if pooled else _out_of_place(func, args, kwargs)
        if self.recording:
            with torch.no_grad():
                result = fn(x)
            y, *index = result if pooled else (result,)
            self.references.append((x.detach().clone(), y, *index))
        else:
            y = self._rescaled(x, fn, pooled)
        if not pooled and _is_in_place(func, args, kwargs):
            with torch.no_grad() if self.recording else torch.enable_grad():
                x.copy_(y)  # callers of an in-place activation may ignore its return value
            return x
        return y

    def _rescaled(self, x: Tensor, fn: Callable, pooled: bool) -> Tensor:
        if self.calls >= len(self.references):
            raise RuntimeError("the input's pass ran more nonlinearities than the reference's: "
                               "DeepLIFT needs a model whose operations do not depend on the "
                               "input's values")
        reference = self.references[self.calls]
        self.calls += 1
        if reference[0].shape != x.shape:
            raise RuntimeError(
                f"nonlinearity {self.calls} saw shape {tuple(x.shape)} for the input but "
                f"{tuple(reference[0].shape)} for the reference: DeepLIFT needs the same "
                "operations on both")
        if pooled:
            return _RescalePool.apply(x, fn, *reference, self.eps)
        return _Rescale.apply(x, fn, *reference, self.eps)


def rescale_multipliers(model: nn.Module, x: Tensor, reference: Tensor, target: Target,
                        classes: Tensor | None, eps: float = EPS
                        ) -> tuple[Tensor, PassResult]:
    """DeepLIFT's multipliers ``m = d^ y_c / d^ x`` of each input against its reference (same
    shape); the pass's output, classes (``None``: read from the output) and scores, with the
    references' scores as ``details["reference_scores"]``."""
    rule = RescaleRule(eps=eps)
    with torch.no_grad(), rule:
        reference_output = model(reference)
    leaf = x.detach().requires_grad_(True)
    with torch.enable_grad():
        with RescaleRule(rule.references, eps):
            output = model(leaf)
        classes, scores = classes_and_scores(output, target, classes, x.shape[0])
    if not scores.requires_grad:
        raise ValueError("the target score does not depend on the input: no gradient can flow")
    (multipliers,) = torch.autograd.grad(scores.sum(), leaf)
    reference_scores = target.score(reference_output, classes).detach()
    return multipliers, PassResult(multipliers, output, classes, scores.detach(),
                                   {"reference_scores": reference_scores})


@register
class DeepLift(OnePassAttribution):
    """DeepLIFT with the rescale rule (Shrikumar et al., "Learning Important Features Through
    Propagating Activation Differences", ICML 2017, Eq. 1-3 and Sec. 3.5.1):
    ``A = (x - x') * m``, the multipliers ``m`` chained back from ``y_c`` as gradients are,
    except that every nonlinearity ``y = f(z)`` passes back ``(f(z) - f(z')) / (z - z')``, its
    secant between the input's and the reference's values (its derivative where
    ``|z - z'| < 1e-10``), and max pooling passes the change of each output back to the
    arg-max positions (Captum's rule, see :class:`_RescalePool`).

    Summation-to-delta (Eq. 1): ``sum A = y_c(x) - y_c(x')`` exactly, when every nonlinearity of
    the network is elementwise or a max pooling (convolutions, linear layers, batch norm in eval
    mode, residual additions and average pooling are linear); ``details["convergence_delta"]``
    reports ``sum A - (y_c(x) - y_c(x'))`` per image. Multiplications of activations
    (squeeze-and-excitation, attention) take their ordinary gradient and break it.

    The variant: the rescale rule everywhere (not RevealCancel), as Captum's ``DeepLift``. It
    differs from Captum where Captum cannot apply the rule: heatlens applies it to functional
    activations (``F.relu`` in ``forward``), to modules called several times (torchvision
    ResNet's shared ``relu``, on which Captum raises), to ReLU6, GELU, SiLU, hard-swish (Captum
    passes their gradient), and sums the arg-max shares of overlapping pooling windows (Captum
    keeps one). Where two nonlinear modules follow each other (ReLU then max pooling, as in
    VGG), Captum's tensor hooks read the gradient before the second module's rule replaced it,
    and its attributions no longer sum to ``y_c(x) - y_c(x')``; heatlens's do. Elsewhere the
    two agree to float rounding. The reference runs first without gradients and the input once
    with them, so the cost is one pass without and one pass with a backward pass (Captum runs
    both with).

    ``baseline``: ``"zeros"`` (Captum's default), ``"blur"`` (the input blurred by a Gaussian of
    ``blur_sigma`` pixels) or a tensor broadcastable to the inputs.
    """

    name = "deeplift"
    aliases = ("deep_lift",)
    distribution = False
    """Whether a tensor ``baseline`` is a distribution of references for every input."""

    def __init__(self, model: nn.Module, layer: LayerSpec = "auto", *,
                 baseline: str | Tensor = "zeros", blur_sigma: float = 8.0, eps: float = EPS,
                 **options: Any) -> None:
        super().__init__(model, layer, **options)
        if isinstance(baseline, str) and baseline not in ("zeros", "blur"):
            raise ValueError(f"baseline must be 'zeros', 'blur' or a tensor, not {baseline!r}")
        self.baseline, self.blur_sigma, self.eps = baseline, blur_sigma, eps

    def references(self, x: Tensor) -> Tensor:
        """``(K, C, *spatial)``: the reference of each input (``K = B``)."""
        if isinstance(self.baseline, Tensor):
            return broadcast_reference(self.baseline, x)
        return torch.zeros_like(x) if self.baseline == "zeros" else gaussian_blur(
            x, self.blur_sigma)

    def fits_one_pass(self, x: Tensor) -> bool:
        return not self.distribution and super().fits_one_pass(x)

    def attribute_pass(self, x: Tensor, target: Target, classes: Tensor | None) -> PassResult:
        references = self.references(x)
        paired = not (self.distribution and isinstance(self.baseline, Tensor))
        count = 1 if paired else references.shape[0]
        total = x.shape[0] * count  # pair p: input p // count, reference p % count (or p)
        step = total if classes is None else items_per_chunk(
            self.model, x[:1], self.memory_budget, with_gradients=True)
        sums = torch.zeros_like(x)
        deltas, last = [], None
        with progress(total, self.name, show=self.show_progress) as bar:
            for start in range(0, total, step):
                pairs = torch.arange(start, min(start + step, total), device=x.device)
                inputs = x[pairs // count]
                refs = references[pairs if paired else pairs % count]
                m, last = rescale_multipliers(
                    self.model, inputs, refs, target,
                    None if classes is None else classes[pairs // count], self.eps)
                attributions = (inputs - refs) * m
                sums.index_add_(0, pairs // count, attributions)
                gain = last.scores - last.details["reference_scores"]
                deltas.append(attributions.flatten(1).sum(1) - gain)
                bar.update(pairs.numel())
        delta = torch.cat(deltas)
        details = {"convergence_delta": delta if paired else delta.reshape(-1, count),
                   "baseline": references}
        assert last is not None
        if classes is not None:
            return PassResult(sums / count, None, classes, last.scores, details)
        return PassResult(sums / count, last.output, last.classes, last.scores, details)


@register
class DeepLiftShap(DeepLift):
    """DeepLIFT-SHAP (Lundberg & Lee, NeurIPS 2017, Sec. 4.2 "Deep SHAP"; Captum's
    ``DeepLiftShap``): DeepLIFT's rescale rule (see :class:`DeepLift`) against each of ``K``
    references ``x'_k`` drawn from a background distribution, averaged:
    ``A = 1/K sum_k (x - x'_k) * m(x, x'_k)``, approximating SHAP values with the expectation
    over the references as the base value.

    ``baseline``: a tensor ``(K, C, *spatial)`` of references (Captum's ``baselines``, which
    needs ``K > 1``), ``"zeros"`` or ``"blur"`` (one reference, which is DeepLIFT).
    ``details["convergence_delta"]`` is ``(B, K)``: ``sum A_k - (y_c(x) - y_c(x'_k))`` per pair.
    The ``B * K`` pairs run in chunks within the memory budget.
    """

    name = "deeplift_shap"
    aliases = ("deep_shap",)
    distribution = True

    def references(self, x: Tensor) -> Tensor:
        if isinstance(self.baseline, Tensor):
            return reference_distribution(self.baseline, x)
        return super().references(x)
