"""A real vision transformer, trained in the test session, whose evidence sits at a known place.

The task: scikit-learn's bundled 8x8 digits (``load_digits``, 1797 images, offline), each pasted
into one of the four quadrants (random per example) of a 1x16x16 canvas of low noise
(N(0, 0.1^2)); the label is the digit (10 classes). A tiny timm ``VisionTransformer`` with a class
token and 4x4 patches sees a 4x4 patch grid, so the digit covers exactly the 4 patches of one
quadrant and nothing else carries class evidence. The maps of ``heatlens.explain`` must therefore
put their mass, and their peak, in the digit's quadrant (chance: 0.25 and 25 %).

Training (fixture ``digit_vit``): 1397 digits for training, re-pasted at a fresh random quadrant
with fresh noise every epoch; 400 other digits held out, each pasted once. ViT: embed_dim 64,
depth 4, 4 heads, MLP ratio 2 (136,906 parameters). AdamW (lr 3e-3, one-cycle schedule, weight
decay 0.05), batch 64, 16 epochs (352 steps), on one thread, seeded. Measured on the shared 2-core
test machine: 14 to 19 s, held-out accuracy 96.25 % (385 / 400).

The attention stays timm's default fused ``F.scaled_dot_product_attention`` (``fused_attn`` is
True unless ``TIMM_FUSED_ATTN=0``): heatlens has to cope with attention it cannot hook directly.

The reference: each map is also computed in the test, written out independently of heatlens
(:func:`written_out_maps`), from an eager (non-fused) deep copy of the model whose attention
probabilities (the output of each block's ``attn_drop``) and ``blocks[-1].norm1`` tokens keep
their gradients: attention rollout (head mean, + identity, halved, rows normalised, product over
layers, the class token's row over the patches), gradient rollout (attention x gradient, head
mean, clamped at 0, then as rollout), Chefer (R = I; R += mean_h((grad x attn).clamp(min=0)) @ R
over layers; class-token row) and Grad-CAM on the patch tokens of ``blocks[-1].norm1`` (reshaped
by hand to the 4 x 4 grid, channel weights = the gradient's mean, ReLU); patch scores upsampled
bilinearly to 16x16 and min-max scaled. ``test_map_points_at_the_digit`` asserts that heatlens'
maps equal these, and that both score the same on the evidence measures. (This replaces
reference numbers that came from code outside the repository and were never asserted.)

Measured on the first 200 held-out images, targets = true labels (seed 0):

    method               mass in the digit's quadrant   arg-max in the digit's quadrant
    attention_rollout    0.748                          100 %
    gradient_rollout     0.811                          100 %
    chefer               0.828                          100 %
    gradcam (tokens)     0.504                          79 %

Retrained with other seeds (1, 2) or for 12 epochs these stay within 0.78 to 0.80, 0.78 to 0.82,
0.80 to 0.83 (all 100 % arg-max) and 0.49 to 0.58 (72 to 85 %). Grad-CAM on ViT tokens is the
weakest and noisiest, as is known for transformers. The thresholds below sit clearly under these
values and well above chance.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import pytest
import sklearn.datasets as sklearn_datasets
import torch
import torch.nn.functional as F
from threads import one_intraop_thread
from torch import nn

import heatlens

SIZE = 16  # canvas side; patches are 4x4, so the patch grid is 4x4
CORNERS = ((0, 0), (0, 8), (8, 0), (8, 8))  # quadrant 0..3: top-left, top-right, bottom-left, ...
N_HELD_OUT = 400
N_EVIDENCE = 200  # held-out images scored by the evidence tests
EPOCHS = 16
BATCH = 64


@dataclass(frozen=True)
class DigitViT:
    """The trained ViT (eval mode) and its held-out split."""

    model: nn.Module
    images: torch.Tensor  # (400, 1, 16, 16), standardised
    labels: torch.Tensor  # (400,) the digit
    quadrants: torch.Tensor  # (400,) index into CORNERS
    accuracy: float  # held-out accuracy
    seconds: float  # training time


def paste(digits: torch.Tensor, quadrants: torch.Tensor, generator: torch.Generator
          ) -> torch.Tensor:
    """Digits ``(n, 8, 8)`` in [0, 1] added to ``(n, 1, 16, 16)`` noise at their quadrants."""
    canvas = 0.1 * torch.randn(len(digits), 1, SIZE, SIZE, generator=generator)
    for q, (y, x) in enumerate(CORNERS):
        chosen = quadrants == q
        canvas[chosen, 0, y : y + 8, x : x + 8] += digits[chosen]
    return (canvas - 0.15) / 0.35  # about zero mean, unit variance


def train_digit_vit(seed: int = 0) -> DigitViT:
    from timm.models.vision_transformer import VisionTransformer

    bunch = sklearn_datasets.load_digits()
    digits = torch.tensor(bunch.images, dtype=torch.float32) / 16.0
    targets = torch.tensor(bunch.target, dtype=torch.long)
    threads = torch.get_num_threads()
    start = time.perf_counter()
    # One thread: the same reduction order on every machine, and on a shared machine 5 to 20
    # times faster than two contended threads for a model this small.
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng():  # leave the global random state as it was
            torch.manual_seed(seed)
            generator = torch.Generator().manual_seed(seed)
            order = torch.randperm(len(targets), generator=generator)
            held_out, train = order[:N_HELD_OUT], order[N_HELD_OUT:]
            quadrants = torch.randint(0, 4, (N_HELD_OUT,), generator=generator)
            images = paste(digits[held_out], quadrants, generator)
            labels = targets[held_out]

            model = VisionTransformer(img_size=SIZE, patch_size=4, in_chans=1, num_classes=10,
                                      embed_dim=64, depth=4, num_heads=4, mlp_ratio=2.0)
            optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.05)
            steps_per_epoch = -(-len(train) // BATCH)
            schedule = torch.optim.lr_scheduler.OneCycleLR(
                optimizer, max_lr=3e-3, total_steps=EPOCHS * steps_per_epoch, pct_start=0.15)
            model.train()
            for _ in range(EPOCHS):
                shuffled = train[torch.randperm(len(train), generator=generator)]
                places = torch.randint(0, 4, (len(train),), generator=generator)
                x, y = paste(digits[shuffled], places, generator), targets[shuffled]
                for i in range(0, len(train), BATCH):
                    loss = nn.functional.cross_entropy(model(x[i : i + BATCH]), y[i : i + BATCH])
                    optimizer.zero_grad()
                    loss.backward()
                    optimizer.step()
                    schedule.step()
            model.eval()
            with torch.no_grad():
                accuracy = float((model(images).argmax(1) == labels).float().mean())
    finally:
        torch.set_num_threads(threads)
    return DigitViT(model, images, labels, quadrants, accuracy, time.perf_counter() - start)


@pytest.fixture(scope="module")
def digit_vit() -> DigitViT:
    return train_digit_vit()


@pytest.fixture(autouse=True)
def _one_thread():
    """The explanations in this file also run on one thread (see ``train_digit_vit``)."""
    with one_intraop_thread():
        yield


def quadrant_masks(quadrants: torch.Tensor) -> torch.Tensor:
    inside = torch.zeros(len(quadrants), SIZE, SIZE, dtype=torch.bool)
    for i, q in enumerate(quadrants.tolist()):
        y, x = CORNERS[q]
        inside[i, y : y + 8, x : x + 8] = True
    return inside


def fused_flags(model: nn.Module) -> list[bool]:
    return [bool(block.attn.fused_attn) for block in model.blocks]


def test_tiny_vit_learned_the_digits(digit_vit):
    # measured: 96.25 % held-out accuracy (385 / 400) after 14 to 19 s of training
    assert digit_vit.accuracy >= 0.90, f"held-out accuracy {digit_vit.accuracy:.3f}"
    assert not digit_vit.model.training
    assert all(fused_flags(digit_vit.model)), (
        "timm's fused attention is off (TIMM_FUSED_ATTN=0?); these tests are meant to run with it")


# method: (lowest mean share of the map in the digit's quadrant, lowest share of images whose
# arg-max lies there); chance is 0.25 for both. Measured values in the module docstring.
EVIDENCE = {
    "attention_rollout": (0.60, 0.90),
    "gradient_rollout": (0.65, 0.90),
    "chefer": (0.65, 0.90),
    "gradcam": (0.40, 0.60),
}


def written_out_maps(model: nn.Module, images: torch.Tensor, labels: torch.Tensor
                     ) -> dict[str, torch.Tensor]:
    """The four maps of the module docstring, computed here without heatlens: ``(B, 16, 16)``
    each, from an eager deep copy of the model (class token 0, then the 4 x 4 patch grid)."""
    eager = copy.deepcopy(model)
    attentions: list[torch.Tensor] = []
    tokens: list[torch.Tensor] = []

    def keep(into: list[torch.Tensor]):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            output.retain_grad()
            into.append(output)

        return hook

    for block in eager.blocks:
        block.attn.fused_attn = False  # timm's eager path: softmax, then attn_drop
        block.attn.attn_drop.register_forward_hook(keep(attentions))
    eager.blocks[-1].norm1.register_forward_hook(keep(tokens))
    logits = eager(images)
    logits[torch.arange(len(labels)), labels].sum().backward()
    batch, n = images.shape[0], attentions[0].shape[-1]
    eye = torch.eye(n, dtype=torch.float64)

    def rolled_out(fused: list[torch.Tensor]) -> torch.Tensor:
        result = eye.expand(batch, n, n)
        for f in fused:
            step = (f + eye) / 2
            result = (step / step.sum(dim=-1, keepdim=True)) @ result
        return result

    a = [t.detach().double() for t in attentions]
    g = [t.grad.double() for t in attentions]
    chefer = eye.expand(batch, n, n)
    for attention, grad in zip(a, g, strict=True):
        chefer = chefer + (grad * attention).clamp(min=0).mean(dim=1) @ chefer
    relevance = {
        "attention_rollout": rolled_out([t.mean(dim=1) for t in a]),
        "gradient_rollout": rolled_out([(t * d).mean(dim=1).clamp(min=0)
                                        for t, d in zip(a, g, strict=True)]),
        "chefer": chefer,
    }
    patch_rows = {name: r[:, 0, 1:].reshape(batch, 4, 4) for name, r in relevance.items()}
    grid = tokens[0].detach().double()[:, 1:].reshape(batch, 4, 4, -1).permute(0, 3, 1, 2)
    grid_grad = tokens[0].grad.double()[:, 1:].reshape(batch, 4, 4, -1).permute(0, 3, 1, 2)
    weights = grid_grad.mean(dim=(2, 3), keepdim=True)
    patch_rows["gradcam"] = (weights * grid).sum(dim=1).clamp(min=0)

    maps = {}
    for name, rows in patch_rows.items():
        up = F.interpolate(rows[:, None], size=(SIZE, SIZE), mode="bilinear",
                           align_corners=False)[:, 0]
        low = up.flatten(1).min(1).values[:, None, None]
        high = up.flatten(1).max(1).values[:, None, None]
        span = high - low
        scaled = (up - low) / span.clamp_min(1e-300)
        maps[name] = torch.where(span > 0, scaled, torch.zeros_like(scaled)).float()
    return maps


def evidence_scores(maps: torch.Tensor, quadrants: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Each map's share of its mass in the digit's quadrant, and the share of maps whose
    arg-max lies there."""
    inside = quadrant_masks(quadrants)
    mass = (maps * inside).flatten(1).sum(1) / maps.flatten(1).sum(1).clamp_min(1e-12)
    peaks = maps.flatten(1).argmax(1)
    return mass, float(inside.flatten(1).gather(1, peaks[:, None]).float().mean())


@pytest.fixture(scope="module")
def reference_maps(digit_vit) -> dict[str, torch.Tensor]:
    return written_out_maps(digit_vit.model, digit_vit.images[:N_EVIDENCE],
                            digit_vit.labels[:N_EVIDENCE])


@pytest.mark.parametrize("method", list(EVIDENCE))
def test_map_points_at_the_digit(digit_vit, reference_maps, method):
    """heatlens' map equals the one written out in this file (see the module docstring), and
    puts its mass and its peak in the digit's quadrant far above chance."""
    model = digit_vit.model
    images, labels = digit_vit.images[:N_EVIDENCE], digit_vit.labels[:N_EVIDENCE]
    fused_before = fused_flags(model)
    maps = heatlens.explain(model, images, method=method, target=labels).maps
    assert fused_flags(model) == fused_before
    assert maps.shape == (N_EVIDENCE, SIZE, SIZE)
    assert maps.dtype == torch.float32
    assert bool(torch.isfinite(maps).all())
    assert float(maps.min()) >= 0.0 and float(maps.max()) <= 1.0

    reference = reference_maps[method]
    torch.testing.assert_close(maps, reference, atol=1e-4, rtol=0)
    quadrants = digit_vit.quadrants[:N_EVIDENCE]
    mass, hits = evidence_scores(maps, quadrants)
    ref_mass, ref_hits = evidence_scores(reference, quadrants)
    assert abs(float(mass.mean()) - float(ref_mass.mean())) < 1e-3
    min_mass, min_hits = EVIDENCE[method]
    assert float(mass.mean()) > min_mass, (
        f"{method}: mean share of the map in the digit's quadrant {mass.mean():.3f} "
        f"(needs > {min_mass}; chance 0.25, written-out reference {ref_mass.mean():.3f})")
    assert hits >= min_hits, (
        f"{method}: the map's peak is in the digit's quadrant for {hits:.1%} of images "
        f"(needs >= {min_hits:.0%}; chance 25 %, written-out reference {ref_hits:.0%})")


def test_gradcam_auto_layer_is_the_last_blocks_first_norm(digit_vit):
    explanation = heatlens.explain(digit_vit.model, digit_vit.images[:2], method="gradcam",
                                   target=digit_vit.labels[:2])
    assert explanation.layers == (f"blocks.{len(digit_vit.model.blocks) - 1}.norm1",)


@pytest.mark.parametrize("method", list(EVIDENCE))
def test_maps_do_not_depend_on_the_rest_of_the_batch(digit_vit, method):
    model = digit_vit.model
    quadrants, labels = digit_vit.quadrants, digit_vit.labels
    # two images whose digits differ and sit in different quadrants
    second = next(i for i in range(1, N_HELD_OUT)
                  if quadrants[i] != quadrants[0] and labels[i] != labels[0])
    pick = torch.tensor([0, second])
    images, targets = digit_vit.images[pick], labels[pick]
    fused_before = fused_flags(model)

    together = heatlens.explain(model, images, method=method, target=targets).maps
    alone = torch.cat([
        heatlens.explain(model, images[i : i + 1], method=method, target=targets[i : i + 1]).maps
        for i in range(2)
    ])
    assert together.shape == alone.shape == (2, SIZE, SIZE)
    torch.testing.assert_close(together, alone, atol=1e-4, rtol=0)
    assert fused_flags(model) == fused_before  # blocks[0].attn.fused_attn included
