"""Explain what the network consumes: a functional activation that a model applies to a layer's
output in its own ``forward`` is part of that layer (docs/design.md, promise 13).

On a head of global average pooling and one linear layer, Grad-CAM equals CAM divided by the
number of positions (Selvaraju et al., ICCV 2017, Sec. 3.1): with ``y_c = sum_k w_ck mean_ij
A^k_ij``, ``dy_c / dA^k_ij = w_ck / Z``. The identity holds only for the activation the head
reads, so it catches a map taken before DenseNet's functional ReLU.
"""

from __future__ import annotations

import math
import pickle

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import heatlens
from heatlens.engine.layers import auto_layer, candidate_layers


@pytest.fixture(scope="module")
def densenet() -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = torchvision.models.densenet121()
    return model.eval()


@pytest.fixture(scope="module")
def two_images() -> torch.Tensor:
    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))


def test_densenet_cam_is_the_papers_on_relu_features(densenet, two_images):
    """CAM of DenseNet is ``relu(features(x))`` weighted by the classifier row, written out."""
    targets = [3, 500]
    cam = heatlens.explain(densenet, two_images, "cam", target=targets)
    with torch.no_grad():
        consumed = F.relu(densenet.features(two_images))
    expected = torch.einsum("bc,bchw->bhw", densenet.classifier.weight[targets], consumed)
    assert cam.layers == ("features.norm5",)
    torch.testing.assert_close(cam.raw, expected, rtol=1e-5, atol=1e-5)
    assert "followed by a functional ReLU in DenseNet.forward" in cam.layer_reason
    assert cam.details["followed_by"] == {
        "features.norm5": "a functional ReLU in DenseNet.forward"}


def test_densenet_layers_say_which_activation_follows(densenet, two_images):
    found = {c.name: c for c in candidate_layers(densenet, two_images)}
    assert found["features.norm5"].followed_by == "a functional ReLU in DenseNet.forward"
    assert found["features.denseblock4"].followed_by == ""  # read by norm5, a module
    assert auto_layer(densenet, two_images)[0] == "features.norm5"


@pytest.fixture(scope="module")
def gap_linear_networks(densenet, resnet18_seeded, mobilenet_v2_imagenet, lite0, imagenet_photos,
                        chelsea_batch, two_images):
    """Every network of the tests whose head is global average pooling and one linear layer,
    with inputs and two classes to explain."""
    return {
        "densenet121": (densenet, two_images, [3, 500]),
        "resnet18": (resnet18_seeded, two_images, [1, 2]),
        "mobilenet_v2": (mobilenet_v2_imagenet, imagenet_photos[:2], [285, 967]),
        "efficientnet_lite0": (lite0, chelsea_batch, [285]),
    }


@pytest.mark.parametrize("name", ["densenet121", "resnet18", "mobilenet_v2",
                                  "efficientnet_lite0"])
def test_gradcam_equals_cam_over_the_positions(gap_linear_networks, name):
    model, x, targets = gap_linear_networks[name]
    cam = heatlens.explain(model, x, "cam", target=targets)
    grad = heatlens.explain(model, x, "gradcam", target=targets)
    assert cam.layers == grad.layers
    positions = math.prod(cam.raw.shape[1:])
    scale = float(cam.raw.abs().max())
    torch.testing.assert_close(grad.raw * positions, cam.raw, rtol=1e-4, atol=1e-5 * scale)
    torch.testing.assert_close(grad.maps, cam.maps, rtol=0, atol=1e-4)


class Tail(nn.Module):
    """A convolution and batch norm, then an activation applied in ``forward`` in one of several
    ways, then global average pooling and a linear head."""

    def __init__(self, style: str) -> None:
        super().__init__()
        self.style = style
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.act = nn.ReLU()
        self.fc = nn.Linear(6, 4)
        with torch.random.fork_rng():
            torch.manual_seed(1)
            for p in self.parameters():
                nn.init.normal_(p, std=0.7)

    def activate(self, a: torch.Tensor) -> torch.Tensor:
        if self.style == "F.relu":
            return F.relu(a)
        if self.style == "F.relu(inplace=True)":
            return F.relu(a, inplace=True)
        if self.style == "x.relu_() unused":
            a.relu_()  # the result is ignored: the caller goes on with `a`
            return a
        if self.style == "torch.relu":
            return torch.relu(a)
        if self.style == "F.relu after reading the shape":
            assert a.shape[1] == a.size(1) == self.bn.num_features  # not a read of the values
            return F.relu(a)
        if self.style == "F.gelu":
            return F.gelu(a)
        if self.style == "F.silu":
            return F.silu(a)
        if self.style == "module":
            return self.act(a)
        return a

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.activate(self.bn(self.conv(x))).mean(dim=(2, 3)))


STYLES = {"F.relu": "ReLU", "F.relu(inplace=True)": "ReLU", "x.relu_() unused": "ReLU",
          "torch.relu": "ReLU", "F.relu after reading the shape": "ReLU", "F.gelu": "GELU",
          "F.silu": "SiLU"}
X = torch.randn(3, 3, 10, 10, generator=torch.Generator().manual_seed(2))
CLASSES = [0, 3, 1]


def consumed(model: Tail, x: torch.Tensor) -> torch.Tensor:
    """The activation the head reads, written out."""
    activation = {"F.gelu": F.gelu, "F.silu": F.silu}.get(model.style, F.relu)
    with torch.no_grad():
        return activation(model.bn(model.conv(x)))


def head_scores(model: Tail, activation: torch.Tensor) -> torch.Tensor:
    return model.fc(activation.mean(dim=(2, 3)))[torch.arange(len(CLASSES)), CLASSES]


@pytest.mark.parametrize("style", list(STYLES))
def test_every_functional_form_is_followed(style):
    model = Tail(style).eval()
    a = consumed(model, X).requires_grad_(True)
    (g,) = torch.autograd.grad(head_scores(model, a).sum(), a)
    expected = (g.mean(dim=(2, 3))[:, :, None, None] * a).sum(1).detach()
    result = heatlens.explain(model, X, "gradcam", target=CLASSES, layer="bn")
    torch.testing.assert_close(result.raw, expected, rtol=1e-5, atol=1e-6)
    assert result.details["followed_by"] == {"bn": f"a functional {STYLES[style]} in Tail."
                                                   "activate"}
    assert not model._forward_hooks and not model.bn._forward_hooks
    assert torch._C._len_torch_function_stack() == 0


class Keeping(Tail):
    """``Tail`` with a functional ReLU that keeps the layer's output on itself, unread."""

    def activate(self, a: torch.Tensor) -> torch.Tensor:
        self.kept = a
        return F.relu(a)


@pytest.mark.parametrize("method", ["gradcam", "ablationcam"])
def test_the_model_keeps_plain_tensors(method):
    """The watch hands on an alias of the layer's output; once the call is over, what the model
    keeps is a plain tensor again, with nothing of heatlens on it: the model still pickles."""
    model = Keeping("F.relu").eval()
    result = heatlens.explain(model, X, method, target=CLASSES, layer="bn")
    assert result.details["followed_by"] == {"bn": "a functional ReLU in Keeping.activate"}
    assert type(model.kept) is torch.Tensor and vars(model.kept) == {}
    assert type(result.output) is torch.Tensor
    again = pickle.loads(pickle.dumps(model))
    torch.testing.assert_close(again(X), model(X))


def test_an_activation_module_is_a_layer_of_its_own():
    """``nn.ReLU`` after the layer is not followed: the user can name it (layer="act")."""
    model = Tail("module").eval()
    with torch.no_grad():
        pre = model.bn(model.conv(X))
    a = pre.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(head_scores(model, F.relu(a)).sum(), a)
    expected = (g.mean(dim=(2, 3))[:, :, None, None] * pre).sum(1)
    before = heatlens.explain(model, X, "gradcam", target=CLASSES, layer="bn")
    after = heatlens.explain(model, X, "gradcam", target=CLASSES, layer="act")
    assert "followed_by" not in before.details and "followed" not in before.layer_reason
    torch.testing.assert_close(before.raw, expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(before.raw, after.raw, atol=1e-3)


@pytest.mark.parametrize("style", ["F.gelu", "x.relu_() unused"])
def test_ablation_replaces_the_consumed_activation(style):
    """Ablation-CAM zeroes a channel of what the head reads; a GELU must not be applied again to
    the ablated copies (GELU(GELU(a)) != GELU(a)), and an in-place ReLU whose result is ignored
    must not leave the clean activation in place."""
    model = Tail(style).eval()
    a = consumed(model, X)
    with torch.no_grad():
        y = head_scores(model, a)
        drops = []
        for k in range(a.shape[1]):
            ablated = a.clone()
            ablated[:, k] = 0
            drops.append((y - head_scores(model, ablated)) / y)
    expected = (torch.stack(drops, dim=1)[:, :, None, None] * a).sum(1)
    result = heatlens.explain(model, X, "ablationcam", target=CLASSES, layer="bn")
    torch.testing.assert_close(result.raw, expected, rtol=1e-4, atol=1e-5)


def test_fullgrad_keeps_the_modules_own_output():
    """FullGrad's bias gradients belong to the module's output, before any activation."""
    model = Tail("F.relu").eval()
    result = heatlens.explain(model, X, "fullgrad", target=CLASSES, layer=["bn"])
    x = X.clone()
    pre = model.bn(model.conv(x)).detach().requires_grad_(True)
    (g,) = torch.autograd.grad(head_scores(model, F.relu(pre)).sum(), pre)
    from heatlens.methods.fullgrad import effective_bias

    bias = effective_bias(model.bn).detach()[None, :, None, None]
    torch.testing.assert_close(result.raw_by_layer["bn"], (bias * g).sum(1), rtol=1e-5,
                               atol=1e-6)
