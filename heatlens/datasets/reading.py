"""Reading a source's images for a run: hash, decode and preprocess, in DataLoader workers, so the
model never waits for the disk or the JPEG decoder.

Each item becomes a :class:`Loaded`: its content hash, its size and its input tensor, or the
reason it could not be used. An item whose hash the run already holds for every method is not
decoded at all (``skip``): resuming a run costs one read and one hash per finished image.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from heatlens.datasets.sources import Item, Source
from heatlens.loading.images import ImageError, load_image
from heatlens.loading.presets import Preset


@dataclass
class Loaded:
    """One item read: ``tensor`` the model's input and ``display`` the ``(H, W, 3)`` uint8
    picture it shows (for overlays), or ``error`` and ``kind`` when the item is unusable, or
    ``skip`` when the run already holds it."""

    item: Item
    sha256: str = ""
    width: int = 0
    height: int = 0
    tensor: Tensor | None = None
    display: np.ndarray | None = None
    label: str | None = None
    error: str = ""
    kind: str = ""
    skip: bool = False


class Reader(Dataset[Loaded]):
    """The items of a source as :class:`Loaded` records (see the module docstring).

    Args:
        source: where the items come from.
        items: the items to read (a shard of the source's, or all).
        preset: turns a PIL image into the model's input.
        done: ``name -> sha256`` of the items the run holds for every method.
        max_pixels: the largest image accepted (a guard against decompression bombs).
        displays: keep the picture the model saw, for overlays.
    """

    def __init__(self, source: Source, items: Sequence[Item], preset: Preset,
                 done: dict[str, str], max_pixels: int, displays: bool) -> None:
        self.source, self.items, self.preset = source, list(items), preset
        self.done, self.max_pixels, self.displays = done, max_pixels, displays

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> Loaded:
        item = self.items[index]
        try:
            return self._read(item)
        except ImageError as exc:
            return Loaded(item, error=" ".join(str(exc).split()), kind=exc.kind)
        except (OSError, ValueError, TypeError) as exc:
            return Loaded(item, error=" ".join(str(exc).split()) or type(exc).__name__,
                          kind="unreadable")

    def _read(self, item: Item) -> Loaded:
        if item.path is None:
            return self._dataset_item(item)
        data = item.path.read_bytes()
        sha = hashlib.sha256(data).hexdigest()
        if self.done.get(item.name) == sha:
            return Loaded(item, sha, skip=True)
        image = load_image(item.path, max_pixels=self.max_pixels)
        return self._prepared(item, sha, image)

    def _dataset_item(self, item: Item) -> Loaded:
        entry = self.source.dataset[item.position]
        image = entry[0] if isinstance(entry, tuple | list) else entry
        given = entry[1] if isinstance(entry, tuple | list) and len(entry) > 1 else None
        label = None if given is None else str(int(given))
        if isinstance(image, Image.Image):
            sha = hashlib.sha256(image.tobytes() + repr((image.mode, image.size)).encode())
            return self._prepared(item, sha.hexdigest(), image, label)
        if not isinstance(image, Tensor) or image.ndim != 3 or not image.is_floating_point():
            raise TypeError(f"Dataset item {item.position} is a {type(image).__name__}"
                            f"{tuple(image.shape) if isinstance(image, Tensor) else ''}; "
                            "yield a PIL image or a float (C, H, W) tensor")
        tensor = image.detach().cpu().contiguous()
        if not torch.isfinite(tensor).all():
            raise ImageError(f"Dataset item {item.position} holds NaN or infinite values",
                             "not finite")
        sha = hashlib.sha256(tensor.numpy().tobytes() + repr(tuple(tensor.shape)).encode())
        display = None
        if self.displays:
            low, high = tensor.amin(), tensor.amax()
            scaled = (tensor - low) / (high - low).clamp_min(1e-12)
            display = (scaled.movedim(0, -1)[..., :3] * 255).round().to(torch.uint8).numpy()
        return Loaded(item, sha.hexdigest(), tensor.shape[-1], tensor.shape[-2], tensor,
                      display, label=label)

    def _prepared(self, item: Item, sha: str, image: Image.Image,
                  label: str | None = None) -> Loaded:
        tensors, shown = self.preset(image)
        display = np.asarray(shown[0]) if self.displays else None
        return Loaded(item, sha, image.width, image.height, tensors[0], display,
                      label=item.label if label is None else label)


def batches(reader: Reader, batch_size: int, workers: int) -> DataLoader[Any]:
    """A DataLoader over ``reader`` giving lists of :class:`Loaded`, in order, with ``workers``
    processes decoding ahead of the model (0: in this process)."""
    collate: Callable[[list[Loaded]], list[Loaded]] = list
    return DataLoader(reader, batch_size=batch_size, shuffle=False, num_workers=workers,
                      collate_fn=collate, prefetch_factor=4 if workers else None,
                      persistent_workers=False)
