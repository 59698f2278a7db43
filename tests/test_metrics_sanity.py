"""Sanity checks of saliency maps (heatlens.metrics.sanity): Grad-CAM on a small CNN trained here
passes them, model-blind and class-blind maps fail them, the measures agree with scipy and
scikit-image, and the user's model comes back untouched."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.stats import spearmanr
from skimage.metrics import structural_similarity as skimage_ssim
from test_engine import assert_same_state, snapshot
from threads import one_intraop_thread
from torch import Tensor, nn

import heatlens
from heatlens.metrics.sanity import (
    SanityResult,
    cascading_randomisation,
    random_logit,
    random_other_classes,
    randomisation_order,
    rank_correlation,
    structural_similarity,
)

pytestmark = pytest.mark.filterwarnings("ignore:.*zero everywhere:UserWarning")

SIZE, PATCH, CLASSES = 24, 6, 4


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These models are tiny: one intra-op thread is faster than two fighting over a busy CPU.
    Restored afterwards."""
    with one_intraop_thread():
        yield


def patterns(n: int, seed: int) -> tuple[Tensor, Tensor, Tensor]:
    """``n`` noisy ``SIZE x SIZE`` images, each with one ``PATCH x PATCH`` pattern at a random
    place; the class is the pattern (horizontal stripes, vertical stripes, checkerboard,
    solid). Returns images, classes and the mask of where the evidence is."""
    g = torch.Generator().manual_seed(seed)
    classes = torch.randint(0, CLASSES, (n,), generator=g)
    images = 0.3 * torch.randn(n, 3, SIZE, SIZE, generator=g)
    i = torch.arange(float(PATCH))
    kinds = torch.stack([
        (i[:, None] % 2 == 0).float().expand(PATCH, PATCH),
        (i[None, :] % 2 == 0).float().expand(PATCH, PATCH),
        ((i[:, None] + i[None, :]) % 2 == 0).float(),
        torch.ones(PATCH, PATCH),
    ])
    corners = torch.randint(0, SIZE - PATCH + 1, (n, 2), generator=g)
    evidence = torch.zeros(n, SIZE, SIZE, dtype=torch.bool)
    for k, (r, c) in enumerate(corners.tolist()):
        images[k, :, r:r + PATCH, c:c + PATCH] += 2 * kinds[int(classes[k])] - 0.5
        evidence[k, r:r + PATCH, c:c + PATCH] = True
    return images, classes, evidence


def small_cnn() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, CLASSES),
    )


@pytest.fixture(scope="module")
def trained() -> nn.Module:
    """The small CNN trained for 3 epochs on 1024 images (about 2 s); in eval mode."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = small_cnn()
        images, classes, _ = patterns(1024, seed=0)
        optimiser = torch.optim.Adam(model.parameters(), lr=1e-2)
        for _ in range(3):
            for start in range(0, len(images), 32):
                batch = slice(start, start + 32)
                loss = F.cross_entropy(model(images[batch]), classes[batch])
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
    return model.eval()


@pytest.fixture(scope="module")
def held_out() -> tuple[Tensor, Tensor, Tensor]:
    images, classes, evidence = patterns(16, seed=1)
    return images, classes, evidence


@pytest.fixture(scope="module")
def resnet() -> nn.Module:
    from torchvision.models import resnet18

    with torch.random.fork_rng():
        torch.manual_seed(0)
        return resnet18(num_classes=10).eval()


@pytest.fixture(scope="module")
def photos() -> Tensor:
    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))


def gradcam(model: nn.Module, x: Tensor, classes: Tensor) -> Tensor:
    return heatlens.explain(model, x, "gradcam", target=classes).maps


def sobel_edges(model: nn.Module, x: Tensor, classes: Tensor) -> Tensor:
    """The control of Adebayo et al.: an edge detector, blind to the model and the class."""
    grey = x.mean(dim=1, keepdim=True)
    kx = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])
    gx = F.conv2d(grey, kx[None, None], padding=1)
    gy = F.conv2d(grey, kx.T[None, None], padding=1)
    return (gx.square() + gy.square()).sqrt()[:, 0]


def means(result: SanityResult, field: str = "spearman") -> list[float]:
    return [float(getattr(step, field).mean()) for step in result.steps]


# --- the measures ---------------------------------------------------------------------------------


def map_pairs() -> list[tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(2)
    noise = torch.rand(40, 50, generator=g)
    quantised = (noise * 8).round() / 8  # many ties
    relu_map = (torch.randn(40, 50, generator=g)).clamp_min(0)  # half zeros
    big = torch.zeros(300, 300)
    big[:75] = torch.rand(75, 300, generator=g)  # 67,500 tied zeros
    return [
        (quantised, quantised + 0.5 * torch.rand(40, 50, generator=g)),
        (noise, torch.rand(40, 50, generator=g)),
        (relu_map, relu_map + 0.2 * torch.randn(40, 50, generator=g).clamp_min(0)),
        (noise, -noise + 0.1 * torch.rand(40, 50, generator=g)),
        (big, big + 0.3 * torch.rand(300, 300, generator=g)),
    ]


@pytest.mark.parametrize("pair", range(5))
def test_rank_correlation_is_scipys_spearman(pair):
    a, b = map_pairs()[pair]
    expected = spearmanr(a.flatten().numpy(), b.flatten().numpy()).statistic
    ours = rank_correlation(a[None], b[None])
    assert ours.dtype == torch.float64 and ours.shape == (1,)
    # both are exact float64 arithmetic on the same average ranks
    assert float(ours[0]) == pytest.approx(expected, abs=1e-12)


def test_rank_correlation_is_torchmetrics_spearman_where_that_is_exact():
    """Below 65,536 tied values torchmetrics ranks exactly (in float32); on the 300 x 300 map
    above it does not (0.690 for 0.703), which is why heatlens ranks the maps itself."""
    from torchmetrics.functional import spearman_corrcoef

    for a, b in map_pairs()[:4]:
        theirs = spearman_corrcoef(a.flatten(), b.flatten())
        assert float(rank_correlation(a[None], b[None])[0]) == pytest.approx(float(theirs),
                                                                               abs=1e-5)


def test_rank_correlation_batches_and_constant_maps():
    g = torch.Generator().manual_seed(3)
    a, b = torch.rand(3, 16, 16, generator=g), torch.rand(3, 16, 16, generator=g)
    together = rank_correlation(a, b)
    apart = torch.cat([rank_correlation(a[i:i + 1], b[i:i + 1]) for i in range(3)])
    assert torch.equal(together, apart)
    zeros = torch.zeros(1, 16, 16)
    assert float(rank_correlation(zeros, a[:1])[0]) == 0.0  # nothing ordered: no agreement
    assert float(rank_correlation(zeros, zeros + 3)[0]) == 1.0  # two maps that say nothing


def normalised(m: Tensor) -> np.ndarray:
    m = m.double().numpy()
    return (m - m.min()) / (m.max() - m.min())


def skimage_reference(a: Tensor, b: Tensor) -> float:
    """scikit-image configured as heatlens: Wang et al.'s Gaussian window (sigma 1.5, 11 taps
    with the default truncate 3.5), population covariances, data range 1 (maps in [0, 1])."""
    return skimage_ssim(normalised(a), normalised(b), data_range=1.0, gaussian_weights=True,
                        sigma=1.5, use_sample_covariance=False)


@pytest.mark.parametrize("pair", range(4))
def test_structural_similarity_is_skimages(pair):
    a, b = map_pairs()[pair]
    ours = structural_similarity(a[None], b[None])
    # the only difference is min-max scaling in float32 (heatlens) or float64 (here)
    assert float(ours[0]) == pytest.approx(skimage_reference(a, b), abs=1e-6)


def test_structural_similarity_of_volumes_and_of_a_map_with_itself():
    g = torch.Generator().manual_seed(4)
    v = torch.rand(2, 13, 14, 15, generator=g)
    w = v + 0.3 * torch.rand(2, 13, 14, 15, generator=g)
    ours = structural_similarity(v, w)
    for i in range(2):
        assert float(ours[i]) == pytest.approx(skimage_reference(v[i], w[i]), abs=1e-6)
    assert torch.allclose(structural_similarity(v, v), torch.ones(2, dtype=torch.float64))
    with pytest.raises(ValueError, match="at least 11 pixels"):
        structural_similarity(torch.rand(1, 7, 7), torch.rand(1, 7, 7))


# --- cascading randomisation ----------------------------------------------------------------------


def test_gradcam_of_the_trained_cnn_points_at_the_evidence(trained, held_out):
    """The premise of the tests below: the CNN learned the task and Grad-CAM's map means
    something (its mass sits on the pattern)."""
    images, classes, evidence = held_out
    with torch.no_grad():
        assert torch.equal(trained(images).argmax(dim=1), classes)
    maps = gradcam(trained, images, classes)
    inside = (maps * evidence).flatten(1).sum(1) / evidence.flatten(1).sum(1)
    outside = (maps * ~evidence).flatten(1).sum(1) / (~evidence).flatten(1).sum(1)
    assert bool((inside > 5 * outside).all())


def test_gradcam_passes_cascading_randomisation(trained, held_out):
    images, classes, _ = held_out
    result = cascading_randomisation(trained, images, gradcam, classes)
    # the parameterised layers, the last to run first: fc, conv, bn, conv, bn, conv
    assert [step.layer for step in result.steps] == ["10", "6", "4", "3", "1", "0"]
    spearman = means(result)
    assert spearman[0] < 0.8  # randomising the logits alone already moves the map
    assert max(spearman) < 0.5 and spearman[-1] < 0.25
    assert means(result, "spearman_abs") == spearman  # the maps are >= 0
    assert means(result, "ssim")[-1] < 0.5
    assert result.passed and result.threshold == 0.5
    assert "below the threshold 0.5" in result.reason and "not below" not in result.reason
    for step in result.steps:
        assert step.spearman.shape == step.ssim.shape == (len(images),)


def test_an_edge_map_that_ignores_the_model_fails(trained, held_out):
    images, classes, _ = held_out
    result = cascading_randomisation(trained, images, sobel_edges, classes)
    assert len(result.steps) == 6
    for step in result.steps:  # the same map at every step: correlation 1, SSIM 1
        assert torch.allclose(step.spearman, torch.ones(len(images), dtype=torch.float64))
        assert torch.allclose(step.spearman_abs, torch.ones(len(images), dtype=torch.float64))
        assert torch.allclose(step.ssim, torch.ones(len(images), dtype=torch.float64))
    assert not result.passed
    assert "1.00" in result.reason and "not below the threshold 0.5" in result.reason


def test_the_rule_is_the_threshold(trained, held_out):
    images, classes, _ = held_out
    strict = cascading_randomisation(trained, images, gradcam, classes, threshold=-0.9)
    assert not strict.passed and "not below the threshold -0.9" in strict.reason
    with pytest.raises(ValueError, match=r"in \(-1, 1\]"):
        cascading_randomisation(trained, images, gradcam, classes, threshold=1.5)


# --- random logit ---------------------------------------------------------------------------------


def test_gradcam_passes_random_logit(trained, held_out):
    images, classes, _ = held_out
    result = random_logit(trained, images, gradcam, classes)
    assert result.random_classes is not None
    assert bool((result.random_classes != classes).all())
    assert len(result.steps) == 1 and result.steps[0].layer == "random logit"
    assert means(result)[0] < 0.4
    assert result.passed and "depends on the class" in result.reason


def test_a_class_blind_map_fails_random_logit(trained, held_out):
    images, classes, _ = held_out

    def predicted_class_only(model, x, classes):  # ignores the class it is asked for
        return heatlens.explain(model, x, "gradcam").maps

    result = random_logit(trained, images, predicted_class_only, classes)
    assert means(result) == pytest.approx([1.0]) and means(result, "ssim") == pytest.approx([1.0])
    assert not result.passed and "not below the threshold 0.5" in result.reason


def test_random_classes_are_seeded_uniform_and_never_the_class(trained, held_out):
    classes = torch.arange(4000) % CLASSES
    drawn = random_other_classes(classes, CLASSES, seed=3)
    assert torch.equal(drawn, random_other_classes(classes, CLASSES, seed=3))
    assert not torch.equal(drawn, random_other_classes(classes, CLASSES, seed=4))
    for c in range(CLASSES):  # each of the three other classes a third of the time
        counts = torch.bincount(drawn[classes == c], minlength=CLASSES)
        assert counts[c] == 0
        assert bool(((counts[torch.arange(CLASSES) != c] - 1000 / 3).abs() < 60).all())
    images, classes, _ = held_out
    first = random_logit(trained, images, sobel_edges, classes, seed=3).random_classes
    again = random_logit(trained, images, sobel_edges, classes, seed=3).random_classes
    assert first is not None and torch.equal(first, again)
    assert torch.equal(first, random_other_classes(classes, CLASSES, seed=3))
    with pytest.raises(ValueError, match="0..3"):
        random_logit(trained, images[:2], sobel_edges, torch.tensor([0, 4]))


# --- the user's model -----------------------------------------------------------------------------


@pytest.fixture
def lived_in(resnet, photos) -> nn.Module:
    """resnet18 as a user leaves it: .grad filled, layer1 frozen and in training mode, a hook."""
    model = copy.deepcopy(resnet)
    model(photos).sum().backward()
    model.layer1.requires_grad_(False)
    model.layer1.train()
    model.layer4.register_forward_hook(lambda module, args, output: None)
    return model


@pytest.mark.filterwarnings("ignore:.*training mode:UserWarning")
def test_the_model_comes_back_untouched(lived_in, photos):
    before, rng = snapshot(lived_in), torch.get_rng_state()
    result = cascading_randomisation(lived_in, photos, gradcam, torch.tensor([1, 2]))
    assert len(result.steps) == 41  # 20 convolutions, 20 batch norms, fc
    random_logit(lived_in, photos, gradcam, torch.tensor([1, 2]))
    assert_same_state(before, snapshot(lived_in))
    assert torch.equal(rng, torch.get_rng_state())


@pytest.mark.filterwarnings("ignore:.*training mode:UserWarning")
def test_the_model_comes_back_untouched_when_explain_raises(lived_in, photos):
    before = snapshot(lived_in)
    calls = []

    def breaks_on_the_third_call(model, x, classes):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("the method broke")
        return gradcam(model, x, classes)

    with pytest.raises(RuntimeError, match="the method broke"):
        cascading_randomisation(lived_in, photos, breaks_on_the_third_call, torch.tensor([1, 2]))
    assert_same_state(before, snapshot(lived_in))

    def vandal(model, x, classes):  # what it does to the model it is given stays there
        model.train()
        model.register_forward_hook(lambda module, args, output: None)
        with torch.no_grad():
            model.fc.weight.zero_()
        return sobel_edges(model, x, classes)

    cascading_randomisation(lived_in, photos, vandal, torch.tensor([1, 2]), layers=["fc"])
    random_logit(lived_in, photos, vandal, torch.tensor([1, 2]))
    assert_same_state(before, snapshot(lived_in))


# --- seeds and layers -----------------------------------------------------------------------------


def test_seeded_reproducibility(resnet, photos):
    layers = ["fc", "layer4", "layer3.1"]
    classes = torch.tensor([3, 7])
    first = cascading_randomisation(resnet, photos, gradcam, classes, layers=layers, seed=0)
    again = cascading_randomisation(resnet, photos, gradcam, classes, layers=layers, seed=0)
    other = cascading_randomisation(resnet, photos, gradcam, classes, layers=layers, seed=1)
    assert [s.layer for s in first.steps] == layers
    for a, b in zip(first.steps, again.steps, strict=True):
        assert torch.equal(a.spearman, b.spearman) and torch.equal(a.ssim, b.ssim)
    assert not torch.equal(first.steps[-1].spearman, other.steps[-1].spearman)
    # a layer's new weights depend on the seed and its name, not on the other layers listed
    alone = cascading_randomisation(resnet, photos, gradcam, classes, layers=["fc"], seed=0)
    assert torch.equal(alone.steps[0].spearman, first.steps[0].spearman)


def test_layers_come_in_reverse_order_of_their_calls():
    class DefinedOutOfOrder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.head = nn.Linear(8, 3)
            self.token = nn.Parameter(torch.randn(1, 1, 8))  # on the root
            self.embed = nn.Linear(4, 8)
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)  # out_proj never runs
            self.norm = nn.LayerNorm(8)

        def forward(self, x: Tensor) -> Tensor:
            t = self.embed(x) + self.token
            t = self.norm(self.attn(t, t, t)[0])
            return self.head(t.mean(dim=1))

    model = DefinedOutOfOrder()
    # the root finishes last, so its own parameter is randomised first
    assert randomisation_order(model, torch.randn(2, 5, 4)) == ["", "head", "norm", "attn",
                                                                  "embed"]


def test_bad_arguments_fail_before_the_method_runs(trained, held_out):
    images, classes, _ = held_out
    calls = []

    def counted(model, x, c):
        calls.append(1)
        return gradcam(model, x, c)

    with pytest.raises(ValueError, match="no layer named 'fc'"):
        cascading_randomisation(trained, images, counted, classes, layers=["10", "fc"])
    with pytest.raises(ValueError, match="'8' has no weights of its own"):  # the pooling
        cascading_randomisation(trained, images, counted, classes, layers=["10", "8"])
    with pytest.raises(TypeError, match="list of layer names"):
        cascading_randomisation(trained, images, counted, classes, layers="10")
    with pytest.raises(ValueError, match=r"\(B,\) = \(16,\)"):
        cascading_randomisation(trained, images, counted, classes[:3])
    with pytest.raises(TypeError, match="take its .maps"):
        cascading_randomisation(trained, images, lambda m, x, c: heatlens.explain(m, x), classes)
    assert not calls
