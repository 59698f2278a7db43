"""Tests of heatlens.pictures.overlays: colouring heatmaps, overlays and grids of real photos."""

from __future__ import annotations

from pathlib import Path

import matplotlib
import numpy as np
import pytest
import torch
from matplotlib.figure import Figure
from PIL import Image
from skimage import data

from heatlens.pictures.overlays import (
    colorize,
    figure_grid,
    image_grid,
    overlay,
    save_figure,
    to_rgb_array,
)


@pytest.fixture(scope="module")
def cat() -> np.ndarray:
    return data.chelsea()  # (300, 451, 3) uint8


@pytest.fixture(scope="module")
def ramp() -> np.ndarray:
    """A 7x7 heatmap rising from 0 on the left to 1 on the right."""
    return np.tile(np.linspace(0.0, 1.0, 7), (7, 1))


def jet(value: float) -> np.ndarray:
    return np.array(matplotlib.colormaps["jet"](value, bytes=True)[:3], dtype=np.uint8)


# to_rgb_array


def test_to_rgb_array_accepts_every_picture_kind(cat: np.ndarray):
    as_float = cat / 255.0
    as_chw = torch.from_numpy(cat).permute(2, 0, 1)
    kinds = {
        "PIL": Image.fromarray(cat),
        "uint8 array": cat,
        "float array": as_float,
        "float32 array": as_float.astype(np.float32),
        "uint8 CHW tensor": as_chw,
        "float CHW tensor": as_chw.float() / 255,
        "uint8 HWC tensor": torch.from_numpy(cat),
        "float HWC tensor": torch.from_numpy(as_float),
        "float tensor that requires grad": (as_chw.float() / 255).requires_grad_(),
    }
    for name, picture in kinds.items():
        result = to_rgb_array(picture)
        assert result.dtype == np.uint8, name
        assert result.shape == cat.shape, name
        np.testing.assert_array_equal(result, cat, err_msg=name)
    bfloat16 = to_rgb_array(as_chw.to(torch.bfloat16) / 255)  # numpy has no bfloat16
    assert np.abs(bfloat16.astype(int) - cat).max() <= 1


def test_to_rgb_array_greyscale_and_other_modes(cat: np.ndarray):
    grey = np.array(Image.fromarray(cat).convert("L"))
    for picture in (grey, torch.from_numpy(grey), grey / 255.0, Image.fromarray(grey)):
        result = to_rgb_array(picture)
        assert result.shape == cat.shape
        for channel in range(3):
            np.testing.assert_array_equal(result[..., channel], grey)
    rgba = Image.fromarray(cat).convert("RGBA")
    np.testing.assert_array_equal(to_rgb_array(rgba), cat)


def test_to_rgb_array_returns_a_copy(cat: np.ndarray):
    array = cat.copy()
    result = to_rgb_array(array)
    result[:] = 0
    np.testing.assert_array_equal(array, cat)


@pytest.mark.parametrize(
    ("picture", "error", "message"),
    [
        (torch.rand(1, 3, 8, 8), ValueError, r"got shape \(1, 3, 8, 8\).*batch\[0\]"),
        (np.zeros((8, 8, 4), np.uint8), ValueError, r"\(H, W, 3\).*got shape \(8, 8, 4\)"),
        (np.zeros((8, 8, 3), np.int64), TypeError, "got dtype int64"),
        (torch.randn(3, 8, 8) * 3, ValueError, "Preset.unnormalize"),
        (np.full((8, 8), np.nan), ValueError, "NaN"),
        ([[0, 1], [1, 0]], TypeError, "got list"),
    ],
)
def test_to_rgb_array_refuses_other_input(picture, error, message):
    with pytest.raises(error, match=message):
        to_rgb_array(picture)


# colorize


def test_colorize_matches_matplotlib_jet(ramp: np.ndarray):
    colours = colorize(ramp)
    assert colours.shape == (7, 7, 3)
    assert colours.dtype == np.uint8
    np.testing.assert_array_equal(colorize(np.zeros((2, 3)))[1, 2], jet(0.0))
    np.testing.assert_array_equal(colorize(np.ones((2, 3)))[0, 0], jet(1.0))
    np.testing.assert_array_equal(jet(0.0), [0, 0, 127])  # dark blue ...
    np.testing.assert_array_equal(jet(1.0), [127, 0, 0])  # ... to dark red
    np.testing.assert_array_equal(colours[3, 3], jet(0.5))


def test_colorize_clips_and_takes_tensors(ramp: np.ndarray):
    np.testing.assert_array_equal(colorize(ramp * 3 - 1), colorize((ramp * 3 - 1).clip(0, 1)))
    np.testing.assert_array_equal(colorize(torch.from_numpy(ramp).float()), colorize(ramp))
    viridis = colorize(ramp, cmap="viridis")
    expected = matplotlib.colormaps["viridis"](ramp, bytes=True)[..., :3]
    np.testing.assert_array_equal(viridis, expected)


def test_colorize_errors(ramp: np.ndarray):
    with pytest.raises(ValueError, match=r"unknown colormap 'jett'; did you mean jet.*viridis"):
        colorize(ramp, cmap="jett")
    with pytest.raises(ValueError, match=r"2-D \(H, W\), got shape \(1, 7, 7\)"):
        colorize(ramp[None])
    with pytest.raises(ValueError, match="NaN"):
        colorize(np.full((2, 2), np.nan))


# overlay


def test_overlay_alpha_zero_is_the_image_and_one_is_the_colours(cat: np.ndarray):
    heatmap = np.random.default_rng(0).random(cat.shape[:2])

    only_image = overlay(cat, heatmap, alpha=0.0)
    only_colours = overlay(cat, heatmap, alpha=1.0)

    assert isinstance(only_image, Image.Image)
    assert only_image.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(only_image), cat)
    np.testing.assert_array_equal(np.asarray(only_colours), colorize(heatmap))


def test_overlay_blends(cat: np.ndarray):
    heatmap = np.random.default_rng(1).random(cat.shape[:2])
    blended = np.asarray(overlay(Image.fromarray(cat), heatmap, alpha=0.3, cmap="inferno"))
    expected = 0.7 * cat + 0.3 * colorize(heatmap, "inferno").astype(float)
    assert np.abs(blended - expected).max() <= 0.5 + 1e-9


def test_overlay_resizes_a_small_heatmap_to_the_image(cat: np.ndarray, ramp: np.ndarray):
    result = np.asarray(overlay(cat, torch.from_numpy(ramp), alpha=1.0))

    assert result.shape == cat.shape
    np.testing.assert_array_equal(result[150, 0], jet(0.0))  # left edge: cold
    np.testing.assert_array_equal(result[150, -1], jet(1.0))  # right edge: hot
    np.testing.assert_array_equal(result[0, 225], result[-1, 225])  # no vertical change
    # Values are interpolated before colouring: the middle column is jet(0.5), not a mix.
    np.testing.assert_array_equal(result[150, 225], jet(0.5))


def test_overlay_alpha_out_of_range(cat: np.ndarray, ramp: np.ndarray):
    with pytest.raises(ValueError, match=r"alpha must be in \[0, 1\].*got 1.5"):
        overlay(cat, ramp, alpha=1.5)


# figure_grid / save_figure


def test_figure_grid_layout_and_titles(cat: np.ndarray, ramp: np.ndarray):
    panels = [Image.fromarray(cat), overlay(cat, ramp), cat, Image.fromarray(data.coffee())]
    titles = ["photo", "overlay", "again", "coffee"]

    fig = figure_grid(panels, titles, rows=2, panel_size=2.0)

    assert isinstance(fig, Figure)
    assert len(fig.axes) == 4
    assert [ax.get_title() for ax in fig.axes] == titles
    assert all(not ax.axison for ax in fig.axes)
    assert fig.axes[0].get_subplotspec().get_geometry()[:2] == (2, 2)
    assert tuple(fig.get_size_inches()) == (4.0, 4.0)
    np.testing.assert_array_equal(fig.axes[2].images[0].get_array(), cat)


def test_figure_grid_fills_rows_left_to_right(cat: np.ndarray):
    fig = figure_grid([cat] * 5, rows=2)
    assert len(fig.axes) == 5
    assert fig.axes[0].get_subplotspec().get_geometry()[:2] == (2, 3)
    assert [ax.get_title() for ax in fig.axes] == [""] * 5
    assert tuple(fig.get_size_inches()) == pytest.approx((3 * 3.2, 2 * 3.2))


def test_figure_grid_errors(cat: np.ndarray):
    with pytest.raises(ValueError, match="2 panels but 1 titles"):
        figure_grid([cat, cat], ["only one"])
    with pytest.raises(ValueError, match=r"rows must be an int from 1 to the number of panels"):
        figure_grid([cat, cat], rows=3)
    with pytest.raises(ValueError, match="at least one picture"):
        figure_grid([])


def test_save_figure(tmp_path: Path, cat: np.ndarray):
    fig = figure_grid([cat, cat], ["a", "b"])

    written = save_figure(fig, tmp_path / "explained.png")

    assert written == tmp_path / "explained.png"
    assert written.read_bytes().startswith(b"\x89PNG")
    with Image.open(written) as saved:
        width, height = saved.size
    assert 400 < width < 2 * 3.2 * 100 + 50  # about 100 dpi, tight box
    assert 200 < height < 3.2 * 100 + 50
    assert save_figure(fig, tmp_path / "no_suffix") == tmp_path / "no_suffix.png"
    assert (tmp_path / "no_suffix.png").read_bytes().startswith(b"\x89PNG")
    assert save_figure(fig, str(tmp_path / "vector.pdf")).read_bytes().startswith(b"%PDF")


def test_save_figure_errors(tmp_path: Path, cat: np.ndarray):
    fig = figure_grid([cat])
    with pytest.raises(FileNotFoundError, match=r"directory .*missing does not exist"):
        save_figure(fig, tmp_path / "missing" / "out.png")
    assert not (tmp_path / "missing").exists()
    with pytest.raises(ValueError, match=r"does not write '\.xyz' files; use one of .*\.png"):
        save_figure(fig, tmp_path / "out.xyz")


# image_grid


def test_image_grid_places_panels(cat: np.ndarray):
    coffee = data.coffee()  # (400, 600, 3): larger than the cat
    grid = image_grid([cat, coffee, cat], rows=2, pad=4)

    assert grid.mode == "RGB"
    assert grid.size == (2 * 600 + 3 * 4, 2 * 400 + 3 * 4)
    pixels = np.asarray(grid)
    # The cat is centred in the first 600x400 cell; the coffee fills the second.
    top, left = 4 + (400 - 300) // 2, 4 + (600 - 451) // 2
    np.testing.assert_array_equal(pixels[top : top + 300, left : left + 451], cat)
    np.testing.assert_array_equal(pixels[4:404, 608:1208], coffee)
    assert (pixels[:4] == 255).all()  # white padding
    assert (pixels[412:, 612:] == 255).all()  # the empty fourth cell


def test_image_grid_errors(cat: np.ndarray):
    with pytest.raises(ValueError, match="pad must be a non-negative int"):
        image_grid([cat], pad=-1)
    with pytest.raises(ValueError, match="rows must be an int"):
        image_grid([cat], rows=0)
