"""The Ray engine of :func:`heatlens.explain_dataset` (``engine="ray"``, needs ``heatlens[ray]``).

One Ray Data pipeline, streamed back to this process in order::

    from_items([0, 1, ..., n - 1])        the positions of the plan's items, in order
      -> map_batches(_read)                tasks: hash, decode, preprocess (the same Reader as
                                           the local engine's DataLoader workers)
      -> repartition(batch_size, strict)   blocks of exactly batch_size rows
      -> map_batches(_Explainer)           a pool of actors, each holding the model and one
                                           explainer per method (plan.explaining())
      -> iter_batches                      this process: rebuild each batch's Explained

**One row per item.** Every item travels as one row, whether it is explained, already held by
the run (``skip``) or unusable (``error``), so the writer sees exactly what the local engine
gives it, errors included. The reading tasks turn a :class:`~heatlens.datasets.reading.Loaded`
into columns Ray can carry: numbers, strings, and numpy arrays for the input tensor and the
picture shown (an empty array where the item has none, so a column may be ragged). The actors
drop the input and add each method's stored map (float16, as the local engine stores it), the
item's index rows (JSON, which gives Python's floats back exactly) and, for overlays, each
method's map at the input's resolution (float32, what an overlay is drawn from).

**The same batches.** The local engine explains the usable images among items
``k * batch_size`` to ``(k + 1) * batch_size - 1`` together. A strict repartition makes every
block but the last hold exactly ``batch_size`` rows, so each actor call gets exactly one such
batch, and the explainers see the same inputs in the same company: the maps agree with the
local engine's. This process groups the rows it gets back by ``position // batch_size`` (Ray
may hand them over in larger blocks) and checks that they come in order.

**The model** goes into the object store once, together with the plan's layer (one pickle
keeps a layer given as a module a part of the model the actor unpickles); each actor builds the
explainers once. Actors ask for a GPU each when the model is on CUDA and the cluster has GPUs
(one actor per GPU), otherwise the pool is one CPU actor. Files are read by path in the
reading tasks: on a cluster of several machines, the source must lie where every node sees it.

What comes back to this process is what the writer needs: no input tensor (a usable item's
``Loaded.tensor`` is an empty placeholder, so ``tensor is not None`` still marks it usable), and
``BatchResult.explanations`` (only for overlays) made of the maps at input resolution and the
rows' targets, scores and probabilities, without the raw maps (stored in ``BatchResult.maps``).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import warnings
from collections.abc import Iterator, Sequence
from itertools import groupby
from typing import Any

import numpy as np
import torch
from torch import nn

from heatlens.datasets.compute import BatchResult
from heatlens.datasets.reading import Loaded, Reader
from heatlens.datasets.runner import Explained, Plan
from heatlens.datasets.sources import Item
from heatlens.explanation import Explanation

Columns = dict[str, np.ndarray]
"""A Ray Data batch in numpy format: one array per column, one entry per item."""

MISSING_RAY = "the Ray engine needs ray: pip install 'heatlens[ray]'"


def results_on_ray(plan: Plan, done: dict[str, str], ray_address: str | None,
                   overlays: bool) -> Iterator[Explained]:
    """The Ray engine: the plan's items explained by Ray Data, one :class:`Explained` per batch
    of ``plan.batch_size`` items, in order (see the module docstring).

    Args:
        plan: the run.
        done: ``name -> sha256`` of the items the run holds for every method (skipped).
        ray_address: the Ray cluster to join when this process is not connected to a Ray
            yet (``None``: start a local Ray). A Ray this process is connected to already is
            used as it is and left running; one this call started or joined is shut down
            (left, for a cluster) when the results end.
        overlays: also bring back what overlays are drawn from.

    Raises:
        ImportError: ray (with Ray Data) is not installed; raised at the call, before any
            work.
    """
    ray = _ray()
    return _explained_on_ray(ray, plan, done, ray_address, overlays)


def _ray() -> Any:
    """The ``ray`` module with Ray Data, or an ``ImportError`` that says how to install it."""
    try:
        import ray
        import ray.data  # ray without its "data" extra lacks it
    except ImportError:
        raise ImportError(MISSING_RAY) from None
    return ray


def _explained_on_ray(ray: Any, plan: Plan, done: dict[str, str], ray_address: str | None,
                      overlays: bool) -> Iterator[Explained]:
    """:func:`results_on_ray` once ray is imported: connect, stream the batches back in order,
    disconnect what it connected (also when the caller stops early)."""
    if not plan.items:
        return
    started = not ray.is_initialized()
    if started:
        ray.init(address=ray_address)
    context = ray.data.DataContext.get_current()
    before = (context.execution_options.preserve_order, context.enable_progress_bars)
    context.execution_options.preserve_order = True
    context.enable_progress_bars = False  # heatlens shows its own
    try:
        records = _in_order(_records(_pipeline(ray, plan, done, overlays)), len(plan.items))
        for _, group in groupby(records, key=lambda record: record["index"] // plan.batch_size):
            yield _explained(list(group), plan, overlays)
    finally:
        context.execution_options.preserve_order, context.enable_progress_bars = before
        if started:
            ray.shutdown()


def _pipeline(ray: Any, plan: Plan, done: dict[str, str], overlays: bool) -> Any:
    """The Ray Dataset of the explained items (lazy; see the module docstring)."""
    size, resources, device = _pool(ray, plan.model)
    shipped = ray.put(_portable((plan.model, plan.layer)))
    light = dataclasses.replace(plan, model=nn.Module(), layer=None, source=dataclasses.replace(
        plan.source, dataset=None))  # the model and layer travel in `shipped`
    items = ray.data.from_items([{"index": i} for i in range(len(plan.items))])
    read = items.map_batches(_read, fn_kwargs={"reader": plan.reader(done, overlays)},
                             batch_size=plan.batch_size, batch_format="numpy")
    batches = read.repartition(target_num_rows_per_block=plan.batch_size, strict=True)
    return batches.map_batches(
        _Explainer, fn_constructor_kwargs={"plan": light, "shipped": shipped,
                                           "device": device, "overlays": overlays},
        batch_size=plan.batch_size, batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=size), **resources)


def _pool(ray: Any, model: nn.Module) -> tuple[int, dict[str, Any], str]:
    """The actor pool: its size, each actor's resources and the device it explains on."""
    on_cuda = torch.cuda.is_available() and any(p.is_cuda for p in model.parameters())
    gpus = int(ray.cluster_resources().get("GPU", 0))
    if on_cuda and gpus:
        return gpus, {"num_gpus": 1}, "cuda"
    if on_cuda:
        warnings.warn("the model is on CUDA but the Ray cluster has no GPU: the Ray engine "
                      "explains on one CPU actor", stacklevel=2)
    return 1, {}, "cpu"


def _portable(shipped: tuple[nn.Module, Any]) -> tuple[nn.Module, Any]:
    """The model and layer as they can be unpickled on any node: a CPU copy (copied together,
    so a layer given as a module stays part of the copy) when the model holds CUDA tensors."""
    model = shipped[0]
    if not any(t.is_cuda for t in (*model.parameters(), *model.buffers())):
        return shipped
    copied, layer = copy.deepcopy(shipped)
    return copied.cpu(), layer


def _read(batch: Columns, reader: Reader) -> Columns:
    """A reading task: the items at ``batch["index"]`` as columns (see the module docstring)."""
    loaded = [reader[int(i)] for i in batch["index"]]
    columns = {
        "index": np.asarray(batch["index"], dtype=np.int64),
        "sha256": np.array([e.sha256 for e in loaded], dtype=object),
        "width": np.array([e.width for e in loaded], dtype=np.int64),
        "height": np.array([e.height for e in loaded], dtype=np.int64),
        "label": np.array(["" if e.label is None else e.label for e in loaded], dtype=object),
        "has_label": np.array([e.label is not None for e in loaded]),
        "error": np.array([e.error for e in loaded], dtype=object),
        "kind": np.array([e.kind for e in loaded], dtype=object),
        "skip": np.array([e.skip for e in loaded]),
        "usable": np.array([e.tensor is not None for e in loaded]),
        "tensor": _column([None if e.tensor is None else e.tensor.detach().cpu().numpy()
                           for e in loaded], ndim=3, dtype=np.float32),
    }
    if reader.displays:
        columns["display"] = _column([e.display for e in loaded], ndim=3, dtype=np.uint8)
    return columns


def _column(arrays: Sequence[np.ndarray | None], ndim: int, dtype: Any) -> np.ndarray:
    """One array per item as a column: stacked when they have one shape, else an object array
    (Ray's ragged tensors), ``None`` as an empty array of ``ndim`` dimensions."""
    given = next((a.dtype for a in arrays if a is not None), np.dtype(dtype))
    filled = [np.zeros((0,) * ndim, given) if a is None else a for a in arrays]
    if len({a.shape for a in filled}) == 1:
        return np.stack(filled)
    column = np.empty(len(filled), dtype=object)
    for i, array in enumerate(filled):
        column[i] = array
    return column


def _records(dataset: Any) -> Iterator[dict[str, Any]]:
    """The rows of ``dataset``, one dict per item, as Ray hands them over."""
    for columns in dataset.iter_batches(batch_size=None, batch_format="numpy"):
        yield from _rows(columns)


def _rows(columns: Columns) -> Iterator[dict[str, Any]]:
    for i in range(len(columns["index"])):
        yield {name: values[i] for name, values in columns.items()} | {
            "index": int(columns["index"][i])}


def _in_order(records: Iterator[dict[str, Any]], count: int) -> Iterator[dict[str, Any]]:
    """``records``, checked to be the items ``0 .. count - 1`` in order, each once."""
    expected = 0
    for record in records:
        if record["index"] != expected:
            raise RuntimeError(f"Ray returned item {record['index']} where item {expected} was "
                               "due: the results came out of order")
        expected += 1
        yield record
    if expected != count:
        raise RuntimeError(f"Ray returned {expected} of the {count} items")


def _loaded(record: dict[str, Any], items: Sequence[Item], inputs: bool) -> Loaded:
    """The :class:`Loaded` a row carries: with its input tensor (``inputs``, in an actor) or an
    empty placeholder for it (in this process); the display where the row has one."""
    usable = bool(record["usable"])
    tensor = None
    if usable:
        tensor = torch.from_numpy(np.array(record["tensor"])) if inputs else torch.empty(0)
    display = np.array(record["display"]) if usable and "display" in record else None
    return Loaded(items[record["index"]], str(record["sha256"]), int(record["width"]),
                  int(record["height"]), tensor, display,
                  label=str(record["label"]) if record["has_label"] else None,
                  error=str(record["error"]), kind=str(record["kind"]),
                  skip=bool(record["skip"]))


class _Explainer:
    """An actor of the pool: the model and one explainer per method, built once; each call
    explains one batch of the local engine's (see the module docstring).

    Args:
        plan: the run's plan, without its model, layer and Dataset.
        shipped: the object-store reference to ``(model, layer)``.
        device: where to explain (``"cuda"``: this actor's GPU).
        overlays: also return each method's maps at the input's resolution.
    """

    def __init__(self, plan: Plan, shipped: Any, device: str, overlays: bool) -> None:
        import ray

        model, layer = ray.get(shipped)
        self.device = torch.device(device)
        self.plan = dataclasses.replace(plan, model=model.to(self.device), layer=layer)
        self.explaining = self.plan.explaining()
        self.overlays = overlays

    def __call__(self, batch: Columns) -> Columns:
        loaded = [_loaded(record, self.plan.items, inputs=True) for record in _rows(batch)]
        usable = [i for i, entry in enumerate(loaded) if entry.tensor is not None]
        out = {name: values for name, values in batch.items() if name != "tensor"}
        rows = [""] * len(loaded)
        maps: dict[str, list[np.ndarray | None]] = {
            name: [None] * len(loaded) for name in self._columns()}
        if usable:
            entries = [loaded[i] for i in usable]
            inputs = torch.stack([entry.tensor for entry in entries]).to(self.device)
            result = self.explaining(inputs, self.plan.targets(entries, self.device))
            for k, i in enumerate(usable):
                rows[i] = json.dumps(result.rows[k::len(usable)])
            for j, method in enumerate(self.plan.methods):
                stored = result.maps[method].cpu().numpy()
                for k, i in enumerate(usable):
                    maps[f"map{j}"][i] = stored[k]
                if self.overlays:
                    shown = result.explanations[method].maps.detach().float().cpu().numpy()
                    for k, i in enumerate(usable):
                        maps[f"shown{j}"][i] = shown[k]
        out["rows"] = np.array(rows, dtype=object)
        for name, arrays in maps.items():
            out[name] = _column(arrays, ndim=2,
                                dtype=np.float16 if name.startswith("map") else np.float32)
        return out

    def _columns(self) -> list[str]:
        """The columns of maps: each method's stored map and, for overlays, its map shown."""
        count = len(self.plan.methods)
        return [f"map{j}" for j in range(count)] + (
            [f"shown{j}" for j in range(count)] if self.overlays else [])


def _explained(group: list[dict[str, Any]], plan: Plan, overlays: bool) -> Explained:
    """One batch's rows as the :class:`Explained` the local engine gives for it."""
    loaded = [_loaded(record, plan.items, inputs=False) for record in group]
    usable = [record for record, entry in zip(group, loaded, strict=True)
              if entry.tensor is not None]
    if not usable:
        return Explained(loaded, None)
    per_image = [json.loads(str(record["rows"])) for record in usable]
    rows = [image[j] for j in range(len(plan.methods)) for image in per_image]
    maps = {method: torch.from_numpy(np.stack([record[f"map{j}"] for record in usable]))
            for j, method in enumerate(plan.methods)}
    explanations = {}
    if overlays:
        for j, method in enumerate(plan.methods):
            shown = np.stack([record[f"shown{j}"] for record in usable])
            own = rows[j * len(usable):(j + 1) * len(usable)]
            explanations[method] = _explanation(method, own, shown)
    return Explained(loaded, BatchResult(rows, maps, explanations))


def _explanation(method: str, rows: list[dict[str, Any]], shown: np.ndarray) -> Explanation:
    """What an overlay needs of a method's explanation of a batch: its maps at the input's
    resolution, with the targets, scores and probabilities of its rows (no raw maps)."""
    probabilities = [row["probability"] for row in rows]
    return Explanation(
        maps=torch.from_numpy(shown), raw_by_layer={},
        targets=torch.tensor([row["target"] for row in rows]),
        scores=torch.tensor([row["score"] for row in rows]),
        probabilities=None if None in probabilities else torch.tensor(probabilities),
        layers=tuple(rows[0]["layer"].split(",")) if rows[0]["layer"] else (), method=method)
