"""Tests written to kill the mutants of ``heatlens/metrics/sanity.py`` that survived its own test
files (issue 16, "Tests that catch wrong math"; the scores and the equivalent mutants are in
``docs/testing.md``).

Every number is checked against a definition written out here: ranks and Spearman's rho in a
float64 loop (and scipy), SSIM as Wang et al.'s formula under a separable Gaussian window in
NumPy, each step of the checks by re-doing it by hand on a copy (each layer re-initialised by its
own ``reset_parameters()`` under the seed ``(seed * 1_000_003 + crc32(name)) mod 2**63``). The
models are a few hundred weights and the maps 12 x 12, so the file runs in seconds.
"""

from __future__ import annotations

import copy
import zlib

import numpy as np
import pytest
import torch
from scipy.stats import rankdata, spearmanr
from torch import Tensor, nn

from heatlens.metrics.sanity import (
    RandomisationStep,
    _ancestors,
    _step_modules,
    _verdict,
    average_ranks,
    cascading_randomisation,
    compare,
    layer_seed,
    random_logit,
    random_other_classes,
    randomisation_order,
    rank_correlation,
    reinitialise,
    structural_similarity,
)

SIDE, CLASSES = 12, 4


# --- references written out -----------------------------------------------------------------------


def ranks_reference(values: np.ndarray) -> np.ndarray:
    """Average ranks of a 1-D array by counting: ``#smaller + (#equal + 1) / 2``."""
    return np.array([(values < v).sum() + ((values == v).sum() + 1) / 2 for v in values],
                    dtype=np.float64)


def spearman_reference(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson's correlation of the average ranks, summed in a float64 loop."""
    ra, rb = ranks_reference(a.ravel()), ranks_reference(b.ravel())
    ra, rb = ra - ra.mean(), rb - rb.mean()
    cov = sum(float(x) * float(y) for x, y in zip(ra, rb, strict=True))
    return cov / np.sqrt(sum(float(x) ** 2 for x in ra) * sum(float(y) ** 2 for y in rb))


def gaussian_window(sigma: float = 1.5, taps: int = 11) -> np.ndarray:
    offsets = np.arange(taps) - (taps - 1) / 2
    w = np.exp(-(offsets**2) / (2 * sigma**2))
    return w / w.sum()


def local_mean(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Gaussian-weighted mean over every window that lies inside ``x`` (no padding)."""
    out = x
    for axis in range(x.ndim):
        n = out.shape[axis] - len(w) + 1
        out = sum(wk * np.take(out, np.arange(k, k + n), axis=axis) for k, wk in enumerate(w))
    return out


def ssim_reference(a: np.ndarray, b: np.ndarray) -> float:
    """Wang et al. (2004), Eq. 13, on maps min-max scaled to [0, 1] (L = 1, K1 = 0.01,
    K2 = 0.03), population (co)variances under the 11-tap Gaussian window of sigma 1.5,
    averaged over the windows inside the map."""
    def scaled(m: np.ndarray) -> np.ndarray:
        m = m.astype(np.float64)
        return (m - m.min()) / (m.max() - m.min())

    x, y, w = scaled(a), scaled(b), gaussian_window()
    mx, my = local_mean(x, w), local_mean(y, w)
    vx = local_mean(x * x, w) - mx**2
    vy = local_mean(y * y, w) - my**2
    cxy = local_mean(x * y, w) - mx * my
    c1, c2 = 0.01**2, 0.03**2
    s = (2 * mx * my + c1) * (2 * cxy + c2) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    return float(s.mean())


def seed_reference(seed: int, name: str) -> int:
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63


def reinitialised_by_hand(module: nn.Module, seed: int, name: str) -> None:
    with torch.random.fork_rng(), torch.no_grad():
        torch.manual_seed(seed_reference(seed, name))
        module.reset_parameters()


def state(model: nn.Module) -> tuple[dict[str, Tensor], dict[str, bool]]:
    return ({k: v.clone() for k, v in model.state_dict().items()},
            {n: m.training for n, m in model.named_modules()})


def assert_state(before: tuple[dict[str, Tensor], dict[str, bool]], model: nn.Module) -> None:
    params, modes = state(model)
    assert modes == before[1]
    assert params.keys() == before[0].keys()
    for key, value in before[0].items():
        assert torch.equal(value, params[key]), key


# --- a tiny model and a CAM written out -----------------------------------------------------------


def tiny_cnn() -> nn.Sequential:
    """Conv, BatchNorm with learned-looking statistics, conv, global pooling, linear head."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = nn.Sequential(
            nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3), nn.Tanh(),
            nn.Conv2d(3, 3, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
            nn.Linear(3, CLASSES),
        )
        bn = model[1]
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        with torch.no_grad():
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
    return model.eval()


def cam(model: nn.Module, x: Tensor, classes: Tensor) -> Tensor:
    """CAM: the last convolution's features weighted by the head's row of each class."""
    features = model[:4](x)
    weights = model[6].weight[classes]
    return (weights[:, :, None, None] * features).sum(dim=1).detach()


def images(n: int = 2, seed: int = 5) -> Tensor:
    return torch.randn(n, 1, SIDE, SIDE, generator=torch.Generator().manual_seed(seed))


def assert_step_is(step: RandomisationStep, original: Tensor, maps: Tensor, layer: str) -> None:
    assert step.layer == layer
    for i in range(len(original)):
        a, b = original[i].double().numpy(), maps[i].double().numpy()
        assert float(step.spearman[i]) == pytest.approx(spearman_reference(a, b), abs=1e-12)
        assert float(step.spearman_abs[i]) == pytest.approx(
            spearman_reference(np.abs(a), np.abs(b)), abs=1e-12)
        assert float(step.ssim[i]) == pytest.approx(ssim_reference(a, b), abs=1e-6)


# --- ranks and Spearman ---------------------------------------------------------------------------


def test_average_ranks_are_scipys_and_counted_per_row():
    rows = torch.tensor([[3.0, 1.0, 3.0, 2.0, 3.0, 0.5], [0.0, 0.0, -1.0, 4.0, 4.0, 4.0]])
    ranks = average_ranks(rows)
    assert ranks.dtype == torch.float64
    for row, got in zip(rows.numpy(), ranks.numpy(), strict=True):
        np.testing.assert_array_equal(got, rankdata(row, method="average"))
        np.testing.assert_array_equal(got, ranks_reference(row))


@pytest.mark.parametrize("n", [2, 3, 7, 60])
def test_rank_correlation_of_small_maps_is_the_loop_and_scipy(n):
    """Two pixels are enough: the ranks' norm is then 0.5, far from any clamp on it."""
    g = torch.Generator().manual_seed(n)
    a = torch.rand(3, n, generator=g)
    b = torch.stack([a[0], -a[1] + 0.01 * torch.rand(n, generator=g), torch.rand(n, generator=g)])
    rho = rank_correlation(a, b)
    assert rho.dtype == torch.float64 and rho.shape == (3,)
    for i in range(3):
        expected = spearman_reference(a[i].numpy(), b[i].numpy())
        assert float(rho[i]) == pytest.approx(expected, abs=1e-12)
        if n > 2:
            assert expected == pytest.approx(spearmanr(a[i], b[i]).statistic, abs=1e-12)
    assert float(rho[0]) == 1.0


def test_a_constant_map_against_a_constant_or_an_ordered_one():
    ordered = torch.arange(6.0).reshape(1, 2, 3)
    flat, other_flat = torch.full((1, 2, 3), 2.0), torch.zeros(1, 2, 3)
    assert float(rank_correlation(flat, ordered)[0]) == 0.0
    assert float(rank_correlation(ordered, flat)[0]) == 0.0
    assert float(rank_correlation(flat, other_flat)[0]) == 1.0
    both = rank_correlation(torch.cat([flat, ordered]), torch.cat([ordered, ordered]))
    assert both.tolist() == [0.0, 1.0]
    # constant up to round-off (constant_maps): still ordered by rank, but it says nothing
    nearly, nearly_too = 1 + 1e-7 * ordered, 5 - 1e-8 * ordered
    assert float(rank_correlation(nearly, ordered)[0]) == 0.0
    assert float(rank_correlation(ordered, nearly)[0]) == 0.0
    assert float(rank_correlation(nearly, nearly_too)[0]) == 1.0


# --- SSIM -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(2, 11, 11), (1, 12, 15), (1, 11, 12, 13)])
def test_structural_similarity_is_wang_et_al_written_out(shape):
    """Eleven pixels a side is the smallest map the window fits in, and it must be accepted."""
    g = torch.Generator().manual_seed(len(shape) + shape[-1])
    a = torch.rand(shape, generator=g)
    b = 0.6 * a + 0.4 * torch.rand(shape, generator=g)
    ours = structural_similarity(a, b)
    assert ours.dtype == torch.float64 and ours.shape == (shape[0],)
    for i in range(shape[0]):
        expected = ssim_reference(a[i].numpy(), b[i].numpy())
        assert float(ours[i]) == pytest.approx(expected, abs=1e-6)
        assert 0.05 < expected < 0.95  # far from both ends: every constant matters


def test_structural_similarity_of_constant_maps_scaled_to_zeros():
    """A constant map is scaled to zeros: two of them are the same image (SSIM 1, with the
    data range 1 that [0, 1] has, not the range 0 the zeros show), and one against a map is
    Wang et al.'s formula against zeros."""
    flat, other = torch.full((1, 12, 12), 3.0), torch.zeros(1, 12, 12)
    assert structural_similarity(flat, other).tolist() == [1.0]
    ordered = torch.rand(1, 12, 12, generator=torch.Generator().manual_seed(6))
    ours = float(structural_similarity(flat, ordered)[0])
    w = gaussian_window()  # x = 0: mu_x = sigma_x = sigma_xy = 0
    y = ordered[0].double().numpy()
    y = (y - y.min()) / (y.max() - y.min())
    my, vy = local_mean(y, w), local_mean(y * y, w) - local_mean(y, w) ** 2
    c1, c2 = 0.01**2, 0.03**2
    expected = (c1 * c2) / ((my**2 + c1) * (vy + c2))
    assert ours == pytest.approx(float(expected.mean()), abs=1e-6)


def test_structural_similarity_refuses_what_it_cannot_compare():
    with pytest.raises(ValueError, match=r"\(B, H, W\).*\(B, D, H, W\).*\(1, 20\)"):
        structural_similarity(torch.rand(1, 20), torch.rand(1, 20))
    with pytest.raises(ValueError, match=r"\(1, 11, 11, 11, 11\)"):
        structural_similarity(torch.rand(1, 11, 11, 11, 11), torch.rand(1, 11, 11, 11, 11))
    with pytest.raises(ValueError, match=r"11 pixels wide, and these maps are 10 x 12: .* at "
                                         r"least 11 pixels"):
        structural_similarity(torch.rand(1, 10, 12), torch.rand(1, 10, 12))


# --- compare and the verdict ----------------------------------------------------------------------


def test_compare_is_the_three_measures_of_signed_maps():
    g = torch.Generator().manual_seed(8)
    original = torch.randn(2, SIDE, SIDE, generator=g)
    maps = original + 0.8 * torch.randn(2, SIDE, SIDE, generator=g)
    step = compare("conv", original, maps)
    assert_step_is(step, original, maps, "conv")
    assert not torch.equal(step.spearman, step.spearman_abs)
    with pytest.raises(ValueError, match=r"\(2, 12, 11\) after 'conv', but \(2, 12, 12\)"):
        compare("conv", original, maps[..., :11])


def step_of(signed: float, absolute: float, ssim: float) -> RandomisationStep:
    """A step whose means are the given numbers (two images around each)."""
    return RandomisationStep("x", torch.tensor([signed - 0.25, signed + 0.25], dtype=torch.float64),
                             torch.tensor([absolute + 0.125, absolute - 0.125],
                                          dtype=torch.float64),
                             torch.tensor([ssim, ssim], dtype=torch.float64))


def test_the_verdict_asks_both_means_to_be_strictly_below():
    passed, words = _verdict(step_of(0.25, 0.37, 0.61), 0.5)
    assert passed
    assert words == ("0.25 (0.37 on absolute values, SSIM 0.61), below the threshold 0.5 "
                     "(both must be)")
    for signed, absolute in [(0.5, 0.1), (0.1, 0.5), (0.6, 0.1), (0.1, 0.6)]:
        passed, words = _verdict(step_of(signed, absolute, 0.0), 0.5)
        assert not passed
        assert words.endswith("not below the threshold 0.5 (both must be)")
        assert words.startswith(f"{signed:.2f} ({absolute:.2f} on absolute values")


# --- the layers and their weights -----------------------------------------------------------------


def test_ancestors_run_up_to_the_root():
    assert list(_ancestors("a.b.c")) == ["a.b", "a", ""]
    assert list(_ancestors("a")) == [""]
    assert list(_ancestors("")) == []


class Branchy(nn.Module):
    """Layers defined in another order than they run, a block run twice, a norm with running
    statistics only, a dropout, a parameter on the root and a layer that never runs."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(2, 3)
        self.unused = nn.Sequential(nn.Identity(), nn.Linear(2, 2))
        self.block = nn.Sequential(nn.Conv2d(2, 2, 1), nn.ReLU())
        self.norm = nn.BatchNorm2d(2, affine=False)
        self.stem = nn.Conv2d(1, 2, 3, padding=1)
        self.drop = nn.Dropout(0.5)
        self.scale = nn.Parameter(torch.ones(1))
        self.holder = Holder()

    def forward(self, x: Tensor) -> Tensor:
        y = self.holder(self.block(self.block(self.norm(self.stem(x)))))
        return self.head(self.drop(y.mean(dim=(2, 3)))) * self.scale


class Holder(nn.Module):
    """Runs, owns no weights, and holds a layer that runs and a spare one that never does."""

    def __init__(self) -> None:
        super().__init__()
        self.used = nn.Conv2d(2, 2, 1)
        self.spare = nn.Linear(2, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.used(x)


def test_the_order_is_reverse_first_finish_with_unrun_layers_on_their_ancestor():
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = Branchy().train()
    x = images()
    before, rng = state(model), torch.get_rng_state()
    # root (its own scale, and unused.1 that never ran), head, the holder (for its spare layer,
    # which never ran) after its used layer, the block's conv once, the norm (running statistics
    # only), the stem; not the ReLU, the dropout, the other containers
    assert randomisation_order(model, x) == ["", "head", "holder", "holder.used", "block.0",
                                             "norm", "stem"]
    assert_state(before, model)  # the norm's running statistics too, in training mode
    assert torch.equal(rng, torch.get_rng_state())  # the dropout drew nothing


def test_each_step_takes_the_weights_below_it_that_no_other_step_takes():
    model = Branchy()
    groups = _step_modules(model, ["", "head"])
    assert [list(map(id, g)) for g in groups] == [
        [id(model), id(model.unused[1]), id(model.block[0]), id(model.norm), id(model.stem),
         id(model.holder.used), id(model.holder.spare)],
        [id(model.head)],
    ]
    inner = _step_modules(model, ["unused", "block"])
    assert [list(map(id, g)) for g in inner] == [[id(model.unused[1])], [id(model.block[0])]]
    with pytest.raises(ValueError, match=r"layer 'block' has no weights of its own"):
        _step_modules(model, ["block.0", "block"])


def test_layer_seed_is_the_seed_and_the_names_checksum():
    for seed in (0, 1, 7, 2**62, 2**70):
        for name in ("", "fc", "layer4.1.conv2"):
            drawn = layer_seed(seed, name)
            assert isinstance(drawn, int) and 0 <= drawn < 2**63
            assert drawn == seed_reference(seed, name)
    assert len({layer_seed(s, n) for s in range(3) for n in ("a", "b", "c")}) == 9


class NoReset(nn.Module):
    """Parameters without ``reset_parameters``: a scalar first, then two vectors; and a child
    with weights, which is not this module's to redraw (it is a step, or part of one, itself)."""

    def __init__(self) -> None:
        super().__init__()
        self.scalar = nn.Parameter(torch.tensor(3.0))
        self.pair = nn.Parameter(torch.tensor([1.0, 2.0]))
        self.many = nn.Parameter(torch.linspace(-1.0, 5.0, 50))
        self.child = nn.Linear(2, 2)


def test_reinitialise_is_reset_parameters_under_the_seed_or_normal_draws():
    linear, conv, odd = nn.Linear(3, 2), nn.Conv2d(1, 2, 3), NoReset()
    expected = [copy.deepcopy(m) for m in (linear, conv, odd)]
    with torch.random.fork_rng(), torch.no_grad():
        torch.manual_seed(11)
        expected[0].reset_parameters()
        expected[1].reset_parameters()
        for p in (expected[2].pair, expected[2].many):  # the scalar draws nothing
            p.normal_(float(p.mean()), float(p.std(correction=0)))
    rng = torch.get_rng_state()
    reinitialise([linear, conv, odd], 11)
    assert torch.equal(rng, torch.get_rng_state())
    for ours, theirs in zip((linear, conv, odd), expected, strict=True):
        for (name, p), q in zip(ours.named_parameters(), theirs.parameters(), strict=True):
            assert torch.equal(p, q), name  # odd.child: untouched, as in the copy
    assert float(odd.scalar.detach()) == 3.0
    assert not torch.equal(odd.pair, torch.tensor([1.0, 2.0]))


# --- the checks, step by step by hand -------------------------------------------------------------


def test_cascading_randomisation_is_each_step_done_by_hand():
    model, x = tiny_cnn(), images()
    classes = torch.tensor([1, 3])
    layers = ["6", "3", "1"]
    before, rng = state(model), torch.get_rng_state()
    result = cascading_randomisation(model, x, cam, classes, layers=layers, seed=4)
    assert_state(before, model)
    assert torch.equal(rng, torch.get_rng_state())
    twin = copy.deepcopy(model)
    original = cam(twin, x, classes)
    assert len(result.steps) == 3
    for step, name in zip(result.steps, layers, strict=True):
        reinitialised_by_hand(twin.get_submodule(name), 4, name)
        assert_step_is(step, original, cam(twin, x, classes), name)
    last = result.steps[-1]
    signed, absolute = float(last.spearman.mean()), float(last.spearman_abs.mean())
    assert result.passed == (signed < 0.5 and absolute < 0.5)
    assert result.name == "cascading randomisation" and result.threshold == 0.5
    assert result.random_classes is None
    assert result.reason.startswith("Cascading randomisation of 3 layers, top first")
    assert (f"{signed:.2f} ({absolute:.2f} on absolute values, SSIM "
            f"{float(last.ssim.mean()):.2f})") in result.reason


def test_cascading_randomisation_by_default_takes_every_layer_and_seed_zero():
    model, x = tiny_cnn(), images()
    classes = torch.tensor([0, 2])
    result = cascading_randomisation(model, x, cam, classes)
    assert [s.layer for s in result.steps] == ["6", "3", "1", "0"]
    twin = copy.deepcopy(model)
    original = cam(twin, x, classes)
    for step in result.steps:
        reinitialised_by_hand(twin.get_submodule(step.layer), 0, step.layer)
        assert_step_is(step, original, cam(twin, x, classes), step.layer)
    strict = cascading_randomisation(model, x, cam, classes, threshold=-0.99)
    assert not strict.passed and "not below the threshold -0.99" in strict.reason
    assert strict.reason.endswith(": the map survives the destruction of the model, so it does "
                                  "not explain the model.")
    lenient = cascading_randomisation(model, x, cam, classes, threshold=1.0)
    assert lenient.passed and lenient.reason.endswith(
        "(both must be): the map depends on the learned weights.")


def test_the_intact_maps_come_from_the_model_as_the_user_left_it():
    """Finding the layers and counting the classes run the model; in training mode that would
    move the norm's running statistics and draw dropout masks, on the copy explained."""
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.BatchNorm2d(2), nn.Dropout(0.5),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2, 3)).train()
    x = images()
    stats = model[1].running_mean.clone()
    seen: list[Tensor] = []

    def reads_the_statistics(m: nn.Module, inputs: Tensor, classes: Tensor) -> Tensor:
        seen.append(m[1].running_mean.clone())
        return inputs[:, 0] * (1 + classes[:, None, None])

    rng = torch.get_rng_state()
    cascading_randomisation(model, x, reads_the_statistics, torch.tensor([0, 1]))
    random_logit(model, x, reads_the_statistics, torch.tensor([0, 1]))
    assert torch.equal(seen[0], stats) and torch.equal(seen[-2], stats)
    assert torch.equal(rng, torch.get_rng_state())


def test_random_logit_is_its_step_done_by_hand():
    model, x = tiny_cnn(), images(3)
    classes = torch.tensor([0, 3, 2])
    result = random_logit(model, x, cam, classes, seed=9)
    g = torch.Generator().manual_seed(9)
    others = (classes + torch.randint(1, CLASSES, (3,), generator=g)) % CLASSES
    assert result.random_classes is not None and torch.equal(result.random_classes, others)
    (step,) = result.steps
    assert_step_is(step, cam(model, x, classes), cam(model, x, others), "random logit")
    signed, absolute = float(step.spearman.mean()), float(step.spearman_abs.mean())
    assert result.passed == (signed < 0.5 and absolute < 0.5)
    assert result.name == "random logit" and result.threshold == 0.5
    assert (f"{signed:.2f} ({absolute:.2f} on absolute values, SSIM "
            f"{float(step.ssim.mean()):.2f})") in result.reason
    strict = random_logit(model, x, cam, classes, threshold=-0.99)
    assert not strict.passed and strict.reason.endswith(
        ": the map hardly depends on the class, so it does not say why this class.")
    lenient = random_logit(model, x, cam, classes, threshold=1.0)
    assert lenient.passed and lenient.reason.endswith(
        "(both must be): the map depends on the class explained.")
    default = random_logit(model, x, cam, classes)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(default.random_classes,
                       (classes + torch.randint(1, CLASSES, (3,), generator=g)) % CLASSES)


def test_random_other_classes_of_two_classes_is_the_other_one():
    classes = torch.tensor([0, 1, 1, 0, 1])
    for seed in range(3):
        assert torch.equal(random_other_classes(classes, 2, seed), 1 - classes)


# --- bad input, early and clearly -----------------------------------------------------------------


def counted_cam(calls: list[int]):
    def explain(model: nn.Module, x: Tensor, classes: Tensor) -> Tensor:
        calls.append(1)
        return cam(model, x, classes)

    return explain


def test_the_threshold_is_a_correlation_in_minus_one_to_one():
    model, x, classes = tiny_cnn(), images(), torch.tensor([0, 1])
    for bad in (-1.0, 1.0001, 2):
        with pytest.raises(ValueError, match=rf"in \(-1, 1\]; got {bad}"):
            random_logit(model, x, cam, classes, threshold=bad)
    assert random_logit(model, x, cam, classes, threshold=1.0).threshold == 1.0
    assert random_logit(model, x, cam, classes, threshold=-0.999).threshold == -0.999


def test_classes_are_indices_one_per_image_or_one_for_all():
    model, x = tiny_cnn(), images()
    given: list[Tensor] = []

    def records(m: nn.Module, inputs: Tensor, classes: Tensor) -> Tensor:
        given.append(classes.clone())
        maps = cam(m, inputs, classes)
        classes[0] = 0  # an explain that writes into what it is given
        return maps

    one = torch.tensor(3)
    random_logit(model, x, records, one)
    assert given[0].dtype == torch.long and given[0].tolist() == [3, 3]
    assert int(one) == 3  # the user's tensor is not written through
    random_logit(model, x, records, torch.tensor(2, dtype=torch.int32))
    assert given[2].dtype == torch.long and given[2].tolist() == [2, 2]
    random_logit(model, x, records, torch.tensor([1, 2], dtype=torch.int32))
    assert given[4].dtype == torch.long and given[4].tolist() == [1, 2]
    random_logit(model, x, records, 1)
    assert given[6].dtype == torch.long and given[6].tolist() == [1, 1]
    for bad, shown in [(True, "bool"), (torch.tensor([0.0, 1.0]), "torch.float32"),
                       (torch.tensor([True, False]), "torch.bool"),
                       (torch.tensor([1j, 2j]), "torch.complex64"), (1.0, "float")]:
        with pytest.raises(TypeError, match=f"tensor of class indices .*, not {shown}$"):
            random_logit(model, x, records, bad)
    with pytest.raises(ValueError, match=r"shape \(3,\), but the batch holds 2 images: .* "
                                         r"\(B,\) = \(2,\)"):
        random_logit(model, x, records, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match=r"shape \(2, 1\)"):
        random_logit(model, x, records, torch.tensor([[0], [1]]))
    assert len(given) == 8


def test_random_logit_checks_the_class_range():
    model, x = tiny_cnn(), images()
    calls: list[int] = []
    for bad in ([0, 4], [-1, 0]):
        with pytest.raises(ValueError, match=rf"0\.\.3 of the model's 4 scores; got "
                                             rf"\[{bad[0]}, {bad[1]}\]"):
            random_logit(model, x, counted_cam(calls), torch.tensor(bad))
    assert not calls
    assert random_logit(model, x, cam, torch.tensor([0, 3])).random_classes is not None


def test_random_logit_needs_two_scores_or_more():
    x = images()
    two = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten())

    def features(m: nn.Module, inputs: Tensor, classes: Tensor) -> Tensor:
        return m[0](inputs)[torch.arange(len(inputs)), classes].detach()

    result = random_logit(two, x, features, torch.tensor([0, 1]))
    assert result.random_classes.tolist() == [1, 0]
    one = nn.Sequential(nn.Conv2d(1, 1, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    with pytest.raises(ValueError, match=r"at least 2 classes; this one returns \(2, 1\)"):
        random_logit(one, x, features, torch.tensor([0, 0]))
    with pytest.raises(ValueError, match=r"this one returns \(2, 1, 1, 1\)"):
        random_logit(one[:2], x, features, torch.tensor([0, 0]))


def test_layers_are_a_list_of_distinct_names():
    model, x, classes = tiny_cnn(), images(), torch.tensor([0, 1])
    calls: list[int] = []
    explain = counted_cam(calls)
    with pytest.raises(TypeError, match=r"pass \['6'\]"):
        cascading_randomisation(model, x, explain, classes, layers="6")
    with pytest.raises(ValueError, match="layers is empty"):
        cascading_randomisation(model, x, explain, classes, layers=[])
    with pytest.raises(ValueError, match=r"more than once: \['6', '3', '6'\]"):
        cascading_randomisation(model, x, explain, classes, layers=["6", "3", "6"])
    with pytest.raises(ValueError, match="no layer named 'head'"):
        cascading_randomisation(model, x, explain, classes, layers=["6", "head"])
    assert not calls
    result = cascading_randomisation(model, x, cam, classes, layers=[""])
    assert [s.layer for s in result.steps] == [""]  # the root: every weight at once
    twin = copy.deepcopy(model)
    original = cam(twin, x, classes)
    with torch.random.fork_rng(), torch.no_grad():  # one seed, in the order the root lists them
        torch.manual_seed(seed_reference(0, ""))
        for name in ("0", "1", "3", "6"):
            twin.get_submodule(name).reset_parameters()
    assert_step_is(result.steps[0], original, cam(twin, x, classes), "")


class Uncopyable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)

    def __deepcopy__(self, memo: dict) -> nn.Module:
        raise RuntimeError("holds an open socket")


def test_the_model_must_be_a_module_that_can_be_copied():
    x, classes = images(), torch.tensor([0, 1])
    with pytest.raises(TypeError, match="torch.nn.Module, not function"):
        cascading_randomisation(cam, x, cam, classes)
    with pytest.raises(TypeError, match="torch.nn.Module, not int"):
        random_logit(3, x, cam, classes)
    with pytest.raises(TypeError, match="copy.deepcopy failed on it: holds an open socket"):
        random_logit(Uncopyable(), x, cam, classes)


def test_what_explain_returns_is_checked_at_once():
    model, x, classes = tiny_cnn(), images(), torch.tensor([0, 1])

    class Explanation:
        maps = None

    with pytest.raises(TypeError, match=r"as a tensor \(B, \*spatial\), not Explanation "
                                        r"\(take its \.maps\)$"):
        random_logit(model, x, lambda m, i, c: Explanation(), classes)
    with pytest.raises(TypeError, match=r"not list$"):
        random_logit(model, x, lambda m, i, c: [cam(m, i, c)], classes)
    with pytest.raises(ValueError, match=r"shape \(2,\) for the classes given; expected "
                                         r"\(B, \*spatial\) with B = 2"):
        random_logit(model, x, lambda m, i, c: cam(m, i, c)[:, 0, 0], classes)
    with pytest.raises(ValueError, match=r"shape \(1, 12, 12\) for the intact model; .* B = 2"):
        cascading_randomisation(model, x, lambda m, i, c: cam(m, i, c)[:1], classes)
    with pytest.raises(ValueError, match=r"SSIM compares images"):  # (B, W) maps get that far
        random_logit(model, x, lambda m, i, c: cam(m, i, c)[:, 0], classes)

    def nan_once_randomised(m: nn.Module, i: Tensor, c: Tensor) -> Tensor:
        maps = cam(m, i, c)
        return maps if torch.equal(m[6].weight, model[6].weight) else maps * float("nan")

    with pytest.raises(ValueError, match="NaN or infinite values for 6$"):
        cascading_randomisation(model, x, nan_once_randomised, classes, layers=["6"])
    with pytest.raises(ValueError, match="NaN or infinite values for random classes$"):
        random_logit(model, x, lambda m, i, c: cam(m, i, c) / (c[:, None, None] == 0),
                     torch.tensor([0, 0]))


def test_maps_with_gradients_are_compared_as_plain_numbers():
    model, x, classes = tiny_cnn(), images(), torch.tensor([0, 1])

    def with_graph(m: nn.Module, inputs: Tensor, c: Tensor) -> Tensor:
        features = m[:4](inputs)
        return (m[6].weight[c][:, :, None, None] * features).sum(dim=1)

    result = cascading_randomisation(model, x, with_graph, classes, layers=["6"])
    step = result.steps[0]
    assert not (step.spearman.requires_grad or step.ssim.requires_grad)
    assert step.ssim.grad_fn is None
