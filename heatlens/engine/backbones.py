"""``layer="auto"`` for dense-prediction models: the backbone map that every output depends on.

A segmentation model or a detector reads its backbone at several places; the task head after it
maps features to class scores or boxes (the role of a classifier's linear layer, which is not
explained either). The map to explain is the deepest backbone map that *every* output depends
on, so that no box or region is left with an empty map:

* **An intermediate-layer getter** (torchvision's FCN, DeepLabV3, LR-ASPP at ``model.backbone``;
  Faster / Mask / Keypoint R-CNN, RetinaNet and FCOS at ``model.backbone.body``, under an FPN):
  the deepest stage it returns (``layer4`` of a ResNet, ``16`` of MobileNetV3). Under an FPN
  every level is computed from it through the top-down pathway (and the extra P6/P7 levels from
  it or from P5), while any single FPN level feeds only the boxes assigned to that level.
* **A backbone that returns its maps itself** (SSD's VGG and SSDlite's MobileNetV3 feature
  extractors): the deepest module that its first, finest returned map depends on. That map feeds
  the head's finest level and, through the extra layers, every coarser one; the later maps feed
  only the coarser levels, so the small objects' boxes do not depend on them. Found by one probe
  of the backbone (autograd tells which module outputs the first map depends on).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from math import prod
from typing import Any

import torch
from torch import Tensor, nn

from heatlens.engine.entry import buffers_kept
from heatlens.engine.hooks import forward_hooks


def backbone_stage(model: nn.Module, inputs: Tensor) -> tuple[str, str] | None:
    """``(name, reason)`` of the backbone map to explain (see the module docstring), or
    ``None`` for a model without a ``backbone`` of either kind."""
    backbone = getattr(model, "backbone", None)
    if not isinstance(backbone, nn.Module):
        return None
    kind = type(model).__name__
    for prefix, getter in (("backbone.body", getattr(backbone, "body", None)),
                           ("backbone", backbone)):
        returned = getattr(getter, "return_layers", None)
        if isinstance(getter, nn.ModuleDict) and isinstance(returned, dict) and returned:
            stage = [name for name in getter if name in returned][-1]
            name = f"{prefix}.{stage}"
            if prefix == "backbone.body" and isinstance(getattr(backbone, "fpn", None),
                                                        nn.Module):
                why = ("under the FPN every level is computed from it through the top-down "
                       "pathway, so every box depends on it, while a single FPN level feeds "
                       "only the boxes assigned to that level")
            else:
                why = "the task head reads its features from there"
            return name, (f"'{name}' is the deepest stage that the backbone of this {kind} "
                          f"returns (as {returned[stage]!r}); {why}")
    found = _finest_map_source(model, backbone, inputs)
    if found is None:
        return None
    return f"backbone.{found}", (
        f"'backbone.{found}' is the deepest map of this {kind}'s backbone "
        f"({type(backbone).__name__}) that its first, finest output depends on: that output "
        "feeds the head's finest level and, through the extra layers, every coarser one, so "
        "every box depends on it (the later maps feed only the coarser levels)"
    )


def _finest_map_source(model: nn.Module, backbone: nn.Module, inputs: Tensor) -> str | None:
    """The last module of ``backbone`` to finish whose spatial output the backbone's first
    returned map depends on, when the backbone returns several maps; else ``None``."""
    side = getattr(getattr(model, "transform", None), "fixed_size", None)  # SSD's input size
    sample = inputs[:1].detach()
    if side is not None:
        sample = torch.nn.functional.interpolate(sample, size=tuple(side), mode="bilinear")
    finished: list[tuple[str, Tensor]] = []

    def keep(name: str):
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if isinstance(output, Tensor) and output.ndim == 4 and prod(output.shape[2:]) > 1:
                finished.append((name, output))

        return hook

    hooks = [(m, keep(n)) for n, m in backbone.named_modules() if n]
    with buffers_kept(model), torch.inference_mode(False), torch.enable_grad():
        x = sample.clone().requires_grad_(True)
        with forward_hooks(hooks):
            maps = backbone(x)
        values = list(maps.values()) if isinstance(maps, Mapping) else (
            list(maps) if isinstance(maps, Sequence) else [])
        outputs = [(n, t) for n, t in finished if t.requires_grad]
        if len(values) < 2 or not isinstance(values[0], Tensor) or not outputs:
            return None
        grads = torch.autograd.grad(values[0].sum(), [t for _, t in outputs], allow_unused=True)
    feeding = [name for (name, _), grad in zip(outputs, grads, strict=True) if grad is not None]
    return feeding[-1] if feeding else None
