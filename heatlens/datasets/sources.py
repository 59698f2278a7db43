"""What a data-set run explains: the images of a folder, of a list file, or of a torch ``Dataset``,
each with its name in the run and its label where the source gives one.

* A **folder** is searched recursively for image files. When the folder holds images only in
  sub-folders, as torchvision's ``ImageFolder`` lays out a data set (``root/<class>/.../x.jpg``),
  the first sub-folder is the image's class; otherwise images have no label.
* A **list file** (``.csv`` or ``.txt``) has one image per line: a path (absolute, or relative to
  the list file's folder), optionally followed by a label (``path,label``; a first line
  ``path,label`` or ``path`` is a header).
* A **torch Dataset** (Python only) yields ``image`` or ``(image, label)``, the image a PIL image
  or a preprocessed ``(C, H, W)`` tensor; its items are named by their index.

A label is a class name or a class index. :meth:`Source.class_index` turns it into the model's
index: an integer as it is, a name by the model's class names, and, for a model without names
(one trained on the folder), by the sorted order of the folder names, as ``ImageFolder``
numbers them.
"""

from __future__ import annotations

import csv
import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm",
                  ".pgm")
"""File name endings taken as images when a folder is searched (case-insensitive)."""

SourceLike = str | os.PathLike[str] | Any
"""A folder, a ``.csv``/``.txt`` list of images, or a torch ``Dataset``."""


@dataclass(frozen=True)
class Item:
    """One image of a source.

    Attributes:
        name: the image's name in the run: its path relative to the source folder (or to the
            list file's folder; the path as written when it lies elsewhere), with ``/``; for a
            Dataset, the item's index.
        path: the file to read, or ``None`` for a Dataset item.
        label: the class name or index the source gives, or ``None``.
        position: the item's index in the Dataset (``-1`` for files).
    """

    name: str
    path: Path | None
    label: str | None
    position: int = -1


@dataclass(frozen=True)
class Source:
    """The images of a source, in a fixed order (sorted by name for files)."""

    description: str
    items: tuple[Item, ...]
    dataset: Any = None
    folder_classes: tuple[str, ...] = ()

    def class_index(self, label: str | None, labels: Sequence[str] | None, *,
                    strict: bool = False) -> int | None:
        """The model's class index for ``label`` (see the module docstring); ``None`` for no
        label, or for a name that is not a class of the model (``strict``: an error).

        Raises:
            ValueError: with ``strict``, a label that is neither an index, a name the model
                knows, nor (for a model without names) one of the source's class folders.
        """
        if label is None:
            return None
        text = str(label).strip()
        if text.lstrip("-").isdigit():
            return int(text)
        if labels is not None and text in labels:
            return list(labels).index(text)
        if labels is None and text in self.folder_classes:
            return self.folder_classes.index(text)
        if strict:
            raise ValueError(f"the label {text!r} is not a class index and not one of the "
                             "model's class names; give --labels with the names the folders "
                             "use, or write indices")
        return None


def open_source(source: SourceLike) -> Source:
    """The images of ``source`` (see the module docstring).

    Raises:
        FileNotFoundError: no file or folder at ``source``.
        ValueError: a folder with no image, an empty list, a list that names missing files,
            or a file that is neither a folder, a list nor a Dataset.
    """
    if not isinstance(source, str | os.PathLike):
        return _dataset_source(source)
    path = Path(source)
    if path.is_dir():
        return _folder_source(path)
    if not path.exists():
        raise FileNotFoundError(f"no folder or list of images at {path}")
    if path.suffix.lower() in (".csv", ".txt"):
        return _list_source(path)
    raise ValueError(f"{path} is neither a folder nor a list of images (.csv or .txt); point "
                     "at the folder that holds the images")


def _folder_source(folder: Path) -> Source:
    files = sorted(p for p in folder.rglob("*")
                   if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise ValueError(f"the folder {folder} holds no image ({', '.join(IMAGE_SUFFIXES)})")
    names = [p.relative_to(folder).as_posix() for p in files]
    by_class = all("/" in name for name in names)
    classes = tuple(sorted({name.split("/", 1)[0] for name in names})) if by_class else ()
    items = tuple(Item(name, path, name.split("/", 1)[0] if by_class else None)
                  for name, path in zip(names, files, strict=True))
    return Source(str(folder), items, folder_classes=classes)


def _list_source(file: Path) -> Source:
    items = []
    with file.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.reader(handle)) if file.suffix.lower() == ".csv" else [
            [line.rstrip("\r\n")] for line in handle]
    for number, row in enumerate(rows, start=1):
        if not row or not row[0].strip():
            continue
        if number == 1 and row[0].strip().lower() == "path":
            continue
        if len(row) > 2:
            raise ValueError(f"line {number} of {file} has {len(row)} fields; write path or "
                             "path,label")
        written = row[0].strip()
        path = Path(written) if Path(written).is_absolute() else file.parent / written
        label = row[1].strip() if len(row) == 2 and row[1].strip() else None
        try:
            name = path.resolve().relative_to(file.parent.resolve()).as_posix()
        except ValueError:
            name = written
        items.append(Item(name, path, label))
    if not items:
        raise ValueError(f"the list {file} names no image")
    names = [item.name for item in items]
    if len(set(names)) < len(names):
        twice = next(n for n in names if names.count(n) > 1)
        raise ValueError(f"the list {file} names {twice!r} twice; each image once")
    return Source(str(file), tuple(items))


def _dataset_source(dataset: Any) -> Source:
    if not (hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__")):
        raise TypeError(f"a source is a folder, a .csv/.txt list or a torch Dataset (with "
                        f"__getitem__ and __len__), got {type(dataset).__name__}")
    count = len(dataset)
    if count == 0:
        raise ValueError("the Dataset is empty")
    width = len(str(count - 1))
    items = tuple(Item(str(i).zfill(width), None, None, i) for i in range(count))
    return Source(type(dataset).__name__, items, dataset=dataset)


def shard(items: Sequence[Item], part: int, parts: int) -> list[Item]:
    """The items of shard ``part`` (1-based) of ``parts``: those whose name hashes to it, so an
    image stays in its shard when others are added or removed."""
    if not 1 <= part <= parts:
        raise ValueError(f"--shard {part}/{parts}: K must lie in 1..{parts}")
    return [item for item in items
            if int(hashlib.sha1(item.name.encode()).hexdigest()[:8], 16) % parts == part - 1]


def parse_shard(text: str) -> tuple[int, int]:
    """``"K/N"`` as ``(K, N)``, checked."""
    try:
        part, parts = (int(v) for v in text.split("/"))
    except ValueError:
        raise ValueError(f"--shard {text!r}: write K/N, for example 1/4") from None
    if parts < 1 or not 1 <= part <= parts:
        raise ValueError(f"--shard {text}: K must lie in 1..N and N be at least 1")
    return part, parts
