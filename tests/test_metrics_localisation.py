"""Localisation metrics (``heatlens.metrics.localisation``) and model-blind controls
(``heatlens.metrics.controls``).

1. Each metric against its formula written out here with numpy, pixel by pixel, on hand-made
   cases whose answer is known (a peak inside the object, just within and just beyond the 15 px
   tolerance, diagonally; a mask covering half the map; ties at the K-th value of the rank).
2. Agreement with Quantus 0.6 on the same maps and masks (24 maps of 64 x 64: 16 of Gaussian
   blobs, half of them peaking in an object, and 8 of uniform noise; masks from 1 or 2 random
   boxes per image), with Quantus' ``normalise`` and ``abs`` off so both see the same numbers:
   ``PointingGame`` = ``pointing_game(tolerance=0)`` exactly, ``RelevanceRankAccuracy`` =
   ``relevance_rank`` (maps without ties) and ``RelevanceMassAccuracy`` = ``relevance_mass`` to
   1e-12 on float64 maps, ``AttributionLocalisation`` (Kohlbrenner et al.'s positive inside-total
   ratio, ``+ 1e-9`` in its denominator) = ``energy_inside`` to 1e-9; on float32 maps to 1e-6.
3. Where Quantus differs from the papers, a test shows it: its pointing game has no tolerance,
   counts any tied maximum as the point and scores an empty mask as a hit; its rank accuracy
   orders ties as ``argsort`` happens to; its mass accuracy divides signed sums.
4. Boxes to masks: the pixel convention at the borders, several boxes per image, the input
   forms, and one-line errors. The metrics' own input errors.
5. Controls: shapes, seeding, the Gaussian's peak and formula, and the Sobel map against
   ``scipy.ndimage.sobel`` and on a vertical step.
"""

from __future__ import annotations

import itertools
import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from heatlens.metrics.controls import centred_gaussian, edge_map, random_map
from heatlens.metrics.localisation import (
    boxes_to_masks,
    energy_inside,
    pointing_game,
    relevance_mass,
    relevance_rank,
)

H = W = 64

# ------------------------------------------------------------------------------------------------
# The formulas, written out independently: numpy, one image at a time, pixel lists.
# ------------------------------------------------------------------------------------------------


def ref_pointing(m: np.ndarray, mask: np.ndarray, tolerance: float) -> float:
    """Hit iff every maximum pixel is within ``tolerance`` (Euclidean, pixel centres) of an
    object pixel."""
    peaks = np.argwhere(m == m.max())
    objects = np.argwhere(mask)
    nearest = [np.sqrt(((objects - p) ** 2).sum(axis=1)).min() for p in peaks]
    return float(all(d <= tolerance for d in nearest))


def ref_energy(m: np.ndarray, mask: np.ndarray) -> float:
    return float(m[mask].sum() / m.sum())


def ref_mass(m: np.ndarray, mask: np.ndarray) -> float:
    positive = np.where(m > 0, m, 0.0)
    return float(positive[mask].sum() / positive.sum())


def ref_rank(m: np.ndarray, mask: np.ndarray) -> float:
    """Without ties at the K-th value: the share of the K highest pixels on the object."""
    k = int(mask.sum())
    top = np.argsort(-m.ravel(), kind="stable")[:k]
    return float(mask.ravel()[top].mean())


def ref_rank_all_orders(m: np.ndarray, mask: np.ndarray) -> float:
    """With ties: the mean over every way of choosing the tied pixels that fill the top K."""
    k = int(mask.sum())
    flat, inside = m.ravel(), mask.ravel()
    kth = np.sort(flat)[::-1][k - 1]
    above = np.flatnonzero(flat > kth)
    tied = np.flatnonzero(flat == kth)
    scores = [(inside[above].sum() + inside[list(chosen)].sum()) / k
              for chosen in itertools.combinations(tied, k - len(above))]
    return float(np.mean(scores))


def box_mask(x1: int, y1: int, x2: int, y2: int, h: int = H, w: int = W) -> torch.Tensor:
    mask = torch.zeros(h, w, dtype=torch.bool)
    mask[y1:y2, x1:x2] = True
    return mask


def peak_at(row: int, col: int, h: int = H, w: int = W) -> torch.Tensor:
    """A smooth map whose unique maximum is at ``(row, col)``."""
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float64),
                            torch.arange(w, dtype=torch.float64), indexing="ij")
    return torch.exp(-((ys - row) ** 2 + (xs - col) ** 2) / (2 * 6.0**2))


# ------------------------------------------------------------------------------------------------
# 1. Hand-made cases against the formulas
# ------------------------------------------------------------------------------------------------

BOX = (20, 20, 40, 40)  # x1, y1, x2, y2: rows and columns 20..39


@pytest.mark.parametrize(("row", "col", "hit"), [
    (30, 30, 1.0),  # inside
    (39, 39, 1.0),  # on the last object pixel
    (30, 54, 1.0),  # 15 px right of column 39: within
    (30, 55, 0.0),  # 16 px: beyond
    (4, 30, 0.0),   # 16 px above row 20
    (5, 30, 1.0),   # 15 px above
    (49, 50, 1.0),  # diagonal (10, 11): sqrt(221) = 14.9
    (50, 50, 0.0),  # diagonal (11, 11): sqrt(242) = 15.6 (a square window would hit)
    (60, 2, 0.0),   # far away
])
def test_pointing_game_tolerance_is_a_euclidean_disc(row, col, hit):
    maps = peak_at(row, col)[None]
    masks = box_mask(*BOX)[None]
    assert pointing_game(maps, masks).tolist() == [hit]
    assert ref_pointing(maps[0].numpy(), masks[0].numpy(), 15) == hit
    inside = 1.0 if (20 <= row < 40 and 20 <= col < 40) else 0.0
    assert pointing_game(maps, masks, tolerance=0).tolist() == [inside]


def test_pointing_game_matches_the_formula_on_a_batch():
    gen = torch.Generator().manual_seed(3)
    maps = torch.randn(12, 40, 48, generator=gen).double()
    masks = torch.stack([box_mask(*box, h=40, w=48) for box in
                         [(0, 0, 5, 5), (10, 10, 30, 20), (40, 30, 48, 40), (20, 0, 21, 40)] * 3])
    for tolerance in (0, 3, 7.5, 15):
        got = pointing_game(maps, masks, tolerance=tolerance)
        want = [ref_pointing(m.numpy(), k.numpy(), tolerance) for m, k in zip(maps, masks,
                                                                              strict=True)]
        assert got.tolist() == want
    assert 0 < got.sum() < len(got)  # both hits and misses occur


def test_pointing_game_ties_need_every_maximum_within_reach():
    masks = box_mask(*BOX)[None].repeat(2, 1, 1)
    maps = torch.zeros(2, H, W)
    maps[0, 30, 30] = maps[0, 32, 25] = 1.0  # two maxima, both inside
    maps[1, 30, 30] = maps[1, 60, 2] = 1.0  # one inside, one far away
    assert pointing_game(maps, masks).tolist() == [1.0, 0.0]
    assert [ref_pointing(m.numpy(), k.numpy(), 15) for m, k in zip(maps, masks,
                                                                  strict=True)] == [1.0, 0.0]


def test_pointing_game_constant_map_points_at_nothing():
    masks = torch.ones(2, H, W, dtype=torch.bool)  # even an object covering the whole image
    maps = torch.stack([torch.full((H, W), 0.7), torch.zeros(H, W)])
    with pytest.warns(UserWarning, match=r"pointing_game: map\(s\) 0, 1 are constant"):
        assert pointing_game(maps, masks).tolist() == [0.0, 0.0]


def test_energy_inside_half_mask():
    masks = torch.zeros(3, H, W, dtype=torch.bool)
    masks[:, :, : W // 2] = True  # the left half
    maps = torch.ones(3, H, W)
    maps[0, :, W // 2:] = 3.0  # 1 on the object, 3 beside it: 1 / (1 + 3)
    maps[1] = torch.rand(H, W, generator=torch.Generator().manual_seed(0))
    # maps[2] is constant 1: the object's share of the image
    got = energy_inside(maps, masks)
    torch.testing.assert_close(got[0], torch.tensor(0.25))
    torch.testing.assert_close(got[2], torch.tensor(0.5))
    for g, m, k in zip(got, maps, masks, strict=True):
        assert float(g) == pytest.approx(ref_energy(m.numpy(), k.numpy()), abs=1e-6)


def test_energy_inside_refuses_negative_maps_and_scores_no_energy_as_zero():
    masks = box_mask(*BOX)[None].repeat(2, 1, 1)
    signed = peak_at(30, 30)[None].repeat(2, 1, 1) - 0.1
    with pytest.raises(ValueError, match=r"^energy_inside: map 0 has negative values \(down to "
                                         r"-0.1\).*use relevance_mass"):
        energy_inside(signed, masks)
    maps = torch.stack([peak_at(30, 30), torch.zeros(H, W, dtype=torch.float64)])
    with pytest.warns(UserWarning, match=r"energy_inside: map\(s\) 1 hold no positive value"):
        got = energy_inside(maps, masks)
    assert got[1] == 0.0
    assert float(got[0]) == pytest.approx(ref_energy(maps[0].numpy(), masks[0].numpy()),
                                          rel=1e-12)


def test_relevance_mass_counts_only_positive_relevance():
    masks = torch.zeros(1, H, W, dtype=torch.bool)
    masks[:, :, : W // 2] = True
    maps = torch.full((1, H, W), 2.0, dtype=torch.float64)
    maps[:, :, W // 2:] = -5.0  # evidence against, beside the object
    maps[0, 10, 50] = 1.0  # one positive pixel beside the object
    inside = 2.0 * H * W / 2
    assert relevance_mass(maps, masks).item() == pytest.approx(inside / (inside + 1.0), rel=1e-12)
    assert relevance_mass(maps, masks).item() == pytest.approx(ref_mass(maps[0].numpy(),
                                                                        masks[0].numpy()))
    # on a non-negative map it is the energy share
    positive = maps.clamp_min(0)
    torch.testing.assert_close(relevance_mass(positive, masks), energy_inside(positive, masks))
    with pytest.warns(UserWarning, match=r"relevance_mass: map\(s\) 0 hold no positive value"):
        assert relevance_mass(-maps.abs(), masks).item() == 0.0


def test_relevance_rank_without_ties():
    masks = box_mask(0, 0, 8, 8)[None].repeat(3, 1, 1)  # K = 64
    ramp = torch.arange(H * W, dtype=torch.float64).reshape(H, W).flip(0, 1) / (H * W)
    maps = torch.stack([ramp.flip(0, 1), ramp, torch.zeros(H, W, dtype=torch.float64)])
    maps[2, 0:8, 0:4] = 1.0 + torch.rand(8, 4, dtype=torch.float64)  # 32 of the top 64 inside
    maps[2, 40:48, 40:44] = 1.0 + torch.rand(8, 4, dtype=torch.float64)  # 32 outside
    maps[2] += 1e-3 * torch.rand(H, W, dtype=torch.float64)  # no ties
    got = relevance_rank(maps, masks)
    assert float(got[2]) == pytest.approx(0.5)
    for g, m, k in zip(got, maps, masks, strict=True):
        assert float(g) == pytest.approx(ref_rank(m.numpy(), k.numpy()), abs=1e-12)
    # negative values rank below zero: the 4 positive pixels on the object lead, then the zeros
    signed = torch.full((1, 4, 4), -1.0)
    signed[0, 0, :2] = 0.0
    signed[0, 3, :2] = 0.0
    signed[0, 1, :2] = 0.5
    signed[0, 2, :2] = 0.5
    small = torch.zeros(1, 4, 4, dtype=torch.bool)
    small[0, 1:3, :2] = True  # K = 4: exactly the positive pixels
    assert relevance_rank(signed, small).item() == 1.0


def test_relevance_rank_ties_are_shared_as_the_mean_over_all_orders():
    gen = torch.Generator().manual_seed(5)
    for _ in range(20):
        maps = torch.randint(0, 4, (1, 5, 5), generator=gen).float()  # many ties
        masks = torch.rand(1, 5, 5, generator=gen) < 0.3
        if not masks.any() or maps.min() == maps.max():
            continue
        want = ref_rank_all_orders(maps[0].numpy(), masks[0].numpy())
        assert relevance_rank(maps, masks).item() == pytest.approx(want, abs=1e-6)


def test_relevance_rank_constant_map_scores_chance():
    masks = box_mask(*BOX)[None]
    with pytest.warns(UserWarning, match=r"relevance_rank: map\(s\) 0 are constant"):
        got = relevance_rank(torch.full((1, H, W), 0.3), masks)
    assert got.item() == pytest.approx(400 / (H * W))


def test_metrics_are_batched_on_the_maps_dtype():
    gen = torch.Generator().manual_seed(9)
    maps = torch.rand(5, 16, 16, generator=gen)
    masks = torch.rand(5, 16, 16, generator=gen) < 0.4
    for metric in (pointing_game, energy_inside, relevance_mass, relevance_rank):
        whole = metric(maps, masks)
        assert whole.shape == (5,) and whole.dtype == torch.float32
        one_by_one = torch.cat([metric(maps[i:i + 1], masks[i:i + 1]) for i in range(5)])
        torch.testing.assert_close(whole, one_by_one)
        assert metric(maps.double(), masks).dtype == torch.float64


# ------------------------------------------------------------------------------------------------
# The metrics' input errors: one line naming the problem and the fix
# ------------------------------------------------------------------------------------------------

METRICS = [pointing_game, energy_inside, relevance_mass, relevance_rank]


def _bad_inputs():
    maps = torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(0))
    masks = torch.zeros(3, 8, 8, dtype=torch.bool)
    masks[:, 2:5, 2:5] = True
    nan = maps.clone()
    nan[1, 3, 3] = float("nan")
    inf = maps.clone()
    inf[2, 0, 0] = float("inf")
    empty = masks.clone()
    empty[2] = False
    return [
        (maps, masks[:, :4], ValueError, r"maps are \(3, 8, 8\) but masks are \(3, 4, 8\); they "
                                         r"must match: upsample the maps"),
        (maps[:2], masks, ValueError, r"maps are \(2, 8, 8\) but masks are \(3, 8, 8\)"),
        (maps, empty, ValueError, r"mask 2 is empty \(no object pixel\), where the score is "
                                  r"undefined: leave image 2 out"),
        (nan, masks, ValueError, r"map 1 holds NaN: fix the explanation"),
        (inf, masks, ValueError, r"map 2 holds inf"),
        (maps, masks.float(), TypeError, r"masks of dtype bool \(True = object\), got "
                                         r"torch.float32: pass masks > 0.5"),
        (maps[0], masks[0], ValueError, r"maps \(B, H, W\), got shape \(8, 8\): add the batch "
                                        r"dimension with maps\[None\]"),
        (maps[:, None], masks, ValueError, r"got shape \(3, 1, 8, 8\): drop the channel with "
                                           r"maps\[:, 0\]"),
        (maps.numpy(), masks, TypeError, r"as torch tensors, got ndarray and Tensor"),
    ]


@pytest.mark.parametrize("metric", METRICS, ids=lambda m: m.__name__)
@pytest.mark.parametrize(("maps", "masks", "error", "message"), _bad_inputs())
def test_metrics_refuse_bad_input_in_one_line(metric, maps, masks, error, message):
    with pytest.raises(error, match=message) as caught:
        metric(maps, masks)
    assert str(caught.value).startswith(metric.__name__)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("tolerance", [-1, float("nan"), "15", True])
def test_pointing_game_refuses_a_bad_tolerance(tolerance):
    masks = box_mask(*BOX)[None]
    with pytest.raises(ValueError, match=r"tolerance >= 0 in pixels"):
        pointing_game(peak_at(30, 30)[None], masks, tolerance=tolerance)


# ------------------------------------------------------------------------------------------------
# 2. Agreement with Quantus 0.6
# ------------------------------------------------------------------------------------------------


def _scene(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """24 maps (64 x 64, float64) and masks from boxes: 16 maps of 1 or 2 anisotropic Gaussian
    blobs at sub-pixel centres (for even i the first blob sits in the image's first box, so
    the pointing game has hits), 8 of uniform noise."""
    gen = torch.Generator().manual_seed(seed)

    def ints(low: int, high: int, n: int = 1) -> list[int]:
        return torch.randint(low, high, (n,), generator=gen).tolist()

    boxes = []
    for _ in range(24):
        image = []
        for _ in range(ints(1, 3)[0]):
            x1, y1 = ints(0, 44, 2)
            w, h = ints(8, 24, 2)
            image.append([x1, y1, min(x1 + w, W), min(y1 + h, H)])
        boxes.append(image)
    ys, xs = torch.meshgrid(torch.arange(H, dtype=torch.float64),
                            torch.arange(W, dtype=torch.float64), indexing="ij")
    maps = []
    for i in range(16):
        m = torch.zeros(H, W, dtype=torch.float64)
        for j in range(ints(1, 3)[0]):
            if i % 2 == 0 and j == 0:
                x1, y1, x2, y2 = boxes[i][0]
                u, v = torch.rand(2, generator=gen, dtype=torch.float64).tolist()
                cx, cy = x1 + u * (x2 - x1 - 1), y1 + v * (y2 - y1 - 1)
                weight = 2.0
            else:
                cx, cy = (torch.rand(2, generator=gen, dtype=torch.float64) * 60 + 2).tolist()
                weight = 1.0
            sx, sy = (torch.rand(2, generator=gen, dtype=torch.float64) * 8 + 3).tolist()
            m += weight * torch.exp(-((xs - cx) ** 2 / (2 * sx**2) + (ys - cy) ** 2 / (2 * sy**2)))
        maps.append(m)
    maps.extend(torch.rand(8, H, W, generator=gen, dtype=torch.float64).unbind(0))
    return torch.stack(maps), boxes_to_masks(boxes, (H, W))


def _quantus(metric_class, maps: torch.Tensor, masks: torch.Tensor, **options) -> np.ndarray:
    """A Quantus 0.6 localisation metric on precomputed maps (``a_batch``) and masks
    (``s_batch``), shaped ``(B, 1, H, W)``, with its normalisation and abs off. It wraps a model,
    which these metrics never call when ``a_batch`` is given: a tiny linear one."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(H * W, 2)).eval()
    metric = metric_class(abs=False, normalise=False, disable_warnings=True, **options)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scores = metric(model=model, x_batch=maps[:, None].float().numpy(),
                        y_batch=np.zeros(len(maps), dtype=np.int64),
                        a_batch=maps[:, None].numpy(), s_batch=masks[:, None].numpy().astype(
                            np.float32), channel_first=True, device="cpu")
    return np.asarray(scores, dtype=np.float64)


@pytest.fixture(scope="module")
def quantus():
    return pytest.importorskip("quantus")


@pytest.fixture(scope="module")
def scene():
    return _scene()


def test_scene_has_no_ties_at_the_kth_value(scene):
    """So the rank comparison below is not decided by how ties are ordered."""
    maps, masks = scene
    for m, k in zip(maps, masks, strict=True):
        ordered = m.flatten().sort(descending=True).values
        kth = int(k.sum()) - 1
        assert ordered[kth] != ordered[kth + 1] and ordered[kth] != ordered[kth - 1]


def test_pointing_game_agrees_with_quantus_without_tolerance(quantus, scene):
    maps, masks = scene
    ours = pointing_game(maps, masks, tolerance=0).numpy()
    theirs = _quantus(quantus.PointingGame, maps, masks)
    np.testing.assert_array_equal(ours, theirs)
    assert 4 <= ours.sum() <= len(ours) - 4  # hits and misses both occur


def test_relevance_mass_agrees_with_quantus(quantus, scene):
    maps, masks = scene
    theirs = _quantus(quantus.RelevanceMassAccuracy, maps, masks)
    np.testing.assert_allclose(relevance_mass(maps, masks).numpy(), theirs, rtol=0, atol=1e-12)
    np.testing.assert_allclose(relevance_mass(maps.float(), masks).numpy(), theirs, atol=1e-6)


def test_energy_inside_agrees_with_quantus_attribution_localisation(quantus, scene):
    """Kohlbrenner et al.'s inside-total ratio of positive attribution, as Quantus computes it
    (with ``+ 1e-9`` in the denominator), is the energy share on non-negative maps."""
    maps, masks = scene
    theirs = _quantus(quantus.AttributionLocalisation, maps, masks)
    np.testing.assert_allclose(energy_inside(maps, masks).numpy(), theirs, rtol=0, atol=1e-9)


def test_relevance_rank_agrees_with_quantus(quantus, scene):
    maps, masks = scene
    theirs = _quantus(quantus.RelevanceRankAccuracy, maps, masks)
    np.testing.assert_allclose(relevance_rank(maps, masks).numpy(), theirs, rtol=0, atol=1e-12)
    assert len(np.unique(theirs)) > 10  # the scores are spread, not all 0 or 1


# ------------------------------------------------------------------------------------------------
# 3. Where Quantus differs from the papers
# ------------------------------------------------------------------------------------------------


def test_quantus_pointing_game_has_no_tolerance(quantus):
    """Zhang et al. allow 15 px; Quantus counts only the object itself."""
    maps = peak_at(30, 49)[None]  # 10 px right of the object's last column (39)
    masks = box_mask(*BOX)[None]
    assert pointing_game(maps, masks).tolist() == [1.0]
    assert pointing_game(maps, masks, tolerance=0).tolist() == [0.0]
    assert _quantus(quantus.PointingGame, maps, masks).tolist() == [0.0]


def test_quantus_pointing_game_counts_any_tied_maximum(quantus):
    """Quantus hits when one of several equal maxima is on the object, so a map that is its
    maximum almost everywhere hits any object; here every maximum must be within reach."""
    masks = box_mask(*BOX)[None].repeat(2, 1, 1)
    maps = torch.zeros(2, H, W, dtype=torch.float64)
    maps[0, 30, 30] = maps[0, 60, 2] = 1.0  # one inside, one far away
    maps[1] = 1.0
    maps[1, 0, 0] = 0.0  # the maximum everywhere but one pixel (not constant)
    assert _quantus(quantus.PointingGame, maps, masks).tolist() == [1.0, 1.0]
    assert pointing_game(maps, masks).tolist() == [0.0, 0.0]


def test_quantus_pointing_game_scores_an_empty_mask_as_a_hit(quantus):
    """Quantus sets ``hit = np.nan`` for an empty mask in a bool array, which stores True."""
    maps = peak_at(30, 30)[None]
    empty = torch.zeros(1, H, W, dtype=torch.bool)
    assert _quantus(quantus.PointingGame, maps, empty).tolist() == [1.0]
    with pytest.raises(ValueError, match="mask 0 is empty"):
        pointing_game(maps, empty)


def test_quantus_rank_accuracy_orders_ties_arbitrarily(quantus):
    """K = 4 object pixels and 15 pixels tied at the top (4 of them on the object): any one order
    of the ties gives a multiple of 1/4; the mean over all orders, 4 * 4/15 / 4 = 4/15, is what
    the tie-sharing rule returns, and Quantus gives some multiple of 1/4 instead."""
    masks = torch.zeros(1, 4, 4, dtype=torch.bool)
    masks[0, 1:3, 1:3] = True
    maps = torch.ones(1, 4, 4, dtype=torch.float64)
    maps[0, 3, 3] = 0.0
    want = ref_rank_all_orders(maps[0].numpy(), masks[0].numpy())
    assert want == pytest.approx(4 / 15)
    assert relevance_rank(maps, masks).item() == pytest.approx(want)
    theirs = _quantus_rank_small(quantus, maps, masks)
    assert theirs * 4 == pytest.approx(round(theirs * 4))
    assert abs(theirs - want) > 0.01


def _quantus_rank_small(quantus, maps: torch.Tensor, masks: torch.Tensor) -> float:
    metric = quantus.RelevanceRankAccuracy(abs=False, normalise=False, disable_warnings=True)
    model = nn.Sequential(nn.Flatten(), nn.Linear(maps[0].numel(), 2)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scores = metric(model=model, x_batch=maps[:, None].float().numpy(),
                        y_batch=np.zeros(1, dtype=np.int64), a_batch=maps[:, None].numpy(),
                        s_batch=masks[:, None].numpy().astype(np.float32), channel_first=True,
                        device="cpu")
    return float(scores[0])


def test_quantus_mass_accuracy_divides_signed_sums(quantus):
    """With signed relevance Quantus' ratio ``sum_in L / sum L`` leaves [0, 1]; the paper counts
    positive relevance."""
    masks = box_mask(*BOX)[None]
    maps = peak_at(30, 30)[None] - 0.05  # negative away from the peak
    theirs = _quantus(quantus.RelevanceMassAccuracy, maps, masks)[0]
    ours = relevance_mass(maps, masks).item()
    assert not 0 <= theirs <= 1
    assert 0 <= ours <= 1
    assert ours == pytest.approx(ref_mass(maps[0].numpy(), masks[0].numpy()), rel=1e-12)


# ------------------------------------------------------------------------------------------------
# 4. Boxes to masks
# ------------------------------------------------------------------------------------------------


def test_boxes_cover_the_pixels_of_the_slice():
    masks = boxes_to_masks(torch.tensor([[2, 1, 5, 3], [0, 0, 8, 6]]), (6, 8))
    assert masks.shape == (2, 6, 8) and masks.dtype == torch.bool
    want = torch.zeros(6, 8, dtype=torch.bool)
    want[1:3, 2:5] = True  # rows y1..y2-1, columns x1..x2-1
    assert torch.equal(masks[0], want)
    assert bool(masks[1].all())  # (0, 0, W, H) is the whole image, border pixels included


def test_boxes_at_the_border_and_fractional_coordinates():
    masks = boxes_to_masks([[0, 0, 1, 1], [7, 5, 8, 6], [1.4, 0, 3.4, 1], [0.5, 0, 1.5, 1]],
                           (6, 8))
    assert masks.sum(dim=(1, 2)).tolist() == [1, 1, 2, 1]
    assert masks[0, 0, 0] and masks[1, 5, 7]  # the corner pixels
    assert masks[2, 0, 1:3].all()  # centres 1.5 and 2.5 lie in [1.4, 3.4); 0.5 and 3.5 not
    assert masks[3, 0, 0] and not masks[3, 0, 1]  # centre 0.5 in [0.5, 1.5), 1.5 is not


def test_several_boxes_per_image_make_their_union():
    boxes = [torch.tensor([[0, 0, 4, 4], [2, 2, 6, 6]]),  # overlapping: 16 + 16 - 4
             np.array([[10, 0, 12, 2]]),
             [[0, 10, 1, 11], [5, 5, 6, 6], [7, 7, 9, 8]]]
    masks = boxes_to_masks(boxes, (12, 14))
    assert masks.sum(dim=(1, 2)).tolist() == [28, 4, 4]
    want = torch.zeros(12, 14, dtype=torch.bool)
    want[0:4, 0:4] = want[2:6, 2:6] = True
    assert torch.equal(masks[0], want)
    per_tensor = boxes_to_masks(torch.tensor([[[0, 0, 4, 4], [2, 2, 6, 6]]]), (12, 14))
    assert torch.equal(per_tensor[0], want)


def test_boxes_to_masks_feeds_the_metrics():
    masks = boxes_to_masks([[[20, 20, 40, 40]], [[0, 0, 10, 10], [50, 50, 64, 64]]], (H, W))
    maps = torch.stack([peak_at(30, 30), peak_at(57, 57)])
    assert pointing_game(maps, masks, tolerance=0).tolist() == [1.0, 1.0]


@pytest.mark.parametrize(("boxes", "message"), [
    ([[0, 0, 9, 4]], r"box 0 of image 0 is \(0, 0, 9, 4\), outside the image of 6 x 8 \(H x W\), "
                     r"where 0 <= x1 < x2 <= 8 and 0 <= y1 < y2 <= 6: clip it"),
    ([[[1, 1, 2, 2], [-1, 0, 3, 3]]], r"box 1 of image 0 is \(-1, 0, 3, 3\), outside the image"),
    ([[1, 1, 2, 2], [3, 0, 3, 4]], r"box 0 of image 1 is \(3, 0, 3, 4\): boxes are \(x1, y1, x2, "
                                   r"y2\) with x1 < x2 and y1 < y2 \(for \(x, y, w, h\)"),
    ([[4, 2, 2, 3]], r"x1 < x2 and y1 < y2"),
    ([[1, 1, 2, float("nan")]], r"coordinates must be finite"),
    ([[1.6, 0, 2.4, 2]], r"covers no pixel centre"),
    ([[[1, 1, 2, 2]], torch.zeros(0, 4)], r"image 1 has no box"),
    ([[1, 1, 2]], r"boxes of image 0 must be \(n, 4\) as \(x1, y1, x2, y2\), got shape \(3,\)"),
    (torch.zeros(2, 5), r"boxes as one tensor must be \(B, 4\) \(one box per image\) or "
                        r"\(B, n, 4\), got shape \(2, 5\)"),
    ([], r"boxes must be a \(B, 4\) tensor or a list"),
])
def test_boxes_to_masks_errors(boxes, message):
    with pytest.raises(ValueError, match=message) as caught:
        boxes_to_masks(boxes, (6, 8))
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("size", [(6,), (0, 8), (6.5, 8), "68"])
def test_boxes_to_masks_size_errors(size):
    with pytest.raises(ValueError, match=r"size must be \(H, W\), two positive integers"):
        boxes_to_masks([[0, 0, 1, 1]], size)


# ------------------------------------------------------------------------------------------------
# 5. Controls
# ------------------------------------------------------------------------------------------------


def test_random_map_shape_range_and_seed():
    first = random_map(3, (20, 30), torch.Generator().manual_seed(7))
    again = random_map(3, (20, 30), torch.Generator().manual_seed(7))
    other = random_map(3, (20, 30), torch.Generator().manual_seed(8))
    assert first.shape == (3, 20, 30) and first.dtype == torch.float32
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert float(first.min()) >= 0 and float(first.max()) < 1
    assert not torch.equal(first[0], first[1])  # independent per image


def test_random_map_scores_chance():
    """What the controls are for: uniform noise puts the object's share of the image in it."""
    masks = boxes_to_masks(torch.tensor([[8, 8, 40, 24]]).repeat(64, 1), (H, W))
    maps = random_map(64, (H, W), torch.Generator().manual_seed(0))
    share = 32 * 16 / (H * W)
    assert float(relevance_mass(maps, masks).mean()) == pytest.approx(share, abs=0.01)
    assert float(relevance_rank(maps, masks).mean()) == pytest.approx(share, abs=0.02)


@pytest.mark.parametrize(("size", "centre"), [((33, 45), (16, 22)), ((32, 32), (15.5, 15.5)),
                                              ((21, 8), (10, 3.5))])
def test_centred_gaussian_peaks_at_the_centre(size, centre):
    maps = centred_gaussian(2, size, sigma=0.25)
    assert maps.shape == (2, *size) and torch.equal(maps[0], maps[1])
    peaks = (maps[0] == maps[0].max()).nonzero().double()
    assert peaks.mean(dim=0).tolist() == list(centre)  # one pixel, or the central 2 or 4
    if all(n % 2 for n in size):
        assert float(maps.max()) == 1.0
    else:
        assert float(maps.max()) < 1.0
    s = 0.25 * min(size)
    rows, cols = np.meshgrid(np.arange(size[0]), np.arange(size[1]), indexing="ij")
    want = np.exp(-((rows - centre[0]) ** 2 + (cols - centre[1]) ** 2) / (2 * s**2))
    np.testing.assert_allclose(maps[0].numpy(), want, rtol=1e-5, atol=1e-7)


def test_centred_gaussian_sigma_is_a_fraction_of_the_shorter_side():
    maps = centred_gaussian(1, (41, 81), sigma=0.25)  # s = 10.25 px, centre (20, 40)
    wide = centred_gaussian(1, (41, 81), sigma=0.5)
    assert float(maps[0, 20, 40 + 10]) == pytest.approx(math.exp(-(10**2) / (2 * 10.25**2)))
    assert float(wide[0, 20, 40 + 10]) > float(maps[0, 20, 40 + 10])
    with pytest.raises(ValueError, match="sigma is a fraction of the shorter side"):
        centred_gaussian(1, (41, 81), sigma=0)


def test_edge_map_of_a_vertical_step_is_nonzero_exactly_on_the_step_columns():
    images = torch.zeros(2, 3, 16, 20)
    images[0, :, :, 9:] = 1.0  # a step between columns 8 and 9
    images[1, 0, :, 5:] = 0.9  # a step of the channel mean 0.3 between columns 4 and 5
    edges = edge_map(images)
    assert edges.shape == (2, 16, 20)
    nonzero = [sorted(set((e != 0).nonzero()[:, 1].tolist())) for e in edges]
    assert nonzero == [[8, 9], [4, 5]]
    torch.testing.assert_close(edges[0, :, 8:10], torch.full((16, 2), 4.0))  # 4 * step height
    torch.testing.assert_close(edges[1, :, 4:6], torch.full((16, 2), 1.2))
    assert not edge_map(torch.full((1, 3, 9, 9), 0.4)).any()  # no false frame at the border


def test_edge_map_matches_scipy_sobel():
    ndimage = pytest.importorskip("scipy.ndimage")
    images = torch.rand(2, 3, 24, 32, generator=torch.Generator().manual_seed(1),
                        dtype=torch.float64)
    grey = images.mean(dim=1).numpy()
    # scipy's default 'reflect' border repeats the edge pixel, like replicate padding at 1 px
    want = np.stack([np.hypot(ndimage.sobel(g, axis=0), ndimage.sobel(g, axis=1)) for g in grey])
    np.testing.assert_allclose(edge_map(images).numpy(), want, rtol=1e-10, atol=1e-12)
    assert edge_map((images * 255).to(torch.uint8)).dtype == torch.float32


def test_controls_refuse_bad_arguments():
    with pytest.raises(ValueError, match=r"edge_map takes images \(B, C, H, W\), got \(3, 8, 8\)"):
        edge_map(torch.zeros(3, 8, 8))
    with pytest.raises(ValueError, match="batch must be a positive integer"):
        random_map(0, (8, 8))
    with pytest.raises(ValueError, match=r"size must be \(H, W\)"):
        centred_gaussian(1, (8,))
