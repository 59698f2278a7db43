"""Layer-wise relevance propagation with the epsilon, gamma and z-plus rules.

The rules are attached for one call only, as a torch function mode (:class:`RelevanceRules`):
every convolution, linear layer, batch norm, pooling and residual addition computes its usual
value, and its backward pass carries relevance instead of gradient. Nothing of the model is
changed (no weights are rewritten, no hooks are left, no copy is made).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from heatlens.engine.layers import LayerSpec
from heatlens.engine.targets import Target
from heatlens.methods.attribution import (
    OnePassAttribution,
    PassResult,
    classes_and_scores,
    with_input,
)
from heatlens.methods.registry import register

STABILISER = 1e-9
"""The ``eps`` of ``z + eps sign(z)`` in the gamma and z-plus rules (Captum's)."""

_WEIGHTED = {F.conv1d: "conv", F.conv2d: "conv", F.conv3d: "conv", F.linear: "linear"}
_KINDS = {
    **_WEIGHTED, F.batch_norm: "batch_norm",
    F.max_pool1d: "pool", F.max_pool2d: "pool", F.max_pool3d: "pool",
    F.avg_pool1d: "pool", F.avg_pool2d: "pool", F.avg_pool3d: "pool",
    F.adaptive_avg_pool1d: "pool", F.adaptive_avg_pool2d: "pool", F.adaptive_avg_pool3d: "pool",
    F.adaptive_max_pool1d: "pool", F.adaptive_max_pool2d: "pool", F.adaptive_max_pool3d: "pool",
    torch.add: "add", Tensor.add: "add", Tensor.add_: "add", Tensor.__add__: "add",
    Tensor.__iadd__: "add", Tensor.__radd__: "add",
}
_PASS_THROUGH = {torch.tanh, F.tanh, Tensor.tanh}
"""Nonlinearities that pass relevance on unchanged (ReLU's gradient does so already: the
relevance of a unit it zeroed is zero)."""
_NO_RULE = {
    F.gelu: "GELU", F.silu: "SiLU", torch.sigmoid: "Sigmoid", F.sigmoid: "Sigmoid",
    Tensor.sigmoid: "Sigmoid", F.softmax: "Softmax", F.layer_norm: "LayerNorm",
    F.group_norm: "GroupNorm", F.hardtanh: "ReLU6/Hardtanh", F.relu6: "ReLU6", F.elu: "ELU",
    F.leaky_relu: "LeakyReLU", F.hardswish: "Hardswish", F.mish: "Mish",
    F.scaled_dot_product_attention: "attention", torch.matmul: "matmul", torch.bmm: "bmm",
}
_MODULES = (
    nn.modules.conv._ConvNd, nn.Linear, nn.modules.batchnorm._BatchNorm, nn.ReLU, nn.Tanh,
    nn.modules.dropout._DropoutNd, nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AvgPoolNd,
    nn.modules.pooling._AdaptiveAvgPoolNd, nn.modules.pooling._AdaptiveMaxPoolNd, nn.Flatten,
    nn.Unflatten, nn.Identity,
)
RULES = ("epsilon", "gamma", "zplus")
KINDS = ("conv", "linear", "batch_norm", "pool", "add")


def unsupported_layers(model: nn.Module) -> list[str]:
    """Type names of the model's leaf modules that LRP has no rule for."""
    return sorted({type(m).__name__ for m in model.modules()
                   if not list(m.children()) and not isinstance(m, _MODULES)})


class _Relevance(torch.autograd.Function):
    """``z = f(x_1, ..., x_n)`` whose backward pass turns the relevance ``R`` of ``z`` into
    ``R_i = x_i * d/dx_i [f'(x) . s]`` with ``s = R / (z' + eps sign z')``, ``z' = f'(x)`` the
    operation with the rule's weights (``f' = f`` for epsilon: its graph is kept from the
    forward pass, nothing is computed twice)."""

    @staticmethod
    def forward(ctx: Any, fn: Callable[..., Tensor], rule_fn: Callable[..., Tensor] | None,
                eps: float, *xs: Tensor) -> Tensor:
        with torch.enable_grad():
            ctx.leaves = [x.detach().requires_grad_(True) for x in xs]
            z = fn(*ctx.leaves)
            ctx.z = z if rule_fn is None else rule_fn(*ctx.leaves)
        ctx.eps, ctx.versions = eps, [x._version for x in xs]
        return z.detach().clone()  # an in-place ReLU on the output must not reach ctx.z

    @staticmethod
    def backward(ctx: Any, relevance: Tensor) -> tuple[Tensor | None, ...]:
        if [x._version for x in ctx.leaves] != ctx.versions:
            raise RuntimeError("an input of a layer was changed in place after the layer read "
                               "it, so LRP cannot use it; make that operation out of place")
        z = ctx.z.detach()
        sign = torch.where(z >= 0, 1.0, -1.0).to(z)
        shares = torch.autograd.grad(ctx.z, ctx.leaves, relevance / (z + ctx.eps * sign))
        return (None, None, None, *(x.detach() * c
                                    for x, c in zip(ctx.leaves, shares, strict=True)))


class _PassThrough(torch.autograd.Function):
    """``f(x)`` whose backward pass hands the relevance on unchanged."""

    @staticmethod
    def forward(ctx: Any, fn: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
        return fn(x)

    @staticmethod
    def backward(ctx: Any, relevance: Tensor) -> tuple[None, Tensor]:
        return None, relevance


def _weighted(func: Any, rule: str, gamma: float, args: tuple, kwargs: dict
              ) -> Callable[[Tensor], Tensor]:
    """The convolution or linear layer ``func(x, weight, bias, ...)`` with the rule's
    parameters: gamma ``w + gamma w+`` (bias kept), z-plus ``w+`` without bias."""
    values = dict(zip(("weight", "bias"), args[1:3], strict=False), **kwargs)
    weight, bias = values.pop("weight").detach(), values.pop("bias", None)
    bias = None if bias is None else bias.detach()
    if rule == "gamma":
        weight = weight + gamma * weight.clamp_min(0)
    elif rule == "zplus":
        weight, bias = weight.clamp_min(0), None
    return partial(func, weight=weight, bias=bias, **dict(zip(("stride", "padding", "dilation",
                                                               "groups"), args[3:],
                                                              strict=False)), **values)


class RelevanceRules(TorchFunctionMode):
    """While active on this thread, convolutions, linear layers, batch norms, poolings and
    additions of two tensors of one shape (residual connections) propagate relevance by their
    rule, tanh passes it on, and a nonlinearity without a rule raises a ``TypeError``."""

    def __init__(self, rules: Mapping[str, str], epsilon: float, gamma: float) -> None:
        super().__init__()
        self.rules, self.epsilon, self.gamma = rules, epsilon, gamma

    def __torch_function__(self, func: Any, types: Any, args: tuple = (),
                           kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        kind = _KINDS.get(func)
        if func in _NO_RULE:
            raise TypeError(f"LRP has no rule for {_NO_RULE[func]}: use a network of "
                            "convolutions, linear layers, batch norms, ReLU, tanh, pooling and "
                            "residual additions, or another method (deeplift, gradient_shap)")
        if func in _PASS_THROUGH:
            return _PassThrough.apply(with_input(func, args[1:], kwargs), args[0])
        if kind is None or not isinstance(args[0], Tensor):
            return func(*args, **kwargs)
        if kind == "add":
            return self._add(func, args, kwargs)
        if func in (F.max_pool1d, F.max_pool2d, F.max_pool3d) and (
                kwargs.get("return_indices") or (len(args) > 6 and args[6])):
            return func(*args, **kwargs)
        rule = self.rules.get(kind, "epsilon")
        fn = with_input(func, args[1:], kwargs)
        rule_fn = _weighted(func, rule, self.gamma, args, kwargs) if kind in _WEIGHTED.values(
            ) and rule != "epsilon" else None
        return _Relevance.apply(fn, rule_fn, self.epsilon if rule == "epsilon" else STABILISER,
                                args[0])

    def _add(self, func: Any, args: tuple, kwargs: dict) -> Any:
        a, b = args[0], args[1] if len(args) > 1 else kwargs.get("other")
        if not (isinstance(b, Tensor) and b.shape == a.shape) or len(args) > 2 or (
                kwargs.keys() - {"other"}):
            return func(*args, **kwargs)
        in_place = func in (Tensor.add_, Tensor.__iadd__)
        if in_place:  # `a` is overwritten below: the rule keeps its value
            a = a.clone()
        total = _Relevance.apply(torch.add, None, self.epsilon, a, b)
        if in_place:
            args[0].copy_(total)  # callers of an in-place add may ignore its return value
            return args[0]
        return total


@register
class LRP(OnePassAttribution):
    """Layer-wise relevance propagation (Bach et al., PLoS ONE 2015; the rules as in Montavon
    et al., "Layer-Wise Relevance Propagation: An Overview", 2019, Sec. 10.2). The relevance
    ``R = y_c`` of the output flows back layer by layer; a layer ``z_k = sum_j a_j w_jk + b_k``
    hands its inputs ``R_j = sum_k a_j w'_jk / (z'_k + eps sign z'_k) R_k`` with
    ``z'_k = sum_j a_j w'_jk + b'_k``, where by ``rule``:

    * ``"epsilon"`` (LRP-eps): ``w' = w``, ``b' = b``, ``eps = epsilon`` (``1e-9``, Captum's);
    * ``"gamma"`` (LRP-gamma): ``w' = w + gamma w+``, ``b' = b`` (Captum's ``GammaRule``);
    * ``"zplus"`` (LRP-z+, LRP-alpha1-beta0): ``w' = w+``, ``b' = 0`` (Captum's
      ``Alpha1_Beta0_Rule(set_bias_to_zero=True)``); gamma and z-plus take ``eps = 1e-9``.

    ``rules`` gives a rule per layer kind, ``"conv"``, ``"linear"``, ``"batch_norm"``,
    ``"pool"``, ``"add"`` (the default: epsilon everywhere, Captum's default); batch norm,
    pooling and additions take only the epsilon rule. ReLU and dropout pass relevance through
    (a ReLU's zeroed unit has none), and so does tanh.

    The variants chosen: max and average pooling take the epsilon rule (relevance to the
    arg-max, or in proportion), as Captum. Batch norm is its own layer under the epsilon rule
    (Captum's choice; not merged into the convolution before it), so its shift absorbs
    relevance. ResNet's residual addition ``z = a + b`` splits ``R`` in proportion,
    ``R_a = a / (z + eps sign z) R`` (the epsilon rule on the sum; Captum needs the model
    rewritten with its ``Addition_Module`` for this and rejects the ReLU module ResNet uses
    twice per block, which heatlens handles as any call). With zero biases and batch norms
    without shift the epsilon rule conserves relevance: ``sum R_input = y_c`` up to ``eps``.

    A layer or function without a rule (GELU, SiLU, sigmoid, softmax, layer norm, ReLU6,
    attention, ...) raises a ``TypeError`` naming its type before any work.
    """

    name = "lrp"
    aliases = ("layerwise_relevance_propagation",)

    def __init__(self, model: nn.Module, layer: LayerSpec = "auto", *,
                 rules: Mapping[str, str] | None = None, epsilon: float = 1e-9,
                 gamma: float = 0.25, **options: Any) -> None:
        super().__init__(model, layer, **options)
        rules = dict(rules or {})
        for kind, rule in rules.items():
            if kind not in KINDS or rule not in RULES:
                raise ValueError(f"rules map layer kinds {KINDS} to rules {RULES}, not "
                                 f"{kind!r}: {rule!r}")
            if rule != "epsilon" and kind not in ("conv", "linear"):
                raise ValueError(f"{kind} layers take only the epsilon rule, not {rule!r}")
        missing = unsupported_layers(self.model)
        if missing:
            raise TypeError(f"LRP has no rule for layer type(s) {', '.join(missing)}; it "
                            "handles convolutions, linear layers, batch norms, ReLU, tanh, "
                            "dropout, pooling, flatten and residual additions")
        self.rules, self.epsilon, self.gamma = rules, epsilon, gamma

    def attribute_pass(self, x: Tensor, target: Target, classes: Tensor | None) -> PassResult:
        if classes is not None and not self.fits_one_pass(x):
            relevances, scores = self.chunked_gradients(x, target, classes, self.rules_for_call)
            output = None
        else:
            leaf = x.detach().requires_grad_(True)
            with torch.enable_grad():
                with self.rules_for_call():
                    output = self.model(leaf)
                classes, scores = classes_and_scores(output, target, classes, x.shape[0])
            (relevances,) = torch.autograd.grad(scores.sum(), leaf)
        scores = scores.detach()
        attributions = relevances * scores.reshape(-1, *[1] * (x.ndim - 1))
        return PassResult(attributions, output, classes, scores,
                          {"convergence_delta": attributions.flatten(1).sum(1) - scores})

    def rules_for_call(self) -> RelevanceRules:
        """The rules, as a torch function mode for one pass."""
        return RelevanceRules(self.rules, self.epsilon, self.gamma)
