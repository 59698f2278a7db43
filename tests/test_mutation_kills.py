"""Tests written to kill the mutants that survived ``tools/mutation.py`` (issue 16, "Tests that
catch wrong math"; scores and the equivalent mutants are in ``docs/testing.md``).

Each test checks a formula written out independently here (in NumPy or float64 loops) or an
exact property, on tiny tensors, so the whole file runs in a few seconds.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from torch import Tensor, nn

import heatlens
from heatlens.engine.capture import forward_with_capture
from heatlens.engine.maps import constant_maps, gaussian_blur, minmax, upsample
from heatlens.engine.tokens import TokenLayout
from heatlens.methods.rollout import AttentionRollout, Chefer, GradientRollout, class_row

# --- heatlens/engine/maps.py ------------------------------------------------------------------


def blur_reference(x: np.ndarray, sigma: float) -> np.ndarray:
    """A separable Gaussian blur of every spatial axis of ``(B, C, *spatial)``, written out:
    kernel ``exp(-k^2 / (2 sigma^2))`` for ``|k| <= max(1, ceil(3 sigma))``, normalised to sum 1,
    edges replicated."""
    radius = max(1, math.ceil(3 * sigma))
    offsets = np.arange(-radius, radius + 1)
    kernel = np.exp(-(offsets**2) / (2 * sigma**2))
    kernel /= kernel.sum()
    out = x.astype(np.float64)
    for axis in range(2, x.ndim):
        pad = [(0, 0)] * x.ndim
        pad[axis] = (radius, radius)
        padded = np.pad(out, pad, mode="edge")
        out = sum(w * np.take(padded, np.arange(i, i + x.shape[axis]), axis=axis)
                  for i, w in enumerate(kernel))
    return out


@pytest.mark.parametrize("sigma", [0.33, 0.7, 1.6])
@pytest.mark.parametrize("shape", [(2, 3, 9), (1, 2, 7, 6)])
def test_gaussian_blur_matches_the_kernel_written_out_in_float64(shape, sigma):
    """Small sigmas matter: at 0.33 the radius is 1 (``ceil(3 sigma)``), at 0.7 it is 3; float64
    in, float64 out, to round-off."""
    x = torch.rand(shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    out = gaussian_blur(x, sigma)
    assert out.dtype == torch.float64
    np.testing.assert_allclose(out.numpy(), blur_reference(x.numpy(), sigma), rtol=0, atol=1e-13)


def test_gaussian_blur_of_sigma_zero_is_the_input():
    x = torch.rand(1, 2, 5, 5, generator=torch.Generator().manual_seed(1))
    assert torch.equal(gaussian_blur(x, 0.0), x)


def test_upsample_to_the_size_the_maps_have_keeps_them_exactly():
    """No resampling and no cast to float32 when the maps are already at ``size``."""
    maps = 1 + torch.rand(2, 4, 3, generator=torch.Generator().manual_seed(2),
                          dtype=torch.float64) * 1e-9
    out = upsample(maps, (4, 3))
    assert out.dtype == torch.float64
    assert torch.equal(out, maps)


def linear_resize_reference(values: np.ndarray, size: int, align_corners: bool) -> np.ndarray:
    """Linear interpolation of the last axis written out: output position ``i`` reads input
    position ``i (n - 1) / (size - 1)`` (corners aligned) or ``(i + 0.5) n / size - 0.5``
    (pixel centres aligned, clamped at 0), between the two neighbouring samples."""
    n = values.shape[-1]
    i = np.arange(size, dtype=np.float64)
    where = i * (n - 1) / (size - 1) if align_corners else np.maximum((i + 0.5) * n / size - 0.5, 0)
    low = np.minimum(np.floor(where).astype(int), n - 1)
    high = np.minimum(low + 1, n - 1)
    frac = where - low
    return values[..., low] * (1 - frac) + values[..., high] * frac


@pytest.mark.parametrize("align_corners", [False, True])
def test_upsample_is_linear_interpolation_with_the_corners_asked_for(align_corners):
    """Score-CAM upsamples with ``align_corners=True``; the default aligns pixel centres."""
    maps = torch.rand(2, 3, 4, generator=torch.Generator().manual_seed(3))
    out = upsample(maps, (3, 11), align_corners=align_corners)
    rows = linear_resize_reference(maps.double().numpy(), 11, align_corners)
    np.testing.assert_allclose(out.numpy(), rows, rtol=0, atol=1e-6)
    out_2d = upsample(maps, (7, 11), align_corners=align_corners)
    cols = linear_resize_reference(np.swapaxes(rows, 1, 2), 7, align_corners)
    np.testing.assert_allclose(out_2d.numpy(), np.swapaxes(cols, 1, 2), rtol=0, atol=1e-6)


def test_upsample_names_the_spatial_rank_it_cannot_handle():
    with pytest.raises(ValueError, match="with 4 spatial dimensions"):
        upsample(torch.zeros(1, 2, 2, 2, 2), (3, 3, 3, 3))


def test_constant_maps_judges_each_map_of_a_batch_on_its_own():
    """A constant map next to a varying one is still constant, and a span of 0.5 is a place, not
    rounding, also next to a map of a million: each map's own span and magnitude count."""
    maps = torch.tensor([[5.0, 5.0, 5.0], [0.0, 1e6, 3e5], [0.0, 0.5, 0.25]])
    assert constant_maps(maps).tolist() == [True, False, False]
    scaled = minmax(maps)
    assert torch.equal(scaled[0], torch.zeros(3))
    assert torch.allclose(scaled[1:], torch.tensor([[0.0, 1.0, 0.3], [0.0, 1.0, 0.5]]))


def test_the_eps_given_decides_what_is_constant():
    """All zeros are constant even with ``eps=0`` (span 0 <= 0); with ``eps=1`` a span of 0.5
    is within it, so ``minmax`` gives zeros, not the map scaled."""
    zeros = torch.zeros(1, 4)
    assert constant_maps(zeros, eps=0.0).tolist() == [True]
    assert torch.equal(minmax(zeros, eps=0.0), zeros)
    small = torch.tensor([[0.0, 0.5, 0.25]])
    assert constant_maps(small, eps=1.0).tolist() == [True]
    assert torch.equal(minmax(small, eps=1.0), torch.zeros(1, 3))


# --- heatlens/methods/cam.py ------------------------------------------------------------------


class TwoHeads(nn.Module):
    """conv -> ReLU -> global average pooling -> ``fc``; ``other``, ``narrow`` and ``few``
    (never run) are linear layers that CAM may be told to use with ``fc=``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(6, 4)
        self.other = nn.Linear(6, 4)
        self.narrow = nn.Linear(5, 4)
        self.few = nn.Linear(6, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.relu(self.conv(x)).mean(dim=(2, 3)))


@pytest.fixture(scope="module")
def two_heads() -> tuple[nn.Module, Tensor]:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return TwoHeads().eval(), torch.randn(2, 3, 6, 5)


def test_cam_uses_the_linear_layer_named_by_fc(two_heads):
    """``M_c = sum_k w^c_k A^k`` with ``w`` the rows of the layer given, not of the head found."""
    model, x = two_heads
    activations = model.relu(model.conv(x)).double()
    for name in ("fc", "other"):
        weights = getattr(model, name).weight.detach().double()[[1, 3]]
        expected = torch.einsum("bk,bkhw->bhw", weights, activations)
        ours = heatlens.explain(model, x, method="cam", layer="relu", target=[1, 3], fc=name)
        torch.testing.assert_close(ours.raw.double(), expected, rtol=1e-5, atol=1e-6)


def test_cam_with_a_linear_layer_of_the_wrong_width_says_so(two_heads):
    model, x = two_heads
    with pytest.raises(ValueError, match="pooled 6 channels .* takes 5 features"):
        heatlens.explain(model, x, method="cam", layer="relu", target=[1, 3], fc="narrow")


def test_cam_refuses_classes_the_linear_layer_named_by_fc_does_not_have(two_heads):
    """The model has 4 classes, the layer given only 2: class 2 has no row in it."""
    model, x = two_heads
    with pytest.raises(ValueError, match=r"class indices in 0\.\.1 "):
        heatlens.explain(model, x, method="cam", layer="relu", target=[1, 2], fc="few")


def test_cam_at_a_layer_without_a_pooling_linear_head_names_the_layer(two_heads):
    """Before the ReLU the pooled activations do not give the model's output through ``fc``."""
    model, x = two_heads
    with pytest.raises(ValueError, match="global average of layer 'conv'"):
        heatlens.explain(model, x, method="cam", layer="conv", target=[1, 3])


class DeepHead(nn.Module):
    """conv -> ReLU -> global average pooling -> ``classifier`` of two linear layers."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.relu = nn.ReLU()
        self.classifier = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4))

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.relu(self.conv(x)).mean(dim=(2, 3)))


def test_cam_refuses_a_head_of_several_layers_and_names_it(two_heads):
    _, x = two_heads
    with pytest.raises(ValueError, match="head is Sequential with more than one layer"):
        heatlens.explain(DeepHead().eval(), x, method="cam", layer="relu", target=[1, 3])


def test_cam_constructed_without_a_layer_explains_the_automatic_one(two_heads):
    """``layer="auto"`` is the constructor's default, as it is ``heatlens.explain``'s."""
    model, x = two_heads
    ours = heatlens.CAM(model)(x, target=[1, 3])
    auto = heatlens.explain(model, x, method="cam", layer="auto", target=[1, 3])
    assert ours.layers == auto.layers
    assert torch.equal(ours.raw, auto.raw)


def test_cam_refuses_an_fc_that_is_not_linear(two_heads):
    model, _ = two_heads
    with pytest.raises(TypeError, match="not a Conv2d"):
        heatlens.CAM(model, "relu", fc="conv")


class Scaled(nn.Module):
    """``inner``'s output times ``scale``: the gradients are scaled by it too."""

    def __init__(self, inner: nn.Module, scale: float) -> None:
        super().__init__()
        self.inner, self.scale = inner, scale

    def forward(self, x: Tensor) -> Tensor:
        return self.inner(x) * self.scale


@pytest.mark.filterwarnings("ignore:the map of images")
def test_gradcampp_with_tiny_gradients_matches_its_formula_in_float64(two_heads):
    """Grad-CAM++ (Eq. 19): ``a = G^2 / (2 G^2 + sum A G^3)``, ``w_k = sum a relu(G)``, with
    gradients near 1e-17: their squares are normal float32 numbers, their cubes are not, so the
    ratio must be formed from the powers 2 and 3 (higher powers underflow to 0)."""
    model, x = two_heads
    scale = 1e-15
    activations = model.relu(model.conv(x)).detach().double().requires_grad_(True)
    fc = copy.deepcopy(model.fc).double()
    scores = scale * fc(activations.mean(dim=(2, 3)))[[0, 1], [1, 3]]
    (g,) = torch.autograd.grad(scores.sum(), activations)
    a = activations.detach()
    alpha = g**2 / (2 * g**2 + a.sum(dim=(2, 3), keepdim=True) * g**3)
    weights = (alpha * g.clamp_min(0)).sum(dim=(2, 3))
    expected = torch.einsum("bk,bkhw->bhw", weights, a)
    ours = heatlens.explain(Scaled(model, scale).eval(), x, method="gradcam++",
                            layer="inner.relu", target=[1, 3])
    assert float((ours.raw.double() - expected).abs().max()) <= 1e-4 * float(expected.abs().max())


# --- heatlens/engine/capture.py ---------------------------------------------------------------


class LateBranch(nn.Module):
    """``late`` runs after the output is computed, so the score has no graph through it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.late = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        out = self.fc(self.conv(x).mean(dim=(2, 3)))
        self.late(x)
        return out


def test_a_layer_run_after_the_output_is_named_in_the_error():
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(ValueError, match=r"does not depend on layer\(s\) \['late'\]"):
        heatlens.explain(LateBranch().eval(), x, method="gradcam", layer="late", target=0)


def test_the_network_before_the_captured_layer_builds_no_graph(two_heads):
    """By default (``input_gradients=False``) the activation is a leaf that requires gradients
    and the input takes no part in the graph (``forward_with_capture``'s docstring)."""
    model, x = two_heads
    captured = forward_with_capture(model, x, {"relu": model.relu}, with_gradients=True)
    activation = captured.activations["relu"]
    assert activation.requires_grad and activation.is_leaf
    assert not captured.inputs.requires_grad
    assert captured.output.requires_grad


class Pair(nn.Module):
    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return x, -x


class PairNet(nn.Module):
    """A layer (``pair``) whose output is a tuple, not a feature map."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.pair = Pair()
        self.fc = nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        a, b = self.pair(self.conv(x))
        return self.fc((a - b).mean(dim=(2, 3)))


def test_a_layer_that_returns_a_tuple_is_named_with_its_types():
    with pytest.raises(TypeError, match=r"layer 'pair' \(Pair\) returns tuple, not a tensor"):
        heatlens.explain(PairNet().eval(), torch.randn(1, 3, 8, 8), layer="pair", target=0)


def test_a_layer_that_never_runs_is_named(two_heads):
    """``other`` is a layer of the model that ``forward`` never calls."""
    model, x = two_heads
    with pytest.raises(RuntimeError, match=r"layer\(s\) \['other'\] did not run"):
        forward_with_capture(model, x, {"other": model.other}, with_gradients=False)


class Twice(nn.Module):
    """``conv`` runs twice: followed by a functional ReLU the first time, by nothing the last."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(torch.relu(self.conv(x))).mean(dim=(2, 3))


def test_a_layer_called_twice_is_recorded_at_its_last_call_without_the_first_follower():
    model = Twice().eval()
    x = torch.randn(2, 3, 5, 5, generator=torch.Generator().manual_seed(4))
    captured = forward_with_capture(model, x, {"conv": model.conv}, with_gradients=False)
    with torch.no_grad():
        last = model.conv(torch.relu(model.conv(x)))
    assert captured.followers == {}
    torch.testing.assert_close(captured.activations["conv"], last)
    assert float(last.min()) < 0  # not a ReLU's output


class Probe(nn.Module):
    """``probe`` (an identity) reads ``conv``'s output for nothing; then a functional ReLU
    follows ``conv``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.probe = nn.Identity()
        self.fc = nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv(x)
        self.probe(h)
        return self.fc(torch.relu(h).mean(dim=(2, 3)))


def test_capturing_another_layer_does_not_change_what_follows_a_layer():
    """heatlens' own operations in the probe's hook are not reads of ``conv``'s output, so the
    ReLU is ``conv``'s follower whether the probe is captured or not."""
    model = Probe().eval()
    x = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(5))
    alone = forward_with_capture(model, x, {"conv": model.conv}, with_gradients=False)
    both = forward_with_capture(model, x, {"conv": model.conv, "probe": model.probe},
                                with_gradients=False)
    assert set(both.followers) == set(alone.followers) == {"conv"}
    assert torch.equal(both.activations["conv"], alone.activations["conv"])
    assert float(alone.activations["conv"].min()) == 0.0  # the ReLU's output


# --- heatlens/methods/rollout.py --------------------------------------------------------------


def discard_reference(fused: Tensor, ratio: float, prefix: int) -> Tensor:
    """Per image, the ``int(N^2 ratio)`` lowest entries outside the prefix columns set to 0."""
    out = fused.clone()
    n = fused.shape[-1]
    count = min(int(n * n * ratio), n * (n - prefix))
    for b in range(fused.shape[0]):
        entries = sorted((float(fused[b, i, j]), i, j) for i in range(n) for j in range(prefix, n))
        for _, i, j in entries[:count]:
            out[b, i, j] = 0
    return out


def rollout_reference(fused: list[Tensor]) -> Tensor:
    """``R = Ā_L ... Ā_1`` with ``Ā = (A + I) / 2``, rows normalised, one image at a time."""
    n = fused[0].shape[-1]
    out = []
    for b in range(fused[0].shape[0]):
        result = torch.eye(n, dtype=torch.float64)
        for a in fused:
            step = (a[b] + torch.eye(n, dtype=torch.float64)) / 2
            step = step / step.sum(dim=1, keepdim=True)
            result = step @ result
        out.append(result)
    return torch.stack(out)


@pytest.fixture(scope="module")
def attention_stack() -> tuple[list[Tensor], list[Tensor]]:
    """Three layers of softmax attention ``(2, 3 heads, 7, 7)`` and signed gradients."""
    g = torch.Generator().manual_seed(11)
    attentions = [torch.randn(2, 3, 7, 7, generator=g, dtype=torch.float64).softmax(-1)
                  for _ in range(3)]
    gradients = [torch.randn(2, 3, 7, 7, generator=g, dtype=torch.float64) for _ in range(3)]
    return attentions, gradients


FUSE = {"mean": lambda a: a.mean(dim=1), "max": lambda a: a.amax(dim=1),
        "min": lambda a: a.amin(dim=1)}


@pytest.mark.parametrize("prefix", [1, 2])
@pytest.mark.parametrize("ratio", [0.0, 0.3])
@pytest.mark.parametrize("fusion", ["mean", "max", "min"])
def test_rollout_relevance_is_the_product_written_out(attention_stack, fusion, ratio, prefix):
    attentions, gradients = attention_stack
    layout = TokenLayout("tokens", prefix, (1, 7 - prefix))
    plain = AttentionRollout(nn.Identity(), head_fusion=fusion, discard_ratio=ratio)
    expected = rollout_reference([discard_reference(FUSE[fusion](a), ratio, prefix)
                                  for a in attentions])
    torch.testing.assert_close(plain.relevance(attentions, None, layout), expected)
    weighted = GradientRollout(nn.Identity(), head_fusion=fusion, discard_ratio=ratio)
    expected = rollout_reference([discard_reference(FUSE[fusion](a * g).clamp_min(0), ratio,
                                                    prefix)
                                  for a, g in zip(attentions, gradients, strict=True)])
    torch.testing.assert_close(weighted.relevance(attentions, gradients, layout), expected)


@pytest.mark.parametrize("depth", [1, 3])
def test_chefer_relevance_is_the_sum_written_out(attention_stack, depth):
    """``R_0 = I``, ``R_l = R_{l-1} + mean_h((G_l A_l)^+) R_{l-1}``, one image at a time, for
    a transformer of one block and of three."""
    attentions, gradients = (stack[:depth] for stack in attention_stack)
    expected = []
    for b in range(2):
        result = torch.eye(7, dtype=torch.float64)
        for a, g in zip(attentions, gradients, strict=True):
            result = result + (g[b] * a[b]).clamp_min(0).mean(dim=0) @ result
        expected.append(result)
    ours = Chefer(nn.Identity()).relevance(attentions, gradients, TokenLayout("tokens", 1, (2, 3)))
    torch.testing.assert_close(ours, torch.stack(expected))


def test_class_row_reads_the_class_token_or_averages_the_patch_rows():
    relevance = torch.arange(2 * 5 * 5, dtype=torch.float64).reshape(2, 5, 5)
    with_class = class_row(relevance, TokenLayout("tokens", 1, (2, 2)))
    torch.testing.assert_close(with_class, relevance[:, 0, 1:].reshape(2, 2, 2))
    without = class_row(relevance[:, 1:, 1:], TokenLayout("tokens", 0, (2, 2)))
    torch.testing.assert_close(without, relevance[:, 1:, 1:].mean(dim=1).reshape(2, 2, 2))
