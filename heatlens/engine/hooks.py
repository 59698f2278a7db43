"""Forward hooks for one call: the one place where heatlens touches the user's modules.

Every hook heatlens sets is installed by :func:`forward_hooks`, which keeps the promise "the model
comes back as it went in" in one function (``docs/design.md``, promises 1, 2 and 11):

* hooks act only on the thread that installed them, so threads sharing one model do not see
  each other's hooks (another thread's forward pass runs as if they were not there);
* hooks are removed in ``finally``, also when the forward pass, or a hook, raises;
* nothing else of the model is changed.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

from torch import nn

Hook = Callable[..., Any]
"""A forward hook ``(module, args, output) -> replacement or None``; with ``with_kwargs=True``
``(module, args, kwargs, output)``."""


@contextmanager
def forward_hooks(hooks: Iterable[tuple[nn.Module, Hook]], *, with_kwargs: bool = False
                  ) -> Iterator[None]:
    """Install each ``(module, hook)`` as a forward hook for the calls made inside the block on
    this thread, and remove every one of them when the block ends, however it ends."""
    owner = threading.get_ident()

    def on_this_thread(hook: Hook) -> Hook:
        def guarded(*args: Any) -> Any:
            return hook(*args) if threading.get_ident() == owner else None

        return guarded

    handles = []
    try:
        for module, hook in hooks:
            handles.append(module.register_forward_hook(on_this_thread(hook),
                                                        with_kwargs=with_kwargs))
        yield
    finally:
        for handle in handles:
            handle.remove()
