"""Perturbation methods and FullGrad: Score-CAM, SS-CAM, IS-CAM, Ablation-CAM, Smooth Grad-CAM++.

1. Agreement with pytorch-grad-cam 1.5.7 on a seeded resnet18 (batch 2, 64 px, maps to 1e-4):
   ``ScoreCAM`` (heatlens ``variant="softmax"``), ``AblationCAM`` at ``layer4`` and at
   ``layer2.0.conv1`` (the block's skip connection jumps over it), and ``FullGrad`` on a copy
   whose batch norms carry seeded random statistics (with the default statistics every batch-norm
   bias term is zero and only the input term would be compared).
2. Each method against its paper's formula, written here as plain per-image, per-channel loops
   (no heatlens function): on a small seeded CNN and on resnet18.
3. The engine's promises (docs/design.md, promises 1, 3, 11) for the six methods, on the small
   CNN: model state (also in training mode), no_grad / inference_mode, batch invariance, seeds,
   threads.
4. Memory budget: chunking changes the number of forward passes, not the maps.
5. Ablation-CAM where the network cannot be cut at the layer (concatenated skip branches) and
   where it can, against brute-force full passes.
6. On MobileNetV2 with ImageNet weights, the maps point at the cat and at the coffee cup
   (a 96 x 192 scene: see SCENE_SIDE).

pytorch-grad-cam calls ``model.eval()`` and ``zero_grad()`` and swaps modules: it always gets a
``copy.deepcopy`` of the shared models.
"""

from __future__ import annotations

import copy
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
import torch.nn.functional as F
from pytorch_grad_cam import AblationCAM as PgcAblationCAM
from pytorch_grad_cam import FullGrad as PgcFullGrad
from pytorch_grad_cam import ScoreCAM as PgcScoreCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from threads import one_intraop_thread
from torch import Tensor, nn

import heatlens

TOL = 1e-4  # maps against pytorch-grad-cam
TARGETS = [1, 281]
SIZE = 64  # resnet18 input side: layer4 is 2x2, layer1 16x16

# method -> options that keep it small; the layer of the small CNN is "act" (FullGrad: all biases)
METHODS = {
    "scorecam": {},
    "sscam": {"samples": 3, "noise": 0.3},
    "iscam": {"samples": 3},
    "ablationcam": {},
    "smooth_gradcam++": {"samples": 3},
    "fullgrad": {},
}
BUDGETED = ["scorecam", "sscam", "iscam", "ablationcam", "smooth_gradcam++"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """This file runs thousands of small forward passes. On the shared 2-core machine one
    intra-op thread ran it in about half the time of two (three times faster while other jobs
    ran); results do not depend on it. Restored afterwards."""
    with one_intraop_thread():
        yield


# --- helpers written here (nothing imported from heatlens) --------------------------------------


def max_diff(a, b) -> float:
    return float((torch.as_tensor(a).double() - torch.as_tensor(b).double()).abs().max())


def assert_raw_close(actual: Tensor, expected: Tensor, rtol: float = 1e-5) -> None:
    """Equal up to ``rtol`` of the largest magnitude of the expected maps."""
    scale = float(expected.abs().max())
    assert scale > 0
    assert max_diff(actual, expected) <= rtol * scale, (max_diff(actual, expected), scale)


def minmax_mask(channel: Tensor, size: tuple[int, int], align_corners: bool = False) -> Tensor:
    """Score-CAM's ``H^k``: one channel bilinearly upsampled to ``size``, scaled to [0, 1]; a
    constant channel gives an all-zero mask."""
    up = F.interpolate(channel[None, None].double(), size=size, mode="bilinear",
                       align_corners=align_corners)[0, 0]
    low, high = up.min(), up.max()
    return (up - low) / (high - low) if high > low else torch.zeros_like(up)


def capture(model: nn.Module, layer: str, x: Tensor) -> tuple[Tensor, Tensor]:
    """The layer's output and the model's output for ``x`` (no gradients)."""
    store = {}
    handle = model.get_submodule(layer).register_forward_hook(
        lambda module, args, output: store.__setitem__("a", output.detach().clone()))
    try:
        with torch.no_grad():
            out = model(x)
    finally:
        handle.remove()
    return store["a"], out


def count_forwards(model: nn.Module) -> list[int]:
    """Attach a forward pre-hook counting calls of ``model`` (use on a copy)."""
    calls = [0]

    def count(module, args):
        calls[0] += 1

    model.register_forward_pre_hook(count)
    return calls


def seeded_batchnorms(model: nn.Module, seed: int) -> nn.Module:
    """Random running statistics and affine parameters in every batch norm, in place."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.rand(n, generator=g) - 0.5)
                m.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.rand(n, generator=g) * 0.4 - 0.2)
    return model


HOOK_DICTS = ["_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
              "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs"]


def snapshot(model: nn.Module) -> dict:
    return {
        "training": {n: m.training for n, m in model.named_modules()},
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "grad": {n: None if p.grad is None else p.grad.clone()
                 for n, p in model.named_parameters()},
        "hooks": {n: {d: list(getattr(m, d, {})) for d in HOOK_DICTS}
                  for n, m in model.named_modules()},
        "state": {n: v.detach().clone() for n, v in model.state_dict().items()},
    }


def assert_same_state(before: dict, after: dict) -> None:
    for key in ("training", "requires_grad", "hooks"):
        assert before[key] == after[key], key
    for name, grad in before["grad"].items():
        other = after["grad"][name]
        assert (grad is None and other is None) or torch.equal(grad, other), name
    assert before["state"].keys() == after["state"].keys()
    changed = [n for n, v in before["state"].items() if not torch.equal(v, after["state"][n])]
    assert not changed, f"state_dict entries changed: {changed}"


# --- small models ------------------------------------------------------------------------------


class TinyNet(nn.Module):
    """32 px in; the explained layer ``act`` has 12 channels at 16x16; channel 3 is dead (all
    zero), so Score-CAM's constant-channel rule is exercised."""

    def __init__(self, classes: int = 6) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.conv = nn.Conv2d(8, 12, 3, stride=2, padding=1)
        self.act = nn.ReLU()
        self.after = nn.Sequential(nn.Conv2d(12, 16, 3, stride=2, padding=1), nn.ReLU())
        self.head = nn.Linear(16, classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.after(self.act(self.conv(self.stem(x)))).mean((2, 3)))


class SkipNet(nn.Module):
    """A branch from before the layer ``act`` joins after it, by addition (``concat=False``; the
    network can be cut at ``act``) or by concatenation (``concat=True``; it cannot)."""

    def __init__(self, concat: bool, classes: int = 5) -> None:
        super().__init__()
        self.concat = concat
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU())
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.act = nn.ReLU()
        self.mix = nn.Conv2d(16 if concat else 8, 10, 3, padding=1)
        self.head = nn.Linear(10, classes)

    def forward(self, x: Tensor) -> Tensor:
        skip = self.stem(x)
        a = self.act(self.conv(skip))
        joined = torch.cat([a, skip], dim=1) if self.concat else a + skip
        return self.head(torch.relu(self.mix(joined)).mean((2, 3)))


def seeded(model: nn.Module, seed: int) -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        for p in model.parameters():
            nn.init.normal_(p, 0.0, 0.3) if p.ndim > 1 else nn.init.uniform_(p, -0.2, 0.2)
    return model.eval()


@pytest.fixture(scope="module")
def tiny() -> nn.Module:
    model = seeded_batchnorms(seeded(TinyNet(), 0), 1)
    with torch.no_grad():
        model.conv.bias[3] = -100.0  # a dead channel: constant (zero) activation
    return model


@pytest.fixture(scope="module")
def tiny_x() -> Tensor:
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))


TINY_TARGETS = [0, 3, 5]


def run(model: nn.Module, x: Tensor, method: str, target, **extra) -> heatlens.Explanation:
    options = {**METHODS[method], **extra}
    layer = "auto" if method == "fullgrad" else "act"
    return heatlens.explain(model, x, method=method, target=target, layer=layer, **options)


def test_tiny_model_has_a_dead_channel(tiny, tiny_x):
    a, _ = capture(tiny, "act", tiny_x)
    flat = a.flatten(2)
    constant = (flat.amax(2) == flat.amin(2)).all(0)
    assert constant[3] and int(constant.sum()) == 1


# --- 1. agreement with pytorch-grad-cam on resnet18 ------------------------------------------


@pytest.fixture(scope="module")
def resnet_x(imagenet_photos) -> Tensor:
    """chelsea and coffee, 64 px."""
    return F.interpolate(imagenet_photos[:2], size=(SIZE, SIZE), mode="bilinear",
                         antialias=True, align_corners=False)


def pgc_maps(cls, model: nn.Module, layers: list[str], x: Tensor, **options) -> Tensor:
    with cls(model, [model.get_submodule(n) for n in layers], **options) as cam:
        cam.batch_size = 512  # ScoreCAM reads this attribute: fewer, larger passes
        maps = cam(x, [ClassifierOutputTarget(t) for t in TARGETS])
    return torch.from_numpy(maps)


@pytest.fixture(scope="module")
def resnet_scorecam(resnet18_seeded, resnet_x) -> tuple[heatlens.Explanation, int]:
    """heatlens Score-CAM (softmax) on a copy of resnet18 that counts its forward calls."""
    model = copy.deepcopy(resnet18_seeded)
    calls = count_forwards(model)
    explanation = heatlens.explain(model, resnet_x, method="scorecam", target=TARGETS,
                                   layer="layer4", variant="softmax")
    return explanation, calls[0]


def test_scorecam_softmax_matches_pytorch_grad_cam(resnet18_seeded, resnet_x, resnet_scorecam):
    ours, _ = resnet_scorecam
    theirs = pgc_maps(PgcScoreCAM, copy.deepcopy(resnet18_seeded), ["layer4"], resnet_x)
    assert ours.maps.shape == theirs.shape == (2, SIZE, SIZE)
    assert max_diff(ours.maps, theirs) <= TOL


@pytest.mark.parametrize("layer", ["layer4", "layer2.0.conv1"])
def test_ablationcam_matches_pytorch_grad_cam(resnet18_seeded, resnet_x, layer):
    """``layer2.0.conv1``: inside a block whose downsampling skip branch jumps over it. Its values
    are signed, where pytorch-grad-cam ablates to ``min - 1e7`` instead of 0; with the default
    batch-norm statistics (mean 0, beta 0) ``bn1`` and the ReLU turn both into 0, so the two
    agree. (At ``layer4.0.conv1`` they differ by 4e-4: there pytorch-grad-cam's float32 scores
    are 4.5e-4 from a float64 computation, heatlens' 8e-5.)"""
    ours = heatlens.explain(resnet18_seeded, resnet_x, method="ablationcam", target=TARGETS,
                            layer=layer)
    theirs = pgc_maps(PgcAblationCAM, copy.deepcopy(resnet18_seeded), [layer], resnet_x,
                      batch_size=512)
    assert max_diff(ours.maps, theirs) <= TOL


def test_fullgrad_matches_pytorch_grad_cam_with_batchnorm_biases(resnet18_seeded, resnet_x):
    model = seeded_batchnorms(copy.deepcopy(resnet18_seeded), 5).eval()
    ours = heatlens.explain(model, resnet_x, method="fullgrad", target=TARGETS)
    theirs = pgc_maps(PgcFullGrad, copy.deepcopy(model), [], resnet_x)
    assert max_diff(ours.maps, theirs) <= TOL
    # the bias terms matter: with the default statistics the map is a different one
    plain = heatlens.explain(resnet18_seeded, resnet_x, method="fullgrad", target=TARGETS)
    assert max_diff(ours.maps, plain.maps) > 0.1


# --- 2. the papers' formulas, written out --------------------------------------------------


def ref_score_family(model: nn.Module, layer: str, x: Tensor, targets: list[int], *,
                     method: str, samples: int = 1, noise: float = 0.0, seed: int = 0,
                     batched: bool = False) -> Tensor:
    """``M = sum_k w_k A^k`` with ``w_k`` the mean softmax probability of the target on
    ``X * mask``, masks per method:

    - Score-CAM (Wang et al. 2020, Eq. 6-8): ``H^k``;
    - SS-CAM (Eq. 5-7, noise on the mask): ``H^k + noise * e_i``, ``e_i`` from
      ``torch.randn((samples, H, W), generator=Generator().manual_seed(seed * 1_000_003 + k))``,
      the same draw heatlens makes, so that the two can be compared exactly;
    - IS-CAM (Eq. 4-5): ``(i / N) H^k``, ``i = 1..N``.

    ``batched`` runs all masked inputs of one image in one forward pass (for resnet18)."""
    acts, _ = capture(model, layer, x)
    size = tuple(x.shape[2:])
    maps = []
    for b in range(x.shape[0]):
        masked = []
        for k in range(acts.shape[1]):
            mask = minmax_mask(acts[b, k], size).float()
            if method == "scorecam":
                variants = [mask]
            elif method == "sscam":
                g = torch.Generator().manual_seed(seed * 1_000_003 + k)
                e = torch.randn((samples, *size), generator=g)
                variants = [mask + noise * e[i] for i in range(samples)]
            else:  # iscam
                variants = [mask * (i / samples) for i in range(1, samples + 1)]
            masked.append(torch.stack([x[b] * v for v in variants]))
        with torch.no_grad():
            if batched:
                probs = model(torch.cat(masked)).softmax(1)[:, targets[b]]
                weights = probs.reshape(acts.shape[1], -1).double().mean(1)
            else:
                weights = torch.stack([
                    torch.stack([model(m[None]).softmax(1)[0, targets[b]] for m in ms]).double()
                    .mean() for ms in masked
                ])
        maps.append(sum(weights[k] * acts[b, k].double() for k in range(acts.shape[1])))
    return torch.stack(maps)


def ref_smooth_gradcampp(model: nn.Module, layer: str, x: Tensor, targets: list[int], *,
                         samples: int, noise: float, seed: int) -> Tensor:
    """Smooth Grad-CAM++ (Omeiza et al. 2019, Eq. 7-10), one image and one noise sample at a
    time: ``x_i = x + noise * (max x - min x) * e_i`` with ``e_i`` from ``torch.randn(x.shape[1:],
    generator=Generator().manual_seed(seed * 1_000_003 + i))``; ``D_p = mean_i G_i^p`` of the
    gradient of the target logit at the layer; ``alpha = D2 / (2 D2 + sum_ab A_ab D3)`` (0 where
    the denominator is 0) with the clean activation ``A``; ``w = sum alpha relu(D1)``."""
    module = model.get_submodule(layer)
    clean, _ = capture(model, layer, x)
    maps = []
    for b in range(x.shape[0]):
        reach = x[b].max() - x[b].min()
        grads = []
        for i in range(samples):
            e = torch.randn(x.shape[1:], generator=torch.Generator().manual_seed(
                seed * 1_000_003 + i))
            store = {}
            handle = module.register_forward_hook(
                lambda m, args, out, store=store: store.__setitem__("a", out))
            try:
                with torch.enable_grad():
                    logit = model((x[b] + noise * reach * e)[None])[0, targets[b]]
                    (g,) = torch.autograd.grad(logit, store["a"])
            finally:
                handle.remove()
            grads.append(g[0].double())
        g = torch.stack(grads)
        d1, d2, d3 = g.mean(0), g.pow(2).mean(0), g.pow(3).mean(0)
        a = clean[b].double()
        denominator = 2 * d2 + a.sum(dim=(1, 2), keepdim=True) * d3
        alpha = torch.where(denominator != 0, d2 / denominator.where(denominator != 0, 1.0), 0.0)
        w = (alpha * d1.clamp_min(0)).sum(dim=(1, 2))
        maps.append((w[:, None, None] * a).sum(0))
    return torch.stack(maps)


def ref_ablation(model: nn.Module, layer: str, x: Tensor, targets: list[int], *,
                 batched: bool = False) -> Tensor:
    """Ablation-CAM (Desai & Ramaswamy 2020, Eq. 3) by brute force: full forward passes of the
    whole model with the layer's output replaced (forward hook) by the clean activation with
    channel ``k`` set to zero; ``w_k = (y_c - y_c^k) / y_c``. ``batched`` ablates all channels of
    one image in one full pass of the repeated image."""
    module = model.get_submodule(layer)
    acts, out = capture(model, layer, x)
    maps = []
    for b in range(x.shape[0]):
        c, y = targets[b], out[b, targets[b]].double()
        copies = []
        for k in range(acts.shape[1]):
            ablated = acts[b].clone()
            ablated[k] = 0
            copies.append(ablated)
        chunks = [torch.stack(copies)] if batched else [cp[None] for cp in copies]
        scores = []
        for chunk in chunks:
            handle = module.register_forward_hook(lambda m, args, o, v=chunk: v.clone())
            try:
                with torch.no_grad():
                    scores.append(model(x[b : b + 1].expand(len(chunk), -1, -1, -1))[:, c])
            finally:
                handle.remove()
        y_k = torch.cat(scores).double()
        w = (y - y_k) / y
        maps.append((w[:, None, None] * acts[b].double()).sum(0))
    return torch.stack(maps)


REFERENCE_CASES = {
    "scorecam": ({}, dict(method="scorecam")),
    "sscam": ({"samples": 4, "noise": 0.3, "seed": 7},
              dict(method="sscam", samples=4, noise=0.3, seed=7)),
    "iscam": ({"samples": 5}, dict(method="iscam", samples=5)),
}


@pytest.mark.parametrize("method", list(REFERENCE_CASES))
def test_score_family_formula_on_small_cnn(tiny, tiny_x, method):
    options, reference = REFERENCE_CASES[method]
    ours = heatlens.explain(tiny, tiny_x, method=method, target=TINY_TARGETS, layer="act",
                            **options)
    expected = ref_score_family(tiny, "act", tiny_x, TINY_TARGETS, **reference)
    assert_raw_close(ours.raw, expected)


def test_scorecam_formula_on_resnet18(resnet18_seeded, resnet_x):
    """Default Score-CAM (softmax probability, align_corners=False) at layer1: 64 channels."""
    ours = heatlens.explain(resnet18_seeded, resnet_x, method="scorecam", target=TARGETS,
                            layer="layer1")
    expected = ref_score_family(resnet18_seeded, "layer1", resnet_x, TARGETS,
                                method="scorecam", batched=True)
    assert_raw_close(ours.raw, expected)


def test_scorecam_softmax_variant_formula(tiny, tiny_x):
    """``variant="softmax"``: ``w = softmax_k(y_c(X * H^k))`` with ``align_corners=True`` masks."""
    ours = heatlens.explain(tiny, tiny_x, method="scorecam", target=TINY_TARGETS, layer="act",
                            variant="softmax")
    acts, _ = capture(tiny, "act", tiny_x)
    expected = []
    for b, c in enumerate(TINY_TARGETS):
        with torch.no_grad():
            logits = torch.stack([
                tiny((tiny_x[b] * minmax_mask(acts[b, k], (32, 32), True).float())[None])[0, c]
                for k in range(acts.shape[1])
            ]).double()
        expected.append((logits.softmax(0)[:, None, None] * acts[b].double()).sum(0))
    assert_raw_close(ours.raw, torch.stack(expected))


def test_smooth_gradcampp_formula_on_small_cnn(tiny, tiny_x):
    ours = heatlens.explain(tiny, tiny_x, method="smooth_gradcam++", target=TINY_TARGETS,
                            layer="act", samples=5, noise=0.2, seed=3)
    expected = ref_smooth_gradcampp(tiny, "act", tiny_x, TINY_TARGETS, samples=5, noise=0.2,
                                    seed=3)
    assert_raw_close(ours.raw, expected)


def test_smooth_gradcampp_formula_on_resnet18(resnet18_seeded, resnet_x):
    ours = heatlens.explain(resnet18_seeded, resnet_x, method="smooth_gradcam++", target=TARGETS,
                            layer="layer4", samples=4, noise=0.15, seed=11)
    expected = ref_smooth_gradcampp(resnet18_seeded, "layer4", resnet_x, TARGETS, samples=4,
                                    noise=0.15, seed=11)
    assert_raw_close(ours.raw, expected)


def test_ablationcam_formula_on_small_cnn(tiny, tiny_x):
    ours = heatlens.explain(tiny, tiny_x, method="ablationcam", target=TINY_TARGETS, layer="act")
    assert_raw_close(ours.raw, ref_ablation(tiny, "act", tiny_x, TINY_TARGETS))


# --- 3. engine promises ------------------------------------------------------------------------


@pytest.fixture
def lived_in(tiny, tiny_x) -> nn.Module:
    """The small CNN as a user leaves it: .grad filled, the stem frozen, user hooks."""
    model = copy.deepcopy(tiny)
    model(tiny_x).sum().backward()
    model.stem.requires_grad_(False)
    model.act.register_forward_hook(lambda module, args, output: None)
    model.register_forward_pre_hook(lambda module, args: None)
    return model


@pytest.mark.parametrize("method", list(METHODS))
def test_model_state_unchanged(lived_in, tiny_x, method):
    before = snapshot(lived_in)
    run(lived_in, tiny_x, method, TINY_TARGETS)
    assert_same_state(before, snapshot(lived_in))
    with pytest.raises(ValueError):
        run(lived_in, tiny_x, method, 6)  # out of range: raises after the forward pass
    assert_same_state(before, snapshot(lived_in))


@pytest.mark.parametrize("method", BUDGETED)
def test_model_state_unchanged_after_budget_error(lived_in, tiny_x, method):
    before = snapshot(lived_in)
    with pytest.raises(ValueError, match="memory_budget"):
        run(lived_in, tiny_x, method, TINY_TARGETS, memory_budget=0)
    assert_same_state(before, snapshot(lived_in))


@pytest.mark.parametrize("method", list(METHODS))
def test_model_in_training_mode_is_left_as_it_was(lived_in, tiny_x, method):
    """Promise 1 (docs/design.md): batch-norm running statistics must not move when the user's
    model is in training mode (heatlens warns and leaves the mode as it is)."""
    lived_in.train()
    before = snapshot(lived_in)
    with pytest.warns(UserWarning, match="training mode"):
        run(lived_in, tiny_x, method, TINY_TARGETS)
    assert_same_state(before, snapshot(lived_in))


@pytest.mark.parametrize("method", list(METHODS))
def test_no_grad_and_inference_mode(tiny, tiny_x, method):
    reference = run(tiny, tiny_x, method, TINY_TARGETS).maps
    with torch.no_grad():
        under_no_grad = run(tiny, tiny_x, method, TINY_TARGETS).maps
        assert not torch.is_grad_enabled()
    with torch.inference_mode():
        under_inference = run(tiny, tiny_x.clone(), method, TINY_TARGETS).maps
        assert torch.is_inference_mode_enabled()
    assert max_diff(under_no_grad, reference) <= 1e-6
    assert max_diff(under_inference, reference) <= 1e-6


@pytest.mark.parametrize("method", list(METHODS))
def test_batch_invariance(tiny, tiny_x, method):
    batch = run(tiny, tiny_x, method, TINY_TARGETS)
    for i, t in enumerate(TINY_TARGETS):
        alone = run(tiny, tiny_x[i : i + 1], method, t)
        assert max_diff(batch.maps[i], alone.maps[0]) <= 1e-5, i


@pytest.mark.parametrize("method", ["sscam", "smooth_gradcam++"])
def test_seeded_noise(tiny, tiny_x, method):
    first = run(tiny, tiny_x, method, TINY_TARGETS, seed=1)
    again = run(tiny, tiny_x, method, TINY_TARGETS, seed=1)
    other = run(tiny, tiny_x, method, TINY_TARGETS, seed=2)
    assert torch.equal(first.maps, again.maps) and torch.equal(first.raw, again.raw)
    assert max_diff(first.maps, other.maps) > 1e-3


@pytest.mark.parametrize("method", ["scorecam", "ablationcam", "smooth_gradcam++"])
def test_threads_sharing_a_model(tiny, tiny_x, method):
    jobs = [(tiny_x[i % 3 : i % 3 + 1], t) for i, t in enumerate([0, 1, 4, 5])]
    serial = [run(tiny, x, method, t).maps for x, t in jobs]
    barrier = threading.Barrier(len(jobs))

    def work(job):
        barrier.wait()
        return run(tiny, job[0], method, job[1]).maps

    with ThreadPoolExecutor(len(jobs)) as pool:
        parallel = list(pool.map(work, jobs))
    for s, p in zip(serial, parallel, strict=True):
        assert max_diff(s, p) <= 1e-6


# --- 4. memory budget --------------------------------------------------------------------------


@pytest.mark.parametrize("method", BUDGETED)
def test_tiny_budget_chunks_without_changing_maps(tiny, tiny_x, method):
    model = copy.deepcopy(tiny)
    calls = count_forwards(model)
    extra = {"samples": 8} if method == "smooth_gradcam++" else {}
    default = run(model, tiny_x, method, TINY_TARGETS, **extra)
    default_calls, calls[0] = calls[0], 0
    chunked = run(model, tiny_x, method, TINY_TARGETS, memory_budget=1, **extra)
    assert max_diff(default.maps, chunked.maps) <= 1e-5
    torch.testing.assert_close(default.raw, chunked.raw, rtol=1e-5, atol=1e-6)
    # default: the capture pass, the one-off size measurement, a zero-mask pass, one chunk
    assert default_calls <= 4
    # smallest chunks: one channel (Score family), one ablated copy, one noise sample per pass
    least = {"ablationcam": 3 * 12, "smooth_gradcam++": 8}
    assert calls[0] >= 1 + least.get(method, 11)
    assert calls[0] > 2 * default_calls


def test_scorecam_default_budget_uses_few_passes_on_resnet18(resnet_scorecam):
    """512 channels x 2 images at 64 px (1024 masked inputs): with the default 256 MiB budget
    they go in chunks of about a hundred (about 11 passes, plus the capture pass, the size
    measurement and the zero-mask pass), not in a thousand passes."""
    _, calls = resnet_scorecam
    assert calls <= 16


@pytest.mark.parametrize("method", BUDGETED)
def test_zero_budget_is_an_error(tiny, tiny_x, method):
    with pytest.raises(ValueError, match="memory_budget"):
        run(tiny, tiny_x, method, TINY_TARGETS, memory_budget=0)


# --- 5. Ablation-CAM's cut and its fallback ----------------------------------------------------


def test_ablation_cut_through_an_added_skip(tiny_x):
    model = seeded(SkipNet(concat=False), 3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the fast path: no fallback warning
        ours = heatlens.explain(model, tiny_x, method="ablationcam", target=[0, 2, 4],
                                layer="act")
    assert_raw_close(ours.raw, ref_ablation(model, "act", tiny_x, [0, 2, 4]))


def test_ablation_falls_back_where_a_skip_is_concatenated(tiny_x):
    model = seeded(SkipNet(concat=True), 4)
    with pytest.warns(UserWarning, match="falling back") as record:
        ours = heatlens.explain(model, tiny_x, method="ablationcam", target=[0, 2, 4],
                                layer="act")
    assert sum("falling back" in str(w.message) for w in record) == 1
    assert_raw_close(ours.raw, ref_ablation(model, "act", tiny_x, [0, 2, 4]))


def test_ablation_falls_back_on_densenet():
    from torchvision.models import densenet121

    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = densenet121().eval()
        x = torch.randn(1, 3, 64, 64)
    layer = "features.denseblock4.denselayer16.conv2"
    with pytest.warns(UserWarning, match="falling back") as record:
        ours = heatlens.explain(model, x, method="ablationcam", target=7, layer=layer)
    assert sum("falling back" in str(w.message) for w in record) == 1
    expected = ref_ablation(model, layer, x, [7], batched=True)
    assert_raw_close(ours.raw, expected, rtol=1e-4)


def test_ablation_cut_on_resnet18_equals_full_passes(resnet18_seeded, resnet_x):
    """``layer1.0.bn2``: the block's skip jumps over it and ``out += identity`` changes its output
    in place right after it."""
    layer = "layer1.0.bn2"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ours = heatlens.explain(resnet18_seeded, resnet_x, method="ablationcam", target=TARGETS,
                                layer=layer)
    expected = ref_ablation(resnet18_seeded, layer, resnet_x, TARGETS, batched=True)
    assert_raw_close(ours.raw, expected)


# --- 6. the maps point at the evidence on a real model -----------------------------------------

# Each photo SCENE_SIDE x SCENE_SIDE, side by side. Score-CAM at features.18 runs 1280 masked
# passes per target: at 224 x 448 that took minutes on this 2-core machine, so the scene is
# 96 x 192 (features.18 is 3 x 6).
SCENE_SIDE = 96


@pytest.fixture(scope="module")
def cat_and_coffee() -> Tensor:
    """chelsea's cat on the left, coffee on the right, each resized (no crop), ImageNet mean and
    std."""
    from PIL import Image
    from skimage import data
    from torchvision.transforms.functional import to_tensor

    side = SCENE_SIDE
    parts = [to_tensor(Image.fromarray(getattr(data, name)()).convert("RGB")
                       .resize((side, side), Image.BILINEAR)) for name in ("chelsea", "coffee")]
    mean = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
    std = torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    return ((torch.cat(parts, dim=2) - mean) / std)[None]


@pytest.mark.parametrize("method", ["scorecam", "ablationcam"])
def test_maps_point_at_the_cat_and_the_coffee(mobilenet_v2_imagenet, cat_and_coffee, method):
    with torch.no_grad():
        logits = mobilenet_v2_imagenet(cat_and_coffee)[0]
    cat = 281 + int(logits[281:286].argmax())
    espresso = 967
    # 64 MiB chunks: the same maps as the default 1 GiB (see the budget tests) in half the time
    # on CPU, where most of the default's time went to page faults of the huge chunk buffers
    explanation = heatlens.explain(mobilenet_v2_imagenet, cat_and_coffee.expand(2, -1, -1, -1),
                                   method=method, target=[cat, espresso], memory_budget=1 << 26)
    assert explanation.layers == ("features.18",)
    half = SCENE_SIDE
    left = explanation.maps[:, :, :half].sum(dim=(1, 2))
    right = explanation.maps[:, :, half:].sum(dim=(1, 2))
    assert left[0] > 1.5 * right[0], (left, right)
    assert right[1] > 1.5 * left[1], (left, right)
