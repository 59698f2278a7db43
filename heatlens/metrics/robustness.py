"""Infidelity and max-sensitivity (Yeh et al., "On the (In)fidelity and Sensitivity of
Explanations", NeurIPS 2019), with Captum's definitions (``captum.metrics.infidelity`` and
``captum.metrics.sensitivity_max``): the numbers agree with Captum's under the same perturbations.

Notation: ``x`` an input, ``Phi(x)`` its explanation, ``f(x)`` the score explained, ``I`` a
perturbation, ``r`` a radius. Both metrics are Monte Carlo estimates over seeded draws: draw ``i``
comes from its own generator seeded by ``seed`` and ``i``
(:func:`heatlens.methods.sampling.seeded_generator`), so a number is reproducible and does not
depend on how the work was chunked. The default draws are one noise tensor per draw shared by the
images of the batch, so an image scores the same alone or in a batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

import torch
from torch import Generator, Tensor, nn

from heatlens.engine.budget import DEFAULT_BUDGET, budget_bytes, items_per_chunk, progress
from heatlens.engine.entry import buffers_kept, model_to_explain, warn_if_training
from heatlens.engine.notices import warn
from heatlens.engine.targets import ClassIndices, class_indices, primary_output
from heatlens.methods.sampling import seeded_generator

InfidelityPerturb = Callable[[Tensor, Generator], tuple[Tensor, Tensor]]
"""``perturb(inputs, generator) -> (perturbation, perturbed_inputs)`` for :func:`infidelity`."""

SensitivityPerturb = Callable[[Tensor, Generator], Tensor]
"""``perturb(inputs, generator) -> perturbed_inputs`` for :func:`max_sensitivity`."""

UNMEASURED_COST = 64
"""Bytes one forward pass is taken to cost per byte of input when ``forward`` is not a module
(or a module's method) whose activations can be measured: ResNet-50 at 224 px measures about 50,
ViT-B/16 about 20 (:func:`heatlens.engine.budget.sample_bytes`)."""


def infidelity(forward: Callable[[Tensor], Any], inputs: Tensor, attributions: Tensor, *,
               perturbations: int = 10, noise: float = 0.003, seed: int = 0,
               normalize: bool = False, perturb: InfidelityPerturb | None = None,
               target: ClassIndices | None = None,
               memory_budget: int = DEFAULT_BUDGET) -> Tensor:
    """Explanation infidelity (Yeh et al., NeurIPS 2019, Eq. 3), per image ``(B,)``:
    ``INFD = E_I[(I^T Phi(x) - (f(x) - f(x - I)))^2]``, the mean over ``perturbations`` draws.

    Lower is better: 0 when the explanation, dotted with the perturbation, predicts the change of
    the score exactly (saliency on a linear model, for any ``I``).

    Args:
        forward: ``forward(x) -> (N,)`` scores, or ``(N, num_classes)`` scores (a classifier
            itself) with ``target`` choosing the column.
        inputs: ``(B, C, *spatial)`` (or any ``(B, ...)``) float batch.
        attributions: ``Phi``, the inputs' shape; or ``(B, *spatial)``, a map over positions,
            which counts for every channel (``I^T Phi = sum_ij Phi_ij sum_c I_cij``).
        perturbations: draws of ``I`` per image.
        noise: the default ``I ~ N(0, noise^2)`` per element (absolute, in the inputs' units),
            perturbed input ``x - I``; one draw shared by the images of the batch. 0.003 is the
            value of Captum's documented example (Captum has no default perturbation).
        seed: draw ``i`` comes from ``seeded_generator(seed, i)``.
        normalize: scale ``Phi`` by the optimal ``beta = E[a b] / E[a^2]`` (``a = I^T Phi``,
            ``b = f(x) - f(x - I)``) first, ``INFD = E[(beta a - b)^2] = min_beta ...``: the
            score no longer depends on the explanation's scale (nor its sign: ``beta`` may be
            negative). Captum's ``normalize=True``; the authors' code always does it.
        perturb: ``perturb(inputs, generator) -> (I, perturbed_inputs)``, called once per draw
            with the whole ``(B, ...)`` batch; ``I`` is dotted with ``Phi`` and ``f`` is taken
            of ``perturbed_inputs`` as they come, as Captum's ``perturb_func`` (whose
            ``infidelity_perturb_func_decorator(True)`` expresses ``I`` relative to the input,
            ``(x - x~) / x``, for global attributions such as input x gradient).
        target: for ``(N, num_classes)`` scores, the class per image (one for all, or ``B``);
            ``None`` takes the arg-max of each clean input's scores.
        memory_budget: bytes that one chunk of perturbed copies (of all images and draws,
            run in ``torch.inference_mode()``) may use; a chunk never holds less than one
            image, and one draw's perturbations of the whole batch are held at once.

    Where the paper, the authors' code and Captum differ: Eq. 3 and Captum take the plain mean
    (``normalize=False`` by default, as Captum); the authors' code always rescales by ``beta``.
    The paper's experiments perturb with a noisy baseline (the authors' MNIST code: ``x - I``
    is noise ``N(0, 0.2^2)`` clipped to ``[0, 1]``), not small noise around ``x``: pass
    ``perturb`` for it.
    """
    x = _batch(inputs)
    phi = _attributions_like(attributions, x)
    count = _positive_int(perturbations, "perturbations")
    sigma = _positive_float(noise, "noise")
    _check_seed(seed)
    if not isinstance(normalize, bool):
        raise TypeError(f"normalize must be True or False, not {normalize!r}")
    if perturb is not None and not callable(perturb):
        raise TypeError("perturb must be a function (inputs, generator) -> (perturbation, "
                        f"perturbed_inputs), not a {type(perturb).__name__}")
    if not callable(forward):
        raise TypeError(f"forward must be a function of the inputs (a model, or x -> scores), "
                        f"not a {type(forward).__name__}")
    budget = budget_bytes(memory_budget)
    draw = perturb if perturb is not None else _gaussian(sigma)
    module = _module_behind(forward)
    if module is not None:
        warn_if_training(module)
    batch = x.shape[0]
    kept = buffers_kept(module) if module is not None else nullcontext()
    with kept, torch.inference_mode():
        clean_output = primary_output(forward(x))
        classes = _classes(clean_output, target, batch)
        clean = _rows(clean_output, classes, batch)
        step = _chunk(module, x, budget)
        draws_per_group = max(1, step // batch)
        sums = torch.zeros(4, batch, dtype=torch.float64, device=x.device)  # aa ab bb (a-b)^2
        with progress(count * batch, "infidelity") as bar:
            for first in range(0, count, draws_per_group):
                group = range(first, min(count, first + draws_per_group))
                drawn = [_infidelity_draw(draw, x, seed, i) for i in group]
                shifts = torch.stack([shift for shift, _ in drawn])  # (k, B, ...)
                a = (shifts * phi).flatten(2).sum(dim=2).flatten()  # (k B,) draw-major
                perturbed = torch.cat([moved for _, moved in drawn])
                del drawn, shifts
                for start in range(0, perturbed.shape[0], step):
                    part = perturbed[start : start + step]
                    images = torch.arange(start, start + part.shape[0], device=x.device) % batch
                    scored = _rows(primary_output(forward(part)),
                                   None if classes is None else classes[images], part.shape[0])
                    fit = a[start : start + part.shape[0]]
                    change = clean[images] - scored
                    terms = torch.stack([fit * fit, fit * change, change * change,
                                         (fit - change).square()])
                    sums.index_add_(1, images, terms.double())
                    bar.update(part.shape[0])
    aa, ab, bb, squared = sums
    if normalize:
        beta = torch.where(aa > 0, ab / aa.clamp_min(1e-300), torch.zeros_like(aa))
        total = (bb - beta * ab).clamp_min(0)
    else:
        total = squared
    return (total / count).to(x.dtype)


def max_sensitivity(explain: Callable[[Tensor], Tensor], inputs: Tensor, *,
                    radius: float = 0.02, samples: int = 10, seed: int = 0,
                    norm: str | float = "fro",
                    perturb: SensitivityPerturb | None = None) -> Tensor:
    """Max-sensitivity (Yeh et al., NeurIPS 2019, Eq. 5), per image ``(B,)``, relative to the
    clean explanation as Captum's ``sensitivity_max`` computes it:
    ``SENS_MAX = max_{||y - x||_inf <= r} ||Phi(y) - Phi(x)|| / ||Phi(x)||``, the maximum over
    ``samples`` draws ``y = x + u``, ``u`` uniform in ``[-r, r]`` per element.

    Lower is better: 0 for an explanation that does not change within the ball (a constant one).
    A Monte Carlo maximum is a lower bound of the supremum; more samples can only raise it.

    Args:
        explain: ``explain(x) -> (B, ...)`` explanations, for example
            ``lambda x: heatlens.explain(model, x, "saliency").attributions`` (or ``.maps``).
            It is called on the clean inputs once, then once per draw, each time on a batch of
            the inputs' size (so it never needs more memory than explaining the inputs does).
        inputs: ``(B, ...)`` float batch.
        radius: ``r``, the half-width of the uniform noise per element (the L-infinity ball).
        samples: draws of ``y``; draw ``i`` comes from ``seeded_generator(seed, i)`` and is
            shared by the images of the batch (Captum draws per image; the distribution per image
            is the same).
        seed: the draws' seed.
        norm: of the flattened explanations: ``"fro"`` (the Euclidean norm, Captum's default) or
            a number ``p`` (``float("inf")`` for the largest change of one element).
        perturb: ``perturb(inputs, generator) -> perturbed_inputs``, called once per draw with
            the whole batch, instead of the uniform noise (``radius`` is then not used), like
            Captum's ``perturb_func``.

    Where the paper, the authors' code and Captum differ: Eq. 5 as printed is the absolute change
    ``||Phi(y) - Phi(x)||``; Captum and the authors' code (``get_exp_sens``) divide it by
    ``||Phi(x)||``, and so does this function, once per draw as Captum (the authors' code divides
    its running maximum again at every draw). Where ``Phi(x) = 0``, Captum divides by 1 (the
    absolute change); so does this function, with a warning.
    """
    if not callable(explain):
        raise TypeError(f"explain must be a function x -> (B, ...) explanations, not a "
                        f"{type(explain).__name__}")
    x = _batch(inputs)
    r = _positive_float(radius, "radius")
    count = _positive_int(samples, "samples")
    _check_seed(seed)
    order = _norm_order(norm)
    if perturb is not None and not callable(perturb):
        raise TypeError("perturb must be a function (inputs, generator) -> perturbed_inputs, "
                        f"not a {type(perturb).__name__}")
    draw = perturb if perturb is not None else _uniform(r)
    batch = x.shape[0]
    clean = _explanation(explain(x), batch, None)
    _check_finite(clean, "the explanations of the inputs")
    flat = clean.reshape(batch, -1)
    scale = torch.linalg.vector_norm(flat, ord=order, dim=1)
    empty = (scale == 0).nonzero().flatten().tolist()
    if empty:
        warn(f"the explanation of image{'s' if len(empty) > 1 else ''} "
             f"{_listed(empty)} is zero: max-sensitivity there is the absolute change "
             "||Phi(y) - Phi(x)|| (Captum divides by 1 where ||Phi(x)|| = 0)")
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    worst = torch.full((batch,), -math.inf, dtype=scale.dtype, device=scale.device)
    with progress(count * batch, "max-sensitivity") as bar:
        for i in range(count):
            with torch.no_grad():
                moved = draw(x, seeded_generator(seed, i, x.device))
            if not isinstance(moved, Tensor) or moved.shape != x.shape:
                raise ValueError(
                    f"perturb must return the perturbed inputs, a tensor of the inputs' shape "
                    f"{tuple(x.shape)}; got {_described(moved)}"
                )
            shifted = _explanation(explain(moved), batch, clean.shape)
            change = torch.linalg.vector_norm(shifted.reshape(batch, -1) - flat, ord=order,
                                              dim=1)
            worst = torch.maximum(worst, change / scale)
            bar.update(batch)
    return worst


# ---------------------------------------------------------------------------------------------
# The default perturbations
# ---------------------------------------------------------------------------------------------

def _gaussian(sigma: float) -> InfidelityPerturb:
    """``I ~ N(0, sigma^2)`` per element, one draw for the batch; perturbed input ``x - I``.
    Drawn in float32 whatever the inputs' dtype, so a float64 model sees the same draws."""

    def perturb(x: Tensor, generator: Generator) -> tuple[Tensor, Tensor]:
        shift = torch.randn(x.shape[1:], generator=generator, device=x.device)
        shift = (sigma * shift).to(x.dtype)
        return shift.expand_as(x), x - shift

    return perturb


def _uniform(radius: float) -> SensitivityPerturb:
    """``x + u``, ``u`` uniform in ``[-radius, radius]`` per element, one draw for the batch
    (drawn in float32, as :func:`_gaussian`)."""

    def perturb(x: Tensor, generator: Generator) -> Tensor:
        shift = torch.empty(x.shape[1:], device=x.device)
        return x + shift.uniform_(-radius, radius, generator=generator).to(x.dtype)

    return perturb


def _infidelity_draw(draw: InfidelityPerturb, x: Tensor, seed: int, i: int
                     ) -> tuple[Tensor, Tensor]:
    """Draw ``i``: the perturbation (as ``x``'s shape) and the perturbed inputs, checked."""
    result = draw(x, seeded_generator(seed, i, x.device))
    if not (isinstance(result, tuple | list) and len(result) == 2
            and all(isinstance(t, Tensor) for t in result)):
        raise ValueError(
            f"perturb must return (perturbation, perturbed_inputs), two tensors of the inputs' "
            f"shape {tuple(x.shape)}; got {_described(result)}"
        )
    shift, moved = result
    if moved.shape != x.shape or not _broadcasts(shift.shape, x.shape):
        raise ValueError(
            f"perturb must return (perturbation, perturbed_inputs) of the inputs' shape "
            f"{tuple(x.shape)}; got shapes {tuple(shift.shape)} and {tuple(moved.shape)}"
        )
    return shift.to(x.dtype).expand_as(x), moved


# ---------------------------------------------------------------------------------------------
# Scores and chunks
# ---------------------------------------------------------------------------------------------

def _classes(output: Tensor, target: ClassIndices | None, batch: int) -> Tensor | None:
    """The column scored per image for ``(B, num_classes)`` scores; ``None`` for ``(B,)``."""
    if output.ndim not in (1, 2) or output.shape[0] != batch:
        raise ValueError(
            f"forward must return one score per input, (B,), or (B, num_classes) scores with "
            f"target=; for the batch of {batch} it returned shape {tuple(output.shape)}"
        )
    if output.ndim == 1:
        if target is not None:
            raise ValueError("forward returns one score per input, (B,): target= chooses a "
                             "column of (B, num_classes) scores; leave it out")
        return None
    return class_indices(target, output)


def _rows(output: Tensor, classes: Tensor | None, rows: int) -> Tensor:
    """The ``(rows,)`` scores of one pass: the output itself, or its column ``classes``."""
    expected = (rows,) if classes is None else (rows, output.shape[-1])
    if tuple(output.shape) != expected:
        raise ValueError(f"forward returned shape {tuple(output.shape)} for {rows} inputs, "
                         f"where the clean batch gave {'(B,)' if classes is None else '(B, K)'}")
    return output if classes is None else output.gather(1, classes[:, None])[:, 0]


def _module_behind(forward: Callable[[Tensor], Any]) -> nn.Module | None:
    """The module whose activations can be measured: ``forward`` itself or its owner (a bound
    method such as ``model.forward``); ``None`` for other callables."""
    owner = forward if isinstance(forward, nn.Module) else getattr(forward, "__self__", None)
    if not isinstance(owner, nn.Module) or isinstance(owner, torch.jit.ScriptModule):
        return None
    return model_to_explain(owner)


def _chunk(module: nn.Module | None, x: Tensor, budget: int) -> int:
    """Perturbed inputs per forward pass: measured on the module, else estimated from the input
    (:data:`UNMEASURED_COST`); each also keeps its perturbation and its product with ``Phi``."""
    input_bytes = x[:1].numel() * x.element_size()
    if module is not None:
        return items_per_chunk(module, x[:1], budget, extra_per_item=2 * input_bytes)
    return max(1, budget // ((UNMEASURED_COST + 3) * input_bytes))


# ---------------------------------------------------------------------------------------------
# Checks, before the work
# ---------------------------------------------------------------------------------------------

def _batch(inputs: Any) -> Tensor:
    if not isinstance(inputs, Tensor):
        raise TypeError(f"inputs must be a torch.Tensor (B, C, *spatial), not "
                        f"{type(inputs).__name__}")
    if not inputs.is_floating_point():
        raise TypeError(f"inputs must be a float tensor, got dtype {inputs.dtype}")
    if inputs.ndim < 2 or inputs.shape[0] == 0:
        raise ValueError(f"inputs must be a non-empty batch (B, C, *spatial), got shape "
                         f"{tuple(inputs.shape)}; a single image needs inputs[None]")
    _check_finite(inputs, "the inputs")
    return inputs.detach()


def _attributions_like(attributions: Any, x: Tensor) -> Tensor:
    """``attributions`` as a tensor that broadcasts to ``x``: the same shape, or a map
    ``(B, *spatial)`` given a channel dimension of 1."""
    if not isinstance(attributions, Tensor):
        raise TypeError(f"attributions must be a torch.Tensor, not "
                        f"{type(attributions).__name__} (use Explanation.attributions)")
    map_shape = (x.shape[0], *x.shape[2:])
    if attributions.shape == x.shape:
        phi = attributions
    elif x.ndim >= 3 and attributions.shape == map_shape:
        phi = attributions.unsqueeze(1)
    else:
        maps = f" or {tuple(map_shape)} (a map)" if x.ndim >= 3 else ""
        raise ValueError(
            f"attributions have shape {tuple(attributions.shape)} but the inputs "
            f"{tuple(x.shape)}: pass attributions of the inputs' shape{maps}, at the inputs' "
            "resolution (Explanation.attributions, or Explanation.maps)"
        )
    if phi.device != x.device:
        raise ValueError(f"attributions are on {phi.device} but the inputs on {x.device}")
    _check_finite(phi, "the attributions")
    return phi.detach().to(x.dtype)


def _explanation(value: Any, batch: int, shape: torch.Size | None) -> Tensor:
    """What ``explain`` returned, checked: ``(B, ...)``, and the clean explanation's shape."""
    if not isinstance(value, Tensor):
        hint = (" (return its .maps or .attributions)"
                if type(value).__name__ == "Explanation" else "")
        raise TypeError(f"explain must return a tensor (B, ...), not a "
                        f"{type(value).__name__}{hint}")
    if shape is None and (value.ndim < 1 or value.shape[0] != batch):
        raise ValueError(f"explain must return one explanation per input, (B, ...), for the "
                         f"batch of {batch}; it returned shape {tuple(value.shape)}")
    if shape is not None and value.shape != shape:
        raise ValueError(f"explain returned shape {tuple(value.shape)} for perturbed inputs "
                         f"but {tuple(shape)} for the inputs")
    value = value.detach()
    return value if value.is_floating_point() else value.float()


def _check_finite(t: Tensor, what: str) -> None:
    """A one-line error naming the images of ``t`` that hold NaN or infinite values."""
    bad = (~torch.isfinite(t)).reshape(t.shape[0], -1).any(dim=1).nonzero().flatten().tolist()
    if bad:
        raise ValueError(f"image{'s' if len(bad) > 1 else ''} {_listed(bad)}: {what} hold NaN "
                         "or infinite values, so the metric would be NaN. Check them, or "
                         "replace them (torch.nan_to_num)")


def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive whole number, not {value!r}")
    return value


def _positive_float(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not (
            math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a positive finite number, not {value!r}")
    return float(value)


def _check_seed(seed: Any) -> None:
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, not {seed!r}")


def _norm_order(norm: Any) -> float:
    """The vector norm's order: ``"fro"`` is 2 (Captum's ``torch.norm(p="fro", dim=1)``)."""
    if norm == "fro":
        return 2.0
    if isinstance(norm, bool) or not isinstance(norm, int | float) or math.isnan(norm):
        raise ValueError(f"norm must be 'fro' or a number p (a vector p-norm of the flattened "
                         f"explanations, float('inf') for the largest element), not {norm!r}")
    return float(norm)


def _broadcasts(shape: torch.Size, to: torch.Size) -> bool:
    try:
        return torch.broadcast_shapes(shape, to) == to
    except RuntimeError:
        return False


def _listed(indices: list[int]) -> str:
    return ", ".join(str(i) for i in indices[:5]) + (" ..." if len(indices) > 5 else "")


def _described(value: Any) -> str:
    if isinstance(value, Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    if isinstance(value, tuple | list):
        return f"a {type(value).__name__} of {len(value)}: " + ", ".join(
            f"shape {tuple(v.shape)}" if isinstance(v, Tensor) else type(v).__name__
            for v in value)
    return f"a {type(value).__name__}"
