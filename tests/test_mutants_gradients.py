"""Tests written to kill the mutants of ``heatlens/methods/gradients.py`` and
``heatlens/methods/attribution.py`` that survived ``tools/mutation.py`` (issue 16, "Tests that
catch wrong math"; scores and the equivalent mutants are in ``docs/testing.md``).

Each test checks a formula written out here in float64 (the integrals of integrated gradients
on a quadratic model are exact), a backward pass written by hand, agreement with Captum
(Guided Grad-CAM, the picture scaling) or an exact property (chunks within the memory budget,
progress counts), on tiny models, so the whole file runs in a few seconds.
"""

from __future__ import annotations

import math
import re
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from captum.attr import GuidedGradCam
from captum.attr._utils.visualization import _normalize_attr
from scipy.ndimage import gaussian_filter
from torch import Tensor, nn

import heatlens
from heatlens.engine.budget import items_per_chunk, sample_bytes, watched
from heatlens.engine.targets import BinaryOutput, CallableTarget, ClassLogit
from heatlens.methods.attribution import (
    OnePassAttribution,
    PassResult,
    attribution_maps,
    broadcast_reference,
    classes_and_scores,
    input_gradients,
    percentile_scale,
    reference_distribution,
    with_input,
)
from heatlens.methods.gradients import (
    GuidedGradCAM,
    IntegratedGradients,
    Saliency,
    integration_rule,
)

# --- models and helpers -----------------------------------------------------------------------


class Quadratic(nn.Module):
    """``y_c(x) = sum_i a_ci x_i^2 + b_ci x_i`` in float64: its gradient ``2 a_c x + b_c`` is
    linear in ``x``, so every integral along a straight path is written out exactly. Records the
    batch size of every forward pass."""

    def __init__(self, features: int, classes: int = 3, seed: int = 0) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.a = nn.Parameter(torch.randn(classes, features, generator=generator,
                                          dtype=torch.float64))
        self.b = nn.Parameter(torch.randn(classes, features, generator=generator,
                                          dtype=torch.float64))
        self.batches: list[int] = []

    def forward(self, x: Tensor) -> Tensor:
        self.batches.append(x.shape[0])
        flat = x.flatten(1)
        return flat.square() @ self.a.T + flat @ self.b.T


SHAPE = (2, 3, 4, 4)
X = torch.randn(SHAPE, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
TARGETS = [2, 0]


def quadratic() -> Quadratic:
    return Quadratic(math.prod(SHAPE[1:])).eval()


def exact_gradient(model: Quadratic, x: Tensor, targets: list[int]) -> Tensor:
    """``d y_c / d x = 2 a_c x + b_c``."""
    with torch.no_grad():
        a, b = model.a[targets].reshape(x.shape), model.b[targets].reshape(x.shape)
        return 2 * a * x + b


def quadrature_mean(rule: str, steps: int) -> tuple[float, float]:
    """``(sum_i w_i, sum_i w_i alpha_i)`` of each rule, written out: 1 and 1/2 for the midpoint,
    trapezoid and Gauss-Legendre rules (exact for a linear integrand), ``(n - 1) / 2n`` for the
    left sum and ``(n + 1) / 2n`` for the right one."""
    return 1.0, {"riemann_left": (steps - 1) / (2 * steps),
                 "riemann_right": (steps + 1) / (2 * steps)}.get(rule, 0.5)


def exact_ig(model: Quadratic, x: Tensor, base: Tensor, targets: list[int], rule: str,
             steps: int) -> Tensor:
    """``(x - x') sum_i w_i grad(x' + alpha_i (x - x'))``; for the quadratic model the gradient
    is ``2 a (x' + alpha d) + b``, so the sum is ``2 a (S x' + M d) + S b`` with
    ``S = sum w_i``, ``M = sum w_i alpha_i``."""
    total, mean = quadrature_mean(rule, steps)
    d = x - base
    with torch.no_grad():
        a, b = model.a[targets].reshape(x.shape), model.b[targets].reshape(x.shape)
        return d * (2 * a * (total * base + mean * d) + total * b)


def score(model: nn.Module, x: Tensor, targets: list[int]) -> Tensor:
    with torch.no_grad():
        return model(x)[torch.arange(len(targets)), targets]


def budget_for(model: nn.Module, x: Tensor, items: int) -> int:
    """A memory budget in which exactly ``items`` inputs with gradients fit in one chunk."""
    per_item = sample_bytes(model, x[:1], with_gradients=True) + x[:1].numel() * x.element_size()
    return items * per_item


class Steps:
    """A progress watcher that records every ``(done, total, description)``."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, int, str]] = []

    def __call__(self, done: int, total: int, description: str) -> None:
        self.seen.append((done, total, description))


def ig(model: nn.Module, x: Tensor, targets: list[int], **options) -> heatlens.Explanation:
    return heatlens.explain(model, x, "integrated_gradients", target=targets, **options)


# --- gradients.py: integration rules ------------------------------------------------------------


@pytest.mark.parametrize("steps", [1, 2, 3, 5])
@pytest.mark.parametrize(("rule", "offset"), [("riemann_left", 0.0), ("riemann_right", 1.0),
                                              ("riemann_middle", 0.5)])
def test_riemann_rules_written_out(rule, offset, steps):
    """``alpha_i = (i + offset) / n`` and ``w_i = 1 / n``, in float64."""
    alphas, weights = integration_rule(rule, steps)
    assert alphas.dtype == weights.dtype == torch.float64
    expected = [(i + offset) / steps for i in range(steps)]
    np.testing.assert_allclose(alphas.numpy(), expected, rtol=0, atol=1e-15)
    np.testing.assert_allclose(weights.numpy(), [1 / steps] * steps, rtol=0, atol=1e-15)


@pytest.mark.parametrize("steps", [2, 3, 4])
def test_trapezoid_rule_written_out(steps):
    """``alpha_i = i / (n - 1)``, ``w = h (1/2, 1, ..., 1, 1/2)`` with ``h = 1 / (n - 1)``."""
    alphas, weights = integration_rule("riemann_trapezoid", steps)
    h = 1 / (steps - 1)
    assert alphas.dtype == weights.dtype == torch.float64
    np.testing.assert_allclose(alphas.numpy(), [i * h for i in range(steps)], rtol=0, atol=1e-15)
    np.testing.assert_allclose(weights.numpy(), [h / 2] + [h] * (steps - 2) + [h / 2], rtol=0,
                               atol=1e-15)


@pytest.mark.parametrize("steps", [1, 2, 3, 6])
def test_gauss_legendre_integrates_polynomials_of_degree_2n_minus_1_exactly(steps):
    """``n`` Gauss-Legendre points on [0, 1] integrate ``a^k`` to ``1 / (k + 1)`` for every
    ``k <= 2n - 1`` (and not ``a^(2n)``); the points lie inside (0, 1), symmetric about 1/2."""
    alphas, weights = integration_rule("gausslegendre", steps)
    assert alphas.dtype == weights.dtype == torch.float64
    a, w = alphas.numpy(), weights.numpy()
    for k in range(2 * steps):
        assert abs(float((w * a**k).sum()) - 1 / (k + 1)) < 1e-14, k
    assert abs(float((w * a ** (2 * steps)).sum()) - 1 / (2 * steps + 1)) > 1e-10
    assert ((a > 0) & (a < 1)).all()
    np.testing.assert_allclose(np.sort(a), np.sort(1 - a), rtol=0, atol=1e-15)


@pytest.mark.parametrize(("rule", "fewest"), [("riemann_left", 1), ("riemann_right", 1),
                                              ("riemann_middle", 1), ("gausslegendre", 1),
                                              ("riemann_trapezoid", 2)])
def test_integration_rule_needs_its_fewest_steps(rule, fewest):
    assert len(integration_rule(rule, fewest)[0]) == fewest
    with pytest.raises(ValueError, match=f"{rule} needs more steps than {fewest - 1}"):
        integration_rule(rule, fewest - 1)


def test_an_unknown_rule_is_named_with_the_known_ones():
    with pytest.raises(ValueError, match="rule must be one of .*gausslegendre.*'simpson'"):
        integration_rule("simpson", 4)


# --- gradients.py: integrated gradients on an exactly integrable model --------------------------


@pytest.mark.parametrize("rule", ["riemann_left", "riemann_right", "riemann_middle",
                                  "riemann_trapezoid", "gausslegendre"])
@pytest.mark.parametrize("items", [1, 1000])
def test_ig_equals_the_quadrature_written_out(rule, items):
    """The attributions equal ``(x - x') sum_i w_i grad(x' + alpha_i (x - x'))`` written out for
    the quadratic model, from a non-zero tensor baseline; ``convergence_delta`` is
    ``sum A - (y_c(x) - y_c(x'))``, evaluated here; the same whether the points run one per
    chunk (``items=1``: one point of two images does not fit, so one point per chunk) or all at
    once."""
    model, steps = quadratic(), 7
    base = torch.tensor([0.5, -1.0, 0.25], dtype=torch.float64).reshape(3, 1, 1)
    e = ig(model, X, TARGETS, steps=steps, rule=rule, baseline=base,
           memory_budget=budget_for(model, X, items))
    expected = exact_ig(model, X, base.expand_as(X), TARGETS, rule, steps)
    assert e.raw.dtype == torch.float64
    np.testing.assert_allclose(e.raw.numpy(), expected.numpy(), rtol=1e-12, atol=1e-12)
    gain = score(model, X, TARGETS) - score(model, base.expand_as(X), TARGETS)
    delta = expected.flatten(1).sum(1) - gain
    np.testing.assert_allclose(e.details["convergence_delta"].numpy(), delta.numpy(), rtol=1e-10,
                               atol=1e-10)
    assert torch.equal(e.details["baseline"], base.expand_as(X))
    if rule in ("riemann_middle", "riemann_trapezoid", "gausslegendre"):  # exact: complete
        assert float(e.details["convergence_delta"].abs().max()) < 1e-10
    else:  # the one-sided sums are off by (M - 1/2) sum a d^2, visibly
        assert float(e.details["convergence_delta"].abs().min()) > 1e-3


@pytest.mark.parametrize(("items", "passes"), [(1, [2] * 7), (4, [4, 4, 4, 2]), (1000, [14])])
def test_ig_chunks_hold_whole_points_within_the_budget_and_report_progress(items, passes):
    """With room for ``items`` inputs with gradients, 2 images take ``max(1, items // 2)``
    points per chunk: 7 points run as passes of that many points (times 2 inputs), and the
    watcher hears ``done`` grow by those counts up to ``steps * B``, with the method's name."""
    model, steps = quadratic(), 7
    budget = budget_for(model, X, items)
    assert items_per_chunk(model, X, budget, with_gradients=True) == items
    if items == 4:  # the estimate without gradients (larger here) would give other chunks
        assert items_per_chunk(model, X, budget) // 2 != items // 2
    seen = Steps()
    model.batches.clear()
    with watched(seen):
        ig(model, X, TARGETS, steps=steps, memory_budget=budget)
    gradient_passes = model.batches[1:-1]  # the first pass reads the classes, the last the ends
    assert gradient_passes == passes
    assert model.batches[-1] == 2 * X.shape[0]  # x and x' in one pass
    done = np.cumsum(passes).tolist()
    assert seen.seen == [(n, 14, "integrated_gradients") for n in done]


def test_ig_defaults_are_the_documented_ones():
    """50 Gauss-Legendre points from a zero baseline: the progress total is ``50 * B`` and the
    attributions equal the explicit call's bit for bit; the baseline is zeros."""
    model = quadratic()
    seen = Steps()
    with watched(seen):
        default = ig(model, X, TARGETS)
    assert seen.seen[-1] == (50 * 2, 50 * 2, "integrated_gradients")
    explicit = ig(model, X, TARGETS, steps=50, rule="gausslegendre", baseline="zeros")
    assert torch.equal(default.raw, explicit.raw)
    assert torch.equal(default.details["baseline"], torch.zeros_like(X))
    np.testing.assert_allclose(default.raw.numpy(), exact_ig(model, X, torch.zeros_like(X),
                                                             TARGETS, "gausslegendre", 50).numpy(),
                               rtol=1e-12, atol=1e-12)


def scipy_blur(x: Tensor, sigma: float) -> Tensor:
    """A Gaussian of ``sigma`` pixels over the spatial axes, edges replicated, radius
    ``3 sigma`` (scipy's ``int(3 sigma + 0.5)`` is heatlens' ``ceil(3 sigma)`` for these)."""
    blurred = gaussian_filter(x.numpy(), sigma=(0, 0, sigma, sigma), mode="nearest",
                              truncate=3.0)
    return torch.from_numpy(blurred)


@pytest.mark.parametrize("sigma", [None, 1.0])
def test_ig_blur_baseline_is_the_gaussian_of_blur_sigma(sigma):
    """``baseline="blur"`` is the input blurred by a Gaussian of ``blur_sigma`` pixels
    (8 by default), and the path starts there."""
    model = quadratic()
    options = {} if sigma is None else {"blur_sigma": sigma}
    e = ig(model, X, TARGETS, steps=3, baseline="blur", **options)
    expected = scipy_blur(X, 8.0 if sigma is None else sigma)
    np.testing.assert_allclose(e.details["baseline"].numpy(), expected.numpy(), rtol=0,
                               atol=1e-12)
    np.testing.assert_allclose(
        e.raw.numpy(), exact_ig(model, X, expected, TARGETS, "gausslegendre", 3).numpy(),
        rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("seed", [None, 3])
def test_ig_uniform_baseline_is_seeded_noise_over_each_images_range(seed):
    """``baseline="uniform"``: ``low + (high - low) u`` with ``u`` one draw of ``U[0, 1)`` of
    shape ``(C, *spatial)`` in the input's dtype from a generator seeded with ``seed`` (0 by
    default), ``low`` and ``high`` each image's smallest and largest value."""
    model = quadratic()
    options = {} if seed is None else {"seed": seed}
    e = ig(model, X, TARGETS, steps=2, baseline="uniform", **options)
    generator = torch.Generator().manual_seed(0 if seed is None else seed)
    u = torch.rand(SHAPE[1:], generator=generator, dtype=torch.float64)
    low = np.array([float(image.min()) for image in X]).reshape(-1, 1, 1, 1)
    high = np.array([float(image.max()) for image in X]).reshape(-1, 1, 1, 1)
    expected = low + (high - low) * u.numpy()[None]
    np.testing.assert_allclose(e.details["baseline"].numpy(), expected, rtol=0, atol=1e-14)


def test_ig_rejects_bad_options_when_made():
    model = quadratic()
    with pytest.raises(ValueError, match="integrated_gradients attributes to the input"):
        IntegratedGradients(model, layer="a")
    with pytest.raises(ValueError, match="riemann_trapezoid needs more steps than 1"):
        IntegratedGradients(model, steps=1, rule="riemann_trapezoid")
    with pytest.raises(ValueError, match="baseline must be one of .*'zero'"):
        IntegratedGradients(model, baseline="zero")
    with pytest.raises(ValueError, match=r"baseline of shape \(2, 2\) .* shape \(2, 3, 4, 4\)"):
        ig(model, X, TARGETS, baseline=torch.zeros(2, 2, dtype=torch.float64))


# --- gradients.py: saliency and input x gradient ------------------------------------------------


def test_saliency_and_input_x_gradient_are_the_gradient_written_out():
    """``d y_c / d x = 2 a_c x + b_c``, signed by default (both signs occur), its absolute
    value with ``absolute=True``; input x gradient is ``x`` times it."""
    model = quadratic()
    grad = exact_gradient(model, X, TARGETS)
    assert bool((grad < 0).any()) and bool((grad > 0).any())
    signed = heatlens.explain(model, X, "saliency", target=TARGETS).raw
    absolute = heatlens.explain(model, X, "saliency", target=TARGETS, absolute=True).raw
    times_input = heatlens.explain(model, X, "input_x_gradient", target=TARGETS).raw
    np.testing.assert_allclose(signed.numpy(), grad.numpy(), rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(absolute.numpy(), grad.abs().numpy(), rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(times_input.numpy(), (X * grad).numpy(), rtol=1e-13, atol=1e-13)


# --- gradients.py: the ReLU rules ---------------------------------------------------------------


class ReLUStyles(nn.Module):
    """Four linear layers, each followed by a ReLU called in another way, then a linear head:
    ``F.relu(h, True)`` and ``nn.ReLU(inplace=True)`` and ``torch.relu_`` with their return
    values discarded (only the change in place counts), and ``F.relu(h, False)`` whose input is
    used again, in a skip connection ``relu(h) + h`` (a ReLU done in place would double it)."""

    def __init__(self, width: int = 10, classes: int = 3) -> None:
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(4)
            self.linears = nn.ModuleList(nn.Linear(width if i else 4, width).double()
                                         for i in range(4))
            self.head = nn.Linear(width, classes).double()
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        h = self.linears[0](x.flatten(1))
        F.relu(h, True)
        h = self.linears[1](h)
        self.relu(h)
        h = self.linears[2](h)
        torch.relu_(h)
        h = self.linears[3](h)
        return self.head(F.relu(h, False) + h)


def styles_backprop(model: ReLUStyles, x: Tensor, targets: list[int], rule: str) -> Tensor:
    """The backward pass of :class:`ReLUStyles` by hand, each ReLU passing ``g`` as ``rule``
    says: ``"plain"`` ``g [h > 0]``, ``"guided"`` ``relu(g) [h > 0]``, ``"deconv"``
    ``relu(g)``."""

    def through(g: Tensor, h: Tensor) -> Tensor:
        passed = g if rule == "plain" else g.clamp_min(0)
        return passed if rule == "deconv" else passed * (h > 0)

    with torch.no_grad():
        pre, h = [], x.flatten(1)
        for i, linear in enumerate(model.linears):
            h = linear(h)
            pre.append(h)
            h = h.clamp_min(0) if i < 3 else h
        g = model.head.weight[targets]  # d y_c / d (relu(h4) + h4)
        g = through(g, pre[3]) + g
        for i in (2, 1, 0):
            g = through(g @ model.linears[i + 1].weight, pre[i])
        return (g @ model.linears[0].weight).reshape(x.shape)


def test_relu_rules_follow_every_way_of_calling_relu():
    """Guided backpropagation and deconvnet equal the backward pass written by hand through
    ReLUs called positionally in place, as an in-place module, as ``torch.relu_``, and
    positionally not in place; saliency is the plain gradient (the hand-written pass is
    checked against autograd)."""
    model = ReLUStyles().eval()
    x = torch.randn(5, 4, 1, 1, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    targets = [0, 1, 2, 0, 1]
    leaf = x.clone().requires_grad_(True)
    (autograd,) = torch.autograd.grad(model(leaf)[torch.arange(5), targets].sum(), leaf)
    plain = styles_backprop(model, x, targets, "plain")
    np.testing.assert_allclose(plain.numpy(), autograd.numpy(), rtol=1e-12, atol=1e-12)
    for method, rule in [("saliency", "plain"), ("guided_backprop", "guided"),
                         ("deconvnet", "deconv")]:
        ours = heatlens.explain(model, x, method, target=targets).raw
        expected = styles_backprop(model, x, targets, rule)
        np.testing.assert_allclose(ours.numpy(), expected.numpy(), rtol=1e-12, atol=1e-12,
                                   err_msg=method)
    guided = styles_backprop(model, x, targets, "guided")
    deconv = styles_backprop(model, x, targets, "deconv")
    scale = float(plain.abs().max())
    assert float((guided - plain).abs().max()) > 0.2 * scale
    assert float((deconv - guided).abs().max()) > 0.2 * scale


# --- gradients.py: Guided Grad-CAM ----------------------------------------------------------------


class SmallCNN(nn.Module):
    """conv -> ReLU -> conv (stride 2) -> ReLU -> mean -> linear, float64; ``nn.ReLU``
    modules, which Captum's guided backpropagation hooks."""

    def __init__(self) -> None:
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(8)
            self.conv1 = nn.Conv2d(3, 6, 3, padding=1).double()
            self.conv2 = nn.Conv2d(6, 8, 3, padding=1, stride=2).double()
            self.fc = nn.Linear(8, 4).double()
        self.relu1, self.relu2 = nn.ReLU(), nn.ReLU()  # modules: Captum hooks only these

    def forward(self, x: Tensor) -> Tensor:
        h = self.relu2(self.conv2(self.relu1(self.conv1(x))))
        return self.fc(h.mean(dim=(2, 3)))


CNN_X = torch.randn(2, 3, 10, 10, generator=torch.Generator().manual_seed(9),
                    dtype=torch.float64)


@pytest.mark.parametrize("upsampling", ["bilinear", "nearest", None])
def test_guided_gradcam_matches_captum(upsampling):
    """Guided backpropagation times the ReLU'd Grad-CAM map of ``conv2`` (5 x 5) upsampled to
    10 x 10, against Captum's ``GuidedGradCam`` with ``interpolate_mode`` the same (bilinear by
    default here); the layer is reported."""
    model = SmallCNN().eval()
    options = {} if upsampling is None else {"upsampling": upsampling}
    ours = heatlens.explain(model, CNN_X, "guided_gradcam", target=[1, 3], layer="conv2",
                            **options)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = GuidedGradCam(model, model.conv2).attribute(
            CNN_X, target=[1, 3], interpolate_mode=upsampling or "bilinear").detach()
    assert float(theirs.abs().max()) > 0
    np.testing.assert_allclose(ours.raw.numpy(), theirs.numpy(), rtol=1e-5,
                               atol=1e-6 * float(theirs.abs().max()))
    assert ours.details["layer"] == "conv2"


def test_guided_gradcam_made_directly_picks_its_layer_and_takes_the_options():
    """Without ``layer=`` the layer is ``"auto"`` (here ``relu2``, the last block whose output
    has a place); the options reach the attribution base (a budget of 0 bytes is refused)."""
    model = SmallCNN().eval()
    auto = GuidedGradCAM(model)(CNN_X, [1, 3])
    named = heatlens.explain(model, CNN_X, "guided_gradcam", target=[1, 3], layer="relu2")
    assert auto.details["layer"] == "relu2"
    assert torch.equal(auto.raw, named.raw)
    with pytest.raises(ValueError, match="memory_budget must be a positive number"):
        GuidedGradCAM(model, memory_budget=0)


def test_guided_gradcam_rejects_two_layers_and_unknown_upsampling():
    model = SmallCNN().eval()
    with pytest.raises(ValueError, match="Guided Grad-CAM takes one layer"):
        heatlens.explain(model, CNN_X, "guided_gradcam", target=[1, 3], layer=["conv1", "conv2"])
    with pytest.raises(ValueError, match="upsampling must be 'bilinear' or 'nearest', not 'cubic'"):
        heatlens.explain(model, CNN_X, "guided_gradcam", layer="conv2", upsampling="cubic")


# --- attribution.py: picture scaling --------------------------------------------------------------


@pytest.mark.parametrize("outlier", [0.0, 2.0, 10.0, 50.0])
def test_percentile_scale_matches_captum(outlier):
    """Each map divided by the value at which the sorted values' running total reaches
    ``100 - outlier`` % of the whole (Captum's ``_normalize_attr``), clipped to [0, 1]."""
    maps = torch.rand(3, 5, 6, generator=torch.Generator().manual_seed(1)) ** 3
    ours = percentile_scale(maps, outlier)
    expected = np.stack([_normalize_attr(m.double().numpy(), "absolute_value",
                                         outlier_perc=outlier) for m in maps])
    np.testing.assert_allclose(ours.numpy(), expected, rtol=1e-6, atol=1e-6)
    assert ours.shape == maps.shape


def test_percentile_scale_threshold_where_the_running_total_equals_the_reach():
    """Sorted ``1, 1, 2, 4``: running totals ``1, 2, 4, 8``; half the total (4) is reached at the
    value 2, which is the divisor (not the next one); 2 % by default: reached only at 4."""
    maps = torch.tensor([[[4.0, 1.0], [2.0, 1.0]]])
    np.testing.assert_array_equal(percentile_scale(maps, 50.0).numpy(),
                                  [[[1.0, 0.5], [1.0, 0.5]]])
    np.testing.assert_array_equal(percentile_scale(maps).numpy(), [[[1.0, 0.25], [0.5, 0.25]]])


@pytest.mark.parametrize("outlier", [-1.0, 100.0, 150.0])
def test_percentile_scale_takes_an_outlier_share_below_100(outlier):
    with pytest.raises(ValueError, match=rf"outlier_percent must be in \[0, 100\), not {outlier}"):
        percentile_scale(torch.ones(1, 2, 2), outlier)


def test_percentile_scale_clips_to_zero_and_one_whatever_the_map():
    """The docstring's promise holds for a signed map too: nothing below 0 or above 1."""
    maps = torch.tensor([[[-3.0, 1.0], [2.0, 4.0]]])
    out = percentile_scale(maps, 0.0)
    assert float(out.min()) == 0.0 and float(out.max()) == 1.0


def test_percentile_scale_of_small_and_zero_maps():
    """A map of tiny values scales like any other (values below 1 are not clipped to a floor);
    an all-zero map stays zero next to it."""
    maps = torch.stack([torch.full((2, 2), 0.0), torch.tensor([[1e-3, 2e-3], [3e-3, 4e-3]])])
    out = percentile_scale(maps, 0.0)
    np.testing.assert_allclose(out.numpy(), [[[0, 0], [0, 0]], [[0.25, 0.5], [0.75, 1.0]]],
                               rtol=1e-6)


def test_attribution_maps_are_the_scaled_absolute_channel_sum():
    raw = torch.randn(2, 3, 4, 5, generator=torch.Generator().manual_seed(2))
    expected = np.stack([_normalize_attr(r.sum(0).double().numpy(), "absolute_value")
                         for r in raw])
    np.testing.assert_allclose(attribution_maps(raw).numpy(), expected, rtol=1e-6, atol=1e-6)


# --- attribution.py: the explainer, chunks and gradients ------------------------------------------


def test_explanation_of_an_attribution_says_what_it_holds():
    """Scores, classes, raw attributions (the gradient), maps (their picture), the layer
    ``"input"`` and its reason."""
    model = quadratic()
    e = heatlens.explain(model, X, "saliency", target=TARGETS)
    assert e.layers == ("input",) and e.layer_reason == "attributions on the input"
    assert e.method == "saliency"
    assert e.targets.tolist() == TARGETS
    np.testing.assert_allclose(e.scores.numpy(), score(model, X, TARGETS).numpy(), rtol=1e-14)
    np.testing.assert_allclose(e.raw_by_layer["input"].numpy(),
                               exact_gradient(model, X, TARGETS).numpy(), rtol=1e-13, atol=1e-13)
    assert torch.equal(e.maps, attribution_maps(e.raw))
    with torch.no_grad():
        output = model(X)
    assert torch.equal(e.output, output)
    np.testing.assert_allclose(e.probabilities.numpy(),
                               output.softmax(1)[torch.arange(2), TARGETS].numpy(), rtol=1e-6)


def test_a_binary_target_reports_the_sigmoid_of_its_score():
    """The target reaches the explanation: for a single-logit model and ``BinaryOutput`` the
    probability is ``sigmoid(y)``, by both attribution bases."""
    model = Quadratic(math.prod(SHAPE[1:]), classes=1).eval()
    with torch.no_grad():
        expected = torch.sigmoid(model(X)[:, 0]).numpy()
    for explainer in (Saliency(model), OnePassGradient(model)):
        e = explainer(X, BinaryOutput())
        np.testing.assert_allclose(e.probabilities.numpy(), expected, rtol=1e-6)


def test_a_target_without_classes_has_one_entry_per_image():
    """A callable target: ``NO_CLASS`` (-1) for each of the B images (not for each channel)."""
    model = quadratic()
    e = heatlens.explain(model, X, "saliency", target=lambda out: out[:, 1])
    assert e.targets.tolist() == [-1, -1]
    np.testing.assert_allclose(e.raw.numpy(), exact_gradient(model, X, [1, 1]).numpy(),
                               rtol=1e-13, atol=1e-13)


class RecordingSaliency(Saliency):
    """Saliency whose picture step records the input it is given."""

    def postprocess(self, raw: dict[str, Tensor], x: Tensor) -> Tensor:
        self.given = x
        return super().postprocess(raw, x)


def test_the_picture_step_gets_the_input():
    model = quadratic()
    explainer = RecordingSaliency(model)
    explainer(X, TARGETS)
    assert torch.equal(explainer.given, X)


def test_attribution_methods_take_no_layer_and_a_valid_budget():
    """Made directly, without ``layer=``, they run (the default is ``"auto"``)."""
    model = quadratic()
    grad = exact_gradient(model, X, TARGETS)
    np.testing.assert_allclose(Saliency(model)(X, TARGETS).raw.numpy(), grad.numpy(), rtol=1e-13,
                               atol=1e-13)
    expected = exact_ig(model, X, torch.zeros_like(X), TARGETS, "gausslegendre", 2)
    np.testing.assert_allclose(IntegratedGradients(model, steps=2)(X, TARGETS).raw.numpy(),
                               expected.numpy(), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="saliency attributes to the input: layer= does not"):
        Saliency(model, layer="a")
    with pytest.raises(ValueError, match="memory_budget must be a positive number"):
        Saliency(model, memory_budget=0)


@pytest.mark.parametrize("items", [1, 2, 3])
def test_gradients_run_in_chunks_within_the_budget(items):
    """Five inputs with room for ``items`` per chunk: passes of at most ``items`` inputs, the
    gradient the same as written out, and the watcher hears each chunk's inputs."""
    model = quadratic()
    x = torch.randn(5, *SHAPE[1:], generator=torch.Generator().manual_seed(3),
                    dtype=torch.float64)
    targets = [0, 1, 2, 1, 0]
    seen, budget = Steps(), budget_for(model, x, items)
    if items > 1:  # the estimate without gradients (larger here) would give other chunks
        assert items_per_chunk(model, x, budget) != items
    model.batches.clear()
    with watched(seen):
        e = heatlens.explain(model, x, "saliency", target=targets, memory_budget=budget)
    sizes = [min(items, 5 - start) for start in range(0, 5, items)]
    assert model.batches[1:] == sizes  # after the pass that reads the classes
    assert seen.seen == [(sum(sizes[: i + 1]), 5, "saliency") for i in range(len(sizes))]
    np.testing.assert_allclose(e.raw.numpy(), exact_gradient(model, x, targets).numpy(),
                               rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("method", ["saliency", "integrated_gradients"])
def test_show_progress_draws_a_bar(method, capsys):
    model = quadratic()
    heatlens.explain(model, X, method, target=TARGETS, show_progress=True)
    assert method in capsys.readouterr().err
    heatlens.explain(model, X, method, target=TARGETS, show_progress=False)
    assert method not in capsys.readouterr().err


class Constant(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return torch.ones(x.shape[0], 3, dtype=x.dtype)


def test_input_gradients_with_and_without_a_rule():
    """``d y_c / d x`` and the scores; a rule is entered around the forward pass; a score that
    does not depend on the input is a ValueError."""
    model = quadratic()
    classes = torch.tensor(TARGETS)
    grad, scores = input_gradients(model, X, ClassLogit(), classes)
    np.testing.assert_allclose(grad.numpy(), exact_gradient(model, X, TARGETS).numpy(),
                               rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(scores.numpy(), score(model, X, TARGETS).numpy(), rtol=1e-14)
    assert not scores.requires_grad

    entered = []

    class Rule:
        def __enter__(self) -> None:
            entered.append(torch.is_grad_enabled())

        def __exit__(self, *exc: object) -> None:
            entered.append("exit")

    input_gradients(model, X, ClassLogit(), classes, Rule)
    assert entered == [True, "exit"]
    with pytest.raises(ValueError, match="does not depend on the input"):
        input_gradients(Constant(), X, ClassLogit(), classes)


# --- attribution.py: references, helpers, one-pass methods ----------------------------------------


def test_broadcast_reference_and_its_message():
    x = torch.zeros(2, 3, 4, 4, dtype=torch.float64)
    out = broadcast_reference(torch.tensor([1.0, 2.0, 3.0]).reshape(3, 1, 1), x)
    assert out.dtype == torch.float64 and out.shape == x.shape
    assert torch.equal(out[1, 2], torch.full((4, 4), 3.0, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"^baseline of shape \(5,\) does not broadcast to the "
                                         r"inputs' shape \(2, 3, 4, 4\)$"):
        broadcast_reference(torch.zeros(5), x)
    with pytest.raises(ValueError, match=r"^mask of shape \(5,\)"):
        broadcast_reference(torch.zeros(5), x, "mask")


def test_reference_distribution():
    """One reference ``(C, *S)`` is a distribution of one, ``(K, C, *S)`` is kept, in the
    inputs' dtype; anything else names the shape it needs and the shapes given."""
    x = torch.zeros(2, 3, 4, 4, dtype=torch.float64)
    one = reference_distribution(torch.ones(3, 4, 4), x)
    assert one.shape == (1, 3, 4, 4) and one.dtype == torch.float64
    many = torch.rand(5, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    assert torch.equal(reference_distribution(many, x), many.double())
    for bad in (torch.zeros(5, 3, 4, 5), torch.zeros(4, 4), torch.zeros(1, 5, 3, 4, 4)):
        with pytest.raises(ValueError, match=rf"^baselines must be \(K, 3, 4, 4\) to go with "
                                             rf"inputs of shape \(2, 3, 4, 4\), not "
                                             rf"{re.escape(str(tuple(bad.shape)))}$"):
            reference_distribution(bad, x)


def test_with_input_calls_again_with_the_other_arguments():
    x = torch.linspace(-2, 2, 9)
    again = with_input(torch.clamp, (-1.0,), {"max": 0.5})
    assert torch.equal(again(x), torch.clamp(x, -1.0, max=0.5))
    assert torch.equal(with_input(torch.neg)(x), -x)
    assert torch.equal(with_input(torch.add, (), {"alpha": 2})(x, x), 3 * x)


class OnePassGradient(OnePassAttribution):
    """Input x gradient in one pass: the classes come from the pass's own output when not
    given. Counts its passes."""

    name = "one_pass_gradient"

    def __init__(self, model: nn.Module, **options) -> None:
        super().__init__(model, **options)
        self.passes: list[tuple[int, bool]] = []

    def postprocess(self, raw: dict[str, Tensor], x: Tensor) -> Tensor:
        self.given = x
        return super().postprocess(raw, x)

    def attribute_pass(self, x: Tensor, target, classes: Tensor | None) -> PassResult:
        self.passes.append((x.shape[0], classes is None))
        leaf = x.detach().requires_grad_(True)
        with torch.enable_grad():
            output = self.model(leaf)
            classes, scores = classes_and_scores(output, target, classes, x.shape[0])
            (grad,) = torch.autograd.grad(scores.sum(), leaf)
        return PassResult(x * grad, output.detach(), classes, scores.detach(), {"pass": 1})


@pytest.mark.parametrize(("items", "one_pass"), [(1, False), (2, True), (3, True)])
def test_one_pass_attribution_reads_the_classes_from_its_own_pass(items, one_pass):
    """When the batch fits in a chunk (2 images, room for 2 or 3) the method runs once and
    reads the classes (arg-max by default) from its own output; otherwise the classes come from
    a pass first. Either way the same explanation."""
    model = quadratic()
    budget = budget_for(model, X, items)
    if items == 2:  # the estimate without gradients (larger here) would not fit the batch
        assert items_per_chunk(model, X, budget) < 2
    explainer = OnePassGradient(model, memory_budget=budget)
    e = explainer(X)
    expected_classes = score_argmax(model, X)
    assert explainer.passes == [(2, one_pass)]
    assert torch.equal(explainer.given, X)
    with torch.no_grad():
        output = model(X)
    assert torch.equal(e.output, output)
    np.testing.assert_allclose(e.probabilities.numpy(), output.softmax(1).amax(1).numpy(),
                               rtol=1e-6)
    assert e.targets.tolist() == expected_classes
    grad = exact_gradient(model, X, expected_classes)
    np.testing.assert_allclose(e.raw.numpy(), (X * grad).numpy(), rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(e.scores.numpy(), score(model, X, expected_classes).numpy(),
                               rtol=1e-14)
    assert e.layers == ("input",) and e.layer_reason == "attributions on the input"
    assert e.details == {"pass": 1} and e.method == "one_pass_gradient"
    assert torch.equal(e.maps, attribution_maps(e.raw))
    others = [(c + 1) % 3 for c in expected_classes]  # not the arg-max
    given = explainer(X, target=others)
    assert given.targets.tolist() == others
    np.testing.assert_allclose(given.raw.numpy(),
                               (X * exact_gradient(model, X, others)).numpy(), rtol=1e-13,
                               atol=1e-13)


def score_argmax(model: nn.Module, x: Tensor) -> list[int]:
    with torch.no_grad():
        return model(x).argmax(1).tolist()


def test_classes_and_scores_given_or_read():
    model = quadratic()
    output = model(X)
    classes, scores = classes_and_scores(output, ClassLogit(), None, 2)
    assert classes.tolist() == score_argmax(model, X)
    assert scores.requires_grad
    given, given_scores = classes_and_scores(output, ClassLogit(), torch.tensor(TARGETS), 2)
    assert given.tolist() == TARGETS
    np.testing.assert_allclose(given_scores.detach().numpy(), score(model, X, TARGETS).numpy())
    none, picked = classes_and_scores(output, CallableTarget(lambda out: out[:, 2]), None, 2)
    assert none.tolist() == [-1, -1]
    np.testing.assert_allclose(picked.detach().numpy(), score(model, X, [2, 2]).numpy())
