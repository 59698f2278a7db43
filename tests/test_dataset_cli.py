"""``heatlens explain-dir`` on 300 photos of mixed sizes and formats with broken files among them,
as a user runs it: to the end, and interrupted (SIGINT, SIGKILL) then run again.

The default model (EfficientNet-Lite0 with its ImageNet weights) in a subprocess, as from a
shell; the photos are crops of scikit-image's, 40 to 200 pixels a side."""

from __future__ import annotations

import csv
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from skimage import data

import heatlens
from heatlens.datasets.store import read_rows

FORMATS = (("jpg", "JPEG"), ("png", "PNG"), ("webp", "WEBP"), ("bmp", "BMP"),
           ("gif", "GIF"), ("tif", "TIFF"))
BROKEN = {"coffee/cut_short.jpg": "truncated", "coffee/letter.png": "not an image",
          "rocket/empty.jpg": "not an image", "rocket/poster.png": "too many pixels"}
MAX_PIXELS = 200 * 200


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """300 crops in three class folders, formats in turn, plus the broken files of BROKEN."""
    root = tmp_path_factory.mktemp("folder")
    rng = np.random.default_rng(0)
    sources = {name: Image.fromarray(getattr(data, name)()) for name in
               ("chelsea", "coffee", "rocket")}
    for n in range(300):
        name = ("chelsea", "coffee", "rocket")[n % 3]
        photo = sources[name]
        w, h = photo.size
        x, y = int(rng.integers(0, w // 3)), int(rng.integers(0, h // 3))
        crop = photo.crop((x, y, x + w // 2, y + h // 2))
        size = (int(rng.integers(40, 200)), int(rng.integers(40, 200)))
        suffix, kind = FORMATS[(n // 3) % len(FORMATS)]
        (root / name).mkdir(exist_ok=True)
        crop.resize(size).save(root / name / f"{n:03d}.{suffix}", format=kind)
    jpeg = (root / "coffee" / "001.jpg").read_bytes()
    (root / "coffee" / "cut_short.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (root / "coffee" / "letter.png").write_text("Dear reviewer,")
    (root / "rocket" / "empty.jpg").write_bytes(b"")
    Image.new("RGB", (300, 300)).save(root / "rocket" / "poster.png")
    return root


def _command(photos: Path, out: Path) -> list[str]:
    script = shutil.which("heatlens", path=str(Path(sys.executable).parent))
    assert script, "the heatlens command is not installed in this environment"
    return [script, "explain-dir", str(photos), "--out", str(out),
            "--batch-size", "8", "--workers", "2", "--chunk-images", "24", "--max-pixels",
            str(MAX_PIXELS)]


def _default_sigint() -> None:
    """In the child: Ctrl-C's default action. A shell's background job (CI started with ``&``)
    ignores SIGINT, its children inherit that, and Python then sets no KeyboardInterrupt."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _environment() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def whole(photos: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("whole") / "run"
    done = subprocess.run(_command(photos, out), capture_output=True, text=True,
                          env=_environment(), timeout=900)
    assert done.returncode == 0, done.stderr
    assert "300 images explained with gradcam" in done.stdout
    assert "4 could not be used" in done.stdout
    return out


def test_the_whole_folder_is_explained_and_the_broken_files_listed(whole, photos):
    run = heatlens.load_run(whole)
    paths = run.index.column("path").to_pylist()
    assert len(paths) == len(set(paths)) == 300
    with (whole / "errors.csv").open() as handle:
        errors = {row["path"]: row["kind"] for row in csv.DictReader(handle)}
    assert errors == BROKEN
    assert {Path(p).suffix for p in paths} == {f".{s}" for s, _ in FORMATS}
    assert run.settings["model"].startswith("efficientnet_lite0")
    names = set(run.index.column("predicted_name").to_pylist())
    assert "Egyptian cat" in names or "tabby" in names
    assert all(run.map(i).shape == (7, 7) for i in (0, 150, 299))
    assert (whole / "summary.png").stat().st_size > 10_000


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGKILL], ids=["SIGINT", "SIGKILL"])
def test_an_interrupted_run_resumes_to_the_same_index(whole, photos, tmp_path, stop):
    out = tmp_path / "run"
    process = subprocess.Popen(_command(photos, out), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env=_environment(),
                               preexec_fn=_default_sigint)
    deadline = time.monotonic() + 600
    while len(list((out / "parts").glob("rows-*.parquet"))) < 3:
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert process.poll() is None, "the run ended before it could be interrupted"
    process.send_signal(stop)
    stdout, stderr = process.communicate(timeout=120)
    if stop == signal.SIGINT:
        assert process.returncode == 130, (stdout, stderr)
        assert "run the same command again" in stderr
        kept = heatlens.load_run(out)
        assert 0 < len(kept) < 300  # whole chunks, gathered into index.parquet
        import pyarrow.parquet as pq

        assert pq.read_table(out / "index.parquet").num_rows == len(kept)
    else:
        assert process.returncode == -signal.SIGKILL
    assert not list(out.rglob(".*.tmp")) or stop == signal.SIGKILL
    again = subprocess.run(_command(photos, out), capture_output=True, text=True,
                           env=_environment(), timeout=900)
    assert again.returncode == 0, again.stderr
    resumed, uninterrupted = read_rows(out), read_rows(whole)
    paths = resumed.column("path").to_pylist()
    assert len(paths) == len(set(paths)) == 300
    ignored = ["seconds", "map_file", "map_key"]
    a = resumed.drop_columns(ignored).to_pylist()
    b = uninterrupted.drop_columns(ignored).to_pylist()
    for x, y in zip(a, b, strict=True):
        for key in x:
            if isinstance(x[key], float):
                assert x[key] == pytest.approx(y[key], rel=1e-4, abs=1e-6), (x["path"], key)
            elif key != "top5":
                assert x[key] == y[key], (x["path"], key)
    first, second = heatlens.load_run(out), heatlens.load_run(whole)
    for i in range(0, 300, 37):
        np.testing.assert_allclose(first.map(i), second.map(i), rtol=1e-3, atol=1e-3)
    assert (out / "errors.csv").read_text() == (whole / "errors.csv").read_text()
