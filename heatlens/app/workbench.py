"""What the app computes for the page: an upload's top classes, its maps, and how faithful each
map is, each a job on the model's queue (:mod:`heatlens.app.jobs`), with recent answers kept.

Uploads are decoded in memory (:func:`heatlens.load_image` on the bytes: the pixel limit is
checked from the header before any pixel is decoded) and never written anywhere; nothing uploaded
is unpickled. A map travels to the page as float32 values at the model's input resolution, the
same pixels as the picture it is drawn over (the preset's crop), so that the page colours and
blends it itself: moving the opacity or changing the colour map asks the server for nothing.
"""

from __future__ import annotations

import base64
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from heatlens.api import explain
from heatlens.engine.entry import model_device
from heatlens.engine.layers import auto_layer, candidate_layers
from heatlens.engine.targets import primary_output
from heatlens.loading.images import load_image
from heatlens.loading.models import LoadedModel
from heatlens.methods.base import CAMExplainer
from heatlens.methods.registry import canonical_name, list_methods, method_class, method_info
from heatlens.methods.wrapping import Wrapper
from heatlens.metrics.html import png_data_url

MAX_BYTES = 20 << 20
"""Largest upload accepted by default, in bytes (20 MiB)."""
MAX_PIXELS = 40_000_000
"""Largest upload accepted by default, in pixels (checked from the file's header)."""
TOP = 5
"""Classes offered per upload."""
TRUST_METRICS = ("deletion", "insertion")
TRUST_STEP = 0.05
"""Pixels removed or inserted per step of the page's deletion and insertion curves: 5 % (21
points a curve) keeps a panel's scores to a few seconds on a CPU; ``heatlens compare`` and
:func:`heatlens.evaluate` default to 1 %."""
FAMILIES = ("gradient CAMs", "perturbation CAMs", "pixel attributions", "layer attributions",
            "transformer methods", "controls", "other methods")
DEFAULT_METHODS = ("gradcam", "gradcam++", "layercam", "eigencam", "scorecam",
                   "integrated_gradients")
SLOW_FAMILIES = ("perturbation CAMs",)
SLOW_METHODS = ("integrated_gradients", "occlusion", "rise", "smoothgrad", "lime", "kernel_shap",
                "gradient_shap", "deeplift_shap", "layer_integrated_gradients",
                "layer_conductance", "sess")
"""Methods that run the model many times besides the perturbation CAMs: marked slow."""

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")
T = TypeVar("T")


def encode_map(values: np.ndarray) -> str:
    """A map as it travels to the page: its float32 values, little-endian, row by row, in
    base64 (the page reads them into a ``Float32Array``)."""
    return base64.b64encode(values.astype("<f4").tobytes()).decode("ascii")


def takes_layer(cls: type) -> bool:
    """Whether a method explains at the layer the page picks: the CAMs, the methods around
    them, the layer attributions and Guided Grad-CAM."""
    return issubclass(cls, CAMExplainer | Wrapper) or getattr(cls, "uses_layer", False)


class Recent(Generic[K, V]):
    """The ``size`` most recently used answers, by key (thread-safe)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._items: OrderedDict[K, V] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: K) -> V | None:
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
            return None

    def put(self, key: K, value: V) -> V:
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self.size:
                self._items.popitem(last=False)
        return value


@dataclass(frozen=True)
class Upload:
    """An image the page sent, ready for the model.

    Attributes:
        id: its name in the API.
        name: the file name the page gave.
        batch: the model's input ``(1, C, H, W)``.
        shown: the picture the model saw (the preset's crop), which maps are drawn over.
        size: the original ``(width, height)``.
        top: the :data:`TOP` most probable classes: ``{"class", "name", "probability"}``.
    """

    id: str
    name: str
    batch: Tensor
    shown: Image.Image
    size: tuple[int, int]
    top: list[dict[str, Any]]

    def as_json(self) -> dict[str, Any]:
        """The upload as the page sees it (the shown picture as a PNG ``data:`` URL)."""
        return {"image": self.id, "name": self.name, "width": self.size[0],
                "height": self.size[1], "shown": png_data_url(self.shown), "top": self.top,
                "predicted": self.top[0]["class"]}


@dataclass(frozen=True)
class Request:
    """One map asked for: checked before it is queued."""

    upload: Upload
    method: str
    target: int
    layer: str

    @property
    def key(self) -> tuple[str, str, int, str]:
        return self.upload.id, self.method, self.target, self.layer


class Workbench:
    """The model, its queue, and the uploads and answers of a running app.

    Args:
        loaded: the model to explain (``heatlens.load_model()``).
        max_bytes, max_pixels: upload limits.
        kept_uploads, kept_maps: how many uploads and maps stay in memory (least recently used
            go first).
    """

    def __init__(self, loaded: LoadedModel, *, max_bytes: int = MAX_BYTES,
                 max_pixels: int = MAX_PIXELS, kept_uploads: int = 32,
                 kept_maps: int = 128) -> None:
        from heatlens.app.jobs import JobQueue

        self.loaded = loaded
        self.max_bytes = max_bytes
        self.max_pixels = max_pixels
        self.classes = 0
        self.jobs = JobQueue()
        self._uploads: Recent[str, Upload] = Recent(kept_uploads)
        self._maps: Recent[tuple[str, str, int, str], dict[str, Any]] = Recent(kept_maps)
        self._trust: Recent[tuple[str, str, int, str], dict[str, Any]] = Recent(kept_maps)
        self._controls: Recent[tuple[str, int], dict[str, float]] = Recent(kept_uploads)
        self.layers: dict[str, Any] = {}

    def start(self) -> float:
        """Probe the layers and explain the sample photo once, so that the first request finds
        everything warm; returns the seconds it took."""
        from heatlens.loading.images import sample_image_path

        began = time.perf_counter()
        crop = self.loaded.preset.crop
        device = model_device(self.loaded.model)
        probe = torch.zeros(1, 3, crop, crop, device=device)
        chosen, reason = auto_layer(self.loaded.model, probe)
        self.layers = {
            "auto": chosen, "reason": reason,
            "candidates": [{"name": c.name, "type": c.module_type, "shape": list(c.shape)}
                           for c in candidate_layers(self.loaded.model, probe)
                           if c.output_depends],
        }
        sample = self.run("image", lambda: self.upload(load_image(sample_image_path()),
                                                        "sample"))
        request = self.request(sample.id, "gradcam", None, "auto")
        self.run("explain", lambda: self.map_of(request))
        return time.perf_counter() - began

    def methods(self) -> list[dict[str, Any]]:
        """Every registered method: name, aliases, family, one-line summary, whether it is slow
        and whether it takes a layer."""
        listed = []
        for name in list_methods():
            cls = method_class(name)
            info = method_info(name)
            listed.append({"name": name, "aliases": list(info.aliases), "family": cls.family,
                           "summary": info.summary, "layer": takes_layer(cls),
                           "slow": cls.family in SLOW_FAMILIES or name in SLOW_METHODS})
        order = {family: i for i, family in enumerate(FAMILIES)}
        return sorted(listed, key=lambda m: (order.get(m["family"], len(FAMILIES)), m["name"]))

    def decode(self, data: bytes) -> Image.Image:
        """The upload's picture, decoded in memory; an :class:`~heatlens.loading.images.
        ImageError` names what is wrong (not an image, damaged, too many pixels)."""
        if not data:
            raise ValueError("the upload is empty: send the bytes of an image file")
        if len(data) > self.max_bytes:
            raise ValueError(f"the upload is {len(data):,} bytes, more than the limit of "
                             f"{self.max_bytes:,}")
        return load_image(data, max_pixels=self.max_pixels)

    def run(self, kind: str, work: Callable[[], T]) -> T:
        """Run ``work`` as a job on the model's queue and wait for its result."""
        return self.jobs.submit(kind, work).future.result()

    def upload(self, image: Image.Image, name: str) -> Upload:
        """Keep a decoded picture and find its top classes (run it as a job: it uses the
        model)."""
        device = model_device(self.loaded.model)
        batch, shown = self.loaded.preset(image)
        batch = batch.to(device)
        with torch.inference_mode():
            scores = self.loaded.model(batch)
        probabilities = torch.softmax(primary_output(scores).float(), dim=1)[0]
        self.classes = probabilities.numel()
        values, classes = probabilities.topk(min(TOP, self.classes))
        labels = self.loaded.labels
        top = [{"class": int(c), "name": labels[int(c)] if labels else f"class {int(c)}",
                "probability": float(v)} for v, c in zip(values, classes, strict=True)]
        upload = Upload(uuid.uuid4().hex, name, batch, shown[0], image.size, top)
        return self._uploads.put(upload.id, upload)

    def request(self, image: str, method: str, target: int | None, layer: str) -> Request:
        """Check what is asked for before it is queued: a ``KeyError`` for an unknown upload,
        a ``ValueError`` naming a wrong method, class or layer."""
        upload = self._uploads.get(image)
        if upload is None:
            raise KeyError(f"no image {image!r} here (uploads are kept while recent); upload "
                           "it again")
        name = canonical_name(method)
        cls = upload.top[0]["class"] if target is None else int(target)
        if not 0 <= cls < self.classes:
            raise ValueError(f"class {cls} is out of range: the model has {self.classes} "
                             f"classes (0..{self.classes - 1})")
        layer = layer if takes_layer(method_class(name)) else "auto"
        known = [c["name"] for c in self.layers.get("candidates", [])]
        if layer != "auto" and known and layer not in known:
            raise ValueError(f"the model has no layer {layer!r} with a spatial output; "
                             f"choose one of {', '.join(known)} or 'auto'")
        return Request(upload, name, cls, layer)

    def map_of(self, request: Request) -> dict[str, Any]:
        """The answer for one map, as the page draws it (run it as a job: it uses the model)."""
        kept = self._maps.get(request.key)
        if kept is not None:
            return kept
        began = time.perf_counter()
        explanation = explain(self.loaded.model, request.upload.batch, method=request.method,
                              target=request.target, layer=request.layer)
        values = explanation.maps[0].float().cpu().numpy()
        probability = explanation.probabilities
        answer = {
            "image": request.upload.id, "method": request.method, "class": request.target,
            "class_name": self._name(request.target),
            "probability": None if probability is None else float(probability[0]),
            "score": float(explanation.scores[0]), "title": explanation.title(0,
                                                                              self.loaded.labels),
            "layer": ", ".join(explanation.layers), "layer_reason": explanation.layer_reason,
            "height": int(values.shape[0]), "width": int(values.shape[1]),
            "map": encode_map(values),
            "seconds": round(time.perf_counter() - began, 3),
        }
        return self._maps.put(request.key, answer)

    def trust_of(self, request: Request) -> dict[str, Any]:
        """How faithful the map of ``request`` is (run it as a job): deletion (lower is
        better) and insertion (higher is better) areas under the curve, beside a random map's,
        at :data:`TRUST_STEP` a step (see :mod:`heatlens.metrics.faithfulness`)."""
        kept = self._trust.get(request.key)
        if kept is not None:
            return kept
        from heatlens.metrics.evaluate import evaluate
        from heatlens.metrics.faithfulness import heatlens_protocol

        answer = self.map_of(request)
        values = np.frombuffer(base64.b64decode(answer["map"]), dtype="<f4")
        maps = torch.from_numpy(values.reshape(1, answer["height"], answer["width"]).copy())
        control = self._controls.get((request.upload.id, request.target))
        report = evaluate(self.loaded.model, request.upload.batch, {request.method: maps},
                          metrics=TRUST_METRICS, target=request.target,
                          protocol=heatlens_protocol(TRUST_STEP),
                          controls=("random",) if control is None else ())
        if control is None:
            control = self._controls.put((request.upload.id, request.target), {
                metric: float(report.scores[metric]["random"][0]) for metric in TRUST_METRICS})
        scores = {metric: float(report.scores[metric][request.method][0])
                  for metric in TRUST_METRICS}
        return self._trust.put(request.key, {
            "image": request.upload.id, "method": request.method, "class": request.target,
            "scores": scores, "random": control, "protocol": report.protocol,
            "better_than_random": {"deletion": scores["deletion"] < control["deletion"],
                                   "insertion": scores["insertion"] > control["insertion"]},
        })

    def _name(self, cls: int) -> str:
        labels = self.loaded.labels
        return labels[cls] if labels and cls < len(labels) else f"class {cls}"
