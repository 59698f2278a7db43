"""Explanations read from a vision transformer's attention: attention rollout, gradient-weighted
rollout, and Chefer et al.'s gradient-weighted relevance.

All three combine the per-layer attention ``A_l`` ``(B, heads, N, N)`` (captured even under fused
attention, see :mod:`heatlens.engine.attention`) into one ``N x N`` matrix and read the row of the
class token (token 0) over the patch tokens, which are reshaped to the patch grid (prefix tokens
such as distillation and register tokens take part in the products but are not shown). For a model
without a class token the rows of all patch tokens are averaged. """

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from heatlens.engine.attention import attention_recorded
from heatlens.engine.layers import LayerSpec
from heatlens.engine.maps import minmax, upsample
from heatlens.engine.targets import Target
from heatlens.engine.tokens import TokenLayout, token_layout
from heatlens.explanation import Explanation
from heatlens.methods.base import Explainer, build_explanation
from heatlens.methods.registry import register

HEAD_FUSIONS = ("mean", "max", "min")


def fuse_heads(attention: Tensor, fusion: str) -> Tensor:
    """``(B, heads, N, N)`` to ``(B, N, N)`` by the mean, max or min over heads."""
    if fusion == "mean":
        return attention.mean(dim=1)
    if fusion == "max":
        return attention.amax(dim=1)
    return attention.amin(dim=1)


def discard_lowest(fused: Tensor, ratio: float, prefix: int) -> Tensor:
    """Set the lowest ``int(N^2 ratio)`` of each image's ``N x N`` entries to 0, never those in
    the prefix (class) tokens' columns: attention paid to the class token is always kept (at
    most the ``N (N - prefix)`` other entries go; ``ratio = 0`` changes nothing)."""
    batch, n, _ = fused.shape
    keep = torch.zeros_like(fused, dtype=torch.bool)
    keep[:, :, :prefix] = True
    flat = fused.masked_fill(keep, float("inf")).flatten(1)
    count = min(int(flat.shape[1] * ratio), n * (n - prefix))
    lowest = flat.topk(count, largest=False).indices
    return fused.flatten(1).scatter(1, lowest, 0.0).reshape(batch, n, n)


def rollout(fused: list[Tensor]) -> Tensor:
    """Abnar & Zuidema (ACL 2020, Sec. 3): with ``Ā_l = (A_l + I) / 2`` rows normalised to
    sum 1, ``R = Ā_L Ā_{L-1} ... Ā_1``; ``fused`` are the ``(B, N, N)`` matrices of the layers
    in the order they run. The halving cancels in the normalisation, so ``Ā_l`` is computed as
    ``A_l + I`` over its row sums."""
    eye = torch.eye(fused[0].shape[-1], dtype=fused[0].dtype, device=fused[0].device)
    result = eye.expand_as(fused[0])
    for attention in fused:
        step = attention + eye
        step = step / step.sum(dim=-1, keepdim=True)
        result = step @ result
    return result


def class_row(relevance: Tensor, layout: TokenLayout) -> Tensor:
    """``(B, N, N)`` to ``(B, h, w)``: the class token's row over the patches (the patch
    rows' mean without a class token)."""
    patches = relevance[:, :, layout.prefix :]
    row = patches[:, 0] if layout.prefix > 0 else patches.mean(dim=1)
    return row.reshape(relevance.shape[0], *layout.grid)


class AttentionExplainer(Explainer):
    """Shared by the attention methods: capture, target, and the map at the input's size.

    Args:
        model: a vision transformer (timm, torchvision or Hugging Face); left as it was.
        layer: only ``"auto"`` (every attention layer takes part).
        head_fusion: ``"mean"``, ``"max"`` or ``"min"`` over heads (rollout methods).
        discard_ratio: the share of the lowest fused attention values set to 0 in each layer
            (rollout methods), never attention paid to the class token.
    """

    family = "transformer methods"
    needs_gradients: ClassVar[bool] = False

    def __init__(self, model: nn.Module, layer: LayerSpec = "auto", *, head_fusion: str = "mean",
                 discard_ratio: float = 0.0) -> None:
        super().__init__(model)
        if not (isinstance(layer, str) and layer == "auto"):
            raise ValueError(f"{self.name} combines every attention layer: layer= does not "
                             "apply (use a CAM method to explain one layer)")
        if head_fusion not in HEAD_FUSIONS:
            raise ValueError(f"head_fusion must be one of {HEAD_FUSIONS}, not {head_fusion!r}")
        if not 0 <= discard_ratio < 1:
            raise ValueError(f"discard_ratio must be in [0, 1), not {discard_ratio}")
        self.head_fusion, self.discard_ratio = head_fusion, discard_ratio

    def relevance(self, attentions: list[Tensor], gradients: list[Tensor] | None,
                  layout: TokenLayout) -> Tensor:
        """The ``(B, N, N)`` token relevance from the layers' attention (and gradients)."""
        raise NotImplementedError

    def _explain(self, x: Tensor, target: Target) -> Explanation:
        goal = target
        inputs = x.detach().requires_grad_(self.needs_gradients)
        with attention_recorded(self.model) as attentions, \
                torch.set_grad_enabled(self.needs_gradients):
            output = self.model(inputs)
            classes = goal.classes(output, x.shape[0]).to(x.device)
            scores = goal.score(output, classes)
        layout = token_layout(self.model, attentions[0].shape[-1], x)
        gradients = self._gradients(scores, attentions) if self.needs_gradients else None
        with torch.no_grad():
            relevance = self.relevance([a.detach().float() for a in attentions], gradients, layout)
            raw = class_row(relevance, layout)
            maps = minmax(upsample(raw, x.shape[2:]))
        details: dict[str, Any] = {
            "token_layout": layout.describe((x.shape[0], attentions[0].shape[-1])),
            "attention_layers": len(attentions),
        }
        return build_explanation(self.name, maps, {"attention": raw}, output, goal, classes,
                                 scores, ("attention",), "all attention layers", details)

    def _gradients(self, scores: Tensor, attentions: list[Tensor]) -> list[Tensor]:
        if not scores.requires_grad:
            raise ValueError("the target score does not depend on the attention: no gradient "
                             "can flow")
        grads = torch.autograd.grad(scores.sum(), attentions, allow_unused=True)
        return [torch.zeros_like(a) if g is None else g.detach().float()
                for a, g in zip(attentions, grads, strict=True)]


@register
class AttentionRollout(AttentionExplainer):
    """Attention rollout (Abnar & Zuidema, "Quantifying Attention Flow in Transformers", ACL
    2020): heads fused (``head_fusion``), the lowest values discarded (``discard_ratio``), the
    identity added for the residual connection, rows normalised, and the layers multiplied,
    ``R = Ā_L ... Ā_1``; the map is the class token's row. Class-agnostic: ``target`` only
    names what is reported."""

    name = "attention_rollout"
    aliases = ("rollout",)

    def relevance(self, attentions: list[Tensor], gradients: list[Tensor] | None,
                  layout: TokenLayout) -> Tensor:
        return rollout([discard_lowest(fuse_heads(a, self.head_fusion), self.discard_ratio,
                                       layout.prefix) for a in attentions])


@register
class GradientRollout(AttentionExplainer):
    """Gradient-weighted attention rollout (class-specific): each layer's attention is
    weighted by the gradient of the target score with respect to that same layer's attention,
    ``F_l = max(0, fuse_h(A_l * dy_c/dA_l))``, then rolled out as in :class:`AttentionRollout`
    (as in the vit-explain project, with every layer paired with its own gradient)."""

    name = "gradient_rollout"
    aliases = ("grad_rollout",)
    needs_gradients = True

    def relevance(self, attentions: list[Tensor], gradients: list[Tensor] | None,
                  layout: TokenLayout) -> Tensor:
        assert gradients is not None
        fused = [discard_lowest(fuse_heads(a * g, self.head_fusion).clamp_min(0),
                                self.discard_ratio, layout.prefix)
                 for a, g in zip(attentions, gradients, strict=True)]
        return rollout(fused)


@register
class Chefer(AttentionExplainer):
    """Chefer, Gur & Wolf, "Generic Attention-model Explainability for Interpreting Bi-Modal
    and Encoder-Decoder Transformers" (ICCV 2021, Eqs. 5-6), for self-attention: with
    ``Ā_l = E_h[(dy_c/dA_l * A_l)^+]`` (mean over heads of the positive part),
    ``R_0 = I`` and ``R_l = R_{l-1} + Ā_l R_{l-1}``; the map is the class token's row of ``R_L``
    over the patches.

    Chosen over the same authors' CVPR 2021 "transformer attribution", which needs
    layer-specific LRP rules for every module (GELU, LayerNorm, softmax, ...) and so a
    re-implemented model; this rule needs only each layer's attention and its gradient, works on
    the model as it is, and is the authors' own generalisation of the CVPR method. (LeGrad needs
    the final norm and head applied to every layer's tokens, which is model-specific.)"""

    name = "chefer"
    aliases = ("chefer2021", "generic_attention", "transformer_attribution")
    needs_gradients = True

    def relevance(self, attentions: list[Tensor], gradients: list[Tensor] | None,
                  layout: TokenLayout) -> Tensor:
        assert gradients is not None
        eye = torch.eye(attentions[0].shape[-1], dtype=attentions[0].dtype,
                        device=attentions[0].device)
        result = eye.expand(attentions[0].shape[0], -1, -1)
        for attention, grad in zip(attentions, gradients, strict=True):
            weighted = (grad * attention).clamp_min(0).mean(dim=1)
            result = result + weighted @ result
        return result
