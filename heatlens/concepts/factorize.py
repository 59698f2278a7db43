"""Deep Feature Factorization: the concepts a layer found in images, where they are, what they are.

Collins, Achanta and Süsstrunk, "Deep Feature Factorization for Concept Discovery", ECCV 2018
(Sec. 3): the activations of one layer over ``B`` images, ``A ∈ R^{N x C}`` with one row per
spatial position (``N = B · h · w``) and one column per channel, are non-negative after a ReLU,
and their non-negative matrix factorization ``A ≈ W H`` with ``k`` components splits them into

- ``H ∈ R^{k x C}``, ``H ≥ 0``: ``k`` concept embeddings, each a pattern of channel activity;
- ``W ∈ R^{N x k}``, ``W ≥ 0``: how strongly each concept is present at each position, which
  reshaped to ``(B, k, h, w)`` gives one heatmap per concept and image.

The factorization is shared by the whole batch, so a concept found in one image is looked for in
all of them. As in pytorch-grad-cam's ``DeepFeatureFactorization``, a concept is named by passing
its embedding through the model's classifier head (the part after global pooling), as if an image
held nothing but that concept everywhere.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from math import prod
from pathlib import Path
from typing import Any

import torch
from matplotlib.figure import Figure
from PIL import Image
from torch import Tensor, nn

from heatlens.concepts.nmf import check_int, nmf
from heatlens.engine.capture import forward_with_capture
from heatlens.engine.entry import OutputKey, entered, model_to_explain
from heatlens.engine.heads import find_head, head_candidates
from heatlens.engine.layers import LayerSpec, module_by_name, resolve_layers
from heatlens.engine.maps import upsample
from heatlens.engine.notices import warn
from heatlens.engine.targets import primary_output
from heatlens.engine.tokens import as_map, layer_layout
from heatlens.pictures.overlays import ImageLike, picture_maps

__all__ = ["Concepts", "factorize"]

HeadSpec = str | nn.Module | Callable[[Tensor], Tensor] | None
"""The classifier head: ``"auto"``, a module name, a module or callable ``(k, C) -> (k, K)``
scores, or ``None`` for no labels."""



@dataclass(frozen=True, eq=False)
class Concepts:
    """What :func:`factorize` found: ``k`` concepts shared by a batch of ``B`` images.

    Attributes:
        maps: ``(B, k, *input_spatial)`` float32 in [0, 1]: ``raw`` upsampled (bilinear) to the
            input's size.
        raw: ``(B, k, *feature_spatial)``: ``W`` of the factorization at the layer's resolution,
            each concept scaled to a maximum of 1 over the batch (no other scaling).
        embeddings: ``(k, C)``: ``H``, each concept's channel vector at its strongest position.
        scores: ``(k, K)`` the classifier head's outputs for the embeddings, or ``None`` without
            a head.
        classes: ``(k, top_k)`` long, the most likely classes of each concept, or ``None``.
        probabilities: ``(k, top_k)`` their softmax probabilities (over the ``K`` outputs), or
            ``None``.
        relative_error: ``||A - W H||_F / ||A||_F`` of the factorized (non-negative) activations.
        iterations: multiplicative-update iterations run.
        converged: whether the tolerance was met before the iteration limit.
        layer: the layer factorized.
        layer_reason: how the layer was chosen.
        head: how the classifier head was found (``""`` without a head).
        notes: what was done to the data on the way (negative activations set to 0).
    """

    maps: Tensor
    raw: Tensor
    embeddings: Tensor
    scores: Tensor | None
    classes: Tensor | None
    probabilities: Tensor | None
    relative_error: float
    iterations: int
    converged: bool
    layer: str
    layer_reason: str = ""
    head: str = ""
    notes: tuple[str, ...] = ()

    @property
    def n_components(self) -> int:
        """The number of concepts ``k``."""
        return self.embeddings.shape[0]

    def legend(self, labels: Sequence[str] | None = None) -> list[str]:
        """One line per concept: its top classes with probabilities, e.g.
        ``"1: Egyptian cat 0.96, tabby 0.03"`` (``"class 285"`` without ``labels``); just the
        number without a head."""
        if self.classes is None or self.probabilities is None or self.scores is None:
            return [f"{j + 1}" for j in range(self.n_components)]
        if labels is not None and len(labels) != self.scores.shape[1]:
            raise ValueError(
                f"got {len(labels)} labels for a head with {self.scores.shape[1]} outputs; give "
                "one label per class, in class-index order"
            )
        lines = []
        for j, (classes, probabilities) in enumerate(
            zip(self.classes.tolist(), self.probabilities.tolist(), strict=True)
        ):
            names = [labels[c] if labels is not None else f"class {c}" for c in classes]
            parts = [f"{name} {p:.2f}" for name, p in zip(names, probabilities, strict=True)]
            lines.append(f"{j + 1}: {', '.join(parts)}")
        return lines

    def overlay(self, image: ImageLike, index: int = 0, *, image_weight: float = 0.3,
                cmap: str = "gist_rainbow") -> Image.Image:
        """Image ``index`` with each pixel coloured by its strongest concept, opacity by that
        concept's strength (see :func:`heatlens.pictures.concepts.concept_overlay`)."""
        from heatlens.pictures.concepts import concept_colors, concept_overlay

        maps = picture_maps(self.maps, index, per_map=1)
        return concept_overlay(image, maps, concept_colors(self.n_components, cmap),
                               image_weight=image_weight)

    def figure(self, images: ImageLike | Sequence[ImageLike], *,
               labels: Sequence[str] | None = None, titles: Sequence[str] | None = None,
               image_weight: float = 0.3, cmap: str = "gist_rainbow", rows: int = 1) -> Figure:
        """A figure of :meth:`overlay` for each image of the batch (one image, or one per map),
        with a legend naming each concept's colour and :meth:`legend` line."""
        from heatlens.pictures.concepts import concept_colors, concept_figure

        shown = list(images) if isinstance(images, list | tuple) else [images]
        batch = self.maps.shape[0]
        if len(shown) != batch:
            raise ValueError(f"got {len(shown)} images for {batch} maps; pass one per image")
        panels = [self.overlay(img, i, image_weight=image_weight, cmap=cmap)
                  for i, img in enumerate(shown)]
        return concept_figure(panels, self.legend(labels),
                              concept_colors(self.n_components, cmap), titles=titles, rows=rows)

    def save(self, path: str | Path, images: ImageLike | Sequence[ImageLike], *,
             labels: Sequence[str] | None = None, titles: Sequence[str] | None = None,
             image_weight: float = 0.3, cmap: str = "gist_rainbow", rows: int = 1) -> Path:
        """Write :meth:`figure` to ``path`` (format from the suffix; an existing file is
        replaced) and return the path."""
        from heatlens.pictures.overlays import save_figure

        figure = self.figure(images, labels=labels, titles=titles, image_weight=image_weight,
                             cmap=cmap, rows=rows)
        return save_figure(figure, path)


def factorize(model: nn.Module, inputs: Tensor, n_components: int = 5,
              layer: LayerSpec = "auto", *, top_k: int = 2, head: HeadSpec = "auto",
              seed: int = 0, max_iter: int = 1000, tol: float = 1e-5,
              output: OutputKey | None = None) -> Concepts:
    """Deep Feature Factorization (Collins et al., ECCV 2018) of one layer over a batch.

    The layer's activations ``(B, C, *spatial)`` become ``A ∈ R^{N x C}`` with
    ``N = B · prod(spatial)`` rows, and ``A ≈ W H`` is found by :func:`nmf` (multiplicative
    updates, Lee & Seung 2001; ``W`` columns scaled to a maximum of 1). A signed layer is clamped
    at 0 first, with a warning, since NMF needs ``A ≥ 0``; a layer after a ReLU (what
    ``layer="auto"`` picks on common CNNs) needs no clamping. The concept maps are ``W`` reshaped
    to ``(B, k, *spatial)`` and upsampled to the input's size. Each concept ``j`` is labelled with
    ``softmax(head(H_j))``, its ``top_k`` classes.

    The model is left as it was (training flags, parameters, buffers, hooks); run it in
    ``eval()`` mode.

    Args:
        model: an ``nn.Module`` classifier.
        inputs: a preprocessed float tensor ``(B, C, *spatial)`` or ``(C, *spatial)``; the
            factorization is shared by the batch.
        n_components: the number of concepts ``k``, from 1 to the layer's channel count ``C``.
        layer: ``"auto"``, a module name, or a module (see :func:`heatlens.explain`).
        top_k: the number of classes reported per concept.
        head: ``"auto"`` finds the classifier that turns the layer's global average into the
            model's output: timm's ``get_classifier()``, a submodule named ``fc`` (ResNet),
            ``classifier`` (MobileNet, EfficientNet), ``_fc`` (EfficientNet-Lite) or ``head``, or
            the last ``nn.Linear`` taking ``C`` features; it is accepted only when it reproduces
            the model's output from the pooled activations. Or a module name, a module or a
            callable mapping ``(k, C)`` embeddings to ``(k, K)`` scores; ``None`` for no labels.
        seed: seed of the factorization's initialisation (same seed, same result).
        max_iter: maximum number of multiplicative-update iterations.
        tol: relative tolerance of the stopping rule (see :func:`nmf`).
        output: the entry of a dict or tuple output that holds the scores (see
            :func:`heatlens.explain`).

    Returns:
        :class:`Concepts` with the maps, embeddings, labels and the reconstruction error.

    Raises:
        TypeError: for a model that is not an ``nn.Module`` or inputs that are not a float tensor,
            or a head that is not callable or does not return a tensor.
        ValueError: for ``n_components`` outside ``1..C``, a layer without spatial dimensions,
            a head that cannot be found or returns the wrong shape, or ``top_k`` larger than the
            head's number of outputs.
    """
    model = model_to_explain(model)
    check_int(n_components, "n_components", 1)
    check_int(top_k, "top_k", 1)
    with entered(model, inputs, output=output) as x:
        choice = resolve_layers(model, layer, x)
        if len(choice.names) != 1:
            raise ValueError(f"factorize takes one layer, got {len(choice.names)}: "
                             f"{list(choice.names)}")
        name = choice.names[0]
        captured = forward_with_capture(model, x, choice.as_dict(), with_gradients=False)
        layout = layer_layout(model, name, captured.activations[name], x)
        acts = as_map(layout, captured.activations[name].detach())
        _check_layer(acts, name, n_components)
        with torch.no_grad():
            head_fn, head_reason = _find_head(model, head, acts, captured.output, name,
                                              tokens=layout is not None)
        matrix, notes = _nonnegative_rows(acts, name, tokens=layout is not None)
        found = nmf(matrix, n_components, seed=seed, max_iter=max_iter, tol=tol)
        grid = (acts.shape[0], *acts.shape[2:], n_components)
        raw = found.weights.reshape(grid).movedim(-1, 1).float()
        maps = upsample(raw.flatten(0, 1), x.shape[2:]).reshape(*raw.shape[:2], *x.shape[2:])
        with torch.no_grad():
            scores = None if head_fn is None else _head_scores(head_fn, found.components, acts)
    classes = probabilities = None
    if scores is not None:
        if top_k > scores.shape[1]:
            raise ValueError(f"top_k={top_k} is more than the head's {scores.shape[1]} outputs; "
                             f"use top_k <= {scores.shape[1]}")
        probabilities, classes = scores.float().softmax(dim=1).topk(top_k, dim=1)
    return Concepts(
        maps=maps.clamp(0, 1),
        raw=raw,
        embeddings=found.components,
        scores=scores,
        classes=classes,
        probabilities=probabilities,
        relative_error=found.relative_error,
        iterations=found.iterations,
        converged=found.converged,
        layer=name,
        layer_reason=choice.reason,
        head=head_reason,
        notes=notes,
    )


def _check_layer(acts: Tensor, name: str, n_components: int) -> None:
    """The layer must output a feature map ``(B, C, *spatial)`` with at least ``k`` channels."""
    if acts.ndim < 3 or prod(acts.shape[2:]) <= 1:
        raise ValueError(
            f"layer {name!r} outputs shape {tuple(acts.shape)}, not a feature map "
            "(B, C, *spatial) with several positions; factorize needs spatial positions: choose "
            "an earlier layer (see `heatlens layers`)"
        )
    channels = acts.shape[1]
    if n_components > channels:
        raise ValueError(
            f"n_components={n_components} is more than the {channels} channels of layer {name!r}; "
            f"use n_components <= {channels} (a handful, such as 5, is typical)"
        )


def _nonnegative_rows(acts: Tensor, name: str, *, tokens: bool
                      ) -> tuple[Tensor, tuple[str, ...]]:
    """``(B, C, *spatial)`` as ``A`` ``(N, C)``, one row per position; negative values are set to
    0 with a warning, as NMF needs ``A >= 0``."""
    matrix = acts.movedim(1, -1).reshape(-1, acts.shape[1])
    negative = matrix < 0
    if not bool(negative.any()):
        return matrix, ()
    share = float(matrix.abs().where(negative, 0).sum() / matrix.abs().sum())
    note = (
        f"layer {name!r} has negative activations ({float(negative.float().mean()):.0%} of the "
        f"values, {share:.0%} of the magnitude); NMF needs non-negative data, so they were set "
        "to 0. " + ("A transformer's tokens are signed: its concepts come from their positive "
                    "part." if tokens else "Choose a layer after a ReLU for an exact "
                    "factorization (layer='auto' is, on common CNNs).")
    )
    warn(note)
    return matrix.clamp_min(0), (note,)


def _find_head(model: nn.Module, head: HeadSpec, acts: Tensor, output: Any, name: str, *,
               tokens: bool) -> tuple[Callable[[Tensor], Tensor] | None, str]:
    """The classifier head as a callable and how it was found (``None``, ``""`` for no head)."""
    if head is None:
        return None, ""
    if isinstance(head, str) and head != "auto":
        try:
            return module_by_name(model, head), f"'{head}' (given by the caller)"
        except ValueError as exc:
            raise ValueError(f"head={head!r}: {exc}") from None
    if not isinstance(head, str):
        if not callable(head):
            raise TypeError(
                f"head must be 'auto', a module name, an nn.Module or a callable mapping (k, C) "
                f"embeddings to (k, num_classes) scores, not {type(head).__name__}"
            )
        return head, "given by the caller"
    try:
        return find_head(model, acts, output, name)
    except ValueError as exc:
        candidates = head_candidates(model, acts.shape[1]) if tokens else []
        if candidates:  # a transformer's head reads the class token, not pooled patches
            label, module = candidates[0]
            return module, (
                f"'{label}' ({type(module).__name__}), the transformer's classifier; it reads "
                "the class token, not an average of the patch tokens, so a concept's names say "
                "what it makes of the concept's channel pattern"
            )
        raise ValueError(
            f"{exc} So concepts cannot be labelled. Pass head= a module or callable mapping "
            "(k, C) embeddings to (k, num_classes) scores (e.g. head=model.fc), factorize the "
            "last feature layer (layer='auto'), or head=None for concepts without labels."
        ) from None


def _head_scores(head: Callable[[Tensor], Tensor], embeddings: Tensor, acts: Tensor) -> Tensor:
    """``head(H)`` as ``(k, K)`` scores; a clear error when the head does not fit."""
    scores = head(embeddings.to(acts.dtype))
    try:
        scores = primary_output(scores)
    except TypeError:
        raise TypeError(
            f"the head returned {type(scores).__name__}, not a tensor of scores; pass a head "
            "mapping (k, C) embeddings to (k, num_classes) scores"
        ) from None
    k = embeddings.shape[0]
    if scores.ndim != 2 or scores.shape[0] != k:
        raise ValueError(
            f"the head turned ({k}, {embeddings.shape[1]}) embeddings into shape "
            f"{tuple(scores.shape)}, not ({k}, num_classes); pass a head that maps a batch of "
            "channel vectors to class scores"
        )
    return scores.detach()
