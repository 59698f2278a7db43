"""Does the class need its object? Forward passes on edited images (no gradients).

With ``x`` a preprocessed image and ``O`` its object mask, pixels set to 0 after normalisation
take the data set's mean colour (the "black" of Xiao et al.'s Backgrounds Challenge, in the
model's own terms):

* **object removed**: the object's bounding box ``B(O)`` filled from its surroundings by ROAD's
  noisy linear imputation (:func:`heatlens.metrics.imputation.noisy_linear_impute`). Xiao,
  Engstrom, Ilyas and Madry ("Noise or Signal: The Role of Image Backgrounds in Object
  Recognition", ICLR 2021: Only-BG-B) black the box out; a flat box, or a hole the object's
  shape, still shows the model a shape (a flat ring is a ring), so the box is imputed instead,
  as ROAD does for the same reason. A class that keeps its probability without its object is
  predicted from something else;
* **background removed** ``x O``: the object alone (their Only-FG);
* **pasted** ``x_i O_i + b_j (1 - O_i)``: image ``i``'s object on the background ``b_j`` of
  image ``j``, ``j``'s object removed as above (their Mixed-Same when ``j`` is of ``i``'s class,
  Mixed-Rand otherwise). The **background gap** of a class is its accuracy on Mixed-Same minus
  its accuracy on Mixed-Rand: how much the right background helps.

Every edited image is scored by the softmax probability of the class explained, chunk by chunk
within the memory budget (:func:`heatlens.metrics.perturbed.perturbed_scores`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from heatlens.engine.entry import entered
from heatlens.engine.targets import ClassLogit, primary_output
from heatlens.metrics.imputation import noisy_linear_impute
from heatlens.metrics.perturbed import perturbed_scores

Edit = Callable[[Tensor, Tensor], Tensor]


def without_object(x: Tensor, masks: Tensor, seed: int = 0) -> Tensor:
    """The object's bounding box imputed from its surroundings (seeded noise)."""
    generator = torch.Generator(device=x.device).manual_seed(seed)
    return noisy_linear_impute(x, bounding_boxes(masks), generator=generator)


def bounding_boxes(masks: Tensor) -> Tensor:
    """``(B, H, W)`` bool: the bounding box of each mask's True pixels."""
    rows, columns = masks.any(dim=2), masks.any(dim=1)
    height, width = masks.shape[-2:]
    r = torch.arange(height, device=masks.device)
    c = torch.arange(width, device=masks.device)
    top = torch.where(rows, r, height).amin(dim=1)
    bottom = torch.where(rows, r, -1).amax(dim=1)
    left = torch.where(columns, c, width).amin(dim=1)
    right = torch.where(columns, c, -1).amax(dim=1)
    in_rows = (r >= top[:, None]) & (r <= bottom[:, None])
    in_columns = (c >= left[:, None]) & (c <= right[:, None])
    return in_rows[:, :, None] & in_columns[:, None, :]


def object_only(x: Tensor, masks: Tensor) -> Tensor:
    """``x O``: the background's pixels set to the mean colour."""
    return x * masks[:, None]


def pasted(objects: Tensor, object_masks: Tensor, backgrounds: Tensor) -> Tensor:
    """``x_i O_i + b_j (1 - O_i)``: each object on a background (an image without its object,
    :func:`without_object`)."""
    return torch.where(object_masks[:, None], objects, backgrounds)


def probabilities(model: nn.Module, edited: Tensor, classes: Tensor, *,
                  memory_budget: int) -> Tensor:
    """The softmax probability ``(B,)`` of ``classes`` on the edited images ``(B, C, H, W)``."""
    goal = ClassLogit(classes)
    with entered(model, edited) as x:
        return perturbed_scores(model, x[:1], len(x), lambda a, b: (x[a:b], classes[a:b]),
                                goal, memory_budget=memory_budget, description="intervene",
                                show_progress=False)


def all_probabilities(model: nn.Module, edited: Tensor) -> Tensor:
    """The softmax probabilities ``(B, K)`` of every class on the edited images."""
    with entered(model, edited) as x, torch.inference_mode():
        return primary_output(model(x)).float().softmax(dim=1)
