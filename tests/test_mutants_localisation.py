"""Tests written to kill the mutants of ``heatlens/metrics/localisation.py`` and
``heatlens/metrics/robustness.py`` that survived ``tools/mutation.py`` (issue 16, "Tests that
catch wrong math"; the scores and the equivalent mutants are in ``docs/testing.md``).

Each test checks a rule written out here (the pixel-centre convention of boxes, the list of
flagged images in a warning, a formula in float64) on tiny tensors and tiny models, so the file
runs in a few seconds.
"""

from __future__ import annotations

import math
import re
from fractions import Fraction

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from heatlens.engine.budget import sample_bytes, watched
from heatlens.methods.sampling import seeded_generator
from heatlens.metrics.localisation import (
    boxes_to_masks,
    energy_inside,
    pointing_game,
    relevance_mass,
    relevance_rank,
)
from heatlens.metrics.robustness import UNMEASURED_COST, infidelity, max_sensitivity

# --- heatlens/metrics/localisation.py ---------------------------------------------------------


def slice_mask(boxes: list[tuple[int, int, int, int]], h: int, w: int) -> torch.Tensor:
    """The union of ``mask[y1:y2, x1:x2]`` over integer boxes, written out with slices."""
    mask = torch.zeros(h, w, dtype=torch.bool)
    for x1, y1, x2, y2 in boxes:
        mask[y1:y2, x1:x2] = True
    return mask


def test_boxes_as_one_numpy_array_are_one_box_per_image():
    """A ``(B, 4)`` or ``(B, n, 4)`` array is the documented "one tensor or array" form, not a
    list of images (a NumPy array is not a ``Sequence``)."""
    boxes = [(1, 0, 4, 3), (0, 2, 5, 6)]
    masks = boxes_to_masks(np.array(boxes), (6, 5))
    assert torch.equal(masks, torch.stack([slice_mask([b], 6, 5) for b in boxes]))
    nested = boxes_to_masks(np.array([boxes]), (6, 5))
    assert torch.equal(nested[0], slice_mask(boxes, 6, 5))
    with pytest.raises(ValueError, match=r"boxes as one tensor must be \(B, 4\).*got shape "
                                         r"\(2, 5\)"):
        boxes_to_masks(np.zeros((2, 5)), (6, 5))


@pytest.mark.parametrize(("boxes", "message"), [
    (torch.zeros(0, 4), r"boxes as one tensor must be .*got shape \(0, 1, 4\)"),
    (torch.zeros(0, 2, 4), r"boxes as one tensor must be .*got shape \(0, 2, 4\)"),
    (torch.zeros(2, 0, 4), r"boxes of shape \(2, 0, 4\) give no image a box"),
])
def test_boxes_as_one_tensor_without_a_box_are_refused(boxes, message):
    """No image, or images without any box (whose masks would be empty, every score undefined),
    as the list form refuses them."""
    with pytest.raises(ValueError, match=message):
        boxes_to_masks(boxes, (6, 8))


@pytest.mark.parametrize(("box", "message"), [
    ((1, 2, 3, 2), r"with x1 < x2 and y1 < y2"),  # y1 == y2
    ((1, 3, 3, 2), r"with x1 < x2 and y1 < y2"),  # y1 > y2
    ((0, 1.6, 2, 2.4), r"covers no pixel centre"),  # row centres 1.5 and 2.5 both outside
    ((0, 0.5, 2, 1.5), None),  # row centre 0.5 lies in [0.5, 1.5): one row
    ((1.5, 0, 2.5, 1), None),  # column centre 1.5 lies in [1.5, 2.5): one column
])
def test_a_box_must_cover_a_pixel_centre_in_each_direction(box, message):
    """A box covers the pixels whose centre ``(j + 0.5, i + 0.5)`` lies in ``[x1, x2) x
    [y1, y2)``; one that covers none (or is empty) is refused, in rows as in columns."""
    if message is not None:
        with pytest.raises(ValueError, match=message):
            boxes_to_masks([box], (6, 8))
        return
    mask = boxes_to_masks([box], (6, 8))[0]
    rows = torch.arange(6, dtype=torch.float64) + 0.5
    cols = torch.arange(8, dtype=torch.float64) + 0.5
    x1, y1, x2, y2 = box
    want = ((rows >= y1) & (rows < y2))[:, None] & ((cols >= x1) & (cols < x2))[None, :]
    assert int(want.sum()) >= 1 and torch.equal(mask, want)


@pytest.mark.parametrize(("count", "listed"), [
    (10, "0, 1, 2, 3, 4, 5, 6, 7, 8, 9 are constant"),
    (11, "0, 1, 2, 3, 4, 5, 6, 7, 8, 9 and 1 more are constant"),
    (13, "0, 1, 2, 3, 4, 5, 6, 7, 8, 9 and 3 more are constant"),
])
def test_a_warning_names_the_first_ten_maps_and_counts_the_rest(count, listed):
    """Constant maps are named by index, the first ten, then "and n more" for the other n."""
    maps = torch.ones(count, 3, 3)
    masks = torch.ones(count, 3, 3, dtype=torch.bool)
    with pytest.warns(UserWarning) as caught:
        pointing_game(maps, masks)
    text = " ".join(str(w.message) for w in caught)
    assert f"pointing_game: map(s) {listed}: a constant map" in text


def test_boxes_to_masks_makes_every_tensor_on_the_device_asked_for():
    """``device=`` holds for the whole computation: on PyTorch's ``meta`` device (shapes
    without data, available on every machine) a tensor left on the CPU would raise a device
    mismatch, and the masks come back on ``meta``."""
    for boxes in ([[0, 0, 2, 2]], torch.tensor([[0, 0, 2, 2], [1, 1, 3, 3]])):
        masks = boxes_to_masks(boxes, (3, 4), device="meta")
        assert masks.device.type == "meta" and masks.dtype == torch.bool
        assert masks.shape == (len(boxes), 3, 4)


def test_box_coordinates_are_kept_in_float64():
    """A list of Python floats is read as float64: ``0.5 + 1e-9`` is beyond the centre 0.5 of
    column 0 (float32 would round it to 0.5 and cover the column)."""
    x1 = 0.5 + 1e-9
    mask = boxes_to_masks([[x1, 0, 2, 1]], (1, 3))[0]
    assert mask.tolist() == [[False, True, False]]


@pytest.mark.parametrize(("boxes", "message"), [
    (7, r"boxes must be a \(B, 4\) tensor or a list .*got int 7"),
    ({"a": 1}, r"boxes must be a \(B, 4\) tensor or a list .*got dict \{'a': 1\}"),
    ([["a", "b", "c", "d"]], r"boxes of image 0 are not numbers in a \(n, 4\) array: "
                             r"\['a', 'b', 'c', 'd'\]"),
])
def test_boxes_that_are_not_a_list_of_numbers_are_named(boxes, message):
    with pytest.raises(ValueError, match=message):
        boxes_to_masks(boxes, (6, 8))


@pytest.mark.parametrize(("tolerance", "offsets", "hit"), [
    (1, [(0, 1), (1, 0), (0, -1), (-1, 0)], True),  # the four neighbours are 1 px away
    (1, [(1, 1), (-1, 1)], False),  # a diagonal neighbour is sqrt(2) px away
    (1.5, [(1, 1), (-1, -1)], True),
    (1.5, [(0, 2), (2, 0)], False),
    (0.9, [(0, 1)], False),  # below one pixel only the object itself
])
def test_pointing_game_within_a_pixel_or_two(tolerance, offsets, hit):
    """``dist(argmax L, O) <= tolerance`` between pixel centres, written out for a one-pixel
    object at (3, 3) and a peak beside it."""
    masks = torch.zeros(1, 7, 7, dtype=torch.bool)
    masks[0, 3, 3] = True
    for dy, dx in offsets:
        assert (math.hypot(dy, dx) <= tolerance) == hit
        maps = torch.zeros(1, 7, 7)
        maps[0, 3 + dy, 3 + dx] = 1.0
        assert pointing_game(maps, masks, tolerance=tolerance).item() == float(hit)


def test_energy_inside_names_the_map_with_negative_values():
    """The first map below 0, not the first map whose minimum is 0 (or below 1)."""
    maps = torch.rand(3, 4, 4, generator=torch.Generator().manual_seed(0))
    maps[0, 0, 0] = 0.0
    maps[2, 1, 1] = -0.5
    masks = torch.ones(3, 4, 4, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"energy_inside: map 2 has negative values \(down to "
                                         r"-0\.5\)"):
        energy_inside(maps, masks)


@pytest.mark.parametrize("shape", [(2, 3, 8, 8), (1, 2, 3, 8, 8), (64,)])
def test_maps_of_another_shape_are_told_to_give_one_map_per_image(shape):
    """The hints "drop the channel" and "add the batch dimension" are for ``(B, 1, H, W)`` and
    ``(H, W)`` only; other shapes are told what the metrics take."""
    with pytest.raises(ValueError, match=r"relevance_mass takes maps \(B, H, W\), got shape "
                                         rf"{re.escape(str(shape))}: pass one map per image"):
        relevance_mass(torch.rand(shape), torch.ones(shape, dtype=torch.bool))


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int64, torch.float16])
def test_maps_of_other_dtypes_are_scored_as_float32(dtype):
    maps = torch.randint(0, 5, (3, 6, 6), generator=torch.Generator().manual_seed(1))
    masks = torch.rand(3, 6, 6, generator=torch.Generator().manual_seed(2)) < 0.4
    for metric in (pointing_game, energy_inside, relevance_mass, relevance_rank):
        got = metric(maps.to(dtype), masks)
        assert got.dtype == torch.float32
        assert torch.equal(got, metric(maps.float(), masks))


def test_relevance_rank_is_exact_in_float64():
    """Ties share their places: K = 2, one pixel above the 2nd value (on the object), three
    tied at it (one on the object) for the one place left: ``(1 + 1 * 1/3) / 2 = 2/3``, to the
    last bit of float64 (a float32 step on the way would be off by about 1e-8). A constant map
    scores ``K / N = 1/3`` exactly too."""
    maps = torch.tensor([[[5.0, 2.0, 2.0], [2.0, 0.0, 0.0]]], dtype=torch.float64)
    masks = torch.tensor([[[True, True, False], [False, False, False]]])
    assert relevance_rank(maps, masks).item() == float(Fraction(2, 3))
    constant = torch.full((1, 2, 3), 0.25, dtype=torch.float64)
    masks = torch.tensor([[[True, False, False], [False, True, False]]])
    with pytest.warns(UserWarning):
        assert relevance_rank(constant, masks).item() == float(Fraction(1, 3))


@pytest.mark.parametrize(("metric", "outcome"), [
    (pointing_game, "points at nothing and scores 0 (a miss)"),
    (relevance_rank, "ranks no pixel above another and scores the chance level K / (H W)"),
])
def test_a_constant_map_warning_says_what_it_scores(metric, outcome):
    maps = torch.full((2, 4, 4), 0.5)
    maps[0, 0, 0] = 1.0
    masks = torch.ones(2, 4, 4, dtype=torch.bool)
    with pytest.warns(UserWarning, match=rf"map\(s\) 1 are constant: a constant map "
                                         rf"{re.escape(outcome)}$"):
        metric(maps, masks)


# --- heatlens/metrics/robustness.py -----------------------------------------------------------


class Recording(nn.Module):
    """``f(x) = sum(w * x)`` per input, as ``(N, 2)`` scores (the second column ``-f``), which
    writes down every batch it sees, in order, in ``events``."""

    def __init__(self, shape: tuple[int, ...], events: list[str] | None = None) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.linspace(-1, 1, math.prod(shape)).reshape(shape))
        self.events = [] if events is None else events
        self.eval()

    def forward(self, x: Tensor) -> Tensor:
        self.events.append(f"forward {x.shape[0]} {x.dtype}")
        score = (x * self.w).flatten(1).sum(1)
        return torch.stack([score, -score], dim=1)


def gaussian_draws(shape: tuple[int, ...], noise: float, seed: int, count: int) -> list[Tensor]:
    """The default perturbations written out: ``noise * randn(C, H, W)`` from
    ``seeded_generator(seed, i)``, in float32, then float64."""
    return [(noise * torch.randn(shape, generator=seeded_generator(seed, i, torch.device("cpu"))))
            .double() for i in range(count)]


def test_infidelity_defaults_are_ten_draws_of_noise_0_003_from_seed_0():
    """``Phi = 2 w`` of a linear score: ``INFD = mean_i (I_i . w)^2`` over the documented default
    draws (10 of ``N(0, 0.003^2)`` from seed 0)."""
    x = torch.randn(2, 1, 2, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    model = Recording(x.shape[1:]).double()
    w = model.w.detach()
    got = infidelity(model, x, 2 * w.expand_as(x), target=0)
    expected = torch.stack([(d * w).sum() ** 2 for d in gaussian_draws(x.shape[1:], 0.003, 0, 10)])
    assert torch.allclose(got, expected.mean().expand(2), rtol=1e-10)


@pytest.mark.parametrize("budget", [1, 10**9])
def test_infidelity_scores_every_perturbed_copy_under_any_chunking(budget):
    """The same formula, whether one copy or every copy goes through a pass at a time."""
    x = torch.randn(2, 1, 2, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    model = Recording(x.shape[1:]).double()
    w = model.w.detach()
    # the second column scores -w . x: Phi = -2 w leaves INFD = mean_i (I_i . w)^2 again
    got = infidelity(model, x, -2 * w.expand_as(x), target=1, perturbations=3, noise=0.5, seed=2,
                     memory_budget=budget)
    expected = torch.stack([(d * w).sum() ** 2 for d in gaussian_draws(x.shape[1:], 0.5, 2, 3)])
    assert torch.allclose(got, expected.mean().expand(2), rtol=1e-10)


def test_infidelity_holds_one_draw_at_a_time_when_a_pass_holds_less_than_a_batch():
    """Under a budget of one copy per pass, draw ``i + 1`` is made only after draw ``i``'s
    copies were scored, so no more than one draw of the batch is held."""
    events: list[str] = []
    model = Recording((1, 2, 2), events)
    x = torch.rand(2, 1, 2, 2)

    def perturb(inputs: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        events.append("draw")
        shift = torch.full_like(inputs, 0.1)
        return shift, inputs - shift

    infidelity(lambda t: model(t), x, torch.ones_like(x), perturb=perturb, perturbations=3,
               target=0, memory_budget=1)
    one = "forward 1 torch.float32"
    assert events == ["forward 2 torch.float32"] + ["draw", one, one] * 3


def test_infidelity_chunks_a_plain_function_by_the_input_estimate():
    """A function that is not a module: ``budget // ((UNMEASURED_COST + 3) * input bytes)`` copies
    per pass (here 2 of the 6)."""
    events: list[str] = []
    model = Recording((1, 2, 2), events)
    x = torch.rand(1, 1, 2, 2)
    budget = 3 * (UNMEASURED_COST + 3) * x[0].numel() * x.element_size() - 1  # 2.99 copies
    infidelity(lambda t: model(t), x, torch.ones_like(x), perturbations=6, target=0,
               memory_budget=budget)
    assert events == [f"forward {n} torch.float32" for n in (1, 2, 2, 2)]


def test_infidelity_measures_a_module_and_its_bound_forward_alike():
    """A module, or its bound ``forward``, is measured, not estimated: one copy costs
    ``sample_bytes`` of the module plus the copy, its perturbation and its product with ``Phi``
    (``items_per_chunk`` with ``extra_per_item`` = two inputs)."""
    x = torch.rand(1, 1, 2, 2)
    input_bytes = x[0].numel() * x.element_size()
    per_copy = sample_bytes(Recording((1, 2, 2)), x) + 3 * input_bytes  # on one input
    for per_pass in (1, 2, 3):
        for bound in (False, True):
            events: list[str] = []
            model = Recording((1, 2, 2), events)  # a new model, measured by infidelity itself
            infidelity(model.forward if bound else model, torch.cat([x, x]), torch.ones(2, 1, 2, 2),
                       perturbations=6, target=0, memory_budget=2 * per_pass * per_copy)
            sizes = [int(e.split()[1]) for e in events if e.startswith("forward")]
            # the clean batch, the measuring pass (one input), then 2 per_pass copies a pass
            assert sizes == [2, 1] + [2 * per_pass] * (6 // per_pass)


def test_infidelity_of_a_bound_forward_keeps_the_model_as_it_was():
    """``model.forward`` is the model: the training-mode warning, and its buffers restored."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2), nn.Flatten(),
                          nn.Linear(8, 2)).train()
    x = torch.randn(3, 1, 2, 2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.warns(UserWarning, match="training mode"):
        infidelity(model.forward, x, torch.ones_like(x), target=0, perturbations=2)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_progress_reports_every_copy_under_its_name():
    """The watcher of :func:`heatlens.engine.budget.watched` hears ``count x batch`` steps of
    ``infidelity`` and of ``max-sensitivity``."""
    x = torch.rand(2, 3, 2, 2)  # three channels: steps count copies, not channels
    model = Recording((3, 2, 2))
    heard: list[tuple[int, int, str]] = []
    with watched(lambda done, total, name: heard.append((done, total, name))):
        infidelity(model, x, torch.ones_like(x), perturbations=3, target=0, memory_budget=1)
        max_sensitivity(lambda t: t * 2, x, samples=4)
    assert heard == ([(n, 6, "infidelity") for n in range(1, 7)]
                     + [(n, 8, "max-sensitivity") for n in (2, 4, 6, 8)])


def test_max_sensitivity_defaults_are_ten_draws_of_radius_0_02_from_seed_0():
    """``Phi(x) = (w . x) w`` (saliency of ``(w . x)^2 / 2``): the relative change is
    ``|w . u| / |w . x|``, maximised over the documented default draws."""
    w = torch.linspace(-1, 2, 6, dtype=torch.float64)
    x = torch.randn(2, 1, 2, 3, generator=torch.Generator().manual_seed(3), dtype=torch.float64)

    calls: list[int] = []

    def explain(t: Tensor) -> Tensor:
        calls.append(t.shape[0])
        return (t.flatten(1) @ w)[:, None] * w

    got = max_sensitivity(explain, x)
    assert calls == [2] * 11  # the clean inputs, then ten draws
    draws = [torch.empty(1, 2, 3).uniform_(-0.02, 0.02,
                                           generator=seeded_generator(0, i, torch.device("cpu")))
             .double().flatten() for i in range(10)]
    expected = torch.stack([(d @ w).abs() / (x.flatten(1) @ w).abs() for d in draws]).amax(0)
    assert torch.allclose(got, expected, rtol=1e-10)


def test_max_sensitivity_takes_one_number_per_image_and_integer_explanations():
    """An explanation may be ``(B,)``, and may be integers (counted as floats)."""
    x = torch.tensor([[[[1.0, 2.0]]], [[[-1.0, 4.0]]]], dtype=torch.float64)
    shift = torch.tensor([[[[0.5, -0.25]]]], dtype=torch.float64)
    moved = max_sensitivity(lambda t: t.flatten(1).sum(1), x, perturb=lambda t, g: t + shift)
    assert moved.tolist() == [0.25 / 3, 0.25 / 3]
    rounded = max_sensitivity(lambda t: t.flatten(1).round().long(), x,
                              perturb=lambda t, g: t + shift)
    # round(1.5, 1.75) = (2, 2) against (1, 2); round(-0.5, 3.75) = (0, 4) against (-1, 4)
    assert torch.allclose(rounded, torch.tensor([1 / math.sqrt(5), 1 / math.sqrt(17)]))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_perturbed_inputs_keep_the_inputs_dtype(dtype):
    """The default draws are made in float32 and given the inputs' dtype, for the model (the
    perturbed inputs) and for the score (the max-sensitivity of a half-precision explanation is
    of its dtype)."""
    events: list[str] = []
    model = Recording((1, 2, 2), events).to(dtype)
    x = torch.rand(2, 1, 2, 2).to(dtype)
    infidelity_score = infidelity(model, x, torch.ones_like(x), perturbations=2, target=0,
                                  noise=0.1)
    assert len(events) >= 2 and all(e.endswith(f" {dtype}") for e in events)
    assert infidelity_score.dtype == dtype
    seen: list[torch.dtype] = []

    def explain(t: Tensor) -> Tensor:
        seen.append(t.dtype)
        return t * 3

    score = max_sensitivity(explain, x, samples=2)
    assert seen == [dtype] * 3 and score.dtype == dtype


def test_a_zero_explanation_warning_names_one_image_or_several():
    x = torch.rand(3, 1, 2, 2)
    base = x.clone()
    base[1] = 0

    def explain(t: Tensor) -> Tensor:
        return t - x + base

    with pytest.warns(UserWarning, match=r"^the explanation of image 1 is zero"):
        max_sensitivity(explain, x, samples=1)
    base[2] = 0
    with pytest.warns(UserWarning, match=r"^the explanation of images 1, 2 is zero"):
        max_sensitivity(explain, x, samples=1)


@pytest.mark.parametrize(("bad", "listed"), [(5, "images 0, 1, 2, 3, 4: "),
                                              (6, r"images 0, 1, 2, 3, 4 \.\.\.: ")])
def test_nan_images_are_listed_five_at_most(bad, listed):
    x = torch.rand(7, 1, 2, 2)
    x[:bad, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=rf"^{listed}the inputs hold NaN"):
        max_sensitivity(lambda t: t, x)


def test_bad_functions_and_results_name_what_they_got():
    x = torch.rand(2, 1, 2, 2)
    ones = torch.ones_like(x)
    with pytest.raises(TypeError, match=r"forward must be a function .*not a int$"):
        infidelity(5, x, ones)
    with pytest.raises(TypeError, match=r"perturb must be a function .*not a str$"):
        infidelity(lambda t: t.sum((1, 2, 3)), x, ones, perturb="noise")
    with pytest.raises(TypeError, match=r"explain must be a function .*not a int$"):
        max_sensitivity(5, x)
    with pytest.raises(TypeError, match=r"perturb must be a function .*not a str$"):
        max_sensitivity(lambda t: t, x, perturb="noise")
    with pytest.raises(TypeError, match=r"explain must return a tensor \(B, \.\.\.\), not a "
                                        r"list$"):
        max_sensitivity(lambda t: [t], x)
    calls: list[int] = []
    with pytest.raises(ValueError, match=r"explain must return one explanation per input, "
                                         r"\(B, \.\.\.\), for the batch of 2; it returned "
                                         r"shape \(1, 1, 2, 2\)"):
        max_sensitivity(lambda t: calls.append(1) or t[:1], x)
    assert calls == [1]  # refused at the clean explanation, before any draw
    with pytest.raises(ValueError, match=r"got a tensor of shape \(1, 2, 2\)$"):
        max_sensitivity(lambda t: t, x, perturb=lambda t, g: t[0])


def score(t: Tensor) -> Tensor:
    return t.flatten(1).sum(1)


@pytest.mark.parametrize(("perturb", "message"), [
    (lambda t, g: t, r"two tensors of the inputs' shape \(2, 1, 2, 2\); got a tensor of "
                     r"shape \(2, 1, 2, 2\)$"),
    (lambda t, g: (t, t, t), r"got a tuple of 3: shape \(2, 1, 2, 2\), shape \(2, 1, 2, 2\), "
                             r"shape \(2, 1, 2, 2\)$"),
    (lambda t, g: [t, "x"], r"got a list of 2: shape \(2, 1, 2, 2\), str$"),
    (lambda t, g: 3, r"got a int$"),
    (lambda t, g: (torch.ones(5), t), r"of the inputs' shape \(2, 1, 2, 2\); got shapes "
                                      r"\(5,\) and \(2, 1, 2, 2\)$"),
    (lambda t, g: (torch.ones(3, 1, 1, 1), t), r"got shapes \(3, 1, 1, 1\) and "),
])
def test_a_bad_infidelity_perturbation_is_described(perturb, message):
    x = torch.rand(2, 1, 2, 2)
    with pytest.raises(ValueError, match=rf"^perturb must return \(perturbation, "
                                         rf"perturbed_inputs\).*{message}"):
        infidelity(score, x, torch.ones_like(x), perturb=perturb)


def test_a_perturbation_that_broadcasts_counts_for_every_image():
    """``I`` of shape ``(C, H, W)`` (or ``(1, C, H, W)``) is the same for every image."""
    x = torch.rand(2, 1, 2, 2, dtype=torch.float64)
    shift = torch.tensor([[[0.5, -1.0], [0.25, 2.0]]], dtype=torch.float64)
    for drawn in (shift, shift[None]):
        got = infidelity(score, x, torch.ones_like(x) * 3, perturb=lambda t, g, d=drawn: (d, t - d),
                         perturbations=2)
        # I . Phi - (f(x) - f(x - I)) = 3 sum(I) - sum(I) = 2 sum(I)
        assert torch.allclose(got, (2 * shift.sum()) ** 2 * torch.ones(2, dtype=torch.float64))


def test_a_forward_that_changes_its_output_shape_is_named():
    x = torch.rand(2, 1, 2, 2)
    calls: list[int] = []

    def changing(t: Tensor) -> Tensor:
        calls.append(t.shape[0])
        out = torch.stack([score(t), -score(t)], dim=1)
        return out if len(calls) == 1 else out[:, 0]

    with pytest.raises(ValueError, match=r"^forward returned shape \(4,\) for 4 inputs, where "
                                         r"the clean batch gave \(B, K\)$"):
        infidelity(changing, x, torch.ones_like(x), perturbations=2, target=0)
    calls.clear()

    def growing(t: Tensor) -> Tensor:
        calls.append(t.shape[0])
        return score(t) if len(calls) == 1 else score(t)[:, None]

    with pytest.raises(ValueError, match=r"^forward returned shape \(4, 1\) for 4 inputs, where "
                                         r"the clean batch gave \(B,\)$"):
        infidelity(growing, x, torch.ones_like(x), perturbations=2)


def test_a_map_over_positions_counts_for_every_channel_of_1d_inputs():
    """Inputs ``(B, C, L)`` take attributions ``(B, L)`` as well (``I^T Phi = sum_l Phi_l
    sum_c I_cl``), as images take ``(B, H, W)``."""
    x = torch.rand(2, 3, 4, dtype=torch.float64)
    phi = torch.rand(2, 4, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    options = dict(perturbations=3, noise=0.2)
    as_map = infidelity(score, x, phi, **options)
    repeated = infidelity(score, x, phi[:, None].expand_as(x), **options)
    assert torch.allclose(as_map, repeated, rtol=1e-12)


def test_bad_attributions_are_named_with_the_shapes_that_fit():
    ones = torch.ones(2, 3, 4)
    with pytest.raises(TypeError, match=r"^attributions must be a torch.Tensor, not list "):
        infidelity(score, ones, [1.0])
    with pytest.raises(ValueError, match=r"^attributions have shape \(2, 5\) but the inputs "
                                         r"\(2, 3, 4\): pass attributions of the inputs' shape "
                                         r"or \(2, 4\) \(a map\), at the inputs'"):
        infidelity(score, ones, torch.ones(2, 5))
    with pytest.raises(ValueError, match=r"^attributions have shape \(2, 5\) but the inputs "
                                         r"\(2, 3\): pass attributions of the inputs' shape, at "
                                         r"the inputs'"):
        infidelity(score, ones[:, :, 0], torch.ones(2, 5))
    with pytest.raises(ValueError, match=r"^attributions are on meta but the inputs on cpu$"):
        infidelity(score, ones, torch.ones(2, 3, 4, device="meta"))


def test_a_perturbation_is_dotted_with_phi_in_the_inputs_dtype():
    """``I`` is taken in the inputs' dtype, as the perturbed inputs are: a float32 ``I = 1 +
    2^-8`` for bfloat16 inputs is ``1`` (bfloat16 keeps 8 significant bits, and the tie rounds
    to even), so ``I^T Phi = 4`` over four ones and, with a constant score, ``INFD = 16``."""
    x = torch.ones(1, 1, 2, 2, dtype=torch.bfloat16)
    drawn = torch.full((1, 1, 2, 2), 1 + 2**-8)
    got = infidelity(lambda t: t.flatten(1).sum(1) * 0, x, torch.ones_like(x),
                     perturb=lambda t, g: (drawn, t - drawn.to(t.dtype)), perturbations=1)
    assert got.dtype == torch.bfloat16 and got.tolist() == [16.0]
    # and so is Phi: float32 attributions 1 + 2^-8 are ones for bfloat16 inputs
    ones = torch.ones_like(x)
    got = infidelity(lambda t: t.flatten(1).sum(1) * 0, x, drawn,
                     perturb=lambda t, g: (ones, t - ones), perturbations=1)
    assert got.tolist() == [16.0]


@pytest.mark.parametrize(("bad", "listed"), [(1, "image 0: "), (2, "images 0, 1: ")])
def test_one_or_two_nan_images_are_named(bad, listed):
    x = torch.rand(3, 2)  # (B, features): two dimensions are a batch too
    x[:bad, 0] = float("nan")
    with pytest.raises(ValueError, match=rf"^{listed}the inputs hold NaN"):
        max_sensitivity(lambda t: t, x)


def test_bad_inputs_and_numbers_are_named():
    with pytest.raises(TypeError, match=r"^inputs must be a torch.Tensor \(B, C, \*spatial\), "
                                        r"not list$"):
        max_sensitivity(lambda t: t, [[1.0]])
    with pytest.raises(TypeError, match=r"^inputs must be a float tensor, got dtype torch.int64$"):
        max_sensitivity(lambda t: t, torch.ones(2, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"^inputs must be a non-empty batch"):
        max_sensitivity(lambda t: t, torch.ones(0, 3, 4))
    for radius in (True, "0.1"):
        with pytest.raises(ValueError, match=r"^radius must be a positive finite number"):
            max_sensitivity(lambda t: t, torch.ones(2, 3), radius=radius)


def test_one_draw_is_enough_and_two_dimensional_inputs_are_a_batch():
    """``samples=1`` and ``perturbations=1`` are allowed, on ``(B, features)`` inputs: a linear
    explanation ``Phi(x) = 3 x`` changes by ``3 u``, relative ``||u|| / ||x||``."""
    x = torch.tensor([[3.0, 4.0], [0.0, 2.0]], dtype=torch.float64)
    u = torch.tensor([0.3, -0.4], dtype=torch.float64)
    got = max_sensitivity(lambda t: 3 * t, x, samples=1, perturb=lambda t, g: t + u)
    assert torch.allclose(got, torch.tensor([0.5 / 5, 0.5 / 2], dtype=torch.float64))
    score_change = infidelity(score, x, torch.ones_like(x), perturbations=1,
                              perturb=lambda t, g: (u, t - u))
    assert float(score_change.max()) < 1e-28  # Phi = 1 is exact for a sum (to round-off)
