"""The result of an explanation: raw and scaled maps, what was explained, and pictures of it."""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image
from torch import Tensor

from heatlens.engine.targets import NO_CLASS


@dataclass(frozen=True, eq=False)
class Explanation:
    """Maps for a batch of ``B`` inputs and what they explain.

    Attributes:
        maps: ``(B, *input_spatial)`` float32 in [0, 1] at the input's resolution: the raw map after
            the method's visible post-processing (ReLU for CAMs, upsampling, min-max scaling,
            fusion of several layers). A constant map is all zeros.
        raw_by_layer: for each layer, the signed, unscaled ``(B, *feature_spatial)`` map at the
            layer's own resolution, before any ReLU.
        targets: ``(B,)`` long, the class explained per image (``-1`` where the target has none).
        scores: ``(B,)`` the target score per image (the value whose evidence is shown).
        probabilities: ``(B,)`` softmax probability of the target class, where the model returns
            ``(B, num_classes)`` scores and the target is a class; otherwise ``None``.
        layers: the resolved layer names, in order.
        method: the method's registry name.
        layer_reason: how the layers were chosen (for ``layer="auto"``: which and why).
        output: the model's score tensor for the batch, detached.
        details: what a method reports beyond the maps, by name (integrated gradients:
            ``"convergence_delta"``, ``(B,)``; CAM methods: ``"followed_by"``, the functional
            activation taken as part of a layer, and ``"token_layout"`` on transformers).
    """

    maps: Tensor
    raw_by_layer: dict[str, Tensor]
    targets: Tensor
    scores: Tensor
    probabilities: Tensor | None
    layers: tuple[str, ...]
    method: str
    layer_reason: str = ""
    output: Tensor | None = field(default=None, repr=False)
    details: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def raw(self) -> Tensor | tuple[Tensor, ...]:
        """The signed unscaled map at feature resolution; a tuple in ``layers`` order when the
        explanation used several layers (their resolutions differ)."""
        maps = tuple(self.raw_by_layer[name] for name in self.layers)
        return maps[0] if len(maps) == 1 else maps

    @property
    def attributions(self) -> Tensor | None:
        """The signed attribution of every input element, ``(B, C, *input_spatial)``, for a pixel
        attribution method (saliency, integrated gradients, occlusion, ...); ``None`` for a
        map over positions (CAM methods, FullGrad, attention methods)."""
        raw = self.raw_by_layer.get("input")
        return raw if raw is not None and raw.ndim == self.maps.ndim + 1 else None

    def __len__(self) -> int:
        return self.maps.shape[0]

    def title(self, index: int = 0, labels: Sequence[str] | None = None) -> str:
        """A one-line caption: method, class (label where known) and probability or score."""
        cls = int(self.targets[index])
        parts = [self.method]
        if cls != NO_CLASS:
            known = labels is not None and cls < len(labels)
            parts.append(labels[cls] if known else f"class {cls}")
        if self.probabilities is not None:
            parts.append(f"{float(self.probabilities[index]):.2f}")
        elif not self.scores[index].isnan():  # NaN: no target (Eigen-CAM on a detector)
            parts.append(f"score {float(self.scores[index]):.3g}")
        return " | ".join(parts)

    def heatmap(self, index: int = 0, cmap: str = "jet") -> Image.Image:
        """Map ``index`` coloured with a matplotlib colormap."""
        from heatlens.pictures.overlays import colorize, picture_maps

        return Image.fromarray(colorize(picture_maps(self.maps, index), cmap))

    def overlay(self, image: Any, index: int = 0, alpha: float = 0.5, cmap: str = "jet"
                ) -> Image.Image:
        """Map ``index`` blended over ``image`` (PIL image, array or tensor in [0, 1]):
        ``(1 - alpha) * image + alpha * colormap(map)``, the map resized to the image."""
        from heatlens.pictures.overlays import overlay, picture_maps

        return overlay(image, picture_maps(self.maps, index), alpha=alpha, cmap=cmap)

    def save(self, path: str | Path, image: Any | Sequence[Any] | None = None, *,
             alpha: float = 0.5, cmap: str = "jet", rows: int = 1,
             labels: Sequence[str] | None = None) -> Path:
        """Write a figure of all maps to ``path`` (format from the suffix) and return the path.

        With ``image`` (one image, or one per map) each panel is an overlay; without, the coloured
        map. Each panel is titled with :meth:`title`.
        """
        from heatlens.pictures.overlays import figure_grid, save_figure

        if image is None:
            panels = [self.heatmap(i, cmap) for i in range(len(self))]
        else:
            images = list(image) if isinstance(image, list | tuple) else [image] * len(self)
            if len(images) != len(self):
                raise ValueError(f"got {len(images)} images for {len(self)} maps; pass one per map")
            panels = [self.overlay(img, i, alpha, cmap) for i, img in enumerate(images)]
        titles = [self.title(i, labels) for i in range(len(self))]
        return save_figure(figure_grid(panels, titles, rows=rows), path)

    def _repr_png_(self) -> bytes | None:
        from heatlens.pictures.overlays import image_grid

        if self.maps.ndim != 3:
            return None
        buffer = io.BytesIO()
        image_grid([self.heatmap(i) for i in range(len(self))]).save(buffer, format="PNG")
        return buffer.getvalue()
