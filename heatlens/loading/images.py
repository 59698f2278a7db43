"""Load photos as upright 8-bit RGB images, refusing decompression bombs before decoding them.

Pillow's own decompression-bomb check is driven by the process-global
``PIL.Image.MAX_IMAGE_PIXELS``; :func:`load_image` replaces it with its ``max_pixels`` argument,
checked against the size in the file header before any pixel data is decoded, so one call can
accept a large image without loosening the limit for the rest of the process.
"""

from __future__ import annotations

import io
import os
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps

__all__ = ["ImageError", "load_image", "sample_image_path", "upright_rgb"]

DEFAULT_MAX_PIXELS = 89_478_485
"""Default ``max_pixels`` of :func:`load_image`: Pillow's default limit, about 0.25 GiB of RGBA."""

_SAMPLE_IMAGE = Path(__file__).parent.parent / "data" / "chelsea.jpg"

_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})

# Full-scale value of the high-bit-depth greyscale modes; see _high_depth_to_rgb.
_FULL_SCALE = {"I;16": 65535, "I;16L": 65535, "I;16B": 65535, "I;16N": 65535, "I": 65535, "F": 1.0}

# Serialises the rare moments in which Pillow's global limit is lifted (see _pillow_limit_lifted).
_PILLOW_LIMIT_LOCK = threading.Lock()


class ImageError(ValueError):
    """A file that cannot be used as an image; ``kind`` says why in a word or two:
    ``"not an image"``, ``"truncated"`` (damaged or cut short) or ``"too many pixels"``."""

    def __init__(self, message: str, kind: str) -> None:
        super().__init__(message)
        self.kind = kind


def sample_image_path() -> Path:
    """Return the path of the sample photo shipped with heatlens (a cat, ``data/chelsea.jpg``).

    The photo is scikit-image's ``chelsea`` (public domain); see ``heatlens/data/README.md``.
    """
    if not _SAMPLE_IMAGE.is_file():
        msg = (
            f"the sample image {_SAMPLE_IMAGE} is missing: heatlens was installed without its "
            "package data; reinstall it (pip install --force-reinstall heatlens)"
        )
        raise FileNotFoundError(msg)
    return _SAMPLE_IMAGE


def load_image(
    source: str | os.PathLike[str] | Image.Image | bytes,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> Image.Image:
    """Load an image file (or take a PIL image, or an encoded file's bytes) and return it
    upright, as 8-bit RGB.

    The image is turned by its EXIF orientation tag and converted to RGB as described in
    :func:`upright_rgb` (transparency composited on white, 16-bit greyscale scaled to 8 bits).
    The file is only read, never modified, and a PIL image passed in is not modified either.

    Args:
        source: Path of an image file in any format Pillow reads, a PIL image, or the bytes
            of such a file (an upload, read in memory and written nowhere).
        max_pixels: Largest ``width * height`` accepted. Files are checked against it from
            their header, before any pixel data is decoded, so a small file that claims an
            enormous size (a decompression bomb) cannot exhaust memory. Raise it to load
            larger images on purpose.

    Returns:
        A new RGB image, independent of the file.

    Raises:
        FileNotFoundError: If ``source`` is a path to no file.
        ImageError: (a ``ValueError``) If the file is not an image Pillow can read, cannot be
            decoded, or has more than ``max_pixels`` pixels.
        ValueError: If ``max_pixels`` is not positive.
        TypeError: If ``source`` is neither a path nor a PIL image.
    """
    if isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels < 1:
        msg = f"max_pixels must be a positive int, got {max_pixels!r}"
        raise ValueError(msg)
    if isinstance(source, Image.Image):
        _check_size(source.size, max_pixels, "the image")
        with _pillow_limit_lifted(source.size):
            return upright_rgb(source)
    if isinstance(source, bytes):
        opened: Path | io.BytesIO = io.BytesIO(source)
        path: Path | str = "the image data"
    elif isinstance(source, str | os.PathLike):
        opened = path = Path(source)
        if not path.exists():
            msg = f"no image at {path}: the file does not exist"
            raise FileNotFoundError(msg)
        if path.is_dir():
            msg = f"{path} is a directory, not an image file"
            raise ValueError(msg)
    else:
        msg = (
            f"load_image takes a file path, a PIL.Image.Image or bytes, got "
            f"{type(source).__name__}; for a numpy array use PIL.Image.fromarray(array) first"
        )
        raise TypeError(msg)

    with _open_header(opened, str(path)) as image:
        _check_size(image.size, max_pixels, str(path))
        try:
            with _pillow_limit_lifted(image.size):
                return upright_rgb(image)
        except (OSError, SyntaxError) as exc:  # Pillow's errors for truncated or corrupt data
            msg = f"{path} could not be decoded: the file is damaged or truncated ({exc})"
            raise ImageError(msg, "truncated") from exc


def upright_rgb(image: Image.Image) -> Image.Image:
    """Return a copy of ``image`` turned by its EXIF orientation tag and converted to 8-bit RGB.

    - Images with transparency (RGBA, LA, PA, and palette or RGB images with a transparent
      colour) are composited on a white background.
    - 16-bit greyscale (``I;16`` and relatives) is scaled from 0..65535 to 0..255, not clipped.
      32-bit ``I`` images are read as 16-bit when their values lie in 0..65535, ``F`` images
      as 0..1 when their values lie in 0..1; otherwise their own value range is stretched to
      0..255.
    - Every other mode (greyscale, palette, CMYK, YCbCr, ...) goes through Pillow's
      ``convert("RGB")``.

    ``image`` itself is not modified.
    """
    upright = ImageOps.exif_transpose(image)
    if upright.mode in _FULL_SCALE:
        return _high_depth_to_rgb(upright)
    if upright.mode in _ALPHA_MODES or "transparency" in upright.info:
        rgba = upright.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return upright.convert("RGB")


def _high_depth_to_rgb(image: Image.Image) -> Image.Image:
    values = np.asarray(image, dtype=np.float64)
    full_scale = _FULL_SCALE[image.mode]
    low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if low < 0 or high > full_scale:
        # No nominal range fits: stretch the image's own range (a constant image becomes black).
        values = values - low
        full_scale = max(high - low, np.finfo(np.float64).tiny)
    grey = np.rint(np.nan_to_num(values / full_scale * 255.0)).clip(0, 255).astype(np.uint8)
    return Image.fromarray(grey).convert("RGB")


def _check_size(size: tuple[int, int], max_pixels: int, what: str) -> None:
    width, height = size
    if width * height > max_pixels:
        msg = (
            f"{what} is {width}x{height} = {width * height:,} pixels, more than the limit of "
            f"{max_pixels:,} pixels (a guard against decompression bombs); if you trust the "
            f"file, pass a larger limit: load_image(..., max_pixels={width * height})"
        )
        raise ImageError(msg, "too many pixels")


@contextmanager
def _open_header(path: Path | io.BytesIO, name: str) -> Iterator[ImageFile.ImageFile]:
    """Open ``path`` (a file or bytes in memory, called ``name`` in messages) lazily (header
    only), with Pillow's own size check replaced by ours."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            try:
                image = Image.open(path)
            except Image.DecompressionBombError:
                # Pillow refuses even to read the header of images over twice its global limit.
                # Reading a header decodes no pixels, so lift the limit for that moment only;
                # the caller checks the size against max_pixels before decoding.
                if isinstance(path, io.BytesIO):
                    path.seek(0)
                with _pillow_limit_lifted(None):
                    image = Image.open(path)
    except (FileNotFoundError, PermissionError):
        raise
    except (OSError, SyntaxError) as exc:  # UnidentifiedImageError is an OSError
        detail = f" ({exc})" if isinstance(path, Path) else ""  # a BytesIO's repr says nothing
        msg = f"{name} is not an image Pillow can read{detail}"
        raise ImageError(msg, "not an image") from exc
    with image:
        yield image


@contextmanager
def _pillow_limit_lifted(size: tuple[int, int] | None) -> Iterator[None]:
    """Let Pillow handle an image of ``size`` (``None``: any size) without its own bomb check.

    Only when Pillow's global limit would refuse the image (more than twice
    ``Image.MAX_IMAGE_PIXELS``) is the limit lifted, under a lock, and restored on exit. Pillow's
    warning for images between one and two times its limit is silenced: our check already ran.
    """
    pillow_limit = Image.MAX_IMAGE_PIXELS
    needs_lifting = pillow_limit is not None and (
        size is None or size[0] * size[1] > 2 * pillow_limit
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        if not needs_lifting:
            yield
            return
        with _PILLOW_LIMIT_LOCK:
            saved = Image.MAX_IMAGE_PIXELS
            Image.MAX_IMAGE_PIXELS = None
            try:
                yield
            finally:
                Image.MAX_IMAGE_PIXELS = saved
