"""Tests written to kill the mutants of the perturbation modules that survived
``tools/mutation.py`` (issue 16; scores and equivalent mutants in ``docs/testing.md``):
``heatlens/methods/perturbation.py`` (occlusion, RISE), ``heatlens/metrics/perturbed.py`` (the
engine of the perturbation metrics) and ``heatlens/metrics/controls.py`` (the control maps).

Each expected value is computed here independently, in float64 loops or NumPy, on tiny tensors
and tiny models, so the file runs in a few seconds:

1. Occlusion: the mean score drop over the windows covering each element, windows placed at
   multiples of the stride and cut at the border, over any of ``(C, *spatial)``, with full
   passes and on crops; crops that are wrong at a checked window, or fail, mean full passes.
2. RISE (Petsiuk et al., Eq. 6): ``1/(N p) sum_i s_c(x * M_i) M_i`` with the masks drawn and
   linearly upsampled (pixel centres aligned) in NumPy, in one, two and three spatial
   dimensions.
3. ``perturbed_scores``: softmax probability or score of each copy, chunk by chunk.
4. The control maps: the Gaussian bump, uniform noise and Sobel magnitude written out.

Around them: the settings' checks and defaults, the progress count and the chunk floor of one
perturbation under a tiny memory budget.
"""

from __future__ import annotations

import itertools
import math
import re

import numpy as np
import pytest
import torch
from torch import Tensor, nn

import heatlens
from heatlens.engine.budget import watched
from heatlens.engine.targets import ClassLogit
from heatlens.methods import perturbation
from heatlens.methods.perturbation import RISE, Occlusion
from heatlens.metrics.controls import centred_gaussian, edge_map, image_size, random_map
from heatlens.metrics.perturbed import perturbed_scores


def filled(model: nn.Module, seed: int) -> nn.Module:
    """``model`` in float64 with every parameter drawn from ``N(0, 0.5^2)`` by a seeded
    generator (the global random state is left alone), in eval mode."""
    generator = torch.Generator().manual_seed(seed)
    model = model.double().eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(0.5 * torch.randn(parameter.shape, generator=generator,
                                              dtype=torch.float64))
    return model


class TinyCNN(nn.Module):
    """A small nonlinear CNN over ``(B, C, *spatial)`` with 1, 2 or 3 spatial dimensions: a
    convolution, tanh, and a linear head on the flattened features (so the score depends on
    where things are)."""

    def __init__(self, channels: int, spatial: tuple[int, ...], classes: int = 3) -> None:
        super().__init__()
        conv = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[len(spatial) - 1]
        self.conv = conv(channels, 2, 3, padding=1)
        self.head = nn.Linear(2 * math.prod(spatial), classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(self.conv(x)).flatten(1))


def rand(*shape: int, seed: int) -> Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def assert_relatively_close(actual: Tensor, expected: np.ndarray, tol: float) -> None:
    actual = actual.detach().double().numpy()
    scale = max(float(np.abs(expected).max()), 1e-30)
    assert actual.shape == expected.shape
    assert float(np.abs(actual - expected).max()) <= tol * scale, \
        float(np.abs(actual - expected).max()) / scale


# --- 1. Occlusion ------------------------------------------------------------------------------


def window_starts(size: int, window: int, stride: int) -> list[int]:
    """Windows start at 0, stride, 2 stride, ... until one reaches the last element."""
    starts = [0]
    while starts[-1] + window < size:
        starts.append(starts[-1] + stride)
    return starts


def occlusion_reference(model: nn.Module, x: Tensor, classes: list[int],
                        window: tuple[int, ...], stride: tuple[int, ...],
                        baseline: float) -> np.ndarray:
    """Occlusion over ``(C, *spatial)`` written out: for every window (one start per dimension),
    the elements it covers are set to ``baseline`` and each covered element collects the drop of
    the class's logit; the result is the mean drop over the windows covering each element."""
    shape = tuple(x.shape[1:])
    total = np.zeros(x.shape, dtype=np.float64)
    count = np.zeros(shape, dtype=np.float64)
    per_dim = [window_starts(n, w, s) for n, w, s in zip(shape, window, stride, strict=True)]
    with torch.no_grad():
        clean = model(x).double()
        for starts in itertools.product(*per_dim):
            region = tuple(slice(a, a + w) for a, w in zip(starts, window, strict=True))
            count[region] += 1
            for b, c in enumerate(classes):
                occluded = x[b : b + 1].clone()
                occluded[(0, *region)] = baseline
                drop = float(clean[b, c]) - float(model(occluded)[0, c])
                total[(b, *region)] += drop
    assert count.min() >= 1  # every element covered
    return total / count


@pytest.mark.parametrize(("shape", "window", "stride"), [
    ((2, 7, 6), (3, 4), (3, 3)),  # windows cut at the border in both dimensions
    ((2, 7, 6), (2, 3, 4), (1, 2, 2)),  # a window over channels and spatial dimensions
    ((2, 6, 5), (6, 2), (8, 1)),  # the whole height at once: a stride above it is fine
    ((3, 9), 4, 3),  # one spatial dimension, an int for it
])
@pytest.mark.parametrize("incremental", [False, True])
def test_occlusion_equals_the_mean_drop_written_out(shape, window, stride, incremental):
    """Kills a wrong window placement (``ceil`` of the count, the ``+ 1``, the start
    multiplier), windows one element short or long, channel windows ignored, a wrong mean
    (``covered``), the baseline ignored and chunks that skip or repeat windows (the tiny memory
    budget makes chunks of a few windows)."""
    spatial = shape[1:]
    model = filled(TinyCNN(shape[0], spatial), seed=3)
    x = rand(2, *shape, seed=4)
    classes = [2, 0]
    dims = len(shape)
    full_window = (window,) * (dims - 1) if isinstance(window, int) else window
    full_stride = (stride,) * (dims - 1) if isinstance(stride, int) else stride
    if len(full_window) == dims - 1:
        full_window, full_stride = (shape[0], *full_window), (shape[0], *full_stride)
    expected = occlusion_reference(model, x, classes, full_window, full_stride, baseline=0.3)
    result = heatlens.explain(model, x, "occlusion", target=classes, window=window,
                              stride=stride, baseline=0.3, incremental=incremental,
                              memory_budget=2**13)
    assert result.raw.dtype == torch.float64
    assert_relatively_close(result.raw, expected, 1e-5)


def test_occlusion_keeps_a_half_precision_input_in_its_dtype():
    """bfloat16 in, bfloat16 out (the mean is taken in the input's dtype), near the mean drops
    written out in float64 for the same rounded weights and input."""
    model = filled(TinyCNN(2, (6, 5)), seed=16).bfloat16().double()
    x = rand(1, 2, 6, 5, seed=17).bfloat16().double()
    expected = occlusion_reference(model, x, [1], (2, 2, 2), (2, 2, 2), baseline=0.0)
    result = heatlens.explain(model.bfloat16(), x.bfloat16(), "occlusion", target=1, window=2,
                              stride=2, incremental=False)
    assert result.raw.dtype == torch.bfloat16
    assert_relatively_close(result.raw, expected, 0.05)


def test_occlusion_windows_mark_the_covered_elements():
    """``windows`` gives, per dimension of ``(C, *spatial)``, one row per position marking
    ``[start, start + window)`` cut at the border."""
    x = torch.zeros(1, 2, 7, 6)
    rows = Occlusion(nn.Identity(), window=(3, 4), stride=(3, 3)).windows(x)
    assert len(rows) == 3
    for row, size, w, s in zip(rows, (2, 7, 6), (2, 3, 4), (2, 3, 3), strict=True):
        expected = np.array([[a <= i < a + w for i in range(size)]
                             for a in window_starts(size, w, s)])
        assert row.dtype == torch.bool
        np.testing.assert_array_equal(row.numpy(), expected)


@pytest.mark.parametrize(("options", "message"), [
    ({"window": (3, 2, 2, 2)}, r"window must be positive sizes for the 2 spatial dimensions .*"
                               r"got \(3, 2, 2, 2\)"),
    ({"window": (3,)}, r"window must be positive sizes for the 2 spatial dimensions .*got \(3,\)"),
    ({"window": (0, 2)}, r"window must be positive sizes .*got \(2, 0, 2\)"),
    ({"stride": (2, 0)}, r"stride must be positive sizes .*got \(2, 2, 0\)"),
    ({"window": (8, 2)}, r"window \(2, 8, 2\) is larger than the input \(2, 7, 6\)"),
    ({"window": (3, 2), "stride": (4, 1)},
     r"stride \(2, 4, 1\) is larger than the window \(2, 3, 2\): elements between windows "
     r"would never be occluded"),
])
def test_occlusion_refuses_bad_windows_with_the_values_in_the_message(options, message):
    x = torch.zeros(1, 2, 7, 6)
    with pytest.raises(ValueError, match=message):
        Occlusion(nn.Identity(), **options).windows(x)


def test_occlusion_accepts_the_limits():
    """A window of the whole input and a window or stride of 1 are valid."""
    x = torch.zeros(1, 2, 7, 6)
    rows = Occlusion(nn.Identity(), window=(7, 6), stride=(9, 9)).windows(x)
    assert [r.shape[0] for r in rows] == [1, 1, 1]
    rows = Occlusion(nn.Identity(), window=1, stride=1).windows(x)
    assert [r.shape[0] for r in rows] == [1, 7, 6]


def test_incremental_occlusion_reports_its_cut_and_full_passes_none():
    """On a CNN whose first layers can run on crops the cut is named; ``incremental=False``
    names none; both give the mean drops written out."""
    model = filled(nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(),
                                 nn.Conv2d(3, 3, 3, padding=1), nn.Tanh(), nn.Flatten(),
                                 nn.Linear(3 * 16 * 14, 3)), seed=5)
    x = rand(2, 2, 16, 14, seed=6)
    expected = occlusion_reference(model, x, [1, 2], (2, 5, 4), (2, 4, 3), baseline=0.3)
    fast = heatlens.explain(model, x, "occlusion", target=[1, 2], window=(5, 4), stride=(4, 3),
                            baseline=0.3)
    full = heatlens.explain(model, x, "occlusion", target=[1, 2], window=(5, 4), stride=(4, 3),
                            baseline=0.3, incremental=False)
    assert fast.details["incremental_cut"] is not None
    assert full.details["incremental_cut"] is None
    assert_relatively_close(fast.raw, expected, 1e-5)
    assert_relatively_close(full.raw, expected, 1e-5)


class SizeChecked(nn.Module):
    """A CNN whose ``forward`` refuses batches of images of another size than ``size`` (as a
    model with a shape check does); a single image of any size passes."""

    def __init__(self, size: tuple[int, int]) -> None:
        super().__init__()
        self.size = size
        self.features = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(),
                                      nn.Conv2d(3, 3, 3, padding=1), nn.Tanh())
        self.head = nn.Linear(3, 3)

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[0] > 1 and tuple(x.shape[2:]) != self.size:
            raise RuntimeError(f"expects images of {self.size}")
        return self.head(self.features(x).mean(dim=(2, 3)))


def test_occlusion_falls_back_to_full_passes_when_crops_fail():
    """When the model raises on the batch of crops that checks the cut, occlusion uses full
    passes (no cut named) and still gives the mean drops written out."""
    model = filled(SizeChecked((16, 14)), seed=20)
    x = rand(2, 2, 16, 14, seed=21)
    expected = occlusion_reference(model, x, [0, 2], (2, 5, 4), (2, 4, 3), baseline=0.0)
    result = heatlens.explain(model, x, "occlusion", target=[0, 2], window=(5, 4),
                              stride=(4, 3))
    assert result.details["incremental_cut"] is None
    assert_relatively_close(result.raw, expected, 1e-5)


@pytest.mark.parametrize("wrong", ["first", "middle", "last"])
def test_crops_wrong_at_one_probed_window_mean_full_passes(monkeypatch, wrong):
    """The check before crops are used runs the first, middle and last window both ways: crops
    made wrong at exactly one of those windows (a logit off by one there, nowhere else) must
    send occlusion to full passes, so the result is still the mean drops written out. 20
    windows: positions 0, 10 and 19 are checked."""
    model = filled(nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(),
                                 nn.Conv2d(3, 3, 3, padding=1), nn.Tanh(), nn.Flatten(),
                                 nn.Linear(3 * 16 * 14, 3)), seed=5)
    x = rand(2, 2, 16, 14, seed=6)
    bad = {"first": 0, "middle": 10, "last": 19}[wrong]
    exact = perturbation.cropped_outputs

    def faulty(*args: object) -> Tensor:
        output = exact(*args).clone()
        positions = args[5].tolist()
        for b in range(x.shape[0]):
            for k, position in enumerate(positions):
                if position == bad:
                    output[b * len(positions) + k] += 1.0
        return output

    monkeypatch.setattr(perturbation, "cropped_outputs", faulty)
    expected = occlusion_reference(model, x, [1, 2], (2, 5, 4), (2, 4, 3), baseline=0.0)
    result = heatlens.explain(model, x, "occlusion", target=[1, 2], window=(5, 4),
                              stride=(4, 3))
    assert result.details["incremental_cut"] is None
    assert_relatively_close(result.raw, expected, 1e-5)


class Recorder(nn.Module):
    """``inner`` that records the batch size of every call in ``sizes``."""

    def __init__(self, inner: nn.Module, sizes: list[int]) -> None:
        super().__init__()
        self.inner, self.sizes = inner, sizes

    def forward(self, x: Tensor) -> Tensor:
        self.sizes.append(x.shape[0])
        return self.inner(x)


@pytest.mark.parametrize(("name", "options", "passes"), [
    ("occlusion", {"window": 3, "stride": 3, "incremental": False}, 2 * 2),
    ("rise", {"masks": 3, "cells": 2}, 3),
])
def test_a_budget_below_one_input_runs_one_perturbation_per_pass(name, options, passes):
    """The chunk never holds more than the budget allows, and at least one perturbation: with a
    budget of one byte each pass after the clean one holds one perturbed copy per image."""
    sizes: list[int] = []
    model = Recorder(filled(TinyCNN(2, (6, 5)), seed=18), sizes).eval()
    heatlens.explain(model, rand(2, 2, 6, 5, seed=19), name, target=[0, 1], memory_budget=1,
                     **options)
    assert sizes[-passes:] == [2] * passes


# --- 2. RISE -----------------------------------------------------------------------------------


def linear_upsample(values: np.ndarray, size: int, axis: int) -> np.ndarray:
    """Linear resize of one axis with pixel centres aligned: output ``i`` reads input position
    ``max((i + 0.5) n / size - 0.5, 0)`` between its two neighbours (the last one repeated)."""
    n = values.shape[axis]
    where = np.maximum((np.arange(size) + 0.5) * n / size - 0.5, 0)
    low = np.floor(where).astype(int)
    high = np.minimum(low + 1, n - 1)
    frac = where - low
    shape = [1] * values.ndim
    shape[axis] = size
    frac = frac.reshape(shape)
    return np.take(values, low, axis=axis) * (1 - frac) + np.take(values, high, axis=axis) * frac


def rise_masks_reference(count: int, size: tuple[int, ...], cells: int, p: float, seed: int
                         ) -> np.ndarray:
    """RISE's masks as documented: mask ``i`` from a generator seeded with
    ``seed * 1_000_003 + i``, a grid of ``cells`` per dimension with ones where a uniform draw
    is below ``p``, then one shift per dimension in ``[0, cell)``, ``cell = ceil(size / cells)``;
    the grid upsampled (separably, linearly) to ``(cells + 1) cell`` and cropped at the shift."""
    cell = [math.ceil(s / cells) for s in size]
    masks = []
    for i in range(count):
        generator = torch.Generator().manual_seed(seed * 1_000_003 + i)
        grid = (torch.rand((cells,) * len(size), generator=generator) < p).double().numpy()
        shift = [int(torch.randint(0, c, (1,), generator=generator)) for c in cell]
        for axis, c in enumerate(cell):
            grid = linear_upsample(grid, (cells + 1) * c, axis)
        masks.append(grid[tuple(slice(a, a + n) for a, n in zip(shift, size, strict=True))])
    return np.stack(masks)


def rise_reference(model: nn.Module, x: Tensor, classes: list[int], masks: np.ndarray, p: float,
                   softmax: bool = True) -> np.ndarray:
    """Eq. 6: ``S_c = 1/(N p) sum_i s_c(x * M_i) M_i``, the same for every channel."""
    saliency = np.zeros((x.shape[0], *x.shape[2:]))
    with torch.no_grad():
        for b, c in enumerate(classes):
            for mask in masks:
                output = model(x[b : b + 1] * torch.from_numpy(mask))
                score = output.softmax(dim=1)[0, c] if softmax else output[0, c]
                saliency[b] += float(score) * mask
    saliency /= len(masks) * p
    return np.repeat(saliency[:, None], x.shape[1], axis=1)


@pytest.mark.parametrize(("shape", "cells", "p", "count", "budget"), [
    ((2, 11, 9), 3, 0.4, 10, 2**18),
    ((3, 13), 4, 0.7, 10, 2**15),  # one spatial dimension: linear upsampling
    ((1, 5, 4, 3), 2, 0.5, 5, 2**17),  # three: trilinear
    ((2, 5, 6), 1, 1.0, 3, 2**16),  # one cell, p = 1: every mask is all ones
])
def test_rise_equals_eq6_written_out(shape, cells, p, count, budget):
    """Kills a wrong grid size, threshold (``<=``), shift range, upsampled size, interpolation
    mode (the index into ``linear, bilinear, trilinear``), crop, normaliser ``N p``, mask order
    across chunks and the score (softmax probability). The budgets make chunks of a few masks
    (2 to 4 on the machine this was written on) with a shorter last one, so a last chunk of the
    wrong size shows."""
    model = filled(TinyCNN(shape[0], shape[1:]), seed=7)
    x = rand(2, *shape, seed=8)
    classes = [1, 2]
    masks = rise_masks_reference(count, shape[1:], cells, p, seed=11)
    explainer = RISE(model, masks=count, cells=cells, p=p, seed=11)
    drawn = explainer.random_masks(0, count, shape[1:], torch.device("cpu"))
    assert drawn.shape == masks.shape
    np.testing.assert_allclose(drawn.double().numpy(), masks, rtol=0, atol=1e-6)
    result = heatlens.explain(model, x, "rise", target=classes, masks=count, cells=cells, p=p,
                              seed=11, memory_budget=budget)
    assert result.raw.dtype == torch.float64
    assert_relatively_close(result.raw, rise_reference(model, x, classes, masks, p), 1e-5)


def test_rise_grid_keeps_a_cell_where_the_draw_is_below_p():
    """``P(one) = p`` exactly needs ``u < p`` with ``u`` on torch's grid of ``k / 2^24``: with
    ``p`` set to mask 0's first draw, that cell is 0 (a ``<=`` would make it 1). One cell and
    a single position make the mask that cell's value everywhere."""
    first = float(torch.rand(1, generator=torch.Generator().manual_seed(4 * 1_000_003)))
    rise = RISE(nn.Identity(), cells=1, p=first, seed=4)
    assert not rise.random_masks(0, 1, (3, 3), torch.device("cpu")).any()
    rise = RISE(nn.Identity(), cells=1, p=first + 2**-24, seed=4)
    assert rise.random_masks(0, 1, (3, 3), torch.device("cpu")).eq(1).all()


def test_rise_masks_depend_on_their_index_only():
    """Mask ``i`` is the same whichever chunk draws it; other seeds give other masks."""
    rise = RISE(nn.Identity(), cells=3, seed=2)
    cpu = torch.device("cpu")
    all_five = rise.random_masks(0, 5, (8, 7), cpu)
    assert torch.equal(rise.random_masks(3, 2, (8, 7), cpu), all_five[3:])
    assert not torch.equal(RISE(nn.Identity(), cells=3, seed=3).random_masks(0, 5, (8, 7), cpu),
                           all_five)


def test_rise_of_a_score_target_uses_the_score_not_a_probability():
    """For a target that is not a class (a callable), ``s_c`` is the target's own score."""
    model = filled(TinyCNN(2, (6, 5)), seed=9)
    x = rand(1, 2, 6, 5, seed=10)
    masks = rise_masks_reference(6, (6, 5), 2, 0.5, seed=0)
    result = heatlens.explain(model, x, "rise", target=lambda out: out[:, 1], masks=6, cells=2)
    assert_relatively_close(result.raw, rise_reference(model, x, [1], masks, 0.5, softmax=False),
                            1e-5)


def test_rise_map_is_a_copy_per_channel():
    """The channels hold equal values but are separate memory: writing one leaves the other."""
    model = filled(TinyCNN(2, (6, 5)), seed=9)
    raw = heatlens.explain(model, rand(1, 2, 6, 5, seed=10), "rise", target=0, masks=3,
                           cells=2).raw
    assert torch.equal(raw[:, 0], raw[:, 1])
    before = raw[:, 1].clone()
    raw[:, 0] += 1
    assert torch.equal(raw[:, 1], before)


@pytest.mark.parametrize(("options", "shown"), [
    ({"masks": 0}, "0, 7, 0.5"),
    ({"cells": 0}, "2000, 0, 0.5"),
    ({"p": 0.0}, "2000, 7, 0.0"),
    ({"p": 1.5}, "2000, 7, 1.5"),
])
def test_rise_refuses_bad_settings_showing_them(options, shown):
    with pytest.raises(ValueError, match=r"need masks >= 1, cells >= 1 and 0 < p <= 1; got "
                                         + re.escape(shown)):
        RISE(nn.Identity(), **options)


def test_rise_accepts_the_limits():
    rise = RISE(nn.Identity(), masks=1, cells=1, p=1.0)
    assert (rise.masks, rise.cells, rise.p) == (1, 1, 1.0)


def test_documented_defaults_and_options_reach_the_explainers():
    """The signatures' defaults (RISE: 2000 masks on a 7 x 7 grid, p = 1/2, seed 0; occlusion:
    16-element windows every 8, baseline 0), and ``layer=`` and the budget go to the base
    class: a layer is refused (these methods attribute to the input), the budget is kept."""
    rise, occlusion = RISE(nn.Identity()), Occlusion(nn.Identity())
    assert (rise.masks, rise.cells, rise.p, rise.seed) == (2000, 7, 0.5, 0)
    assert (occlusion.window, occlusion.stride, occlusion.baseline) == (16, 8, 0.0)
    assert occlusion.incremental is True
    for method in (RISE, Occlusion):
        assert method(nn.Identity(), memory_budget=12345, show_progress=False).memory_budget \
            == 12345
        with pytest.raises(ValueError, match="layer= does not apply"):
            method(nn.Identity(), layer="conv")


# --- 3. perturbed_scores -----------------------------------------------------------------------


@pytest.mark.parametrize("probability", [True, False])
def test_perturbed_scores_score_every_copy_once(probability):
    """Copy ``k`` is the sample scaled by ``k / 10``, scored for class ``k mod 3``; the scores
    are its softmax probability (or logit), whatever the chunking (a tiny budget)."""
    model = filled(TinyCNN(2, (4, 3)), seed=12)
    sample = rand(1, 2, 4, 3, seed=13)
    count = 11
    built = []

    def build(start: int, stop: int) -> tuple[Tensor, Tensor]:
        built.append((start, stop))
        k = torch.arange(start, stop)
        return sample * (k.double() / 10).reshape(-1, 1, 1, 1), k % 3

    scores = perturbed_scores(model, sample, count, build, ClassLogit(), memory_budget=2**14,
                              description="test", probability=probability)
    assert scores.dtype == torch.float32
    assert len(built) > 1 and built[0][0] == 0 and built[-1][1] == count
    assert max(b - a for a, b in built) > 1  # chunks of several copies
    assert all(a[1] == b[0] for a, b in itertools.pairwise(built))
    expected = []
    with torch.no_grad():
        for k in range(count):
            output = model(sample * (k / 10))[0]
            expected.append(float((output.softmax(0) if probability else output)[k % 3]))
    np.testing.assert_allclose(scores.numpy(), expected, rtol=1e-6, atol=1e-7)


def test_perturbed_scores_are_float32_whatever_the_default_dtype():
    model = filled(TinyCNN(2, (4, 3)), seed=12)
    sample = rand(1, 2, 4, 3, seed=13)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        scores = perturbed_scores(model, sample, 2, lambda a, b: (sample.expand(b - a, -1, -1, -1),
                                                                  torch.zeros(b - a).long()),
                                  ClassLogit(), memory_budget=2**20, description="test")
    finally:
        torch.set_default_dtype(previous)
    assert scores.dtype == torch.float32


def run_watched(name: str, show: bool) -> tuple[list[tuple[int, int, str]], int]:
    """The watcher's calls during one run of ``name`` and the number of model passes due."""
    model = filled(TinyCNN(2, (6, 5)), seed=14)
    x = rand(2, 2, 6, 5, seed=15)
    calls: list[tuple[int, int, str]] = []
    with watched(lambda done, total, description: calls.append((done, total, description))):
        if name == "occlusion":  # windows: 1 over channels x 2 over rows x 2 over columns
            heatlens.explain(model, x, name, target=[0, 1], window=(4, 3), stride=(2, 2),
                             incremental=False, memory_budget=2**12, show_progress=show)
            return calls, 4 * 2
        if name == "rise":
            heatlens.explain(model, x, name, target=[0, 1], masks=5, cells=2,
                             memory_budget=2**12, show_progress=show)
            return calls, 5 * 2
        perturbed_scores(model, x[:1], 7, lambda a, b: (x[:1].expand(b - a, -1, -1, -1),
                                                        torch.zeros(b - a).long()),
                         ClassLogit(), memory_budget=2**12, description=name, show_progress=show)
        return calls, 7


@pytest.mark.parametrize("name", ["occlusion", "rise", "perturbed copies"])
def test_progress_counts_every_model_pass_under_the_methods_name(name, capsys):
    """The watcher hears the running count of passes (images x windows, images x masks, or
    copies) up to the total, under the method's name; ``show_progress=True`` draws the bar
    on standard error even when it is not a terminal."""
    calls, total = run_watched(name, show=True)
    assert len(calls) > 1  # several chunks
    assert all(t == total and d == name for _, t, d in calls)
    done = [c[0] for c in calls]
    assert done == sorted(set(done)) and done[-1] == total
    assert name in capsys.readouterr().err
    run_watched(name, show=False)
    assert name not in capsys.readouterr().err


# --- 4. control maps ---------------------------------------------------------------------------


@pytest.mark.parametrize(("size", "sigma"), [((5, 8), 0.25), ((6, 3), 0.6)])
def test_centred_gaussian_written_out(size, sigma):
    height, width = size
    s = sigma * min(height, width)
    expected = np.array([[math.exp(-((i - (height - 1) / 2) ** 2 + (j - (width - 1) / 2) ** 2)
                                   / (2 * s * s)) for j in range(width)] for i in range(height)])
    maps = centred_gaussian(2, size, sigma)
    assert maps.shape == (2, height, width) and maps.dtype == torch.float32
    for b in range(2):
        np.testing.assert_allclose(maps[b].numpy(), expected, rtol=1e-6, atol=1e-7)
    maps[0, 0, 0] = -1  # a copy per image, not a view of one map
    assert float(maps[1, 0, 0]) == pytest.approx(expected[0, 0])


def test_centred_gaussian_default_sigma_is_a_quarter_of_the_shorter_side():
    np.testing.assert_array_equal(centred_gaussian(1, (7, 9)).numpy(),
                                  centred_gaussian(1, (7, 9), 0.25).numpy())


@pytest.mark.parametrize("sigma", [0.0, -0.1, float("nan")])
def test_centred_gaussian_refuses_a_bad_sigma(sigma):
    with pytest.raises(ValueError, match=rf"must be > 0, got {sigma}"):
        centred_gaussian(1, (4, 4), sigma)


def test_random_map_is_uniform_noise_from_the_generator():
    """The maps are the generator's next ``torch.rand(B, H, W)`` draws."""
    maps = random_map(3, (4, 5), torch.Generator().manual_seed(21))
    expected = torch.rand(3, 4, 5, generator=torch.Generator().manual_seed(21))
    assert torch.equal(maps, expected)
    assert maps.device == torch.device("cpu")
    assert random_map(2, (3, 2), device="cpu").shape == (2, 3, 2)


def test_random_map_is_made_on_the_device_asked_for():
    """Without a generator ``device=`` places the maps (the meta device exists on every
    machine: shapes without values); with one, the generator's device does."""
    maps = random_map(2, (3, 4), device="meta")
    assert maps.device.type == "meta" and maps.shape == (2, 3, 4)
    assert random_map(1, (2, 2), torch.Generator(), device="meta").device.type == "cpu"


def sobel_reference(images: np.ndarray) -> np.ndarray:
    """The Sobel magnitude of the channel mean with replicated borders, by 3 x 3 sums."""
    sobel_x = np.array([[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]], dtype=np.float64)
    sobel_y = sobel_x.T
    grey = images.astype(np.float64).mean(axis=1)
    padded = np.pad(grey, ((0, 0), (1, 1), (1, 1)), mode="edge")
    _, height, width = grey.shape
    out = np.zeros_like(grey)
    for i in range(height):
        for j in range(width):
            patch = padded[:, i : i + 3, j : j + 3]
            gx = (patch * sobel_x).sum(axis=(1, 2))
            gy = (patch * sobel_y).sum(axis=(1, 2))
            out[:, i, j] = np.sqrt(gx**2 + gy**2)
    return out


def test_edge_map_is_the_sobel_magnitude_written_out():
    images = rand(2, 3, 6, 7, seed=22)
    np.testing.assert_allclose(edge_map(images).numpy(), sobel_reference(images.numpy()),
                               rtol=1e-12, atol=1e-12)
    integers = torch.randint(0, 255, (1, 3, 5, 4), generator=torch.Generator().manual_seed(3))
    np.testing.assert_allclose(edge_map(integers).numpy(), sobel_reference(integers.numpy()),
                               rtol=1e-6, atol=1e-4)


@pytest.mark.parametrize(("images", "shown"), [
    (torch.zeros(3, 5, 5), r"got \(3, 5, 5\)"),
    (np.zeros((1, 3, 5, 5)), "got ndarray"),
])
def test_edge_map_refuses_what_is_not_a_batch_of_images(images, shown):
    with pytest.raises(ValueError, match=r"edge_map takes images \(B, C, H, W\), " + shown):
        edge_map(images)


@pytest.mark.parametrize("size", [(0, 4), (4, 0), (4, -1), (2.5, 3), (3,), (1, 2, 3), "ab", None])
def test_image_size_refuses_what_is_not_two_positive_integers(size):
    with pytest.raises(ValueError, match=re.escape(f"two positive integers, got {size!r}")):
        image_size(size)


def test_image_size_accepts_integral_values():
    assert image_size((1, 1)) == (1, 1)
    assert image_size((torch.tensor(3), 4.0)) == (3, 4)


@pytest.mark.parametrize("batch", [0, -2, 1.5, True])
def test_control_maps_refuse_a_bad_batch(batch):
    with pytest.raises(ValueError, match=re.escape(f"batch must be a positive integer, got "
                                                   f"{batch!r}")):
        centred_gaussian(batch, (3, 3))
