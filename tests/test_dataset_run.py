"""heatlens.explain_dataset and heatlens.load_run, in Python: sources, what a row and a map hold,
resuming, added methods, changed files and settings, errors, overlays and the summary.

MobileNetV2 with its ImageNet weights on scikit-image's photos, cut and saved small."""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data
from test_engine import assert_same_state, snapshot

import heatlens
from heatlens.datasets.store import read_rows

PRESET = heatlens.Preset(resize=96, crop=96, mean=(0.485, 0.456, 0.406),
                         std=(0.229, 0.224, 0.225))
PHOTOS = {"Egyptian cat": ("chelsea",), "drinks": ("coffee",),
          "sky": ("astronaut", "rocket")}
"""Class folders: one named as an ImageNet class, two not."""


@pytest.fixture(scope="module")
def labels() -> list[str]:
    from heatlens.loading.models import imagenet_categories

    return imagenet_categories()


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three class folders of photo crops (JPEG, PNG, WebP) and two broken files."""
    root = tmp_path_factory.mktemp("photos")
    for cls, names in PHOTOS.items():
        (root / cls).mkdir()
        for name in names:
            photo = Image.fromarray(getattr(data, name)())
            for k, suffix in enumerate((".jpg", ".png", ".webp")):
                w, h = photo.size
                crop = photo.crop((k * w // 10, k * h // 12, w - k * w // 14, h))
                crop.resize((120 + 10 * k, 100 + 7 * k)).save(root / cls / f"{name}{k}{suffix}")
    (root / "drinks" / "empty.jpg").write_bytes(b"")
    (root / "sky" / "notes.png").write_text("not an image")
    return root


def _run(model, source, out, **kwargs):
    options = {"preset": PRESET, "batch_size": 4, "workers": 0, "show_progress": False}
    return heatlens.explain_dataset(model, source, out, **{**options, **kwargs})


@pytest.fixture(scope="module")
def run(mobilenet_v2_imagenet, folder, labels, tmp_path_factory) -> heatlens.Run:
    out = tmp_path_factory.mktemp("runs") / "run"
    return _run(mobilenet_v2_imagenet, folder, out, methods="gradcam,saliency", labels=labels,
                metrics=("average_drop",), overlays=True)


def test_every_image_once_per_method_with_its_file_fields(run, folder):
    table = run.index.to_pylist()
    images = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.*")
                    if p.name not in ("empty.jpg", "notes.png"))
    assert sorted({row["path"] for row in table}) == images
    assert len(table) == 2 * len(images)
    for row in table:
        file = folder / row["path"]
        assert (row["width"], row["height"]) == Image.open(file).size
        assert row["sha256"] == hashlib.sha256(file.read_bytes()).hexdigest()
        assert row["label_name"] == row["path"].split("/")[0]
        if row["path"].startswith("Egyptian cat/"):
            assert row["label"] == 285 and row["correct"] == (row["predicted"] == 285)
        else:  # not ImageNet class names
            assert row["label"] is None and row["correct"] is None
        assert len(row["top5"]) == 5 and row["top5"][0]["class"] == row["predicted"]
        assert row["target"] == row["predicted"] and row["seconds"] > 0
        assert 0 <= row["average_drop"] <= 100 and row["model_fingerprint"] and row["seed"] == 0


def test_a_row_holds_what_explain_gives(run, folder, mobilenet_v2_imagenet, labels):
    """The stored map is the raw Grad-CAM map at the layer's resolution (float16), the rows'
    prediction, top-5, score and probability those of heatlens.explain on the same tensor."""
    for row in run.index.to_pylist()[:6]:
        x, _ = PRESET(heatlens.load_image(folder / row["path"]))
        e = heatlens.explain(mobilenet_v2_imagenet, x, row["method"])
        probabilities = e.output.softmax(1)[0]
        top = probabilities.topk(5)
        assert [t["class"] for t in row["top5"]] == top.indices.tolist()
        assert [t["probability"] for t in row["top5"]] == pytest.approx(top.values.tolist(),
                                                                         rel=1e-4)
        assert row["top5"][0]["name"] == labels[row["predicted"]]
        assert row["score"] == pytest.approx(float(e.scores[0]), rel=1e-4)
        assert row["probability"] == pytest.approx(float(e.probabilities[0]), rel=1e-4)
        stored = run.map(row)
        if row["method"] == "gradcam":
            assert row["layer"] == "features.18" and stored.shape == (3, 3)
            raw, tolerance = e.raw[0].numpy(), 2e-3  # float16's rounding
        else:  # input gradients differ by up to 0.6 % between a batch of 4 and of 1
            assert row["layer"] == "input" and stored.shape == (96, 96)
            raw, tolerance = e.maps[0].numpy(), 1e-2
        np.testing.assert_allclose(stored, raw, atol=tolerance * np.abs(raw).max())


def test_errors_are_listed_and_the_run_goes_on(run):
    errors = {e["path"]: e for e in run.errors}
    assert set(errors) == {"drinks/empty.jpg", "sky/notes.png"}
    assert errors["sky/notes.png"]["kind"] == "not an image"
    assert "notes.png" in errors["sky/notes.png"]["reason"]
    with (run.folder / "errors.csv").open() as handle:
        assert [r["path"] for r in csv.DictReader(handle)] == sorted(errors)


def test_index_file_overlays_summary_and_settings(run, folder):
    import pyarrow.parquet as pq

    assert pq.read_table(run.folder / "index.parquet").equals(run.index)
    overlays = sorted(p.relative_to(run.folder / "overlays").as_posix()
                      for p in (run.folder / "overlays").rglob("*.png"))
    assert "Egyptian cat/chelsea0.gradcam.png" in overlays and len(overlays) == 2 * 12
    assert Image.open(run.folder / "overlays/Egyptian cat/chelsea0.saliency.png").size == (96, 96)
    summary = Image.open(run.folder / "summary.png")
    assert summary.width > 200 and summary.height > 200
    settings = json.loads((run.folder / "run.json").read_text())
    assert settings["methods"] == ["gradcam", "saliency"]
    assert settings["metrics"] == ["average_drop"]
    assert settings["preset"]["crop"] == 96


def test_a_second_run_skips_everything_and_an_added_method_only_adds(
        run, folder, mobilenet_v2_imagenet, labels, tmp_path):
    out = tmp_path / "again"
    first = _run(mobilenet_v2_imagenet, folder, out, methods="gradcam", labels=labels)
    chunks = sorted((out / "parts").glob("rows-*"))
    again = _run(mobilenet_v2_imagenet, folder, out, methods="gradcam", labels=labels)
    assert sorted((out / "parts").glob("rows-*")) == chunks  # nothing new was written
    assert again.index.equals(first.index)
    more = _run(mobilenet_v2_imagenet, folder, out, methods="saliency", labels=labels)
    assert sorted(more.settings["methods"]) == ["gradcam", "saliency"]
    assert len(more) == 2 * len(first)
    assert more.index.filter(_method("gradcam")).equals(first.index)


def _method(name):
    import pyarrow.compute as pc

    return pc.field("method") == name


def test_a_changed_file_is_explained_again_and_listed_once(mobilenet_v2_imagenet, folder,
                                                           tmp_path):
    source = tmp_path / "src"
    source.mkdir()
    Image.open(folder / "Egyptian cat/chelsea0.jpg").save(source / "a.png")
    Image.open(folder / "drinks/coffee0.jpg").save(source / "b.png")
    out = tmp_path / "run"
    before = _run(mobilenet_v2_imagenet, source, out)
    Image.open(folder / "sky/rocket0.jpg").save(source / "b.png")
    after = _run(mobilenet_v2_imagenet, source, out)
    assert after.index.column("path").to_pylist() == ["a.png", "b.png"]
    assert after.row(0) == before.row(0)
    assert after.row(1)["sha256"] != before.row(1)["sha256"]
    assert after.row(1)["predicted"] != before.row(1)["predicted"]


def test_changed_settings_are_refused_before_any_work(mobilenet_v2_imagenet, folder, tmp_path):
    out = tmp_path / "run"
    source = tmp_path / "src"
    source.mkdir()
    Image.open(folder / "Egyptian cat/chelsea0.jpg").save(source / "a.png")
    _run(mobilenet_v2_imagenet, source, out)
    with pytest.raises(ValueError, match=r"target was 'predicted', now 7.*new --out"):
        _run(mobilenet_v2_imagenet, source, out, target=7)
    with pytest.raises(ValueError, match="model_fingerprint"):
        _run(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1),
                                 torch.nn.Flatten()), source, out)


def test_a_list_with_labels_and_label_targets(mobilenet_v2_imagenet, folder, labels, tmp_path):
    listing = tmp_path / "list.csv"
    listing.write_text("path,label\n"
                       f"{folder / 'Egyptian cat/chelsea1.png'},Egyptian cat\n"
                       f"{folder / 'drinks/coffee2.webp'},967\n")
    found = _run(mobilenet_v2_imagenet, listing, tmp_path / "run", target="label",
                 labels=labels)
    rows = found.index.to_pylist()
    assert [r["target"] for r in rows] == [labels.index("Egyptian cat"), 967]
    assert [r["label_name"] for r in rows] == ["Egyptian cat", "espresso"]
    assert all(r["correct"] == (r["predicted"] == r["label"]) for r in rows)
    with pytest.raises(ValueError, match="has no label"):
        _run(mobilenet_v2_imagenet, folder / "drinks", tmp_path / "other", target="label")
    with pytest.raises(ValueError, match="'drinks' is not a class index"):
        _run(mobilenet_v2_imagenet, folder, tmp_path / "third", target="label", labels=labels)


def test_a_torch_dataset_of_tensors_with_labels(mobilenet_v2_imagenet, imagenet_photos,
                                                tmp_path):
    """Tensors are used as they are; a NaN image is listed as an error, not the run's end."""
    spoiled = imagenet_photos[1].clone()
    spoiled[0, 5, 5] = float("nan")
    images = torch.cat([imagenet_photos[:3], spoiled[None]])
    dataset = torch.utils.data.TensorDataset(images, torch.tensor([285, 967, 1, 3]))
    found = _run(mobilenet_v2_imagenet, dataset, tmp_path / "run", target="label")
    rows = found.index.to_pylist()
    assert [r["path"] for r in rows] == ["0", "1", "2"]
    assert [r["target"] for r in rows] == [285, 967, 1]
    assert found.errors == [{"path": "3", "kind": "not finite",
                             "reason": "Dataset item 3 holds NaN or infinite values"}]
    e = heatlens.explain(mobilenet_v2_imagenet, imagenet_photos[:3], target=[285, 967, 1])
    for i in range(3):
        np.testing.assert_allclose(found.map(i), e.raw[i].numpy(),
                                   atol=2e-3 * float(e.raw[i].abs().max()))


def test_the_model_is_left_as_it_was(mobilenet_v2_imagenet, folder, tmp_path):
    before = snapshot(mobilenet_v2_imagenet)
    _run(mobilenet_v2_imagenet, folder / "drinks", tmp_path / "run", methods="gradcam,saliency")
    assert_same_state(before, snapshot(mobilenet_v2_imagenet))
    assert not mobilenet_v2_imagenet.training


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"methods": "gradcamm"}, "gradcam"),
    ({"metrics": ("deletionn",)}, "deletion"),
    ({"target": "biggest"}, "'predicted', 'label' or a class index"),
    ({"engine": "spark"}, "unknown engine"),
    ({"batch_size": 0}, "batch_size must be an int of at least 1"),
    ({"shard_of": (3, 2)}, "K must lie in 1..2"),
])
def test_bad_arguments_are_named_before_any_work(mobilenet_v2_imagenet, folder, tmp_path,
                                                 kwargs, message):
    with pytest.raises((ValueError, KeyError), match=message):
        _run(mobilenet_v2_imagenet, folder, tmp_path / "run", **kwargs)
    assert not (tmp_path / "run").exists()


def test_a_file_or_a_foreign_folder_as_out_is_refused(mobilenet_v2_imagenet, folder, tmp_path):
    (tmp_path / "file").write_text("mine")
    with pytest.raises(ValueError, match="it is a file"):
        _run(mobilenet_v2_imagenet, folder, tmp_path / "file")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("mine")
    with pytest.raises(ValueError, match="not a heatlens run"):
        _run(mobilenet_v2_imagenet, folder, tmp_path / "mine")
    assert (tmp_path / "file").read_text() == "mine"
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["thesis.tex"]


def test_shards_together_make_the_whole_run(mobilenet_v2_imagenet, folder, labels, run,
                                            tmp_path):
    out = tmp_path / "sharded"
    sizes = []
    for k in (1, 2, 3):
        part = _run(mobilenet_v2_imagenet, folder, out, methods="gradcam,saliency",
                    metrics=("average_drop",), shard_of=(k, 3), labels=labels)
        sizes.append(len(part) - sum(sizes))
    assert all(sizes) and sum(sizes) == len(run)
    assert_same_rows(read_rows(out), run.index)


def assert_same_rows(mine, theirs):
    """The same rows, up to the time taken and the chunk files (floats to 1e-4)."""
    ignored = ("seconds", "map_file", "map_key")
    a = mine.drop_columns(list(ignored)).to_pylist()
    b = theirs.drop_columns(list(ignored)).to_pylist()
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for key in x:
            if isinstance(x[key], float):
                assert x[key] == pytest.approx(y[key], rel=1e-4, abs=1e-6), key
            elif key == "top5":
                assert [t["class"] for t in x[key]] == [t["class"] for t in y[key]]
            else:
                assert x[key] == y[key], key
