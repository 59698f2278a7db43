"""Occlusion's incremental inference (heatlens/methods/incremental.py) gives the attributions of
full passes, on real networks and on small ones built to stress the receptive-field arithmetic
(odd sizes, dilation, "same" padding, ceil-mode pooling, windows cut at the border), and falls
back to full passes where a crop cannot be exact (a global mean inside ``forward``, batch
statistics before the cut in training mode)."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import heatlens
from heatlens.methods.incremental import plan_cut
from heatlens.methods.perturbation import Occlusion


def both_ways(model: nn.Module, x: Tensor, **options) -> tuple[heatlens.Explanation, Tensor]:
    fast = heatlens.explain(model, x, "occlusion", target=[0] * x.shape[0], **options)
    full = heatlens.explain(model, x, "occlusion", target=[0] * x.shape[0], incremental=False,
                            **options)
    assert full.details["incremental_cut"] is None
    return fast, full.raw


def relative_diff(a: Tensor, b: Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


class Stack(nn.Module):
    """A plain CNN as a sequence, the cut candidates being its children."""

    def __init__(self, *, global_mean: bool = False) -> None:
        super().__init__()
        self.global_mean = global_mean
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 5, stride=2, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(3, stride=2, padding=1, ceil_mode=True),
            nn.Conv2d(8, 8, 3, padding="same", dilation=2),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.AvgPool2d(2, ceil_mode=True),
            nn.Conv2d(8, 16, 3, stride=2),
            nn.ReLU(),
            nn.Conv2d(16, 16, 3, padding=1),
        )
        self.head = nn.Linear(16, 3)

    def forward(self, x: Tensor) -> Tensor:
        if self.global_mean:  # each image standardised inside forward: invisible to hooks
            x = x - x.mean(dim=(2, 3), keepdim=True)
        return self.head(F.adaptive_avg_pool2d(self.features(x), 1).flatten(1))


@pytest.fixture(scope="module")
def stack() -> nn.Module:
    torch.manual_seed(0)
    model = Stack().eval()
    with torch.no_grad():  # batch-norm statistics that are not the identity
        model.features[4].running_mean.uniform_(-0.5, 0.5)
        model.features[4].running_var.uniform_(0.5, 2)
    return model


@pytest.mark.parametrize(("size", "window", "stride"), [
    ((61, 47), (7, 5), (3, 4)),
    ((64, 64), 9, 9),
    ((50, 73), (11, 4), (6, 2)),
])
def test_small_cnn_equals_full_passes(stack, size, window, stride):
    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(1))
    fast, full = both_ways(stack, x, window=window, stride=stride)
    assert fast.details["incremental_cut"] is not None
    assert relative_diff(fast.raw, full) <= 1e-5


def test_plan_crops_cover_the_receptive_field(stack):
    """Windows at the border get crops that stay inside the image, start at multiples of the
    cut's stride, and are smaller than the image (the point of the exercise)."""
    x = torch.randn(1, 3, 61, 47)
    occlusion = Occlusion(stack, window=(7, 5), stride=(3, 4))
    plan = plan_cut(stack, x, occlusion.windows(x))
    assert plan is not None and plan.cost < 1
    for span, size in zip(plan.spans, x.shape[2:], strict=True):
        assert span.length < size
        assert bool((span.start % span.stride == 0).all())
        assert bool((span.start + span.length <= size).all())
        assert bool((span.lo <= span.hi).all())


def test_global_mean_in_forward_falls_back(stack):
    """A mean over the image taken in forward makes every crop wrong; the check on three
    windows notices, and the result is that of full passes."""
    model = Stack(global_mean=True).eval()
    model.load_state_dict(stack.state_dict())
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    occlusion = Occlusion(model, window=9, stride=9)
    assert plan_cut(model, x, occlusion.windows(x)) is not None  # hooks cannot see the mean
    fast, full = both_ways(model, x, window=9, stride=9)
    assert fast.details["incremental_cut"] is None
    assert relative_diff(fast.raw, full) == 0


def test_training_mode_gives_full_pass_results(stack):
    """Batch statistics after the cut see the same pasted maps as full passes; before it they
    would not (the check then falls back). Either way the result is that of full passes."""
    model = Stack().train()
    model.load_state_dict(stack.state_dict())
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the training-mode warning
        fast, full = both_ways(model, x, window=9, stride=9)
    assert relative_diff(fast.raw, full) <= 1e-5
    assert model.training


def test_channel_windows_use_full_passes(stack):
    x = torch.randn(1, 3, 32, 32)
    occlusion = Occlusion(stack, window=(1, 8, 8), stride=(1, 8, 8))
    assert plan_cut(stack, x, occlusion.windows(x)) is None


@pytest.mark.parametrize("fixture", ["mobilenet_v2_imagenet", "resnet18_seeded"])
def test_real_networks_equal_full_passes(request, imagenet_photos, fixture):
    model = request.getfixturevalue(fixture)
    x = imagenet_photos[:2]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fast, full = both_ways(model, x, window=40, stride=24)
    assert fast.details["incremental_cut"] is not None
    assert relative_diff(fast.raw, full) <= 1e-4
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any(m._forward_hooks for m in model.modules())


class RowMixer(nn.Module):
    """A 1-D convolution along the flattened positions (as some attention blocks do), inside a
    2-D network: its receptive field is not a 2-D window."""

    def __init__(self) -> None:
        super().__init__()
        self.mix = nn.Conv1d(8, 8, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.mix(x.flatten(2)).reshape(x.shape)


def test_one_dimensional_convolution_inside_is_handled(stack):
    """Planning stops at a layer whose receptive field it does not work out (no error), and the
    attributions are those of full passes."""
    torch.manual_seed(4)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(), RowMixer(),
                          nn.Conv2d(8, 8, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(8, 2)).eval()
    x = torch.randn(1, 3, 48, 48, generator=torch.Generator().manual_seed(5))
    fast, full = both_ways(model, x, window=8, stride=8)
    assert fast.details["incremental_cut"] in (None, "0", "1")  # never after the 1-D mixer
    assert relative_diff(fast.raw, full) <= 1e-4  # float rounding of crops vs whole images
