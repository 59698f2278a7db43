"""Tests of heatlens.loading.images: loading real photos upright as 8-bit RGB, safely."""

from __future__ import annotations

import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile
from skimage import data

from heatlens.loading.images import load_image, sample_image_path, upright_rgb

ORIENTATION = 0x0112  # EXIF tag number of Orientation


@pytest.fixture(scope="module")
def chelsea() -> np.ndarray:
    return data.chelsea()


def _png_bomb(path: Path, side: int) -> Path:
    """Write a valid 1-bit PNG of side x side black pixels: a few KB claiming a huge size."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        crc = zlib.crc32(kind + payload) & 0xFFFFFFFF
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)

    row = b"\0" * (1 + (side + 7) // 8)  # filter byte + packed bits
    compressor = zlib.compressobj(1)
    pixels = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)  # 1 bit, greyscale
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")
    )
    return path


def test_loads_a_photo_as_rgb_without_changing_the_file(tmp_path: Path, chelsea: np.ndarray):
    path = tmp_path / "cat.png"
    Image.fromarray(chelsea).save(path)
    before = path.read_bytes()

    image = load_image(path)

    assert image.mode == "RGB"
    assert image.size == (chelsea.shape[1], chelsea.shape[0])
    np.testing.assert_array_equal(np.asarray(image), chelsea)
    assert path.read_bytes() == before
    # The result is independent of the file: it survives the file's removal.
    path.unlink()
    assert image.getpixel((10, 10)) == tuple(chelsea[10, 10])


def test_accepts_str_paths(tmp_path: Path, chelsea: np.ndarray):
    path = tmp_path / "cat.png"
    Image.fromarray(chelsea).save(path)
    np.testing.assert_array_equal(np.asarray(load_image(str(path))), chelsea)


def test_exif_orientation_is_applied(tmp_path: Path, chelsea: np.ndarray):
    path = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[ORIENTATION] = 6  # "rotate 90 degrees clockwise to display"
    Image.fromarray(chelsea).save(path, quality=95, exif=exif)
    before = path.read_bytes()

    image = load_image(path)

    height, width = chelsea.shape[:2]
    assert image.size == (height, width)  # portrait now
    clockwise = np.rot90(chelsea, k=-1).astype(float)
    counterclockwise = np.rot90(chelsea, k=1).astype(float)
    loaded = np.asarray(image).astype(float)
    assert np.abs(loaded - clockwise).mean() < 4  # JPEG noise only
    assert np.abs(loaded - counterclockwise).mean() > 20
    assert path.read_bytes() == before
    # Loading the upright result again does not turn it a second time.
    assert load_image(image).size == (height, width)


def test_transparent_pixels_become_white(tmp_path: Path, chelsea: np.ndarray):
    rgba = np.dstack([chelsea, np.full(chelsea.shape[:2], 255, np.uint8)])
    rgba[:50, :, 3] = 0  # fully transparent top band
    rgba[50:100, :, 3] = 128  # half transparent band
    path = tmp_path / "cat.png"
    Image.fromarray(rgba).save(path)

    result = np.asarray(load_image(path)).astype(int)

    assert (result[:50] == 255).all()
    expected_half = chelsea[50:100].astype(int) * 128 / 255 + 255 * 127 / 255
    assert np.abs(result[50:100] - expected_half).max() <= 1
    np.testing.assert_array_equal(result[100:], chelsea[100:])


def test_greyscale_with_alpha_and_palette_transparency(tmp_path: Path, chelsea: np.ndarray):
    grey = np.asarray(Image.fromarray(chelsea).convert("L"))
    alpha = np.zeros_like(grey)
    alpha[:, 40:] = 255  # left 40 columns transparent
    Image.merge("LA", [Image.fromarray(grey), Image.fromarray(alpha)]).save(tmp_path / "la.png")
    result = np.asarray(load_image(tmp_path / "la.png"))
    assert (result[:, :40] == 255).all()
    np.testing.assert_array_equal(result[:, 40:, 0], grey[:, 40:])

    palette = Image.fromarray(chelsea).quantize(16)
    transparent_index = palette.getpixel((0, 0))
    palette.save(tmp_path / "p.png", transparency=transparent_index)
    result = np.asarray(load_image(tmp_path / "p.png"))
    mask = np.asarray(palette) == transparent_index
    assert mask.any() and not mask.all()
    assert (result[mask] == 255).all()
    opaque = np.asarray(palette.convert("RGB"))[~mask]
    np.testing.assert_array_equal(result[~mask], opaque)


def test_greyscale_and_cmyk_become_rgb(tmp_path: Path, chelsea: np.ndarray):
    grey = Image.fromarray(chelsea).convert("L")
    grey.save(tmp_path / "grey.png")
    result = np.asarray(load_image(tmp_path / "grey.png"))
    assert result.shape == (*chelsea.shape[:2], 3)
    for channel in range(3):
        np.testing.assert_array_equal(result[..., channel], np.asarray(grey))

    Image.fromarray(chelsea).convert("CMYK").save(tmp_path / "cmyk.jpg", quality=95)
    result = load_image(tmp_path / "cmyk.jpg")
    assert result.mode == "RGB"
    assert np.abs(np.asarray(result).astype(float) - chelsea).mean() < 5


def test_16_bit_greyscale_is_scaled_not_clipped(tmp_path: Path, chelsea: np.ndarray):
    grey8 = np.asarray(Image.fromarray(chelsea).convert("L"))
    grey16 = grey8.astype(np.uint16) * 257  # 0..255 -> 0..65535
    path = tmp_path / "deep.png"
    Image.fromarray(grey16).save(path)
    assert Image.open(path).mode.startswith("I")

    result = np.asarray(load_image(path))

    np.testing.assert_array_equal(result[..., 1], grey8)
    # A 16-bit mid grey is mid grey, not clipped to white.
    Image.fromarray(np.full((4, 4), 32768, np.uint16)).save(path)
    assert (np.asarray(load_image(path)) == 128).all()


def test_32_bit_and_float_greyscale(chelsea: np.ndarray):
    grey8 = np.asarray(Image.fromarray(chelsea).convert("L"))
    as_i = Image.fromarray(grey8.astype(np.int32) * 257)
    assert as_i.mode == "I"
    np.testing.assert_array_equal(np.asarray(load_image(as_i))[..., 0], grey8)
    as_f = Image.fromarray(grey8.astype(np.float32) / 255)
    assert as_f.mode == "F"
    np.testing.assert_array_equal(np.asarray(load_image(as_f))[..., 2], grey8)
    # Values outside any nominal range: the image's own range is stretched to 0..255.
    stretched = np.asarray(load_image(Image.fromarray(grey8.astype(np.float32) * 1000 - 7)))
    assert stretched.min() == 0 and stretched.max() == 255


def test_pil_input_is_not_modified(chelsea: np.ndarray):
    rgba = Image.fromarray(np.dstack([chelsea, np.zeros(chelsea.shape[:2], np.uint8)]))
    before = np.asarray(rgba).copy()

    result = load_image(rgba)

    assert result is not rgba
    assert (np.asarray(result) == 255).all()
    assert rgba.mode == "RGBA"
    np.testing.assert_array_equal(np.asarray(rgba), before)
    rgb = Image.fromarray(chelsea)
    assert load_image(rgb) is not rgb


def test_too_many_pixels_is_refused_and_the_limit_can_be_raised(tmp_path: Path):
    path = tmp_path / "small.png"
    Image.fromarray(data.coffee()[:20, :20]).save(path)

    with pytest.raises(ValueError, match=r"20x20 = 400 pixels.*limit of 100 .*max_pixels=400"):
        load_image(path, max_pixels=100)
    assert load_image(path, max_pixels=400).size == (20, 20)
    assert load_image(path).size == (20, 20)
    with pytest.raises(ValueError, match="limit of 100"):
        load_image(Image.open(path), max_pixels=100)


def test_decompression_bomb_is_refused_before_decoding(tmp_path: Path, monkeypatch):
    path = _png_bomb(tmp_path / "bomb.png", 20000)
    assert path.stat().st_size < 1_000_000  # 1.2 GB once decoded to RGB

    def no_decoding(self):
        raise AssertionError("pixel data was decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Pillow's own warning must not leak out either
        with pytest.raises(ValueError, match=r"20000x20000 = 400,000,000 pixels.*max_pixels="):
            load_image(path)


def test_pillow_global_limit_is_neither_in_the_way_nor_changed(tmp_path: Path, monkeypatch):
    coffee = data.coffee()[:30, :30]
    path = tmp_path / "coffee.png"
    Image.fromarray(coffee).save(path)  # 900 pixels
    # Shrink Pillow's process-wide limit so that this photo is a "bomb" to Pillow itself.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(Image.DecompressionBombError):
        Image.open(path)

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        image = load_image(path, max_pixels=1000)
    np.testing.assert_array_equal(np.asarray(image), coffee)
    assert Image.MAX_IMAGE_PIXELS == 100
    with pytest.raises(ValueError, match="limit of 800"):
        load_image(path, max_pixels=800)
    assert Image.MAX_IMAGE_PIXELS == 100


def test_missing_file(tmp_path: Path):
    missing = tmp_path / "nowhere.jpg"
    with pytest.raises(FileNotFoundError, match=r"nowhere\.jpg"):
        load_image(missing)


def test_not_an_image(tmp_path: Path):
    path = tmp_path / "notes.jpg"
    path.write_text("these are not pixels\n")
    with pytest.raises(ValueError, match=r"notes\.jpg is not an image Pillow can read \("):
        load_image(path)
    with pytest.raises(ValueError, match="is a directory"):
        load_image(tmp_path)


def test_truncated_file(tmp_path: Path, chelsea: np.ndarray):
    path = tmp_path / "cut.jpg"
    Image.fromarray(chelsea).save(path, quality=90)
    path.write_bytes(path.read_bytes()[:3000])
    with pytest.raises(ValueError, match=r"cut\.jpg could not be decoded"):
        load_image(path)


def test_bad_arguments(chelsea: np.ndarray):
    with pytest.raises(TypeError, match=r"PIL.Image.fromarray"):
        load_image(chelsea)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_pixels must be a positive int"):
        load_image(Image.fromarray(chelsea), max_pixels=0)


def test_upright_rgb_keeps_rgb_pixels(chelsea: np.ndarray):
    np.testing.assert_array_equal(np.asarray(upright_rgb(Image.fromarray(chelsea))), chelsea)


def test_sample_image_is_chelsea(chelsea: np.ndarray):
    path = sample_image_path()
    assert path.name == "chelsea.jpg"
    assert path.is_file()
    assert (path.parent / "README.md").is_file()
    image = load_image(path)
    assert image.size == (451, 300)
    assert np.abs(np.asarray(image).astype(float) - chelsea).mean() < 3
