"""Tests written to kill the mutants of ``heatlens/metrics/faithfulness.py`` and
``heatlens/metrics/imputation.py`` that survived their test files under ``tools/mutation.py``
(issue 16, "Tests that catch wrong math"; the scores and the equivalent mutants are in
``docs/testing.md``).

Each test checks a definition written out here (loops in float64, NumPy, SciPy) or an exact
property, on tiny tensors. The curves are scored by a *linear* model with ``probability=False``:
the score of a copy is then ``<w_c, x'> + b_c``, a random linear function of every one of its
pixels, so a copy with a single pixel wrong gets a wrong score.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter
from torch import Tensor, nn

from heatlens.engine.maps import gaussian_blur
from heatlens.engine.targets import ClassLogit
from heatlens.methods.sampling import seeded_generator
from heatlens.metrics import faithfulness
from heatlens.metrics.imputation import noisy_linear_impute

BUDGET = 64 << 20


class Linear(nn.Module):
    """``y = W vec(x) + b`` for ``(N, C, H, W)`` inputs, seeded weights, 3 classes."""

    def __init__(self, channels: int, h: int, w: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(11)
        self.weight = nn.Parameter(torch.randn(3, channels * h * w, generator=g))
        self.bias = nn.Parameter(torch.randn(3, generator=g))

    def forward(self, x: Tensor) -> Tensor:
        return x.flatten(1) @ self.weight.T + self.bias

    def score(self, image: Tensor, c: int) -> float:
        """The logit of class ``c`` for one image ``(C, H, W)``, in float64."""
        w, bias = self.weight[c].detach().double(), self.bias[c].detach().double()
        return float(image.double().flatten() @ w + bias)


X = torch.randn(2, 2, 4, 5, generator=torch.Generator().manual_seed(1))
CLASSES = torch.tensor([2, 0])
# (S=2, B=2, 4, 5), values in {0, 1, 2, 3}: ties everywhere, so the order among ties matters
MAPS = torch.randint(0, 4, (2, 2, 4, 5), generator=torch.Generator().manual_seed(2)).float()


@pytest.fixture(scope="module")
def linear() -> Linear:
    return Linear(2, 4, 5).eval()


def order_written_out(values: np.ndarray, most_first: bool) -> list[int]:
    """Pixel positions sorted by value (descending if ``most_first``), ties by position."""
    return sorted(range(values.size), key=lambda i: (-values[i] if most_first else values[i], i))


# --- heatlens/metrics/faithfulness.py -----------------------------------------------------------


@pytest.mark.parametrize(("step", "pixels", "expected"), [
    (0.1, 144, [round(i * 144 / 10) for i in range(11)]),  # 14.4 -> 14, 28.8 -> 29, ...
    (0.3, 10, [0, 3, 7, 10]),  # round(1 / 0.3) = 3 steps: round(10 / 3), round(20 / 3)
    (0.9, 7, [0, 7]),  # round(1 / 0.9) = 1: one step of everything
    (10, 144, [min(10 * i, 144) for i in range(16)]),  # the last step takes the 4 left
    (7, 7, [0, 7]),
    (1, 4, [0, 1, 2, 3, 4]),  # a step of 1 is one pixel, not the whole image
    (0.5, 2**24 + 1, [0, 2**23, 2**24 + 1]),  # exact beyond float32's integers (4097 x 4097)
    (3, 10, [0, 3, 6, 9, 10]),
])
def test_step_counts_written_out(step, pixels, expected):
    assert faithfulness.step_counts(step, pixels).tolist() == expected


def test_ranks_break_ties_by_position():
    for most_first in (True, False):
        places = faithfulness.ranks(MAPS, most_first=most_first)
        assert places.shape == (2, 2, 20)
        for s in range(2):
            for b in range(2):
                order = order_written_out(MAPS[s, b].flatten().numpy(), most_first)
                expected = [order.index(i) for i in range(20)]
                assert places[s, b].tolist() == expected
    assert torch.equal(faithfulness.ranks(MAPS), faithfulness.ranks(MAPS, most_first=True))


@pytest.mark.parametrize("mode", ["deletion", "insertion"])
@pytest.mark.parametrize("order", ["morf", "lerf"])
@pytest.mark.parametrize("step", [0.25, 6])
def test_step_curve_of_two_sources_written_out(linear, mode, order, step):
    """Two sources and two images: copy ``(s, b, i)`` has the first ``counts[i]`` pixels of map
    ``(s, b)``'s order changed: to the substrate (deletion, from the image) or to the image
    (insertion, from its blur of ``blur_sigma``)."""
    protocol = faithfulness.heatlens_protocol(step=step, substrate=-0.7, blur_sigma=0.8)
    curve = faithfulness.step_curve(linear, X, MAPS, CLASSES, ClassLogit(CLASSES), mode=mode,
                                    protocol=protocol, order=order, memory_budget=BUDGET,
                                    probability=False)
    counts = ([round(i * 20 / 4) for i in range(5)] if step < 1
              else [min(6 * i, 20) for i in range(5)])
    start = X if mode == "deletion" else gaussian_blur(X, 0.8)
    finish = torch.full_like(X, -0.7) if mode == "deletion" else X
    expected = torch.zeros(2, 2, 5, dtype=torch.float64)
    for s in range(2):
        for b in range(2):
            ranked = order_written_out(MAPS[s, b].flatten().numpy(), order == "morf")
            for i, count in enumerate(counts):
                image = start[b].clone().reshape(2, -1)
                image[:, ranked[:count]] = finish[b].reshape(2, -1)[:, ranked[:count]]
                expected[s, b, i] = linear.score(image, int(CLASSES[b]))
    torch.testing.assert_close(curve.y.double(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(curve.x, torch.tensor(counts) / 20)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"mode": "erasure"}, r"mode must be 'deletion' or 'insertion', not 'erasure'"),
    ({"mode": "deletion", "order": "random"}, r"order must be one of .*'morf'.*not 'random'"),
])
def test_step_curve_names_a_bad_mode_or_order(linear, kwargs, match):
    with pytest.raises(ValueError, match=match):
        faithfulness.step_curve(linear, X, MAPS, CLASSES, ClassLogit(CLASSES),
                                protocol=faithfulness.heatlens_protocol(), memory_budget=BUDGET,
                                **kwargs)


def test_the_heatlens_protocol_takes_fractions_and_whole_counts():
    """Its defaults are its docstring's (1 % steps, substrate 0, blur of sigma 5); a step is a
    fraction in (0, 1) or a whole number of pixels, and the description says which."""
    default = faithfulness.heatlens_protocol()
    assert (default.name, default.step, default.substrate) == ("heatlens", 0.01, 0.0)
    x = torch.rand(1, 2, 9, 9, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(default.blur(x), gaussian_blur(x, 5.0))
    assert default.description.startswith("1% of the pixels a step; deletion to 0, ")
    assert "Gaussian blur of 5 px" in default.description
    one = faithfulness.heatlens_protocol(step=1, substrate=-1.5, blur_sigma=2.5)
    assert one.step == 1 and one.substrate == -1.5
    assert one.description.startswith("1 pixels a step; deletion to -1.5, ")
    assert "blur of 2.5 px" in one.description
    assert faithfulness.heatlens_protocol(step=0.25).description.startswith("25% of the pixels")
    for bad in (0, 0.0, -0.5, -2, 1.5, 2.25):
        with pytest.raises(ValueError, match=rf"a whole number of pixels, not {bad!r}$"):
            faithfulness.heatlens_protocol(step=bad)


def test_the_rise_protocol_is_the_papers():
    protocol = faithfulness.RISE_PROTOCOL
    assert (protocol.name, protocol.step, protocol.substrate) == ("rise", 224, 0.0)
    x = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(protocol.blur(x), faithfulness.rise_blur(x))


@pytest.mark.parametrize(("size", "sigma"), [(7, 1.5), (5, 3.0), (9, 0.6), (11, 5.0)])
def test_rise_blur_of_any_size_is_scipys_filter_of_a_delta(size, sigma):
    """The kernel is ``gaussian_filter(delta, sigma)`` (truncated at 4 sigma, reflected at the
    edges of the ``size x size`` array, more than once when the Gaussian is wider), zero
    padding around the image."""
    delta = np.zeros((size, size))
    delta[size // 2, size // 2] = 1
    kernel = torch.from_numpy(gaussian_filter(delta, sigma, mode="reflect", truncate=4.0))
    image = torch.randn(2, 3, 13, 12, generator=torch.Generator().manual_seed(3),
                        dtype=torch.float64)
    padded = torch.nn.functional.pad(image, (size // 2,) * 4)
    expected = torch.zeros_like(image)
    for dy in range(size):
        for dx in range(size):
            expected += kernel[dy, dx] * padded[..., dy:dy + 13, dx:dx + 12]
    torch.testing.assert_close(faithfulness.rise_blur(image, size=size, sigma=sigma), expected,
                               rtol=0, atol=1e-12)
    single = faithfulness.rise_blur(image.float(), size=size, sigma=sigma)  # the input's dtype
    assert single.dtype == torch.float32
    torch.testing.assert_close(single, expected.float(), rtol=0, atol=1e-5)


def road_count(pixels: int, fraction: float, order: str) -> int:
    """How many pixels pytorch-grad-cam's threshold takes from ``pixels`` distinct values:
    those at least NumPy's ``1 - fraction`` percentile (most relevant first) or at most its
    ``fraction`` percentile (least relevant first)."""
    values = np.arange(pixels, dtype=np.float64)
    if order == "morf":
        return int((values >= np.percentile(values, 100 * (1 - fraction))).sum())
    return int((values <= np.percentile(values, 100 * fraction)).sum())


@pytest.mark.parametrize("order", ["morf", "lerf"])
@pytest.mark.parametrize("shape", [(3, 4), (1, 11), (5, 5), (2, 10), (3, 7)])
def test_road_removes_what_a_percentile_threshold_removes(order, shape):
    """Distinct values: exactly the pixels at or beyond NumPy's percentile; a constant map: as
    many pixels, the first positions (ties by position). Some percentiles fall on a pixel (11
    pixels at 0.2), some just past one by rounding (11 pixels at 0.7: 7 removed most relevant
    first, 8 least relevant first; 21 pixels at 0.85)."""
    pixels = math.prod(shape)
    distinct = torch.randperm(pixels, generator=torch.Generator().manual_seed(pixels))
    maps = torch.stack([distinct.reshape(shape).float(), torch.ones(shape)])[:, None]
    for fraction in (0.1, 0.2, 0.25, 0.3, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95):
        removed = faithfulness.road_removed(maps, fraction, order)
        assert removed.shape == maps.shape and removed.dtype == torch.bool
        values = maps[0, 0].double().numpy()
        if order == "morf":
            expected = values >= np.percentile(values, 100 * (1 - fraction))
        else:
            expected = values <= np.percentile(values, 100 * fraction)
        assert removed[0, 0].numpy().tolist() == expected.tolist()
        count = road_count(pixels, fraction, order)
        assert removed[1, 0].flatten().tolist() == [i < count for i in range(pixels)]


def road_expected(model: Linear, x: Tensor, maps: Tensor, classes: Tensor,
                  fractions: tuple[float, ...], noise: float, seed: int) -> Tensor:
    """``(S, B, 2, P)``: the score of every ROAD copy, with copy ``q`` (in the order source,
    image, MoRF/LeRF, fraction) the image imputed without noise plus ``noise`` times the
    standard normal draw of ``seeded_generator(seed, q)`` on its removed pixels."""
    s_count, b_count = maps.shape[:2]
    out = torch.zeros(s_count, b_count, 2, len(fractions), dtype=torch.float64)
    q = 0
    for s in range(s_count):
        for b in range(b_count):
            for o, order in enumerate(("morf", "lerf")):
                for p, fraction in enumerate(fractions):
                    count = road_count(maps[s, b].numel(), fraction, order)
                    ranked = order_written_out(maps[s, b].flatten().numpy(), order == "morf")
                    holes = torch.zeros(maps[s, b].numel(), dtype=torch.bool)
                    holes[ranked[:count]] = True
                    holes = holes.reshape(1, *maps.shape[2:])
                    filled = noisy_linear_impute(x[b:b + 1].double(), holes, noise=0.0)[0]
                    draw = torch.randn(x.shape[1:], dtype=x.dtype,
                                       generator=seeded_generator(seed, q, x.device))
                    image = filled + noise * draw.double() * holes
                    out[s, b, o, p] = model.score(image, int(classes[b]))
                    q += 1
    return out


@pytest.mark.parametrize(("noise", "seed"), [(0.0, 0), (0.3, 5)])
def test_road_curves_of_two_sources_written_out(linear, noise, seed):
    fractions = (0.2, 0.5, 0.75)
    morf, lerf = faithfulness.road_curves(linear, X, MAPS, CLASSES, ClassLogit(CLASSES),
                                          fractions=fractions, noise=noise, seed=seed,
                                          memory_budget=BUDGET, probability=False)
    expected = road_expected(linear, X, MAPS, CLASSES, fractions, noise, seed)
    torch.testing.assert_close(morf.y.double(), expected[:, :, 0], rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(lerf.y.double(), expected[:, :, 1], rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(morf.x, torch.tensor(fractions))
    torch.testing.assert_close(lerf.x, torch.tensor(fractions))
    road = faithfulness.road(morf, lerf)
    torch.testing.assert_close(road.double(), ((expected[:, :, 1] - expected[:, :, 0]) / 2)
                               .mean(dim=-1), rtol=1e-5, atol=1e-4)


def test_road_defaults_are_the_papers_fractions_noise_and_seed_zero(linear):
    """Fractions 0.1 ... 0.9, noise 0.01 (ROAD's and pytorch-grad-cam's), seed 0."""
    morf, lerf = faithfulness.road_curves(linear, X, MAPS[:1], CLASSES, ClassLogit(CLASSES),
                                          memory_budget=BUDGET, probability=False)
    fractions = tuple(round(0.1 * k, 1) for k in range(1, 10))
    torch.testing.assert_close(morf.x, torch.tensor(fractions))
    expected = road_expected(linear, X, MAPS[:1], CLASSES, fractions, 0.01, 0)
    torch.testing.assert_close(morf.y.double(), expected[:, :, 0], rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(lerf.y.double(), expected[:, :, 1], rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("fractions", [(), (0.0, 0.5), (0.5, 1.0), (1.2,), (-0.1,)])
def test_road_refuses_fractions_outside_0_1(linear, fractions):
    with pytest.raises(ValueError, match=rf"strictly between 0 and 1, got {fractions!r}"
                       .replace("(", r"\(").replace(")", r"\)")):
        faithfulness.road_curves(linear, X, MAPS, CLASSES, ClassLogit(CLASSES),
                                 fractions=fractions, memory_budget=BUDGET)


def test_confidence_change_of_two_sources_written_out(linear):
    """``drop = max(0, Y - O) / Y`` and ``increase = [Y < O]`` with ``O`` the score of the image
    times the map; a map of ones gives ``O = Y`` exactly: no drop and no increase."""
    maps = torch.stack([torch.rand(2, 4, 5, generator=torch.Generator().manual_seed(4)),
                        torch.ones(2, 4, 5)])
    model = Linear(2, 4, 5).eval()
    with torch.no_grad():
        model.bias += 20  # positive scores, as probabilities are
    drop, increase = faithfulness.confidence_change(model, X, maps, CLASSES, ClassLogit(CLASSES),
                                                    memory_budget=BUDGET, probability=False)
    assert drop.shape == increase.shape == (2, 2)
    for s in range(2):
        for b in range(2):
            y = model.score(X[b], int(CLASSES[b]))
            o = model.score(maps[s, b] * X[b], int(CLASSES[b]))
            assert math.isclose(float(drop[s, b]), max(0.0, y - o) / y, rel_tol=1e-4,
                                abs_tol=1e-6)
            assert float(increase[s, b]) == float(y < o)
    assert drop[1].tolist() == [0.0, 0.0] and increase[1].tolist() == [0.0, 0.0]
    assert float(increase[0].sum()) in (1.0, 2.0) and float(drop[0].sum()) > 0  # both kinds


def test_average_drop_of_a_zero_score_is_zero():
    """A class the image scores 0 for (a probability that underflowed) has nothing to drop: 0,
    not 0 / 0."""
    model = Linear(2, 4, 5).eval()
    with torch.no_grad():
        model.weight[0] = 0
        model.bias[0] = 0
    classes = torch.tensor([0, 0])
    drop, increase = faithfulness.confidence_change(model, X, MAPS, classes, ClassLogit(classes),
                                                    memory_budget=BUDGET, probability=False)
    assert drop.tolist() == [[0.0, 0.0], [0.0, 0.0]]
    assert increase.tolist() == [[0.0, 0.0], [0.0, 0.0]]


def test_aopc_of_two_sources_is_the_mean_drop_from_the_first_point():
    y = torch.rand(2, 3, 6, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    curve = faithfulness.Curve(torch.linspace(0, 1, 6), y)
    expected = torch.tensor([[sum(float(y[s, b, 0] - y[s, b, k]) for k in range(6)) / 6
                              for b in range(3)] for s in range(2)], dtype=torch.float64)
    torch.testing.assert_close(faithfulness.aopc(curve), expected)


def test_the_progress_bar_names_the_metric(linear):
    """What a watcher of the progress bars (the web app's, say) is told the work is."""
    from heatlens.engine.budget import watched

    seen: list[str] = []
    run = {"memory_budget": BUDGET, "show_progress": False}
    with watched(lambda done, total, description: seen.append(description)):
        for mode in ("deletion", "insertion"):
            faithfulness.step_curve(linear, X, MAPS, CLASSES, ClassLogit(CLASSES), mode=mode,
                                    protocol=faithfulness.heatlens_protocol(step=0.5), **run)
        faithfulness.road_curves(linear, X, MAPS, CLASSES, ClassLogit(CLASSES),
                                 fractions=(0.5,), **run)
        faithfulness.confidence_change(linear, X, MAPS, CLASSES, ClassLogit(CLASSES), **run)
    assert list(dict.fromkeys(seen)) == ["deletion", "insertion", "road", "average drop"]


# --- heatlens/metrics/imputation.py -------------------------------------------------------------

OFFSETS = {(-1, -1): 1 / 12, (-1, 0): 1 / 6, (-1, 1): 1 / 12, (0, -1): 1 / 6,
           (0, 1): 1 / 6, (1, -1): 1 / 12, (1, 0): 1 / 6, (1, 1): 1 / 12}


def neighbour_sum_written_out(x: np.ndarray) -> np.ndarray:
    """``sum_j w_ij x_j`` over the 8 neighbours inside the image, ``x`` ``(H, W)``: each offset
    of :data:`OFFSETS` as a shift of the zero-padded array."""
    h, w = x.shape
    padded = np.pad(x, 1)
    return sum(weight * padded[1 + dy:1 + dy + h, 1 + dx:1 + dx + w]
               for (dy, dx), weight in OFFSETS.items())


def hat(n: int, stride: int) -> np.ndarray:
    """``(n, nodes)``: the hats ``phi_j(i) = max(0, 1 - |i - j stride| / stride)`` of the nodes
    ``j = 0, 1, ...`` up to the first on or past the last pixel ``n - 1``."""
    nodes = 1
    while (nodes - 1) * stride < n - 1:
        nodes += 1
    i, j = np.arange(n)[:, None], np.arange(nodes)[None, :]
    return np.maximum(0.0, 1 - np.abs(i - j * stride) / stride)


def levels_written_out(h: int, w: int) -> int:
    """Halvings (``n -> floor(n / 2) + 1`` nodes) until the larger side has 4 or 5 nodes."""
    nodes, levels = max(h, w), 0
    while nodes > 5:
        nodes, levels = nodes // 2 + 1, levels + 1
    return levels


def preconditioner_written_out(removed: np.ndarray, r: np.ndarray, levels: int) -> np.ndarray:
    """``m (r / S + sum_l P_l Theta_l P_l^T r)`` for one mask ``(H, W)`` and ``r`` ``(H, W)``,
    with ``P_l`` the hats of half-width ``2^l`` and ``Theta_l = 1 / (<phi_j^2, 1> / M_l +
    <phi_j^2, g>)``: ``M_l`` a whole hat's ``sum phi^2`` and ``g_i = m_i sum_{k known} w_ik``."""
    h, w = removed.shape
    m = removed.astype(np.float64)
    total = neighbour_sum_written_out(np.ones((h, w)))
    g = m * neighbour_sum_written_out(1 - m)
    out = r / total
    for level in range(1, levels + 1):
        half = 2**level
        rows, cols = hat(h, half), hat(w, half)
        whole = sum((1 - abs(o) / half) ** 2 for o in range(1 - half, half)) ** 2
        energy = (rows**2).T @ np.ones((h, w)) @ cols**2 / whole + (rows**2).T @ g @ cols**2
        out = out + rows @ ((rows.T @ r @ cols) / energy) @ cols.T
    return m * out


MASKS = {
    "random": torch.rand(13, 21, generator=torch.Generator().manual_seed(6)) < 0.6,
    "block": torch.zeros(13, 21, dtype=torch.bool).index_fill_(0, torch.arange(2, 11), True)
    & torch.zeros(13, 21, dtype=torch.bool).index_fill_(1, torch.arange(4, 21), True),
}


@pytest.mark.parametrize("levels", [None, 0, 1, 2, 3])
def test_the_preconditioner_is_its_formula_written_out(levels):
    """Every term of ``B r``: the Jacobi part ``r / S``, the hats of every level, their energy
    ``Theta_l`` and the levels by default (down to 4 or 5 nodes on the longer side)."""
    from heatlens.metrics.imputation import multilevel_preconditioner

    removed = torch.stack(list(MASKS.values()))[:, None]
    r = torch.randn(2, 2, 13, 21, generator=torch.Generator().manual_seed(7),
                    dtype=torch.float64) * removed
    result = multilevel_preconditioner(removed.double(), levels)(r)
    count = levels_written_out(13, 21) if levels is None else levels
    for n in range(2):
        for c in range(2):
            expected = preconditioner_written_out(removed[n, 0].numpy(), r[n, c].numpy(), count)
            np.testing.assert_allclose(result[n, c].numpy(), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(("h", "w", "levels"), [(1, 3, 0), (2, 2, 0), (5, 5, 0), (6, 3, 1),
                                                (9, 9, 1), (10, 4, 2), (17, 2, 2), (18, 18, 3),
                                                (33, 7, 3), (34, 34, 4)])
def test_the_default_levels_stop_at_4_or_5_nodes(h, w, levels):
    assert levels_written_out(h, w) == levels
    from heatlens.metrics.imputation import multilevel_preconditioner

    removed = torch.zeros(1, 1, h, w, dtype=torch.float64)
    removed[..., h // 2, w // 2] = 1
    r = torch.randn(1, 1, h, w, generator=torch.Generator().manual_seed(h * w),
                    dtype=torch.float64) * removed
    expected = preconditioner_written_out(removed[0, 0].numpy() > 0, r[0, 0].numpy(), levels)
    np.testing.assert_allclose(multilevel_preconditioner(removed)(r)[0, 0].numpy(), expected,
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape", [(1, 1), (2, 3), (5, 8), (9, 4), (7, 7)])
def test_restrict_and_prolong_are_the_hats_of_half_width_2(shape):
    """``P`` is linear interpolation from every other pixel, with one node on or past each far
    edge; ``restrict`` is ``P^T``, ``prolong`` is ``P``."""
    from heatlens.metrics.imputation import prolong, restrict

    rows, cols = hat(shape[0], 2), hat(shape[1], 2)
    g = torch.Generator().manual_seed(8)
    r = torch.randn(2, 3, *shape, generator=g, dtype=torch.float64)
    c = torch.randn(2, 3, rows.shape[1], cols.shape[1], generator=g, dtype=torch.float64)
    np.testing.assert_allclose(restrict(r).numpy(), rows.T @ r.numpy() @ cols, atol=1e-13)
    np.testing.assert_allclose(prolong(c, torch.Size(shape)).numpy(), rows @ c.numpy() @ cols.T,
                               atol=1e-13)


def system_written_out(image: np.ndarray, removed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Dense ``A = diag(S_R) - W_RR`` and ``b = W_RK v`` (one column per channel) for ``image``
    ``(C, H, W)`` and ``removed`` ``(H, W)``, the docstring's system."""
    c, h, w = image.shape
    weight = np.zeros((h * w, h * w))
    for i in range(h):
        for j in range(w):
            for (dy, dx), value in OFFSETS.items():
                if 0 <= i + dy < h and 0 <= j + dx < w:
                    weight[i * w + j, (i + dy) * w + j + dx] = value
    gone = removed.flatten()
    a = np.diag(weight[gone].sum(axis=1)) - weight[np.ix_(gone, gone)]
    b = weight[np.ix_(gone, ~gone)] @ image.reshape(c, -1)[:, ~gone].T
    return a, b


@pytest.mark.parametrize("tol", [1e-2, 1e-4, 1e-8])
def test_the_residual_left_is_below_tol_times_the_right_hand_side(tol):
    """The stopping rule as documented: ``|b - A x| <= tol |b|`` for every image and channel,
    and the largest ``|b - A x| / |b|`` is what :func:`harmonic_cg` reports. Small values (about
    0.01) so that the rule is relative to ``b``, not to any other start."""
    from heatlens.metrics.imputation import harmonic_cg

    removed = torch.stack(list(MASKS.values()))
    images = 0.01 * torch.rand(2, 2, 13, 21, generator=torch.Generator().manual_seed(9),
                               dtype=torch.float64)
    result = noisy_linear_impute(images, removed, noise=0, tol=tol)
    values = torch.where(removed[:, None], 0.0, images)
    solved, steps, worst = harmonic_cg(values, removed[:, None], tol=tol, max_iter=200)
    assert torch.equal(solved, result)
    relative = []
    for n in range(2):
        a, b = system_written_out(images[n].numpy(), removed[n].numpy())
        x = result[n].numpy().reshape(2, -1)[:, removed[n].flatten().numpy()].T
        left = np.linalg.norm(b - a @ x, axis=0) / np.linalg.norm(b, axis=0)
        assert (left <= tol * (1 + 1e-6)).all()
        relative.extend(left)
    assert math.isclose(worst, max(relative), rel_tol=1e-6)
    assert steps >= 1


def test_the_iterations_reported_are_the_iterations_made():
    """With ``max_iter`` the number it reports, the same result; with one fewer, not converged."""
    from heatlens.metrics.imputation import harmonic_cg

    removed = torch.stack(list(MASKS.values()))[:, None]
    values = torch.where(removed, 0.0, torch.rand(2, 3, 13, 21, dtype=torch.float64,
                                                  generator=torch.Generator().manual_seed(10)))
    free, steps, worst = harmonic_cg(values, removed, tol=1e-9, max_iter=1000)
    assert worst <= 1e-9 and steps > 2
    exact, same_steps, same_worst = harmonic_cg(values, removed, tol=1e-9, max_iter=steps)
    assert torch.equal(exact, free) and (same_steps, same_worst) == (steps, worst)
    once, one, _ = harmonic_cg(values, removed, tol=1e-9, max_iter=1)
    assert one == 1 and not torch.equal(once, values)  # the one iteration allowed is made
    _, fewer, short = harmonic_cg(values, removed, tol=1e-9, max_iter=steps - 1)
    assert fewer == steps - 1 and short > 1e-9
    with pytest.warns(UserWarning, match=rf"stopped after {steps - 1} iterations with a relative "
                      rf"residual of {short:.1e}, above tol=1e-09: pass a larger max_iter"):
        noisy_linear_impute(values, removed[:, 0], noise=0, tol=1e-9, max_iter=steps - 1)


IMAGES = torch.rand(3, 2, 5, 6, generator=torch.Generator().manual_seed(0))
REMOVED = torch.rand(3, 5, 6, generator=torch.Generator().manual_seed(1)) < 0.5


def test_errors_show_the_values_they_are_about():
    removed = REMOVED.clone()
    removed[1:] = True
    with pytest.raises(ValueError, match=r"^image 1 of the batch of 3 has every pixel removed "
                                         r"\(2 such images\)"):
        noisy_linear_impute(IMAGES, removed)
    images = IMAGES.clone()
    images[2, 1, ~REMOVED[2]] = float("nan")
    known = int((~REMOVED[2]).sum())
    with pytest.raises(ValueError, match=rf"^image 2 of the batch of 3 holds NaN or infinite "
                                         rf"values in pixels it keeps \({known} of 60\)"):
        noisy_linear_impute(images, REMOVED)
    with pytest.raises(ValueError, match=r"= \(3, 5, 6\) to match images of shape \(3, 2, 5, 6\), "
                                         r"got \(3, 6, 5\)"):
        noisy_linear_impute(IMAGES, REMOVED.transpose(1, 2))
    with pytest.raises(ValueError, match=r"tensor, got list: add the batch"):
        noisy_linear_impute([IMAGES], REMOVED)
    with pytest.raises(TypeError, match=r"bool tensor \(True = pixel removed\), got ndarray"):
        noisy_linear_impute(IMAGES, REMOVED.numpy())
    with pytest.raises(TypeError, match=r"bool tensor \(True = pixel removed\), got torch.int64"):
        noisy_linear_impute(IMAGES, REMOVED.long())
    with pytest.raises(ValueError, match=r"^removed is on meta but images on cpu"):
        noisy_linear_impute(IMAGES, REMOVED.to("meta"))
    for option, value, message in [("noise", -0.5, r"noise must be .* >= 0, got -0.5"),
                                   ("noise", float("nan"), r"noise must be .* >= 0, got nan"),
                                   ("tol", -1e-3, r"tol must be > 0, got -0.001"),
                                   ("tol", float("nan"), r"tol must be > 0, got nan"),
                                   ("max_iter", 0, r"\(or None for 200\), got 0")]:
        with pytest.raises(ValueError, match=message):
            noisy_linear_impute(IMAGES, REMOVED, **{option: value})
    with pytest.warns(UserWarning, match=r"stopped after 1 iterations"):  # 1 is allowed
        noisy_linear_impute(IMAGES, REMOVED, noise=0, max_iter=1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_noise_is_the_generators_standard_normal_draw(dtype):
    """``u + noise z`` on the removed pixels, ``z`` the float64 standard normal draw of
    ``generator`` for the images' shape (so the same draw for any dtype of images); by default
    ``noise = 0.01`` and ``tol = 1e-6``."""
    removed = torch.stack(list(MASKS.values()))
    images = torch.rand(2, 3, 13, 21, generator=torch.Generator().manual_seed(12)).to(dtype)
    clean = noisy_linear_impute(images, removed, noise=0, tol=1e-6)
    z = torch.randn(images.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    gone = removed[:, None].expand_as(images)
    for noise in (0.3, None):
        options = {} if noise is None else {"noise": noise}
        result = noisy_linear_impute(images, removed, generator=torch.Generator().manual_seed(3),
                                     **options)
        expected = clean.double() + (0.01 if noise is None else noise) * z
        torch.testing.assert_close(result[gone].double(), expected[gone],
                                   rtol=0, atol=1e-6 if dtype == torch.float32 else 1e-12)
        assert torch.equal(result[~gone], images[~gone])


@pytest.mark.parametrize("metric", ["deletion", "road", "drop"])
def test_chunks_are_as_large_as_the_budget_allows_for_one_input(metric):
    """The chunk size is :func:`items_per_chunk` for one input (``x[:1]``) and its mask."""
    from heatlens.engine.budget import items_per_chunk

    model = Linear(2, 4, 5).eval()
    sizes: list[int] = []
    model.register_forward_pre_hook(lambda module, args: sizes.append(args[0].shape[0]))
    budget = 3_000
    chunk = items_per_chunk(model, X[:1], budget, extra_per_item=X[:1].numel() * 8)
    sizes.clear()
    run = {"memory_budget": budget, "probability": False}
    if metric == "deletion":
        protocol = faithfulness.heatlens_protocol(step=0.1)
        faithfulness.step_curve(model, X, MAPS, CLASSES, ClassLogit(CLASSES), mode="deletion",
                                protocol=protocol, **run)
        total = 2 * 2 * 11
    elif metric == "road":
        faithfulness.road_curves(model, X, MAPS, CLASSES, ClassLogit(CLASSES), **run)
        total = 2 * 2 * 2 * 9
    else:
        faithfulness.confidence_change(model, X, MAPS, CLASSES, ClassLogit(CLASSES), **run)
        total = 2 + 2 * 2
    assert 1 < chunk < total
    assert sizes == [chunk] * (total // chunk) + ([total % chunk] if total % chunk else [])


def test_a_channel_with_nothing_to_fill_in_from_stays_zero():
    """A channel that is 0 at every known pixel has ``b = 0``: its solution is 0, reached
    before any iteration (no division by its zero residual), and the others are unaffected."""
    removed = torch.stack(list(MASKS.values()))
    images = torch.rand(2, 3, 13, 21, generator=torch.Generator().manual_seed(13),
                        dtype=torch.float64)
    images[1, 2] = 0
    result = noisy_linear_impute(images, removed, noise=0)
    assert torch.equal(result[1, 2], torch.zeros(13, 21, dtype=torch.float64))
    alone = noisy_linear_impute(images[1:, :2], removed[1:], noise=0)
    torch.testing.assert_close(result[1:, :2], alone, rtol=0, atol=1e-6)


def test_road_noise_of_float64_images_is_drawn_in_float64():
    """Copy ``q``'s noise is the draw of ``seeded_generator(seed, q)`` in the images' dtype."""
    model = Linear(2, 4, 5).double().eval()
    x = X.double()
    morf, lerf = faithfulness.road_curves(model, x, MAPS[:1], CLASSES, ClassLogit(CLASSES),
                                          fractions=(0.3, 0.6), noise=0.5, seed=2,
                                          memory_budget=BUDGET, probability=False)
    expected = road_expected(model, x, MAPS[:1], CLASSES, (0.3, 0.6), 0.5, 2)
    torch.testing.assert_close(morf.y.double(), expected[:, :, 0], rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(lerf.y.double(), expected[:, :, 1], rtol=1e-5, atol=1e-4)


def test_the_preconditioner_of_a_large_image_is_its_formula_written_out():
    """520 x 24 pixels: 8 levels, whose hats (half-width up to 256) have energies that float32
    would round."""
    from heatlens.metrics.imputation import multilevel_preconditioner

    g = torch.Generator().manual_seed(14)
    removed = (torch.rand(1, 1, 520, 24, generator=g) < 0.7).double()
    r = torch.randn(1, 1, 520, 24, generator=g, dtype=torch.float64) * removed
    assert levels_written_out(520, 24) == 8
    expected = preconditioner_written_out(removed[0, 0].numpy() > 0, r[0, 0].numpy(), 8)
    np.testing.assert_allclose(multilevel_preconditioner(removed)(r)[0, 0].numpy(), expected,
                               rtol=1e-13, atol=1e-13)


def test_the_inner_solver_stops_relative_to_its_right_hand_side():
    """``_pcg`` stops when ``|b - 12 A d| <= goal |b|``: a relative test, so scaling ``b`` by
    ``s`` scales ``d`` by ``s`` and takes the same iterations (conjugate gradients is linear in
    ``b``); a threshold not proportional to ``|b|`` (``goal / |b|``) stops at another step.
    The caller hands it unit-norm right-hand sides, so only a direct call shows this."""
    from heatlens.metrics.imputation import _norm, _pcg, multilevel_preconditioner, tent

    generator = torch.Generator().manual_seed(7)
    removed = torch.rand(1, 1, 12, 12, generator=generator) < 0.6
    inner = removed.float()
    centre = tent(torch.ones(1, 1, 12, 12)).float()
    b = torch.randn(1, 2, 12, 12, generator=generator) * inner
    solve = {"minus": -inner, "centre": centre, "precondition": multilevel_preconditioner(inner)}
    goal = torch.full((1, 2, 1, 1), 1e-3)
    d, steps = _pcg(b, goal, 100, **solve)
    for scale in (1e-2, 1e2):
        scaled, scaled_steps = _pcg(b * scale, goal, 100, **solve)
        assert scaled_steps == steps
        torch.testing.assert_close(scaled, d * scale, rtol=1e-4, atol=1e-6 * scale)
    residual = b - (tent(d).addcmul_(centre, d, value=-1).mul_(-inner))
    assert bool((_norm(residual) <= goal * _norm(b)).all())
