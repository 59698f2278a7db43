"""Noisy linear imputation (ROAD): removed pixels are filled in from their neighbours instead of
being painted over with a constant.

Rong, Leemann, Borisov, Kasneci and Kasneci, "A Consistent and Efficient Evaluation Strategy for
Attribution Methods", ICML 2022. If a removal metric (MoRF / LeRF) sets removed pixels to
a constant, the shape of the removed set tells the model which pixels the attribution ranked
highest. Filling each removed pixel with the mean of its neighbours, plus a little noise, tells it
far less.

The whole batch is computed at once in torch, on the images' device (``docs/design.md``,
promise 6). The linear systems are solved matrix-free by preconditioned conjugate gradients, with
one depthwise 3 x 3 convolution per iteration for every image and channel.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from heatlens.engine.notices import warn

EDGE = 1 / 6
"""Weight of each of the 4 edge neighbours (left, right, above, below)."""
DIAGONAL = 1 / 12
"""Weight of each of the 4 diagonal neighbours. ``4 * EDGE + 4 * DIAGONAL = 1``."""
MAX_ITER = 200
"""Default iteration bound. Masks of the top pixels of smooth or noisy maps, random masks and
blocks that remove 10 to 90 % of a 64 or 224 px image converge to ``tol = 1e-6`` in 15 to 32
iterations; 1024 px images in up to 36."""


def noisy_linear_impute(images: Tensor, removed: Tensor, *, noise: float = 0.01,
                        generator: torch.Generator | None = None, tol: float = 1e-6,
                        max_iter: int | None = None) -> Tensor:
    """ROAD's noisy linear imputation (Rong et al., ICML 2022) of the ``removed`` pixels of
    ``images``.

    ``images`` is ``(N, C, H, W)`` floating point. ``removed`` is ``(N, H, W)`` bool, True where a
    pixel is removed (all its channels). Only bool is accepted: ROAD's reference code marks the
    pixels it keeps with 1, so a 0/1 float mask could mean either. Returns a new tensor of the
    input's dtype. Known pixels are copied bit for bit. Each removed pixel ``i`` becomes the
    weighted mean of its 8 neighbours ``j`` in the result ``u``, and removed neighbours count with
    their own imputed values::

        u_i = sum_j w_ij u_j / S_i,     S_i = sum_j w_ij,
        w_ij = 1/6 (edge neighbour), 1/12 (diagonal neighbour), 0 (not a neighbour, or outside).

    Outside the image there are no neighbours, so ``S_i`` is 1 inside the image, 2/3 on an edge
    and 5/12 in a corner. With ``R`` the removed pixels, ``K`` the known ones and ``v`` their
    values, this is one linear system per image and channel (a discrete harmonic
    interpolation)::

        (diag(S_R) - W_RR) x = W_RK v.

    The matrix is symmetric and diagonally dominant, and positive definite whenever the image
    keeps at least one pixel. An image with every pixel removed has no solution and raises
    ValueError. Then ``noise * N(0, 1)``, drawn from ``generator``, is added to the removed pixels
    only (``noise=0`` gives a deterministic result). The values are computed in float64 and
    without autograd.

    The system is solved by conjugate gradients (:func:`harmonic_cg`) until the residual of every
    image and channel is below ``tol`` times its right-hand side, or for at most ``max_iter``
    iterations (default :data:`MAX_ITER`; if that is not enough, a warning says how far it got).
    The result matches a direct sparse solve to about ``1e-5`` on images in [0, 1].

    The reference is Leemann's ``NoisyLinearImputer`` (road_evaluation ``imputations.py``, also
    pytorch-grad-cam 1.5.7 ``metrics/road.py``). It has the same weights and the same system, with
    the opposite sign. It assembles the system in SciPy for one ``(C, H, W)`` image on the CPU,
    solves it with ``spsolve``, and returns float32. Its mask is 1 where a pixel is kept. It draws
    its noise from the global generator. Its constructor accepts ``weighting`` but ignores it and
    always uses the module-level weights.
    """
    _check(images, removed, noise, tol, max_iter)
    if images.shape[0] == 0 or not bool(removed.any()):
        return images.clone()
    with torch.no_grad():
        m = removed[:, None]
        values = torch.where(m, 0.0, images.double())
        solved, steps, worst = harmonic_cg(values, m, tol=tol,
                                           max_iter=MAX_ITER if max_iter is None else max_iter)
        if worst > tol:
            warn(f"noisy linear imputation stopped after {steps} iterations with a relative "
                 f"residual of {worst:.1e}, above tol={tol:g}: pass a larger max_iter")
        if noise:
            shape, device = images.shape, images.device
            solved = solved + m * noise * torch.randn(shape, generator=generator,
                                                      device=device, dtype=solved.dtype)
        return torch.where(m, solved.to(images.dtype), images)


def _check(images: Tensor, removed: Tensor, noise: float, tol: float, max_iter: int | None
           ) -> None:
    """Raise a one-line error naming what is wrong with the arguments and how to fix it."""
    if not isinstance(images, Tensor) or images.ndim != 4:
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"images must be a (N, C, H, W) tensor, got {shape}: add the batch "
                         "dimension with images[None]")
    if not images.is_floating_point():
        raise TypeError(f"images must be floating point, got {images.dtype}: convert them with "
                        "images.float()")
    if not isinstance(removed, Tensor) or removed.dtype != torch.bool:
        kind = removed.dtype if isinstance(removed, Tensor) else type(removed).__name__
        raise TypeError(f"removed must be a bool tensor (True = pixel removed), got {kind}: "
                        "pass mask.bool() if 1 marks the removed pixels, or mask == 0 if 1 marks "
                        "the kept ones (pytorch-grad-cam's NoisyLinearImputer)")
    n, _, h, w = images.shape
    if tuple(removed.shape) != (n, h, w):
        raise ValueError(f"removed must have shape (N, H, W) = {(n, h, w)} to match images of "
                         f"shape {tuple(images.shape)}, got {tuple(removed.shape)}: one mask per "
                         "image, shared by its channels")
    if removed.device != images.device:
        raise ValueError(f"removed is on {removed.device} but images on {images.device}: move it "
                         "with removed.to(images.device)")
    if not noise >= 0:
        raise ValueError(f"noise must be a standard deviation >= 0, got {noise}")
    if not tol > 0:
        raise ValueError(f"tol must be > 0, got {tol}")
    if max_iter is not None and max_iter < 1:
        raise ValueError(f"max_iter must be >= 1 (or None for {MAX_ITER}), got {max_iter}")
    empty = removed.flatten(1).all(dim=1).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"image {empty[0]} of the batch of {n} has every pixel removed "
                         f"({len(empty)} such images): noisy linear imputation needs at least "
                         "one known pixel to fill in from")
    bad = ~images.isfinite() & ~removed[:, None]
    if bool(bad.any()):
        first = int(bad.flatten(1).any(dim=1).nonzero()[0])
        raise ValueError(f"image {first} of the batch of {n} holds NaN or infinite values in "
                         f"pixels it keeps ({int(bad[first].sum())} of {bad[first].numel()}): "
                         "they would spread to every pixel imputed from them")


def neighbour_sum(x: Tensor) -> Tensor:
    """``sum_j w_ij x_j`` over the 8 neighbours ``j`` of every pixel ``i`` of ``x`` ``(N, C, H,
    W)``: one depthwise 3 x 3 convolution, whose zero padding drops neighbours outside."""
    e, d = EDGE, DIAGONAL
    return depthwise(F.conv2d, x, x.new_tensor([[d, e, d], [e, 0.0, e], [d, e, d]]), padding=1)


def depthwise(conv: Callable[..., Tensor], x: Tensor, kernel: Tensor, **options: object
              ) -> Tensor:
    """``conv`` (``F.conv2d`` or ``F.conv_transpose2d``) of every image and channel of ``x``
    ``(N, C, H, W)`` with one 2-D ``kernel``, as a single ``(1, N * C, H, W)`` call with
    ``groups = N * C``. That is faster on the CPU than ``groups = C`` over a batch (5x for
    18 x 3 x 224 x 224 in float64)."""
    n, c = x.shape[:2]
    flat = x.reshape(1, n * c, *x.shape[2:])
    out = conv(flat, kernel.expand(n * c, 1, *kernel.shape).contiguous(), groups=n * c,
               **options)
    return out.reshape(n, c, *out.shape[2:])


def harmonic_cg(values: Tensor, removed: Tensor, *, tol: float, max_iter: int,
                levels: int | None = None) -> tuple[Tensor, int, float]:
    """Solve ``(diag(S) - W_RR) x = W_RK v`` for every image and channel of ``values``
    ``(N, C, H, W)`` (0 at the ``removed`` pixels, ``(N, 1, H, W)`` bool) by the preconditioned
    conjugate gradient method (Hestenes & Stiefel, 1952).

    Returns ``values`` with ``x`` filled in, the number of iterations, and the largest relative
    residual ``|r| / |W_RK v|`` left. The systems are stacked. The ones that have converged stop
    changing while the others go on. The preconditioner is :func:`multilevel_preconditioner`
    with ``levels`` coarse grids (default: down to 2 x 2; 0 is the Jacobi preconditioner
    ``r / S`` alone). It changes the number of iterations, not the solution.
    """
    m = removed.to(values.dtype)
    total = neighbour_sum(torch.ones_like(values[:1, :1]))  # S_i
    precondition = multilevel_preconditioner(m, total, levels)

    def apply(p: Tensor) -> Tensor:  # (diag(S) - W_RR) p, for p zero at the known pixels
        return neighbour_sum(p).neg_().addcmul_(total, p).mul_(m)

    def dot(a: Tensor, b: Tensor) -> Tensor:  # one inner product per image and channel
        return torch.linalg.vecdot(a.flatten(2), b.flatten(2))[..., None, None]

    def norm(a: Tensor) -> Tensor:
        return torch.linalg.vector_norm(a, dim=(2, 3), keepdim=True)

    r = neighbour_sum(values).mul_(m)  # W_RK v
    x = torch.zeros_like(values)
    threshold = tol * norm(r)
    z = precondition(r)
    p, rz = z, dot(r, z)
    active = norm(r) > threshold
    steps = 0
    while bool(active.any()) and steps < max_iter:
        q = apply(p)
        alpha = torch.where(active, rz / dot(p, q).where(active, 1.0), 0.0)
        x.addcmul_(alpha, p)
        r.addcmul_(alpha, q, value=-1)
        steps += 1
        active = active & (norm(r) > threshold)
        z = precondition(r)
        rz, rz_last = dot(r, z), rz
        p = torch.addcmul(z, torch.where(active, rz / rz_last.where(active, 1.0), 0.0), p)
    worst = float((norm(r) / threshold.clamp_min(1e-300)).max()) * tol
    return values + x, steps, worst


def multilevel_preconditioner(removed: Tensor, total: Tensor, levels: int | None = None
                              ) -> Callable[[Tensor], Tensor]:
    """The preconditioner ``B r = m * (r / S + sum_l P_l Theta_l P_l^T r)``, for ``removed``
    ``m`` ``(N, 1, H, W)`` (float 0/1) and ``total`` ``S`` ``(1, 1, H, W)``.

    This is multilevel diagonal scaling (Bramble, Pasciak & Xu, Math. Comp. 1990). Jacobi alone
    (``levels=0``) needs 300 to 600 iterations to fill a large block of a 224 px image, because
    smooth errors move by about one pixel per iteration. The coarse terms correct them on grids of
    every ``2^l``-th pixel. ``P_l`` is bilinear interpolation from level ``l``, whose hat function
    ``phi_j`` has half-width ``2^l``. The last node of each level lies on or past the far edge,
    so the hats sum to 1 everywhere.

    ``Theta_l`` is one over an estimate of ``<m phi_j, A m phi_j>``, the energy of the hat cut
    to the removed pixels. With ``g_i = sum_{k in K} w_ik``, the weight of the known neighbours
    of ``i``, the energy is ``x^T A x = 1/2 sum_{i, j in R} w_ij (x_i - x_j)^2 +
    sum_{i in R} g_i x_i^2``. The second sum is computed exactly for ``x = m phi_j``. The first
    is taken as 1 (a whole hat's is 8/9; 1 converged a little faster) times the share of
    ``phi_j^2`` inside the image.
    Coarse corrections are therefore damped where known pixels already pin the solution down
    (a random mask), and kept where they do not (a large block).

    Every term is symmetric positive semi-definite and the first is definite, so conjugate
    gradients converge to the same solution with any ``levels``.
    """
    h, w = removed.shape[2:]
    if levels is None:
        levels = max(0, (max(h, w) - 2).bit_length())  # down to at most 2 nodes per side
    scales = coarse_scales(removed, total, levels)
    inverse = 1 / total

    def precondition(r: Tensor) -> Tensor:
        pyramid = [r]
        for _ in scales:
            pyramid.append(restrict(pyramid[-1]))
        correction = torch.zeros_like(pyramid[-1])
        for level in range(levels, 0, -1):  # sum_l P_l Theta_l P_l^T r, coarsest first
            correction = torch.addcmul(correction, scales[level - 1], pyramid[level])
            correction = prolong(correction, pyramid[level - 1].shape[2:])
        return torch.addcmul(correction, r, inverse).mul_(removed)

    return precondition


def coarse_scales(removed: Tensor, total: Tensor, levels: int) -> list[Tensor]:
    """``Theta_l`` ``(N, 1, h_l, w_l)`` for ``l = 1 .. levels``, see
    :func:`multilevel_preconditioner`."""
    known_weight = removed * (total - neighbour_sum(removed))  # g_i
    inside = torch.ones_like(total)
    scales = []
    for level in range(1, levels + 1):
        half = 2**level
        offsets = torch.arange(1 - half, half, dtype=total.dtype, device=total.device)
        squared = (1 - offsets.abs() / half) ** 2  # the 1-D hat phi, squared
        mass = squared.sum() ** 2
        scales.append(1 / (_hat_sums(inside, squared, half) / mass
                           + _hat_sums(known_weight, squared, half)))
    return scales


def _hat_sums(x: Tensor, squared: Tensor, stride: int) -> Tensor:
    """``sum_i phi_j(i)^2 x_i`` for every node ``j`` of the level with that ``stride``: two 1-D
    convolutions of ``x`` ``(N, 1, H, W)``, padded so the last node is on or past the far
    edge."""
    h, w = x.shape[2:]
    size = [((n - 2) // stride + 1) * stride + 1 if n > 1 else 1 for n in (h, w)]
    x = F.pad(x, (0, size[1] - w, 0, size[0] - h))
    x = depthwise(F.conv2d, x, squared[None, :], stride=(1, stride), padding=(0, stride - 1))
    return depthwise(F.conv2d, x, squared[:, None], stride=(stride, 1), padding=(stride - 1, 0))


def _tent(x: Tensor) -> Tensor:
    """The 3 x 3 kernel of bilinear interpolation by a factor 2."""
    line = x.new_tensor([0.5, 1.0, 0.5])
    return line[:, None] * line[None, :]


def restrict(r: Tensor) -> Tensor:
    """``P^T r``: the tent-weighted sums of ``r`` ``(N, C, H, W)`` at every other pixel, with
    one node more past an even-sized edge (``ceil((H - 1) / 2) + 1`` rows)."""
    h, w = r.shape[2:]
    r = F.pad(r, (0, 1 - w % 2, 0, 1 - h % 2))
    return depthwise(F.conv2d, r, _tent(r), stride=2, padding=1)


def prolong(c: Tensor, size: torch.Size) -> Tensor:
    """``P c``: bilinear interpolation of the nodes ``c`` to the finer grid of ``size``, the
    adjoint of :func:`restrict`."""
    fine = depthwise(F.conv_transpose2d, c, _tent(c), stride=2, padding=1)
    return fine[..., : size[0], : size[1]]
