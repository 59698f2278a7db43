"""heatlens.audit finds shortcuts that were planted, and raises no false alarm where none was.

Small CNNs are trained here on 32 px pictures of three shapes (square, ring, cross) on grey
noise; in the shortcut models one class's shape is unreliable in training (a third of its
pictures show another class's shape) while a second cue is perfect:

* a **watermark**: a 5 px mark in the bottom-right corner of every training picture of class 0;
* a **background colour**: every training picture of class 1 on a red background.

The audit runs on held-out pictures that carry the same cue (as the photos in use would), with
the shapes' boxes or masks. Models trained without the cue, on the same pictures, are audited on
the same held-out set: the false alarms over three seeds are counted."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import heatlens
from heatlens.metrics.localisation import boxes_to_masks, pointing_game, relevance_mass

SIZE = 32
PRESET = heatlens.Preset(resize=SIZE, crop=SIZE, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
CLASSES = ("square", "ring", "cross")


def _picture(rng: np.random.Generator, shape: int, cue: str | None, cls: int
             ) -> tuple[np.ndarray, np.ndarray]:
    """A picture (H, W, 3) uint8 and its object mask."""
    grey = rng.uniform(0.35, 0.6)
    image = np.clip(grey + rng.normal(0, 0.08, (SIZE, SIZE, 3)), 0, 1)
    if cue == "colour" and cls == 1:
        image[..., 0] = np.clip(image[..., 0] + 0.35, 0, 1)
    side = int(rng.integers(9, 13))
    y, x = (int(v) for v in rng.integers(5, SIZE - 5 - side, 2))
    rows, columns = np.mgrid[:SIZE, :SIZE]
    centre_y, centre_x, r = y + side / 2, x + side / 2, side / 2
    if shape == 0:
        mask = (rows >= y) & (rows < y + side) & (columns >= x) & (columns < x + side)
    elif shape == 1:  # a ring
        distance = np.sqrt((rows + 0.5 - centre_y) ** 2 + (columns + 0.5 - centre_x) ** 2)
        mask = (distance <= r) & (distance >= r - 2.5)
    else:
        inside = (rows >= y) & (rows < y + side) & (columns >= x) & (columns < x + side)
        mask = inside & ((np.abs(rows + 0.5 - centre_y) < side / 6)
                         | (np.abs(columns + 0.5 - centre_x) < side / 6))
    image[mask] = rng.uniform(0.85, 1.0) if rng.random() < 0.5 else rng.uniform(0.0, 0.1)
    if cue == "watermark" and cls == 0:
        image[26:31, 26:31] = 1.0
        image[27:30, 27:30] = 0.0
    return (image * 255).astype(np.uint8), mask


def _data(count: int, cue: str | None, seed: int, unreliable: bool
          ) -> tuple[list[np.ndarray], list[np.ndarray], list[int]]:
    rng = np.random.default_rng(seed)
    pictures, masks, labels = [], [], []
    for n in range(count):
        cls = n % 3
        shape = cls
        if unreliable and cls == {"watermark": 0, "colour": 1}.get(cue, -1) and rng.random() < 0.35:
            shape = int(rng.choice([c for c in range(3) if c != cls]))
        picture, mask = _picture(rng, shape, cue, cls)
        pictures.append(picture)
        masks.append(mask)
        labels.append(cls)
    return pictures, masks, labels


def _train(cue: str | None, seed: int) -> nn.Module:
    """A small CNN trained on 900 pictures with ``cue`` (None: no cue, shapes reliable)."""
    pictures, _, labels = _data(900, cue, seed=100 + seed, unreliable=cue is not None)
    x = torch.stack([PRESET.tensor(Image.fromarray(p)) for p in pictures])
    y = torch.tensor(labels)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2), nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 3))
        optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
        for _ in range(8):
            for batch in torch.randperm(len(x)).split(64):
                optimiser.zero_grad()
                nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
                optimiser.step()
    return model.eval()


def _folder(root: Path, cue: str | None) -> tuple[Path, Path, dict[str, list[list[float]]]]:
    """60 held-out pictures with the cue, in class folders; their masks and boxes."""
    pictures, masks, labels = _data(60, cue, seed=7, unreliable=False)
    images, mask_folder = root / "images", root / "masks"
    boxes = {}
    for n, (picture, mask, cls) in enumerate(zip(pictures, masks, labels, strict=True)):
        name = f"{CLASSES[cls]}/{n:03d}.png"
        for folder, data in ((images, picture), (mask_folder, mask.astype(np.uint8) * 255)):
            (folder / CLASSES[cls]).mkdir(parents=True, exist_ok=True)
            Image.fromarray(data).save(folder / name)
        rows, columns = np.nonzero(mask)
        boxes[name] = [[float(columns.min()), float(rows.min()), float(columns.max() + 1),
                        float(rows.max() + 1)]]
    return images, mask_folder, boxes


def _audit(model, images, **kwargs):
    return heatlens.audit(model, images, preset=PRESET, labels=list(CLASSES),
                          show_progress=False, **kwargs)


@pytest.fixture(scope="module")
def watermarked(tmp_path_factory):
    return _folder(tmp_path_factory.mktemp("watermark"), "watermark")


@pytest.fixture(scope="module")
def coloured(tmp_path_factory):
    return _folder(tmp_path_factory.mktemp("colour"), "colour")


@pytest.fixture(scope="module")
def clean_models():
    return [_train(None, seed) for seed in range(3)]


def test_the_watermark_class_and_its_cluster_are_flagged(watermarked, tmp_path):
    images, _, boxes = watermarked
    report = _audit(_train("watermark", 0), images, boxes=boxes)
    assert report.flagged_classes[:1] == ["square"], report.summary()
    square = next(row for row in report.classes if row["class_name"] == "square")
    assert square["place"] == "bottom-right corner"
    assert any("bottom-right corner" in reason for reason in square["reasons"])
    flagged = [c for c in report.clusters["square"] if c.flagged]
    assert flagged and "bottom-right corner" in flagged[0].reason
    assert {image["class_name"] for image in report.flagged_images} == {"square"}
    page = report.save(tmp_path / "audit")
    assert "bottom-right corner" in page.read_text()
    assert (tmp_path / "audit" / "images.parquet").is_file()


def test_the_background_colour_class_is_flagged(coloured):
    images, masks, _ = coloured
    report = _audit(_train("colour", 0), images, masks=masks)
    assert report.flagged_classes == ["ring"], report.summary()
    ring = next(row for row in report.classes if row["class_name"] == "ring")
    assert ring["kept"] >= 0.4 and ring["background_gap"] > 0.5
    assert any("removing the object keeps p(ring)" in r for r in ring["reasons"])


def test_models_without_the_cues_raise_no_alarm(clean_models, watermarked, coloured):
    alarms = []
    for seed, model in enumerate(clean_models):
        for images, masks, boxes in (watermarked, coloured):
            report = _audit(model, images, boxes=boxes)
            alarms += [(seed, name, report.classes) for name in report.flagged_classes]
            report = _audit(model, images, masks=masks)
            alarms += [(seed, name) for name in report.flagged_classes]
    print(f"false alarms over 3 seeds x 2 data sets x 2 kinds of object: {len(alarms)}")
    assert not alarms, alarms


def test_per_image_numbers_equal_the_localisation_metrics(mobilenet_v2_imagenet, tmp_path):
    """MobileNetV2 with its ImageNet weights on two photos with boxes: the audit's rows are the
    localisation metrics of heatlens.explain's maps on the boxes moved to the crop."""
    from skimage import data

    folder = tmp_path / "photos"
    folder.mkdir()
    Image.fromarray(data.chelsea()).save(folder / "cat.png")
    Image.fromarray(data.coffee()).save(folder / "cup.png")
    boxes = {"cat.png": [[140.0, 20.0, 330.0, 260.0]], "cup.png": [[60.0, 20.0, 520.0, 330.0]]}
    report = heatlens.audit(mobilenet_v2_imagenet, folder, boxes=boxes, show_progress=False)
    for row in report.images:
        picture = heatlens.load_image(folder / row["path"])
        x, _ = heatlens.IMAGENET(picture)
        maps = heatlens.explain(mobilenet_v2_imagenet, x).maps
        moved = heatlens.IMAGENET.boxes(torch.tensor(boxes[row["path"]]), picture.size)
        mask = boxes_to_masks([moved], (224, 224))
        assert row["mass"] == pytest.approx(float(relevance_mass(maps, mask)[0]), abs=1e-5)
        assert row["hit"] == float(pointing_game(maps, mask)[0])
        assert row["lift"] == pytest.approx(row["mass"] / float(mask.float().mean()), rel=1e-5)


def test_bad_input_goes_into_the_report_not_a_crash(watermarked, tmp_path):
    images, _, boxes = watermarked
    model = _train("watermark", 0)
    few = tmp_path / "few"
    (few / "square").mkdir(parents=True)
    for name in sorted(boxes)[:3]:
        Image.open(images / name).save(few / name.replace("square/", "square/x").replace(
            "ring/", "square/d").replace("cross/", "square/c"))
    report = _audit(model, few, boxes={"nowhere.png": [[0, 0, 4, 4]]})
    text = " ".join(report.problems)
    assert "match no image" in text and "too few to cluster" in text
    wrong = tmp_path / "masks"
    for name in boxes:
        (wrong / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("L", (16, 16), 255).save(wrong / name)
    report = _audit(model, images, masks=wrong)
    assert "a mask must have the image's size" in " ".join(report.problems)
    assert len(report.images) == 60
    blind = copy.deepcopy(model)
    with torch.no_grad():
        blind[-1].weight[2] = 0  # the cross's logit no longer reads the features
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # named in the report, not warned image by image
        report = _audit(blind, images, boxes=boxes, target="label")
    empty = [p for p in report.problems if "the map is zero everywhere" in p]
    assert len(empty) == 20 and all(p.startswith("cross/") for p in empty)


def test_the_command_writes_the_report(watermarked, tmp_path):
    """`heatlens audit` with a pickled model and a JSON boxes file: the verdict printed, the
    report and the Parquet rows written (the command's own preset: ImageNet's 256/224)."""
    import json

    from click.testing import CliRunner

    from heatlens.cli import main

    images, _, boxes = watermarked
    model_file = tmp_path / "model.pt"
    torch.save(_train("watermark", 0), model_file)
    boxes_file = tmp_path / "boxes.json"
    boxes_file.write_text(json.dumps(boxes))
    out = tmp_path / "audit"
    result = CliRunner().invoke(main, ["audit", str(images), "--model", str(model_file),
                                       "--trust-pickle", "--boxes", str(boxes_file),
                                       "--workers", "0", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("audited 60 images in ")
    assert (out / "report.html").is_file() and (out / "classes.parquet").is_file()
    refused = CliRunner().invoke(main, ["audit", str(images), "--boxes", str(boxes_file),
                                        "--masks", str(images)])
    assert refused.exit_code == 1 and "give boxes or masks, not both" in refused.output
