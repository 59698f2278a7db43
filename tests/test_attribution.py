"""Pixel attributions: saliency, input x gradient, guided backpropagation, deconvnet, Guided
Grad-CAM, integrated gradients, occlusion, RISE and the noise tunnel.

1. Agreement with Captum (``.raw`` vs Captum's attribution, max abs difference <= RTOL times
   the largest magnitude of Captum's attribution: saliency peaks near 1e-2, so an absolute
   tolerance would let a 1 % error pass) on
   ``resnet18`` (seeded random init, photos at 64 px) and ``mobilenet_v2`` (ImageNet weights,
   photos at 224 px), batch 2, explicit targets. Captum gets its own ``copy.deepcopy``.
   Integrated gradients on a random-init resnet18 with default batch norm is pointless: that
   network is positively homogeneous up to the final bias, so with a zero baseline IG equals
   input x gradient. It runs on mobilenet_v2 and on a resnet18 copy with seeded random batch-norm
   statistics and affine parameters (checked to differ from input x gradient).
2. IG completeness: ``sum A = f(x) - f(x') + delta``; the delta shrinks with more steps at each
   rule's order on a smooth network (on mobilenet_v2's ReLU6 it is erratic, see the test); the
   trapezoid rule's weights sum to 1 (Captum's ``1 / n`` weights sum to ``(n - 1) / n``).
3. Guided backpropagation and deconvnet against a backward pass written by hand, on a model with
   functional ReLUs and one with ``nn.ReLU(inplace=True)``; the model is left as it was; works
   under ``no_grad`` and ``inference_mode``.
4. The noise tunnel against the same noisy inputs built and differentiated by hand.
5. Occlusion and RISE: batch invariance, chunking invariance, seeding, and a small CNN trained
   here whose evidence (a striped patch) is at a known place.
6. Bad input gives a ValueError that says what is wrong.
"""

from __future__ import annotations

import copy
import warnings

import captum.attr as captum_attr
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import heatlens
from heatlens.methods.gradients import integration_rule

# relative to the largest magnitude of Captum's attribution; measured: at most 7.2e-6 (occlusion
# on resnet18, whose attributions are differences of two scores), 1e-6 or less elsewhere
RTOL = 1e-4
"""The issue's agreement bound. Measured differences are below 1e-5 of the scale on an idle
machine; 6.6e-5 was seen once for the trapezoid rule under mutmut (summation order differs
with the thread count)."""

# model name -> (fixture, input size, Guided Grad-CAM layer, explicit targets for photos 0 and 1)
MODELS = {
    "resnet18": ("resnet18_seeded", 64, "layer4", [1, 500]),
    "mobilenet_v2": ("mobilenet_v2_imagenet", 224, "features.18", [281, 967]),  # cat, espresso
}
# IG runs on models that are not positively homogeneous (see the module docstring)
# -> steps; few on mobilenet_v2 at 224 px to keep the test fast (agreement does not need many)
IG_MODELS = {"resnet18_bn": 8, "mobilenet_v2": 4}


def max_diff(a: Tensor, b: Tensor) -> float:
    return float((a.detach().double() - b.detach().double()).abs().max())


def assert_matches(ours: Tensor, expected: Tensor, what: str = "") -> None:
    """``ours`` equals Captum's ``expected`` up to ``RTOL`` of ``expected``'s largest magnitude;
    an all-zero ``expected`` would make any comparison pass, so it fails."""
    scale = float(expected.detach().abs().max())
    assert scale > 0, f"{what}: Captum's attribution is zero everywhere"
    diff = max_diff(ours, expected)
    assert diff <= RTOL * scale, f"{what}: max |difference| {diff:.3g} > {RTOL} x {scale:.3g}"


def quiet(fn, *args, **kwargs):
    """Call Captum without its warnings (backward hooks on ReLU, requires_grad on inputs)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


# --- fixtures --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def resnet18_bn(resnet18_seeded) -> nn.Module:
    """A copy of the seeded resnet18 whose batch norms have seeded random running statistics,
    scales and shifts: no longer positively homogeneous, so IG differs from input x gradient."""
    model = copy.deepcopy(resnet18_seeded)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                n = module.num_features
                module.running_mean.copy_(0.2 * torch.randn(n, generator=generator))
                module.running_var.copy_(0.5 + torch.rand(n, generator=generator))
                module.weight.copy_(0.5 + torch.rand(n, generator=generator))
                module.bias.copy_(0.2 * torch.randn(n, generator=generator))
    return model.eval()


@pytest.fixture(scope="module")
def setups(request, imagenet_photos, resnet18_bn) -> dict:
    """name -> (model, Captum's deep copy, inputs (2, 3, S, S), targets, layer)."""
    out = {}
    for name, (fixture, size, layer, targets) in MODELS.items():
        model = request.getfixturevalue(fixture)
        x = imagenet_photos[:2]
        if size != x.shape[-1]:
            x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True)
        out[name] = (model, copy.deepcopy(model), x.contiguous(), targets, layer)
    model, _, x, targets, layer = out["resnet18"]
    out["resnet18_bn"] = (resnet18_bn, copy.deepcopy(resnet18_bn), x, targets, layer)
    return out


# --- 1. agreement with Captum ----------------------------------------------------------------


CAPTUM_SIMPLE = {
    # heatlens method and options -> Captum class and attribute() options
    "saliency": ({}, "Saliency", {"abs": False}),
    "saliency_abs": ({"absolute": True}, "Saliency", {"abs": True}),
    "input_x_gradient": ({}, "InputXGradient", {}),
    "guided_backprop": ({}, "GuidedBackprop", {}),
    "deconvnet": ({}, "Deconvolution", {}),
}


@pytest.mark.parametrize("model_name", list(MODELS))
@pytest.mark.parametrize("case", list(CAPTUM_SIMPLE))
def test_gradient_methods_match_captum(setups, model_name, case):
    model, theirs, x, targets, _ = setups[model_name]
    options, captum_name, captum_options = CAPTUM_SIMPLE[case]
    method = case.removesuffix("_abs")
    ours = heatlens.explain(model, x, method, target=targets, **options).raw
    expected = quiet(getattr(captum_attr, captum_name)(theirs).attribute, x, target=targets,
                     **captum_options)
    assert ours.shape == x.shape
    assert_matches(ours, expected, f"{case} on {model_name}")
    if method in ("guided_backprop", "deconvnet"):
        plain = heatlens.explain(model, x, "saliency", target=targets).raw
        if model_name == "resnet18":  # the rule is at work on resnet18's nn.ReLU(inplace=True)
            assert max_diff(ours, plain) > 0.5 * float(plain.abs().max())
        else:  # mobilenet_v2 has only ReLU6, whose gradient both libraries leave as it is
            assert torch.equal(ours, plain)


@pytest.mark.parametrize("model_name", list(MODELS))
def test_guided_gradcam_matches_captum(setups, model_name):
    model, theirs, x, targets, layer = setups[model_name]
    ours = heatlens.explain(model, x, "guided_gradcam", target=targets, layer=layer,
                            upsampling="nearest")
    expected = quiet(captum_attr.GuidedGradCam(theirs, theirs.get_submodule(layer)).attribute,
                     x, target=targets)
    assert ours.details["layer"] == layer
    assert_matches(ours.raw, expected, f"guided_gradcam on {model_name}")


@pytest.mark.parametrize("model_name", list(IG_MODELS))
@pytest.mark.parametrize("rule", ["riemann_left", "riemann_right", "riemann_middle",
                                  "gausslegendre"])
def test_integrated_gradients_match_captum(setups, model_name, rule):
    model, theirs, x, targets, _ = setups[model_name]
    steps = IG_MODELS[model_name]
    ours = heatlens.explain(model, x, "integrated_gradients", target=targets, steps=steps,
                            rule=rule, baseline="zeros")
    expected, delta = quiet(captum_attr.IntegratedGradients(theirs).attribute, x,
                            baselines=torch.zeros_like(x), target=targets, n_steps=steps,
                            method=rule, return_convergence_delta=True)
    assert_matches(ours.raw, expected, f"{rule} on {model_name}")
    # deltas are sums over 3 x S x S elements: compare them relative to the score gain
    gain = ours.raw.flatten(1).sum(1) - ours.details["convergence_delta"]
    assert max_diff(ours.details["convergence_delta"], delta) <= 1e-5 * float(gain.abs().max())
    if rule == "gausslegendre":
        # the test means something: this model is not positively homogeneous (measured max
    # |IG - input x gradient|: 0.032 on resnet18_bn, 0.55 on mobilenet_v2)
        ixg = heatlens.explain(model, x, "input_x_gradient", target=targets).raw
        assert max_diff(ours.raw, ixg) > 0.1 * float(ixg.abs().max())


@pytest.mark.parametrize("model_name", list(MODELS))
def test_occlusion_matches_captum(setups, model_name):
    model, theirs, x, targets, _ = setups[model_name]
    size = x.shape[-1]
    # 5 x 5 (224 px) or 7 x 7 (64 px) overlapping windows; the last ones are cut at the border
    window, stride = (64, 48) if size == 224 else (16, 8)
    ours = heatlens.explain(model, x, "occlusion", target=targets, window=(window, window),
                            stride=(stride, stride), baseline=0.0).raw
    expected = quiet(captum_attr.Occlusion(theirs).attribute, x, target=targets,
                     sliding_window_shapes=(3, window, window), strides=(3, stride, stride),
                     baselines=0.0, perturbations_per_eval=25)
    assert_matches(ours, expected, f"occlusion on {model_name}")


# --- 2. IG completeness ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def photos_112(imagenet_photos) -> Tensor:
    """Photos 0 and 1 at 112 px, to keep integrated gradients with many steps fast.

    Also for the trapezoid comparison: Captum's points ``torch.linspace(0, 1, 8)`` (float32) are
    one ulp off ``i / 7`` at some points; at 224 px that switched a ReLU6 somewhere on the path
    and moved one element by 7e-4, at 112 px the two agree to 1.2e-7."""
    return F.interpolate(imagenet_photos[:2], size=(112, 112), mode="bilinear", antialias=True)


def test_ig_completeness_on_mobilenet(mobilenet_v2_imagenet, photos_112):
    model, x, targets = mobilenet_v2_imagenet, photos_112, [285, 967]  # Egyptian cat, espresso
    with torch.no_grad():
        gain = (model(x) - model(torch.zeros_like(x)))[[0, 1], targets].double()
    deltas = {}
    for steps in (8, 64):
        e = heatlens.explain(model, x, "integrated_gradients", target=targets, steps=steps,
                             rule="gausslegendre")
        total = e.raw.flatten(1).sum(1, dtype=torch.float64)
        delta = e.details["convergence_delta"].double()
        # sum A = f(x) - f(x') + delta, with f(x) - f(x') evaluated here independently
        assert max_diff(total - gain, delta) <= 1e-4 * float(gain.abs().max()), steps
        deltas[steps] = delta.abs()
    # The integrand (the gradient along the path) of a ReLU6 network jumps wherever a unit
    # switches, so no rule converges smoothly: measured |delta| for the cat at 8, 16, 32, 64,
    # 128 steps: 4.5, 1.3, 1.7, 0.42, 0.12 (gain 23.9); for the espresso 0.46, 3.1, 0.99, 1.8,
    # 0.87 (gain 21.9), larger at 64 steps than at 8. The cat shows the trend (10x smaller).
    assert float(deltas[64][0]) < 0.25 * float(deltas[8][0]), deltas
    assert bool((deltas[64] < 0.15 * gain.abs()).all()), (deltas, gain)


class SmoothNet(nn.Module):
    """conv -> softplus -> conv -> tanh -> mean -> linear: a smooth path integrand."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(torch.tanh(self.conv2(F.softplus(self.conv1(x)))).mean(dim=(2, 3)))


def test_ig_delta_shrinks_at_each_rules_order_on_a_smooth_network():
    with torch.random.fork_rng():
        torch.manual_seed(3)
        model = SmoothNet().eval()
    x = 2 * torch.randn(4, 3, 12, 12, generator=torch.Generator().manual_seed(2))
    targets = [0, 3, 1, 4]

    def delta(rule: str, steps: int) -> Tensor:
        e = heatlens.explain(model, x, "integrated_gradients", target=targets, steps=steps,
                             rule=rule)
        return e.details["convergence_delta"].abs()

    # halving the step: error / 2 for a one-sided Riemann sum, / 4 for midpoint and trapezoid
    # (measured 0.49 to 0.50, 0.25, 0.22 to 0.24)
    for rule, low, high in [("riemann_left", 0.4, 0.6), ("riemann_right", 0.4, 0.6),
                            ("riemann_middle", 0.2, 0.3), ("riemann_trapezoid", 0.15, 0.3)]:
        ratio = delta(rule, 16) / delta(rule, 8)
        assert bool(((ratio > low) & (ratio < high)).all()), (rule, ratio)
    # Gauss-Legendre: at float32 round-off (~3e-8) from 4 steps on, with 2 steps ~1e-4
    gauss = delta("gausslegendre", 4)
    assert bool((gauss < 0.01 * delta("gausslegendre", 2)).all()), gauss
    assert bool((gauss < 1e-6).all()), gauss


@pytest.mark.parametrize("steps", [2, 3, 8, 50])
def test_trapezoid_rule_weights(steps):
    alphas, weights = integration_rule("riemann_trapezoid", steps)
    h = 1 / (steps - 1)
    expected = [h / 2] + [h] * (steps - 2) + [h / 2]
    assert torch.allclose(alphas, torch.tensor([i * h for i in range(steps)],
                                               dtype=torch.float64))
    assert torch.allclose(weights, torch.tensor(expected, dtype=torch.float64))
    assert abs(float(weights.sum()) - 1) < 1e-12
    # integrates polynomials of degree <= 1 exactly
    assert abs(float((weights * (3 * alphas + 2)).sum()) - 3.5) < 1e-12
    # the other rules' weights also sum to 1
    for rule in ("riemann_left", "riemann_right", "riemann_middle", "gausslegendre"):
        assert abs(float(integration_rule(rule, steps)[1].sum()) - 1) < 1e-12


def test_trapezoid_delta_beats_captum(mobilenet_v2_imagenet, photos_112):
    """Captum's trapezoid uses weights ``1/n`` halved at both ends, which sum to ``(n-1)/n``:
    its attributions are ours times ``(n-1)/n`` and its delta is off by about ``-gain / n``."""
    model, x, targets, steps = mobilenet_v2_imagenet, photos_112, [285, 967], 8
    ours = heatlens.explain(model, x, "integrated_gradients", target=targets, steps=steps,
                            rule="riemann_trapezoid")
    expected, delta = quiet(captum_attr.IntegratedGradients(copy.deepcopy(model)).attribute, x,
                            target=targets, n_steps=steps, method="riemann_trapezoid",
                            return_convergence_delta=True)
    assert_matches(ours.raw * (steps - 1) / steps, expected, "trapezoid")
    ours_delta = ours.details["convergence_delta"].abs()
    assert bool((ours_delta < 0.7 * delta.abs()).all()), (ours_delta, delta)


# --- 3. guided backpropagation and deconvnet by hand -----------------------------------------


class TwoConv(nn.Module):
    """conv -> ReLU -> conv -> ReLU -> global mean -> linear; ``style`` picks how ReLU is
    called: ``"functional"`` (``F.relu``, then ``torch.relu``, no ReLU modules) or
    ``"inplace"`` (``nn.ReLU(inplace=True)`` modules)."""

    def __init__(self, style: str) -> None:
        super().__init__()
        self.style = style
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.conv2 = nn.Conv2d(6, 8, 3, padding=1)
        self.fc = nn.Linear(8, 5)
        if style == "inplace":
            self.relu1, self.relu2 = nn.ReLU(inplace=True), nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        if self.style == "functional":
            h = torch.relu(self.conv2(F.relu(self.conv1(x))))
        else:
            h = self.relu2(self.conv2(self.relu1(self.conv1(x))))
        return self.fc(h.mean(dim=(2, 3)))


class DiscardedInPlace(TwoConv):
    """The same network, with ReLUs applied in place and their return values discarded."""

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(x)
        h.relu_()
        h = self.conv2(h)
        F.relu(h, inplace=True)
        return self.fc(h.mean(dim=(2, 3)))


def hand_backprop(model: TwoConv, x: Tensor, targets: list[int], rule: str) -> Tensor:
    """``d y_c / d x`` of :class:`TwoConv` written out, with each ReLU passing the gradient by
    ``rule``: ``"plain"`` ``g [h > 0]``, ``"guided"`` ``relu(g) [h > 0]``, ``"deconv"``
    ``relu(g)``."""

    def through_relu(g: Tensor, h: Tensor) -> Tensor:
        if rule == "plain":
            return g * (h > 0)
        return g.clamp_min(0) * (h > 0) if rule == "guided" else g.clamp_min(0)

    with torch.no_grad():
        w1, b1 = model.conv1.weight, model.conv1.bias
        w2, b2 = model.conv2.weight, model.conv2.bias
        h1 = F.conv2d(x, w1, b1, padding=1)
        h2 = F.conv2d(h1.clamp_min(0), w2, b2, padding=1)
        area = h2.shape[2] * h2.shape[3]
        g_a2 = (model.fc.weight[targets] / area)[:, :, None, None].expand_as(h2)
        g_a1 = F.conv_transpose2d(through_relu(g_a2, h2), w2, padding=1)
        return F.conv_transpose2d(through_relu(g_a1, h1), w1, padding=1)


def hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
               + len(m._backward_pre_hooks) for m in model.modules())


@pytest.fixture(scope="module")
def small_input() -> tuple[Tensor, list[int]]:
    return torch.randn(4, 3, 12, 12, generator=torch.Generator().manual_seed(2)), [0, 3, 1, 4]


def make_two_conv(style: str, cls: type[TwoConv] = TwoConv) -> TwoConv:
    with torch.random.fork_rng():
        torch.manual_seed(3)
        return cls(style).eval()


@pytest.mark.parametrize("style", ["functional", "inplace"])
def test_guided_backprop_and_deconvnet_follow_the_rule_by_hand(style, small_input):
    model = make_two_conv(style)
    x, targets = small_input
    model.conv1.weight.requires_grad_(False)  # a frozen parameter
    model.fc.weight.grad = torch.full_like(model.fc.weight, 7.0)  # an existing .grad
    flags = [p.requires_grad for p in model.parameters()]
    hooks = hook_count(model)

    plain = hand_backprop(model, x, targets, "plain")
    guided = hand_backprop(model, x, targets, "guided")
    deconv = hand_backprop(model, x, targets, "deconv")
    leaf = x.clone().requires_grad_(True)
    (autograd,) = torch.autograd.grad(model(leaf).gather(1, torch.tensor(targets)[:, None]).sum(),
                                      leaf)
    assert max_diff(plain, autograd) < 1e-6  # the hand-written reference is right

    saliency = heatlens.explain(model, x, "saliency", target=targets).raw
    ours = heatlens.explain(model, x, "guided_backprop", target=targets).raw
    ours_deconv = heatlens.explain(model, x, "deconvnet", target=targets).raw
    assert max_diff(saliency, plain) < 1e-6
    assert max_diff(ours, guided) < 1e-6
    assert max_diff(ours_deconv, deconv) < 1e-6
    # the rule changes the gradient: it differs from the plain one on many elements
    assert float(((ours - saliency).abs() > 1e-6).float().mean()) > 0.3
    assert max_diff(ours - saliency, guided - plain) < 1e-6

    for context in (torch.no_grad, torch.inference_mode):
        with context():
            again = heatlens.explain(model, x, "guided_backprop", target=targets).raw
            inside = x.clone()  # an inference tensor under inference_mode
            again_inside = heatlens.explain(model, inside, "guided_backprop", target=targets).raw
        assert torch.equal(again, ours) and torch.equal(again_inside, ours), context.__name__

    assert [p.requires_grad for p in model.parameters()] == flags
    assert torch.equal(model.fc.weight.grad, torch.full_like(model.fc.weight, 7.0))
    assert all(p.grad is None for n, p in model.named_parameters() if n != "fc.weight")
    assert hook_count(model) == hooks == 0
    assert not model.training
    assert torch._C._len_torch_function_stack() == 0  # the ReLU rule is not left active


def test_captum_guided_backprop_misses_functional_relus(small_input):
    """Why the rule is a torch function mode: Captum hooks ``nn.ReLU`` modules only, so on a model
    calling ``F.relu`` its guided backpropagation is the plain gradient."""
    model = make_two_conv("functional")
    x, targets = small_input
    theirs = quiet(captum_attr.GuidedBackprop(copy.deepcopy(model)).attribute, x, target=targets)
    assert max_diff(theirs, hand_backprop(model, x, targets, "plain")) < 1e-6
    ours = heatlens.explain(model, x, "guided_backprop", target=targets).raw
    assert max_diff(ours, hand_backprop(model, x, targets, "guided")) < 1e-6


def test_relu_rule_is_removed_when_the_forward_raises(small_input):
    class Fails(TwoConv):
        def forward(self, x: Tensor) -> Tensor:
            if torch.is_grad_enabled():  # the clean pass runs without grad, the rule pass with
                raise RuntimeError("boom")
            return super().forward(x)

    model = make_two_conv("inplace", Fails)
    x, targets = small_input
    with pytest.raises(RuntimeError, match="boom"):
        heatlens.explain(model, x, "guided_backprop", target=targets)
    assert torch._C._len_torch_function_stack() == 0
    assert hook_count(model) == 0


def test_guided_backprop_with_discarded_in_place_relu(small_input):
    model = make_two_conv("functional", DiscardedInPlace)
    x, targets = small_input
    ours = heatlens.explain(model, x, "guided_backprop", target=targets).raw
    assert max_diff(ours, hand_backprop(model, x, targets, "guided")) < 1e-6


# --- 4. noise tunnel -------------------------------------------------------------------------


NT_SAMPLES, NT_NOISE, NT_SEED = 4, 0.2, 3


@pytest.fixture(scope="module")
def noisy_gradients(setups) -> Tensor:
    """Saliency of each noisy copy, by hand: ``(samples, B, C, H, W)``."""
    model, _, x, targets, _ = setups["resnet18"]
    reach = (x.flatten(1).amax(1) - x.flatten(1).amin(1)).reshape(-1, 1, 1, 1)
    grads = []
    for i in range(NT_SAMPLES):
        generator = torch.Generator().manual_seed(NT_SEED * 1_000_003 + i)
        noise = torch.randn(x.shape[1:], generator=generator)
        leaf = (x + NT_NOISE * reach * noise).requires_grad_(True)
        score = model(leaf).gather(1, torch.tensor(targets)[:, None]).sum()
        grads.append(torch.autograd.grad(score, leaf)[0])
    return torch.stack(grads)


@pytest.mark.parametrize("kind", ["smoothgrad", "smoothgrad_sq", "vargrad"])
def test_noise_tunnel_matches_noisy_inputs_by_hand(setups, noisy_gradients, kind):
    model, _, x, targets, _ = setups["resnet18"]
    expected = {
        "smoothgrad": noisy_gradients.mean(0),
        "smoothgrad_sq": noisy_gradients.pow(2).mean(0),
        "vargrad": noisy_gradients.var(0, unbiased=False),
    }[kind]

    def run(inputs: Tensor, target: list[int], seed: int = NT_SEED) -> Tensor:
        return heatlens.explain(model, inputs, "saliency", target=target, noise_tunnel=kind,
                                nt_samples=NT_SAMPLES, nt_noise=NT_NOISE, nt_seed=seed).raw

    ours = run(x, targets)
    assert max_diff(ours, expected) <= 1e-6 * float(expected.abs().max()) + 1e-9
    assert torch.equal(run(x, targets), ours)  # seeded: identical
    assert max_diff(run(x, targets, seed=NT_SEED + 1), ours) > 1e-3 * float(ours.abs().max())
    alone = run(x[1:], targets[1:])  # batch invariance: noise sample i is the same per image
    assert max_diff(alone[0], ours[1]) <= 1e-6 * float(ours.abs().max()) + 1e-9


# --- 5. occlusion and RISE on a small CNN with evidence at a known place -----------------------


def striped_patches(n: int, generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
    """Noise images 1 x 32 x 32 with one 8 x 8 striped patch at a random place: horizontal
    stripes are class 0, vertical ones class 1 (the task of tests/test_real_models.py).
    Returns images, labels and a mask of the patch."""
    images = 0.3 * torch.randn(n, 1, 32, 32, generator=generator)
    labels = torch.randint(0, 2, (n,), generator=generator)
    corners = torch.randint(0, 32 - 8, (n, 2), generator=generator)
    stripes = torch.tensor([1.0, -1.0] * 4).repeat(8, 1)  # varies along columns: vertical
    inside = torch.zeros(n, 32, 32, dtype=torch.bool)
    for i in range(n):
        y, x = corners[i].tolist()
        images[i, 0, y : y + 8, x : x + 8] += 1.5 * (stripes if labels[i] == 1 else stripes.T)
        inside[i, y : y + 8, x : x + 8] = True
    return images, labels, inside


class PatchNet(nn.Module):
    """A smaller version of tests/test_real_models.py's network (it learns the task as well)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(),
            nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
        )
        self.fc = nn.Linear(16, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.features(x).mean(dim=(2, 3)))


@pytest.fixture(scope="module")
def patch_net() -> PatchNet:
    generator = torch.Generator().manual_seed(0)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = PatchNet()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(100):
        images, labels, _ = striped_patches(32, generator)
        loss = F.cross_entropy(model(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


@pytest.fixture(scope="module")
def patch_data(patch_net) -> tuple[Tensor, Tensor, Tensor]:
    images, labels, inside = striped_patches(12, torch.Generator().manual_seed(123))
    accuracy = float((patch_net(images).argmax(1) == labels).float().mean())
    assert accuracy == 1, f"the model did not learn the task (accuracy {accuracy:.2f})"
    return images, labels, inside


PERTURBATION = {
    "occlusion": {"window": 8, "stride": 4},
    # few kept cells (p = 0.1) of 4 px: the 8 px patch is mostly dropped, so the probability of
    # the class (near 1 with the patch) changes with it
    "rise": {"masks": 300, "cells": 8, "p": 0.1, "seed": 0},
}


@pytest.mark.parametrize("method", list(PERTURBATION))
def test_perturbation_batch_and_chunk_invariance(patch_net, patch_data, method):
    images, labels, _ = patch_data
    options = {**PERTURBATION[method], "masks": 100} if method == "rise" else PERTURBATION[method]
    x, t = images[:4], labels[:4]
    whole = heatlens.explain(patch_net, x, method, target=t, **options).raw
    alone = heatlens.explain(patch_net, x[2:3], method, target=t[2:3], **options).raw
    chunked = heatlens.explain(patch_net, x, method, target=t, memory_budget=1, **options).raw
    scale = float(whole.abs().max())
    assert scale > 0
    assert max_diff(alone[0], whole[2]) <= 1e-5 * scale
    assert max_diff(chunked, whole) <= 1e-5 * scale


def test_rise_is_seeded(patch_net, patch_data):
    images, labels, _ = patch_data
    x, t = images[:2], labels[:2]
    options = {"masks": 50, "cells": 8, "p": 0.1}
    first = heatlens.explain(patch_net, x, "rise", target=t, seed=5, **options).raw
    assert torch.equal(heatlens.explain(patch_net, x, "rise", target=t, seed=5, **options).raw,
                       first)
    other = heatlens.explain(patch_net, x, "rise", target=t, seed=6, **options).raw
    assert max_diff(other, first) > 1e-3 * float(first.abs().max())


@pytest.mark.parametrize("method", list(PERTURBATION))
def test_perturbation_mass_lies_on_the_evidence(patch_net, patch_data, method):
    """The patch is 64 of 1024 pixels: a map that ignored it would put 6.25 % of its mass there
    and have the same mean inside and outside."""
    images, labels, inside = patch_data
    raw = heatlens.explain(patch_net, images, method, target=labels, **PERTURBATION[method]).raw
    raw = raw[:, 0]  # the same for the one channel
    inside_mean = (raw * inside).flatten(1).sum(1) / 64
    outside_mean = (raw * ~inside).flatten(1).sum(1) / (1024 - 64)
    # RISE maps sit on a large constant (the mean probability): take the part above the mean
    mass = (raw - raw.flatten(1).mean(1)[:, None, None]).clamp_min(0)
    share = (mass * inside).flatten(1).sum(1) / mass.flatten(1).sum(1).clamp_min(1e-12)
    ratio = inside_mean / outside_mean
    if method == "occlusion":
        # measured: share 0.46 to 0.64 (mean 0.57), inside / outside 15 to 38 per image
        assert float(share.min()) > 0.3 and float(ratio.min()) > 5, (share, ratio)
    else:
        # a constant near the mean probability dominates RISE's maps. Measured (seed 0): share
        # mean 0.375, inside / outside 1.12 to 1.5 per image; seeds 1 to 4: share mean 0.29 to
        # 0.37, inside / outside at least 1.04
        assert float(share.mean()) > 0.2 and float(ratio.min()) > 1, (share, ratio)


# --- 6. bad input ----------------------------------------------------------------------------


def test_bad_input_is_a_value_error(small_input):
    model = make_two_conv("functional")
    x, targets = small_input
    with pytest.raises(ValueError, match="layer= does not apply"):
        heatlens.explain(model, x, "saliency", target=targets, layer="conv1")
    with pytest.raises(ValueError, match="riemann_trapezoid") as info:
        heatlens.explain(model, x, "integrated_gradients", target=targets, rule="simpson")
    assert "simpson" in str(info.value)
    with pytest.raises(ValueError) as info:
        heatlens.explain(model, x, "integrated_gradients", target=targets,
                         baseline=torch.zeros(3, 5, 5))
    assert "(3, 5, 5)" in str(info.value) and "(4, 3, 12, 12)" in str(info.value)
    with pytest.raises(ValueError, match="larger than the input"):
        heatlens.explain(model, x, "occlusion", target=targets, window=16, stride=8)
