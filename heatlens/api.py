"""The front door: ``heatlens.explain(model, inputs, method=..., target=..., layer=...)``."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from heatlens.explanation import Explanation
from heatlens.layers import LayerSpec
from heatlens.methods.registry import create_explainer
from heatlens.targets import TargetSpec


def explain(
    model: nn.Module,
    inputs: Tensor,
    method: str = "gradcam",
    target: TargetSpec = None,
    layer: LayerSpec = "auto",
    **options: Any,
) -> Explanation:
    """Explain why ``model`` scored ``inputs`` as it did.

    Args:
        model: a ``torch.nn.Module`` (put it in ``eval()`` mode); it is left exactly as it was.
        inputs: a preprocessed float tensor ``(B, C, *spatial)`` or ``(C, *spatial)``.
        method: a name from :func:`heatlens.list_methods` (case-insensitive, aliases accepted).
        target: ``None`` (arg-max class), an ``int``, ``B`` ints, a callable
            ``output -> (B,) scores``, or a target object from :mod:`heatlens.targets`.
        layer: ``"auto"``, a module name as in ``model.named_modules()``, a module, or a list.
        **options: the method's own options (for example ``relu=False``, ``fusion="tanh-max"``).

    Returns:
        An :class:`~heatlens.Explanation` with ``maps`` in [0, 1] at input resolution.
    """
    return create_explainer(method, model, layer=layer, **options)(inputs, target=target)
