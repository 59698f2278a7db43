"""Smooth Grad-CAM++: Grad-CAM++ with gradients averaged over noisy copies of the input."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from heatlens.engine.budget import DEFAULT_BUDGET, budget_bytes, items_per_chunk, progress
from heatlens.engine.capture import forward_with_capture, gradients_of
from heatlens.engine.layers import LayerSpec
from heatlens.engine.maps import per_channel, safe_divide, spatial_dims
from heatlens.engine.tokens import as_map
from heatlens.methods.base import CAMExplainer, LayerCall
from heatlens.methods.registry import register
from heatlens.methods.sampling import input_noise


@register
class SmoothGradCAMPlusPlus(CAMExplainer):
    """Smooth Grad-CAM++ (Omeiza et al., 2019, Eq. 7-10): the gradient moments of Grad-CAM++
    averaged over ``n`` noisy inputs ``x + e_i``, ``e_i ~ N(0, sigma^2)``:
    ``D_p = (1/n) sum_i G_i^p`` (``G_i`` the gradient at the layer for input ``i``),
    ``a^k_ij = D2 / (2 D2 + sum_ab A^k_ab D3)`` (0 where the denominator is 0),
    ``w_k = sum_ij a^k_ij relu(D1^k_ij)``, ``M = relu(sum_k w_k A^k)``.

    ``A`` is the activation of the clean input (torch-cam uses the last noisy sample's, which
    makes the map depend on the noise). ``sigma = noise * (max x - min x)`` per image, as in
    SmoothGrad (Smilkov et al., 2017); the default ``noise=0.15``, ``samples=8``. Noise sample
    ``i`` is drawn from ``seed`` and ``i`` and is the same for every image of a batch.

    Args:
        memory_budget: bytes that one chunk of noisy inputs (with their autograd graph) may use.
        show_progress: ``None`` shows a bar for long runs in a terminal.
    """

    name = "smooth_gradcam++"
    aliases = ("smooth_gradcampp", "smooth_gradcam_plus_plus")
    needs_gradients = False  # the clean pass needs only the activations

    def __init__(self, model: nn.Module, layer: LayerSpec = "auto", *, samples: int = 8,
                 noise: float = 0.15, seed: int = 0, memory_budget: int = DEFAULT_BUDGET,
                 show_progress: bool | None = None, relu: bool = True,
                 fusion: str | None = None) -> None:
        super().__init__(model, layer, relu=relu, fusion=fusion)
        if samples < 1 or noise < 0:
            raise ValueError(f"samples must be >= 1 and noise >= 0, got {samples} and {noise}")
        self.samples, self.noise, self.seed = samples, noise, seed
        self.memory_budget = budget_bytes(memory_budget)
        self.show_progress = show_progress

    def layer_map(self, call: LayerCall) -> Tensor:
        x, acts = call.inputs, call.activations
        batch = x.shape[0]
        per_chunk = items_per_chunk(self.model, x[:1], self.memory_budget, with_gradients=True)
        step = max(1, per_chunk // batch)
        moments = [torch.zeros_like(acts) for _ in range(3)]
        with progress(self.samples * batch, self.name, show=self.show_progress) as bar:
            for first in range(0, self.samples, step):
                count = min(step, self.samples - first)
                noise = input_noise(x, self.noise, self.seed, first, count)
                noisy = (x[None] + noise).flatten(0, 1)
                captured = forward_with_capture(self.model, noisy, {call.name: call.module},
                                                with_gradients=True)
                with torch.enable_grad():
                    scores = call.target.score(captured.output, call.classes.repeat(count))
                (grads,) = gradients_of(scores, [captured.activations[call.name]], [call.name])
                grads = as_map(call.layout, grads).reshape(count, *acts.shape)
                for power, total in enumerate(moments, start=1):
                    total += grads.pow(power).sum(dim=0)
                bar.update(count * batch)
        d1, d2, d3 = (total / self.samples for total in moments)
        dims = spatial_dims(acts)
        alpha = safe_divide(d2, 2 * d2 + acts.sum(dim=dims, keepdim=True) * d3)
        return per_channel((alpha * d1.clamp_min(0)).sum(dim=dims), acts)
