"""The classifier head: the part of a network after global average pooling.

CAM weights a layer's channels by the head's row for the class (Zhou et al., CVPR 2016), and
Deep Feature Factorization names its concepts by passing them through the head (Collins et al.,
ECCV 2018). Both need the head that turns the global average of the explained layer into the
model's output; :func:`find_head` finds it and proves it: a candidate is accepted only when it
reproduces the model's output from the pooled activations.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from heatlens.engine.maps import spatial_dims
from heatlens.engine.targets import primary_output

HEAD_NAMES = ("fc", "classifier", "_fc", "head")
"""Attribute names of the head in torchvision (ResNet ``fc``, MobileNet and EfficientNet
``classifier``), EfficientNet-Lite (``_fc``) and timm (``head``)."""


def find_head(model: nn.Module, activations: Tensor, output: Any, layer: str
              ) -> tuple[nn.Module, str]:
    """The head that maps the global average of ``activations`` ``(B, C, *spatial)`` (layer
    ``layer``'s) to the model's ``output``, and a sentence saying which and why.

    Candidates, in order: timm's ``get_classifier()``, a submodule named as in
    :data:`HEAD_NAMES`, the model's last ``nn.Linear``; each must start with a linear layer
    taking ``C`` features and reproduce the output (to 1e-3 relative).

    Raises:
        ValueError: when no candidate reproduces the output, naming those tried.
    """
    channels = activations.shape[1]
    try:
        expected = primary_output(output).detach()
    except (TypeError, ValueError):
        expected = None
    tried = []
    if expected is not None and expected.ndim == 2:
        pooled = activations.detach().mean(dim=spatial_dims(activations))
        for label, module in head_candidates(model, channels):
            tried.append(label)
            try:
                with torch.no_grad():
                    got = module(pooled.to(expected.dtype))
            except (RuntimeError, ValueError, TypeError, IndexError):
                continue  # a head that does not take (B, C) vectors (ConvNeXt's LayerNorm2d)
            if isinstance(got, Tensor) and got.shape == expected.shape and torch.allclose(
                got.float(), expected.float(), rtol=1e-3,
                atol=1e-4 * max(float(expected.abs().max()), 1.0),
            ):
                return module, (f"'{label}' ({type(module).__name__}; reproduces the model's "
                                f"output from the global average of '{layer}')")
    what = (f"tried {', '.join(repr(t) for t in tried)}" if tried
            else f"no linear layer of the model takes {channels} features")
    raise ValueError(
        f"cannot find the classifier head that turns the global average of layer {layer!r} "
        f"({channels} channels) into the model's output ({what}). Is the model in eval() mode?"
    )


def head_candidates(model: nn.Module, channels: int) -> list[tuple[str, nn.Module]]:
    """Modules that may be the classifier head, by name: those whose first linear layer takes
    ``channels`` inputs."""
    names = {module: name for name, module in model.named_modules()}
    found: list[nn.Module] = []
    get_classifier = getattr(model, "get_classifier", None)  # timm
    if callable(get_classifier) and isinstance(get_classifier(), nn.Module):
        found.append(get_classifier())
    found += [getattr(model, n) for n in HEAD_NAMES
              if isinstance(getattr(model, n, None), nn.Module)]
    found += [m for m in model.modules() if isinstance(m, nn.Linear)][-1:]
    return [
        (names.get(module, type(module).__name__), module)
        for module in dict.fromkeys(found)
        if (first := first_linear(module)) is not None and first.in_features == channels
    ]


def first_linear(module: nn.Module) -> nn.Linear | None:
    """The first ``nn.Linear`` in ``module`` (itself included), or ``None``."""
    return next((m for m in module.modules() if isinstance(m, nn.Linear)), None)


def only_linear(head: nn.Module) -> nn.Linear | None:
    """The linear layer of a head that is one linear layer (alone, or with dropout and
    identities around it in a sequence), else ``None``."""
    linears = [m for m in head.modules() if isinstance(m, nn.Linear)]
    others = [m for m in head.modules() if list(m.children()) == [] and not isinstance(
        m, nn.Linear | nn.Dropout | nn.Identity | nn.Flatten)]
    return linears[0] if len(linears) == 1 and not others else None
