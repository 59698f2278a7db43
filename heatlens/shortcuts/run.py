"""``heatlens.audit``: is the model looking at the object or at something else, class by class?

One pass over the images (read and decoded in DataLoader workers, as a data-set run does:
:mod:`heatlens.datasets.reading`): each is explained once, its map measured
(:mod:`heatlens.shortcuts.measures`) and, where its object is known, edited and scored again
(:mod:`heatlens.shortcuts.interventions`). With masks a second pass pastes each object on another
image's background. Then each class's maps are clustered (SpRAy, :mod:`heatlens.shortcuts.clusters`)
and judged (:mod:`heatlens.shortcuts.verdict`).

Problems with the input (boxes naming no image, a mask of the wrong size, an empty box, a
class with too few images to cluster, an unreadable file) are written into the report and the
audit goes on: one bad file never ends the audit of a data set.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from heatlens.datasets.reading import Loaded, Reader, batches
from heatlens.datasets.sources import Source, SourceLike, open_source
from heatlens.engine.budget import DEFAULT_BUDGET, progress
from heatlens.engine.entry import model_device, model_to_explain
from heatlens.loading.images import DEFAULT_MAX_PIXELS
from heatlens.loading.objects import mask_path, read_boxes, read_mask
from heatlens.loading.presets import IMAGENET, Preset
from heatlens.methods.registry import canonical_name, create_explainer
from heatlens.metrics.localisation import boxes_to_masks
from heatlens.shortcuts import interventions
from heatlens.shortcuts.clusters import spray
from heatlens.shortcuts.measures import BAND, border, on_object
from heatlens.shortcuts.report import AuditReport, ClusterSummary
from heatlens.shortcuts.verdict import AREAS, PLACE, class_row, image_reason, place_name

THUMBNAIL = 64
"""Side of the pictures kept per image for the report."""
BACKGROUNDS = 4
"""Backgrounds kept per class for the pasting test (masks)."""

BoxesSource = str | os.PathLike[str] | Mapping[str, Sequence[Sequence[float]]]


def audit(model: nn.Module, source: SourceLike, boxes: BoxesSource | None = None,
          masks: str | os.PathLike[str] | None = None, method: str = "gradcam", *,
          preset: Preset = IMAGENET, labels: Sequence[str] | None = None,
          target: str = "predicted", layer: Any = "auto", batch_size: int = 16,
          workers: int = 0, band: float = BAND, seed: int = 0,
          max_pixels: int = DEFAULT_MAX_PIXELS, memory_budget: int = DEFAULT_BUDGET,
          show_progress: bool | None = None) -> AuditReport:
    """Audit ``model`` on the images of ``source`` for shortcuts.

    Args:
        model: a classifier (``(B, classes)`` scores); left as it was.
        source: a folder (class sub-folders give labels), a ``.csv``/``.txt`` list or a torch
            ``Dataset`` (see :mod:`heatlens.datasets.sources`).
        boxes: the objects as boxes: a CSV (``path,x1,y1,x2,y2``) or JSON file, or a dict from
            an image's name (its path relative to the folder) to its boxes, in the pixels of
            the upright image.
        masks: a folder mirroring the source with one PNG per image, non-zero on the object.
        method: the explanation method (one explainer for the whole audit).
        preset: the preprocessing of the images.
        labels: class names by index.
        target: ``"predicted"`` (explain and group by the prediction) or ``"label"`` (by the
            source's labels: where the model should look for the true class).
        layer: the layer to explain.
        batch_size, workers: images per pass and decoding processes.
        band: the border band's width (a fraction of the side).
        seed: clustering, bootstrap and the choice of backgrounds.
        max_pixels: larger images are reported, not read.
        memory_budget: bytes of edited images scored at once.
        show_progress: a progress bar (``None``: on a terminal).

    Returns:
        An :class:`~heatlens.shortcuts.report.AuditReport`.
    """
    if boxes is not None and masks is not None:
        raise ValueError("give boxes or masks, not both")
    if target not in ("predicted", "label"):
        raise ValueError(f"target must be 'predicted' or 'label', got {target!r}")
    model = model_to_explain(model)
    found = open_source(source)
    names = {item.name for item in found.items}
    problems: list[str] = []
    objects = None if boxes is None else _boxes(boxes, names, problems)
    mask_folder = None if masks is None else Path(masks)
    if mask_folder is not None and not mask_folder.is_dir():
        raise FileNotFoundError(f"no mask folder at {mask_folder}")
    explainer = create_explainer(canonical_name(method), model, layer=layer)
    state = _State(found, preset, labels, objects, mask_folder, band, memory_budget, problems,
                   seed)
    reader = Reader(found, found.items, preset, {}, max_pixels, displays=True)
    bar = progress(len(found.items), "audit", show=show_progress)
    with bar:
        for loaded in batches(reader, batch_size, workers):
            state.take(model, explainer, loaded, target)
            bar.update(len(loaded))
    if mask_folder is not None:
        _pasting(model, state, reader, batch_size, workers, seed)
    return _report(state, method, seed, boxes is not None, masks is not None)


def _boxes(boxes: BoxesSource, names: set[str], problems: list[str]
           ) -> dict[str, list[list[float]]]:
    """The boxes by image name; names that match no image become problems."""
    given = read_boxes(Path(boxes)) if isinstance(boxes, str | os.PathLike) else {
        str(k): [list(map(float, b)) for b in v] for k, v in boxes.items()}
    unknown = sorted(set(given) - names)
    if unknown:
        problems.append(f"{len(unknown)} box entr{'y' if len(unknown) == 1 else 'ies'} "
                        f"match no image ({', '.join(unknown[:3])}"
                        f"{', ...' if len(unknown) > 3 else ''}): check the paths, relative to "
                        "the folder")
    return {k: v for k, v in given.items() if k in names}


@dataclass
class _State:
    """What the pass collects."""

    source: Source
    preset: Preset
    labels: Sequence[str] | None
    boxes: dict[str, list[list[float]]] | None
    masks: Path | None
    band: float
    memory_budget: int
    problems: list[str]
    seed: int
    rows: list[dict[str, Any]] = field(default_factory=list)
    small: list[Tensor] = field(default_factory=list)
    thumbnails: list[np.ndarray] = field(default_factory=list)
    heat: list[np.ndarray] = field(default_factory=list)
    backgrounds: dict[int, list[tuple[int, Tensor]]] = field(default_factory=dict)
    without: list[tuple[int, Tensor]] = field(default_factory=list)

    def take(self, model: nn.Module, explainer: Any, loaded: list[Loaded], target: str) -> None:
        """Explain, measure and edit one batch."""
        for entry in loaded:
            if entry.error:
                self.problems.append(f"{entry.item.name} was not used: {entry.error}")
        usable = [entry for entry in loaded if entry.tensor is not None]
        if not usable:
            return
        device = model_device(model)
        x = torch.stack([entry.tensor for entry in usable]).to(device)
        goal = None
        if target == "label":
            goal = torch.tensor([self.source.class_index(e.label, self.labels, strict=True)
                                 for e in usable], device=device)
        with warnings.catch_warnings():  # an empty map is reported below, by its file's name
            warnings.filterwarnings("ignore", message=".*zero everywhere")
            e = explainer(x, target=goal)
        maps = e.maps.detach()
        for entry, empty in zip(usable, (maps.flatten(1).amax(dim=1) <= 0).tolist(),
                                strict=True):
            if empty:
                self.problems.append(f"{entry.item.name}: the map is zero everywhere (no "
                                     "positive evidence for the class explained); it counts "
                                     "as no relevance anywhere")
        edge = border(maps, self.band)
        object_masks = [self._mask(entry, maps.shape[-2:]) for entry in usable]
        rows = []
        for i, entry in enumerate(usable):
            cls = int(e.targets[i])
            rows.append({
                "path": entry.item.name, "class": cls, "class_name": self._name(cls),
                "label": self.source.class_index(entry.label, self.labels),
                "predicted": int(e.output[i].argmax()),
                "probability": None if e.probabilities is None else float(e.probabilities[i]),
                "band": float(edge.band[i]), "place": place_name(int(edge.place[i])),
                "place_share": float(edge.place_share[i]),
            })
        has = [i for i, mask in enumerate(object_masks) if mask is not None]
        if has:
            self._on_objects(model, x, maps, e.targets, object_masks, has, rows)
        self.rows += rows
        self.small.append(F.adaptive_avg_pool2d(maps[:, None], 16)[:, 0].cpu())
        self.heat.append(F.interpolate(maps[:, None], size=(THUMBNAIL, THUMBNAIL),
                                       mode="bilinear", align_corners=False)[:, 0].cpu().numpy())
        self.thumbnails += [_thumbnail(entry.display) for entry in usable]

    def _on_objects(self, model: nn.Module, x: Tensor, maps: Tensor, classes: Tensor,
                    object_masks: list[Tensor | None], has: list[int],
                    rows: list[dict[str, Any]]) -> None:
        chosen = torch.tensor(has, device=x.device)
        masks = torch.stack([object_masks[i] for i in has]).to(x.device)
        with warnings.catch_warnings():  # empty maps are reported by name in take()
            warnings.filterwarnings("ignore", message=".*(hold no positive value|constant)")
            measures = on_object(maps[chosen], masks)
        kept = classes[chosen]
        backgrounds = interventions.without_object(x[chosen], masks, self.seed)
        everything = interventions.all_probabilities(model, backgrounds)
        alone = interventions.probabilities(
            model, interventions.object_only(x[chosen], masks), kept,
            memory_budget=self.memory_budget)
        for k, i in enumerate(has):
            rows[i] |= {"mass": float(measures.mass[k]), "lift": float(measures.lift[k]),
                        "hit": float(measures.hit[k]), "rank": float(measures.rank[k]),
                        "object_area": float(measures.area[k]),
                        "p_without_object": float(everything[k, kept[k]]),
                        "p_object_only": float(alone[k])}
            self.without.append((len(self.rows) + i, everything[k].cpu()))
            if self.masks is not None:
                cls = int(kept[k])
                stock = self.backgrounds.setdefault(cls, [])
                if len(stock) < BACKGROUNDS:
                    stock.append((len(self.rows) + i, backgrounds[k].half().cpu()))

    def _mask(self, entry: Loaded, size: torch.Size) -> Tensor | None:
        """The object's mask on the model's input, or ``None`` (a problem noted)."""
        name = entry.item.name
        try:
            if self.boxes is not None:
                if name not in self.boxes:
                    self.problems.append(f"{name} has no box: only its border was measured")
                    return None
                moved = self.preset.boxes(torch.tensor(self.boxes[name]),
                                          (entry.width, entry.height))
                moved = moved[(moved[:, 2] > moved[:, 0]) & (moved[:, 3] > moved[:, 1])]
                if not len(moved):
                    raise ValueError("its boxes lie outside the part of the image the model "
                                     "sees")
                return boxes_to_masks([moved], tuple(size))[0]
            if self.masks is not None:
                mask = read_mask(mask_path(self.masks, name), (entry.width, entry.height))
                moved = self.preset.mask(torch.from_numpy(mask))
                if not moved.any():
                    raise ValueError("its object lies outside the part of the image the model "
                                     "sees")
                return moved
        except (OSError, ValueError) as exc:
            self.problems.append(f"{name}: {exc}; only its border was measured")
        return None

    def _name(self, cls: int) -> str:
        return self.labels[cls] if self.labels is not None and 0 <= cls < len(
            self.labels) else str(cls)


def _thumbnail(display: np.ndarray | None) -> np.ndarray:
    if display is None:
        return np.zeros((THUMBNAIL, THUMBNAIL, 3), np.uint8)
    from PIL import Image

    return np.asarray(Image.fromarray(display).resize((THUMBNAIL, THUMBNAIL)))


def _pasting(model: nn.Module, state: _State, reader: Reader, batch_size: int, workers: int,
             seed: int) -> None:
    """Mixed-Same and Mixed-Rand (see :mod:`heatlens.shortcuts.interventions`): each image with a
    mask, its object on the background of another image of its class and of another class."""
    classes = sorted(state.backgrounds)
    if len(classes) < 2:
        state.problems.append("the background test needs masked images of two classes or more")
        return
    generator = torch.Generator().manual_seed(seed)
    position = {row["path"]: i for i, row in enumerate(state.rows)}
    device = model_device(model)
    for loaded in batches(reader, batch_size, workers):
        for entry in loaded:
            if entry.item.name not in position:
                continue
            row = state.rows[position[entry.item.name]]
            if row.get("mass") is None:
                continue
            mask = state._mask(entry, entry.tensor.shape[-2:])
            cls = row["class"]
            same = [b for b in state.backgrounds.get(cls, []) if b[0] != position[row["path"]]]
            others = [b for c in classes if c != cls for b in state.backgrounds[c]]
            if not same or not others:
                continue
            picks = [same[int(torch.randint(len(same), (1,), generator=generator))],
                     others[int(torch.randint(len(others), (1,), generator=generator))]]
            x = entry.tensor[None].expand(2, -1, -1, -1)
            backgrounds = torch.stack([b[1].float() for b in picks])
            edited = interventions.pasted(x, mask[None].expand(2, -1, -1), backgrounds)
            predicted = interventions.all_probabilities(model, edited.to(device)).argmax(
                dim=1).cpu()
            row["correct_same"] = float(predicted[0] == cls)
            row["correct_other"] = float(predicted[1] == cls)


def _report(state: _State, method: str, seed: int, has_boxes: bool,
            has_masks: bool) -> AuditReport:
    notes = []
    if not has_boxes and not has_masks:
        notes.append("Without boxes or masks only the border band, its places and the clusters "
                     "were measured: boxes (--boxes) would add the relevance on the object, its "
                     "lift, the pointing game and the object-removed test; masks (--masks) "
                     "also the background swap (Mixed-Same vs Mixed-Rand).")
    small = torch.cat(state.small) if state.small else torch.zeros(0, 16, 16)
    heat = np.concatenate(state.heat) if state.heat else np.zeros((0, THUMBNAIL, THUMBNAIL))
    groups: dict[int, list[int]] = {}
    for i, row in enumerate(state.rows):
        groups.setdefault(row["class"], []).append(i)
    without = dict(state.without)
    classes, clusters = [], {}
    for cls, members in groups.items():
        rows = [state.rows[i] for i in members]
        name = rows[0]["class_name"]
        summary = class_row(name, cls, rows, seed, _elsewhere(cls, groups, without))
        clusters[name] = _clusters(small[members], members, state, name, summary, seed)
        summary["clusters"] = len(clusters[name])
        classes.append(summary)
    classes.sort(key=lambda r: (not r["flagged"], -r["off_object"]))
    flagged_names = {c["class_name"] for c in classes if c["flagged"]}
    flagged_clusters = {i for found in clusters.values() for c in found if c.flagged
                        for i in c.members}
    for i, row in enumerate(state.rows):
        row["flagged"] = False
        reason = image_reason(row)
        if reason is not None and (row["class_name"] in flagged_names or i in flagged_clusters):
            row["flagged"], row["reason"] = True, reason
    flagged_images = sorted((r for r in state.rows if r["flagged"]),
                            key=lambda r: -max(r["place_share"], 1 - r.get("mass", 1)))
    return AuditReport(images=state.rows, classes=classes, clusters=clusters,
                       flagged_classes=[c["class_name"] for c in classes if c["flagged"]],
                       flagged_images=[{"path": r["path"], "class_name": r["class_name"],
                                        "reason": r["reason"]} for r in flagged_images],
                       problems=state.problems, notes=notes,
                       settings={"method": method, "seed": seed, "band": state.band,
                                 "source": state.source.description},
                       heat=heat, thumbnails=state.thumbnails)


def _elsewhere(cls: int, groups: dict[int, list[int]], without: dict[int, Tensor]
               ) -> float | None:
    """The highest mean probability of ``cls`` on another class's images with their objects
    removed (``None`` without objects): what the backgrounds of the class most like it give."""
    means = []
    for other, members in groups.items():
        values = [float(without[i][cls]) for i in members if i in without]
        if other != cls and values:
            means.append(sum(values) / len(values))
    return max(means) if means else None


def _clusters(small: Tensor, members: list[int], state: _State, name: str,
              summary: dict[str, Any], seed: int) -> list[ClusterSummary]:
    """SpRAy on one class's maps; a class too small to cluster is a problem, not an error."""
    try:
        found = spray(small, seed=seed)
    except ValueError as exc:
        state.problems.append(f"class {name!r}: {exc}; its images were measured one by one")
        return []
    result = []
    for j in range(found.k):
        indices = [members[i] for i in (found.labels == j).nonzero()[:, 0].tolist()]
        rows = [state.rows[i] for i in indices]
        mean = found.means[j]
        where = border(mean[None], state.band)
        lifts = [r["lift"] for r in rows if r.get("lift") is not None]
        lift = sum(lifts) / len(lifts) if lifts else None
        off_place = summary["flagged"] and float(where.place_share[0]) >= PLACE * AREAS[
            place_name(int(where.place[0]))]
        off_object = lift is not None and lift < 1
        reason = None
        if off_place:
            reason = (f"{len(rows)} images whose relevance sits in the "
                      f"{place_name(int(where.place[0]))} "
                      f"({float(where.place_share[0]):.0%} of it)")
        elif off_object:
            reason = (f"{len(rows)} images whose object holds no more than its area "
                      f"(lift {lift:.2f})")
        for i in indices:
            state.rows[i]["cluster"] = j
        result.append(ClusterSummary(j, indices, mean.numpy(),
                                     [members[i] for i in found.exemplars[j]],
                                     reason is not None, reason or ""))
    return result
