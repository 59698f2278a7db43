"""What the sampling methods share: seeded random streams, noise on the input, and the score a
perturbed input is given.

Score-CAM's family, Smooth Grad-CAM++, the noise tunnel and RISE draw noise or masks. Each draw
``i`` comes from its own generator seeded by ``seed`` and ``i`` (:func:`seeded_generator`), never
from the global random state, so a map is reproducible, does not depend on how the work was
chunked, and is the same for an image alone or in a batch.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Generator, Tensor

from heatlens.engine.targets import ClassLogit, Target, primary_output


def seeded_generator(seed: int, stream: int, device: torch.device) -> Generator:
    """A generator seeded from ``seed`` and a stream number (a channel, a sample)."""
    return torch.Generator(device=device).manual_seed(seed * 1_000_003 + stream)


def input_noise(x: Tensor, noise: float, seed: int, first: int, count: int) -> Tensor:
    """Noise samples ``first ... first + count - 1`` for the batch ``x`` ``(B, C, *S)``, as
    ``(count, B, C, *S)``: ``e_i ~ N(0, sigma^2)`` with ``sigma = noise * (max x - min x)`` per
    image (SmoothGrad's noise level, Smilkov et al., 2017, Sec. 3.1). Sample ``i`` is the same
    for every image of the batch."""
    reach = (x.flatten(1).amax(1) - x.flatten(1).amin(1)).reshape(1, -1, *[1] * (x.ndim - 1))
    draws = torch.stack([
        torch.randn(x.shape[1:], device=x.device, dtype=x.dtype,
                    generator=seeded_generator(seed, i, x.device))
        for i in range(first, first + count)
    ])
    return noise * reach * draws[:, None]


def probability_or_score(output: Any, target: Target, classes: Tensor) -> Tensor:
    """The score of a perturbed input: the softmax probability of the class for a class target
    (``(N, K)`` logits), the target's own score otherwise; float32 ``(N,)``."""
    if isinstance(target, ClassLogit):
        return primary_output(output).float().softmax(dim=1).gather(1, classes[:, None])[:, 0]
    return target.score(output, classes).float()
