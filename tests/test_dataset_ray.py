"""The Ray engine of ``heatlens.explain_dataset`` writes the run the local engine writes: the same
index rows, maps, errors and overlays for a folder of real photos, also when it resumes a run.

One local Ray (2 CPUs, no dashboard) serves the module; MobileNetV2 (ImageNet weights) on
64-pixel inputs keeps each run to seconds.
"""

from __future__ import annotations

import csv
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from threads import one_intraop_thread
from torch import nn

import heatlens

PRESET = heatlens.Preset(resize=64, crop=64, mean=(0.485, 0.456, 0.406),
                         std=(0.229, 0.224, 0.225))
PHOTOS = {"animal": ("chelsea", "astronaut", "coffee", "retina", "hubble_deep_field"),
          "thing": ("rocket", "camera", "coins", "brick", "grass", "logo")}
"""scikit-image's photos by class folder (grayscale and RGBA ones included)."""
OPTIONS: dict[str, Any] = {"methods": ("gradcam", "saliency"), "target": "label",
                           "preset": PRESET, "batch_size": 3, "workers": 0,
                           "show_progress": False}
IGNORED = ("seconds", "map_file")
"""Columns that differ between two runs of the same images."""


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder of small photos in two class folders, as JPEG and PNG, and one broken file."""
    from skimage import data

    folder = tmp_path_factory.mktemp("photos")
    for number, (label, name) in enumerate(
            (label, name) for label, names in PHOTOS.items() for name in names):
        picture = Image.fromarray(getattr(data, name)())
        picture.thumbnail((96, 96))
        (folder / label).mkdir(exist_ok=True)
        if number % 2 and picture.mode in ("RGB", "L"):
            picture.save(folder / label / f"{name}.jpg", quality=90)
        else:
            picture.save(folder / label / f"{name}.png")
    (folder / "thing" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a JPEG at all")
    return folder


@pytest.fixture(scope="module")
def model(mobilenet_v2_imagenet: nn.Module) -> nn.Module:
    """MobileNetV2 with its ImageNet weights: real scores (a randomly initialised network's are
    about 1e-11, where the two engines' float rounding is all there is to compare)."""
    return mobilenet_v2_imagenet


@pytest.fixture(scope="module")
def ray_started() -> Iterator[Any]:
    """One local Ray for the module: the engine uses it as it is and leaves it running."""
    import ray  # a test dependency: missing, the module fails loudly

    ray.init(num_cpus=2, include_dashboard=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def local_run(photos: Path, model: nn.Module, tmp_path_factory: pytest.TempPathFactory
              ) -> heatlens.Run:
    return explain_here(model, photos, tmp_path_factory.mktemp("local") / "run", overlays=True)


def explain_here(model: nn.Module, photos: Path, out: Path, **options: Any) -> heatlens.Run:
    """A run of the local engine, on one thread as the Ray engine's one-CPU actor (Ray sets
    its OMP_NUM_THREADS=1): other thread counts sum in another order, and the stored float16
    maps then differ by one unit in the last place here and there."""
    with one_intraop_thread():
        return heatlens.explain_dataset(model, photos, out, **options, **OPTIONS)


def rows_of(run: heatlens.Run, ignored: tuple[str, ...] = IGNORED) -> list[dict[str, Any]]:
    return [{k: v for k, v in row.items() if k not in ignored} for row in run.index.to_pylist()]


def same(a: Any, b: Any) -> bool:
    """``a == b``, floats within a relative 1e-5, in nested rows."""
    if isinstance(a, float) and isinstance(b, float):
        return a == pytest.approx(b, rel=1e-5, nan_ok=True)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def assert_same_run(run: heatlens.Run, local: heatlens.Run,
                    ignored: tuple[str, ...] = IGNORED) -> None:
    rows, expected = rows_of(run, ignored), rows_of(local, ignored)
    assert len(rows) == len(expected)
    for row, want in zip(rows, expected, strict=True):
        assert same(row, want), f"{row}\n!=\n{want}"
    for i in range(len(run)):
        got, want = run.map(i), local.map(i)
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=1e-5,
                                   atol=1e-5 * float(np.abs(want).max(initial=1e-30)))
    assert errors_of(run) == errors_of(local)


def errors_of(run: heatlens.Run) -> list[dict[str, str]]:
    with (run.folder / "errors.csv").open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def test_ray_engine_writes_the_local_engines_run(
        ray_started: Any, photos: Path, model: nn.Module, local_run: heatlens.Run,
        tmp_path: Path) -> None:
    run = heatlens.explain_dataset(model, photos, tmp_path / "run", engine="ray",
                                   overlays=True, **OPTIONS)

    names = {row["path"] for row in run.index.to_pylist()}
    assert len(names) == sum(len(n) for n in PHOTOS.values())
    assert len(run) == 2 * len(names)
    assert [error["path"] for error in errors_of(run)] == ["thing/broken.jpg"]
    assert_same_run(run, local_run)
    overlays = sorted((run.folder / "overlays").rglob("*.png"))
    assert len(overlays) == len(run)
    for picture in overlays:
        mine = np.asarray(Image.open(picture), dtype=np.int16)
        theirs = np.asarray(Image.open(local_run.folder / picture.relative_to(run.folder)),
                            dtype=np.int16)
        assert np.abs(mine - theirs).max() <= 1, picture.name
    assert ray_started.is_initialized()  # a Ray it did not start is left running


def test_ray_engine_resumes_without_explaining_twice(
        ray_started: Any, photos: Path, model: nn.Module, local_run: heatlens.Run,
        tmp_path: Path) -> None:
    out = tmp_path / "run"
    half = heatlens.explain_dataset(model, photos, out, engine="ray", shard_of=(1, 2),
                                    **OPTIONS)
    first = set(half.index.column("path").to_pylist())
    everything = set(local_run.index.column("path").to_pylist())
    assert 0 < len(first) < len(everything)

    run = heatlens.explain_dataset(model, photos, out, engine="ray", **OPTIONS)

    import pyarrow.parquet as pq

    written = [pq.read_table(part).to_pylist() for part in sorted((out / "parts").glob(
        "rows-*.parquet"))]
    assert sum(len(rows) for rows in written) == len(run)  # no image written twice
    assert {row["path"] for row in written[-1]} == everything - first
    discrete = ("path", "sha256", "label", "predicted", "target", "method", "layer")
    assert [[row[k] for k in discrete] for row in run.index.to_pylist()] == [
        [row[k] for k in discrete] for row in local_run.index.to_pylist()]
    # The resumed batches hold other images than a whole run's (the skipped ones are left
    # out), so the maps are compared with the local engine's run resumed in the same steps.
    explain_here(model, photos, tmp_path / "local", shard_of=(1, 2))
    assert_same_run(run, explain_here(model, photos, tmp_path / "local"))


def test_ray_engine_without_ray_says_how_to_install(
        photos: Path, model: nn.Module, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
        ) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(ImportError, match=re.escape("pip install 'heatlens[ray]'")):
        heatlens.explain_dataset(model, photos, tmp_path / "run", engine="ray", **OPTIONS)
    assert not (tmp_path / "run").exists()  # refused before anything is written
