"""Non-negative matrix factorization ``A ≈ W H`` by multiplicative updates, in torch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = ["Factorization", "check_int", "nmf"]

_CHECK_EVERY = 10  # iterations between two evaluations of the reconstruction error


@dataclass(frozen=True)
class Factorization:
    """``A ≈ W H`` found by :func:`nmf`.

    Attributes:
        weights: ``W``, ``(N, k)``, non-negative; each column's maximum is 1 (or the column is 0).
        components: ``H``, ``(k, C)``, non-negative.
        relative_error: ``||A - W H||_F / ||A||_F`` (0 for ``A = 0``).
        iterations: multiplicative-update iterations run.
        converged: whether the tolerance was met before ``max_iter``.
    """

    weights: Tensor
    components: Tensor
    relative_error: float
    iterations: int
    converged: bool


def nmf(matrix: Tensor, n_components: int, *, seed: int = 0, max_iter: int = 1000,
        tol: float = 1e-5) -> Factorization:
    """Non-negative matrix factorization ``A ≈ W H`` minimising ``||A - W H||_F^2``.

    Multiplicative updates of Lee and Seung ("Algorithms for Non-negative Matrix Factorization",
    NIPS 2001, Theorem 1), which never increase the error and keep both factors non-negative::

        H <- H * (W^T A) / (W^T W H)
        W <- W * (A H^T) / (W H H^T)

    Each denominator is clamped at the smallest normal float of the dtype, a guard against 0 / 0
    that leaves every other value as it is. ``W`` and ``H`` start uniform in
    ``[0, sqrt(mean(A) / k))``, drawn from a generator seeded with ``seed`` on the matrix's device
    (the global random state is not used). Every 10 iterations the relative error
    ``e = ||A - W H||_F / ||A||_F`` is evaluated; the updates stop when ``e`` fell by at most
    ``tol`` times its previous value over those 10 iterations, or after ``max_iter`` iterations.

    The result is put in a canonical form, since ``(W D, D^-1 H)`` fits equally well for any
    positive diagonal ``D``: each column of ``W`` is scaled to a maximum of 1 (so a row of ``H`` is
    the concept at its strongest position), and components are ordered by their part of the
    reconstruction, ``||W_j||_2 · ||H_j||_2``, largest first.

    Args:
        matrix: ``A``, ``(N, C)``, non-negative, finite. Computed in float32, or float64 if given.
        n_components: ``k >= 1``; at most ``C`` is useful.
        seed: seed of the initialisation; the same seed gives the same result.
        max_iter: maximum number of iterations, ``>= 1``.
        tol: relative tolerance of the stopping rule, ``>= 0`` (0: run ``max_iter`` iterations).
    """
    if matrix.ndim != 2:
        raise ValueError(f"nmf needs a matrix (N, C), got shape {tuple(matrix.shape)}")
    check_int(n_components, "n_components", 1)
    check_int(max_iter, "max_iter", 1)
    check_int(seed, "seed", None)
    if not tol >= 0:
        raise ValueError(f"tol must be a number >= 0, got {tol!r}")
    work = matrix.detach().to(torch.promote_types(matrix.dtype, torch.float32))
    if not bool(torch.isfinite(work).all()):
        raise ValueError("nmf needs a finite matrix; the activations hold NaN or infinite values")
    if bool((work < 0).any()):
        raise ValueError("nmf needs a non-negative matrix; clamp it at 0 first (A.clamp_min(0))")
    rows, cols = work.shape
    norm = torch.linalg.matrix_norm(work)
    if float(norm) == 0.0:
        zeros = work.new_zeros
        return Factorization(zeros(rows, n_components), zeros(n_components, cols), 0.0, 0, True)

    generator = torch.Generator(device=work.device).manual_seed(seed)
    scale = (work.mean() / n_components).sqrt()
    w = torch.rand(rows, n_components, generator=generator, device=work.device,
                   dtype=work.dtype) * scale
    h = torch.rand(n_components, cols, generator=generator, device=work.device,
                   dtype=work.dtype) * scale
    tiny = torch.finfo(work.dtype).tiny
    previous = float("inf")
    converged = False
    iteration = 0
    while iteration < max_iter:
        iteration += 1
        h = h * (w.T @ work) / ((w.T @ w) @ h).clamp_min(tiny)
        w = w * (work @ h.T) / (w @ (h @ h.T)).clamp_min(tiny)
        if iteration % _CHECK_EVERY == 0:
            error = float(torch.linalg.matrix_norm(work - w @ h) / norm)
            if previous < float("inf") and previous - error <= tol * previous:
                converged = True
                break
            previous = error
    error = float(torch.linalg.matrix_norm(work - w @ h) / norm)
    w, h = _canonical(w, h)
    return Factorization(w, h, error, iteration, converged)


def _canonical(w: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
    """Scale each column of ``w`` to a maximum of 1 (``h`` inversely) and order the components
    by ``||w_j|| · ||h_j||``, largest first."""
    peak = w.amax(dim=0)
    peak = torch.where(peak > 0, peak, torch.ones_like(peak))
    w, h = w / peak, h * peak[:, None]
    order = torch.argsort(torch.linalg.vector_norm(w, dim=0) * torch.linalg.vector_norm(h, dim=1),
                          descending=True, stable=True)
    return w[:, order], h[order]



def check_int(value: Any, name: str, minimum: int | None) -> None:
    """Refuse a value that is not an int (bools too) or lies below ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be at least {minimum}, got {value}")
