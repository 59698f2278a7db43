"""heatlens agrees with established libraries and with the papers' formulas.

* pytorch-grad-cam 1.5.7 (``grad-cam``): Grad-CAM, Grad-CAM++, XGrad-CAM, LayerCAM, HiResCAM,
  GradCAMElementWise (final maps to 1e-4), Eigen-CAM and EigenGrad-CAM (up to the sign of the
  principal component), Grad-CAM over several layers.
* torch-cam 0.5.0 (``torchcam``): CAM (raw maps and their scaling).
* Formulas written out here, independently of heatlens, on 1-D and 3-D convolutional models.

Models: torchvision ``mobilenet_v2`` with its real ImageNet weights and ``resnet18`` with a seeded
random init (no offline weights exist for it), both in eval mode; inputs: four real photos from
scikit-image, batch ``(4, 3, 224, 224)`` (fixtures in ``conftest.py``).

What pytorch-grad-cam does after its formula, per image (``BaseCAM.compute_cam_per_layer`` and
``utils.image.scale_cam_image``): ReLU, min-max scaling ``(m - min) / (max - min + 1e-7)`` at the
feature resolution, ``cv2.resize`` (bilinear, pixel centres aligned = ``align_corners=False``),
then the mean over layers and the same min-max scaling again. heatlens: ReLU, upsampling, min-max
scaling. With one layer the second scaling undoes the first (up to the 1e-7 eps), so both are
``minmax(upsample(relu(raw)))``; measured differences are about 1e-6.

Two differences are genuine and are documented by their own tests below:

1. Grad-CAM++: pytorch-grad-cam adds ``eps = 1e-6`` to the denominator of alpha,
   ``G^2 / (2 G^2 + sum(A) G^3 + eps)``; heatlens follows Eq. 19 exactly (0 where the
   denominator is 0). At ImageNet logits the gradients at the last block are 1e-4 to 1e-3, so
   ``2 G^2`` is about 1e-7 and the eps dominates alpha: the maps differ by up to ~0.07. The
   1e-4 comparison therefore runs on copies of the models whose last linear layer is scaled by
   1e4 (logits x 1e4, same arg-max), where the eps is negligible (both libraries then compute Eq. 19
   for the same, scaled score; alpha depends on the score's scale, so these maps are not the
   logit maps); a second test shows that the eps is the whole difference at the plain logits.
2. Several layers: pytorch-grad-cam min-max scales each layer's map at its feature resolution,
   before resizing; heatlens scales each layer's map after upsampling
   (``heatlens.engine.maps.fuse_mean``).
   A bilinear upsample lowers an interior peak slightly, so the layers' relative weights in the
   mean differ and the fused maps differ by ~5e-3 (resnet18 layer3 + layer4). Both orders are
   reproduced from heatlens' raw maps (to 1e-4 and 1e-6).
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pytorch_grad_cam import (
    EigenCAM,
    EigenGradCAM,
    GradCAM,
    GradCAMElementWise,
    GradCAMPlusPlus,
    HiResCAM,
    LayerCAM,
    XGradCAM,
)
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import Tensor, nn
from torchcam.methods import CAM as TCAM

import heatlens

TOL = 1e-4
TARGETS = [1, 281, 504, 999]
SIZE = (224, 224)

# model name -> (conftest fixture, layer explained, final linear layer)
CNNS = {
    "resnet18": ("resnet18_seeded", "layer4", "fc"),
    "mobilenet_v2": ("mobilenet_v2_imagenet", "features.18", "classifier.1"),
}

PYTORCH_GRAD_CAM = {
    "gradcam": GradCAM,
    "gradcam++": GradCAMPlusPlus,
    "xgradcam": XGradCAM,
    "layercam": LayerCAM,
    "hirescam": HiResCAM,
    "gradcam_elementwise": GradCAMElementWise,
}

# Grad-CAM++ is compared with pytorch-grad-cam on logits scaled by this factor (see docstring, 1.)
LOGIT_SCALE = 1e4


# --- reference post-processing, written here (not imported from heatlens) ----------------------


def minmax(maps: Tensor) -> Tensor:
    """Per-map ``(m - min) / (max - min)``; a constant map (all-negative before a ReLU) becomes
    zeros, heatlens' convention."""
    flat = maps.flatten(1)
    low = flat.min(dim=1, keepdim=True).values
    span = flat.max(dim=1, keepdim=True).values - low
    scaled = torch.where(span > 0, (flat - low) / span.where(span > 0, 1.0), 0.0)
    return scaled.reshape(maps.shape)


def upsample(maps: Tensor, size: tuple[int, ...]) -> Tensor:
    mode = {1: "linear", 2: "bilinear", 3: "trilinear"}[len(size)]
    return F.interpolate(maps[:, None].float(), size=size, mode=mode, align_corners=False)[:, 0]


def shown(raw: Tensor, size: tuple[int, ...]) -> Tensor:
    """What a single-layer map should look like: ``minmax(upsample(relu(raw)))``."""
    return minmax(upsample(raw.clamp_min(0), size))


def max_diff(a: Tensor | np.ndarray, b: Tensor | np.ndarray) -> float:
    return float((torch.as_tensor(a).double() - torch.as_tensor(b).double()).abs().max())


# --- helpers ---------------------------------------------------------------------------------


def model_for(request: pytest.FixtureRequest, name: str) -> nn.Module:
    return request.getfixturevalue(CNNS[name][0])


def run_pytorch_grad_cam(cls, model: nn.Module, layers: list[str], inputs: Tensor,
                         targets: list[int] | None) -> Tensor:
    """pytorch-grad-cam's maps ``(B, H, W)``. It calls ``model.eval()`` and ``zero_grad()`` and
    fills parameters' ``.grad``: pass it a ``copy.deepcopy`` of a shared model."""
    with cls(model, [model.get_submodule(name) for name in layers]) as cam:
        wanted = None if targets is None else [ClassifierOutputTarget(t) for t in targets]
        maps = cam(inputs, wanted)
    # (its __exit__ swallows IndexError; `maps` would then be unbound and fail loudly here)
    return torch.from_numpy(maps)


def activation_and_gradient(model: nn.Module, layer: str, inputs: Tensor,
                            targets: list[int] | None) -> tuple[Tensor, Tensor, Tensor]:
    """The layer's activation ``A``, ``G = d(sum of target logits)/dA`` and the classes, computed
    by hand: a temporary forward hook, one forward pass, ``torch.autograd.grad``."""
    store: dict[str, Tensor] = {}

    def hook(module: nn.Module, args: object, output: Tensor) -> None:
        store["a"] = output

    handle = model.get_submodule(layer).register_forward_hook(hook)
    try:
        with torch.enable_grad():
            output = model(inputs)
            classes = output.argmax(1) if targets is None else torch.as_tensor(targets)
            score = output.gather(1, classes[:, None]).sum()
            (gradient,) = torch.autograd.grad(score, store["a"])
    finally:
        handle.remove()
    return store["a"].detach(), gradient.detach(), classes


def snapshot(model: nn.Module) -> dict[str, object]:
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "training": [m.training for m in model.modules()],
        "requires_grad": [p.requires_grad for p in model.parameters()],
        "grads": [p.grad is None for p in model.parameters()],
        "hooks": [
            len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
            + len(m._backward_pre_hooks)
            for m in model.modules()
        ],
    }


def same_snapshot(a: dict[str, object], b: dict[str, object]) -> bool:
    state_a, state_b = a["state"], b["state"]
    assert isinstance(state_a, dict) and isinstance(state_b, dict)
    same_state = state_a.keys() == state_b.keys() and all(
        torch.equal(state_a[k], state_b[k]) for k in state_a
    )
    return same_state and all(a[k] == b[k] for k in ("training", "requires_grad", "grads", "hooks"))


@pytest.fixture(scope="session")
def scaled_logit_models(request: pytest.FixtureRequest) -> dict[str, nn.Module]:
    """Copies of the CNNs whose final linear layer (weight and bias) is multiplied by 1e4."""
    scaled = {}
    for name, (fixture, _, fc) in CNNS.items():
        model = copy.deepcopy(request.getfixturevalue(fixture))
        linear = model.get_submodule(fc)
        with torch.no_grad():
            linear.weight.mul_(LOGIT_SCALE)
            linear.bias.mul_(LOGIT_SCALE)
        scaled[name] = model
    return scaled


# --- the real models and photos are what they claim to be -----------------------------------


def test_real_weights_and_photos(mobilenet_v2_imagenet, imagenet_photos):
    from torchvision.models import MobileNet_V2_Weights

    categories = MobileNet_V2_Weights.IMAGENET1K_V1.meta["categories"]
    with torch.no_grad():
        top1 = mobilenet_v2_imagenet(imagenet_photos).argmax(1).tolist()
    assert imagenet_photos.shape == (4, 3, *SIZE)
    assert categories[top1[0]] == "Egyptian cat"  # chelsea
    assert categories[top1[1]] == "espresso"  # coffee


# --- pytorch-grad-cam: gradient-weighted CAMs ------------------------------------------------


@pytest.mark.parametrize("target", [TARGETS, None], ids=["explicit", "argmax"])
@pytest.mark.parametrize("method", list(PYTORCH_GRAD_CAM))
@pytest.mark.parametrize("model_name", list(CNNS))
def test_matches_pytorch_grad_cam(request, imagenet_photos, scaled_logit_models, model_name,
                                  method, target):
    model = scaled_logit_models[model_name] if method == "gradcam++" else model_for(
        request, model_name
    )
    layer = CNNS[model_name][1]
    ours = heatlens.explain(model, imagenet_photos, method=method, target=target, layer=layer)
    theirs = run_pytorch_grad_cam(
        PYTORCH_GRAD_CAM[method], copy.deepcopy(model), [layer], imagenet_photos, target
    )

    expected_targets = ours.output.argmax(1) if target is None else torch.tensor(TARGETS)
    assert torch.equal(ours.targets, expected_targets)
    assert ours.maps.shape == theirs.shape == (4, *SIZE)
    diff = max_diff(ours.maps, theirs)
    print(f"{model_name} {method} target={'argmax' if target is None else 'explicit'}: "
          f"max |heatlens - pytorch-grad-cam| = {diff:.2e}")
    assert diff <= TOL


def test_target_none_is_the_argmax_class(mobilenet_v2_imagenet, imagenet_photos):
    by_default = heatlens.explain(mobilenet_v2_imagenet, imagenet_photos, method="gradcam",
                                  layer="features.18")
    argmax = by_default.output.argmax(1)
    explicit = heatlens.explain(mobilenet_v2_imagenet, imagenet_photos, method="gradcam",
                                target=argmax.tolist(), layer="features.18")
    assert torch.equal(by_default.targets, argmax)
    assert torch.equal(by_default.maps, explicit.maps)


@pytest.mark.parametrize("model_name", list(CNNS))
def test_gradcampp_logit_difference_is_pytorch_grad_cam_eps(request, imagenet_photos,
                                                            model_name):
    """At plain logits, heatlens (Eq. 19) and pytorch-grad-cam (Eq. 19 + eps 1e-6) differ; the
    eps is the whole difference: with their captured activations and gradients, their formula
    with eps reproduces their maps and the same formula without eps reproduces ours."""
    model = model_for(request, model_name)
    layer = CNNS[model_name][1]
    ours = heatlens.explain(model, imagenet_photos, method="gradcam++", target=TARGETS,
                            layer=layer)
    their_model = copy.deepcopy(model)
    cam = GradCAMPlusPlus(their_model, [their_model.get_submodule(layer)])
    try:
        theirs = torch.from_numpy(cam(imagenet_photos, [ClassifierOutputTarget(t)
                                                        for t in TARGETS]))
        acts = torch.as_tensor(cam.activations_and_grads.activations[0]).double()
        grads = torch.as_tensor(cam.activations_and_grads.gradients[0]).double()
    finally:
        cam.activations_and_grads.release()

    def gradcampp(eps: float) -> Tensor:
        g2 = grads**2
        denominator = 2 * g2 + acts.sum(dim=(2, 3), keepdim=True) * g2 * grads + eps
        alpha = torch.where(denominator != 0, g2 / denominator, 0.0)
        alpha = torch.where(grads != 0, alpha, 0.0)
        weights = (alpha * grads.clamp_min(0)).sum(dim=(2, 3))
        return shown((weights[:, :, None, None] * acts).sum(1), SIZE)

    print(f"{model_name} gradcam++ at logits: max |heatlens - pytorch-grad-cam| = "
          f"{max_diff(ours.maps, theirs):.2e}; median |G| = {float(grads.abs().median()):.1e}")
    assert max_diff(gradcampp(1e-6), theirs) <= TOL
    assert max_diff(gradcampp(0.0), ours.maps) <= TOL
    assert max_diff(ours.maps, theirs) > 1e-2  # the eps changes the maps visibly at logits


# --- pytorch-grad-cam: several layers --------------------------------------------------------


@pytest.fixture(scope="session")
def multilayer(resnet18_seeded, imagenet_photos):
    layers = ["layer3", "layer4"]
    ours = heatlens.explain(resnet18_seeded, imagenet_photos, method="gradcam", target=TARGETS,
                            layer=layers, fusion="mean")
    theirs = run_pytorch_grad_cam(GradCAM, copy.deepcopy(resnet18_seeded), layers,
                                  imagenet_photos, TARGETS)
    return ours, theirs


def test_multilayer_gradcam_mean_fusion(multilayer):
    ours, theirs = multilayer
    raws = ours.raw
    assert isinstance(raws, tuple) and [r.shape[1:] for r in raws] == [(14, 14), (7, 7)]

    # pytorch-grad-cam's order: per layer relu -> minmax at feature resolution -> resize;
    # then mean over layers -> minmax. From heatlens' raw maps it reproduces their maps.
    their_order = minmax(torch.stack([upsample(minmax(r.clamp_min(0)), SIZE) for r in raws])
                         .mean(0))
    assert max_diff(their_order, theirs) <= TOL

    # heatlens' order: per layer relu -> upsample -> minmax; then mean -> minmax.
    our_order = minmax(torch.stack([minmax(upsample(r.clamp_min(0), SIZE)) for r in raws])
                       .mean(0))
    assert max_diff(our_order, ours.maps) <= 1e-6

    # The two orders differ by a bounded amount (docstring, 2.); measured ~5.3e-3.
    diff = max_diff(ours.maps, theirs)
    print(f"resnet18 gradcam layer3+layer4 mean: max |heatlens - pytorch-grad-cam| = {diff:.2e}")
    assert 0 < diff <= 1e-2


# --- heatlens leaves the model alone; pytorch-grad-cam does not -------------------------------


@pytest.mark.parametrize("model_name", list(CNNS))
def test_heatlens_leaves_model_untouched_unlike_pytorch_grad_cam(request, imagenet_photos,
                                                                 model_name):
    model = model_for(request, model_name)
    layer = CNNS[model_name][1]
    before = snapshot(model)
    assert all(before["grads"]) and not any(before["hooks"])
    for method in ("gradcam", "gradcam++", "layercam", "eigencam", "cam"):
        heatlens.explain(model, imagenet_photos, method=method, target=TARGETS, layer=layer)
    assert same_snapshot(before, snapshot(model))

    # A model in training mode stays in it, with its batch-norm statistics, after a warning.
    training = copy.deepcopy(model).train()
    before = snapshot(training)
    with pytest.warns(UserWarning, match="training mode"):
        heatlens.explain(training, imagenet_photos[:2], method="gradcam", target=TARGETS[:2],
                         layer=layer)
    assert same_snapshot(before, snapshot(training))

    # The reason pytorch-grad-cam gets its own deep copy: it switches the model to eval mode and
    # leaves gradients in the parameters' .grad.
    theirs = copy.deepcopy(model).train()
    run_pytorch_grad_cam(GradCAM, theirs, [layer], imagenet_photos[:1], [TARGETS[0]])
    assert not any(m.training for m in theirs.modules())
    assert any(p.grad is not None for p in theirs.parameters())


# --- torch-cam: CAM --------------------------------------------------------------------------


@pytest.mark.parametrize("model_name", list(CNNS))
def test_cam_matches_torchcam(request, imagenet_photos, model_name):
    """torchcam's CAM returns ``sum_k w_k A_k`` (no ReLU: CAM leaves ``_relu`` False) at feature
    resolution; ``normalized=True`` scales it as ``(m - min) / (max - min + 1e-8)``."""
    model = model_for(request, model_name)
    _, layer, fc = CNNS[model_name]
    ours = heatlens.explain(model, imagenet_photos, method="cam", target=TARGETS, layer=layer)
    signed = heatlens.explain(model, imagenet_photos, method="cam", target=TARGETS, layer=layer,
                              relu=False)

    their_model = copy.deepcopy(model)
    extractor = TCAM(their_model, target_layer=layer, fc_layer=fc)
    try:
        with torch.no_grad():
            scores = their_model(imagenet_photos)
        their_raw = extractor(TARGETS, scores, normalized=False)[0]
        their_scaled = extractor(TARGETS, scores)[0]
    finally:
        extractor.remove_hooks()

    assert ours.raw.shape == their_raw.shape == (4, 7, 7)
    raw_diff = max_diff(ours.raw, their_raw)
    print(f"{model_name} cam: max |raw - torchcam raw| = {raw_diff:.2e} "
          f"(max |raw| = {float(their_raw.abs().max()):.2f})")
    assert raw_diff <= 1e-5 * max(1.0, float(their_raw.abs().max()))
    assert bool((ours.raw < 0).any())  # the raw map is signed ...
    assert torch.equal(ours.raw, signed.raw)  # ... whether or not the maps apply ReLU
    assert max_diff(minmax(ours.raw), their_scaled) <= 1e-6
    assert max_diff(ours.maps, shown(their_raw, SIZE)) <= 1e-6
    assert max_diff(signed.maps, minmax(upsample(their_raw, SIZE))) <= 1e-6

    # Both heads are global average pooling + linear: Grad-CAM = CAM / (number of positions).
    grad = heatlens.explain(model, imagenet_photos, method="gradcam", target=TARGETS, layer=layer)
    assert max_diff(grad.raw * 49, ours.raw) <= 1e-5 * max(1.0, float(ours.raw.abs().max()))


# --- pytorch-grad-cam: Eigen-CAM and EigenGrad-CAM, up to the sign ---------------------------


@pytest.mark.parametrize("method", ["eigencam", "eigengradcam"])
@pytest.mark.parametrize("model_name", list(CNNS))
def test_eigen_matches_pytorch_grad_cam_up_to_sign(request, imagenet_photos, model_name, method):
    model = model_for(request, model_name)
    layer = CNNS[model_name][1]
    ours = heatlens.explain(model, imagenet_photos, method=method, target=TARGETS, layer=layer)
    again = heatlens.explain(model, imagenet_photos, method=method, target=TARGETS, layer=layer)
    assert torch.equal(ours.raw, again.raw) and torch.equal(ours.maps, again.maps)

    cls = EigenCAM if method == "eigencam" else EigenGradCAM
    theirs = run_pytorch_grad_cam(cls, copy.deepcopy(model), [layer], imagenet_photos, TARGETS)
    positive, negative = shown(ours.raw, SIZE), shown(-ours.raw, SIZE)
    assert max_diff(ours.maps, positive) <= 1e-6
    diffs = []
    for i in range(len(theirs)):
        as_is, flipped = max_diff(positive[i], theirs[i]), max_diff(negative[i], theirs[i])
        diffs.append(min(as_is, flipped))
        assert min(as_is, flipped) <= TOL, (i, as_is, flipped)
    print(f"{model_name} {method}: max over images of min(|ours - theirs|, |flipped - theirs|)"
          f" = {max(diffs):.2e}")

    # Our sign: the projection correlates positively with the channel sum of what was decomposed.
    acts, grads, _ = activation_and_gradient(model, layer, imagenet_photos, TARGETS)
    features = acts if method == "eigencam" else grads * acts
    energy = features.sum(1).flatten(1).double()
    projection = ours.raw.flatten(1).double()
    energy = energy - energy.mean(1, keepdim=True)
    projection = projection - projection.mean(1, keepdim=True)
    correlation = (energy * projection).sum(1) / (energy.norm(dim=1) * projection.norm(dim=1))
    assert bool((correlation > 0).all()), correlation


# --- any spatial rank: formulas written out independently ------------------------------------


def reference_cam(method: str, acts: Tensor, grads: Tensor) -> Tensor:
    """The signed map ``(B, *spatial)`` of each method from ``A`` and ``G`` ``(B, C, *spatial)``,
    as the papers state them (see the heatlens docstrings for the equation numbers)."""
    space = tuple(range(2, acts.ndim))  # (2, 3, 4) for volumes, (2,) for signals

    def weighted_sum(weights: Tensor) -> Tensor:  # sum_k w_k A^k
        return (weights.reshape(*weights.shape, *[1] * len(space)) * acts).sum(1)

    if method == "gradcam":  # alpha_k = mean_ij G^k_ij
        return weighted_sum(grads.mean(dim=space))
    if method == "gradcam++":  # Eq. 19: a = G^2 / (2 G^2 + sum_ab A_ab G^3), 0 where 0 / 0
        numerator = grads**2
        denominator = 2 * grads**2 + acts.sum(dim=space, keepdim=True) * grads**3
        alpha = torch.where(denominator != 0, numerator / denominator, 0.0)
        return weighted_sum((alpha * grads.clamp_min(0)).sum(dim=space))
    if method == "xgradcam":  # alpha_k = sum_ij A_ij G_ij / sum_ab A_ab
        total = acts.sum(dim=space)
        weights = torch.where(total != 0, (acts * grads).sum(dim=space) / total, 0.0)
        return weighted_sum(weights)
    if method == "layercam":  # sum_k relu(G^k) A^k
        return (grads.clamp_min(0) * acts).sum(1)
    if method == "hirescam":  # sum_k G^k A^k
        return (grads * acts).sum(1)
    if method == "gradcam_elementwise":  # sum_k relu(G^k A^k)
        return (grads * acts).clamp_min(0).sum(1)
    raise AssertionError(method)


INPUT_SHAPES = {1: (2, 1, 32), 3: (2, 1, 8, 16, 16)}


@pytest.fixture(scope="session", params=[3, 1], ids=["conv3d", "conv1d"])
def small_model(request) -> tuple[nn.Module, Tensor]:
    """A seeded Conv3d (volumes) or Conv1d (signals) classifier of 3 classes and an input batch."""
    rank = request.param
    conv = {1: nn.Conv1d, 3: nn.Conv3d}[rank]
    pool = {1: nn.AdaptiveAvgPool1d, 3: nn.AdaptiveAvgPool3d}[rank]
    with torch.random.fork_rng():
        torch.manual_seed(rank)
        model = nn.Sequential(
            conv(1, 4, 3, padding=1), nn.ReLU(),
            conv(4, 8, 3, stride=2, padding=1), nn.ReLU(),
            pool(1), nn.Flatten(), nn.Linear(8, 3),
        ).eval()
        inputs = torch.randn(INPUT_SHAPES[rank])
    return model, inputs


FORMULA_METHODS = list(PYTORCH_GRAD_CAM)


@pytest.mark.parametrize("target", [[0, 2], None], ids=["explicit", "argmax"])
@pytest.mark.parametrize("layer", ["1", "3"], ids=["first-relu", "last-relu"])
@pytest.mark.parametrize("method", FORMULA_METHODS)
def test_formula_on_any_spatial_rank(small_model, method, layer, target):
    """Layer "1" (after the first convolution) has gradients that vary over space; layer "3" is
    the last feature map before global pooling + linear (constant gradients per channel)."""
    model, inputs = small_model
    ours = heatlens.explain(model, inputs, method=method, target=target, layer=layer)
    acts, grads, classes = activation_and_gradient(model, layer, inputs, target)
    expected = reference_cam(method, acts.double(), grads.double())

    assert torch.equal(ours.targets, classes)
    assert ours.raw.shape == expected.shape == (2, *acts.shape[2:])
    # absolute, and relative to the map's scale (raw maps here are as small as 1e-3)
    assert max_diff(ours.raw, expected) <= 1e-6
    assert max_diff(ours.raw, expected) <= 1e-5 * float(expected.abs().max())
    assert ours.maps.shape == (2, *inputs.shape[2:])  # (2, 8, 16, 16) for the volumes
    assert float(ours.maps.min()) >= 0.0 and float(ours.maps.max()) <= 1.0
    assert max_diff(ours.maps, shown(expected, tuple(inputs.shape[2:]))) <= 1e-6


@pytest.mark.parametrize("target", [[0, 2], None], ids=["explicit", "argmax"])
def test_cam_formula_on_any_spatial_rank(small_model, target):
    model, inputs = small_model
    ours = heatlens.explain(model, inputs, method="cam", target=target, layer="3")
    acts, _, classes = activation_and_gradient(model, "3", inputs, target)
    weights = model[-1].weight.detach()[classes].double()  # w^c_k of the final linear layer
    expected = (weights.reshape(*weights.shape, *[1] * (acts.ndim - 2)) * acts.double()).sum(1)
    assert max_diff(ours.raw, expected) <= 1e-6
    assert max_diff(ours.raw, expected) <= 1e-5 * float(expected.abs().max())
    assert max_diff(ours.maps, shown(expected, tuple(inputs.shape[2:]))) <= 1e-6
