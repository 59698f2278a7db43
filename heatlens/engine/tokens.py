"""Vision-transformer layers as feature maps: the token layout, inferred with no user code.

A ViT layer outputs tokens ``(B, N, C)``: ``P`` prefix tokens (class, distillation, register
tokens, always at the front in timm, torchvision and Hugging Face) followed by the ``h x w``
patch grid in row-major order. Swin outputs channels-last maps ``(B, H, W, C)``. The CAM methods
need ``(B, C, h, w)``; :func:`infer_layout` finds which case applies and the grid:

* the patch size ``p`` is the stride of the model's patch embedding, its first convolution whose
  kernel equals its stride (timm ``patch_embed.proj``, torchvision ``conv_proj``, Hugging Face
  ``patch_embeddings.projection``);
* tokens: the grid is ``(H / (p 2^k), W / (p 2^k))`` for the smallest ``k >= 0`` that leaves
  ``0 <= P = N - h w <= 64`` tokens in front (``k > 0``: a hierarchical model's later stage), so
  square and non-square inputs both work;
* channels-last: dims 1 and 2 form such a grid and dims 2 and 3 do not.

:func:`transformer_layer` is ``layer="auto"`` for transformers: the first normalisation of the
last transformer block (timm ``blocks[-1].norm1``, torchvision ``encoder.layers[-1].ln_1``,
Hugging Face ``encoder.layer[-1].layernorm_before``, Swin ``layers[-1].blocks[-1].norm1``). Its
patch tokens feed the last attention, which the class token (or the pooled tokens) reads; after
the final normalisation only the class token reaches the output, so patch tokens there have no
gradient.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from torch import Tensor, nn

MAX_PREFIX = 64
"""At most this many prefix tokens (class + distillation + registers) are accepted."""

_PATCH: weakref.WeakKeyDictionary[nn.Module, int | None] = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class TokenLayout:
    """How a layer's output holds a ``grid`` of positions.

    ``kind`` is ``"tokens"`` (``(B, N, C)``, ``prefix`` tokens in front) or ``"channels_last"``
    (``(B, H, W, C)``)."""

    kind: str
    prefix: int
    grid: tuple[int, int]

    def describe(self, shape: tuple[int, ...]) -> str:
        """One line for :attr:`heatlens.Explanation.details`."""
        h, w = self.grid
        if self.kind == "channels_last":
            return f"channels-last map {shape}: a {h} x {w} grid, channels last"
        front = f"{self.prefix} prefix token{'s' if self.prefix != 1 else ''}"
        return f"tokens {shape}: {front} (class/distillation/register) then a {h} x {w} patch grid"

    def to_map(self, output: Tensor) -> Tensor:
        """The layer's output as ``(B, C, h, w)``; prefix tokens are left out."""
        if self.kind == "channels_last":
            return output.permute(0, 3, 1, 2)
        patches = output[:, self.prefix :]
        return patches.transpose(1, 2).reshape(output.shape[0], output.shape[2], *self.grid)

    def to_output(self, maps: Tensor, like: Tensor) -> Tensor:
        """The inverse of :meth:`to_map` for ``maps`` ``(n, C, h, w)``, the prefix tokens taken
        from ``like`` (the layer's own output for one image, ``(1, ...)``)."""
        if self.kind == "channels_last":
            return maps.permute(0, 2, 3, 1)
        patches = maps.flatten(2).transpose(1, 2)
        front = like[:, : self.prefix].expand(maps.shape[0], -1, -1)
        return torch.cat((front.to(patches.dtype), patches), dim=1)


def patch_size(model: nn.Module) -> int | None:
    """The stride of the model's patch embedding, or ``None`` for a model without one."""
    if model in _PATCH:
        return _PATCH[model]
    found = None
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            kernel, stride = module.kernel_size, module.stride
            if kernel == stride and kernel[0] == kernel[1] and kernel[0] > 1:
                found = kernel[0]
            break
    _PATCH[model] = found
    return found


def _grids(size: tuple[int, int], patch: int) -> list[tuple[int, int]]:
    grids, step = [], patch
    while step <= min(size):
        grids.append((size[0] // step, size[1] // step))
        step *= 2
    return grids


def infer_layout(model: nn.Module, output: Tensor, inputs: Tensor) -> TokenLayout | None:
    """The token layout of a layer's ``output`` for ``inputs`` ``(B, C, H, W)``, or ``None``
    when the output is not tokens or a channels-last map of a transformer."""
    if inputs.ndim != 4 or output.shape[0] != inputs.shape[0] or output.ndim not in (3, 4):
        return None
    patch = patch_size(model)
    if patch is None:
        return None
    grids = _grids(tuple(inputs.shape[2:]), patch)
    if output.ndim == 3:
        return _tokens(output.shape[1], grids)
    first, second = tuple(output.shape[1:3]), tuple(output.shape[2:4])
    if first in grids and second not in grids:
        return TokenLayout("channels_last", 0, first)
    return None


def _tokens(count: int, grids: list[tuple[int, int]]) -> TokenLayout | None:
    for h, w in grids:
        if 0 <= count - h * w <= MAX_PREFIX:
            return TokenLayout("tokens", count - h * w, (h, w))
    return None


def token_layout(model: nn.Module, count: int, inputs: Tensor) -> TokenLayout:
    """The layout of ``count`` tokens of a plain ViT for ``inputs`` ``(B, C, H, W)``; a
    ``ValueError`` when they do not form the model's patch grid."""
    patch = patch_size(model)
    layout = None
    if patch is not None and inputs.ndim == 4:
        layout = _tokens(count, _grids(tuple(inputs.shape[2:]), patch)[:1])
    if layout is None:
        raise ValueError(
            f"cannot lay out {count} attention tokens on a patch grid for inputs of shape "
            f"{tuple(inputs.shape)} (patch size {patch}): the model's attention is not over "
            "the image's patches (plus class/register tokens)"
        )
    return layout


def transformer_layer(model: nn.Module) -> tuple[str, str] | None:
    """``layer="auto"`` for a transformer: the first normalisation module of the block that
    holds the last attention module, or ``None`` for a model without attention."""
    names = [name for name, module in model.named_modules() if _is_attention(module)]
    if not names:
        return None
    last = names[-1]
    modules = dict(model.named_modules())
    parts = last.split(".")
    for cut in range(len(parts) - 1, 0, -1):  # the innermost block that is an item of a list
        block = ".".join(parts[:cut])
        parent = modules[".".join(parts[: cut - 1])] if cut > 1 else model
        if isinstance(parent, nn.Sequential | nn.ModuleList):
            break
    else:
        return None
    norms = [name for name, module in modules[block].named_modules()
             if isinstance(module, nn.LayerNorm | nn.RMSNorm)]
    if not norms:
        return None
    name = f"{block}.{norms[0]}"
    return name, (
        f"'{name}' is the first normalisation of the last transformer block '{block}': its "
        "patch tokens feed the last attention, which the class token reads (after the final "
        "normalisation only the class token reaches the output)"
    )


def _is_attention(module: nn.Module) -> bool:
    return isinstance(module, nn.MultiheadAttention) or (
        type(module).__name__.endswith("Attention") and any(
            isinstance(child, nn.Linear) for child in module.children())
    )


def is_feature_map(output: Tensor, inputs: Tensor) -> bool:
    """Whether ``output`` is a feature map ``(B, C, *spatial)`` over the grid of ``inputs``
    ``(B, C_in, *spatial_in)``: as many spatial dimensions, each at most twice the input's, and
    the same stride along each (within a factor of two, for rounding). MaxViT's windows
    ``(B, 1, 49, 512)`` have the rank of a map but not its grid."""
    if output.ndim != inputs.ndim or output.shape[0] != inputs.shape[0] or output.ndim < 3:
        return False
    sizes, full = output.shape[2:], inputs.shape[2:]
    if any(not 1 <= s <= 2 * f for s, f in zip(sizes, full, strict=True)):
        return False
    strides = [f / s for s, f in zip(sizes, full, strict=True) if s > 1]
    return not strides or max(strides) <= 2 * min(strides)


def layer_layout(model: nn.Module, name: str, output: Tensor, x: Tensor) -> TokenLayout | None:
    """The token layout of a transformer layer's output (``None`` for a feature map
    ``(B, C, *spatial)``); a ``ValueError`` for an output that is neither."""
    layout = infer_layout(model, output, x)
    if layout is None and not is_feature_map(output, x):
        raise ValueError(
            f"layer {name!r} outputs shape {tuple(output.shape)}, neither a feature map "
            f"(B, C, *spatial) over the input's grid {tuple(x.shape[2:])} nor the tokens of a "
            "patch grid; choose another layer (see `heatlens layers`)"
        )
    return layout


def as_map(layout: TokenLayout | None, output: Tensor | None) -> Tensor | None:
    """``output`` as ``(B, C, *spatial)``: a transformer layer's tokens rearranged."""
    return output if layout is None or output is None else layout.to_map(output)
