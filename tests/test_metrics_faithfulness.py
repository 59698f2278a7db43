"""Faithfulness metrics and ``heatlens.evaluate``: each curve against its definition written out,
agreement with pytorch-grad-cam's ROAD and torch-cam's average drop, the RISE protocol, real
ImageNet models on real photos, controls, reproducibility and clear errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter
from test_engine import assert_same_state, snapshot
from torch import nn

import heatlens
from heatlens.engine.targets import ClassLogit
from heatlens.metrics import faithfulness
from heatlens.metrics.evaluate import evaluate, metric_names

BUDGET = 64 << 20


class Tiny(nn.Module):
    """A small seeded CNN on 12 x 12 images with 3 classes."""

    def __init__(self) -> None:
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(0)
            self.features = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(),
                                          nn.Conv2d(6, 8, 3, padding=1), nn.ReLU())
            self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).mean(dim=(2, 3)))


@pytest.fixture(scope="module")
def tiny() -> nn.Module:
    return Tiny().eval()


X = torch.randn(2, 3, 12, 12, generator=torch.Generator().manual_seed(1))
MAPS = torch.rand(2, 12, 12, generator=torch.Generator().manual_seed(2))
CLASSES = torch.tensor([0, 2])


def probability(model: nn.Module, images: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(images).softmax(dim=1)[torch.arange(len(classes)), classes]


@pytest.mark.parametrize("mode", ["deletion", "insertion"])
@pytest.mark.parametrize("order", ["morf", "lerf"])
def test_step_curve_is_the_definition_written_out(tiny, mode, order):
    """Pixels ranked by the map (ties by position), ``step`` of them changed at a time; the
    changed pixel takes the substrate (deletion) or the image's value over a blur (insertion)."""
    protocol = faithfulness.heatlens_protocol(step=10, substrate=-1.5, blur_sigma=2.0)
    curve = faithfulness.step_curve(tiny, X, MAPS[None], CLASSES, ClassLogit(CLASSES), mode=mode,
                                    protocol=protocol, order=order, memory_budget=BUDGET)
    start = X.clone() if mode == "deletion" else heatlens.engine.maps.gaussian_blur(X, 2.0)
    finish = torch.full_like(X, -1.5) if mode == "deletion" else X
    expected = []
    for b in range(2):
        values = MAPS[b].flatten().numpy()
        order_b = np.argsort(-values if order == "morf" else values, kind="stable")
        image = start[b].clone().reshape(3, -1)
        scores = [float(probability(tiny, image.reshape(1, 3, 12, 12), CLASSES[b : b + 1]))]
        for first in range(0, 144, 10):
            changed = order_b[first : first + 10]
            image[:, changed] = finish[b].reshape(3, -1)[:, changed]
            scores.append(float(probability(tiny, image.reshape(1, 3, 12, 12),
                                            CLASSES[b : b + 1])))
        expected.append(scores)
    torch.testing.assert_close(curve.y[0], torch.tensor(expected), rtol=1e-5, atol=1e-6)
    counts = [min(10 * i, 144) for i in range(16)]
    torch.testing.assert_close(curve.x, torch.tensor(counts) / 144)
    torch.testing.assert_close(curve.auc()[0], torch.tensor(
        [np.trapezoid(row, np.array(counts) / 144) for row in expected], dtype=torch.float32))


def test_chunking_does_not_change_a_curve(tiny):
    protocol = faithfulness.heatlens_protocol(step=0.1)
    whole = faithfulness.step_curve(tiny, X, MAPS[None], CLASSES, ClassLogit(CLASSES),
                                    mode="deletion", protocol=protocol, memory_budget=BUDGET)
    small = faithfulness.step_curve(tiny, X, MAPS[None], CLASSES, ClassLogit(CLASSES),
                                    mode="deletion", protocol=protocol, memory_budget=1)
    torch.testing.assert_close(whole.y, small.y)


def test_rise_blur_is_the_papers_kernel():
    """RISE blurs with ``gaussian_filter`` of a centred delta (11 x 11, sigma 5) as kernel."""
    delta = np.zeros((11, 11))
    delta[5, 5] = 1
    kernel = gaussian_filter(delta, 5)
    image = torch.randn(1, 3, 20, 20, generator=torch.Generator().manual_seed(3),
                        dtype=torch.float64)
    expected = torch.nn.functional.conv2d(image, torch.from_numpy(kernel).expand(3, 1, 11, 11),
                                          padding=5, groups=3)
    torch.testing.assert_close(faithfulness.rise_blur(image), expected)
    assert faithfulness.RISE_PROTOCOL.step == 224
    assert "RISE" in faithfulness.RISE_PROTOCOL.description


def test_rise_auc_matches_the_papers_formula(tiny):
    """RISE's ``auc(arr) = (sum - arr[0] / 2 - arr[-1] / 2) / (n - 1)`` is the trapezoid rule on
    evenly spaced steps, which 224-pixel steps of a 224 x 224 image are."""
    curve = faithfulness.Curve(torch.linspace(0, 1, 225), torch.rand(1, 2, 225))
    y = curve.y.double()
    rise = (y.sum(-1) - y[..., 0] / 2 - y[..., -1] / 2) / (y.shape[-1] - 1)
    torch.testing.assert_close(curve.auc().double(), rise)


def test_aopc_is_the_mean_drop_along_deletion(tiny):
    curve = faithfulness.Curve(torch.linspace(0, 1, 5),
                               torch.tensor([[[0.9, 0.7, 0.4, 0.2, 0.1]]]))
    torch.testing.assert_close(faithfulness.aopc(curve),
                               torch.tensor([[(0 + 0.2 + 0.5 + 0.7 + 0.8) / 5]]))


def test_average_drop_and_increase_agree_with_torchcam(tiny):
    """torch-cam's ``ClassificationMetric`` on the same maps (1e-5): drop = max(0, Y - O) / Y,
    increase = [Y < O], with O the score of the image times its map."""
    from torchcam.metrics import ClassificationMetric

    class Given:  # a CAM extractor that returns our maps
        model = tiny

        def __call__(self, class_idx, scores=None, normalized=True, **kwargs):
            return [MAPS]

        def fuse_cams(self, cams):
            return cams[0]

        def _hooks_off(self):
            from contextlib import nullcontext

            return nullcontext()

    metric = ClassificationMetric(Given(), lambda logits: logits.softmax(dim=-1))
    metric.update(X, class_idx=CLASSES.tolist())
    summary = metric.summary()
    drop, increase = faithfulness.confidence_change(tiny, X, MAPS[None], CLASSES,
                                                    ClassLogit(CLASSES), memory_budget=BUDGET)
    assert math.isclose(float(drop.mean()), summary["avg_drop"], rel_tol=1e-5, abs_tol=1e-7)
    assert math.isclose(float(increase.mean()), summary["conf_increase"], abs_tol=1e-7)
    y = probability(tiny, X, CLASSES)
    o = probability(tiny, MAPS[:, None] * X, CLASSES)
    torch.testing.assert_close(drop[0], (y - o).clamp_min(0) / y)


def pgc_road(model, x, maps, classes, fractions, order):
    """pytorch-grad-cam's ROAD at the same fractions, its imputation without noise."""
    from pytorch_grad_cam.metrics.perturbation_confidence import (
        PerturbationConfidenceMetric,
        RemoveLeastRelevantFirst,
        RemoveMostRelevantFirst,
    )
    from pytorch_grad_cam.metrics.road import NoisyLinearImputer
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget

    targets = [ClassifierOutputSoftmaxTarget(int(c)) for c in classes]
    remover = RemoveMostRelevantFirst if order == "morf" else RemoveLeastRelevantFirst
    scores = []
    for fraction in fractions:
        # its "percentile" is the share of pixels KEPT, for both orders
        metric = PerturbationConfidenceMetric(remover(100 * (1 - fraction),
                                                      NoisyLinearImputer(noise=0.0)))
        scores.append(metric(x, maps.numpy(), targets, model, return_diff=False))
    return torch.tensor(np.stack(scores, axis=1))


def test_road_agrees_with_pytorch_grad_cam(tiny):
    """Both orders at the same fractions, imputation without noise: 1e-4."""
    fractions = (0.1, 0.5, 0.9)
    morf, lerf = faithfulness.road_curves(tiny, X, MAPS[None], CLASSES, ClassLogit(CLASSES),
                                          fractions=fractions, noise=0.0, memory_budget=BUDGET)
    theirs_morf = pgc_road(tiny, X, MAPS, CLASSES, fractions, "morf")
    theirs_lerf = pgc_road(tiny, X, MAPS, CLASSES, fractions, "lerf")
    torch.testing.assert_close(morf.y[0], theirs_morf, rtol=0, atol=1e-4)
    torch.testing.assert_close(lerf.y[0], theirs_lerf, rtol=0, atol=1e-4)
    torch.testing.assert_close(faithfulness.road(morf, lerf)[0],
                               ((theirs_lerf - theirs_morf) / 2).mean(dim=1), rtol=0, atol=1e-4)


def test_road_fraction_means_pixels_removed_not_kept(tiny):
    """pytorch-grad-cam's ``ROADMostRelevantFirst(percentile=80)`` removes the top 20 %: its
    percentile is the share KEPT. Here (and in the ROAD paper, and Quantus) the fraction is the
    share REMOVED, so MoRF at 0.2 is theirs at 80, not at 20."""
    morf, _ = faithfulness.road_curves(tiny, X, MAPS[None], CLASSES, ClassLogit(CLASSES),
                                       fractions=(0.2,), noise=0.0, memory_budget=BUDGET)
    at_80 = pgc_road(tiny, X, MAPS, CLASSES, (0.2,), "morf")  # their percentile 80
    at_20 = pgc_road(tiny, X, MAPS, CLASSES, (0.8,), "morf")  # their percentile 20
    torch.testing.assert_close(morf.y[0], at_80, rtol=0, atol=1e-4)
    assert not torch.allclose(morf.y[0], at_20, atol=1e-3)
    removed = faithfulness.road_removed(MAPS[None], 0.2, "morf")
    assert abs(float(removed.float().mean()) - 0.2) < 0.01


def test_road_noise_is_seeded_and_chunk_free(tiny):
    run = {"fractions": (0.3, 0.6), "noise": 0.05, "seed": 4}
    first = faithfulness.road_curves(tiny, X, MAPS[None], CLASSES, ClassLogit(CLASSES),
                                     memory_budget=BUDGET, **run)
    again = faithfulness.road_curves(tiny, X, MAPS[None], CLASSES, ClassLogit(CLASSES),
                                     memory_budget=1, **run)
    other = faithfulness.road_curves(tiny, X, MAPS[None], CLASSES, ClassLogit(CLASSES),
                                     memory_budget=BUDGET, **{**run, "seed": 5})
    torch.testing.assert_close(first[0].y, again[0].y)
    assert not torch.allclose(first[0].y, other[0].y)


# --- the front door -----------------------------------------------------------------------------


def test_evaluate_scores_methods_and_controls(tiny):
    explanation = heatlens.explain(tiny, X, "gradcam", target=CLASSES.tolist(),
                                   layer="features.3")
    before = snapshot(tiny)
    report = evaluate(tiny, X, explanation, ("deletion", "insertion", "road", "aopc", "drop"),
                      protocol=faithfulness.heatlens_protocol(step=0.1), memory_budget=BUDGET)
    assert_same_state(before, snapshot(tiny))
    assert report.sources == ["gradcam"]
    assert report.controls == ["random", "gaussian", "edges"]
    assert list(report.scores) == ["deletion", "insertion", "road", "aopc", "average_drop"]
    for by_source in report.scores.values():
        assert set(by_source) == {"gradcam", "random", "gaussian", "edges"}
        assert all(v.shape == (2,) and bool(torch.isfinite(v).all()) for v in by_source.values())
    assert report.classes.tolist() == CLASSES.tolist()
    x, y = report.curves["deletion"]["gradcam"]
    assert x.shape == (11,) and y.shape == (2, 11)
    table = report.table()
    assert "gradcam" in table and "random (control)" in table and "lower is better" in table
    assert report.of("gradcam")["deletion"].shape == (2,)
    rows = report.rows(["a.png", "b.png"])
    assert len(rows) == 8 and rows[0]["image"] == "a.png" and "road" in rows[0]


def test_evaluate_is_reproducible_and_takes_raw_maps(tiny):
    options = {"metrics": ("deletion", "road"), "seed": 3, "memory_budget": BUDGET,
               "protocol": faithfulness.heatlens_protocol(step=0.25)}
    first = evaluate(tiny, X, {"mine": MAPS * 7 - 2}, target=CLASSES, **options)
    again = evaluate(tiny, X, {"mine": MAPS}, target=CLASSES, **options)
    for metric in first.scores:
        for source in first.scores[metric]:
            torch.testing.assert_close(first.scores[metric][source], again.scores[metric][source])


@pytest.mark.parametrize(("kwargs", "error", "match"), [
    ({"metrics": "delettion"}, ValueError, "unknown metric 'delettion'. Did you mean 'deletion'"),
    ({"explanations": MAPS[:, :6]}, ValueError, r"shape \(2, 6, 12\), but the inputs"),
    ({"explanations": MAPS.clone().index_put_((torch.tensor([1]), torch.tensor([0]),
                                                torch.tensor([0])), torch.tensor(float("nan")))},
     ValueError, "the map of image 1 of 'maps' holds NaN"),
    ({"metrics": "pointing_game"}, ValueError, "need the objects: pass boxes="),
    ({"protocol": "quick"}, ValueError, "protocol must be 'heatlens', 'rise'"),
    ({"controls": ("noise",)}, ValueError, "unknown control 'noise'"),
])
def test_bad_input_is_refused_before_the_work(tiny, kwargs, error, match):
    arguments = {"explanations": MAPS, **kwargs}
    with pytest.raises(error, match=match):
        evaluate(tiny, X, **arguments)


def test_metric_names_take_aliases():
    assert metric_names("drop, energy,sensitivity") == ["average_drop", "energy_inside",
                                                        "max_sensitivity"]


def test_localisation_through_evaluate(tiny):
    boxes = [[[0, 0, 6, 6]], [[6, 6, 12, 12]]]
    inside = torch.zeros(2, 12, 12)
    inside[0, :6, :6] = 1
    inside[1, 6:, 6:] = 1
    report = evaluate(tiny, X, {"right": inside + 0.1 * MAPS, "wrong": 1 - inside},
                      ("pointing_game", "energy_inside"), target=CLASSES, boxes=boxes,
                      controls=(), tolerance=0, memory_budget=BUDGET)
    assert report.scores["pointing_game"]["right"].tolist() == [1.0, 1.0]
    assert report.scores["pointing_game"]["wrong"].tolist() == [0.0, 0.0]
    assert report.ranking("energy_inside") == ["right", "wrong"]


# --- real ImageNet models on real photos -------------------------------------------------------


@pytest.fixture(scope="module")
def coffee_and_rocket(imagenet_transform) -> torch.Tensor:
    from PIL import Image
    from skimage import data

    return torch.stack([imagenet_transform.tensor(Image.fromarray(getattr(data, name)()))
                        for name in ("coffee", "rocket")])


@pytest.mark.parametrize("network", ["mobilenet_v2", "efficientnet_lite0"])
def test_gradcam_is_more_faithful_than_its_reversed_order(network, mobilenet_v2_imagenet, lite0,
                                                          imagenet_photos, coffee_and_rocket):
    """Deleting Grad-CAM's most relevant pixels first lowers the probability faster than deleting
    its least relevant first; inserting them first raises it faster. (Not on every photo:
    EfficientNet-Lite0's Grad-CAM of the cat "chelsea", 0.36 Egyptian cat, has deletion AUCs of
    0.36 most relevant first and 0.29 least relevant first, as removing the face moves the
    probability among the cat classes; docs/metrics.md shows it.)"""
    model, x = ((mobilenet_v2_imagenet, imagenet_photos[:2]) if network == "mobilenet_v2"
                else (lite0, coffee_and_rocket))
    cam = heatlens.explain(model, x, "gradcam")
    protocol = faithfulness.heatlens_protocol(step=0.05)
    run = {"protocol": protocol, "memory_budget": 256 << 20}
    goal = ClassLogit(cam.targets)
    maps = cam.maps[None]
    deletion = faithfulness.step_curve(model, x, maps, cam.targets, goal, mode="deletion", **run)
    reversed_deletion = faithfulness.step_curve(model, x, maps, cam.targets, goal,
                                                mode="deletion", order="lerf", **run)
    insertion = faithfulness.step_curve(model, x, maps, cam.targets, goal, mode="insertion",
                                        **run)
    reversed_insertion = faithfulness.step_curve(model, x, maps, cam.targets, goal,
                                                 mode="insertion", order="lerf", **run)
    assert bool((deletion.auc() < reversed_deletion.auc()).all())
    assert bool((insertion.auc() > reversed_insertion.auc()).all())


def test_the_rise_protocol_says_so_in_the_report(tiny):
    report = evaluate(tiny, X, MAPS, "deletion", target=CLASSES, protocol="rise", controls=(),
                      memory_budget=BUDGET)
    assert report.protocol.startswith("RISE's settings (Petsiuk et al., BMVC 2018): 224 pixels")
    assert "protocol: RISE's settings" in report.table()
    x, _ = report.curves["deletion"]["maps"]
    assert x.shape == (2,)  # 144 pixels: one step of 224
