"""Parity with pytorch-grad-cam 1.5.7 for what issue 15 brings over: ``eigen_smooth``,
``aug_smooth`` (also on Score-CAM, Ablation-CAM and FullGrad), SobelCAM, RandomCAM, KPCA-CAM,
FEM, ShapleyCAM (also on Swin), Finer-CAM, SESS, Seg-Eigen-CAM and RefineCAM; and each method's
own property.

Maps are compared after both libraries' post-processing (1e-4). Differences that are choices,
each shown by a test below:

* principal components (``eigen_smooth``, KPCA-CAM): the sign of a principal direction is
  arbitrary; pytorch-grad-cam keeps the SVD's (or scikit-learn's), heatlens makes the map
  correlate positively with the plain map. Compared up to the sign, per image.
* SobelCAM: pytorch-grad-cam's ``sobel_cam`` works on an 8-bit picture (luma grey,
  ``(|G_x| + |G_y|) / 2`` saturated to 8 bits, reflected border); heatlens reuses
  ``heatlens.metrics.controls.edge_map`` (mean grey, ``sqrt(G_x^2 + G_y^2)`` in float, repeated
  border). They agree where those coincide (a vertical edge away from the border) and differ on a
  photo.
* RandomCAM: the weights are random in both; given the same weights the maps agree.
* FullGrad's ``eigen_smooth`` is a principal component across its per-layer maps, min-max
  scaled with no ReLU: the other sign of the component is ``1 - map``.
* ShapleyCAM on Swin: pytorch-grad-cam 1.5.7's ``ShapleyCAM`` with a ``reshape_transform``
  raises (it weighs the reshaped gradients but multiplies the weights with the un-reshaped
  activations); it is compared through a channels-first tap in the model instead.

Models: torchvision MobileNetV2 with its ImageNet weights (``conftest.py``), two photos at
128 x 128 (96 x 96 for SESS); seeded small CNNs where a property needs a construction (smooth
activations for ShapleyCAM, two near-identical classes for Finer-CAM, a segmenter).
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from pytorch_grad_cam import (
    FEM,
    KPCA_CAM,
    SESS,
    AblationCAM,
    FinerCAM,
    FullGrad,
    GradCAM,
    HiResCAM,
    LayerCAM,
    RandomCAM,
    RefineCAM,
    ScoreCAM,
    SegEigenCAM,
    ShapleyCAM,
    XGradCAM,
)
from pytorch_grad_cam.grad_cam_elementwise import GradCAMElementWise
from pytorch_grad_cam.sobel_cam import sobel_cam
from pytorch_grad_cam.utils.model_targets import (
    ClassifierOutputTarget,
    SemanticSegmentationTarget,
)
from threads import one_intraop_thread
from torch import Tensor, nn
from torchvision.models.swin_transformer import SwinTransformer

import heatlens
from heatlens.methods.sampling import seeded_generator
from heatlens.metrics.controls import edge_map

TOL = 1e-4
LAYER = "features.18"
TARGETS = [281, 967]  # chelsea: tabby; coffee: espresso


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread for this file: the maps are small, and on a machine whose cores are
    shared a second thread mostly waits (restored afterwards)."""
    with one_intraop_thread():
        yield


def shrunk(images: Tensor, side: int) -> Tensor:
    return F.interpolate(images, size=(side, side), mode="bilinear", antialias=True,
                         align_corners=False)


@pytest.fixture(scope="module")
def photos(imagenet_photos) -> Tensor:
    """chelsea and coffee at 128 x 128 (a 4 x 4 map at ``features.18``), to keep the file fast."""
    return shrunk(imagenet_photos[:2], 128)


@pytest.fixture(scope="module")
def tiny_photos(imagenet_photos) -> Tensor:
    """chelsea and coffee at 64 x 64, for the properties that need no detail."""
    return shrunk(imagenet_photos[:2], 64)


@pytest.fixture(scope="module")
def mobilenet(mobilenet_v2_imagenet) -> nn.Module:
    return mobilenet_v2_imagenet


def theirs(cls, model: nn.Module, layers: list[str], inputs: Tensor,
           targets: list | None, **call: object) -> Tensor:
    """pytorch-grad-cam's maps, on a deep copy of the model (it changes the model's state)."""
    model = copy.deepcopy(model)
    cam = cls(model, [model.get_submodule(name) for name in layers])
    try:
        wanted = None if targets is None else [
            t if not isinstance(t, int) else ClassifierOutputTarget(t) for t in targets]
        maps = cam(inputs, wanted, **call)
    finally:
        inner = getattr(cam, "base_cam", cam)
        for one in getattr(cam, "base_cam_per_layer", [inner]):
            one.activations_and_grads.release()
    return torch.from_numpy(np.asarray(maps))


def max_diff(a: Tensor, b: Tensor) -> float:
    return float((torch.as_tensor(a).double() - torch.as_tensor(b).double()).abs().max())


def up_to_sign(ours_raw: Tensor, their_maps: Tensor, size: tuple[int, ...]) -> float:
    """Per image, the smaller distance of their map to ours or to ours with the sign flipped."""
    def shown(raw: Tensor) -> Tensor:
        maps = F.interpolate(raw.clamp_min(0)[:, None].float(), size=size, mode="bilinear",
                             align_corners=False)[:, 0]
        low = maps.flatten(1).amin(1)[:, None, None]
        span = maps.flatten(1).amax(1)[:, None, None] - low
        return (maps - low) / span.clamp_min(1e-12)

    plus, minus = shown(ours_raw), shown(-ours_raw)
    return max(min(max_diff(plus[i], their_maps[i]), max_diff(minus[i], their_maps[i]))
               for i in range(len(their_maps)))


def captured(model: nn.Module, layer: str, inputs: Tensor,
             targets: list[int] | None) -> tuple[Tensor, Tensor]:
    """``A`` and ``G = d(sum of target logits)/dA`` at ``layer``, by hand."""
    store: dict[str, Tensor] = {}
    handle = model.get_submodule(layer).register_forward_hook(
        lambda module, args, out: store.__setitem__("a", out))
    try:
        with torch.enable_grad():
            out = model(inputs)
            classes = out.argmax(1) if targets is None else torch.tensor(targets)
            (grad,) = torch.autograd.grad(out.gather(1, classes[:, None]).sum(), store["a"])
    finally:
        handle.remove()
    return store["a"].detach(), grad.detach()


# --- eigen_smooth ---------------------------------------------------------------------------

EIGEN_SMOOTHED = {"gradcam": GradCAM, "xgradcam": XGradCAM, "layercam": LayerCAM,
                  "hirescam": HiResCAM, "gradcam_elementwise": GradCAMElementWise}


@pytest.mark.parametrize("method", list(EIGEN_SMOOTHED))
def test_eigen_smooth_matches_up_to_sign(mobilenet, photos, method):
    ours = heatlens.explain(mobilenet, photos, method=method, target=TARGETS, layer=LAYER,
                            eigen_smooth=True)
    their = theirs(EIGEN_SMOOTHED[method], mobilenet, [LAYER], photos, TARGETS,
                   eigen_smooth=True)
    diff = up_to_sign(ours.raw, their, photos.shape[2:])
    print(f"{method} eigen_smooth: max |heatlens - pytorch-grad-cam| up to sign = {diff:.1e}")
    assert diff <= TOL


def test_eigen_smooth_is_the_rank_one_projection(mobilenet, photos):
    """The raw map is ``X v_1`` for the centred per-channel terms ``X`` (``w_k A^k``): its norm
    is the largest singular value, ``X - (X v_1) v_1^T`` is orthogonal to ``v_1``; its sign
    agrees with the plain Grad-CAM map."""
    ours = heatlens.explain(mobilenet, photos, method="gradcam", target=TARGETS, layer=LAYER,
                            eigen_smooth=True)
    plain = heatlens.explain(mobilenet, photos, method="gradcam", target=TARGETS, layer=LAYER)
    acts, grads = captured(mobilenet, LAYER, photos, TARGETS)
    terms = (grads.mean((2, 3), keepdim=True) * acts).double()
    for i in range(len(photos)):
        x = terms[i].flatten(1).T.numpy()  # (positions, channels)
        x = x - x.mean(0)
        _, sigma, vt = np.linalg.svd(x, full_matrices=False)
        m = ours.raw[i].flatten().double().numpy()
        assert abs(np.linalg.norm(m) - sigma[0]) <= 1e-4 * sigma[0]
        assert np.allclose(np.abs(m), np.abs(x @ vt[0]), atol=1e-5 * sigma[0])
        residual = x - np.outer(m, vt[0] * np.sign(m @ (x @ vt[0])))
        assert np.abs(residual @ vt[0]).max() <= 1e-4 * sigma[0]
        assert np.corrcoef(m, plain.raw[i].flatten().numpy())[0, 1] > 0


def test_eigen_smooth_refused_where_there_are_no_terms(mobilenet):
    with pytest.raises(ValueError, match="per-channel terms"):
        heatlens.create_explainer("eigencam", mobilenet, eigen_smooth=True)


# --- aug_smooth -----------------------------------------------------------------------------


@pytest.mark.parametrize("method,cls", [("layercam", LayerCAM)])
def test_aug_smooth_matches(mobilenet, photos, method, cls):
    ours = heatlens.explain(mobilenet, photos, method=method, target=TARGETS, layer=LAYER,
                            aug_smooth=True)
    their = theirs(cls, mobilenet, [LAYER], photos, TARGETS, aug_smooth=True)
    diff = max_diff(ours.maps, their)
    print(f"{method} aug_smooth: max |heatlens - pytorch-grad-cam| = {diff:.1e}")
    assert diff <= TOL
    assert len(ours.details["aug_smooth"]) == 6


def test_aug_smooth_of_a_symmetric_input_is_symmetric(mobilenet, tiny_photos):
    symmetric = (tiny_photos + tiny_photos.flip(-1)) / 2
    smoothed = heatlens.explain(mobilenet, symmetric, method="gradcam", layer=LAYER,
                                aug_smooth=True)
    plain = heatlens.explain(mobilenet, symmetric, method="gradcam", layer=LAYER)
    assert max_diff(smoothed.maps, smoothed.maps.flip(-1)) <= 1e-6
    assert max_diff(plain.maps, plain.maps.flip(-1)) > 1e-3  # the network itself is not


def test_aug_smooth_explains_the_class_of_the_unaugmented_input(mobilenet, tiny_photos):
    """Chosen differently from pytorch-grad-cam, which takes each augmented copy's own arg-max
    for ``targets=None``: here every copy explains the class predicted on the input itself."""
    by_default = heatlens.explain(mobilenet, tiny_photos, method="gradcam", layer=LAYER,
                                  aug_smooth=True)
    explicit = heatlens.explain(mobilenet, tiny_photos, method="gradcam", layer=LAYER,
                                aug_smooth=True, target=by_default.output.argmax(1))
    assert torch.equal(by_default.maps, explicit.maps)


# --- SobelCAM and RandomCAM -----------------------------------------------------------------


def test_sobelcam_matches_on_an_edge_and_differs_on_a_photo(mobilenet, resnet18_seeded, photos):
    picture = np.full((64, 64, 3), 100, np.uint8)
    picture[:, 20:40] = 110  # two vertical steps of 10 grey levels, away from the border
    image = torch.from_numpy(picture).permute(2, 0, 1)[None].float() / 255
    ours = heatlens.explain(mobilenet, image, method="sobelcam")
    their = torch.from_numpy(sobel_cam(picture).astype(np.float64))
    assert max_diff(ours.maps[0], their / their.max()) <= TOL

    # On a photo: luma vs mean grey, L1 vs L2 magnitude, 8-bit saturation: visibly different.
    rgb = (photos[:1] - photos[:1].amin()) / (photos[:1].amax() - photos[:1].amin())
    picture = (rgb[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    image = torch.from_numpy(picture).permute(2, 0, 1)[None].float() / 255
    their = torch.from_numpy(sobel_cam(picture).astype(np.float64))
    ours = heatlens.explain(mobilenet, image, method="sobelcam")
    print(f"sobelcam on a photo: max |heatlens - pytorch-grad-cam| = "
          f"{max_diff(ours.maps[0], their / their.max()):.2f}")
    assert max_diff(ours.maps[0], their / their.max()) > 0.05
    # model-blind: the same map for another model, and exactly the control of metrics.controls
    other = heatlens.explain(resnet18_seeded, image, method="sobelcam")
    edges = edge_map(image)
    assert torch.equal(ours.maps, other.maps)
    assert max_diff(ours.maps, (edges - edges.min()) / (edges.max() - edges.min())) <= 1e-6


def test_randomcam_matches_given_the_same_weights(mobilenet, photos, monkeypatch):
    weights = 2 * torch.rand(2, 1280, generator=seeded_generator(3, 0, photos.device)) - 1
    monkeypatch.setattr(np.random, "uniform", lambda low, high, size: weights.numpy())
    ours = heatlens.explain(mobilenet, photos, method="randomcam", layer=LAYER, seed=3)
    their = theirs(RandomCAM, mobilenet, [LAYER], photos, TARGETS)
    assert max_diff(ours.maps, their) <= TOL


@pytest.mark.filterwarnings("ignore:the map of image")
def test_randomcam_ignores_the_target_not_the_seed(mobilenet, photos):
    one = heatlens.explain(mobilenet, photos, method="randomcam", layer=LAYER, target=1)
    other = heatlens.explain(mobilenet, photos, method="randomcam", layer=LAYER, target=999)
    reseeded = heatlens.explain(mobilenet, photos, method="randomcam", layer=LAYER, seed=1)
    blind = heatlens.explain(mobilenet, photos, method="randomcam", model_blind=True)
    assert torch.equal(one.maps, other.maps)
    assert max_diff(one.maps, reseeded.maps) > 0.1
    assert blind.maps.shape == photos.shape[:1] + photos.shape[2:]


# --- KPCA-CAM and FEM -----------------------------------------------------------------------


@pytest.mark.parametrize("kernel", ["sigmoid", "rbf"])
def test_kpcacam_matches_up_to_sign(mobilenet, photos, kernel):
    ours = heatlens.explain(mobilenet, photos, method="kpcacam", layer=LAYER, kernel=kernel)
    model = copy.deepcopy(mobilenet)
    cam = KPCA_CAM(model, [model.get_submodule(LAYER)], kernel=kernel)
    try:
        their = torch.from_numpy(cam(photos, None))
    finally:
        cam.activations_and_grads.release()
    diff = up_to_sign(ours.raw, their, photos.shape[2:])
    print(f"kpcacam {kernel}: max |heatlens - pytorch-grad-cam| up to sign = {diff:.1e}")
    assert diff <= TOL


def test_kpcacam_with_a_linear_kernel_is_eigencam(mobilenet, photos):
    linear = heatlens.explain(mobilenet, photos, method="kpcacam", layer=LAYER, kernel="linear")
    eigen = heatlens.explain(mobilenet, photos, method="eigencam", layer=LAYER)
    assert max_diff(linear.raw, eigen.raw) <= 1e-5 * float(eigen.raw.abs().max())


def test_fem_matches(mobilenet, photos):
    ours = heatlens.explain(mobilenet, photos, method="fem", layer=LAYER)
    their = theirs(FEM, mobilenet, [LAYER], photos, None)
    diff = max_diff(ours.maps, their)
    print(f"fem: max |heatlens - pytorch-grad-cam| = {diff:.1e}")
    assert diff <= TOL


def test_fem_weights_are_the_share_above_k_sigma(mobilenet, photos):
    acts, _ = captured(mobilenet, LAYER, photos, TARGETS)
    a = acts.double()
    mean, std = a.mean((2, 3), keepdim=True), a.std((2, 3), keepdim=True, unbiased=False)
    for k in (1.0, 2.0):
        weights = (a > mean + k * std).double().mean((2, 3), keepdim=True)
        ours = heatlens.explain(mobilenet, photos, method="fem", layer=LAYER, k=k, target=1)
        other = heatlens.explain(mobilenet, photos, method="fem", layer=LAYER, k=k, target=999)
        assert max_diff(ours.raw, (weights * a).sum(1)) <= 1e-5 * float(ours.raw.abs().max())
        assert torch.equal(ours.maps, other.maps)  # no target


# --- ShapleyCAM -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smooth_cnn() -> tuple[nn.Module, Tensor]:
    """A seeded CNN with SiLU and GELU after the explained layer ``"3"``: the score is not
    piecewise linear in its activation, so the Hessian-vector product is not zero."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = nn.Sequential(
            nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.SiLU(),
            nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.SiLU(),
            nn.Conv2d(16, 16, 3, padding=1), nn.GELU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5),
        ).eval()
        inputs = torch.randn(2, 3, 32, 32)
    return model, inputs


def test_shapleycam_matches_on_a_smooth_network(smooth_cnn):
    model, inputs = smooth_cnn
    ours = heatlens.explain(model, inputs, method="shapleycam", layer="3", target=[1, 4])
    their = theirs(ShapleyCAM, model, ["3"], inputs, [1, 4])
    grad = heatlens.explain(model, inputs, method="gradcam", layer="3", target=[1, 4])
    diff = max_diff(ours.maps, their)
    print(f"shapleycam: max |heatlens - pytorch-grad-cam| = {diff:.1e}; "
          f"vs Grad-CAM {max_diff(ours.maps, grad.maps):.1e}")
    assert diff <= TOL
    assert max_diff(ours.maps, grad.maps) > 1e-2  # the second-order term matters here


@pytest.mark.parametrize("option", ["eigen_smooth", "aug_smooth"])
def test_shapleycam_options_match_on_a_smooth_network(smooth_cnn, option):
    model, inputs = smooth_cnn
    ours = heatlens.explain(model, inputs, method="shapleycam", layer="3", target=[1, 4],
                            **{option: True})
    their = theirs(ShapleyCAM, model, ["3"], inputs, [1, 4], **{option: True})
    diff = (up_to_sign(ours.raw, their, inputs.shape[2:]) if option == "eigen_smooth"
            else max_diff(ours.maps, their))
    print(f"shapleycam {option}: max |heatlens - pytorch-grad-cam| = {diff:.1e}")
    assert diff <= TOL


def test_shapleycam_hessian_term_is_a_finite_difference(smooth_cnn):
    """``w = mean(G - H A / 2)`` with ``H A = d/de G(A + e A)`` at 0, by central differences."""
    model, inputs = smooth_cnn
    classes = torch.tensor([1, 4])

    def gradient_at(scale: float) -> tuple[Tensor, Tensor]:
        def hook(module, args, out):
            return out * scale

        handle = model[3].register_forward_hook(hook)
        try:
            return captured(model, "3", inputs, classes.tolist())
        finally:
            handle.remove()

    eps = 1e-3
    acts, grad = gradient_at(1.0)
    # G(A (1 + e)) as a gradient w.r.t. the scaled activation; d/de G = H A
    hvp = (gradient_at(1 + eps)[1] - gradient_at(1 - eps)[1]) / (2 * eps)
    weights = (grad - 0.5 * hvp).mean((2, 3), keepdim=True)
    expected = (weights * acts).sum(1)
    ours = heatlens.explain(model, inputs, method="shapleycam", layer="3", target=classes)
    assert max_diff(ours.raw, expected) <= 1e-3 * float(expected.abs().max())


def test_shapleycam_is_gradcam_on_a_piecewise_linear_network(mobilenet, photos):
    shapley = heatlens.explain(mobilenet, photos, method="shapleycam", layer=LAYER,
                               target=TARGETS)
    grad = heatlens.explain(mobilenet, photos, method="gradcam", layer=LAYER, target=TARGETS)
    assert max_diff(shapley.raw, grad.raw) <= 1e-6 * float(grad.raw.abs().max())


# --- Finer-CAM ------------------------------------------------------------------------------


def test_finercam_matches(mobilenet, photos):
    ours = heatlens.explain(mobilenet, photos, method="finercam", layer=LAYER)
    model = copy.deepcopy(mobilenet)
    cam = FinerCAM(model, [model.get_submodule(LAYER)], base_method=GradCAM)
    try:
        their = torch.from_numpy(cam(photos))
    finally:
        cam.base_cam.activations_and_grads.release()
    diff = max_diff(ours.maps, their)
    print(f"finercam: max |heatlens - pytorch-grad-cam| = {diff:.1e}; compared with "
          f"{ours.details['compared_with'].tolist()}")
    assert diff <= TOL


def test_finercam_shows_where_near_identical_classes_differ():
    """Classes 0 and 1 share every weight but channel 2's: class 0 = class 1 + 0.5 channel 2.
    Grad-CAM of class 0 shows what both classes use; Finer-CAM against class 1 shows channel 2,
    the only difference (its map is ``relu(A^2)``, the activation of that channel)."""
    with torch.random.fork_rng():
        torch.manual_seed(1)
        features = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU())
        head = nn.Linear(6, 3)
        inputs = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        head.weight[1] = head.weight[0]
        head.weight[0, 2] += 0.5
        head.bias[:] = torch.tensor([0.0, 0.0, -30.0])  # class 2 far from both
    model = nn.Sequential(features, nn.AdaptiveAvgPool2d(1), nn.Flatten(), head).eval()

    finer = heatlens.explain(model, inputs, method="finercam", layer="0", target=0,
                             similar=(1,))
    grad = heatlens.explain(model, inputs, method="gradcam", layer="0", target=0)
    assert finer.details["compared_with"].flatten().tolist() == [1, 1]
    channel = features(inputs)[:, 2].detach()
    low = channel.flatten(1).amin(1)[:, None, None]
    expected = (channel - low) / (channel.flatten(1).amax(1)[:, None, None] - low)
    assert max_diff(finer.maps, expected) <= 1e-4
    assert max_diff(finer.maps, grad.maps) > 0.1


# --- SESS -----------------------------------------------------------------------------------

SESS_OPTIONS = {"num_scales": 3}


@pytest.fixture(scope="module")
def small_photos(imagenet_photos) -> Tensor:
    return shrunk(imagenet_photos[:2], 96)


def test_sess_matches(mobilenet, small_photos):
    ours = heatlens.explain(mobilenet, small_photos, method="sess", layer=LAYER, target=TARGETS,
                            **SESS_OPTIONS)
    model = copy.deepcopy(mobilenet)
    cam = SESS(model, [model.get_submodule(LAYER)], base_method=GradCAM, **SESS_OPTIONS)
    try:
        their = torch.from_numpy(cam(small_photos, [ClassifierOutputTarget(t) for t in TARGETS]))
    finally:
        cam.base_cam.activations_and_grads.release()
    diff = max_diff(ours.maps, their)
    print(f"sess: max |heatlens - pytorch-grad-cam| = {diff:.1e}")
    assert diff <= TOL


def test_sess_of_one_whole_window_is_its_base(mobilenet, small_photos):
    one = heatlens.explain(mobilenet, small_photos, method="sess", layer=LAYER, target=TARGETS,
                           scales=[96], smooth=False)
    base = heatlens.explain(mobilenet, small_photos, method="gradcam", layer=LAYER,
                            target=TARGETS)
    assert max_diff(one.maps, base.maps) <= 1e-5


# --- Seg-Eigen-CAM --------------------------------------------------------------------------


def test_segeigencam_matches_on_a_segmenter():
    with torch.random.fork_rng():
        torch.manual_seed(2)
        model = nn.Sequential(
            nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(16, 4, 1), nn.Upsample(scale_factor=4, mode="bilinear"),
        ).eval()
        inputs = torch.randn(2, 3, 32, 32)
    mask = np.zeros((32, 32), np.float32)
    mask[8:24, 4:20] = 1
    region = torch.from_numpy(mask)
    ours = heatlens.explain(model, inputs, method="segeigencam", layer="3",
                            target=lambda out: (out[:, 2] * region).sum((1, 2)))
    their = theirs(SegEigenCAM, model, ["3"], inputs,
                   [SemanticSegmentationTarget(2, mask)] * 2)
    diff = max_diff(ours.maps, their)
    print(f"segeigencam: max |heatlens - pytorch-grad-cam| = {diff:.1e}")
    assert diff <= TOL
    # Eq. 13: the value of largest magnitude is positive
    flat = ours.raw.flatten(1)
    assert bool((flat.amax(1) >= flat.amin(1).abs()).all())


# --- RefineCAM ------------------------------------------------------------------------------

REFINED = ["features.14", "features.18"]


def test_refinecam_matches(mobilenet, photos):
    ours = heatlens.explain(mobilenet, photos, method="refinecam", layer=REFINED,
                            base="gradcam", target=TARGETS)
    model = copy.deepcopy(mobilenet)
    cam = RefineCAM(model, [model.get_submodule(name) for name in REFINED],
                    base_method=GradCAM)
    try:
        their = torch.from_numpy(cam(photos, [ClassifierOutputTarget(t) for t in TARGETS]))
    finally:
        for one in cam.base_cam_per_layer:
            one.activations_and_grads.release()
    diff = max_diff(ours.maps, their)
    print(f"refinecam: max |heatlens - pytorch-grad-cam| = {diff:.1e}")
    assert diff <= TOL


def test_refinecam_is_the_product_of_the_layers_maps(mobilenet, photos):
    ours = heatlens.explain(mobilenet, photos, method="refinecam", layer=REFINED,
                            base="gradcam", target=TARGETS)
    per_layer = [heatlens.explain(mobilenet, photos, method="gradcam", layer=name,
                                  target=TARGETS).maps for name in REFINED]
    product = per_layer[0] * per_layer[1]
    low = product.flatten(1).amin(1)[:, None, None]
    expected = (product - low) / (product.flatten(1).amax(1)[:, None, None] - low)
    assert max_diff(ours.maps, expected) <= 1e-5
    assert bool((ours.maps[per_layer[0] == 0] == 0).all())  # no evidence in one layer: none


# --- the model is left as it was --------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:the map of image")
def test_the_new_methods_leave_the_model_untouched(mobilenet, tiny_photos):
    before = {k: v.clone() for k, v in mobilenet.state_dict().items()}
    runs = [("gradcam", {"eigen_smooth": True, "aug_smooth": True}), ("shapleycam", {}),
            ("finercam", {}), ("sess", {"scales": [64, 80]}), ("fem", {}), ("kpcacam", {}),
            ("segeigencam", {}), ("refinecam", {"layer": REFINED}), ("randomcam", {}),
            ("sobelcam", {})]
    for method, options in runs:
        heatlens.explain(mobilenet, tiny_photos, method=method, **options)
    assert all(torch.equal(before[k], v) for k, v in mobilenet.state_dict().items())
    assert all(p.grad is None for p in mobilenet.parameters())
    assert not any(m.training or m._forward_hooks or m._forward_pre_hooks
                   for m in mobilenet.modules())


# --- on a vision transformer, through heatlens' token layout ---------------------------------


@pytest.mark.parametrize("method,options", [
    ("gradcam", {"eigen_smooth": True}), ("gradcam", {"aug_smooth": True}), ("fem", {}),
    ("kpcacam", {}), ("shapleycam", {}), ("finercam", {}), ("randomcam", {}),
    ("refinecam", {"layer": ["blocks.0.norm1", "blocks.1.norm1"]}),
])
def test_on_a_vision_transformer(method, options):
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64,
                                  depth=2, num_classes=10).eval()
        inputs = torch.randn(1, 3, 64, 64)
    result = heatlens.explain(model, inputs, method=method, **options)
    assert result.maps.shape == (1, 64, 64)
    assert bool(torch.isfinite(result.maps).all())
    raw = result.raw if isinstance(result.raw, Tensor) else result.raw[-1]
    assert raw.shape[-2:] == (4, 4)


# --- eigen_smooth and aug_smooth on Score-CAM, Ablation-CAM and FullGrad ----------------------


@pytest.fixture(scope="module")
def bn_cnn() -> tuple[nn.Module, Tensor]:
    """A seeded CNN whose batch norms carry seeded random statistics (FullGrad's bias terms are
    then not zero), and two 32 x 32 inputs: layer ``"4"`` is an 8 x 8 map of 12 channels."""
    g = torch.Generator().manual_seed(4)
    with torch.random.fork_rng():
        torch.manual_seed(4)
        model = nn.Sequential(
            nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 12, 3, stride=2, padding=1), nn.BatchNorm2d(12), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(12, 5),
        )
    with torch.no_grad():
        for norm in (model[1], model[4]):
            n = norm.num_features
            norm.running_mean.copy_(0.3 * torch.randn(n, generator=g))
            norm.running_var.copy_(0.5 + torch.rand(n, generator=g))
            norm.weight.copy_(0.5 + torch.rand(n, generator=g))
            norm.bias.copy_(0.3 * torch.randn(n, generator=g))
    return model.eval(), torch.randn(2, 3, 32, 32, generator=g)


# heatlens method -> (pytorch-grad-cam class, layers, heatlens options). Ablation-CAM at the ReLU
# ("5", non-negative): there pytorch-grad-cam ablates to 0 as well (see test_perturbation.py).
PERTURBATION = {
    "scorecam": (ScoreCAM, ["4"], {"variant": "softmax"}),
    "ablationcam": (AblationCAM, ["5"], {}),
    "fullgrad": (FullGrad, [], {}),
}
BN_TARGETS = [1, 4]


@pytest.mark.parametrize("option", ["eigen_smooth", "aug_smooth"])
@pytest.mark.parametrize("method", list(PERTURBATION))
def test_options_of_the_perturbation_cams_and_fullgrad_match(bn_cnn, method, option):
    model, inputs = bn_cnn
    cls, layers, options = PERTURBATION[method]
    if layers:
        options = {**options, "layer": layers[0]}
    ours = heatlens.explain(model, inputs, method=method, target=BN_TARGETS, **options,
                            **{option: True})
    plain = heatlens.explain(model, inputs, method=method, target=BN_TARGETS, **options)
    their = theirs(cls, model, layers, inputs, BN_TARGETS, **{option: True})
    if option == "aug_smooth":
        diff = max_diff(ours.maps, their)
    elif method == "fullgrad":  # no ReLU: the other sign of the component is 1 - map
        diff = max(min(max_diff(ours.maps[i], their[i]), max_diff(1 - ours.maps[i], their[i]))
                   for i in range(len(their)))
    else:
        diff = up_to_sign(ours.raw, their, inputs.shape[2:])
    print(f"{method} {option}: max |heatlens - pytorch-grad-cam| = {diff:.1e}; "
          f"vs without the option {max_diff(ours.maps, plain.maps):.2f}")
    assert diff <= TOL
    assert max_diff(ours.maps, plain.maps) > 0.05  # the option changes the map


@pytest.mark.parametrize("method,options", [
    ("scorecam", {}), ("sscam", {"samples": 2, "noise": 0.3}), ("iscam", {"samples": 2}),
    ("ablationcam", {}),
])
def test_eigen_smooth_uses_the_plain_maps_channel_weights(bn_cnn, method, options):
    """The weights ``w`` are read back from the plain map ``M = sum_k w_k A^k`` by least
    squares (64 positions, 12 channels); the smoothed map must be the first principal
    component of ``w_k A^k`` (NumPy's SVD), with the sign that correlates with ``M``. Covers the
    variants pytorch-grad-cam does not have (the probability weighting, SS-CAM, IS-CAM)."""
    model, inputs = bn_cnn
    plain = heatlens.explain(model, inputs, method=method, target=BN_TARGETS, layer="4",
                             **options)
    smoothed = heatlens.explain(model, inputs, method=method, target=BN_TARGETS, layer="4",
                                eigen_smooth=True, **options)
    acts, _ = captured(model, "4", inputs, BN_TARGETS)
    for i in range(len(inputs)):
        a = acts[i].flatten(1).double().numpy()  # (channels, positions)
        m = plain.raw[i].flatten().double().numpy()
        w, *_ = np.linalg.lstsq(a.T, m, rcond=None)
        assert np.abs(a.T @ w - m).max() <= 1e-5 * np.abs(m).max()
        terms = (w[:, None] * a).T
        terms = terms - terms.mean(0)
        projection = terms @ np.linalg.svd(terms, full_matrices=False)[2][0]
        projection *= np.sign(projection @ (m - m.mean()))
        got = smoothed.raw[i].flatten().double().numpy()
        assert np.abs(got - projection).max() <= 1e-4 * np.abs(projection).max()


def test_fullgrad_eigen_smooth_needs_two_positions_at_an_eighth(bn_cnn):
    model, _ = bn_cnn
    with pytest.raises(ValueError, match="fewer than two positions"):
        heatlens.explain(model, torch.zeros(1, 3, 15, 15), method="fullgrad",
                         eigen_smooth=True)


# --- ShapleyCAM on Swin, through the channels-last token layout -------------------------------


def scaled_linears(model: nn.Module, seed: int) -> nn.Module:
    """Every linear layer's weights drawn as ``N(0, 1 / fan_in)``: the attention softmax and
    the GELUs are then far from linear, so the Hessian term of ShapleyCAM matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Linear):
                module.weight.copy_(torch.randn(module.weight.shape, generator=g)
                                    / module.weight.shape[1] ** 0.5)
    return model.eval()


def tiny_swins() -> dict[str, tuple[nn.Module, str]]:
    """torchvision's and timm's Swin at 32 px (patch 4, window 4, two stages of two blocks; the
    second block of the first stage attends in shifted windows), with the layer explained."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        tv = SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[2, 2], num_heads=[1, 2],
                             window_size=[4, 4], num_classes=10)
        tm = timm.create_model("swin_tiny_patch4_window7_224", img_size=32, window_size=4,
                               embed_dim=16, depths=(2, 2), num_heads=(1, 2), num_classes=10)
    return {"torchvision": (scaled_linears(tv, 1), "features.1.1.norm1"),
            "timm": (scaled_linears(tm, 1), "layers.0.blocks.1.norm1")}


def with_channels_first_tap(model: nn.Module, layer: str) -> tuple[nn.Module, nn.Module]:
    """A copy of ``model`` whose ``layer`` (a channels-last ``(B, H, W, C)`` output) hands on
    its output through an identity ``tap`` run on the channels-first ``(B, C, H, W)``
    permutation (a forward hook): the network computes the same function, and ``tap`` is a
    feature map for pytorch-grad-cam."""
    model, tap = copy.deepcopy(model), nn.Identity()
    model.get_submodule(layer).register_forward_hook(
        lambda module, args, out: tap(out.permute(0, 3, 1, 2)).permute(0, 2, 3, 1))
    return model, tap


@pytest.mark.parametrize("arch", ["torchvision", "timm"])
def test_shapleycam_on_swin_matches(arch):
    model, layer = tiny_swins()[arch]
    inputs = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    ours = heatlens.explain(model, inputs, method="shapleycam", layer=layer, target=[1, 4])
    grad = heatlens.explain(model, inputs, method="gradcam", layer=layer, target=[1, 4])
    wanted = [ClassifierOutputTarget(1), ClassifierOutputTarget(4)]
    tapped, tap = with_channels_first_tap(model, layer)
    cam = ShapleyCAM(tapped, [tap])
    try:
        their = torch.from_numpy(cam(inputs, wanted))
    finally:  # what it holds are views (of the permutations): release() cannot detach them
        cam.activations_and_grads.activations.clear()
        cam.activations_and_grads.gradients.clear()
        cam.activations_and_grads.release()
    diff = max_diff(ours.maps, their)
    print(f"shapleycam on {arch} Swin: max |heatlens - pytorch-grad-cam| = {diff:.1e}; "
          f"vs Grad-CAM {max_diff(ours.maps, grad.maps):.2f}")
    assert ours.raw.shape == (2, 8, 8)
    assert "channels-last" in ours.details["token_layout"][layer]
    assert diff <= TOL
    assert max_diff(ours.maps, grad.maps) > 0.05  # the Hessian term matters here

    # pytorch-grad-cam's own way to reach a transformer fails for ShapleyCAM (1.5.7)
    copied = copy.deepcopy(model)
    cam = ShapleyCAM(copied, [copied.get_submodule(layer)],
                     reshape_transform=lambda t: t.permute(0, 3, 1, 2))
    try:
        with pytest.raises(ValueError, match="broadcast"):
            cam(inputs, wanted)
    finally:
        cam.activations_and_grads.activations.clear()
        cam.activations_and_grads.gradients.clear()
        cam.activations_and_grads.release()


def test_shapleycam_on_swin_with_fused_attention_is_a_finite_difference():
    """timm's Swin with fused attention and frozen weights: ``scaled_dot_product_attention`` on
    CPU has no second derivative, so heatlens runs the eager path for the call (and switches
    ``fused_attn`` back). ``H A`` is checked by central differences of ``G(A (1 + e))``."""
    model, layer = tiny_swins()["timm"]
    for module in model.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = True
    model.requires_grad_(False)
    inputs = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(3))

    def gradient_at(scale: float) -> tuple[Tensor, Tensor]:
        """``A`` and ``G`` at ``layer`` (channels-last), the layer's output scaled."""
        store: dict[str, Tensor] = {}

        def hook(module, args, out):
            store["a"] = (out * scale).requires_grad_()
            return store["a"]

        handle = model.get_submodule(layer).register_forward_hook(hook)
        try:
            with torch.enable_grad():
                (grad,) = torch.autograd.grad(model(inputs)[0, 3], store["a"])
        finally:
            handle.remove()
        return store["a"].detach(), grad

    eps = 1e-3
    acts, grad = gradient_at(1.0)
    hvp = (gradient_at(1 + eps)[1] - gradient_at(1 - eps)[1]) / (2 * eps)
    weights = (grad - 0.5 * hvp).double().mean((1, 2))  # (1, C): channels last
    expected = (acts.double() * weights[:, None, None]).sum(-1)
    ours = heatlens.explain(model, inputs, method="shapleycam", layer=layer, target=3)
    assert max_diff(ours.raw, expected) <= 1e-3 * float(expected.abs().max())
    assert float(hvp.abs().max()) > 0.1 * float(grad.abs().max())
    assert all(m.fused_attn for m in model.modules() if hasattr(m, "fused_attn"))


def test_the_options_leave_the_model_untouched(bn_cnn):
    model, inputs = bn_cnn
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for method, (_, layers, options) in PERTURBATION.items():
        layer = {"layer": layers[0]} if layers else {}
        heatlens.explain(model, inputs[:1], method=method, target=1, eigen_smooth=True,
                         aug_smooth=True, **options, **layer)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    assert not any(m.training or m._forward_hooks or m._forward_pre_hooks
                   for m in model.modules())
