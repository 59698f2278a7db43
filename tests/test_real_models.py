"""Real trained models on real photos: the prediction is right and the map points at the evidence.

Two known answers: (1) a photo made of a cat on the left and an espresso on the right, where each
class's map must lie on its own half; (2) a small CNN trained here on images whose class evidence
(a striped patch) sits at a known, random place, where the map's peak must fall on the patch.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data
from torch import nn

import heatlens

CAT_CLASSES = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat
ESPRESSO = 967
FIXTURES = {"mobilenet_v2": "mobilenet_v2_imagenet", "lite0": "lite0"}


@pytest.fixture(scope="module")
def cat_and_coffee(imagenet_transform) -> torch.Tensor:
    """224 x 448: chelsea's cat on the left half, coffee on the right half, normalised with the
    ImageNet mean and std (no crop)."""
    cat = Image.fromarray(data.chelsea()).resize((224, 224))
    coffee = Image.fromarray(data.coffee()).resize((224, 224))
    canvas = Image.new("RGB", (448, 224))
    canvas.paste(cat, (0, 0))
    canvas.paste(coffee, (224, 0))
    pixels = torch.from_numpy(np.array(canvas)).permute(2, 0, 1).float() / 255
    mean = torch.tensor(imagenet_transform.mean).reshape(3, 1, 1)
    std = torch.tensor(imagenet_transform.std).reshape(3, 1, 1)
    return ((pixels - mean) / std)[None]


@pytest.mark.parametrize("model_name", ["mobilenet_v2", "lite0"])
def test_real_model_predicts_the_cat_and_picks_its_layer(model_name, request, chelsea_batch):
    model = request.getfixturevalue(FIXTURES[model_name])
    explanation = heatlens.explain(model, chelsea_batch)
    assert int(explanation.targets[0]) in CAT_CLASSES
    expected_layer, block = {"mobilenet_v2": ("features.18", "features.18"),
                             "lite0": ("_swish", "_conv_head")}[model_name]  # ReLU6 after the head
    assert explanation.layers == (expected_layer,)
    assert f"'{block}'" in explanation.layer_reason


@pytest.mark.parametrize("model_name", ["mobilenet_v2", "lite0"])
@pytest.mark.parametrize("method", ["gradcam", "gradcam++", "layercam", "xgradcam", "cam"])
def test_each_class_map_lies_on_its_own_object(model_name, method, request, cat_and_coffee):
    model = request.getfixturevalue(FIXTURES[model_name])
    logits = model(cat_and_coffee).detach()[0]
    cat = max(CAT_CLASSES, key=lambda c: float(logits[c]))
    maps = heatlens.explain(model, cat_and_coffee.expand(2, -1, -1, -1), method=method,
                            target=[cat, ESPRESSO]).maps
    left, right = maps[:, :, :224].mean(dim=(1, 2)), maps[:, :, 224:].mean(dim=(1, 2))
    # Grad-CAM is sharply class-discriminative here (ratios 9 to 35); Grad-CAM++ and LayerCAM
    # spread over both objects more (ratios 1.7 to 4.5), as their multi-object focus implies.
    assert left[0] > 1.5 * right[0], f"cat map: left {left[0]:.3f} vs right {right[0]:.3f}"
    assert right[1] > 1.5 * left[1], f"espresso map: right {right[1]:.3f} vs left {left[1]:.3f}"


# A small CNN trained in the test session on evidence at a known place ---------------------------


def striped_patches(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor,
                                                                   torch.Tensor]:
    """Noise images 1x32x32, each with one 8x8 patch of stripes at a random place: horizontal
    stripes are class 0, vertical stripes class 1. Returns images, labels, patch corners."""
    images = 0.3 * torch.randn(n, 1, 32, 32, generator=generator)
    labels = torch.randint(0, 2, (n,), generator=generator)
    corners = torch.randint(0, 32 - 8, (n, 2), generator=generator)
    stripes = torch.tensor([1.0, -1.0] * 4).repeat(8, 1)  # varies along columns: vertical
    for i in range(n):
        patch = stripes if labels[i] == 1 else stripes.T
        y, x = corners[i].tolist()
        images[i, 0, y : y + 8, x : x + 8] += 1.5 * patch
    return images, labels, corners


class PatchNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
        )
        self.fc = nn.Linear(32, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).mean(dim=(2, 3)))


@pytest.fixture(scope="module")
def patch_net() -> PatchNet:
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = PatchNet()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(150):
        images, labels, _ = striped_patches(64, generator)
        loss = nn.functional.cross_entropy(model(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


@pytest.mark.parametrize("method", ["gradcam", "gradcam++", "layercam", "hirescam", "cam",
                                    "xgradcam", "gradcam_elementwise", "eigengradcam"])
def test_map_peak_falls_on_the_known_evidence(patch_net, method):
    images, labels, corners = striped_patches(64, torch.Generator().manual_seed(123))
    accuracy = float((patch_net(images).argmax(1) == labels).float().mean())
    assert accuracy > 0.95, f"the model did not learn the task (accuracy {accuracy:.2f})"
    maps = heatlens.explain(patch_net, images, method=method, target=labels).maps
    peaks = maps.flatten(1).argmax(1)
    py, px = peaks // 32, peaks % 32
    y0, x0 = corners[:, 0], corners[:, 1]
    margin = 2  # the feature map has stride 2
    rows_ok = (py >= y0 - margin) & (py < y0 + 8 + margin)
    hit = rows_ok & (px >= x0 - margin) & (px < x0 + 8 + margin)
    # by chance a peak falls in the (12 x 12) window about 14% of the time
    assert float(hit.float().mean()) >= 0.9, f"{method}: pointing game {hit.float().mean():.2f}"
    inside = torch.zeros_like(maps, dtype=torch.bool)
    for i, (y, x) in enumerate(corners.tolist()):
        inside[i, y : y + 8, x : x + 8] = True
    energy = (maps * inside).flatten(1).sum(1) / maps.flatten(1).sum(1).clamp_min(1e-12)
    assert float(energy.mean()) > 0.3, f"{method}: share of the map on the patch {energy.mean()}"


def test_numpy_free_hot_path_keeps_device_and_dtype(mobilenet_v2_imagenet, chelsea_batch):
    e = heatlens.explain(mobilenet_v2_imagenet, chelsea_batch, method="gradcam++")
    assert e.maps.dtype == torch.float32 and e.maps.device == chelsea_batch.device
    assert float(e.maps.min()) == 0.0 and float(e.maps.max()) == 1.0
    assert np.isfinite(e.maps.numpy()).all()
