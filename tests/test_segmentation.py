"""Semantic segmentation: ClassRegion targets on torchvision FCN / DeepLabV3 / LR-ASPP with every
CAM method, a segmenter trained here whose maps must lie on the shapes of the class explained,
the errors that bad input gets, and ``heatlens explain --task segmentation``."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from PIL import Image
from test_engine import assert_same_state, snapshot
from torch import nn
from torchvision.models import segmentation as tv_segmentation

import heatlens
from heatlens.cli import main
from heatlens.loading.presets import IMAGENET
from heatlens.methods.base import CAMExplainer
from heatlens.methods.registry import method_class
from heatlens.tasks.segmentation import ClassRegion

CAM_METHODS = [n for n in heatlens.list_methods() if issubclass(method_class(n), CAMExplainer)]
"""Every registered CAM method (CAM itself needs a linear head and must say so)."""

# name: input side, the layer "auto" must pick, and a small layer for the methods that run the
# model once per channel of the layer (the automatic layers have 960 and 2048 channels)
TORCHVISION = {
    "deeplabv3_mobilenet_v3_large": (64, "backbone.16", "backbone.1"),
    "lraspp_mobilenet_v3_large": (64, "backbone.16", "backbone.1"),
    "fcn_resnet50": (48, "backbone.layer4", "backbone.conv1"),
}
PER_CHANNEL = ("scorecam", "sscam", "iscam", "ablationcam")


def torchvision_segmenter(name: str) -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = getattr(tv_segmentation, name)(weights=None, weights_backbone=None, num_classes=3)
    return model.eval()


@pytest.fixture(scope="session")
def segmenters() -> dict[str, nn.Module]:
    return {name: torchvision_segmenter(name) for name in TORCHVISION}


def centre_mask(side: int) -> torch.Tensor:
    mask = torch.zeros(side, side, dtype=torch.bool)
    mask[side // 4 : 3 * side // 4, side // 3 : 2 * side // 3] = True
    return mask


def method_options(method: str, model_name: str) -> dict:
    options: dict = {"show_progress": False} if method in PER_CHANNEL else {}
    if method in ("sscam", "iscam", "smooth_gradcam++"):
        options["samples"] = 2
    if method in PER_CHANNEL:
        options["layer"] = TORCHVISION[model_name][2]
    return options


@pytest.mark.parametrize("method", CAM_METHODS)
@pytest.mark.parametrize("model_name", list(TORCHVISION))
def test_every_cam_method_on_torchvision_segmenters(segmenters, model_name, method):
    model = segmenters[model_name]
    side, auto, _ = TORCHVISION[model_name]
    x = torch.randn(1, 3, side, side, generator=torch.Generator().manual_seed(3))
    mask = centre_mask(side)
    before = snapshot(model)
    options = method_options(method, model_name)
    if method == "cam":
        with pytest.raises(ValueError, match="nn.Linear"):
            heatlens.explain(model, x, method=method, target=ClassRegion(1, mask))
        return
    result = heatlens.explain(model, x, method=method, target=ClassRegion(1, mask), **options)
    assert_same_state(before, snapshot(model))
    if "layer" not in options:
        assert result.layers == (auto,)
        assert result.layer_reason.startswith("auto: ") and "backbone" in result.layer_reason
    assert result.maps.shape == (1, side, side)
    assert bool(torch.isfinite(result.maps).all())
    assert float(result.maps.min()) >= 0 and float(result.maps.max()) <= 1
    with torch.no_grad():
        logits = model(x)["out"]
    assert result.targets.tolist() == [1]
    assert result.probabilities is None
    torch.testing.assert_close(result.scores, logits[:, 1][:, mask].sum(dim=1), rtol=1e-4,
                               atol=1e-4)


@pytest.mark.parametrize("method", ["fullgrad", "saliency"])
def test_other_method_families_take_the_region_target(segmenters, method):
    model = segmenters["lraspp_mobilenet_v3_large"]
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    result = heatlens.explain(model, x, method=method, target=ClassRegion(2, centre_mask(64)))
    assert result.maps.shape == (1, 64, 64)
    assert bool(torch.isfinite(result.maps).all())


# ------------------------------------------------------------------------------------------------
# The score, exactly
# ------------------------------------------------------------------------------------------------


class DenseToy(nn.Module):
    """Per-pixel scores (B, 3, 8, 8) from a 1x1 convolution; ``kind`` picks the output type."""

    def __init__(self, kind: str = "tensor") -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.head = nn.Conv2d(4, 3, 1)
        self.kind = kind
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.linspace(-1, 1, p.numel()).reshape(p.shape))

    def forward(self, x: torch.Tensor):
        y = self.head(torch.relu(self.conv(x)))
        if self.kind == "dict":
            return {"aux": y * 0, "out": y}
        if self.kind == "tuple":
            return y, y.mean()
        return y


def test_score_is_the_sum_or_mean_of_the_class_scores_over_the_region():
    model = DenseToy()
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    y = model(x).detach()
    weights = torch.rand(2, 8, 8, generator=torch.Generator().manual_seed(1))
    classes = torch.tensor([0, 2])
    region = ClassRegion([0, 2], weights)
    assert region.classes(y, 2).tolist() == [0, 2]
    total = torch.stack([(y[0, 0] * weights[0]).sum(), (y[1, 2] * weights[1]).sum()])
    torch.testing.assert_close(region.score(y, classes), total)
    mean = ClassRegion([0, 2], weights, reduction="mean").score(y, classes)
    torch.testing.assert_close(mean, total / weights.flatten(1).sum(1))
    predicted = ClassRegion(1).score(y, torch.tensor([1, 1]))
    where = y.argmax(1) == 1
    torch.testing.assert_close(predicted, (y[:, 1] * where).flatten(1).sum(1))


@pytest.mark.parametrize("kind", ["dict", "tuple"])
def test_dict_and_tuple_outputs_explain_like_the_tensor(kind):
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    mask = torch.ones(8, 8, dtype=torch.bool)
    plain = heatlens.explain(DenseToy().eval(), x, target=ClassRegion(1, mask), layer="conv")
    other = heatlens.explain(DenseToy(kind).eval(), x, target=ClassRegion(1, mask), layer="conv")
    torch.testing.assert_close(other.maps, plain.maps)
    torch.testing.assert_close(other.scores, plain.scores)


# ------------------------------------------------------------------------------------------------
# A segmenter trained here: the map for class c must lie on the shapes of class c
# ------------------------------------------------------------------------------------------------

SIDE = 32


def shapes_data(count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise images, each with one square (class 1) and one disc (class 2) of the same
    brightness, 7 to 11 pixels across, apart from each other; and the label maps."""
    generator = torch.Generator().manual_seed(seed)
    images = 0.3 * torch.randn(count, 3, SIDE, SIDE, generator=generator)
    labels = torch.zeros(count, SIDE, SIDE, dtype=torch.long)
    rows, cols = torch.meshgrid(torch.arange(SIDE), torch.arange(SIDE), indexing="ij")
    for index in range(count):
        while True:
            radius = torch.randint(3, 6, (2,), generator=generator)
            centres = torch.randint(6, SIDE - 6, (2, 2), generator=generator)
            if (centres[0] - centres[1]).abs().max() > radius.sum() + 3:
                break
        (r1, c1), (r2, c2) = centres.tolist()
        square = ((rows - r1).abs() <= radius[0]) & ((cols - c1).abs() <= radius[0])
        disc = (rows - r2) ** 2 + (cols - c2) ** 2 <= (radius[1] + 1) ** 2
        labels[index][square], labels[index][disc] = 1, 2
        images[index][:, square | disc] += 1.0
    return images, labels


class ShapeSegmenter(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1, stride=2), nn.ReLU(),
            nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
            nn.Conv2d(32, 32, 3, padding=2, dilation=2), nn.ReLU(),
        )
        self.head = nn.Conv2d(32, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scores = self.head(self.features(x))
        return F.interpolate(scores, size=x.shape[2:], mode="bilinear", align_corners=False)


@pytest.fixture(scope="session")
def trained_segmenter() -> nn.Module:
    """A few seconds of training on 512 shape images (seeded); pixel IoU about 0.93 (squares)
    and 0.88 (discs) on held-out images."""
    images, labels = shapes_data(512, seed=0)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = ShapeSegmenter()
        optimizer = torch.optim.Adam(model.parameters(), lr=5e-3)
        weight = torch.tensor([0.2, 1.0, 1.0])  # background is most of every image
        for _ in range(150):
            pick = torch.randint(0, len(images), (32,))
            loss = F.cross_entropy(model(images[pick]), labels[pick], weight=weight)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval()


@pytest.fixture(scope="session")
def held_out() -> tuple[torch.Tensor, torch.Tensor]:
    return shapes_data(32, seed=1)


def test_trained_segmenter_segments(trained_segmenter, held_out):
    images, labels = held_out
    with torch.no_grad():
        predicted = trained_segmenter(images).argmax(dim=1)
    for cls in (1, 2):
        ours, truth = predicted == cls, labels == cls
        iou = (ours & truth).sum() / (ours | truth).sum()
        assert float(iou) > 0.75, (cls, float(iou))


def on_shape_ratios(maps: torch.Tensor, labels: torch.Tensor, cls: int
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image: mean map on the class's shape / mean map on all other pixels, and / mean map
    on the other class's shape."""
    def mean_on(where: torch.Tensor) -> torch.Tensor:
        return (maps * where).flatten(1).sum(1) / where.flatten(1).sum(1)

    on = mean_on(labels == cls)
    return on / mean_on(labels != cls), on / mean_on(labels == 3 - cls)


# Measured (torch 2.14, CPU): Grad-CAM mean on-shape / off-shape ratio 15.7 (squares) and 16.2
# (discs), smallest per image 8.3 and 10.0; on the class's shape / on the other class's shape
# 1.7 and 2.3, smallest per image 1.2 and 1.6. Asserted with a margin below those.
@pytest.mark.parametrize("cls", [1, 2])
def test_gradcam_of_a_class_lies_on_its_shapes(trained_segmenter, held_out, cls):
    images, labels = held_out
    result = heatlens.explain(trained_segmenter, images, target=ClassRegion(cls),
                              layer="features")
    off, rival = on_shape_ratios(result.maps, labels, cls)
    assert float(off.mean()) > 8 and float(off.min()) > 3, off
    assert float(rival.mean()) > 1.3 and float((rival > 1).float().mean()) > 0.9, rival


# Measured mean on-shape / off-shape ratios: Grad-CAM++ 2.3 / 3.1, XGrad-CAM 5.0 / 5.7,
# LayerCAM 57 / 46, HiResCAM 99 / 87, Score-CAM 3.5 / 3.3, Ablation-CAM 8.8 / 6.4.
@pytest.mark.parametrize("method", ["gradcam++", "xgradcam", "layercam", "hirescam", "scorecam",
                                    "ablationcam"])
def test_other_cam_methods_lie_on_the_shapes_too(trained_segmenter, held_out, method):
    images, labels = held_out
    options = {"show_progress": False} if method in ("scorecam", "ablationcam") else {}
    for cls in (1, 2):
        result = heatlens.explain(trained_segmenter, images, method=method,
                                  target=ClassRegion(cls), layer="features", **options)
        off, _ = on_shape_ratios(result.maps, labels, cls)
        assert float(off.mean()) > 1.8, (cls, off)


def test_a_fixed_region_equal_to_the_prediction_gives_the_same_map(trained_segmenter,
                                                                    held_out):
    images, _ = held_out
    with torch.no_grad():
        predicted = trained_segmenter(images[:4]).argmax(dim=1)
    implicit = heatlens.explain(trained_segmenter, images[:4], target=ClassRegion(1),
                                layer="features")
    fixed = heatlens.explain(trained_segmenter, images[:4],
                             target=ClassRegion(1, predicted == 1), layer="features")
    torch.testing.assert_close(fixed.maps, implicit.maps)


# ------------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------------


class Classifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4, 5)

    def forward(self, x):
        return self.fc(self.conv(x).mean(dim=(2, 3)))


class Detector(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        return [{"boxes": torch.zeros(1, 4), "scores": self.conv(x).mean().reshape(1)}]


@pytest.mark.parametrize(
    ("model", "inputs", "target", "message"),
    [
        (DenseToy(), (2, 3, 8, 8), ClassRegion(1, torch.ones(4, 4)),
         r"mask has shape \(4, 4\).*\(2, 3, 8, 8\).*spatial shape \(8, 8\).*interpolate"),
        (DenseToy(), (2, 3, 8, 8), ClassRegion(1, torch.ones(3, 8, 8)),
         "got 3 masks for a batch of 2 images"),
        (DenseToy(), (2, 3, 8, 8), ClassRegion(3, torch.ones(8, 8)),
         "target class 3 is out of range: the model has 3 classes"),
        (DenseToy(), (2, 3, 8, 8), ClassRegion([0, 1, 2], torch.ones(8, 8)),
         "got 3 targets for a batch of 2 images"),
        (DenseToy(), (2, 3, 8, 8), ClassRegion(1, torch.zeros(8, 8)),
         "region of class 1 is empty: the mask is empty for image 0"),
        (Classifier(), (2, 3, 8, 8), ClassRegion(1),
         r"per-position class scores \(B, K, H, W\); this model returns shape \(2, 5\).*class "
         "index target"),
        (Detector(), (1, 3, 8, 8), ClassRegion(1),
         "this model returns a list of dict. For a detector use heatlens.BoxScore"),
    ],
)
def test_bad_input_names_the_problem_and_leaves_the_model_alone(model, inputs, target, message):
    model.eval()
    before = snapshot(model)
    with pytest.raises(ValueError, match=message):
        heatlens.explain(model, torch.randn(*inputs), target=target, layer="conv")
    assert_same_state(before, snapshot(model))


def test_bad_masks_are_refused_when_the_target_is_made():
    with pytest.raises(TypeError, match="class to explain"):
        ClassRegion(None)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="bool or float"):
        ClassRegion(1, torch.ones(8, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="non-negative"):
        ClassRegion(1, -torch.ones(8, 8))
    with pytest.raises(ValueError, match="'sum' or 'mean'"):
        ClassRegion(1, reduction="max")  # type: ignore[arg-type]


def test_per_image_masks_and_perturbation_methods(trained_segmenter, held_out):
    images, labels = held_out
    masks = labels[:2] == 1
    with pytest.raises(ValueError, match="one image at a time"):
        heatlens.explain(trained_segmenter, images[:2], method="scorecam",
                         target=ClassRegion(1, masks), layer="features", show_progress=False)
    one = heatlens.explain(trained_segmenter, images[:1], method="scorecam",
                           target=ClassRegion(1, masks[:1]), layer="features",
                           show_progress=False)
    assert one.maps.shape == (1, SIDE, SIDE)


# ------------------------------------------------------------------------------------------------
# heatlens explain --task segmentation
# ------------------------------------------------------------------------------------------------


@pytest.fixture
def run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    return lambda *args: runner.invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def lraspp_files(tmp_path_factory) -> tuple[Path, Path, int]:
    """A state dict of a seeded 3-class LR-ASPP, a photo, and a class it predicts there."""
    folder = tmp_path_factory.mktemp("segmentation")
    model = torchvision_segmenter("lraspp_mobilenet_v3_large")
    weights = folder / "lraspp.pt"
    torch.save(model.state_dict(), weights)
    from skimage import data

    photo = folder / "astronaut.png"
    Image.fromarray(data.astronaut()).resize((160, 160)).save(photo)
    inputs, _ = IMAGENET(Image.open(photo).convert("RGB"))
    with torch.no_grad():
        predicted = model(inputs)["out"].argmax(1)
    return weights, photo, int(predicted[0, 112, 112])  # a class it predicts at the centre


def test_cli_task_segmentation_with_a_class(run, lraspp_files):
    weights, photo, cls = lraspp_files
    result = run("explain", photo, "--task", "segmentation", "--arch",
                 "lraspp_mobilenet_v3_large", "--weights", weights, "--num-classes", 3,
                 "--class-idx", cls, "--method", "gradcam,eigencam", "--out", "seg.png")
    assert result.exit_code == 0, result.output
    assert "model: lraspp_mobilenet_v3_large (lraspp.pt)" in result.output
    lines = [line for line in result.output.splitlines() if "(layer " in line]
    assert lines == [
        f"astronaut.png: gradcam | class {cls} | score {lines[0].split('score ')[1]}",
        f"astronaut.png: eigencam | class {cls} | score {lines[1].split('score ')[1]}",
    ]
    assert all(line.endswith("(layer backbone.16)") for line in lines)
    with Image.open(Path("seg.png")) as figure:
        assert figure.width > figure.height > 150


def test_cli_task_segmentation_errors(run, lraspp_files):
    weights, photo, _ = lraspp_files
    out_of_range = run("explain", photo, "--task", "segmentation", "--arch",
                       "lraspp_mobilenet_v3_large", "--weights", weights, "--num-classes", 3,
                       "--class-idx", 7)
    assert out_of_range.exit_code == 1
    assert "Error: target class 7 is out of range: the model has 3 classes" in out_of_range.output
    classifier = run("explain", photo, "--task", "segmentation", "--arch", "resnet18")
    assert classifier.exit_code == 1
    assert "--task segmentation needs a segmentation model" in classifier.output
    top_k = run("explain", photo, "--task", "segmentation", "--top-k", 2)
    assert top_k.exit_code == 2 and "do not apply to --task segmentation" in top_k.output


def test_masks_may_be_numpy(trained_segmenter, held_out):
    images, labels = held_out
    mask = labels[0] == 1
    from_numpy = heatlens.explain(trained_segmenter, images[:1],
                                  target=ClassRegion(1, mask.numpy()), layer="features")
    from_torch = heatlens.explain(trained_segmenter, images[:1], target=ClassRegion(1, mask),
                                  layer="features")
    torch.testing.assert_close(from_numpy.maps, from_torch.maps)
