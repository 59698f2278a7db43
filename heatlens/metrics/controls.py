"""Model-blind control maps, scored beside the real maps so that every number comes with what
chance and a map that never looked at the model get.

* :func:`random_map`: chance, uniform noise.
* :func:`centred_gaussian`: the centre bias; photographed objects sit near the middle, so a bump
  there scores well on localisation without any model.
* :func:`edge_map`: the image's edges; Adebayo et al. ("Sanity Checks for Saliency Maps",
  NeurIPS 2018) show that some saliency maps look like an edge detector's output and stay the
  same when the model's weights are randomised.

All return ``(B, H, W)`` float maps, computed in torch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def random_map(batch: int, size: Sequence[int], generator: torch.Generator | None = None, *,
               device: torch.device | str | None = None) -> Tensor:
    """Uniform noise: ``L_ij ~ U[0, 1)``, independent per pixel and image, ``(B, H, W)``.

    Seeded by ``generator`` (the same seed gives the same maps); the maps are on the generator's
    device, or ``device`` without one."""
    height, width = image_size(size)
    if generator is not None:
        device = generator.device
    return torch.rand(_batch(batch), height, width, generator=generator, device=device)


def centred_gaussian(batch: int, size: Sequence[int], sigma: float = 0.25, *,
                     device: torch.device | str | None = None) -> Tensor:
    """The centre-bias map, a Gaussian bump at the image centre, ``(B, H, W)``:
    ``L_ij = exp(-((i - c_y)^2 + (j - c_x)^2) / (2 s^2))``, with ``(c_y, c_x) = ((H - 1) / 2,
    (W - 1) / 2)`` the centre of the pixel grid and ``s = sigma * min(H, W)``: ``sigma`` is a
    fraction of the shorter side. The peak is the centre pixel, valued 1, where a side is odd;
    where it is even, the two central rows (or columns) share the maximum, just below 1. The same
    map for every image."""
    height, width = image_size(size)
    if not sigma > 0:
        raise ValueError(f"sigma is a fraction of the shorter side and must be > 0, got {sigma}")
    s = sigma * min(height, width)
    rows = torch.arange(height, device=device, dtype=torch.float32) - (height - 1) / 2
    columns = torch.arange(width, device=device, dtype=torch.float32) - (width - 1) / 2
    bump = torch.exp(-(rows[:, None] ** 2 + columns[None, :] ** 2) / (2 * s**2))
    return bump.expand(_batch(batch), height, width).clone()


def edge_map(images: Tensor) -> Tensor:
    """The Sobel gradient magnitude of the images, ``(B, C, H, W)`` -> ``(B, H, W)``:
    ``I = mean_c x_c`` (grey), ``G_x = S_x * I``, ``G_y = S_y * I``,
    ``L = sqrt(G_x^2 + G_y^2)`` with ``S_x = [[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]]`` and
    ``S_y = S_x^T``. The border is padded by repeating the edge pixels, so a constant image gives
    zeros everywhere (no frame of false edges). In the images' value range: a step of height
    ``h`` gives ``4 h`` on the two columns (or rows) either side of it."""
    if not isinstance(images, Tensor) or images.ndim != 4:
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"edge_map takes images (B, C, H, W), got {shape}: add the batch "
                         "dimension with images[None]")
    grey = (images if images.is_floating_point() else images.float()).mean(dim=1, keepdim=True)
    padded = F.pad(grey, (1, 1, 1, 1), mode="replicate")[:, 0]  # (B, H + 2, W + 2)
    # S_x is the column difference [-1, 0, 1] smoothed down the rows by [1, 2, 1]; S_y the
    # transpose. Written as differences, a flat region gives exactly 0.
    dx = padded[:, :, 2:] - padded[:, :, :-2]  # (B, H + 2, W)
    dy = padded[:, 2:, :] - padded[:, :-2, :]  # (B, H, W + 2)
    gx = (dx[:, :-2] + dx[:, 2:]).add_(dx[:, 1:-1], alpha=2)
    gy = (dy[:, :, :-2] + dy[:, :, 2:]).add_(dy[:, :, 1:-1], alpha=2)
    return torch.hypot(gx, gy)


def image_size(size: Sequence[int]) -> tuple[int, int]:
    """``(H, W)`` as two positive ints; a one-line error otherwise."""
    try:
        height, width = (int(s) for s in size)
        valid = height > 0 and width > 0 and all(int(s) == s for s in size)
    except (TypeError, ValueError):
        valid = False
    if not valid:
        raise ValueError(f"size must be (H, W), two positive integers, got {size!r}")
    return height, width


def _batch(batch: int) -> int:
    if isinstance(batch, bool) or int(batch) != batch or batch < 1:
        raise ValueError(f"batch must be a positive integer, got {batch!r}")
    return int(batch)
