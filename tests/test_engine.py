"""The engine's promises (docs/design.md, promises 1-5, 11): the model comes back as it went in,
gradients flow wherever the call is made from, batches and threads give the same maps as single
calls, and bad targets and layers get clear errors."""

from __future__ import annotations

import copy
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
import torchvision
from torch import nn

import heatlens

GRADIENT_METHODS = [
    "gradcam",
    "gradcam++",
    "xgradcam",
    "layercam",
    "hirescam",
    "gradcam_elementwise",
    "eigengradcam",
]
ALL_METHODS = [*GRADIENT_METHODS, "cam", "eigencam"]


@pytest.fixture(scope="module")
def resnet() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=10).eval()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(4, 3, 64, 64)


HOOK_DICTS = [
    "_forward_hooks",
    "_forward_pre_hooks",
    "_backward_hooks",
    "_backward_pre_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks_with_kwargs",
    "_state_dict_hooks",
    "_load_state_dict_pre_hooks",
]


def snapshot(model: nn.Module) -> dict:
    """Everything of the model's state that an explainer could change by accident."""
    return {
        "training": {n: m.training for n, m in model.named_modules()},
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "grad": {
            n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()
        },
        "hooks": {
            n: {d: list(getattr(m, d, {}).items()) for d in HOOK_DICTS}
            for n, m in model.named_modules()
        },
        "params": {n: p.detach().clone() for n, p in model.state_dict().items()},
    }


def assert_same_state(before: dict, after: dict) -> None:
    assert before["training"] == after["training"]
    assert before["requires_grad"] == after["requires_grad"]
    assert before["hooks"] == after["hooks"]
    for name, grad in before["grad"].items():
        if grad is None:
            assert after["grad"][name] is None, name
        else:
            assert torch.equal(grad, after["grad"][name]), name
    for name, value in before["params"].items():
        assert torch.equal(value, after["params"][name]), name


@pytest.fixture
def lived_in_model(resnet: nn.Module, images: torch.Tensor) -> nn.Module:
    """A model as a user leaves it: some .grad filled, some parameters frozen, a user hook."""
    model = copy.deepcopy(resnet)
    model(images[:2]).sum().backward()
    model.layer1.requires_grad_(False)
    model.layer4.register_forward_hook(lambda module, args, output: None)
    model.conv1.register_forward_pre_hook(lambda module, args: None)
    return model


@pytest.mark.parametrize("method", ALL_METHODS)
def test_model_state_unchanged_after_success(lived_in_model, images, method):
    before = snapshot(lived_in_model)
    heatlens.explain(lived_in_model, images, method=method, target=[1, 2, 3, 4])
    assert_same_state(before, snapshot(lived_in_model))


@pytest.mark.parametrize(
    "bad",
    [
        dict(target=10),  # out of range: raises after the forward pass
        dict(target=lambda out: 1 / 0),  # the user's target raises
        dict(inputs=torch.randn(2, 5, 64, 64)),  # wrong channels: raises inside the forward pass
        dict(layer="layer9"),  # unknown layer: raises before anything runs
    ],
)
def test_model_state_unchanged_after_failure(lived_in_model, images, bad):
    before = snapshot(lived_in_model)
    args = {"inputs": images, "target": None, **bad}
    with pytest.raises((ValueError, RuntimeError, ZeroDivisionError)):
        heatlens.explain(
            lived_in_model, args["inputs"], target=args["target"], layer=bad.get("layer", "auto")
        )
    assert_same_state(before, snapshot(lived_in_model))


def test_training_flags_are_left_alone_with_a_warning(resnet, images):
    model = copy.deepcopy(resnet).train()
    model.layer2.eval()
    before = snapshot(model)
    with pytest.warns(UserWarning, match="training mode"):
        heatlens.explain(model, images, target=0)
    assert_same_state(before, snapshot(model))


@pytest.mark.parametrize("method", GRADIENT_METHODS)
def test_gradients_flow_from_any_context(resnet, images, method):
    reference = heatlens.explain(resnet, images, method=method, target=3).maps
    assert resnet.relu.inplace  # torchvision ResNet's in-place ReLU is part of the test
    with torch.no_grad():
        under_no_grad = heatlens.explain(resnet, images, method=method, target=3).maps
        assert not torch.is_grad_enabled()  # grad mode restored
    with torch.inference_mode():
        inference_images = images.clone()  # an inference tensor
        under_inference = heatlens.explain(resnet, inference_images, method=method, target=3).maps
        assert torch.is_inference_mode_enabled()
    frozen = copy.deepcopy(resnet).requires_grad_(False)
    with_frozen = heatlens.explain(frozen, images, method=method, target=3).maps
    for maps in (under_no_grad, under_inference, with_frozen):
        torch.testing.assert_close(maps, reference, atol=1e-6, rtol=0)
    assert all(not p.requires_grad for p in frozen.parameters())


def test_inplace_relu_does_not_corrupt_the_captured_activation(resnet, images):
    """layer4.1.bn2's output is changed in place by `out += identity; relu(out)` inside the block:
    the map must use the value bn2 returned, whose gradient is written out here by hand."""
    model = resnet
    explanation = heatlens.explain(model, images, method="gradcam", layer="layer4.1.bn2", target=2)
    kept = {}

    def keep(module, args, output):
        kept["a"] = output.detach().clone().requires_grad_(True)
        return kept["a"] * 1.0

    handle = model.layer4[1].bn2.register_forward_hook(keep)
    try:
        logits = model(images)
    finally:
        handle.remove()
    (grad,) = torch.autograd.grad(logits[:, 2].sum(), kept["a"])
    expected = (grad.mean(dim=(2, 3), keepdim=True) * kept["a"]).sum(1).detach()
    torch.testing.assert_close(explanation.raw, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", ALL_METHODS)
def test_batch_invariance(resnet, images, method):
    targets = [1, 5, 7, 9]
    batch = heatlens.explain(resnet, images, method=method, target=targets)
    for i, t in enumerate(targets):
        alone = heatlens.explain(resnet, images[i : i + 1], method=method, target=t)
        assert (batch.maps[i] - alone.maps[0]).abs().max() <= 1e-5
        torch.testing.assert_close(batch.raw[i], alone.raw[0], rtol=1e-5, atol=1e-5)


def test_single_image_without_batch_dimension(resnet, images):
    single = heatlens.explain(resnet, images[0], target=4)
    assert single.maps.shape == (1, 64, 64)
    torch.testing.assert_close(
        single.maps[0], heatlens.explain(resnet, images[:1], target=4).maps[0]
    )


def test_targets_in_every_form(resnet, images):
    logits = resnet(images).detach()
    argmax = heatlens.explain(resnet, images)
    assert torch.equal(argmax.targets, logits.argmax(1))
    torch.testing.assert_close(argmax.scores, logits.max(1).values)
    torch.testing.assert_close(argmax.probabilities, logits.softmax(1).max(1).values)
    as_int = heatlens.explain(resnet, images, target=3)
    as_list = heatlens.explain(resnet, images, target=[3, 3, 3, 3])
    as_tensor = heatlens.explain(resnet, images, target=torch.tensor([3, 3, 3, 3]))
    as_callable = heatlens.explain(resnet, images, target=lambda out: out[:, 3])
    as_object = heatlens.explain(resnet, images, target=heatlens.ClassLogit(3))
    for other in (as_list, as_tensor, as_callable, as_object):
        torch.testing.assert_close(other.maps, as_int.maps)
    assert as_callable.targets.tolist() == [-1] * 4
    assert as_int.targets.tolist() == [3] * 4
    probability = heatlens.explain(resnet, images, target=heatlens.ClassProbability(3))
    torch.testing.assert_close(probability.scores, logits.softmax(1)[:, 3])


@pytest.mark.parametrize(
    "target, message",
    [
        ([1, 2, 3], "got 3 targets for a batch of 4"),
        (10, "class 10 is out of range: the model has 10 classes"),
        ([0, 1, -1, 2], "class -1 is out of range"),
        (2.5, "target must be None, an int"),
        (True, "not a bool"),
        (lambda out: out.sum(), "one score per image, shape \\(4,\\)"),
    ],
)
def test_bad_targets_name_the_problem(resnet, images, target, message):
    with pytest.raises((ValueError, TypeError), match=message):
        heatlens.explain(resnet, images, target=target)


class SegmentationLike(nn.Module):
    """Returns per-pixel logits (B, K, H, W): target=None has no meaning."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, 2, 1)
        )
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def test_target_none_needs_class_scores():
    model = SegmentationLike().eval()
    x = torch.randn(2, 3, 16, 16)
    with pytest.raises(ValueError, match="needs a \\(B, num_classes\\) output"):
        heatlens.explain(model, x, layer="body")
    e = heatlens.explain(model, x, layer="body", target=lambda out: out[:, 1].sum(dim=(1, 2)))
    assert e.maps.shape == (2, 16, 16)


class BinaryHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU())
        self.fc = nn.Linear(6, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).mean(dim=(2, 3)))


def test_binary_and_regression_targets_with_sign():
    torch.manual_seed(0)
    model = BinaryHead().eval()
    x = torch.randn(3, 3, 12, 12)
    positive = heatlens.explain(
        model, x, method="hirescam", relu=False, target=heatlens.BinaryOutput()
    )
    negative = heatlens.explain(
        model, x, method="hirescam", relu=False, target=heatlens.BinaryOutput(sign=-1)
    )
    torch.testing.assert_close(negative.raw, -positive.raw)
    torch.testing.assert_close(positive.probabilities, torch.sigmoid(model(x)[:, 0]).detach())
    regression = heatlens.explain(
        model, x, method="hirescam", relu=False, target=heatlens.RegressionOutput(0, sign=-1)
    )
    torch.testing.assert_close(regression.raw, negative.raw)
    with pytest.raises(ValueError, match="index 2 is out of range"):
        heatlens.explain(model, x, target=heatlens.RegressionOutput(2))


def test_constant_map_becomes_zeros_not_nan(images):
    """A layer whose output is constant (a dead convolution) gives all-zero maps, not NaN,
    for every CAM method."""
    dead = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2)
    ).eval()
    with torch.no_grad():
        dead[0].weight.zero_()
        dead[0].bias.zero_()
    for method in ALL_METHODS:
        e = heatlens.explain(dead, images, method=method, target=1, layer="1")
        assert not torch.isnan(e.maps).any(), method
        assert torch.equal(e.maps, torch.zeros_like(e.maps)), method


def test_threads_sharing_one_model_get_the_serial_maps(resnet, images):
    jobs = [
        (method, i) for method in ("gradcam", "gradcam++", "layercam", "eigencam") for i in range(4)
    ]

    def run(job):
        method, i = job
        return heatlens.explain(resnet, images[i : i + 1], method=method, target=i).maps

    serial = [run(job) for job in jobs]
    barrier = threading.Barrier(4)

    def run_together(job):
        if job[1] == 0:
            barrier.wait(timeout=30)
        return run(job)

    with ThreadPoolExecutor(max_workers=4) as pool:
        parallel = list(pool.map(run_together, jobs))
    for job, a, b in zip(jobs, serial, parallel, strict=True):
        assert torch.equal(a, b), job
    assert all(not m._forward_hooks for m in resnet.modules())


def test_explainer_objects_are_reusable_and_hold_no_hooks(resnet, images):
    with heatlens.GradCAM(resnet, layer="layer4") as explainer:
        first = explainer(images, target=1)
        assert all(not m._forward_hooks for m in resnet.modules())
        second = explainer(images, target=1)
    torch.testing.assert_close(first.maps, second.maps)
    assert heatlens.create_explainer("GradCAM++", resnet).name == "gradcam++"
    assert heatlens.create_explainer("gradcampp", resnet).name == "gradcam++"


def test_list_methods_and_unknown_method():
    assert set(ALL_METHODS) <= set(heatlens.list_methods())
    with pytest.raises(ValueError, match="unknown method 'gradcom'.*'gradcam'"):
        heatlens.explain(nn.Conv2d(3, 3, 1), torch.randn(1, 3, 4, 4), method="gradcom")


def test_auto_layer_on_resnet(resnet, images):
    e = heatlens.explain(resnet, images)
    assert e.layers == ("layer4",)
    assert "layer4" in e.layer_reason and "auto" in e.layer_reason


def test_wrong_layer_name_suggests_close_names(resnet, images):
    with pytest.raises(ValueError, match="no layer named 'layer_4'.*'layer4'"):
        heatlens.explain(resnet, images, layer="layer_4")


def test_layer_given_as_module_and_as_list(resnet, images):
    by_module = heatlens.explain(resnet, images, layer=resnet.layer4, target=1)
    by_name = heatlens.explain(resnet, images, layer="layer4", target=1)
    torch.testing.assert_close(by_module.maps, by_name.maps)
    with pytest.raises(ValueError, match="not a submodule"):
        heatlens.explain(resnet, images, layer=nn.Conv2d(3, 3, 1))
    several = heatlens.explain(resnet, images, layer=["layer3", resnet.layer4], target=1)
    assert several.layers == ("layer3", "layer4")
    assert [r.shape[1:] for r in several.raw] == [(4, 4), (2, 2)]
    assert several.maps.shape == (4, 64, 64)


def test_layercam_fuses_layers_with_tanh_then_max(resnet, images):
    layers = ["layer2", "layer3", "layer4"]
    fused = heatlens.explain(resnet, images, method="layercam", layer=layers, target=1)
    per_layer = []
    for name in layers:
        raw = heatlens.explain(resnet, images, method="layercam", layer=name, target=1).raw
        up = torch.nn.functional.interpolate(
            raw.clamp_min(0)[:, None], size=(64, 64), mode="bilinear", align_corners=False
        )[:, 0]
        peak = up.flatten(1).max(dim=1).values.reshape(-1, 1, 1)
        per_layer.append(torch.tanh(2 * up / peak))
    expected = torch.stack(per_layer).max(dim=0).values
    low = expected.flatten(1).min(1).values.reshape(-1, 1, 1)
    high = expected.flatten(1).max(1).values.reshape(-1, 1, 1)
    torch.testing.assert_close(fused.maps, (expected - low) / (high - low), atol=1e-5, rtol=0)


def test_layer_that_does_not_affect_the_output():
    class TwoHeads(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.used = nn.Conv2d(3, 4, 3)
            self.unused = nn.Conv2d(3, 4, 3)
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            self.unused(x)
            return self.fc(self.used(x).mean(dim=(2, 3)))

    model = TwoHeads().eval()
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(ValueError, match="does not depend on layer 'unused'"):
        heatlens.explain(model, x, layer="unused", target=0)
    assert heatlens.explain(model, x).layers == ("used",)


def test_scripted_model_gets_a_clear_error(resnet):
    scripted = torch.jit.script(copy.deepcopy(resnet))
    with pytest.raises(TypeError, match="scripted.*eager nn.Module"):
        heatlens.explain(scripted, torch.randn(1, 3, 64, 64))


def test_cam_needs_a_linear_head():
    model = SegmentationLike().eval()
    with pytest.raises(ValueError, match="CAM needs a head of global average pooling"):
        heatlens.explain(model, torch.randn(1, 3, 8, 8), method="cam")


def test_inputs_are_checked(resnet):
    with pytest.raises(TypeError, match="preprocessed float tensor"):
        heatlens.explain(resnet, torch.zeros(1, 3, 8, 8, dtype=torch.uint8))
    with pytest.raises(TypeError, match="must be a torch.Tensor"):
        heatlens.explain(resnet, [[1.0]])
    with pytest.raises(ValueError, match="takes \\(B, C, ..., ...\\)"):
        heatlens.explain(resnet, torch.randn(3, 8))
