"""The Captum half of issue 15: DeepLIFT, DeepLIFT-SHAP, GradientSHAP, KernelSHAP, LIME and the
layer methods, each checked against Captum 0.9 and against its own defining property.

1. Agreement with Captum's attribution (``torch.testing.assert_close`` with ``rtol=1e-4`` and
   ``atol`` 1e-4 of the attribution's largest magnitude), with the same baselines and the same
   random draws (GradientSHAP: ``draws="captum"`` reproduces Captum after seeding; KernelSHAP and
   LIME: the same feature mask, the same perturbation draws and the same surrogate).
   Models: a small seeded CNN (batch norm, ReLU, max pooling, tanh, sigmoid: 16 px) in which no
   two nonlinear modules are adjacent, and torchvision ``resnet18`` with seeded random weights
   and batch-norm statistics at 64 px for the layer methods. DeepLIFT is compared on the small
   CNN only: where two nonlinear modules follow each other (ReLU then max pooling, as in VGG and
   ResNet), Captum's tensor hooks record the gradient *before* the next module's rule has
   replaced it, so Captum's attributions break the summation-to-delta property there; a test
   below shows this (heatlens keeps it).
2. Properties: DeepLIFT's summation-to-delta on resnet18 (residual additions, shared ReLU
   modules, batch norm, overlapping max pooling) and on a model with functional ReLUs; the
   expectation of GradientSHAP converging as samples grow; layer gradient x activation at
   ResNet's last stage summing to the score without its bias; layer integrated gradients'
   and conductance's completeness at a stage that cuts the network; KernelSHAP's efficiency.
"""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
from torch import Tensor, nn

import heatlens

captum_attr = pytest.importorskip("captum.attr")

TOL = 1e-4


def assert_agrees(ours: Tensor, theirs: Tensor) -> None:
    """Agreement at 1e-4: relative, and absolute in units of the attribution's largest value."""
    theirs = theirs.detach()
    scale = float(theirs.abs().max())
    assert scale > 0
    torch.testing.assert_close(ours.detach(), theirs, rtol=TOL, atol=TOL * scale)


def quiet(fn, *args, **kwargs):
    """Call Captum without its warnings (hooks, requires_grad on inputs)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def no_hooks_left(model: nn.Module) -> bool:
    return all(not (m._forward_hooks or m._forward_pre_hooks or m._backward_hooks)
               for m in model.modules())


# --- models ---------------------------------------------------------------------------------


def small_cnn() -> nn.Module:
    """A seeded CNN whose nonlinear modules are never adjacent (see the module docstring)."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=1), nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1), nn.Tanh(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
            nn.Linear(64, 10), nn.Sigmoid(), nn.Linear(10, 5),
        )
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 1.5)
    return model.eval()


class FunctionalCNN(nn.Module):
    """ReLUs and max pooling as functions in ``forward`` (and an in-place ReLU)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Linear(8 * 4 * 4, 5)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.nn.functional.max_pool2d(torch.relu(self.a(x)), 2)
        x = torch.nn.functional.relu(self.b(x), inplace=True)
        return self.head(torch.nn.functional.max_pool2d(x, 3, 2, 1).flatten(1))


@pytest.fixture(scope="module")
def small() -> tuple[nn.Module, Tensor, list[int]]:
    generator = torch.Generator().manual_seed(2)
    return small_cnn(), torch.randn(2, 3, 16, 16, generator=generator), [1, 3]


def shift_batch_norms(model: nn.Module, generator: torch.Generator, spread: float) -> nn.Module:
    """Seeded batch-norm statistics: variances in [0.5, 1.5], means ``N(0, spread^2)`` and
    shifts ``N(0, (spread / 2)^2)`` (``spread=0``: no shift, so the network has no biases)."""
    with torch.no_grad():
        for norm in (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):
            norm.running_var.uniform_(0.5, 1.5, generator=generator)
            norm.running_mean.normal_(generator=generator).mul_(spread)
            norm.bias.normal_(generator=generator).mul_(spread / 2)
    return model.eval()


@pytest.fixture(scope="module")
def resnet(resnet18_seeded) -> tuple[nn.Module, Tensor, list[int]]:
    """resnet18 with seeded random batch-norm statistics (not positively homogeneous), 64 px."""
    generator = torch.Generator().manual_seed(1)
    model = shift_batch_norms(copy.deepcopy(resnet18_seeded), generator, 0.2)
    return model, torch.randn(2, 3, 64, 64, generator=generator), [1, 500]


def scores(model: nn.Module, x: Tensor, targets: list[int]) -> Tensor:
    with torch.no_grad():
        return model(x)[torch.arange(x.shape[0]), targets]


# --- DeepLIFT and DeepLIFT-SHAP -------------------------------------------------------------


def test_deeplift_matches_captum(small):
    model, x, targets = small
    baseline = 0.3 * torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
    ours = heatlens.explain(model, x, "deeplift", target=targets, baseline=baseline)
    theirs = quiet(captum_attr.DeepLift(copy.deepcopy(model)).attribute, x,
                   baselines=baseline, target=targets)
    assert_agrees(ours.raw, theirs)
    zeros = heatlens.explain(model, x, "deep_lift", target=targets).raw  # Captum's default
    assert_agrees(zeros, quiet(captum_attr.DeepLift(copy.deepcopy(model)).attribute, x,
                               target=targets))
    assert no_hooks_left(model)


def test_deeplift_shap_matches_captum(small):
    model, x, targets = small
    references = 0.3 * torch.randn(4, *x.shape[1:], generator=torch.Generator().manual_seed(4))
    ours = heatlens.explain(model, x, "deeplift_shap", target=targets, baseline=references,
                            memory_budget=1 << 20)  # several chunks of pairs
    theirs = quiet(captum_attr.DeepLiftShap(copy.deepcopy(model)).attribute, x,
                   baselines=references, target=targets)
    assert_agrees(ours.raw, theirs)
    delta = ours.details["convergence_delta"]
    gains = scores(model, x, targets)[:, None] - scores(model, references, targets[:1] * 4)
    assert delta.shape == (2, 4)
    assert float(delta.abs().max()) <= 1e-5 * max(1.0, float(gains.abs().max()))


@pytest.mark.parametrize("which", ["resnet18", "functional"])
def test_deeplift_sums_to_the_score_change(resnet, which):
    """Summation-to-delta (Shrikumar et al., Eq. 1): sum A = y_c(x) - y_c(x'), through residual
    additions, a ReLU module used twice per block, batch norm, overlapping max pooling and
    functional (also in-place) ReLUs."""
    if which == "resnet18":
        model, x, targets = resnet
    else:
        with torch.random.fork_rng():
            torch.manual_seed(5)
            model = FunctionalCNN().eval()
        x, targets = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(6)), [0, 4]
    baseline = 0.5 * torch.randn(x.shape, generator=torch.Generator().manual_seed(7))
    result = heatlens.explain(model, x, "deeplift", target=targets, baseline=baseline)
    gain = scores(model, x, targets) - scores(model, baseline, targets)
    total = result.raw.flatten(1).sum(1)
    assert float(gain.abs().min()) > 1e-3
    torch.testing.assert_close(total, gain, rtol=1e-4, atol=1e-5 * float(gain.abs().max()))
    torch.testing.assert_close(result.details["convergence_delta"], total - gain)
    assert no_hooks_left(model)


def test_deeplift_where_captum_hooks_collide():
    """ReLU directly before max pooling: Captum's DeepLift loses summation-to-delta there (its
    hooks read the gradient before the next module's rule replaced it); heatlens keeps it."""
    with torch.random.fork_rng():
        torch.manual_seed(8)
        model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                              nn.Flatten(), nn.Linear(8 * 8 * 8, 5)).eval()
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(9))
    baseline = 0.3 * torch.randn(x.shape, generator=torch.Generator().manual_seed(10))
    gain = scores(model, x, [1, 3]) - scores(model, baseline, [1, 3])
    ours = heatlens.explain(model, x, "deeplift", target=[1, 3], baseline=baseline).raw
    theirs = quiet(captum_attr.DeepLift(copy.deepcopy(model)).attribute, x,
                   baselines=baseline, target=[1, 3])
    torch.testing.assert_close(ours.flatten(1).sum(1), gain, rtol=1e-4, atol=1e-6)
    assert float((theirs.detach().flatten(1).sum(1) - gain).abs().max()) > 1e-3


# --- GradientSHAP ---------------------------------------------------------------------------


@pytest.mark.parametrize("stdev", [0.0, 0.1])
def test_gradient_shap_matches_captum(small, stdev):
    model, x, targets = small
    references = 0.3 * torch.randn(4, *x.shape[1:], generator=torch.Generator().manual_seed(4))
    ours = heatlens.explain(model, x, "gradient_shap", target=targets, baseline=references,
                            samples=7, stdev=stdev, seed=3, draws="captum",
                            memory_budget=1 << 20)
    state = np.random.get_state()
    with torch.random.fork_rng():
        np.random.seed(3)
        torch.manual_seed(3)
        theirs = quiet(captum_attr.GradientShap(copy.deepcopy(model)).attribute, x,
                       baselines=references, target=targets, n_samples=7, stdevs=stdev)
    np.random.set_state(state)
    assert_agrees(ours.raw, theirs)


def test_gradient_shap_expectation_converges(small):
    """The estimate approaches its expectation: closer to a 1024-sample estimate with 128
    samples than with 8, and its completeness delta shrinks."""
    model, x, targets = small
    references = 0.3 * torch.randn(4, *x.shape[1:], generator=torch.Generator().manual_seed(4))

    def run(samples: int, seed: int = 0):
        return heatlens.explain(model, x, "gradient_shap", target=targets, baseline=references,
                                samples=samples, seed=seed)

    limit = run(1024, seed=99).raw
    errors = {n: float(np.mean([(run(n, seed).raw - limit).norm() for seed in range(3)]))
              for n in (8, 128)}
    assert errors[128] < 0.5 * errors[8]
    deltas = {n: float(run(n).details["convergence_delta"].abs().max()) for n in (8, 128)}
    assert deltas[128] < deltas[8]
    assert run(8).raw.equal(run(8).raw)  # seeded


def test_gradient_shap_batch_and_chunk_invariant(small):
    model, x, targets = small
    whole = heatlens.explain(model, x, "gradient_shap", target=targets, samples=6, stdev=0.1)
    first = heatlens.explain(model, x[:1], "gradient_shap", target=targets[:1], samples=6,
                             stdev=0.1, memory_budget=1 << 16)
    torch.testing.assert_close(whole.raw[:1], first.raw)


def test_recorded_bytes_counts_what_autograd_keeps():
    """Linear(8, 16), Tanh, Linear(16, 4) on one input of 8 floats: from the input, autograd
    keeps the first linear's input (8 floats) and the tanh's output (16 floats, which the second
    linear keeps too: one storage), not the weights; from the tanh on, only the copy of the
    tanh's output handed to the second linear (16 floats). Each adds five times the largest
    output (16 floats) and the input (8 floats)."""
    from heatlens.engine.budget import recorded_bytes

    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4)).eval()
    x = torch.randn(3, 8)
    floats = 4
    assert recorded_bytes(model, x) == (8 + 16 + 5 * 16 + 8) * floats
    assert recorded_bytes(model, x, model[1]) == (16 + 5 * 16 + 8) * floats


def batch_sizes(model: nn.Module, run) -> list[int]:
    """The batch size of every pass of ``model`` during ``run()``."""
    sizes: list[int] = []
    hook = model.register_forward_pre_hook(lambda module, args: sizes.append(len(args[0])))
    try:
        run()
    finally:
        hook.remove()
    return sizes


def test_gradient_shap_passes_are_equal_and_within_the_budget(small):
    """12 drawn inputs (2 images x 6 samples) with room for 5 in a pass (what the graph keeps
    and 4 inputs' worth each): one pass over the images and the reference, then 3 passes of 4
    (not 5, 5, 2); the attributions as with room for all."""
    from heatlens.engine.budget import recorded_bytes

    model, x, targets = small
    per_row = recorded_bytes(model, x[:1]) + 4 * x[0].numel() * x.element_size()
    options = {"target": targets, "samples": 6, "stdev": 0.1, "seed": 3}
    whole = heatlens.explain(model, x, "gradient_shap", **options)
    chunked = []
    sizes = batch_sizes(model, lambda: chunked.append(heatlens.explain(
        model, x, "gradient_shap", memory_budget=5 * per_row, **options)))
    assert sizes == [3, 4, 4, 4]
    torch.testing.assert_close(chunked[0].raw, whole.raw)


def test_gradient_shap_without_the_delta_skips_the_references(small):
    """``delta=False``: the first pass runs over the images alone (not the images and the
    references), the attributions are the same, and no delta is reported."""
    model, x, targets = small
    references = 0.3 * torch.randn(5, *x.shape[1:], generator=torch.Generator().manual_seed(4))
    options = {"target": targets, "baseline": references, "samples": 3, "seed": 2}
    heatlens.explain(model, x, "gradient_shap", **options)  # measures a pass's memory, once
    runs = {}
    sizes = {delta: batch_sizes(model, lambda d=delta: runs.__setitem__(d, heatlens.explain(
        model, x, "gradient_shap", delta=d, **options))) for delta in (True, False)}
    assert sizes == {True: [len(x) + 5, 3 * len(x)], False: [len(x), 3 * len(x)]}
    assert runs[False].raw.equal(runs[True].raw)
    assert runs[False].scores.equal(runs[True].scores)
    assert "convergence_delta" not in runs[False].details
    assert runs[True].details["convergence_delta"].shape == (len(x),)
    with pytest.raises(TypeError, match=r"^delta must be True or False, not 'no'$"):
        heatlens.explain(model, x, "gradient_shap", delta="no", **options)


@pytest.mark.parametrize(("method", "passes"), [("layer_integrated_gradients", [4, 6, 6]),
                                                 ("layer_conductance", [6, 6, 6])])
def test_layer_path_chunks_are_equal_and_within_the_budget(small, method, passes):
    """Room for 3 points of the path for 2 images: 8 points (integrated gradients) run as 2, 3
    and 3 points, 9 (conductance's steps + 1) as 3 passes of 3, after one pass over the images
    and the baseline; the attributions as with room for all."""
    from heatlens.engine.budget import recorded_bytes

    model, x, targets = small
    layer = model[5]
    per_point = recorded_bytes(model, x[:1], layer) + x[0].numel() * x.element_size()
    whole = heatlens.explain(model, x, method, target=targets, layer="5", steps=8)
    chunked = []
    sizes = batch_sizes(model, lambda: chunked.append(heatlens.explain(
        model, x, method, target=targets, layer="5", steps=8,
        memory_budget=3 * 2 * per_point)))
    assert sizes == [4, *passes]
    torch.testing.assert_close(chunked[0].raw_by_layer["5"], whole.raw_by_layer["5"])


# --- layer methods --------------------------------------------------------------------------

LAYER_METHODS = {
    "layer_gradient_x_activation": ("LayerGradientXActivation", {}, {}),
    "layer_integrated_gradients": ("LayerIntegratedGradients", {"steps": 8}, {"n_steps": 8}),
    "layer_conductance": ("LayerConductance", {"steps": 8}, {"n_steps": 8}),
}


@pytest.mark.parametrize("layer", ["layer3", "layer4.0.conv2"])
@pytest.mark.parametrize("method", list(LAYER_METHODS))
def test_layer_methods_match_captum(resnet, method, layer):
    model, x, targets = resnet
    captum_name, options, captum_options = LAYER_METHODS[method]
    theirs_model = copy.deepcopy(model)
    result = heatlens.explain(model, x, method, target=targets, layer=layer, **options)
    theirs = quiet(getattr(captum_attr, captum_name)(
        theirs_model, theirs_model.get_submodule(layer)).attribute, x, target=targets,
        **captum_options)
    assert result.layers == (layer,)
    ours = result.raw_by_layer[layer]
    assert ours.shape == theirs.shape and ours.ndim == 4
    assert_agrees(ours, theirs)
    assert result.maps.shape == (2, 64, 64)
    assert float(result.maps.min()) >= 0 and float(result.maps.max()) <= 1
    assert no_hooks_left(model)


def test_layer_gradient_x_activation_sums_to_the_score(resnet):
    """At ResNet's last stage the head is average pooling and a linear layer, so
    ``sum_k a_k dy/da_k = y_c - b_c`` (the score is linear in the stage's output)."""
    model, x, targets = resnet
    result = heatlens.explain(model, x, "layer_gradient_x_activation", target=targets,
                              layer="layer4")
    expected = scores(model, x, targets) - model.fc.bias[targets].detach()
    torch.testing.assert_close(result.raw_by_layer["layer4"].flatten(1).sum(1), expected,
                               rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method", ["layer_integrated_gradients", "layer_conductance"])
def test_layer_path_methods_complete(resnet, method):
    """At a stage every path goes through, ``sum A -> y_c(x) - y_c(x')`` as steps grow."""
    model, x, targets = resnet
    gain = scores(model, x, targets) - scores(model, torch.zeros_like(x), targets)

    def delta(steps: int) -> float:
        result = heatlens.explain(model, x, method, target=targets, layer="layer3", steps=steps)
        return float(result.details["convergence_delta"].abs().max())

    coarse, fine = delta(2), delta(16)
    assert fine < coarse
    assert fine < 0.05 * float(gain.abs().max())


# --- KernelSHAP and LIME --------------------------------------------------------------------


class Scaled(nn.Module):
    """The small CNN's scores times 100, so that the lasso's penalty leaves coefficients."""

    def __init__(self) -> None:
        super().__init__()
        self.net = small_cnn()

    def forward(self, x: Tensor) -> Tensor:
        return 100 * self.net(x)


def captum_surrogate(name: str, model: nn.Module, x: Tensor, targets: list[int], mask: Tensor,
                     samples: int, seed: int, **kwargs) -> Tensor:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        method = getattr(captum_attr, name)(copy.deepcopy(model), **kwargs)
        return quiet(method.attribute, x, target=targets, feature_mask=mask, n_samples=samples,
                     perturbations_per_eval=samples)  # the same draws, fewer passes


def test_kernel_shap_matches_captum(small):
    from heatlens.methods.features import grid_features

    model, x, targets = small
    mask = grid_features(x[:1], 4)  # 16 patches of 4 x 4 pixels, Captum's feature_mask
    ours = heatlens.explain(model, x, "kernel_shap", target=targets, features=mask, samples=40,
                            seed=5, draws="captum", memory_budget=1 << 20)
    theirs = captum_surrogate("KernelShap", model, x, targets, mask, 40, 5)
    assert_agrees(ours.raw, theirs)


@pytest.mark.parametrize("surrogate", ["lasso", "linear"])
def test_lime_matches_captum(surrogate):
    from captum._utils.models.linear_model import SkLearnLasso, SkLearnLinearRegression

    model = Scaled().eval()
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    mask = torch.arange(16).reshape(4, 4).repeat_interleave(4, 0).repeat_interleave(4, 1)
    ours = heatlens.explain(model, x, "lime", target=[1, 3], features=mask, samples=40, seed=6,
                            draws="captum", surrogate=surrogate, alpha=0.01)
    # the same objective; scikit-learn's lasso run to convergence (heatlens solves it exactly)
    fit = (SkLearnLasso(alpha=0.01, tol=1e-12, max_iter=200_000) if surrogate == "lasso"
           else SkLearnLinearRegression())
    theirs = captum_surrogate("Lime", model, x, [1, 3], mask, 40, 6, interpretable_model=fit)
    assert_agrees(ours.raw, theirs)
    if surrogate == "lasso":
        coefficients = torch.stack(ours.details["coefficients"])
        assert 0 < int((coefficients == 0).sum()) < coefficients.numel()  # sparse, not empty


def test_kernel_shap_efficiency_and_seeding(small):
    """Efficiency (Lundberg & Lee, Property 1): sum phi = y(x) - y(baseline), enforced by the
    all-kept and all-removed samples; seeded draws are reproducible and batch invariant."""
    model, x, targets = small
    result = heatlens.explain(model, x, "kernel_shap", target=targets, patch=4, samples=80)
    coefficients = torch.stack(result.details["coefficients"])
    gain = scores(model, x, targets) - scores(model, torch.zeros_like(x), targets)
    assert coefficients.shape == (2, 16)
    torch.testing.assert_close(coefficients.sum(1), gain, rtol=1e-3,
                               atol=1e-3 * float(gain.abs().max()))
    alone = heatlens.explain(model, x[1:], "kernel_shap", target=targets[1:], patch=4,
                             samples=80, memory_budget=1 << 20)
    torch.testing.assert_close(alone.raw, result.raw[1:])


@pytest.mark.parametrize("features", ["slic", "felzenszwalb"])
def test_superpixel_features(small, features):
    pytest.importorskip("skimage")
    model, _, targets = small
    blocks = torch.rand(2, 3, 4, 4, generator=torch.Generator().manual_seed(11))
    x = blocks.repeat_interleave(4, 2).repeat_interleave(4, 3)  # 16 flat 4 x 4 blocks each
    result = heatlens.explain(model, x, "lime", target=targets, features=features, segments=8,
                              samples=30, surrogate="linear")
    mask = result.details["feature_mask"]
    assert mask.shape == x.shape and int(mask.min()) == 0
    for image, coefficients in zip(mask, result.details["coefficients"], strict=True):
        assert int(image.max()) + 1 == coefficients.numel() > 1
        assert bool((image == image[:1]).all())  # one superpixel for all channels of a pixel


def test_superpixels_without_scikit_image(small, monkeypatch):
    import importlib

    real = importlib.import_module

    def no_skimage(name, *args):
        if name.startswith("skimage"):
            raise ImportError(name)
        return real(name, *args)

    monkeypatch.setattr(importlib, "import_module", no_skimage)
    model, x, targets = small
    with pytest.raises(ImportError, match=r"pip install .heatlens\[superpixels\]."):
        heatlens.explain(model, x, "kernel_shap", target=targets, features="slic")


# --- LRP ------------------------------------------------------------------------------------


class LRPNet(nn.Module):
    """Only layer types Captum's LRP has rules for (its ``nn.Flatten`` has none)."""

    def __init__(self) -> None:
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(12)
            self.features = nn.Sequential(
                nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
                nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(inplace=True), nn.AvgPool2d(2),
                nn.AdaptiveAvgPool2d(2))
            self.head = nn.Sequential(nn.Linear(64, 10), nn.Tanh(), nn.Dropout(),
                                      nn.Linear(10, 5))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.flatten(self.features(x), 1))


def captum_rules(model: nn.Module, rules: dict[type, object]) -> nn.Module:
    """A copy of ``model`` with Captum's rule objects set on the modules of each type."""
    copied = copy.deepcopy(model)
    for module in copied.modules():
        if type(module) in rules:
            module.rule = rules[type(module)]()
    return copied


@pytest.mark.parametrize("rules", ["epsilon", "gamma", "zplus"])
def test_lrp_matches_captum(rules):
    from captum.attr._utils.lrp_rules import Alpha1_Beta0_Rule, GammaRule

    ours_rules, theirs_rules = {
        "epsilon": ({}, {}),
        "gamma": ({"conv": "gamma"}, {nn.Conv2d: GammaRule}),
        "zplus": ({"conv": "zplus", "linear": "gamma"},
                  {nn.Conv2d: lambda: Alpha1_Beta0_Rule(set_bias_to_zero=True),
                   nn.Linear: GammaRule}),
    }[rules]
    model = LRPNet().eval()
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(13))
    ours = heatlens.explain(model, x, "lrp", target=[1, 3], rules=ours_rules)
    theirs = quiet(captum_attr.LRP(captum_rules(model, theirs_rules)).attribute, x,
                   target=[1, 3])
    assert_agrees(ours.raw, theirs)
    assert no_hooks_left(model) and not any(hasattr(m, "rule") for m in model.modules())


def test_lrp_matches_captum_on_vgg11():
    """torchvision's VGG-11 (its class and feature trunk) with a small head, to stay fast."""
    from torchvision.models.vgg import VGG, cfgs, make_layers

    with torch.random.fork_rng():
        torch.manual_seed(14)
        with torch.device("meta"):
            model = VGG(make_layers(cfgs["A"]), init_weights=False)
        model.features = make_layers(cfgs["A"])
        model.avgpool = nn.AdaptiveAvgPool2d(1)
        model.classifier = nn.Sequential(nn.Linear(512, 64), nn.ReLU(True), nn.Dropout(),
                                         nn.Linear(64, 10))
        model.eval()
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(15))
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    ours = heatlens.explain(model, x, "lrp", target=7)
    theirs = quiet(captum_attr.LRP(copy.deepcopy(model)).attribute, x, target=7)
    assert_agrees(ours.raw, theirs)
    assert all(v.equal(model.state_dict()[k]) for k, v in weights.items())


def test_lrp_epsilon_conserves_relevance_on_resnet(resnet18_seeded):
    """With zero biases and batch norms without shift (mean 0, beta 0), LRP-epsilon conserves
    the score through ResNet's residual additions and shared ReLUs: sum R = y_c."""
    generator = torch.Generator().manual_seed(16)
    model = shift_batch_norms(copy.deepcopy(resnet18_seeded), generator, 0.0)
    with torch.no_grad():
        model.fc.bias.zero_()
    x = torch.randn(2, 3, 64, 64, generator=generator)
    result = heatlens.explain(model, x, "lrp", target=[1, 500])
    torch.testing.assert_close(result.raw.flatten(1).sum(1), result.scores, rtol=1e-4,
                               atol=1e-6)
    assert no_hooks_left(model)


def test_lrp_names_the_layers_without_a_rule(small):
    _, x, _ = small
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.GELU(), nn.Flatten(), nn.Linear(4 * 14 * 14, 3),
                          nn.Softmax(dim=1))
    with pytest.raises(TypeError, match="no rule for layer type.*GELU, Softmax"):
        heatlens.explain(model, x, "lrp")

    class Functional(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, x: Tensor) -> Tensor:
            return torch.nn.functional.silu(self.conv(x)).mean((2, 3))

    with pytest.raises(TypeError, match="no rule for SiLU"):
        heatlens.explain(Functional().eval(), x, "lrp", target=0)
    with pytest.raises(ValueError, match="only the epsilon rule"):
        heatlens.explain(LRPNet().eval(), x, "lrp", rules={"pool": "gamma"})


@pytest.mark.parametrize("activation", [nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.ELU])
def test_deeplift_rescales_other_activations(activation):
    """Summation-to-delta holds for the activations Captum passes the gradient of."""
    with torch.random.fork_rng():
        torch.manual_seed(17)
        model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), activation(),
                              nn.Conv2d(8, 8, 3, padding=1), activation(), nn.Flatten(),
                              nn.Linear(8 * 8 * 8, 4)).eval()
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(18))
    result = heatlens.explain(model, x, "deeplift", target=[0, 2], baseline="blur")
    gain = scores(model, x, [0, 2]) - scores(model, result.details["baseline"], [0, 2])
    torch.testing.assert_close(result.raw.flatten(1).sum(1), gain, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("method", ["deeplift", "lrp", "gradient_shap"])
def test_chunked_runs_match_one_pass(method):
    """With a budget too small for one pass the classes come first and the work is chunked;
    the attributions are the same."""
    model = LRPNet().eval()
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(19))
    whole = heatlens.explain(model, x, method, target=[0, 1, 2])
    parts = heatlens.explain(model, x, method, target=[0, 1, 2], memory_budget=1 << 12)
    torch.testing.assert_close(parts.raw, whole.raw)
    torch.testing.assert_close(parts.scores, whole.scores)
