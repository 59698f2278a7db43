"""The engine's and CAM's error messages, word for word.

A message is the user's only guide from a refused call to the fix (``docs/design.md``: a clear
error that names the problem and the fix), so its text is part of what a call returns: each test
here triggers one error and compares the whole message with the text it must read, the values in
it (layer names, channel counts, class ranges) computed in the test. Changing a message's wording
means changing it here on purpose.
"""

from __future__ import annotations

import re

import pytest
import torch
from torch import Tensor, nn

import heatlens
from heatlens.engine.capture import forward_with_capture, gradients_of
from heatlens.metrics.controls import edge_map
from heatlens.metrics.imputation import noisy_linear_impute
from heatlens.metrics.sanity import _step_modules, cascading_randomisation

X = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))


def message(exc: pytest.ExceptionInfo[BaseException]) -> str:
    return str(exc.value)


# --- heatlens/methods/cam.py --------------------------------------------------------------------


class ConvOnly(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x).mean(dim=(2, 3))


class PooledHead(nn.Module):
    """conv -> global average pooling -> ``fc``, with ``head`` in front of ``fc`` (identity by
    default) and a spare linear layer ``other`` of a different width."""

    def __init__(self, head: nn.Module | None = None) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.head = head or nn.Identity()
        self.fc = nn.Linear(6, 4)
        self.other = nn.Linear(5, 4)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.head(self.conv(x).mean(dim=(2, 3))))


class TwoLayerHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.classifier = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4))

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.conv(x).mean(dim=(2, 3)))


def test_cam_without_a_linear_layer():
    with pytest.raises(ValueError) as exc:
        heatlens.create_explainer("cam", ConvOnly().eval(), layer="conv")
    assert message(exc) == (
        "CAM needs a head of global average pooling followed by one nn.Linear layer, and this "
        "model has no nn.Linear. Grad-CAM works on any model and equals CAM on those that have "
        "such a head: use method='gradcam'."
    )


def test_cam_with_a_linear_layer_of_the_wrong_width():
    with pytest.raises(ValueError) as exc:
        heatlens.explain(PooledHead().eval(), X, "cam", layer="conv", fc="other", target=0)
    assert message(exc) == (
        "CAM needs the linear layer to read the pooled 6 channels of the layer explained, but "
        "it takes 5 features: the head is not global average pooling + linear at this layer. "
        "Use method='gradcam' instead."
    )


def test_cam_when_no_head_reproduces_the_output():
    torch.manual_seed(0)
    model = PooledHead(nn.Tanh()).eval()  # pooling -> tanh -> fc: fc does not read the pooling
    with pytest.raises(ValueError) as exc:
        heatlens.explain(model, X, "cam", layer="conv", target=0)
    assert re.fullmatch(
        r"CAM needs a head of global average pooling followed by one nn\.Linear layer at the "
        r"layer explained: .+ Grad-CAM works on any model and equals CAM on those that have such "
        r"a head: use method='gradcam' \(or pass fc= to name the layer\)\.",
        message(exc), flags=re.DOTALL,
    ), message(exc)


def test_cam_with_a_head_of_several_layers():
    with pytest.raises(ValueError) as exc:
        heatlens.explain(TwoLayerHead().eval(), X, "cam", layer="conv", target=0)
    assert message(exc) == (
        "CAM needs a head of global average pooling followed by one nn.Linear layer; this "
        "model's head is Sequential with more than one layer. Use method='gradcam'."
    )


# --- heatlens/engine/capture.py -----------------------------------------------------------------


class Pair(nn.Module):
    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return x, x


class WithSpare(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.pair = Pair()
        self.conv = nn.Conv2d(3, 4, 3)
        self.spare = nn.Conv2d(3, 4, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(self.pair(x)[0]).mean(dim=(2, 3))


def test_capture_of_a_layer_that_returns_no_tensor():
    model = WithSpare().eval()
    with pytest.raises(TypeError) as exc:
        forward_with_capture(model, X, {"pair": model.pair}, with_gradients=False)
    assert message(exc) == (
        "layer 'pair' (Pair) returns tuple, not a tensor; choose a layer whose output is a "
        "feature map (see `heatlens layers` or heatlens.candidate_layers(model, inputs))"
    )


def test_capture_of_a_layer_that_never_runs():
    model = WithSpare().eval()
    with pytest.raises(RuntimeError) as exc:
        forward_with_capture(model, X, {"conv": model.conv, "spare": model.spare},
                             with_gradients=False)
    assert message(exc) == (
        "layer(s) ['spare'] did not run during the forward pass, so nothing was captured. A "
        "scripted (torch.jit) or compiled (torch.compile) model does not call Python hooks: pass "
        "the original eager nn.Module instead; otherwise pick a layer that forward() uses."
    )


def test_gradients_of_a_score_without_a_graph():
    with pytest.raises(ValueError) as exc:
        gradients_of(torch.ones(2), [torch.ones(2, requires_grad=True)], ["a", "b"])
    assert message(exc) == (
        "the target score does not depend on layer(s) ['a', 'b']: no gradient can flow. Pick a "
        "layer that lies between the input and the output."
    )


def test_gradients_of_a_layer_the_score_does_not_read():
    used, unused = torch.ones(2, requires_grad=True), torch.ones(2, requires_grad=True)
    with pytest.raises(ValueError) as exc:
        gradients_of(used * 3, [used, unused], ["used", "unused"])
    assert message(exc) == (
        "the target score does not depend on layer 'unused': its gradient is empty. Pick a "
        "layer that lies between the input and the output."
    )


# --- heatlens/methods/rollout.py ----------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_vit() -> nn.Module:
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    return VisionTransformer(img_size=8, patch_size=4, num_classes=3, embed_dim=8, depth=1,
                             num_heads=2).eval()


@pytest.mark.parametrize("method", ["attention_rollout", "gradient_rollout", "chefer"])
def test_attention_methods_take_no_layer(tiny_vit, method):
    with pytest.raises(ValueError) as exc:
        heatlens.create_explainer(method, tiny_vit, layer="blocks.0")
    assert message(exc) == (
        f"{method} combines every attention layer: layer= does not apply (use a CAM method to "
        "explain one layer)"
    )
    assert heatlens.explain(tiny_vit, X, method, target=0).layer_reason == "all attention layers"


@pytest.mark.parametrize("method", ["gradient_rollout", "chefer"])
def test_attention_gradients_of_a_score_without_a_graph(tiny_vit, method):
    with pytest.raises(ValueError) as exc:
        heatlens.explain(tiny_vit, X, method, target=lambda output: output.detach()[:, 0])
    assert message(exc) == "the target score does not depend on the attention: no gradient can flow"


# --- heatlens/metrics/sanity.py -----------------------------------------------------------------


def gradcam(model: nn.Module, x: Tensor, classes: Tensor) -> Tensor:
    return heatlens.explain(model, x, "gradcam", layer="conv", target=classes).maps


def test_sanity_threshold_outside_a_correlation():
    with pytest.raises(ValueError) as exc:
        cascading_randomisation(PooledHead().eval(), X, gradcam, torch.tensor([0, 1]),
                                threshold=1.5)
    assert message(exc) == (
        "threshold is a rank correlation, in (-1, 1]; got 1.5. The default 0.5 fails a map that "
        "keeps a correlation of 0.5 or more"
    )


def test_sanity_with_no_layer_to_randomise():
    with pytest.raises(ValueError) as exc:
        cascading_randomisation(PooledHead().eval(), X, gradcam, torch.tensor([0, 1]), layers=[])
    assert message(exc) == (
        "layers is empty: name at least one layer to randomise, or pass None"
    )


def test_sanity_step_without_weights_of_its_own():
    with pytest.raises(ValueError) as exc:
        _step_modules(PooledHead().eval(), ["head"])
    assert message(exc) == (
        "layer 'head' has no weights of its own to randomise (no parameters, no running "
        "statistics outside the other layers listed); name a layer that has"
    )


# --- heatlens/methods/gradients.py and attribution.py -------------------------------------------


def test_input_gradients_of_a_score_without_a_graph():
    with pytest.raises(ValueError) as exc:
        heatlens.explain(PooledHead().eval(), X, "saliency",
                         target=lambda output: output.detach()[:, 0])
    assert message(exc) == "the target score does not depend on the input: no gradient can flow"


def test_guided_gradcam_with_two_layers():
    with pytest.raises(ValueError) as exc:
        model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 5, 3),
                              nn.AdaptiveAvgPool2d(1), nn.Flatten()).eval()
        heatlens.explain(model, X, "guided_gradcam", layer=["0", "2"], target=0)
    assert message(exc) == "Guided Grad-CAM takes one layer"


# --- heatlens/metrics/controls.py and imputation.py ---------------------------------------------


def test_edge_map_of_one_image_without_its_batch_dimension():
    with pytest.raises(ValueError) as exc:
        edge_map(X[0])
    assert message(exc) == (
        "edge_map takes images (B, C, H, W), got (3, 8, 8): add the batch dimension with "
        "images[None]"
    )


KEPT = torch.zeros(2, 8, 8, dtype=torch.bool)


@pytest.mark.parametrize(("images", "removed", "error", "text"), [
    (X[0], KEPT, ValueError,
     "images must be a (N, C, H, W) tensor, got (3, 8, 8): add the batch dimension with "
     "images[None]"),
    (X.long(), KEPT, TypeError,
     "images must be floating point, got torch.int64: convert them with images.float()"),
    (X, KEPT.float(), TypeError,
     "removed must be a bool tensor (True = pixel removed), got torch.float32: pass mask.bool() "
     "if 1 marks the removed pixels, or mask == 0 if 1 marks the kept ones (pytorch-grad-cam's "
     "NoisyLinearImputer)"),
    (X, KEPT[:, :, :5], ValueError,
     "removed must have shape (N, H, W) = (2, 8, 8) to match images of shape (2, 3, 8, 8), got "
     "(2, 8, 5): one mask per image, shared by its channels"),
    (X, KEPT.to("meta"), ValueError,
     "removed is on meta but images on cpu: move it with removed.to(images.device)"),
    (X, torch.stack([KEPT[0], ~KEPT[1]]), ValueError,
     "image 1 of the batch of 2 has every pixel removed (1 such images): noisy linear "
     "imputation needs at least one known pixel to fill in from"),
    (X.index_put((torch.tensor([1]), torch.tensor([2]), torch.tensor([3]), torch.tensor([4])),
                 torch.tensor(float("nan"))), KEPT, ValueError,
     "image 1 of the batch of 2 holds NaN or infinite values in pixels it keeps (1 of 192): "
     "they would spread to every pixel imputed from them"),
], ids=["3d", "integer", "float mask", "mask shape", "device", "all removed", "nan"])
def test_imputation_arguments(images, removed, error, text):
    with pytest.raises(error) as exc:
        noisy_linear_impute(images, removed)
    assert message(exc) == text
