"""Ablation-CAM: channel weights from how much the score drops when a channel is switched off."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from heatlens.engine.budget import DEFAULT_BUDGET, budget_bytes, progress
from heatlens.engine.capture import output_replaced
from heatlens.engine.layers import LayerSpec
from heatlens.engine.maps import safe_divide
from heatlens.engine.notices import warn
from heatlens.methods.base import LayerCall, WeightedCAM
from heatlens.methods.registry import register


def ablated_copies(activation: Tensor, channels: range) -> Tensor:
    """``(C, *s)`` activation to ``(len(channels), C, *s)``: copy ``j`` has channel
    ``channels[j]`` set to zero."""
    copies = activation.unsqueeze(0).repeat(len(channels), *[1] * activation.ndim)
    copies[torch.arange(len(channels)), torch.as_tensor(list(channels))] = 0
    return copies


@register
class AblationCAM(WeightedCAM):
    """Ablation-CAM (Desai & Ramaswamy, WACV 2020, Eq. 3): with ``y_c`` the target score and
    ``y_c^k`` the score when channel ``k`` of the layer is set to zero,
    ``w_k = (y_c - y_c^k) / y_c`` (0 where ``y_c = 0``) and ``M = relu(sum_k w_k A^k)``.

    Only the part of the network after the layer is evaluated for each ablation: the model runs
    on one image while the layer's output is replaced by a batch of ablated copies, so the layers
    before it run once per chunk of copies. Where the network cannot be cut there (a branch that
    jumps over the layer and is joined by concatenation, or a forward pass that fixes the batch
    size), this is detected on the first chunk (a clean copy must reproduce the score) and the
    method falls back to full forward passes on a repeated input, with a warning.

    Args:
        memory_budget: bytes that one chunk of ablated copies may use.
        show_progress: ``None`` shows a bar for long runs in a terminal.
        eigen_smooth, aug_smooth: as for every CAM
            (:class:`~heatlens.methods.base.CAMExplainer`): the first principal component of
            the terms ``w_k A^k``, and the map averaged over six test-time augmentations (each
            augmented copy ablated channel by channel), as pytorch-grad-cam's ``AblationCAM``.
    """

    name = "ablationcam"
    family = "perturbation CAMs"
    needs_gradients = False

    def __init__(self, model: nn.Module, layer: LayerSpec = "auto", *,
                 memory_budget: int = DEFAULT_BUDGET, show_progress: bool | None = None,
                 relu: bool = True, fusion: str | None = None, eigen_smooth: bool = False,
                 aug_smooth: bool = False) -> None:
        super().__init__(model, layer, relu=relu, fusion=fusion, eigen_smooth=eigen_smooth,
                         aug_smooth=aug_smooth)
        self.memory_budget = budget_bytes(memory_budget)
        self.show_progress = show_progress

    def layer_weights(self, call: LayerCall) -> Tensor:
        """``w_k = (y_c - y_c^k) / y_c`` ``(B, C)``."""
        acts = call.activations
        batch, channels = acts.shape[:2]
        # an ablated copy, and the layers after it, cost a few times the activation each
        copy_bytes = 4 * acts[0].numel() * acts.element_size()
        step = max(1, min(channels, self.memory_budget // copy_bytes))
        ablated = torch.empty(batch, channels, device=acts.device)
        cut = True
        with torch.inference_mode(), progress(batch * channels, self.name,
                                              show=self.show_progress) as bar:
            for b in range(batch):  # the layers before the cut run on this image alone
                image, cls = call.inputs[b : b + 1], call.classes[b : b + 1]
                for start in range(0, channels, step):
                    span = range(start, min(start + step, channels))
                    copies = ablated_copies(acts[b], span)
                    if call.layout is not None:  # back to the tokens the model passes on
                        copies = call.layout.to_output(copies, call.output[b : b + 1])
                    if cut:
                        clean = acts[b : b + 1] if call.layout is None else call.output[b : b + 1]
                        scores = self._cut_scores(call, image, cls, clean, copies, call.scores[b])
                        cut = scores is not None
                    if not cut:
                        with output_replaced(call.module, copies, followed=bool(call.follower)):
                            out = self.model(image.expand(len(span), *image.shape[1:]))
                        scores = call.target.score(out, cls.expand(len(span))).float()
                    ablated[b, start : span.stop] = scores
                    bar.update(len(span))
        original = call.scores.float()[:, None]
        return safe_divide(original - ablated, original.expand_as(ablated))

    def _cut_scores(self, call: LayerCall, image: Tensor, cls: Tensor, clean: Tensor,
                    copies: Tensor, expected: Tensor) -> Tensor | None:
        """Scores of ``copies`` with the layers before the cut run once, or ``None`` (and a
        warning) where the network cannot be cut at the layer. ``clean`` is the image's own
        activation; it travels with the copies and must reproduce ``expected``."""
        stack = torch.cat([clean, copies])
        problem = ""
        try:
            with output_replaced(call.module, stack, followed=bool(call.follower)):
                out = self.model(image)
            scores = call.target.score(out, cls.expand(stack.shape[0])).float()
        except (RuntimeError, ValueError, IndexError) as error:
            problem = f"{type(error).__name__}: {error}".splitlines()[0]
        else:
            if not torch.allclose(scores[0], expected.float(), rtol=1e-4, atol=1e-5):
                problem = "the un-ablated copy did not reproduce the score"
        if problem:
            warn(
                f"Ablation-CAM cannot evaluate only the layers after {call.name!r} in this model "
                f"({problem}); falling back to full forward passes, which is slower."
            )
            return None
        return scores[1:]
