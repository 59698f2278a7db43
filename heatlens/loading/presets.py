"""Preprocessing presets: the exact resize, crop and normalisation a model expects.

A :class:`Preset` gives both the normalised tensor the model sees and the *display image*, the
resized and cropped picture with exactly that geometry, so a heatmap computed on the tensor
overlays the display image pixel for pixel.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from PIL import Image
from torch import Tensor
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F

from heatlens.loading.images import upright_rgb

__all__ = ["IMAGENET", "Preset"]

_INTERPOLATIONS = tuple(mode.value for mode in InterpolationMode)


@dataclass(frozen=True)
class Preset:
    """Resize the shorter side to ``resize``, center-crop ``crop`` x ``crop``, then normalise.

    This is the ``ImageClassification`` preprocessing of torchvision's pretrained weights
    (``Weights.transforms()``), and gives the same tensor for the same PIL image.

    Attributes:
        resize: Length, in pixels, of the shorter image side after resizing.
        crop: Side, in pixels, of the square cut from the centre of the resized image.
        mean: Per-channel mean (RGB, on the 0..1 scale) subtracted in normalisation.
        std: Per-channel standard deviation (RGB) divided by in normalisation.
        interpolation: Resampling filter of the resize, a
            ``torchvision.transforms.InterpolationMode`` value such as ``"bilinear"``
            (antialiased).
    """

    resize: int
    crop: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bilinear"

    def __post_init__(self) -> None:
        for name in ("resize", "crop"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                msg = f"Preset {name} must be a positive int (pixels), got {value!r}"
                raise ValueError(msg)
        if self.crop > self.resize:
            msg = (
                f"Preset crop ({self.crop}) is larger than resize ({self.resize}): the crop would "
                f"run past the resized image; use crop <= resize"
            )
            raise ValueError(msg)
        for name in ("mean", "std"):
            value = getattr(self, name)
            if not isinstance(value, Sequence) or len(value) != 3:
                msg = f"Preset {name} needs one value per RGB channel (3), got {value!r}"
                raise ValueError(msg)
            # Store a tuple of floats even when given a list, so the preset stays hashable.
            object.__setattr__(self, name, tuple(float(v) for v in value))
        if any(s <= 0 for s in self.std):
            msg = f"Preset std values must all be positive, got {self.std!r}"
            raise ValueError(msg)
        if self.interpolation not in _INTERPOLATIONS:
            msg = (
                f"unknown Preset interpolation {self.interpolation!r}; "
                f"use one of {', '.join(_INTERPOLATIONS)}"
            )
            raise ValueError(msg)

    def display(self, image: Image.Image) -> Image.Image:
        """Return ``image`` resized and center-cropped exactly as the model sees it.

        The image is first turned upright by its EXIF orientation and converted to RGB
        (:func:`heatlens.loading.images.upright_rgb`). The result is ``crop`` x ``crop`` pixels.
        """
        if not isinstance(image, Image.Image):
            msg = (
                f"Preset takes PIL images, got {type(image).__name__}; "
                "load files with heatlens.loading.images.load_image(path)"
            )
            raise TypeError(msg)
        resized = F.resize(
            upright_rgb(image),
            [self.resize],
            interpolation=InterpolationMode(self.interpolation),
            antialias=True,
        )
        return F.center_crop(resized, [self.crop])

    def tensor(self, image: Image.Image) -> Tensor:
        """Return the normalised ``(3, crop, crop)`` float32 tensor of ``image`` for the model."""
        return self._normalize(F.pil_to_tensor(self.display(image)))

    def __call__(
        self, images: Image.Image | Sequence[Image.Image]
    ) -> tuple[Tensor, list[Image.Image]]:
        """Preprocess one image or a sequence of images.

        Returns:
            The batch ``(B, 3, crop, crop)`` of normalised float32 tensors and the display
            images (see :meth:`display`), in the same order.
        """
        batch = [images] if isinstance(images, Image.Image) else list(images)
        if not batch:
            msg = "Preset got an empty sequence of images; pass at least one PIL image"
            raise ValueError(msg)
        displays = [self.display(image) for image in batch]
        tensors = torch.stack([self._normalize(F.pil_to_tensor(d)) for d in displays])
        return tensors, displays

    def boxes(self, boxes: Tensor, image_size: tuple[int, int]) -> Tensor:
        """Boxes ``(n, 4)`` as x1, y1, x2, y2 in the pixels of an upright image of
        ``image_size`` ``(width, height)``, moved to the pixels of :meth:`display`'s crop (resized
        and cropped by torchvision's own box transforms, clamped to the crop; a box outside the
        crop becomes empty)."""
        from torchvision import tv_tensors

        width, height = image_size
        boxed = tv_tensors.BoundingBoxes(torch.as_tensor(boxes, dtype=torch.float32),
                                         format="XYXY", canvas_size=(height, width))
        resized = F.resize(boxed, [self.resize],
                           interpolation=InterpolationMode(self.interpolation), antialias=True)
        return F.center_crop(resized, [self.crop]).as_subclass(Tensor)

    def mask(self, mask: Tensor) -> Tensor:
        """An object mask ``(H, W)`` bool in the pixels of the upright image, moved to the pixels
        of :meth:`display`'s crop (resized with nearest-neighbour sampling, then cropped), so it
        lies on the model's input as the object does."""
        resized = F.resize(torch.as_tensor(mask)[None].to(torch.uint8), [self.resize],
                           interpolation=InterpolationMode.NEAREST)
        return F.center_crop(resized, [self.crop])[0].bool()

    def unnormalize(self, batch: Tensor) -> Tensor:
        """Undo the normalisation of a ``(3, H, W)`` or ``(B, 3, H, W)`` tensor.

        Returns:
            The tensor on the 0..1 scale, clamped to that range.
        """
        if batch.ndim not in (3, 4) or batch.shape[-3] != 3:
            msg = (
                "unnormalize expects a (3, H, W) or (B, 3, H, W) tensor, "
                f"got shape {tuple(batch.shape)}"
            )
            raise ValueError(msg)
        mean, std = self._stats(batch)
        return (batch * std + mean).clamp(0.0, 1.0)

    def _normalize(self, pixels: Tensor) -> Tensor:
        values = pixels.to(torch.float32) / 255.0
        mean, std = self._stats(values)
        return (values - mean) / std

    def _stats(self, like: Tensor) -> tuple[Tensor, Tensor]:
        dtype = like.dtype if like.is_floating_point() else torch.float32
        mean = torch.tensor(self.mean, dtype=dtype, device=like.device).view(3, 1, 1)
        std = torch.tensor(self.std, dtype=dtype, device=like.device).view(3, 1, 1)
        return mean, std


IMAGENET = Preset(resize=256, crop=224, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
"""ImageNet preprocessing of torchvision's classification weights: 256 resize, 224 crop."""
