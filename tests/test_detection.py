"""Object detection: BoxScore targets on a detector whose boxes we control, on torchvision's
Faster R-CNN, RetinaNet and FCOS, and on the MTCNN face detector with a real photo; boxes drawn;
``heatlens explain --task detection``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from test_engine import assert_same_state, snapshot
from torch import nn
from torchvision.models import detection as tv_detection

import heatlens
from heatlens.cli import main
from heatlens.cli.tasks import task_panels
from heatlens.engine.targets import NO_CLASS
from heatlens.loading.models import LoadedModel
from heatlens.loading.presets import IMAGENET
from heatlens.pictures.boxes import BOX_COLOURS, draw_boxes, overlay_with_boxes
from heatlens.tasks.detection import BoxScore

# ------------------------------------------------------------------------------------------------
# A detector whose boxes are fixed and whose scores read only the features inside each box
# ------------------------------------------------------------------------------------------------

BOXES = torch.tensor([[4.0, 4.0, 20.0, 20.0], [36.0, 28.0, 60.0, 56.0]])
LABELS = torch.tensor([1, 2])


class BoxToy(nn.Module):
    """Two fixed boxes (labels 1 and 2); box ``i`` scores ``sigmoid(mean of a 1x1 convolution
    of the features inside it)``, so only the features inside a box move its score."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
        self.score = nn.Conv2d(8, 1, 1)
        with torch.random.fork_rng():
            torch.manual_seed(0)
            for p in self.parameters():
                nn.init.normal_(p, std=0.5)

    def forward(self, x: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        evidence = self.score(self.features(x))[:, 0]
        corners = BOXES.int().tolist()
        return [
            {"boxes": BOXES.clone(), "labels": LABELS.clone(),
             "scores": torch.stack([torch.sigmoid(e[y1:y2, x1:x2].mean())
                                    for x1, y1, x2, y2 in corners])}
            for e in evidence
        ]


@pytest.fixture(scope="module")
def toy() -> BoxToy:
    return BoxToy().eval()


@pytest.fixture(scope="module")
def pictures() -> torch.Tensor:
    return torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))


def inside(box: torch.Tensor, side: int = 64) -> torch.Tensor:
    x1, y1, x2, y2 = box.int().tolist()
    where = torch.zeros(side, side, dtype=torch.bool)
    where[y1:y2, x1:x2] = True
    return where


@pytest.mark.parametrize("which", [0, 1])
def test_the_map_of_a_box_lies_in_that_box(toy, pictures, which):
    result = heatlens.explain(toy, pictures, method="hirescam", layer="features",
                              target=BoxScore(BOXES[which], LABELS[which].item()))
    energy = result.maps.flatten(1).sum(1)
    assert torch.all(result.maps[:, inside(BOXES[which])].sum(1) / energy > 0.99)
    with torch.no_grad():
        expected = torch.stack([found["scores"][which] for found in toy(pictures)])
    torch.testing.assert_close(result.scores, expected)
    assert result.targets.tolist() == [LABELS[which].item()] * 2
    assert result.probabilities is None and result.output is None


def test_matching_by_iou_and_label(toy, pictures):
    shifted = BOXES[0] + torch.tensor([2.0, 2.0, 2.0, 2.0])  # IoU 0.62 with box 0
    with torch.no_grad():
        output = toy(pictures)
    classes = torch.tensor([1, 1])
    target = BoxScore(shifted, 1, iou_threshold=0.6)
    assert target.classes(output, 2).tolist() == [1, 1]
    scores = torch.stack([found["scores"][0] for found in output])
    torch.testing.assert_close(target.score(output, classes), scores)
    with_iou = BoxScore(shifted, 1, iou_threshold=0.6, with_iou=True).score(output, classes)
    torch.testing.assert_close(with_iou, scores + 196 / 316, rtol=1e-5, atol=1e-5)
    any_label = BoxScore(shifted, None, iou_threshold=0.6)
    torch.testing.assert_close(any_label.score(output, classes), scores)
    both = BoxScore(BOXES, LABELS)
    assert both.classes(output, 2).tolist() == [NO_CLASS, NO_CLASS]
    total = torch.stack([found["scores"].sum() for found in output])
    torch.testing.assert_close(both.score(output, classes), total)


def test_per_image_boxes(toy, pictures):
    target = BoxScore([BOXES[:1], BOXES[1:]], [LABELS[:1], LABELS[1:]])
    result = heatlens.explain(toy, pictures, method="gradcam", layer="features", target=target)
    assert result.targets.tolist() == [1, 2]
    with torch.no_grad():
        output = toy(pictures)
    torch.testing.assert_close(result.scores, torch.stack([output[0]["scores"][0],
                                                           output[1]["scores"][1]]))
    with pytest.raises(ValueError, match="one image at a time"):
        heatlens.explain(toy, pictures, method="scorecam", layer="features", target=target,
                         show_progress=False)
    shared = heatlens.explain(toy, pictures, method="scorecam", layer="features",
                              target=BoxScore(BOXES[1], 2), show_progress=False)
    assert shared.maps.shape == (2, 64, 64)


class TupleDetector(nn.Module):
    """Returns ``(boxes (B, N, 4), scores (B, N))``: not torchvision's form."""

    def __init__(self) -> None:
        super().__init__()
        self.toy = BoxToy()

    def forward(self, x):
        found = self.toy(x)
        return (torch.stack([f["boxes"] for f in found]),
                torch.stack([f["scores"] for f in found]))


def as_detections(output):
    boxes, scores = output
    return [{"boxes": b, "scores": s} for b, s in zip(boxes, scores, strict=True)]


def test_any_detector_through_parse(pictures):
    model = TupleDetector().eval()
    result = heatlens.explain(model, pictures, method="hirescam", layer="toy.features",
                              target=BoxScore(BOXES[1], parse=as_detections))
    assert result.targets.tolist() == [NO_CLASS, NO_CLASS]
    assert torch.all(result.maps[:, inside(BOXES[1])].sum(1) / result.maps.flatten(1).sum(1)
                     > 0.99)
    with pytest.raises(ValueError, match="parse= a function"):
        heatlens.explain(model, pictures, layer="toy.features", target=BoxScore(BOXES[1]))
    with pytest.raises(ValueError, match="the detections have no 'labels'"):
        heatlens.explain(model, pictures, layer="toy.features",
                         target=BoxScore(BOXES[1], 2, parse=as_detections))


class Blind(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        self.features(x)
        return [{"boxes": torch.zeros(0, 4), "scores": torch.zeros(0),
                 "labels": torch.zeros(0, dtype=torch.long)} for _ in x]


@pytest.mark.parametrize(
    ("model", "target", "message"),
    [
        (BoxToy(), BoxScore(BOXES[0] + 4, 1),
         r"reference box \[8.0, 8.0, 24.0, 24.0\] with label 1 of image 0 matches no detection "
         r"at IoU >= 0.5 \(the best IoU of any detection is 0.39, of a detection with that "
         r"label 0.39\). Lower iou_threshold"),
        (BoxToy(), BoxScore(BOXES[0], 2),
         "with label 2 of image 0 matches no detection.*of a detection with that label 0.00"),
        (Blind(), BoxScore(BOXES[0]), "the model detected nothing in it.*box_score_thresh="),
        (BoxToy(), BoxScore([BOXES[0]] * 3), "reference boxes for 3 images for a batch of 2"),
        (nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten()), BoxScore(BOXES[0]),
         r"the model returns a Tensor of shape \(2, 15376\). Detection targets need one dict per "
         "image"),
    ],
)
def test_bad_input_names_the_problem_and_leaves_the_model_alone(pictures, model, target,
                                                                message):
    model.eval()
    before = snapshot(model)
    layer = "0" if isinstance(model, nn.Sequential) else "features"
    with pytest.raises(ValueError, match=message):
        heatlens.explain(model, pictures, target=target, layer=layer)
    assert_same_state(before, snapshot(model))


def test_bad_reference_boxes_are_refused_when_the_target_is_made():
    with pytest.raises(ValueError, match=r"boxes \(N, 4\)"):
        BoxScore(torch.zeros(3))
    with pytest.raises(ValueError, match="x1 < x2"):
        BoxScore([10.0, 0.0, 5.0, 5.0])
    with pytest.raises(ValueError, match="got 3 labels for 2 boxes"):
        BoxScore(BOXES, [1, 2, 3])
    with pytest.raises(TypeError, match="integers"):
        BoxScore(BOXES, torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="iou_threshold"):
        BoxScore(BOXES, iou_threshold=0)


# ------------------------------------------------------------------------------------------------
# torchvision detectors, random init, small inputs
# ------------------------------------------------------------------------------------------------

SMALL = {"min_size": 64, "max_size": 96, "num_classes": 3}
DETECTORS = {
    "fasterrcnn_resnet50_fpn": dict(box_score_thresh=0.0, rpn_pre_nms_top_n_test=100,
                                    rpn_post_nms_top_n_test=50, box_detections_per_img=10),
    "retinanet_resnet50_fpn": dict(score_thresh=0.0, topk_candidates=100,
                                   detections_per_img=10),
    "fcos_resnet50_fpn": dict(score_thresh=0.0, topk_candidates=100, detections_per_img=10),
}


@pytest.fixture(scope="session")
def detectors() -> dict[str, nn.Module]:
    built = {}
    with torch.random.fork_rng():
        torch.manual_seed(0)
        for name, options in DETECTORS.items():
            built[name] = getattr(tv_detection, name)(
                weights=None, weights_backbone=None, **SMALL, **options).eval()
    return built


@pytest.fixture(scope="module")
def street() -> torch.Tensor:
    """A 64 x 96 picture in [0, 1] (sizes that torchvision pads to nothing)."""
    return torch.rand(1, 3, 64, 96, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("method", ["gradcam", "eigencam"])
@pytest.mark.parametrize("name", list(DETECTORS))
def test_torchvision_detectors_end_to_end(detectors, street, name, method):
    model = detectors[name]
    with torch.no_grad():
        (found,) = model(street)
    sides = found["boxes"][:, 2:] - found["boxes"][:, :2]
    first = int((sides > 0.5).all(dim=1).nonzero()[0])  # a random FCOS also finds slivers
    box, label, score = found["boxes"][first], int(found["labels"][first]), found["scores"][first]
    before = snapshot(model)
    result = heatlens.explain(model, street, method=method, target=BoxScore(box, label))
    assert_same_state(before, snapshot(model))
    assert result.layers == ("backbone.body.layer4",)
    assert "deepest stage that the backbone" in result.layer_reason
    assert "under the FPN every level is computed from it" in result.layer_reason
    assert result.targets.tolist() == [label]
    torch.testing.assert_close(result.scores, score[None], rtol=1e-4, atol=1e-6)
    assert result.maps.shape == (1, 64, 96)
    assert bool(torch.isfinite(result.maps).all()) and float(result.maps.max()) == 1.0
    assert float(result.raw.abs().max()) > 0


@pytest.mark.parametrize("name", list(DETECTORS))
def test_eigen_cam_needs_no_target(detectors, street, name):
    """Eigen-CAM's map does not depend on a target: target=None works on a detector's list of
    dicts (no class, no score), and gives the map it gives with a box target."""
    model = detectors[name]
    with torch.no_grad():
        (found,) = model(street)
    sides = found["boxes"][:, 2:] - found["boxes"][:, :2]
    first = int((sides > 0.5).all(dim=1).nonzero()[0])  # random detectors find slivers too
    untargeted = heatlens.explain(model, street, method="eigencam")
    targeted = heatlens.explain(model, street, method="eigencam",
                                target=BoxScore(found["boxes"][first],
                                                int(found["labels"][first])))
    torch.testing.assert_close(untargeted.maps, targeted.maps)
    assert untargeted.targets.tolist() == [heatlens.engine.targets.NO_CLASS]
    assert untargeted.title(0) == "eigencam"
    with pytest.raises(TypeError, match="target="):  # a gradient method still needs one
        heatlens.explain(model, street, method="gradcam")


def test_candidate_layers_of_a_detector(detectors, street):
    """The probe measures dependence on every tensor of the list-of-dicts output."""
    found = {c.name: c for c in heatlens.candidate_layers(detectors["fcos_resnet50_fpn"], street)}
    assert found["backbone.body.layer4"].output_depends
    assert found["backbone.body.layer1"].output_depends
    assert found["backbone.body.layer4"].shape == (2048, 2, 3)  # the 64 x 96 picture / 32


def test_grad_cam_with_the_iou_term(detectors, street):
    model = detectors["fasterrcnn_resnet50_fpn"]
    with torch.no_grad():
        (found,) = model(street)
    target = BoxScore(found["boxes"][0], int(found["labels"][0]), with_iou=True)
    result = heatlens.explain(model, street, target=target)
    torch.testing.assert_close(result.scores, found["scores"][:1] + 1, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# SSD and SSDlite: backbones that return their maps themselves, no FPN
# ------------------------------------------------------------------------------------------------

SSDS = {"ssd300_vgg16": ("backbone.features", (38, 38)),
        "ssdlite320_mobilenet_v3_large": ("backbone.features.0", (20, 20))}


@pytest.fixture(scope="session")
def ssds() -> dict[str, nn.Module]:
    """Random SSDs; SSDlite's convolutions are re-drawn (He et al.), as its own initialisation
    leaves activations of 1e-14 after its untrained batch norms."""
    built = {}
    with torch.random.fork_rng():
        torch.manual_seed(0)
        for name in SSDS:
            model = getattr(tv_detection, name)(weights=None, weights_backbone=None,
                                                num_classes=3, score_thresh=0.0,
                                                detections_per_img=400, topk_candidates=400)
            if name.startswith("ssdlite"):
                for module in model.modules():
                    if isinstance(module, nn.Conv2d):
                        nn.init.kaiming_normal_(module.weight)
            built[name] = model.eval()
    return built


@pytest.mark.parametrize("name", list(SSDS))
def test_ssd_explains_the_finest_backbone_map(ssds, street, name):
    """Not the head's last, smallest scale (SSDlite's ``head.classification_head.module_list.4``,
    a 2 x 2 grid): the backbone map that its first, finest returned map depends on."""
    layer, grid = SSDS[name]
    before = snapshot(ssds[name])
    result = heatlens.explain(ssds[name], street, method="eigencam")
    assert_same_state(before, snapshot(ssds[name]))
    assert result.layers == (layer,)
    assert "its first, finest output depends on" in result.layer_reason
    assert tuple(result.raw.shape[1:]) == grid
    assert float(result.raw.std()) > 0 and result.maps.shape == (1, 64, 96)


def test_every_ssdlite_box_depends_on_the_chosen_map(ssds, street):
    """The smallest detection (the finest level's) has a map at the chosen layer, and none at
    the head's last level, which only the largest boxes read."""
    model = ssds["ssdlite320_mobilenet_v3_large"]
    with torch.no_grad():
        (found,) = model(street)
    sides = found["boxes"][:, 2:] - found["boxes"][:, :2]
    area = sides.prod(dim=1).where((sides > 0.5).all(dim=1), float("inf"))  # no slivers
    smallest = int(area.argmin())
    target = BoxScore(found["boxes"][smallest], int(found["labels"][smallest]))
    chosen = heatlens.explain(model, street, method="gradcam", target=target)
    with pytest.warns(UserWarning, match="zero everywhere"):
        last_level = heatlens.explain(model, street, method="gradcam", target=target,
                                      layer="head.classification_head.module_list.4")
    assert float(chosen.raw.abs().max()) > 0
    assert float(last_level.raw.abs().max()) == 0


# ------------------------------------------------------------------------------------------------
# MTCNN (facenet-pytorch, weights in the package) on scikit-image's astronaut
# ------------------------------------------------------------------------------------------------


class PNetAt(nn.Module):
    """MTCNN's P-Net run on the whole image at one scale of MTCNN's pyramid, with MTCNN's own
    resampling ("area") and normalisation; returns P-Net's ``(box offsets, probabilities)``."""

    def __init__(self, pnet: nn.Module, scale: float) -> None:
        super().__init__()
        self.pnet, self.scale = pnet, scale

    def forward(self, x: torch.Tensor):
        size = [int(side * self.scale + 1) for side in x.shape[2:]]
        small = torch.nn.functional.interpolate(x, size=size, mode="area")
        return self.pnet((small - 127.5) * 0.0078125)


def pnet_windows(scale: float):
    """``parse=`` for :class:`PNetAt`: every P-Net cell as a detection. Cell (i, j) sees the
    12 x 12 window at (2j, 2i) of the scaled image, which is the box
    ``[(2j + 1) / s, (2i + 1) / s, (2j + 12) / s, (2i + 12) / s]`` of the image, moved by P-Net's
    offsets times the window size (MTCNN's ``generateBoundingBox`` and ``bbreg``); its score is
    P-Net's face probability."""

    def parse(output):
        offsets, probabilities = output
        height, width = probabilities.shape[2:]
        rows, cols = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
        corner = torch.stack([cols, rows], dim=-1).reshape(-1, 2).to(offsets)
        start, stop = (2 * corner + 1) / scale, (2 * corner + 12) / scale
        size = (stop - start + 1).repeat(1, 2)
        window = torch.cat([start, stop], dim=1)
        return [
            {"boxes": window + o.reshape(4, -1).T * size, "scores": p[1].reshape(-1),
             "labels": torch.ones(height * width, dtype=torch.long)}
            for o, p in zip(offsets, probabilities, strict=True)
        ]

    return parse


@pytest.fixture(scope="module")
def astronaut_face():
    """MTCNN's face box on astronaut, the photo as a (1, 3, 512, 512) float 0..255 batch, and
    MTCNN."""
    facenet = pytest.importorskip("facenet_pytorch")
    from skimage import data

    photo = data.astronaut()
    mtcnn = facenet.MTCNN(keep_all=True, device="cpu").eval()
    boxes, probabilities = mtcnn.detect(Image.fromarray(photo))
    assert len(boxes) == 1 and probabilities[0] > 0.99
    face = torch.from_numpy(np.asarray(boxes[0], dtype=np.float32))
    torch.testing.assert_close(face, torch.tensor([181.0, 62.0, 268.0, 172.0]), atol=3, rtol=0)
    pixels = torch.from_numpy(photo).permute(2, 0, 1)[None].float()
    return face, pixels, mtcnn


# MTCNN is a cascade: P-Net proposes windows over an image pyramid, R-Net and O-Net re-score
# and refine crops of them; the crops and the non-maximum suppressions between the stages are
# not differentiable. P-Net sees the whole image through a fully convolutional network, so it is
# explained faithfully: at the scale of MTCNN's pyramid where the face is as large as P-Net's
# 12-pixel window (the size P-Net is trained for), Grad-CAM of the face probability of P-Net's
# window that is P-Net's detection of the final face box (its most confident window overlapping
# the box at IoU >= 0.5), at P-Net's last feature map (prelu3, which both of its heads read).
# Measured: at scale 0.107 that window scores 1.00, and 0.82 of the map's energy lies inside the
# face box, which covers 3.7 % of the image. Asserted: more than 0.6.
def test_mtcnn_face_box_explained_inside_the_box(astronaut_face):
    face, pixels, mtcnn = astronaut_face
    scales, scale = [], 12 / mtcnn.min_face_size
    while min(pixels.shape[2:]) * scale >= 12:
        scales.append(scale)
        scale *= mtcnn.factor
    face_side = float((face[2:] - face[:2]).prod().sqrt())
    scale = min(scales, key=lambda s: abs(np.log(12 / s / face_side)))
    model = PNetAt(mtcnn.pnet, scale).eval()
    before = snapshot(model)
    target = BoxScore(face, 1, parse=pnet_windows(scale))
    result = heatlens.explain(model, pixels, method="gradcam", target=target,
                              layer="pnet.prelu3")
    assert_same_state(before, snapshot(model))
    assert float(result.scores[0]) > 0.9  # P-Net's window there does see a face
    box = inside(face, 512)
    energy_inside = float(result.maps[0][box].sum() / result.maps[0].sum())
    assert energy_inside > 0.6, (scale, energy_inside)
    assert float(box.float().mean()) < 0.04
    eigen = heatlens.explain(model, pixels, method="eigencam", target=target, layer="pnet.prelu3")
    torch.testing.assert_close(eigen.scores, result.scores)


# ------------------------------------------------------------------------------------------------
# Boxes drawn
# ------------------------------------------------------------------------------------------------


def test_draw_boxes_outlines_and_captions():
    black = np.zeros((64, 64, 3), dtype=np.uint8)
    drawn = np.asarray(draw_boxes(black, [[10, 20, 40, 50]], [1], [0.9], names=["bg", "cat"]))
    colour = BOX_COLOURS[2]
    assert tuple(drawn[35, 10]) == colour and tuple(drawn[20, 25]) == colour
    assert tuple(drawn[35, 25]) == (0, 0, 0)  # inside stays as it was
    assert (drawn[:20, 10:40] == colour).all(axis=-1).any()  # the caption's label above the box
    plain = np.asarray(draw_boxes(black, torch.tensor([[10.0, 20.0, 40.0, 50.0]])))
    assert tuple(plain[35, 10]) == BOX_COLOURS[0] and not plain[:19].any()
    blended = overlay_with_boxes(black, torch.zeros(8, 8), [[10, 20, 40, 50]], [1])
    assert blended.size == (64, 64) and tuple(np.asarray(blended)[35, 10]) == colour
    with pytest.raises(ValueError, match=r"shape \(N, 4\)"):
        draw_boxes(black, [[1, 2, 3]])
    with pytest.raises(ValueError, match="got 2 labels for 1 boxes"):
        draw_boxes(black, [[1, 2, 3, 4]], [1, 2])


# ------------------------------------------------------------------------------------------------
# heatlens explain --task detection
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def detector_files(tmp_path_factory) -> tuple[Path, Path]:
    """A pickled random-init Faster R-CNN (MobileNetV3 FPN, small sizes) and a photo."""
    from skimage import data

    folder = tmp_path_factory.mktemp("detection")
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = tv_detection.fasterrcnn_mobilenet_v3_large_fpn(
            weights=None, weights_backbone=None, num_classes=3, min_size=96, max_size=128,
            box_score_thresh=0.0, box_detections_per_img=5).eval()
    torch.save(model, folder / "detector.pt")
    photo = folder / "astronaut.png"
    Image.fromarray(data.astronaut()).resize((128, 96)).save(photo)
    return folder / "detector.pt", photo


@pytest.fixture
def run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    return lambda *args: runner.invoke(main, [str(a) for a in args])


def test_cli_task_detection(run, detector_files):
    model, photo = detector_files
    result = run("explain", photo, "--task", "detection", "--model", model, "--trust-pickle",
                 "--score-threshold", 0, "--method", "gradcam,eigencam", "--out", "det.png")
    assert result.exit_code == 0, result.output
    lines = [line for line in result.output.splitlines() if "(layer " in line]
    assert len(lines) == 2
    assert all(line.endswith("(layer backbone.body.16)") for line in lines)
    assert lines[0].startswith("astronaut.png: gradcam | ")
    assert Path("det.png").read_bytes()[:4] == b"\x89PNG"


def test_cli_task_detection_errors(run, detector_files):
    model, photo = detector_files
    none = run("explain", photo, "--task", "detection", "--model", model, "--trust-pickle",
               "--score-threshold", 1)
    assert none.exit_code == 1
    assert "Error: no detection scores at least --score-threshold 1.0 (the highest is" in (
        none.output)
    label = run("explain", photo, "--task", "detection", "--model", model, "--trust-pickle",
                "--class-idx", 9)
    assert label.exit_code == 1 and "no detection with label 9" in label.output
    by_name = run("explain", photo, "--task", "detection", "--arch",
                  "fasterrcnn_mobilenet_v3_large_320_fpn", "--num-classes", 3,
                  "--score-threshold", 0.99)
    assert by_name.exit_code == 1, by_name.output
    assert "model: fasterrcnn_mobilenet_v3_large_320_fpn (random init)" in by_name.output
    assert "lower --score-threshold" in by_name.output


def test_detection_panels_draw_the_explained_boxes(detector_files):
    model_file, photo = detector_files
    model = torch.load(model_file, weights_only=False)
    picture = Image.open(photo).convert("RGB")
    loaded = LoadedModel(model, "detector", ["bg", "a", "b"], IMAGENET)
    (panel,) = task_panels("detection", loaded, picture, ["gradcam"], class_idx=None,
                           score_threshold=0.0, layer="auto", alpha=0.5, cmap="jet",
                           device="cpu")
    with torch.no_grad():
        (found,) = model(torch.from_numpy(np.array(picture)).permute(2, 0, 1)[None] / 255)
    x1, y1, _, y2 = found["boxes"][0].round().int().tolist()
    colour = BOX_COLOURS[1 + int(found["labels"][0]) % (len(BOX_COLOURS) - 1)]
    drawn = np.asarray(panel.picture)
    assert panel.picture.size == picture.size
    assert (drawn[y1:y2, max(x1 - 1, 0) : x1 + 2] == colour).all(axis=-1).any()
    torch.testing.assert_close(panel.result.scores, found["scores"].sum()[None], rtol=1e-4,
                               atol=1e-5)
