"""Where the objects are: box files (CSV or JSON) and mask folders, read for ``heatlens compare``
and ``heatlens audit``.

* Boxes: a CSV of rows ``path,x1,y1,x2,y2`` (a first line ``path,...`` is a header; several
  rows per image allowed) or a JSON object ``{path: [[x1, y1, x2, y2], ...]}``, in the pixels
  of the upright image; ``path`` as given on the command line or relative to the folder.
* Masks: a folder mirroring the images' folder, one PNG per image (``a/b.jpg`` ->
  ``a/b.png``), non-zero on the object, the size of the image.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
from PIL import Image


def read_boxes(file: Path) -> dict[str, list[list[float]]]:
    """The boxes of a CSV or JSON file by image name, in file order.

    Raises:
        FileNotFoundError: no file.
        ValueError: a malformed line or JSON, with its place and the format expected.
    """
    if not file.is_file():
        raise FileNotFoundError(f"no boxes file at {file}")
    found: dict[str, list[list[float]]] = {}
    if file.suffix.lower() == ".json":
        try:
            data = json.loads(file.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"the boxes file {file} is not valid JSON ({exc})") from None
        if not isinstance(data, dict):
            raise ValueError(f"the boxes file {file} must hold an object {{path: [[x1, y1, x2, "
                             "y2], ...]}}")
        for name, boxes in data.items():
            try:
                found[str(name)] = [[float(v) for v in box] for box in boxes]
            except (TypeError, ValueError):
                raise ValueError(f"the boxes of {name!r} in {file} are not lists of four "
                                 "numbers") from None
        return found
    with file.open(newline="", encoding="utf-8") as handle:
        for number, row in enumerate(csv.reader(handle), start=1):
            if not row or (number == 1 and row[0].strip().lower() == "path"):
                continue
            if len(row) != 5:
                raise ValueError(f"line {number} of {file} has {len(row)} fields; write "
                                 "path,x1,y1,x2,y2")
            try:
                box = [float(v) for v in row[1:]]
            except ValueError:
                raise ValueError(f"line {number} of {file}: the coordinates are not "
                                 "numbers") from None
            found.setdefault(row[0].strip(), []).append(box)
    return found


def mask_path(folder: Path, name: str) -> Path:
    """The mask file of the image called ``name`` (relative to its source folder)."""
    return folder / Path(name).with_suffix(".png")


def read_mask(file: Path, size: tuple[int, int]) -> np.ndarray:
    """A mask PNG as a ``(H, W)`` bool array, checked against the image's ``size`` ``(W, H)``.

    Raises:
        FileNotFoundError: no mask for the image.
        ValueError: a mask of another size than the image, or with no object pixel.
    """
    if not file.is_file():
        raise FileNotFoundError(f"no mask at {file}")
    with Image.open(file) as image:
        if image.size != size:
            raise ValueError(f"the mask {file} is {image.size[0]}x{image.size[1]}, the image "
                             f"{size[0]}x{size[1]}: a mask must have the image's size")
        mask = np.asarray(image.convert("L")) > 0
    if not mask.any():
        raise ValueError(f"the mask {file} marks no object pixel")
    return mask
