"""torchvision classifiers outside the other tests (random init, small inputs): the automatic
layer, the Grad-CAM = CAM identity on those with a global-average-pooling + linear head, and
clear errors where CAM does not apply."""

from __future__ import annotations

import math

import pytest
import torch
import torchvision
from torch import nn

import heatlens


def built(name: str, **options) -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return torchvision.models.get_model(name, weights=None, **options).eval()


X = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize(("name", "layer"), [
    ("regnet_y_400mf", "trunk_output"), ("efficientnet_b0", "features.8"),
    ("shufflenet_v2_x0_5", "conv5"), ("mnasnet0_5", "layers.16"),
    ("googlenet", "inception5b"),
])
def test_gradcam_equals_cam_on_gap_linear_classifiers(name, layer):
    options = {"aux_logits": False, "init_weights": True} if name == "googlenet" else {}
    model = built(name, **options)
    cam = heatlens.explain(model, X, "cam", target=[1, 2])
    grad = heatlens.explain(model, X, "gradcam", target=[1, 2])
    assert cam.layers == grad.layers == (layer,)
    positions = math.prod(cam.raw.shape[1:])
    torch.testing.assert_close(grad.raw * positions, cam.raw, rtol=1e-4,
                               atol=1e-5 * float(cam.raw.abs().max()))


def test_squeezenet_explains_its_features_not_its_class_score_map():
    """SqueezeNet ends in a 1 x 1 convolution to the 1000 classes: the classifier, as a linear
    head is, so the automatic layer is the last Fire module before it."""
    result = heatlens.explain(built("squeezenet1_1"), X, "gradcam", target=[1, 2])
    assert result.layers == ("features.12",)
    assert "'classifier.1' (a 1 x 1 convolution to the 1000 classes) is the classifier" in (
        result.layer_reason)


def test_maxvit_windows_are_not_mistaken_for_a_patch_grid():
    """MaxViT's last attention normalises windows ``(B, 1, 49, 512)``: the rank of a feature
    map, not its grid. The automatic layer is the last block's map; naming the window layer is
    a clear error."""
    model = built("maxvit_t")
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    result = heatlens.explain(model, x, "gradcam", target=3)
    assert result.layers == ("blocks.3",) and result.raw.shape == (1, 7, 7)
    with pytest.raises(ValueError, match=r"outputs shape \(1, 1, 49, 512\), neither a feature "
                                         r"map .* over the input's grid \(224, 224\)"):
        heatlens.explain(model, x, "gradcam", target=3,
                         layer="blocks.3.layers.1.layers.grid_attention.attn_layer.0")


@pytest.mark.parametrize(("name", "message"), [
    ("convnext_tiny", r"cannot find the classifier head .* \(tried 'classifier', 'classifier.2'\)"),
    ("mobilenet_v3_small", "this model's head is Sequential with more than one layer"),
])
def test_cam_says_why_it_does_not_apply(name, message):
    with pytest.raises(ValueError, match=f"CAM needs a head of global average pooling.*{message}"):
        heatlens.explain(built(name), X, "cam", target=[1, 2])
