"""Tests written to kill the mutants of ``heatlens/methods/rollout.py`` that survived
``tools/mutation.py`` (issue 16, "Tests that catch wrong math"; scores and the equivalent mutants
are in ``docs/testing.md``).

The three attention methods are checked end to end, through ``heatlens.explain``, on a tiny timm
ViT built here (16 x 16 inputs, 4 x 4 patches, a class token, one or two blocks of two heads):
the attention probabilities and their gradients are taken by hand from an eager copy of the model
(``fused_attn`` off, the output of each block's ``attn_drop`` kept), and the maps are written out
in float64 NumPy loops, one image and one layer at a time:

* attention rollout: ``F_l = fuse_h(A_l)``, the lowest ``int(N^2 r)`` entries outside the class
  token's column set to 0, ``Ā_l = rownorm((F_l + I) / 2)``, ``R = Ā_L ... Ā_1``;
* gradient rollout: the same with ``F_l = max(0, fuse_h(A_l * dy/dA_l))``;
* Chefer: ``R_0 = I``, ``R_l = R_{l-1} + mean_h((dy/dA_l * A_l)^+) R_{l-1}``;

the raw map is the class token's row over the patches on the 4 x 4 grid (the patch rows' mean
without a class token), the map that row upsampled bilinearly (pixel centres aligned) and min-max
scaled per image. Everything the explanation reports beside the map (method, layer, targets,
scores, details) is checked against what the test computed. The file runs in a few seconds.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from threads import one_intraop_thread
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

import heatlens
from heatlens.engine.targets import NO_CLASS
from heatlens.methods.rollout import AttentionRollout, Chefer, GradientRollout

SIZE, PATCH, CLASSES = 16, 4, 5
GRID = SIZE // PATCH


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    with one_intraop_thread():
        yield


def tiny_vit(depth: int, class_token: bool = True, classes: int = CLASSES) -> VisionTransformer:
    """A seeded timm ViT small enough for float64 loops: 16 tokens of patches (+ the class
    token), two heads. The query/key/value weights are scaled by 10 so that the attention is far
    from uniform and the maps have a spread well above float32 rounding."""
    with torch.random.fork_rng():
        torch.manual_seed(depth)
        model = VisionTransformer(img_size=SIZE, patch_size=PATCH, num_classes=classes,
                                  embed_dim=16, depth=depth, num_heads=2, mlp_ratio=2.0,
                                  class_token=class_token,
                                  global_pool="token" if class_token else "avg")
    with torch.no_grad():
        for block in model.blocks:
            block.attn.qkv.weight.mul_(10.0)
    return model.eval()


def images(batch: int = 2, seed: int = 3) -> Tensor:
    return torch.randn(batch, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def by_hand(model: nn.Module, x: Tensor, score: Callable[[Any], Tensor],
            blocks: list[str] | None = None
            ) -> tuple[list[np.ndarray], list[np.ndarray | None], Any]:
    """Attention probabilities ``(B, heads, N, N)`` of every block (``model.blocks``, or the
    named ones) of an eager copy of the model and the gradients of ``score(output).sum()`` with
    respect to them (``None`` for a block the score does not reach), in float64, and the
    output."""
    eager = copy.deepcopy(model)
    recorded: list[Tensor] = []
    for block in eager.blocks if blocks is None else [eager.get_submodule(b) for b in blocks]:
        block.attn.fused_attn = False
        block.attn.attn_drop.register_forward_hook(lambda _m, _i, out: recorded.append(out))
    output = eager(x)
    grads = torch.autograd.grad(score(output).sum(), recorded, allow_unused=True)
    return ([a.detach().double().numpy() for a in recorded],
            [None if g is None else g.double().numpy() for g in grads], output)


def discard(fused: np.ndarray, ratio: float, prefix: int) -> np.ndarray:
    """The ``int(N^2 ratio)`` lowest entries outside the prefix columns set to 0."""
    n = fused.shape[0]
    out = fused.copy()
    entries = sorted((fused[i, j], i, j) for i in range(n) for j in range(prefix, n))
    for _, i, j in entries[: int(n * n * ratio)]:
        out[i, j] = 0.0
    return out


FUSE = {"mean": np.mean, "max": np.max, "min": np.min}


def relevance_written_out(method: str, attentions: list[np.ndarray],
                          gradients: list[np.ndarray | None], fusion: str = "mean",
                          ratio: float = 0.0, prefix: int = 1) -> np.ndarray:
    """``(B, N, N)`` token relevance of ``method``, one image and one layer at a time; a layer
    without a gradient (``None``) has gradient 0."""
    batch, _, n, _ = attentions[0].shape
    out = np.zeros((batch, n, n))
    for b in range(batch):
        result = np.eye(n)
        for a, g in zip(attentions, gradients, strict=True):
            grad = np.zeros_like(a[b]) if g is None else g[b]
            if method == "chefer":
                result = result + np.maximum(grad * a[b], 0.0).mean(axis=0) @ result
                continue
            if method == "attention_rollout":
                fused = FUSE[fusion](a[b], axis=0)
            else:
                fused = np.maximum(FUSE[fusion](a[b] * grad, axis=0), 0.0)
            step = (discard(fused, ratio, prefix) + np.eye(n)) / 2
            step = step / step.sum(axis=1, keepdims=True)
            result = step @ result
        out[b] = result
    return out


def raw_and_maps(relevance: np.ndarray, prefix: int) -> tuple[Tensor, Tensor]:
    """The class token's row over the patches (the mean of the patch rows without one) on the
    grid, and that row upsampled bilinearly to the input size and min-max scaled per image."""
    patches = relevance[:, :, prefix:]
    rows = patches[:, 0] if prefix else patches.mean(axis=1)
    raw = torch.from_numpy(rows.reshape(-1, GRID, GRID))
    big = F.interpolate(raw[:, None], size=(SIZE, SIZE), mode="bilinear", align_corners=False)[:, 0]
    low = big.amin(dim=(1, 2), keepdim=True)
    high = big.amax(dim=(1, 2), keepdim=True)
    return raw, (big - low) / (high - low)


def assert_map_close(result: Tensor, raw: Tensor, maps: Tensor) -> None:
    """``result`` (float32) against the float64 ``maps`` scaled from ``raw``: min-max scaling
    divides float32 rounding of the raw values (about ``2^-24`` of their magnitude) by the raw
    map's span, so the tolerance does too."""
    flat = raw.flatten(1)
    spread = (flat.abs().amax(dim=1) / (flat.amax(dim=1) - flat.amin(dim=1))).amax()
    torch.testing.assert_close(result.double(), maps, rtol=0.0,
                               atol=1e-6 + 64 * 2.0**-24 * float(spread))


def picked(classes: list[int]) -> Callable[[Tensor], Tensor]:
    return lambda output: output[torch.arange(len(classes)), classes]


CASES = [
    ("attention_rollout", {}),
    ("attention_rollout", {"head_fusion": "max", "discard_ratio": 0.3}),
    ("gradient_rollout", {}),
    ("gradient_rollout", {"head_fusion": "min", "discard_ratio": 0.3}),
    ("chefer", {}),
]


@pytest.mark.parametrize("depth", [1, 2])
@pytest.mark.parametrize(("method", "options"), CASES)
def test_explanation_is_the_formula_written_out(method, options, depth):
    """The raw map and the map equal the formula for a one-block ViT (the first and last layer
    are the same) and a two-block one, and the explanation reports what was explained."""
    model = tiny_vit(depth)
    x, classes = images(), [0, 3]
    attentions, gradients, output = by_hand(model, x, picked(classes))
    expected = relevance_written_out(method, attentions, gradients,
                                     options.get("head_fusion", "mean"),
                                     options.get("discard_ratio", 0.0))
    raw, maps = raw_and_maps(expected, prefix=1)

    result = heatlens.explain(model, x, method, target=classes, **options)
    torch.testing.assert_close(result.raw.double(), raw, rtol=1e-5, atol=1e-6)
    assert_map_close(result.maps, raw, maps)
    assert result.method == method
    assert result.layers == ("attention",)
    assert "attention layers" in result.layer_reason.lower()
    assert result.targets.tolist() == classes
    torch.testing.assert_close(result.output, output.detach())
    torch.testing.assert_close(result.scores, picked(classes)(output).detach())
    torch.testing.assert_close(result.probabilities,
                               picked(classes)(output.softmax(dim=1)).detach())
    assert result.details["attention_layers"] == depth
    # the shape described is (images, tokens): 2 images, 16 patches + the class token
    assert "(2, 17)" in result.details["token_layout"]
    assert "1 prefix token" in result.details["token_layout"]


@pytest.mark.parametrize("method", ["attention_rollout", "gradient_rollout", "chefer"])
def test_without_a_class_token_the_map_is_the_mean_of_the_patch_rows(method):
    model = tiny_vit(1, class_token=False)
    x = images()
    attentions, gradients, _ = by_hand(model, x, picked([1, 4]))
    raw, maps = raw_and_maps(relevance_written_out(method, attentions, gradients, prefix=0),
                             prefix=0)
    result = heatlens.explain(model, x, method, target=[1, 4])
    torch.testing.assert_close(result.raw.double(), raw, rtol=1e-5, atol=1e-6)
    assert_map_close(result.maps, raw, maps)
    assert "(2, 16)" in result.details["token_layout"]


@pytest.mark.parametrize("method", ["gradient_rollout", "chefer"])
def test_a_callable_target_is_explained_with_the_gradient_of_its_score(method):
    """A score that is not one class (the margin of class 1 over class 2): one score per image of
    the batch of 2 (the inputs have 3 channels), no class index."""
    model = tiny_vit(2)
    x = images(seed=5)

    def margin(output: Tensor) -> Tensor:
        return output[:, 1] - output[:, 2]

    attentions, gradients, output = by_hand(model, x, margin)
    raw, _ = raw_and_maps(relevance_written_out(method, attentions, gradients), prefix=1)
    result = heatlens.explain(model, x, method, target=margin)
    torch.testing.assert_close(result.raw.double(), raw, rtol=1e-5, atol=1e-6)
    assert result.targets.tolist() == [NO_CLASS, NO_CLASS]
    torch.testing.assert_close(result.scores, margin(output).detach())


@pytest.mark.parametrize("method", ["attention_rollout", "chefer"])
def test_a_binary_classifier_reports_the_sigmoid_of_the_class_explained(method):
    """A single-logit ViT explained for its negative class (``BinaryOutput(sign=-1)``): the
    score is ``-y``, the class 0, the probability ``sigmoid(-y)``, and Chefer's map follows the
    gradient of ``-y``."""
    model = tiny_vit(1, classes=1)
    x = images(seed=7)
    attentions, gradients, output = by_hand(model, x, lambda out: -out[:, 0])
    raw, _ = raw_and_maps(relevance_written_out(method, attentions, gradients), prefix=1)
    result = heatlens.explain(model, x, method, target=heatlens.BinaryOutput(sign=-1))
    torch.testing.assert_close(result.raw.double(), raw, rtol=1e-5, atol=1e-6)
    assert result.targets.tolist() == [0, 0]
    torch.testing.assert_close(result.scores, -output[:, 0].detach())
    torch.testing.assert_close(result.probabilities, torch.sigmoid(-output[:, 0]).detach())


class TwoExits(nn.Module):
    """A two-block ViT with an exit after each block: ``"early"`` is the head on the class token
    after the first block, ``"late"`` after the second. The second block's attention does not
    reach the early score."""

    def __init__(self, vit: VisionTransformer) -> None:
        super().__init__()
        self.vit = vit

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        v = self.vit
        first = v.blocks[0](v._pos_embed(v.patch_embed(x)))
        second = v.blocks[1](first)
        return {"early": v.head(v.norm(first)[:, 0]), "late": v.head(v.norm(second)[:, 0])}


@pytest.mark.parametrize("method", ["gradient_rollout", "chefer"])
def test_an_attention_layer_the_score_does_not_reach_has_gradient_zero(method):
    """Explaining the early exit: the second block's attention has no gradient (it is not in the
    score's graph), which is gradient 0: ``F = 0`` adds the identity (gradient rollout), ``R``
    gains nothing (Chefer). The map equals the formula with the first block alone."""
    model = TwoExits(tiny_vit(2)).eval()
    x = images(seed=6)

    def early(output: dict[str, Tensor]) -> Tensor:
        return output["early"][:, 2]

    attentions, gradients, _ = by_hand(model, x, early, blocks=["vit.blocks.0", "vit.blocks.1"])
    assert gradients[1] is None  # the case under test: no gradient at all, not a zero one
    raw, _ = raw_and_maps(relevance_written_out(method, attentions, gradients), prefix=1)
    result = heatlens.explain(model, x, method, target=2, output="early")
    assert result.details["attention_layers"] == 2
    torch.testing.assert_close(result.raw.double(), raw, rtol=1e-5, atol=1e-6)
    first_only, _ = raw_and_maps(relevance_written_out(method, attentions[:1], gradients[:1]), 1)
    torch.testing.assert_close(result.raw.double(), first_only, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["gradient_rollout", "chefer"])
def test_a_score_that_does_not_depend_on_the_attention_is_refused(method):
    model = tiny_vit(1)
    with pytest.raises(ValueError, match="target score does not depend on the attention"):
        heatlens.explain(model, images(), method, target=lambda output: output.detach()[:, 0])


@pytest.mark.parametrize("explainer", [AttentionRollout, GradientRollout, Chefer])
def test_the_constructor_refuses_a_layer_and_names_the_method(explainer):
    model = tiny_vit(1)
    for layer in ("blocks.0", model.blocks[0]):
        with pytest.raises(ValueError, match=f"^{explainer.name} combines every attention layer"):
            explainer(model, layer=layer)
    assert explainer(model, layer="auto").model is model


def test_the_constructor_checks_head_fusion_and_discard_ratio():
    model = tiny_vit(1)
    with pytest.raises(ValueError, match=r"one of \('mean', 'max', 'min'\), not 'median'"):
        AttentionRollout(model, head_fusion="median")
    for ratio in (-0.1, 1.0, 1.5):
        with pytest.raises(ValueError, match=rf"\[0, 1\), not {ratio}$"):
            AttentionRollout(model, discard_ratio=ratio)
    for ratio in (0.0, 0.99):
        explainer = AttentionRollout(model, head_fusion="min", discard_ratio=ratio)
        assert (explainer.head_fusion, explainer.discard_ratio) == ("min", ratio)
    default = GradientRollout(model)
    assert (default.head_fusion, default.discard_ratio) == ("mean", 0.0)


class Watched(nn.Module):
    """Records, for each forward pass, whether autograd is on and whether the input needs a
    gradient."""

    def __init__(self, vit: VisionTransformer) -> None:
        super().__init__()
        self.vit = vit
        self.seen: list[tuple[bool, bool]] = []

    def forward(self, x: Tensor) -> Tensor:
        self.seen.append((torch.is_grad_enabled(), x.requires_grad))
        return self.vit(x)


@pytest.mark.parametrize(("method", "graph"), [("attention_rollout", False),
                                               ("gradient_rollout", True), ("chefer", True)])
def test_only_the_gradient_methods_build_a_graph(method, graph):
    """Attention rollout is class-agnostic: its one forward pass runs without autograd (no graph
    kept in memory); the gradient methods need the graph, and nothing else runs the model."""
    model = Watched(tiny_vit(1)).eval()
    heatlens.explain(model, images(), method, target=1)
    assert model.seen == [(graph, graph)]
