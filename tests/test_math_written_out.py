"""The math of four methods against references computed here (issue 16, "Tests that catch wrong
math"), each on a small seeded network so that the whole file runs in seconds:

1. Integrated gradients with non-zero baselines (a tensor, ``"blur"``, ``"uniform"``): the
   baseline itself written out (``scipy.ndimage.gaussian_filter`` for the blur, the documented
   seeded noise for the uniform one), Captum's ``IntegratedGradients`` with the same
   ``baselines=``, and completeness ``sum A = f(x) - f(x')`` with ``f`` evaluated here.
2. Gradient rollout: ``F_l = max(0, mean_h(A_l * dy_c/dA_l))``, rolled out in float64 loops,
   with the attention and its gradient read from an eager (non-fused) copy of the model.
3. RISE, Eq. 6 of Petsiuk et al.: ``S = 1/(N p) sum_i s_c(x * M_i) M_i``, with the masks drawn
   here from the documented seeds.
4. The ``maps`` of attribution methods against Captum's own picture scaling
   (``captum.attr._utils.visualization._normalize_attr``, absolute value, 2 % outliers).
"""

from __future__ import annotations

import copy
import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from captum.attr import IntegratedGradients as CaptumIG
from captum.attr._utils.visualization import _normalize_attr
from scipy.ndimage import gaussian_filter
from threads import one_intraop_thread
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

import heatlens
from heatlens.methods.perturbation import RISE


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Small models: one intra-op thread is faster on a shared machine; restored after."""
    with one_intraop_thread():
        yield


def max_diff(a: Tensor, b: Tensor) -> float:
    return float((torch.as_tensor(a).double() - torch.as_tensor(b).double()).abs().max())


def assert_relatively_close(actual: Tensor, expected: Tensor, rtol: float) -> None:
    """Equal up to ``rtol`` of the largest magnitude of ``expected`` (which must not be 0)."""
    scale = float(torch.as_tensor(expected).abs().max())
    assert scale > 0
    assert max_diff(actual, expected) <= rtol * scale, (max_diff(actual, expected), scale)


# --- 1. integrated gradients with non-zero baselines -------------------------------------------


class BNNet(nn.Module):
    """conv -> batch norm -> ReLU -> conv -> softplus -> mean -> linear, with seeded random
    batch-norm statistics: not positively homogeneous, so the baseline matters everywhere."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, stride=2)
        self.fc = nn.Linear(8, 5)

    def forward(self, x: Tensor) -> Tensor:
        h = F.softplus(self.conv2(torch.relu(self.bn(self.conv1(x)))))
        return self.fc(h.mean(dim=(2, 3)))


class SmoothNet(nn.Module):
    """conv -> softplus -> conv -> tanh -> mean -> linear: a smooth path integrand, so
    Gauss-Legendre with a few points integrates it to float round-off."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(torch.tanh(self.conv2(F.softplus(self.conv1(x)))).mean(dim=(2, 3)))


def seeded(cls: type[nn.Module], seed: int = 3) -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = cls()
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                n = module.num_features
                module.running_mean.copy_(0.3 * torch.randn(n, generator=generator))
                module.running_var.copy_(0.5 + torch.rand(n, generator=generator))
                module.bias.copy_(0.3 * torch.randn(n, generator=generator))
    return model.eval()


IG_X = 2 * torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(11))
IG_TARGETS = [0, 3, 4]
TENSOR_BASELINE = torch.tensor([0.8, -0.6, 0.4]).reshape(3, 1, 1)  # broadcast over pixels
BLUR_SIGMA = 2.0  # 3 sigma is whole: heatlens' radius ceil(3 sigma) = scipy's int(3 sigma + .5)
UNIFORM_SEED = 4


def written_out_baseline(kind: str, x: Tensor) -> Tensor:
    """The baseline as documented in ``IntegratedGradients``' docstring, computed here."""
    if kind == "tensor":
        return TENSOR_BASELINE.expand_as(x).clone()
    if kind == "blur":  # Gaussian of BLUR_SIGMA pixels per channel, edges replicated
        blurred = gaussian_filter(x.double().numpy(), sigma=(0, 0, BLUR_SIGMA, BLUR_SIGMA),
                                  mode="nearest", truncate=3.0)
        return torch.from_numpy(blurred).to(x.dtype)
    # uniform noise over each image's value range, one seeded draw shared by the batch
    noise = torch.rand(x.shape[1:], generator=torch.Generator().manual_seed(UNIFORM_SEED))
    low = x.flatten(1).amin(1).reshape(-1, 1, 1, 1)
    high = x.flatten(1).amax(1).reshape(-1, 1, 1, 1)
    return low + (high - low) * noise


def ig_options(kind: str) -> dict:
    if kind == "tensor":
        return {"baseline": TENSOR_BASELINE}
    if kind == "blur":
        return {"baseline": "blur", "blur_sigma": BLUR_SIGMA}
    return {"baseline": "uniform", "seed": UNIFORM_SEED}


BASELINE_KINDS = ["tensor", "blur", "uniform"]


@pytest.mark.parametrize("kind", BASELINE_KINDS)
def test_ig_baseline_is_the_documented_one(kind):
    """The baseline heatlens integrates from is the tensor given, the input blurred by a
    Gaussian (scipy's, edges replicated) or the seeded uniform noise over each image's range."""
    model = seeded(BNNet)
    e = heatlens.explain(model, IG_X, "integrated_gradients", target=IG_TARGETS, steps=2,
                         **ig_options(kind))
    expected = written_out_baseline(kind, IG_X)
    assert max_diff(expected, torch.zeros_like(expected)) > 0.3  # far from the zero baseline
    assert max_diff(e.details["baseline"], expected) <= 1e-5 * float(expected.abs().max())


@pytest.mark.parametrize("rule", ["gausslegendre", "riemann_middle"])
@pytest.mark.parametrize("kind", BASELINE_KINDS)
def test_ig_with_baselines_matches_captum(kind, rule):
    """heatlens' IG from a non-zero baseline equals Captum's ``IntegratedGradients`` given the
    same ``baselines=`` (path ``x' + a (x - x')``, times ``x - x'``). Kills a path that ignores
    the baseline (``a * x``), which no zero-baseline comparison can see."""
    model = seeded(BNNet)
    baseline = written_out_baseline(kind, IG_X)
    ours = heatlens.explain(model, IG_X, "integrated_gradients", target=IG_TARGETS, steps=8,
                            rule=rule, **ig_options(kind))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected, delta = CaptumIG(copy.deepcopy(model)).attribute(
            IG_X, baselines=baseline, target=IG_TARGETS, n_steps=8, method=rule,
            return_convergence_delta=True)
    assert_relatively_close(ours.raw, expected, 1e-5)
    gain = ours.raw.flatten(1).sum(1) - ours.details["convergence_delta"]
    assert max_diff(ours.details["convergence_delta"], delta) <= 1e-5 * float(gain.abs().max())
    # the test means something: from zeros the attributions are far from these
    zeros = heatlens.explain(model, IG_X, "integrated_gradients", target=IG_TARGETS, steps=8,
                             rule=rule).raw
    assert max_diff(zeros, expected) > 0.2 * float(expected.abs().max())


@pytest.mark.parametrize("kind", BASELINE_KINDS)
def test_ig_completeness_from_non_zero_baselines(kind):
    """Completeness (Sundararajan et al., Prop. 1): ``sum A = f(x) - f(x')`` with ``f`` evaluated
    here at the written-out baseline; on a smooth network 8 Gauss-Legendre points integrate to
    round-off. A path that ignores the baseline integrates from 0 and misses ``f(0) - f(x')``."""
    model = seeded(SmoothNet)
    baseline = written_out_baseline(kind, IG_X)
    e = heatlens.explain(model, IG_X, "integrated_gradients", target=IG_TARGETS, steps=8,
                         **ig_options(kind))
    with torch.no_grad():
        rows = torch.arange(len(IG_TARGETS))
        gain = (model(IG_X) - model(baseline))[rows, IG_TARGETS].double()
        gain_from_zero = (model(IG_X) - model(torch.zeros_like(IG_X)))[rows, IG_TARGETS].double()
    # the baseline's score differs from the zero input's: the check can tell them apart
    assert float((gain - gain_from_zero).abs().min()) > 1e-3, (gain, gain_from_zero)
    total = e.raw.flatten(1).sum(1, dtype=torch.float64)
    assert float((total - gain).abs().max()) <= 1e-4 * float(gain.abs().max()), (total, gain)
    assert float(e.details["convergence_delta"].abs().max()) <= 1e-4 * float(gain.abs().max())


# --- 2. gradient rollout written out ----------------------------------------------------------


def tiny_vit() -> nn.Module:
    """A seeded timm ViT: 32 px, 8 px patches (a 4 x 4 grid), a class and a register token,
    3 blocks of 2 heads; fused attention as timm's default."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = VisionTransformer(img_size=32, patch_size=8, num_classes=6, embed_dim=32,
                                  depth=3, num_heads=2, mlp_ratio=2.0, reg_tokens=1)
        nn.init.normal_(model.head.weight, std=0.5)  # gradients well away from 0
    return model.eval()


def eager_attention_and_gradients(model: nn.Module, x: Tensor, targets: list[int]
                                  ) -> tuple[list[Tensor], list[Tensor]]:
    """Each block's attention probabilities ``(B, heads, N, N)`` and d y_c / d A, read from a
    deep copy of the model running timm's eager attention (the output of ``attn_drop``)."""
    eager = copy.deepcopy(model)
    kept: list[Tensor] = []

    def keep(module: nn.Module, args: tuple, output: Tensor) -> None:
        output.retain_grad()
        kept.append(output)

    for block in eager.blocks:
        block.attn.fused_attn = False
        block.attn.attn_drop.register_forward_hook(keep)
    logits = eager(x)
    logits[torch.arange(len(targets)), targets].sum().backward()
    return [a.detach() for a in kept], [a.grad for a in kept]


def written_out_gradient_rollout(attentions: list[Tensor], grads: list[Tensor], prefix: int,
                                 grid: tuple[int, int], absolute: bool = False) -> np.ndarray:
    """Per image, float64 loops: ``F_l = max(0, mean over heads of A_l * G_l)``, then
    ``R = prod_l rownorm((F_l + I) / 2)`` (the last layer leftmost); the class token's row over
    the patch tokens, on the grid. ``absolute=True`` takes ``|.|`` in place of ``max(0, .)``
    (only to show that the difference is visible)."""
    batch, heads, n, _ = attentions[0].shape
    maps = []
    for b in range(batch):
        result = np.eye(n)
        for a, g in zip(attentions, grads, strict=True):
            product = a[b].double().numpy() * g[b].double().numpy()
            fused = sum(product[h] for h in range(heads)) / heads
            fused = np.abs(fused) if absolute else np.where(fused > 0, fused, 0.0)
            step = (fused + np.eye(n)) / 2
            step = step / step.sum(axis=1, keepdims=True)
            result = step @ result
        maps.append(result[0, prefix:].reshape(grid))
    return np.stack(maps)


def test_gradient_rollout_equals_the_formula():
    """Gradient rollout's raw map is the class row of ``prod_l rownorm((F_l + I) / 2)`` with
    ``F_l = max(0, mean_h(A_l * dy_c/dA_l))``, with attention and gradients read here from an
    eager copy. Kills ``abs()`` in place of ``clamp_min(0)`` (the fused products are checked to
    have a large negative part, so the two differ)."""
    model = tiny_vit()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    targets = [1, 4]
    attentions, grads = eager_attention_and_gradients(model, x, targets)
    assert len(attentions) == 3 and attentions[0].shape == (2, 2, 18, 18)
    expected = written_out_gradient_rollout(attentions, grads, prefix=2, grid=(4, 4))

    result = heatlens.explain(model, x, "gradient_rollout", target=targets)
    assert all(block.attn.fused_attn for block in model.blocks)
    assert result.raw.shape == (2, 4, 4)
    assert_relatively_close(result.raw, torch.from_numpy(expected), 1e-5)

    # the clamp is at work: with |.| instead of max(0, .) the map moves by far more than 1e-5
    fused = [(a * g).mean(dim=1) for a, g in zip(attentions, grads, strict=True)]
    negative = max(float((-f).clamp_min(0).max() / f.abs().max()) for f in fused)
    assert negative > 0.1, negative
    with_abs = written_out_gradient_rollout(attentions, grads, prefix=2, grid=(4, 4),
                                            absolute=True)
    assert float(np.abs(with_abs - expected).max()) > 1e-3 * float(np.abs(expected).max())


# --- 3. RISE, Eq. 6 ------------------------------------------------------------------------------


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.fc(h.amax(dim=(2, 3)))


RISE_X = torch.randn(2, 3, 12, 10, generator=torch.Generator().manual_seed(8))
RISE_TARGETS = [2, 1]


def written_out_masks(count: int, size: tuple[int, int], cells: int, p: float, seed: int
                      ) -> Tensor:
    """RISE's masks as documented: mask ``i`` from a generator seeded with
    ``seed * 1_000_003 + i``: a ``cells x cells`` grid of ones with probability ``p``, upsampled
    bilinearly to ``(cells + 1)`` cells of ``ceil(size / cells)`` pixels, cropped at a shift of
    less than one cell drawn after the grid."""
    cell = [math.ceil(s / cells) for s in size]
    masks = []
    for i in range(count):
        generator = torch.Generator().manual_seed(seed * 1_000_003 + i)
        grid = (torch.rand(cells, cells, generator=generator) < p).float()
        dy, dx = (int(torch.randint(0, c, (1,), generator=generator)) for c in cell)
        big = F.interpolate(grid[None, None], size=((cells + 1) * cell[0], (cells + 1) * cell[1]),
                            mode="bilinear", align_corners=False)[0, 0]
        masks.append(big[dy : dy + size[0], dx : dx + size[1]])
    return torch.stack(masks)


@pytest.mark.parametrize("p", [0.25, 0.6])
def test_rise_equals_eq6(p):
    """RISE's raw map is ``1/(N p) sum_i softmax(f(x * M_i))_c M_i`` with the masks drawn here
    from the documented seeds. Kills dividing by ``N`` instead of ``N p`` (off by the factor
    ``p``), and any change to how masks are drawn."""
    model = seeded(SmallCNN)
    n, cells, seed = 40, 3, 7
    masks = written_out_masks(n, (12, 10), cells, p, seed)
    assert 0.2 * p < float(masks.mean()) < 2 * p  # masks keep about a share p of the image
    explainer = RISE(model, masks=n, cells=cells, p=p, seed=seed)
    assert torch.equal(explainer.random_masks(0, n, (12, 10), torch.device("cpu")), masks)

    with torch.no_grad():
        expected = torch.zeros(2, 12, 10, dtype=torch.float64)
        for b, c in enumerate(RISE_TARGETS):
            for mask in masks:
                probability = model(RISE_X[b : b + 1] * mask).softmax(dim=1)[0, c]
                expected[b] += probability.double() * mask.double()
        expected /= n * p
    result = heatlens.explain(model, RISE_X, "rise", target=RISE_TARGETS, masks=n, cells=cells,
                              p=p, seed=seed, memory_budget=2**20)  # several chunks
    assert result.raw.shape == RISE_X.shape
    for channel in range(3):  # the same map for every channel
        assert_relatively_close(result.raw[:, channel], expected, 1e-5)


# --- 4. attribution maps against Captum's picture scaling ---------------------------------------


def captum_scaled(raw: Tensor) -> Tensor:
    """Captum's ``visualize_image_attr`` scaling of each image: the channel sum, absolute value,
    divided by the value where the sorted values' running total reaches 98 %, clipped to 1."""
    pictures = []
    for attribution in raw.detach().double().numpy():
        channel_sum = attribution.sum(axis=0)  # (H, W), as Captum sums channels last
        pictures.append(_normalize_attr(channel_sum, "absolute_value", outlier_perc=2))
    return torch.from_numpy(np.stack(pictures))


@pytest.mark.parametrize(("method", "options"), [
    ("saliency", {}),
    ("input_x_gradient", {}),
    ("integrated_gradients", {"steps": 4}),
    ("occlusion", {"window": 4, "stride": 2}),
])
def test_attribution_maps_use_captums_scaling(method, options):
    """``Explanation.maps`` of an attribution is Captum's default picture of ``raw``
    (``_normalize_attr(sum_c A, "absolute_value", outlier_perc=2)``). Kills a wrong outlier
    percentile (100x off turns every map into ones; the maps here are checked to have few ones:
    only the top 2 % of the attribution mass saturates)."""
    model = seeded(BNNet)
    e = heatlens.explain(model, IG_X, method, target=IG_TARGETS, **options)
    expected = captum_scaled(e.raw)
    assert e.maps.shape == expected.shape
    assert max_diff(e.maps, expected) <= 1e-5
    saturated = (expected >= 1 - 1e-9).double().flatten(1).mean(1)
    assert float(saturated.max()) < 0.1, saturated  # the scaling is not trivially all ones
