"""The front door: ``heatlens.explain(model, inputs, method=..., target=..., layer=...)``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn

from heatlens.engine.entry import OutputKey
from heatlens.engine.layers import LayerSpec
from heatlens.engine.targets import TargetSpec
from heatlens.explanation import Explanation
from heatlens.methods.registry import create_explainer
from heatlens.methods.tunnel import NoiseTunnel


def explain(
    model: nn.Module,
    inputs: Tensor,
    method: str = "gradcam",
    target: TargetSpec = None,
    layer: LayerSpec = "auto",
    *,
    labels: Sequence[str] | None = None,
    output: OutputKey | None = None,
    noise_tunnel: str | None = None,
    nt_samples: int = 10,
    nt_noise: float = 0.15,
    nt_seed: int = 0,
    **options: Any,
) -> Explanation:
    """Explain why ``model`` scored ``inputs`` as it did.

    Args:
        model: a ``torch.nn.Module`` (put it in ``eval()`` mode); it is left exactly as it was.
        inputs: a preprocessed float tensor ``(B, C, *spatial)`` or ``(C, *spatial)``.
        method: a name from :func:`heatlens.list_methods` (case-insensitive, aliases accepted).
        target: ``None`` (arg-max class), an ``int``, ``B`` ints, a class name (with
            ``labels``), a callable ``output -> (B,) scores``, or a target object from
            :mod:`heatlens.engine.targets`.
        layer: ``"auto"``, a module name as in ``model.named_modules()``, a module, or a list.
        labels: class names by index (``heatlens.load_model().labels``), for ``target="tabby"``.
        output: for a model returning a dict or tuple, the key or index of the scores to explain
            (``"logits"``, ``"out"`` and the only tensor of a dict are found without it).
        noise_tunnel: ``"smoothgrad"``, ``"smoothgrad_sq"`` or ``"vargrad"`` runs the method on
            ``nt_samples`` noisy copies (noise ``nt_noise`` times the input's range, seeded by
            ``nt_seed``) and combines them (see :class:`~heatlens.NoiseTunnel`).
        **options: the method's own options (for example ``relu=False``, ``fusion="tanh-max"``);
            an option the method does not take is a ``TypeError`` listing those it does.

    Returns:
        An :class:`~heatlens.Explanation` with ``maps`` in [0, 1] at input resolution.
    """
    explainer = create_explainer(method, model, layer=layer, **options)
    if noise_tunnel is not None:
        explainer = NoiseTunnel(explainer, noise_tunnel, samples=nt_samples, noise=nt_noise,
                                seed=nt_seed)
    return explainer(inputs, target=target, labels=labels, output=output)
