"""Functional activations after a layer: explain what the rest of the network reads.

A network may apply an activation to a module's output in its own ``forward``, as a function
rather than a module. torchvision's DenseNet ends with ``F.relu(self.features(x), inplace=True)``:
the classifier reads ``relu(norm5)``, while the module ``features.norm5`` returns the values
before that ReLU. Explaining the module's output there is wrong: on a head of global average
pooling and a linear layer, Grad-CAM of ``relu(A)`` equals CAM (Selvaraju et al., ICCV 2017,
Sec. 3.1), Grad-CAM of ``A`` does not.

:class:`FirstReads` finds these activations at run time, with no list of architectures: a hook
hands on, in place of each tensor it watches, an alias of it (the same values, the same autograd
graph) whose first read comes to heatlens (a tensor subclass's ``__torch_function__``, so every
other operation of the forward pass runs at full speed). When that first read is one of
:data:`ACTIVATIONS` called outside an activation module, the watcher is called back. An
activation module (``nn.ReLU``, or any module without submodules that applies one) is a layer of
its own, which the user can name; it is not followed. Operations that only read a tensor's
shape or type do not count as reads.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ACTIVATIONS: dict[Any, str] = {
    **dict.fromkeys((torch.relu, torch.relu_, Tensor.relu, Tensor.relu_, F.relu), "ReLU"),
    **dict.fromkeys((F.relu6, torch._C._nn.relu6, torch._C._nn.relu6_), "ReLU6"),
    **dict.fromkeys((F.hardtanh, F.hardtanh_), "Hardtanh"),
    **dict.fromkeys((F.elu, F.elu_), "ELU"),
    **dict.fromkeys((F.leaky_relu, F.leaky_relu_), "LeakyReLU"),
    F.silu: "SiLU", F.gelu: "GELU", F.selu: "SELU", F.celu: "CELU", F.mish: "Mish",
    F.hardswish: "Hardswish", F.softplus: "Softplus", F.prelu: "PReLU",
}
"""Element-wise activations, as the functions a ``forward`` calls, and their names."""

Follower = Callable[[str, Callable[[], Any], Tensor], Any]
"""Called instead of the activation: ``(description, run, watched) -> result``. ``run()`` applies
the activation as the model asked (in place where it asked); ``description`` says which and
where, such as ``"a functional ReLU in DenseNet.forward"``; what it returns, the model gets."""

_SKIPPED = tuple(str(Path(torch.__file__).parent / name)
                 for name in ("overrides.py", "nn/functional.py", "_tensor.py"))


class FirstReads:
    """Within the ``with`` block, calls a :data:`Follower` where a watched tensor is first read
    by a functional activation; any other first read ends that tensor's watch. When the block
    ends, every alias it handed on is a plain tensor again (nothing of heatlens stays with a
    tensor the model keeps). See the module docstring."""

    def __init__(self) -> None:
        self._quiet = False
        self._aliases: dict[int, _WatchedAlias] = {}

    def __enter__(self) -> FirstReads:
        return self

    def __exit__(self, *exc: object) -> None:
        for alias in self._aliases.values():
            alias.__class__ = Tensor
            del alias.watch
        self._aliases.clear()

    def watch(self, tensor: Tensor, follower: Follower) -> Tensor:
        """Watch ``tensor``: returns what to hand on in its place, an alias of it (``tensor``
        itself when it is an alias this block made, its earlier follower replaced)."""
        alias = self._aliases.get(id(tensor))
        if alias is not tensor:
            alias = tensor.as_subclass(_WatchedAlias)
            self._aliases[id(alias)] = alias
        alias.watch = (self, follower)
        return alias

    @contextmanager
    def quiet(self) -> Iterator[None]:
        """Operations inside the block (heatlens' own, in a hook) are not reads."""
        self._quiet, before = True, self._quiet
        try:
            yield
        finally:
            self._quiet = before


class _WatchedAlias(Tensor):
    """An alias of a watched tensor, handed on in its place; ``watch`` is its
    :class:`FirstReads` and follower until the first read (then ``None``). Every operation on
    it returns plain tensors (an in-place one returns the alias itself)."""

    watch: tuple[FirstReads, Follower] | None

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: tuple = (),
                           kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        with torch._C.DisableTorchFunctionSubclass():
            read = [t for t in _tensors(args, kwargs)
                    if isinstance(t, _WatchedAlias) and t.watch is not None]
            if not read or read[0].watch[0]._quiet:
                return func(*args, **kwargs)
            if func in ACTIVATIONS and args and args[0] is read[0]:
                where = _caller()
                if where is not None:
                    _, follower = read[0].watch
                    read[0].watch = None
                    return follower(f"a functional {ACTIVATIONS[func]} in {where}",
                                    lambda: func(*args, **kwargs), read[0])
            result = func(*args, **kwargs)
            if isinstance(result, Tensor | list) or (isinstance(result, tuple)
                                                     and not isinstance(result, torch.Size)):
                for tensor in read:  # a read (not a shape, a type, a flag)
                    tensor.watch = None
            return result


def _tensors(args: tuple, kwargs: dict) -> Iterator[Tensor]:
    for value in (*args, *kwargs.values()):
        if isinstance(value, Tensor):
            yield value
        elif isinstance(value, list | tuple):
            yield from (v for v in value if isinstance(v, Tensor))


def _caller() -> str | None:
    """Where the operation being dispatched was called: ``"DenseNet.forward"``, or a function's
    name; ``None`` inside an activation module (a module without submodules)."""
    frame = sys._getframe(2)  # the caller of __torch_function__
    while frame is not None and frame.f_code.co_filename.startswith(_SKIPPED):
        frame = frame.f_back
    if frame is None:
        return "the model's code"
    owner = frame.f_locals.get("self")
    if isinstance(owner, nn.Module):
        if next(owner.children(), None) is None:
            return None
        return f"{type(owner).__name__}.{frame.f_code.co_name}"
    return f"{frame.f_code.co_name}()"
