"""Infidelity and max-sensitivity (``heatlens.metrics.robustness``, Yeh et al., NeurIPS 2019).

1. Agreement with Captum's ``infidelity`` and ``sensitivity_max`` (relative difference <= 1e-4)
   on ``resnet18`` (seeded random init, 32 px, batch 2, explicit targets 1 and 500), with
   saliency attributions from ``heatlens.explain``, under the same perturbation draws. Captum
   calls its ``perturb_func`` once with every input repeated ``n`` times (``repeat_interleave``:
   image 0's ``n`` copies, then image 1's), heatlens calls ``perturb`` once per draw with the
   batch. Each test runs heatlens first with a ``perturb`` that records what it draws (or
   rebuilds heatlens' default draws from ``seeded_generator``), then gives Captum a
   ``perturb_func`` that returns those draws in Captum's order.
2. Formulas written out: saliency of a linear model has infidelity 0 under any perturbation;
   input x gradient has infidelity 0 under masks in Captum's ``multiply_by_inputs`` convention;
   ``Phi = 2 w`` has infidelity ``mean_i (I_i . w)^2``, and 0 normalised. A constant
   explanation, and saliency of a linear model, have max-sensitivity 0; saliency of
   ``f(x) = (w . x)^2 / 2`` is ``(w . x) w``, whose max-sensitivity is ``max_i |w . u_i| / |w . x|``
   and ``r ||w||_1 / |w . x|`` at the corner ``u = r sign(w)`` of the ball.
3. Seeds, chunking under tiny budgets, an image alone or in a batch, the model left as it was.
4. Bad input: a one-line error before any model pass.
"""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from torch import Tensor, nn

import heatlens
from heatlens.methods.sampling import seeded_generator
from heatlens.metrics.robustness import infidelity, max_sensitivity

captum_metrics = pytest.importorskip("captum.metrics")

TOL = 1e-4
TARGETS = [1, 500]
TINY_TARGETS = [3, 7]
TINY_NOISE = 0.5  # the tiny CNN is nearly linear under smaller noise
SAMPLES = 8
EXPLAIN_SAMPLES = 4  # each costs a heatlens.explain call


def relative_diff(ours: Tensor, theirs: Tensor) -> float:
    ours, theirs = ours.double(), theirs.double()
    return float(((ours - theirs).abs() / theirs.abs().clamp_min(1e-30)).max())


def quiet(fn, *args, **kwargs):
    """Call Captum without its warnings."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def in_captum_order(draws: list[Tensor]) -> Tensor:
    """Per-draw ``(B, ...)`` tensors, in the order of Captum's expanded batch: ``(B n, ...)``,
    image-major (``repeat_interleave``)."""
    stacked = torch.stack(draws, dim=1)  # (B, n, ...)
    return stacked.reshape(-1, *stacked.shape[2:])


class Counting:
    """A forward (or explain) function that counts its calls and the inputs it saw."""

    def __init__(self, fn) -> None:
        self.fn, self.calls, self.rows = fn, 0, []

    def __call__(self, x: Tensor) -> Tensor:
        self.calls += 1
        self.rows.append(x.shape[0])
        return self.fn(x)


# --- fixtures --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def images() -> Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def saliency(resnet18_seeded, images) -> Tensor:
    return heatlens.explain(resnet18_seeded, images, "saliency", target=TARGETS).attributions


@pytest.fixture(scope="module")
def tiny() -> nn.Module:
    """A small seeded CNN with smooth and kinked non-linearities, 10 classes."""
    with torch.random.fork_rng():
        torch.manual_seed(3)
        return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Tanh(),
                             nn.Conv2d(8, 8, 3, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                             nn.Flatten(), nn.Linear(8, 10)).eval()


@pytest.fixture(scope="module")
def tiny_grads(tiny, images) -> Tensor:
    return heatlens.explain(tiny, images, "saliency", target=TINY_TARGETS).attributions


@pytest.fixture(scope="module")
def linear() -> nn.Module:
    """``f(x) = W x + b`` on flattened ``(3, 4, 4)`` inputs, three classes, float64."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(48, 3)).double().eval()


@pytest.fixture(scope="module")
def small() -> Tensor:
    return torch.randn(3, 3, 4, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)


class HalfSquare(nn.Module):
    """``f(x) = (w . x)^2 / 2``, one score per input as ``(N, 1)``; its gradient is
    ``(w . x) w``."""

    def __init__(self, w: Tensor) -> None:
        super().__init__()
        self.w = nn.Parameter(w)

    def forward(self, x: Tensor) -> Tensor:
        return 0.5 * (x.flatten(1) @ self.w)[:, None] ** 2


# --- 1. agreement with Captum ----------------------------------------------------------------


@pytest.mark.parametrize("normalize", [False, True])
def test_infidelity_matches_captum_with_the_same_draws(resnet18_seeded, images, saliency,
                                                       normalize):
    recorded = []

    def recording(x: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        shift = 0.05 * torch.randn(x.shape, generator=generator)
        recorded.append(shift)
        return shift, x - shift

    ours = infidelity(resnet18_seeded, images, saliency, perturbations=SAMPLES,
                      perturb=recording, target=TARGETS, normalize=normalize)
    assert len(recorded) == SAMPLES and all(s.shape == images.shape for s in recorded)
    shifts = in_captum_order(recorded)

    def replay(x: Tensor) -> tuple[Tensor, Tensor]:
        assert x.shape[0] == shifts.shape[0]  # Captum perturbs all copies in one call
        return shifts, x - shifts

    theirs = quiet(captum_metrics.infidelity, copy.deepcopy(resnet18_seeded), replay, images,
                   saliency, target=torch.tensor(TARGETS), n_perturb_samples=SAMPLES,
                   normalize=normalize)
    assert ours.shape == theirs.shape == (2,)
    assert bool((theirs > 0).all())  # a non-linear network: not trivially zero
    assert relative_diff(ours, theirs) <= TOL


def test_infidelity_default_draws_match_captum(resnet18_seeded, images, saliency):
    """The default perturbation is ``I_i = noise * randn(C, H, W)`` from ``seeded_generator(seed,
    i)``, shared by the images, and the perturbed input is ``x - I_i``."""
    seed, noise = 3, 0.003
    ours = infidelity(resnet18_seeded, images, saliency, perturbations=SAMPLES, seed=seed,
                      target=TARGETS)
    draws = [noise * torch.randn(images.shape[1:], generator=seeded_generator(seed, i,
                                                                              images.device))
             for i in range(SAMPLES)]
    shifts = in_captum_order([d.expand_as(images) for d in draws])
    theirs = quiet(captum_metrics.infidelity, copy.deepcopy(resnet18_seeded),
                   lambda x: (shifts, x - shifts), images, saliency,
                   target=torch.tensor(TARGETS), n_perturb_samples=SAMPLES)
    assert bool((theirs > 0).all())
    assert relative_diff(ours, theirs) <= TOL


def saliency_of(model: nn.Module, part: str = "attributions", targets=TARGETS):
    """``explain`` on heatlens' saliency with one target per image; a batch of Captum's expanded
    copies (each image's copies together) gets each image's target. Captum calls it on the clean
    inputs as a 1-tuple and then iterates over what it returns, so a tuple gets a tuple back."""

    def explain(x):
        if isinstance(x, tuple):
            return (explain(x[0]),)
        classes = torch.tensor(targets).repeat_interleave(x.shape[0] // len(targets))
        return getattr(heatlens.explain(model, x, "saliency", target=classes), part)

    return explain


@pytest.mark.parametrize(("model_name", "part", "norm"), [
    ("resnet18_seeded", "attributions", "fro"), ("tiny", "maps", math.inf)])
def test_max_sensitivity_matches_captum_with_the_same_draws(request, images, model_name, part,
                                                            norm):
    targets = TARGETS if model_name == "resnet18_seeded" else TINY_TARGETS
    explain = saliency_of(request.getfixturevalue(model_name), part, targets)
    recorded = []

    def recording(x: Tensor, generator: torch.Generator) -> Tensor:
        moved = x + torch.empty(x.shape).uniform_(-0.05, 0.05, generator=generator)
        recorded.append(moved)
        return moved

    ours = max_sensitivity(explain, images, samples=EXPLAIN_SAMPLES, perturb=recording,
                           norm=norm)
    assert len(recorded) == EXPLAIN_SAMPLES and all(m.shape == images.shape for m in recorded)
    moved = in_captum_order(recorded)
    theirs = quiet(captum_metrics.sensitivity_max, explain, images,
                   perturb_func=lambda x: moved, n_perturb_samples=EXPLAIN_SAMPLES,
                   norm_ord=norm)
    assert ours.shape == theirs.shape == (2,)
    assert bool((theirs > 0).all())
    assert relative_diff(ours, theirs) <= TOL


def test_max_sensitivity_default_draws_match_captum(tiny, images):
    """The default draw is ``x + u_i``, ``u_i`` uniform in ``[-r, r]`` of shape ``(C, H, W)``
    from ``seeded_generator(seed, i)``, shared by the images (Captum's default_perturb_func draws
    the same distribution per image)."""
    explain = saliency_of(tiny, targets=TINY_TARGETS)
    seed, radius = 5, 0.02
    ours = max_sensitivity(explain, images, radius=radius, samples=EXPLAIN_SAMPLES, seed=seed)
    draws = [torch.empty(images.shape[1:]).uniform_(-radius, radius,
                                                    generator=seeded_generator(seed, i,
                                                                               images.device))
             for i in range(EXPLAIN_SAMPLES)]
    moved = in_captum_order([images + d for d in draws])
    theirs = quiet(captum_metrics.sensitivity_max, explain, images,
                   perturb_func=lambda x: moved, n_perturb_samples=EXPLAIN_SAMPLES)
    assert bool((theirs > 0).all())
    assert relative_diff(ours, theirs) <= TOL


# --- 2. formulas written out -----------------------------------------------------------------


def gaussian_draws(shape, noise: float, seed: int, count: int) -> list[Tensor]:
    return [(noise * torch.randn(shape, generator=seeded_generator(seed, i, torch.device("cpu"))))
            .double() for i in range(count)]


def test_saliency_of_a_linear_model_has_zero_infidelity(linear, small):
    targets = [0, 2, 1]
    grads = heatlens.explain(linear, small, "saliency", target=targets).attributions
    w = linear[1].weight[targets].reshape(small.shape).detach()
    assert torch.allclose(grads, w)  # the gradient of W x + b is the row of W

    def uniform(x, generator):  # any perturbation: here large and uniform
        shift = torch.empty(x.shape, dtype=x.dtype).uniform_(-3, 3, generator=generator)
        return shift, x - shift

    for perturb, noise in [(None, 0.003), (None, 1.0), (uniform, 0.003)]:
        score = infidelity(linear, small, grads, target=targets, perturb=perturb, noise=noise)
        assert float(score.abs().max()) < 1e-20

    # Phi = 2 w: I^T Phi - (f(x) - f(x - I)) = I . w, so INFD = mean_i (I_i . w)^2 ...
    noise, seed = 0.5, 4
    draws = gaussian_draws(small.shape[1:], noise, seed, 10)
    expected = torch.stack([(d * w).flatten(1).sum(1) ** 2 for d in draws]).mean(0)
    doubled = infidelity(linear, small, 2 * grads, target=targets, noise=noise, seed=seed)
    assert torch.allclose(doubled, expected, rtol=1e-12)
    # ... and the optimal scaling beta = 1/2 makes it exact again
    rescaled = infidelity(linear, small, 2 * grads, target=targets, noise=noise, seed=seed,
                          normalize=True)
    assert float(rescaled.max()) < 1e-12 * float(expected.min())


def test_input_x_gradient_has_zero_infidelity_under_relative_masks(linear, small):
    """Captum's ``multiply_by_inputs`` convention for global attributions: the perturbation is
    ``(x - x~) / x``; removing a random mask of elements (``x~ = x (1 - m)``) makes it ``m``,
    and ``m . (x * w) = w . (x - x~) = f(x) - f(x~)`` (completeness of a linear model)."""
    targets = [2, 2, 0]
    attributions = heatlens.explain(linear, small, "input_x_gradient", target=targets).attributions

    def remove_mask(x, generator):
        mask = (torch.rand(x.shape, generator=generator) < 0.3).to(x.dtype)
        return mask, x * (1 - mask)

    score = infidelity(linear, small, attributions, target=targets, perturb=remove_mask,
                       perturbations=20)
    assert float(score.abs().max()) < 1e-20
    noisy = infidelity(linear, small, attributions, target=targets, perturbations=20, noise=0.1)
    assert float(noisy.min()) > 1e-4  # but it is not a local explanation


def test_a_map_counts_for_every_channel(tiny, images, tiny_grads):
    """``(B, H, W)`` attributions equal the same map repeated over the channels."""
    summed = tiny_grads.sum(dim=1)
    as_map = infidelity(tiny, images, summed, target=TINY_TARGETS, perturbations=4,
                        noise=TINY_NOISE)
    repeated = infidelity(tiny, images, summed[:, None].expand_as(images).clone(),
                          target=TINY_TARGETS, perturbations=4, noise=TINY_NOISE)
    assert relative_diff(as_map, repeated) < 1e-6


def test_normalised_infidelity_ignores_the_scale_and_sign(tiny, images, tiny_grads):
    options = dict(target=TINY_TARGETS, perturbations=4, noise=TINY_NOISE)
    plain = infidelity(tiny, images, tiny_grads, normalize=True, **options)
    scaled = infidelity(tiny, images, -3.7 * tiny_grads, normalize=True, **options)
    assert relative_diff(scaled, plain) < 1e-4
    unscaled = infidelity(tiny, images, tiny_grads, **options)
    assert bool((plain <= unscaled * (1 + 1e-6)).all())  # the optimum over beta, beta = 1 included


def test_target_none_scores_the_arg_max(tiny, images):
    predicted = tiny(images).argmax(dim=1)
    grads = heatlens.explain(tiny, images, "saliency").attributions
    by_default = infidelity(tiny, images, grads, perturbations=3, noise=TINY_NOISE)
    named = infidelity(tiny, images, grads, perturbations=3, noise=TINY_NOISE,
                       target=predicted)
    assert torch.equal(by_default, named)
    # a forward that returns one score per input is that score, for every image
    column = infidelity(tiny, images, grads, perturbations=3, noise=TINY_NOISE, target=7)
    scores = infidelity(lambda x: tiny(x)[:, 7], images, grads, perturbations=3,
                        noise=TINY_NOISE)
    assert relative_diff(column, scores) < 1e-6


def test_a_constant_explanation_has_zero_max_sensitivity(images):
    score = max_sensitivity(lambda x: torch.ones(x.shape[0], 7), images, radius=0.5)
    assert torch.equal(score, torch.zeros(2))


def test_saliency_of_a_linear_model_has_zero_max_sensitivity(linear, small):
    score = max_sensitivity(
        lambda x: heatlens.explain(linear, x, "saliency", target=1).attributions, small,
        radius=0.3)
    assert float(score.abs().max()) == 0


def test_max_sensitivity_of_a_half_square_is_written_out(small):
    """Saliency of ``f = (w . x)^2 / 2`` is ``(w . x) w``, so ``Phi(x + u) - Phi(x) = (w . u) w``
    and the relative change is ``|w . u| / |w . x|`` in any norm. Over the ball
    ``||u||_inf <= r`` its maximum is ``r ||w||_1 / |w . x|``, at ``u = r sign(w)``."""
    w = torch.randn(48, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    model = HalfSquare(w).eval()

    def explain(x):
        return heatlens.explain(model, x, "saliency").attributions

    grads = explain(small)
    projection = small.flatten(1) @ w
    assert torch.allclose(grads.flatten(1), projection[:, None] * w)
    radius, seed = 0.02, 7

    def corner(x, generator):
        return x + radius * w.sign().reshape(x.shape[1:])

    supremum = radius * w.abs().sum() / projection.abs()
    for norm in ("fro", 1, math.inf):
        at_corner = max_sensitivity(explain, small, radius=radius, perturb=corner, norm=norm)
        assert torch.allclose(at_corner, supremum, rtol=1e-12)
    sampled = max_sensitivity(explain, small, radius=radius, samples=12, seed=seed)
    draws = [torch.empty(small.shape[1:]).uniform_(-radius, radius,
                                                   generator=seeded_generator(seed, i,
                                                                              small.device))
             .double().flatten() for i in range(12)]
    expected = torch.stack([(d @ w).abs() / projection.abs() for d in draws]).amax(dim=0)
    assert torch.allclose(sampled, expected, rtol=1e-10)
    assert bool((sampled <= supremum).all()) and bool((sampled > 0).all())


def test_a_zero_explanation_divides_by_one_with_a_warning(small):
    def explain(x):  # zero at x itself, (y - x) elsewhere
        return x - small

    with pytest.warns(UserWarning, match="images 0, 1, 2 is zero"):
        score = max_sensitivity(explain, small, radius=0.1, perturb=lambda x, g: x + 0.1)
    assert torch.allclose(score, torch.full((3,), 0.1 * math.sqrt(48), dtype=torch.float64))


# --- 3. seeds, chunks, batches, the model -----------------------------------------------------


def test_seeded_and_reproducible(tiny, images, tiny_grads):
    runs = [infidelity(tiny, images, tiny_grads, target=TINY_TARGETS, perturbations=4,
                       noise=TINY_NOISE, seed=s) for s in (11, 11, 12)]
    assert torch.equal(runs[0], runs[1]) and relative_diff(runs[2], runs[0]) > 1e-2
    explain = saliency_of(tiny, targets=TINY_TARGETS)
    runs = [max_sensitivity(explain, images, samples=3, seed=s) for s in (11, 11, 12)]
    assert torch.equal(runs[0], runs[1]) and relative_diff(runs[2], runs[0]) > 1e-3


@pytest.mark.parametrize("normalize", [False, True])
def test_chunking_does_not_change_the_numbers(tiny, images, tiny_grads, normalize):
    options = dict(target=TINY_TARGETS, perturbations=5, noise=TINY_NOISE, normalize=normalize)
    whole = infidelity(tiny, images, tiny_grads, **options)
    one_at_a_time = infidelity(tiny, images, tiny_grads, memory_budget=1, **options)
    assert relative_diff(one_at_a_time, whole) < 1e-5
    # a plain function is chunked by the input-size estimate: one copy per pass here ...
    counted = Counting(tiny)
    plain = infidelity(lambda x: counted(x), images, tiny_grads, memory_budget=1, **options)
    assert counted.rows == [2] + [1] * 10
    assert relative_diff(plain, whole) < 1e-5
    # ... and three whole draws per pass here (12 KiB per input, 64 + 3 times that per copy)
    counted = Counting(tiny)
    budget = 6 * 67 * images[0].numel() * images.element_size()
    grouped = infidelity(lambda x: counted(x), images, tiny_grads, memory_budget=budget,
                         **options)
    assert counted.rows == [2, 6, 4]
    assert relative_diff(grouped, whole) < 1e-5


def test_an_image_scores_the_same_alone(tiny, images, tiny_grads):
    options = dict(perturbations=4, noise=TINY_NOISE)
    both = infidelity(tiny, images, tiny_grads, target=TINY_TARGETS, **options)
    alone = infidelity(tiny, images[1:], tiny_grads[1:], target=TINY_TARGETS[1:], **options)
    assert relative_diff(alone, both[1:]) < 1e-5
    both = max_sensitivity(saliency_of(tiny, targets=TINY_TARGETS), images, samples=3)
    alone = max_sensitivity(saliency_of(tiny, targets=TINY_TARGETS[:1]), images[:1], samples=3)
    assert relative_diff(alone, both[:1]) < 1e-5


def test_the_model_comes_back_as_it_went_in():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                          nn.LazyLinear(3))
    x = torch.randn(2, 3, 8, 8)
    model(x)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.warns(UserWarning, match="training mode"):
        infidelity(model, x, torch.ones_like(x), target=0, perturbations=3)
    after = model.state_dict()
    assert model.training and all(torch.equal(before[k], after[k]) for k in before)


# --- 4. bad input ------------------------------------------------------------------------------


def test_bad_infidelity_input_fails_before_the_work(images, saliency):
    counted = Counting(lambda x: x.flatten(1).sum(1))
    nan = saliency.clone()
    nan[1, 0, 3, 3] = float("nan")
    cases = [
        (dict(attributions=saliency[..., :16]), ValueError,
         r"attributions have shape \(2, 3, 32, 16\)"),
        (dict(attributions=saliency.sum(1)[:, :16]), ValueError, "at the inputs' resolution"),
        (dict(attributions=nan), ValueError, "image 1: the attributions hold NaN"),
        (dict(perturbations=0), ValueError, "perturbations must be a positive whole number"),
        (dict(perturbations=2.5), ValueError, "perturbations must be a positive whole number"),
        (dict(noise=0.0), ValueError, "noise must be a positive finite number"),
        (dict(noise=float("nan")), ValueError, "noise must be a positive finite number"),
        (dict(memory_budget=0), ValueError, "memory_budget must be a positive number"),
        (dict(normalize="yes"), TypeError, "normalize must be True or False"),
        (dict(perturb=3), TypeError, "perturb must be a function"),
    ]
    for change, error, message in cases:
        arguments = dict(attributions=saliency) | change
        attributions = arguments.pop("attributions")
        with pytest.raises(error, match=message):
            infidelity(counted, images, attributions, **arguments)
    assert counted.calls == 0
    bad_inputs = images.clone()
    bad_inputs[0, 0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="image 0: the inputs hold NaN"):
        infidelity(counted, bad_inputs, saliency)
    assert counted.calls == 0


def test_bad_scores_targets_and_perturbations_fail_after_one_clean_pass(resnet18_seeded, images,
                                                                        saliency):
    with pytest.raises(ValueError, match="target= chooses a column"):
        infidelity(lambda x: x.flatten(1).sum(1), images, saliency, target=3)
    with pytest.raises(ValueError, match="target class 1000 is out of range"):
        infidelity(resnet18_seeded, images, saliency, target=1000)
    with pytest.raises(ValueError, match="got 3 targets for a batch of 2"):
        infidelity(resnet18_seeded, images, saliency, target=[1, 2, 3])
    with pytest.raises(ValueError, match=r"returned shape \(2, 1, 1\)"):
        infidelity(lambda x: x[:, :1, :1, 0], images, saliency)
    with pytest.raises(ValueError, match=r"perturb must return \(perturbation, perturbed_inputs"):
        infidelity(resnet18_seeded, images, saliency, target=TARGETS, perturb=lambda x, g: x)
    with pytest.raises(ValueError, match=r"got shapes \(3, 32, 32\) and \(1, 3, 32, 32\)"):
        infidelity(resnet18_seeded, images, saliency, target=TARGETS,
                   perturb=lambda x, g: (x[0], x[:1]))


def test_bad_sensitivity_input_fails_before_the_work(images):
    counted = Counting(lambda x: x * 2)
    cases = [
        (dict(radius=0), ValueError, "radius must be a positive finite number, not 0"),
        (dict(radius=-0.1), ValueError, "radius must be a positive finite number"),
        (dict(radius=float("inf")), ValueError, "radius must be a positive finite number"),
        (dict(samples=0), ValueError, "samples must be a positive whole number, not 0"),
        (dict(samples=-3), ValueError, "samples must be a positive whole number"),
        (dict(samples=True), ValueError, "samples must be a positive whole number"),
        (dict(norm="nuc"), ValueError, "norm must be 'fro' or a number"),
        (dict(seed=1.5), TypeError, "seed must be an int"),
        (dict(perturb="uniform"), TypeError, "perturb must be a function"),
    ]
    for arguments, error, message in cases:
        with pytest.raises(error, match=message):
            max_sensitivity(counted, images, **arguments)
    with pytest.raises(ValueError, match="non-empty batch"):
        max_sensitivity(counted, images[0, 0, 0])
    assert counted.calls == 0


def test_bad_explanations_are_named(tiny, images):
    with pytest.raises(TypeError, match=r"return its \.maps or \.attributions"):
        max_sensitivity(lambda x: heatlens.explain(tiny, x, "saliency"), images)

    def nan_for_image_1(x):
        out = x.clone()
        out[1] = float("nan")
        return out

    with pytest.raises(ValueError, match="image 1: the explanations of the inputs hold NaN"):
        max_sensitivity(nan_for_image_1, images)
    calls = []

    def changing_shape(x):
        calls.append(x)
        return x if len(calls) == 1 else x[:, 0, 0, :3]

    with pytest.raises(ValueError, match=r"explain returned shape \(2, 3\) for perturbed"):
        max_sensitivity(changing_shape, images)
    with pytest.raises(ValueError, match="perturb must return the perturbed inputs"):
        max_sensitivity(lambda x: x, images, perturb=lambda x, g: x[0])
