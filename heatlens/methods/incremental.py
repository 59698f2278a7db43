"""Incremental inference for occlusion: recompute only what an occluding window changes.

An occluding window changes the input in a small rectangle, and a feature map early in a CNN
only where its receptive field meets that rectangle. So the layers before a *cut* run on a crop
of the input around the window, and the changed part of the cut's output is pasted into the
clean image's feature map; the layers after the cut run as usual. This is the exact part of
Nakandala, Kumar & Papakonstantinou, "Incremental and Approximate Inference for Faster
Occlusion-based Deep CNN Explanations" (SIGMOD 2019), done with hooks on an unchanged model.

Receptive fields come from the convolutions and poolings that run before the cut: with ``s`` the
input's stride at a layer (input size over the layer's input size), a layer of kernel ``k``,
dilation ``d`` and padding ``p`` widens the field by ``p s`` to the left and ``(d (k-1) - p) s``
to the right. Every such layer is counted, on every path, so the field is never too small.
Output ``o`` of a cut of stride ``S`` then sees input ``[o S - L, o S + R]``, and its value
computed on a crop is exact when that interval lies in the crop (or leaves it only where the
crop ends at the image border). Crops start at multiples of ``S``, so the crop's outputs line up
with the image's.

What hooks cannot see (a global pooling written as ``x.mean()`` in ``forward``, batch statistics
in training mode) would make a crop wrong; so a plan is checked before use: three windows
(first, middle, last) are scored both ways and must agree, else occlusion runs full passes.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from heatlens.engine.budget import channels_last
from heatlens.engine.hooks import forward_hooks

NON_LOCAL = (
    nn.modules.pooling._AdaptiveAvgPoolNd,
    nn.modules.pooling._AdaptiveMaxPoolNd,
    nn.Linear,
    nn.MultiheadAttention,
    nn.GroupNorm,
    nn.LayerNorm,
    nn.modules.instancenorm._InstanceNorm,
    nn.LocalResponseNorm,
    nn.Upsample,
    nn.Flatten,
)
"""Modules whose output at a place depends on more than a neighbourhood of that place: no cut
after them."""

WORTH_IT = 0.85
"""A cut is used when it is estimated to cost at most this fraction of full passes."""


@dataclass(frozen=True)
class Span:
    """One spatial dimension of a plan, per window position: the changed outputs
    ``lo ... hi`` of the cut and the first input element ``start`` of the crop."""

    lo: Tensor
    hi: Tensor
    start: Tensor
    length: int
    stride: int


@dataclass(frozen=True)
class CutPlan:
    """Where to cut and how large the crops are."""

    name: str
    module: nn.Module
    spans: tuple[Span, Span]
    cost: float
    """Estimated cost of one window as a fraction of a full pass."""


@dataclass(frozen=True)
class _Call:
    name: str
    module: nn.Module
    in_size: tuple[int, ...] | None
    out_shape: tuple[int, ...] | None
    flops: int


class _Stop(Exception):
    """Ends a probe pass at the cut."""


def _first_tensor(args: Any) -> Tensor | None:
    return next((a for a in args if isinstance(a, Tensor)), None)


def _flops(module: nn.Module, out: Tensor | None) -> int:
    if out is None:
        return 0
    if isinstance(module, nn.modules.conv._ConvNd):
        return out.numel() * module.in_channels // module.groups * math.prod(module.kernel_size)
    if isinstance(module, nn.Linear):
        return out.numel() * module.in_features
    return 0


def _calls(model: nn.Module, image: Tensor) -> list[_Call]:
    """Every module's calls in the order they finish, on one image."""
    names = {module: name for name, module in model.named_modules()}
    calls: list[_Call] = []

    def hook(module: nn.Module, args: Any, output: Any) -> None:
        first = _first_tensor(args)
        out = output if isinstance(output, Tensor) else None
        calls.append(_Call(names[module], module,
                           tuple(first.shape[2:]) if first is not None else None,
                           tuple(out.shape) if out is not None else None, _flops(module, out)))

    with forward_hooks((m, hook) for m in names), torch.inference_mode():
        model(image)
    return calls


def _widening(call: _Call, size: tuple[int, ...]) -> tuple[list[int], list[int]] | None:
    """How far a convolution or pooling widens the receptive field, left and right, per
    dimension, in input elements; ``None`` for a layer that does not (or that cannot say)."""
    module = call.module
    if not isinstance(module, nn.modules.conv._ConvNd | nn.MaxPool2d | nn.AvgPool2d):
        return None
    if call.in_size is None:
        return None

    def pair(value: Any) -> tuple[int, int]:
        return (value, value) if isinstance(value, int) else tuple(value)

    kernel, dilation = pair(module.kernel_size), pair(getattr(module, "dilation", 1))
    padding = module.padding
    if isinstance(padding, str):  # "same" / "valid" convolutions
        padding = (tuple(d * (k - 1) // 2 for k, d in zip(kernel, dilation, strict=True))
                   if padding == "same" else (0, 0))
    padding = pair(padding)
    left, right = [], []
    for n, m, k, d, p in zip(size, call.in_size, kernel, dilation, padding, strict=True):
        s = max(1, round(n / m))
        left.append(p * s)
        right.append(max(0, d * (k - 1) - p) * s)
    return left, right


def _unplanned(module: nn.Module) -> bool:
    """Convolutions and poolings whose receptive field is not worked out here: not 2-D (a 1-D
    convolution over channels, as in ECA attention) or transposed (upsampling)."""
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        return True
    spatial = (nn.modules.conv._ConvNd, nn.modules.pooling._MaxPoolNd,
               nn.modules.pooling._AvgPoolNd)
    return isinstance(module, spatial) and not isinstance(
        module, nn.Conv2d | nn.MaxPool2d | nn.AvgPool2d)


def _allowed(model: nn.Module) -> set[str]:
    """Names of modules where a cut makes sense: the model's children and, recursively, the
    children of those that are sequences (a cut inside a residual block would miss its skip
    connection)."""
    allowed: set[str] = set()
    stack = [("", model)]
    while stack:
        prefix, parent = stack.pop()
        for child, module in parent.named_children():
            name = f"{prefix}.{child}" if prefix else child
            allowed.add(name)
            if isinstance(module, nn.Sequential | nn.ModuleList):
                stack.append((name, module))
    return allowed


def _span(rows: Tensor, size: int, stride: int, left: int, right: int, outputs: int
          ) -> Span:
    """The crops of one dimension for window positions ``rows`` ``(positions, size)``."""
    index = torch.arange(size)
    covered = rows.cpu()
    a = torch.where(covered, index, size).min(dim=1).values
    b = torch.where(covered, index, -1).max(dim=1).values + 1
    lo = torch.div(a - right + stride - 1, stride, rounding_mode="floor").clamp(min=0)
    hi = torch.div(b - 1 + left, stride, rounding_mode="floor").clamp(max=outputs - 1)
    need_lo = (lo * stride - left).clamp(min=0)
    need_hi = (hi * stride + right + 1).clamp(max=size)
    first = torch.div(need_lo, stride, rounding_mode="floor") * stride
    length = int((need_hi - first).max())
    while length < size:  # crops near the far border start earlier, to stay inside the image
        start = torch.minimum(first, torch.tensor((size - length) // stride * stride))
        short = int((need_hi - start - length).max())
        if short <= 0:
            return Span(lo, hi, start, length, stride)
        length += short
    return Span(lo, hi, torch.zeros_like(lo), size, stride)


def plan_cut(model: nn.Module, x: Tensor, rows: list[Tensor]) -> CutPlan | None:
    """The cheapest cut for occluding windows ``rows`` (per dimension of ``(C, H, W)``, as
    :meth:`Occlusion.windows` gives them) on images like ``x`` ``(B, C, H, W)``, or ``None``
    where no cut is worth it or possible (not a 2-D image, windows over part of the channels)."""
    if x.ndim != 4 or rows[0].shape[0] != 1 or not bool(rows[0].all()):
        return None
    size = tuple(x.shape[2:])
    calls = _calls(model, x[:1])
    total = sum(call.flops for call in calls)
    counts: dict[nn.Module, int] = {}
    for call in calls:
        counts[call.module] = counts.get(call.module, 0) + 1
    allowed = _allowed(model)
    left, right = [0, 0], [0, 0]
    done = 0
    options: list[CutPlan] = []
    for call in calls:
        if isinstance(call.module, NON_LOCAL) or total == 0 or _unplanned(call.module):
            break
        done += call.flops
        widening = _widening(call, size)
        if widening is not None:
            left = [t + w for t, w in zip(left, widening[0], strict=True)]
            right = [t + w for t, w in zip(right, widening[1], strict=True)]
        shape = call.out_shape
        if (call.name not in allowed or counts[call.module] != 1 or shape is None
                or len(shape) != 4 or shape[0] != 1):
            continue
        strides = [max(1, round(n / m)) for n, m in zip(size, shape[2:], strict=True)]
        spans = tuple(_span(r, n, s, lft, rgt, m) for r, n, s, lft, rgt, m in
                      zip(rows[1:], size, strides, left, right, shape[2:], strict=True))
        area = math.prod(span.length for span in spans) / math.prod(size)
        cost = done / total * area + (1 - done / total)
        if cost <= WORTH_IT:
            options.append(CutPlan(call.name, call.module, spans, cost))  # type: ignore[arg-type]
    for plan in sorted(options, key=lambda p: p.cost):
        if _fits(model, x, plan):
            return plan
    return None


def _fits(model: nn.Module, x: Tensor, plan: CutPlan) -> bool:
    """Whether the cut's output on a crop holds every output to paste."""
    crop = x[:1, :, : plan.spans[0].length, : plan.spans[1].length]
    shape: list[tuple[int, ...]] = []

    def stop(module: nn.Module, args: Any, output: Any) -> None:
        shape.append(tuple(output.shape[2:]))
        raise _Stop

    try:
        with forward_hooks([(plan.module, stop)]), torch.inference_mode():
            model(crop)
    except _Stop:
        pass
    except (RuntimeError, ValueError, IndexError):
        return False
    if not shape:
        return False
    return all(
        bool(((span.hi - torch.div(span.start, span.stride, rounding_mode="floor")) < n).all())
        for span, n in zip(plan.spans, shape[0], strict=True)
    )


@contextmanager
def _pasted(plan: CutPlan, clean: Tensor, places: list[tuple[int, int, int]]
            ) -> Iterator[None]:
    """Inside the block, the cut returns ``clean[b]`` with the changed outputs of crop item
    ``i`` pasted in, for ``places[i] = (b, row position, column position)``."""
    rows, cols = plan.spans

    def hook(module: nn.Module, args: Any, output: Tensor) -> Tensor | None:
        index = torch.tensor([b for b, _, _ in places], device=clean.device)
        pasted = clean.index_select(0, index).to(output.dtype)
        for item, (_, i, j) in enumerate(places):
            r0, r1 = int(rows.lo[i]), int(rows.hi[i]) + 1
            c0, c1 = int(cols.lo[j]), int(cols.hi[j]) + 1
            dr, dc = int(rows.start[i]) // rows.stride, int(cols.start[j]) // cols.stride
            pasted[item, :, r0:r1, c0:c1] = output[item, :, r0 - dr : r1 - dr, c0 - dc : c1 - dc]
        return channels_last(pasted)

    with forward_hooks([(plan.module, hook)]):
        yield


def clean_features(model: nn.Module, x: Tensor, plan: CutPlan) -> tuple[Any, Tensor]:
    """The model's output on ``x`` and the cut's output, from one pass."""
    seen: list[Tensor] = []

    def keep(module: nn.Module, args: Any, output: Tensor) -> None:
        seen.append(output)

    with forward_hooks([(plan.module, keep)]), torch.inference_mode():
        output = model(x)
    return output, seen[0]


def cropped_outputs(model: nn.Module, x: Tensor, plan: CutPlan, clean: Tensor,
                    rows: list[Tensor], positions: Tensor, baseline: float) -> Any:
    """The model's output for every image of ``x`` occluded at each flat window position in
    ``positions`` (row-major over ``rows[1]`` x ``rows[2]``), ordered image-major, computed
    with the layers before the cut on crops."""
    span_r, span_c = plan.spans
    columns = rows[2].shape[0]
    crops, places = [], []
    for b in range(x.shape[0]):
        for position in positions.tolist():
            i, j = divmod(position, columns)
            r0, c0 = int(span_r.start[i]), int(span_c.start[j])
            r1, c1 = r0 + span_r.length, c0 + span_c.length
            mask = (rows[1][i, r0:r1, None] & rows[2][j, None, c0:c1]).to(x.dtype)
            crops.append(x[b, :, r0:r1, c0:c1] * (1 - mask) + baseline * mask)
            places.append((b, i, j))
    with _pasted(plan, clean, places), torch.inference_mode():
        return model(channels_last(torch.stack(crops)))
