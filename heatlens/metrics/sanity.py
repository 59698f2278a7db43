"""Sanity checks of saliency maps: does a map change when what it claims to explain changes?

Two checks, each a yes or no with the numbers behind it (:class:`SanityResult`):

* :func:`cascading_randomisation`: the model's learned weights are destroyed layer by layer,
  from the output down (Adebayo et al., "Sanity Checks for Saliency Maps", NeurIPS 2018, the
  model parameter randomisation test in its cascading form, Fig. 2). A map that survives the
  destruction of the model does not explain the model: an edge detector passes every such
  "explanation" test of plausibility and fails this one.
* :func:`random_logit`: the map of a random other class is compared with the map of the class
  explained (Sixt, Granz & Landgraf, "When Explanations Lie: Why Many Modified BP Attributions
  Fail", ICML 2020, the random logit test). A map that is the same whatever the class does not
  say why the model chose this class.

Maps are compared per image by :func:`rank_correlation` (Spearman, on the maps as they come and
on their absolute values) and :func:`structural_similarity` (SSIM, on maps scaled to [0, 1]), the
measures of Adebayo et al. (their fourth, the HOG correlation, is left out).

``explain(model, inputs, classes) -> maps (B, *spatial)`` is the caller's method run on the model
it is given, for example::

    def gradcam(model, x, classes):
        return heatlens.explain(model, x, "gradcam", target=classes).maps

It is always given a deep copy of the user's model, never the model itself (``docs/design.md``,
promise 1): name a layer by its string, not by a module object of the original model.
"""

from __future__ import annotations

import copy
import zlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from heatlens.engine.entry import as_batch, buffers_kept
from heatlens.engine.hooks import forward_hooks
from heatlens.engine.layers import module_by_name
from heatlens.engine.maps import constant_maps, minmax
from heatlens.engine.targets import primary_output

Explain = Callable[[nn.Module, Tensor, Tensor], Tensor]
"""``explain(model, inputs, classes) -> maps (B, *spatial)``: the method under test."""

SSIM_SIGMA = 1.5
"""Standard deviation of SSIM's Gaussian window (Wang et al., IEEE TIP 2004)."""

SSIM_WINDOW = 11
"""Taps of that window per dimension: ``2 * int(3.5 * sigma + 0.5) + 1``, as torchmetrics and
``skimage.metrics.structural_similarity(gaussian_weights=True)`` both derive it from sigma."""


@dataclass(frozen=True)
class RandomisationStep:
    """The maps after one step, compared with the original maps, one number per image."""

    layer: str
    """What was randomised: a layer's name (cascading, cumulative: this layer and every one
    listed before it), or ``"random logit"``; ``""`` names the root module."""
    spearman: Tensor
    """``(B,)`` Spearman rank correlation of the maps (float64; float32 on MPS)."""
    spearman_abs: Tensor
    """``(B,)`` the same of their absolute values."""
    ssim: Tensor
    """``(B,)`` structural similarity of the maps, each scaled to [0, 1]."""


@dataclass(frozen=True)
class SanityResult:
    """The verdict of one sanity check and the numbers it rests on."""

    name: str
    """``"cascading randomisation"`` or ``"random logit"``."""
    steps: list[RandomisationStep]
    """Cascading: one step per layer, top first. Random logit: one step."""
    passed: bool
    threshold: float
    reason: str
    """One sentence: what was checked, the rule, and the numbers that decided it."""
    random_classes: Tensor | None = None
    """Random logit: the class explained instead, per image."""


# ------------------------------------------------------------------------------------------------
# Comparing two batches of maps
# ------------------------------------------------------------------------------------------------


def average_ranks(values: Tensor) -> Tensor:
    """Ranks ``1 .. N`` along each row of ``values`` ``(B, N)``, float64; tied values share the
    mean of their ranks (``scipy.stats.rankdata(method="average")``).

    A value's ties occupy the sorted positions ``lo + 1 .. hi`` (``lo`` values are smaller,
    ``hi`` are not larger), so its rank is ``(lo + 1 + hi) / 2``.
    """
    ordered = values.sort(dim=1).values.contiguous()
    lo = torch.searchsorted(ordered, values.contiguous())
    hi = torch.searchsorted(ordered, values.contiguous(), right=True)
    return _precise(lo + 1 + hi) / 2


def _precise(t: Tensor) -> Tensor:
    """``t`` in float64, or float32 on Apple's MPS, which has no float64."""
    return t.float() if t.device.type == "mps" else t.double()


def rank_correlation(a: Tensor, b: Tensor) -> Tensor:
    """Spearman's rank correlation of each pair of maps ``(B, *spatial)``, ``(B,)`` float64:
    ``rho = cov(r_a, r_b) / (sigma(r_a) sigma(r_b))``, the Pearson correlation of the average
    ranks ``r`` (:func:`average_ranks`) over all positions.

    A constant map (see :func:`heatlens.engine.maps.constant_maps`) orders nothing: its
    correlation is 0 with a map that is not constant, and 1 with another constant map (two
    maps that say nothing say the same).

    Computed here rather than by ``torchmetrics.functional.spearman_corrcoef`` (1.9), which
    ranks one map at a time in a Python loop and adds up the ranks of tied values in int32: a
    large group of ties overflows (a 300 x 300 map three quarters zeros, as a CAM after its
    ReLU can be, comes out 0.690 where the rank correlation is 0.703).
    """
    ra, rb = average_ranks(a.flatten(1)), average_ranks(b.flatten(1))
    centre = (ra.shape[1] + 1) / 2  # the mean rank of every map (ties share theirs: same sum)
    ra, rb = ra - centre, rb - centre
    norm = (ra.square().sum(dim=1) * rb.square().sum(dim=1)).sqrt()
    rho = ((ra * rb).sum(dim=1) / norm.clamp_min(1e-300)).clamp(-1.0, 1.0)
    flat_a, flat_b = constant_maps(a), constant_maps(b)
    return torch.where(flat_a | flat_b, flat_a & flat_b, rho)  # bool promoted to rho's dtype


def structural_similarity(a: Tensor, b: Tensor) -> Tensor:
    """SSIM of each pair of maps ``(B, H, W)`` or ``(B, D, H, W)``, ``(B,)`` float64, after
    scaling each map to [0, 1] (:func:`heatlens.engine.maps.minmax`; a constant map becomes 0).

    Wang et al., IEEE TIP 2004, Eq. 13, with local statistics under a Gaussian window
    (``sigma`` 1.5, 11 taps, population (co)variances)::

        SSIM(x, y) = (2 mu_x mu_y + C1) (2 sigma_xy + C2)
                     / ((mu_x^2 + mu_y^2 + C1) (sigma_x^2 + sigma_y^2 + C2)),
        C1 = (0.01 L)^2, C2 = (0.03 L)^2, L = 1 (the data range),

    averaged over the positions whose window lies inside the map (the 5-pixel border, where
    the window would read padding, is left out, as in Wang et al. and scikit-image; torchmetrics
    averages its reflection-padded border too, so its full SSIM image is taken and cropped).
    """
    from torchmetrics.functional.image import structural_similarity_index_measure

    spatial = tuple(a.shape[1:])
    if len(spatial) not in (2, 3):
        raise ValueError(
            f"SSIM compares images (B, H, W) or volumes (B, D, H, W); these maps are "
            f"{tuple(a.shape)}"
        )
    if min(spatial) < SSIM_WINDOW:
        raise ValueError(
            f"SSIM's Gaussian window is {SSIM_WINDOW} pixels wide, and these maps are "
            f"{' x '.join(map(str, spatial))}: explain at a resolution of at least "
            f"{SSIM_WINDOW} pixels a side (Explanation.maps is at the input's resolution)"
        )
    x, y = _precise(minmax(a))[:, None], _precise(minmax(b))[:, None]
    _, full = structural_similarity_index_measure(
        x, y, gaussian_kernel=True, sigma=SSIM_SIGMA, data_range=1.0, k1=0.01, k2=0.03,
        return_full_image=True,
    )
    edge = (SSIM_WINDOW - 1) // 2
    inside = full[(slice(None), 0, *[slice(edge, -edge)] * len(spatial))]
    return inside.flatten(1).mean(dim=1)


def compare(what: str, original: Tensor, maps: Tensor) -> RandomisationStep:
    """``maps`` against ``original`` by the three measures of :class:`RandomisationStep`."""
    if maps.shape != original.shape:
        raise ValueError(
            f"explain returned maps of shape {tuple(maps.shape)} after {what!r}, but "
            f"{tuple(original.shape)} for the original: the maps must be comparable"
        )
    return RandomisationStep(
        layer=what,
        spearman=rank_correlation(original, maps),
        spearman_abs=rank_correlation(original.abs(), maps.abs()),
        ssim=structural_similarity(original, maps),
    )


# ------------------------------------------------------------------------------------------------
# Cascading randomisation
# ------------------------------------------------------------------------------------------------


def _owns_weights(module: nn.Module) -> bool:
    """A module with parameters of its own, or a norm layer with running statistics."""
    return (any(True for _ in module.parameters(recurse=False))
            or isinstance(module, nn.modules.batchnorm._NormBase))


def _ancestors(name: str) -> Iterator[str]:
    """``"a.b.c"`` -> ``"a.b"``, ``"a"``, ``""`` (the root)."""
    parts = name.split(".") if name else []
    for cut in range(len(parts) - 1, -1, -1):
        yield ".".join(parts[:cut])


@contextmanager
def _rng_kept(*modules: nn.Module) -> Iterator[None]:
    """The global random state (CPU and the modules' CUDA devices) restored afterwards."""
    devices = sorted({p.device.index or 0 for m in modules for p in m.parameters()
                      if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=devices):
        yield


def randomisation_order(model: nn.Module, inputs: Tensor) -> list[str]:
    """The layers to randomise, top (output) first: every module that owns parameters (or is
    a norm layer with running statistics), in reverse order of its first forward hook in one
    forward pass of ``inputs``.

    A forward hook runs when a module's output is ready, so leaf layers come in the order they
    run; a module that owns parameters and also has children (a transformer's class token on
    the root) comes after its children. A module with parameters that never runs as a module
    (the ``out_proj`` that ``nn.MultiheadAttention`` uses functionally, a head unused in eval
    mode) is randomised with its nearest ancestor that ran, which becomes a step if it is not
    one already (the root, named ``""``, if need be): no parameter is left out.
    """
    finished: list[str] = []
    seen: set[str] = set()

    def note(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: object, output: object) -> None:
            if name not in seen:
                seen.add(name)
                finished.append(name)

        return hook

    modules = dict(model.named_modules())
    with _rng_kept(model), torch.no_grad(), buffers_kept(model), forward_hooks(
            [(module, note(name)) for name, module in modules.items()]):
        model(inputs)
    steps = {name for name in finished if _owns_weights(modules[name])}
    for name, module in modules.items():
        if _owns_weights(module) and name not in seen:
            steps.add(next(a for a in _ancestors(name) if a in seen))
    return [name for name in reversed(finished) if name in steps]


def _step_modules(model: nn.Module, names: Sequence[str]) -> list[list[nn.Module]]:
    """For each named step, the modules it re-initialises: its module and every submodule that
    owns weights and is not (inside) a step of its own."""
    steps = set(names)
    groups = []
    for name in names:
        root = module_by_name(model, name)  # "" is the root itself
        group = []
        for sub, module in root.named_modules(prefix=name):
            owner = sub if sub in steps else next(a for a in _ancestors(sub) if a in steps)
            if owner == name and _owns_weights(module):
                group.append(module)
        if not group:
            raise ValueError(
                f"layer {name!r} has no weights of its own to randomise (no parameters, no "
                "running statistics outside the other layers listed); name a layer that has"
            )
        groups.append(group)
    return groups


def layer_seed(seed: int, name: str) -> int:
    """The seed of one layer's new weights: from ``seed`` and the layer's name, so a layer is
    drawn the same whichever other layers are randomised and in which order."""
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63


def reinitialise(modules: Sequence[nn.Module], seed: int) -> None:
    """Draw new weights for ``modules`` in place, seeded, leaving the global random state as it
    was.

    Each module's own ``reset_parameters()``, as its constructor ran it: Kaiming-uniform
    convolutions and linear layers, norm layers back to scale 1, shift 0 and running
    statistics 0 and 1. That is the network at initialisation, the scale its architecture was
    built for, so the randomised maps are finite and comparable, and a learned norm layer is
    not left rescaling random features with statistics of learned ones (Adebayo et al.
    re-initialise "weights (and other trainable variables)"). A module without
    ``reset_parameters`` gets normal draws with each parameter's own mean and standard deviation
    (a constant parameter stays as it is).
    """
    with _rng_kept(*modules), torch.no_grad():
        torch.manual_seed(seed)
        for module in modules:
            reset = getattr(module, "reset_parameters", None)
            if callable(reset):
                reset()
                continue
            for parameter in module.parameters(recurse=False):
                if parameter.numel() > 1:
                    parameter.normal_(float(parameter.mean()),
                                      float(parameter.std(correction=0)))


def cascading_randomisation(model: nn.Module, inputs: Tensor, explain: Explain, classes: Tensor,
                            *, seed: int = 0, layers: Sequence[str] | None = None,
                            threshold: float = 0.5) -> SanityResult:
    """Adebayo et al. (NeurIPS 2018), model parameter randomisation, cascading (Fig. 2).

    On a deep copy of ``model`` (the model itself is not touched: weights, modes, hooks and
    gradients stay as they are, also when ``explain`` raises), with ``M_0`` the maps of the
    intact copy and ``M_t`` the maps after re-initialising layers ``1 .. t`` (top first,
    cumulatively, :func:`reinitialise`, seeded per layer by :func:`layer_seed`)::

        step t:  rho_t = spearman(M_0, M_t),  rho|.|_t = spearman(|M_0|, |M_t|),
                 ssim_t = SSIM(minmax M_0, minmax M_t)          (per image)

    Layers: ``layers`` names them in the order to randomise them (a name covers its whole
    subtree, except the layers named separately); by default every module with weights of its
    own, convolutions, linear layers and batch norms alike, each a step, the last to run first
    (:func:`randomisation_order`).

    Passed when, after the last step, the mean over images of ``rho`` and of ``rho|.|`` are
    both below ``threshold``: once every learned weight is gone, the map must have lost most
    of its ordering of the image. The default 0.5 asks for less than 0 because a network at
    initialisation still maps through the input's structure and the architecture (Binder et
    al., "Shortcomings of Top-Down Randomization-Based Sanity Checks", arXiv 2211.12486), and
    for much less than 1: a map whose ranking correlates with its original by 0.5 or more
    after the model is destroyed took most of its ordering from the input, not the weights.
    A map that ignores the model (an edge detector) keeps ``rho = 1`` at every step and fails.

    Args:
        model: the trained model; a deep copy is what is randomised and explained.
        inputs: ``(B, C, *spatial)`` or one ``(C, *spatial)``.
        explain: the method under test (see the module docstring).
        classes: ``(B,)`` class indices to explain, or one for all images.
        seed: seeds every layer's new weights.
        layers: names of the layers to randomise, top first; ``None`` for all of them.
        threshold: the largest mean rank correlation that still fails, in ``(-1, 1]``.
    """
    _check_threshold(threshold)
    twin = _copy_of(model)
    x = as_batch(inputs, twin)
    classes = _as_classes(classes, x)
    names = randomisation_order(twin, x) if layers is None else _checked_layers(layers)
    groups = _step_modules(twin, names)
    original = _maps_of(explain, twin, x, classes, "the intact model")
    steps = []
    for name, group in zip(names, groups, strict=True):
        reinitialise(group, layer_seed(seed, name))
        steps.append(compare(name, original, _maps_of(explain, twin, x, classes, name)))
    passed, numbers = _verdict(steps[-1], threshold)
    meaning = ("the map depends on the learned weights" if passed else
               "the map survives the destruction of the model, so it does not explain the model")
    reason = (
        f"Cascading randomisation of {len(steps)} layers, top first: with every one "
        f"re-initialised, the mean Spearman rank correlation with the original maps is "
        f"{numbers}: {meaning}."
    )
    return SanityResult("cascading randomisation", steps, passed, threshold, reason)


# ------------------------------------------------------------------------------------------------
# Random logit
# ------------------------------------------------------------------------------------------------


def random_other_classes(classes: Tensor, num_classes: int, seed: int) -> Tensor:
    """For each image a class drawn uniformly from the ``num_classes - 1`` others, seeded:
    ``(c + u) mod K`` with ``u`` uniform in ``1 .. K - 1``."""
    generator = torch.Generator().manual_seed(seed)
    offsets = torch.randint(1, num_classes, tuple(classes.shape), generator=generator)
    return (classes + offsets.to(classes.device)) % num_classes


def random_logit(model: nn.Module, inputs: Tensor, explain: Explain, classes: Tensor, *,
                 seed: int = 0, threshold: float = 0.5) -> SanityResult:
    """The random logit test (Sixt, Granz & Landgraf, ICML 2020): the map of a random other
    class ``r != c`` (:func:`random_other_classes`, seeded) against the map of class ``c``::

        rho = spearman(M_c, M_r),  rho|.| = spearman(|M_c|, |M_r|),
        ssim = SSIM(minmax M_c, minmax M_r)          (per image)

    Passed when the mean over images of ``rho`` and of ``rho|.|`` are both below ``threshold``
    (0.5 by default, as for :func:`cascading_randomisation`): the map depends on the class
    explained. A map that is the same for every class has ``rho = 1`` and fails. It runs on a
    deep copy of ``model``, which must return ``(B, num_classes)`` scores (one forward pass,
    without gradients, counts the classes).

    Args:
        model: the trained model.
        inputs: ``(B, C, *spatial)`` or one ``(C, *spatial)``.
        explain: the method under test (see the module docstring).
        classes: ``(B,)`` class indices to explain (usually the predicted ones), or one for all.
        seed: seeds the random classes.
        threshold: the largest mean rank correlation that still fails, in ``(-1, 1]``.
    """
    _check_threshold(threshold)
    twin = _copy_of(model)
    x = as_batch(inputs, twin)
    classes = _as_classes(classes, x)
    num_classes = _class_count(twin, x)
    if bool((classes < 0).any()) or bool((classes >= num_classes).any()):
        raise ValueError(
            f"classes must be indices in 0..{num_classes - 1} of the model's {num_classes} "
            f"scores; got {classes.tolist()}"
        )
    others = random_other_classes(classes, num_classes, seed)
    original = _maps_of(explain, twin, x, classes, "the classes given")
    step = compare("random logit", original, _maps_of(explain, twin, x, others, "random classes"))
    passed, numbers = _verdict(step, threshold)
    meaning = ("the map depends on the class explained" if passed else
               "the map hardly depends on the class, so it does not say why this class")
    reason = (
        f"Random logit: the maps of a random other class have a mean Spearman rank correlation "
        f"with the maps of the classes given of {numbers}: {meaning}."
    )
    return SanityResult("random logit", [step], passed, threshold, reason, random_classes=others)


# ------------------------------------------------------------------------------------------------
# Checks and the copy
# ------------------------------------------------------------------------------------------------


def _check_threshold(threshold: float) -> None:
    if not -1.0 < float(threshold) <= 1.0:
        raise ValueError(
            f"threshold is a rank correlation, in (-1, 1]; got {threshold}. The default 0.5 "
            "fails a map that keeps a correlation of 0.5 or more"
        )


def _as_classes(classes: Tensor | int, x: Tensor) -> Tensor:
    """``(B,)`` long class indices on the inputs' device; one class is taken for every image."""
    if isinstance(classes, int) and not isinstance(classes, bool):
        classes = torch.tensor(classes)
    if not isinstance(classes, Tensor) or classes.is_floating_point() or classes.is_complex() \
            or classes.dtype == torch.bool:
        raise TypeError(
            f"classes must be a tensor of class indices (B,) or one int, not "
            f"{getattr(classes, 'dtype', type(classes).__name__)}"
        )
    batch = x.shape[0]
    if classes.ndim == 0:
        return classes.to(x.device, torch.long).expand(batch).clone()
    if tuple(classes.shape) != (batch,):
        raise ValueError(
            f"classes has shape {tuple(classes.shape)}, but the batch holds {batch} images: "
            f"give one class per image (B,) = ({batch},), or one int for all"
        )
    return classes.to(x.device, torch.long)


def _checked_layers(layers: Sequence[str]) -> list[str]:
    """``layers`` as a list of distinct names; whether each names a layer of the model is
    checked by :func:`_step_modules`, which looks them up before the method runs."""
    if isinstance(layers, str):
        raise TypeError(f"layers is a list of layer names, top first: pass [{layers!r}]")
    names = list(layers)
    if not names:
        raise ValueError("layers is empty: name at least one layer to randomise, or pass None")
    if len(set(names)) != len(names):
        raise ValueError(f"layers names a layer more than once: {names}")
    return names


def _copy_of(model: nn.Module) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, not {type(model).__name__}")
    try:
        return copy.deepcopy(model)
    except Exception as exc:
        raise TypeError(
            f"the sanity checks explain a copy of the model, never the model itself, and "
            f"copy.deepcopy failed on it: {exc}"
        ) from exc


def _class_count(model: nn.Module, x: Tensor) -> int:
    with _rng_kept(model), torch.no_grad(), buffers_kept(model):
        scores = primary_output(model(x))
    if scores.ndim != 2 or scores.shape[1] < 2:
        raise ValueError(
            f"the random logit test needs a model returning (B, num_classes) scores with at "
            f"least 2 classes; this one returns {tuple(scores.shape)}"
        )
    return int(scores.shape[1])


def _maps_of(explain: Explain, model: nn.Module, x: Tensor, classes: Tensor, when: str
             ) -> Tensor:
    maps = explain(model, x, classes)
    if not isinstance(maps, Tensor):
        hint = " (take its .maps)" if hasattr(maps, "maps") else ""
        raise TypeError(f"explain must return the maps as a tensor (B, *spatial), not "
                        f"{type(maps).__name__}{hint}")
    if maps.ndim < 2 or maps.shape[0] != x.shape[0]:
        raise ValueError(
            f"explain returned maps of shape {tuple(maps.shape)} for {when}; expected "
            f"(B, *spatial) with B = {x.shape[0]}"
        )
    if not bool(torch.isfinite(maps).all()):
        raise ValueError(f"explain returned maps holding NaN or infinite values for {when}")
    return maps.detach()


def _verdict(step: RandomisationStep, threshold: float) -> tuple[bool, str]:
    """Whether both mean rank correlations of ``step`` fall below ``threshold``, and the numbers
    in words."""
    signed, absolute = float(step.spearman.mean()), float(step.spearman_abs.mean())
    passed = signed < threshold and absolute < threshold
    verdict = ("below" if passed else "not below") + f" the threshold {threshold:g}"
    return passed, (f"{signed:.2f} ({absolute:.2f} on absolute values, SSIM "
                    f"{float(step.ssim.mean()):.2f}), {verdict} (both must be)")
