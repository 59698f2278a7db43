"""Error messages of the engine, the methods and the metrics, word for word.

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
from heatlens.metrics.localisation import boxes_to_masks, energy_inside, relevance_mass
from heatlens.metrics.robustness import infidelity, max_sensitivity
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


# --- heatlens/metrics/localisation.py -----------------------------------------------------------


NO_BOXES = torch.zeros(2, 0, 4)


def one_box(*box: float) -> Tensor:
    return torch.tensor([box], dtype=torch.float64)


@pytest.mark.parametrize(("boxes", "size", "text"), [
    (5, (4, 4),
     "boxes must be a (B, 4) tensor or a list with one entry of (n_i, 4) boxes per image, got "
     "int 5"),
    ([], (4, 4),
     "boxes must be a (B, 4) tensor or a list with one entry of (n_i, 4) boxes per image, got "
     "list []"),
    # image 0 is a good box given as a list, so the error must name image 1 and its shape
    ([[0, 0, 2, 2], [[0, 0, 1, 1, 1]]], (4, 4),
     "boxes of image 1 must be (n, 4) as (x1, y1, x2, y2), got shape (1, 5)"),
    (NO_BOXES, (4, 4),
     f"boxes of shape {tuple(NO_BOXES.shape)} give no image a box; every image needs at least "
     "one (leave images without an object out)"),
    ([[0, 0, 2, 2], torch.zeros(0, 4)], (4, 4),
     "image 1 has no box; every image needs at least one (leave images without an object out)"),
    (one_box(2, 0, 1, 3), (4, 4),
     "box 0 of image 0 is (2, 0, 1, 3): boxes are (x1, y1, x2, y2) with x1 < x2 and y1 < y2 (for "
     "(x, y, w, h) boxes use torchvision.ops.box_convert(boxes, 'xywh', 'xyxy'))"),
    (one_box(0, 0, 7, 2), (4, 6),
     "box 0 of image 0 is (0, 0, 7, 2), outside the image of 4 x 6 (H x W), where 0 <= x1 < x2 "
     "<= 6 and 0 <= y1 < y2 <= 4: clip it with torchvision.ops.clip_boxes_to_image, or check "
     "the size"),
    # the centres 0.5 and 1.5 both miss [0.6, 1.4)
    (one_box(0.6, 0, 1.4, 2), (4, 4),
     "box 0 of image 0 is (0.6, 0, 1.4, 2), which covers no pixel centre (a box covers the "
     "pixels whose centre lies in [x1, x2) x [y1, y2)): widen it"),
], ids=["number", "empty list", "five numbers", "tensor without boxes", "image without a box",
        "reversed", "outside", "no centre"])
def test_boxes_arguments(boxes, size, text):
    with pytest.raises(ValueError) as exc:
        boxes_to_masks(boxes, size)
    assert message(exc) == text


MAPS = torch.rand(2, 4, 4, generator=torch.Generator().manual_seed(1))
MASKS = torch.zeros(2, 4, 4, dtype=torch.bool).index_fill(2, torch.tensor([0]), True)
SIGNED = MAPS.index_put((torch.tensor([1]), torch.tensor([2]), torch.tensor([3])),
                        torch.tensor(-0.5))
WIDE_MASKS = torch.ones(2, 4, 5, dtype=torch.bool)


@pytest.mark.parametrize(("metric", "maps", "masks", "error", "text"), [
    (energy_inside, MAPS, MASKS.float(), TypeError,
     "energy_inside takes masks of dtype bool (True = object), got torch.float32: pass masks "
     "> 0.5, or boxes_to_masks(boxes, (H, W))"),
    (relevance_mass, MAPS, WIDE_MASKS, ValueError,
     f"relevance_mass: maps are {tuple(MAPS.shape)} but masks are {tuple(WIDE_MASKS.shape)}; "
     "they must match: upsample the maps to the image size (heatlens.engine.maps.upsample) or "
     "make the masks at the maps' size"),
    (energy_inside, SIGNED, MASKS, ValueError,
     f"energy_inside: map 1 has negative values (down to {-0.5:.3g}), and the energy is of a "
     "non-negative map: pass the maps after ReLU (Explanation.maps), or use relevance_mass, "
     "which counts the positive part of a signed map"),
], ids=["float masks", "mask size", "negative map"])
def test_localisation_arguments(metric, maps, masks, error, text):
    with pytest.raises(error) as exc:
        metric(maps, masks)
    assert message(exc) == text


def test_relevance_mass_of_a_map_without_positive_values():
    maps = torch.stack([MAPS[0], -MAPS[1]])
    with pytest.warns(UserWarning) as record:
        relevance_mass(maps, MASKS)
    assert [str(w.message) for w in record] == [
        "relevance_mass: map(s) 1 hold no positive value, so none of it lies on the object: they "
        "score 0"
    ]


# --- heatlens/metrics/robustness.py -------------------------------------------------------------


def summed(x: Tensor) -> Tensor:
    """One score per image, ``(B,)``."""
    return x.flatten(1).sum(dim=1)


NAN_INPUTS = X.clone().index_fill(3, torch.tensor([2]), float("nan"))
"""Every image holds NaN (column 2 of every row of every channel)."""
ATTRIBUTIONS_5 = torch.zeros(2, 5)


def gradcam_explanation(x: Tensor) -> heatlens.Explanation:
    """An ``explain`` that forgets to take ``.maps`` of what it returns."""
    return heatlens.explain(PooledHead().eval(), x, "gradcam", layer="conv", target=0)


@pytest.mark.parametrize(("call", "error", "text"), [
    (lambda: infidelity(summed, X, ATTRIBUTIONS_5), ValueError,
     f"attributions have shape {tuple(ATTRIBUTIONS_5.shape)} but the inputs {tuple(X.shape)}: "
     f"pass attributions of the inputs' shape or {(X.shape[0], *X.shape[2:])} (a map), at the "
     "inputs' resolution (Explanation.attributions, or Explanation.maps)"),
    (lambda: infidelity(summed, NAN_INPUTS, X), ValueError,
     "images 0, 1: the inputs hold NaN or infinite values, so the metric would be NaN. Check "
     "them, or replace them (torch.nan_to_num)"),
    (lambda: infidelity(summed, X, X, target=0), ValueError,
     "forward returns one score per input, (B,): target= chooses a column of (B, num_classes) "
     "scores; leave it out"),
    (lambda: infidelity(summed, X, X, perturb=5), TypeError,
     "perturb must be a function (inputs, generator) -> (perturbation, perturbed_inputs), not "
     "a int"),
    (lambda: max_sensitivity(summed, X, perturb=5), TypeError,
     "perturb must be a function (inputs, generator) -> perturbed_inputs, not a int"),
    (lambda: max_sensitivity(gradcam_explanation, X, samples=1), TypeError,
     "explain must return a tensor (B, ...), not a Explanation (return its .maps or "
     ".attributions)"),
], ids=["attributions shape", "nan inputs", "target for (B,)", "infidelity perturb",
        "sensitivity perturb", "explanation returned"])
def test_robustness_arguments(call, error, text):
    with pytest.raises(error) as exc:
        call()
    assert message(exc) == text


def test_max_sensitivity_of_zero_explanations():
    with pytest.warns(UserWarning) as record:
        max_sensitivity(lambda x: torch.zeros(x.shape[0], 3), X, samples=1)
    assert [str(w.message) for w in record] == [
        "the explanation of images 0, 1 is zero: max-sensitivity there is the absolute change "
        "||Phi(y) - Phi(x)|| (Captum divides by 1 where ||Phi(x)|| = 0)"
    ]
