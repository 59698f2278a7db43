"""Bounded memory and progress for methods that run the model many times (``docs/design.md``,
promise 8).

Perturbed inputs are built chunk by chunk; a chunk holds as many inputs as fit in the memory
budget, by an estimate of what one more input costs in one pass of the model.

Progress is a ``tqdm`` bar on a terminal; a program that runs methods for someone else (the web
app) also watches it with :func:`watched`: its callback hears every step and may stop the work by
raising (a cancelled request).
"""

from __future__ import annotations

import sys
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from math import prod
from typing import Any

import torch
from torch import Tensor, nn

from heatlens.engine.capture import forward_with_capture
from heatlens.engine.hooks import forward_hooks

DEFAULT_BUDGET = 256 << 20
"""Memory budget of one call's perturbed batches, in bytes (256 MiB). Larger chunks gain
little on a CPU: allocating a 1 GiB chunk for every pass cost MobileNetV2's Score-CAM twice the
time of 128 MiB chunks, most of it in the kernel."""

Watcher = Callable[[int, int, str], None]
"""Called as ``watcher(done, total, description)`` after each step of a long computation."""

_WATCHER: ContextVar[Watcher | None] = ContextVar("heatlens_progress_watcher", default=None)

_CACHE: weakref.WeakKeyDictionary[nn.Module, dict[tuple, int]] = weakref.WeakKeyDictionary()
_RECORDED: weakref.WeakKeyDictionary[nn.Module, dict[tuple, int]] = weakref.WeakKeyDictionary()


def sample_bytes(model: nn.Module, sample: Tensor, *, with_gradients: bool = False) -> int:
    """Estimated bytes that one input of ``sample``'s shape adds to a batched pass.

    Measured once per model and shape from the sizes of every module's output on ``sample``
    (``(1, C, *spatial)``). Without gradients the peak is a few activations alive at once (taken
    as five times the largest: a residual block holds its input, its branch and the allocator's
    slack); with gradients autograd keeps every activation for the backward pass and adds their
    gradients (taken as 2.5 times the sum). Both add twice the largest unfolded input of a
    convolution (the im2col workspace) and the input itself.
    """
    key = (tuple(sample.shape[1:]), sample.dtype, sample.device.type, with_gradients)
    cached = _CACHE.setdefault(model, {})
    if key in cached:
        return cached[key]
    sizes: list[int] = []
    workspaces: list[int] = [0]

    def record(module: nn.Module, args: Any, output: Any) -> None:
        if isinstance(output, Tensor):
            sizes.append(output.numel() * output.element_size())
            if isinstance(module, nn.modules.conv._ConvNd):  # the unfolded input (im2col)
                per_position = module.in_channels // module.groups * prod(module.kernel_size)
                workspaces.append(per_position * prod(output.shape[2:]) * output.element_size())

    leaves = [m for m in model.modules() if not list(m.children())]
    with forward_hooks((m, record) for m in leaves), torch.inference_mode():
        model(sample[:1])
    input_bytes = sample[:1].numel() * sample.element_size()
    largest = max(sizes, default=input_bytes)
    passes = (5 * sum(sizes)) // 2 if with_gradients else 5 * largest
    estimate = passes + 2 * max(workspaces) + input_bytes
    cached[key] = estimate
    return estimate


def recorded_bytes(model: nn.Module, sample: Tensor, layer: nn.Module | None = None) -> int:
    """Measured bytes that one input of ``sample``'s shape adds to a pass that records
    gradients: from the input (``layer=None``, for ``d y / d x``) or from ``layer`` on (the
    network before it without a graph, for ``d y / d a`` at the layer).

    One pass over ``sample[:1]`` counts what autograd keeps for the backward pass (every tensor
    it saves, each storage once; parameters and buffers, which do not grow with the batch, are
    not counted), and adds the input and five times the largest output of any module for what
    is alive beside it, as :func:`sample_bytes` counts a pass without gradients: the forward
    pass holds an operation's input and output (the network before ``layer`` may take fused
    paths, such as PyTorch's transformer fast path, whose temporaries are no module's output),
    the backward pass the gradient being computed, the one it comes from and a branch's
    gradient waiting to be added to it (a residual block). Measured once per model, shape and
    layer; ``benchmarks/captum_parity_speed.py --memory`` checks the chunks it gives against
    the process's peak memory.
    """
    key = (tuple(sample.shape[1:]), sample.dtype, sample.device.type, id(layer))
    cached = _RECORDED.setdefault(model, {})
    if key in cached:
        return cached[key]
    constant = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    kept: dict[int, int] = {}
    largest = [0]

    def keep(tensor: Tensor) -> Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in constant:
            kept[storage.data_ptr()] = storage.nbytes()
        return tensor

    def record(module: nn.Module, args: Any, output: Any) -> None:
        if isinstance(output, Tensor):
            largest[0] = max(largest[0], output.numel() * output.element_size())

    leaves = [m for m in model.modules() if not list(m.children())]
    with forward_hooks((m, record) for m in leaves), torch.inference_mode(False), \
            torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        one = sample[:1].detach().clone()  # its own storage, not a view of the batch
        if layer is None:
            with torch.enable_grad():
                model(one.requires_grad_(True))
        else:
            forward_with_capture(model, one, {"layer": layer}, with_gradients=True)
    input_bytes = sample[:1].numel() * sample.element_size()
    cached[key] = sum(kept.values()) + 5 * largest[0] + input_bytes
    return cached[key]


def budget_bytes(memory_budget: Any) -> int:
    """``memory_budget=`` of a method, checked: a positive whole number of bytes."""
    if isinstance(memory_budget, bool) or not isinstance(memory_budget, int) or (
            memory_budget <= 0):
        raise ValueError(
            f"memory_budget must be a positive number of bytes (an int, such as 256 << 20 for "
            f"256 MiB), not {memory_budget!r}"
        )
    return memory_budget


def items_per_chunk(model: nn.Module, sample: Tensor, budget: int, *,
                    with_gradients: bool = False, extra_per_item: int = 0) -> int:
    """How many perturbed inputs one chunk may hold within ``budget`` bytes (at least 1).

    ``extra_per_item`` counts what the method itself keeps per input (its mask, say)."""
    per_item = sample_bytes(model, sample, with_gradients=with_gradients) + extra_per_item
    per_item += sample[:1].numel() * sample.element_size()  # the perturbed input itself
    return max(1, budget // per_item)


def progress(total: int, description: str, *, show: bool | None = None) -> Any:
    """A progress bar (``tqdm``) over ``total`` model passes: shown when ``show`` is True, or
    when it is None, the work is long (100 passes or more) and standard error is a terminal."""
    from tqdm.auto import tqdm

    if show is None:
        show = total >= 100 and sys.stderr.isatty()
    bar = tqdm(total=total, desc=description, disable=not show, leave=False, unit="input")
    watcher = _WATCHER.get()
    return bar if watcher is None else _Watched(bar, total, description, watcher)


@contextmanager
def watched(watcher: Watcher) -> Iterator[None]:
    """Within this block (in this thread or task), every :func:`progress` bar also reports its
    steps to ``watcher``; an exception the watcher raises stops the computation at that step,
    and leaves through the method's own clean-up (hooks removed, the model as it was)."""
    token = _WATCHER.set(watcher)
    try:
        yield
    finally:
        _WATCHER.reset(token)


class _Watched:
    """A progress bar that also tells a watcher of each step."""

    def __init__(self, bar: Any, total: int, description: str, watcher: Watcher) -> None:
        self._bar, self._total, self._description, self._watcher = bar, total, description, watcher
        self._done = 0

    def update(self, n: int = 1) -> None:
        self._bar.update(n)
        self._done += n
        self._watcher(self._done, self._total, self._description)

    def __enter__(self) -> _Watched:
        self._bar.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._bar.__exit__(*exc)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._bar, name)


def channels_last(batch: Tensor) -> Tensor:
    """A batch of perturbed images ``(n, C, H, W)`` in channels-last memory, which oneDNN's
    convolutions run about 1.2x faster on a CPU for batches of several images (the same values,
    up to float rounding); other shapes are returned as they are."""
    return batch.contiguous(memory_format=torch.channels_last) if batch.ndim == 4 else batch
