"""The engine of the perturbation metrics: score many perturbed copies of the inputs, chunk by
chunk within the memory budget, in inference mode.

Every faithfulness metric asks the same question many times: what does the model say of this
image with these pixels changed? A metric describes its copies by a flat index and a function
that builds any range of them; :func:`perturbed_scores` builds and scores them a chunk at a time
(the chunk size from :func:`heatlens.engine.budget.items_per_chunk`, never all at once), in
channels-last memory, and returns one score per copy: the softmax probability of the copy's
class (the papers' choice), or the target's own score for targets that are not classes.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from heatlens.engine.budget import channels_last, items_per_chunk, progress
from heatlens.engine.targets import Target
from heatlens.methods.sampling import probability_or_score

Builder = Callable[[int, int], tuple[Tensor, Tensor]]
"""``build(start, stop)``: the copies ``start .. stop - 1`` as inputs ``(n, C, *spatial)`` and
the class each is scored for, ``(n,)``."""


def perturbed_scores(model: nn.Module, sample: Tensor, count: int, build: Builder,
                     target: Target, *, memory_budget: int, description: str,
                     show_progress: bool | None = None, probability: bool = True) -> Tensor:
    """The scores ``(count,)`` float32 of ``count`` perturbed copies that ``build`` makes.

    ``sample`` is one input ``(1, C, *spatial)`` (for the memory estimate). With
    ``probability=False`` every copy gets ``target.score`` (the logit of a class target)."""
    chunk = items_per_chunk(model, sample, memory_budget, extra_per_item=sample.numel() * 8)
    scores = torch.empty(count, dtype=torch.float32, device=sample.device)
    with torch.inference_mode(), progress(count, description, show=show_progress) as bar:
        for start in range(0, count, chunk):
            stop = min(start + chunk, count)
            inputs, classes = build(start, stop)
            output = model(channels_last(inputs))
            scores[start:stop] = (probability_or_score(output, target, classes) if probability
                                  else target.score(output, classes).float())
            bar.update(stop - start)
    return scores
