"""One intra-op torch thread for a block of tests (imported by the test files that use it).

Many small forward passes run faster on one thread than on two that share a busy 2-core
machine, and some comparisons need one summation order; the count is restored afterwards."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def one_intraop_thread() -> Iterator[None]:
    """``torch.set_num_threads(1)`` inside the block, the previous count after it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
