"""Noisy linear imputation (ROAD): removed pixels are filled in from their neighbours instead of
being painted over with a constant.

Rong, Leemann, Borisov, Kasneci and Kasneci, "A Consistent and Efficient Evaluation Strategy for
Attribution Methods", ICML 2022. If a removal metric (MoRF / LeRF) sets removed pixels to
a constant, the shape of the removed set tells the model which pixels the attribution ranked
highest. Filling each removed pixel with the mean of its neighbours, plus a little noise, tells it
far less.

The whole batch is computed at once in torch, on the images' device (``docs/design.md``,
promise 6). The linear systems are solved matrix-free by preconditioned conjugate gradients in
float32, corrected in float64 (iterative refinement); the 3 x 3 stencil and the multilevel
preconditioner are sums of shifted slices.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

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
blocks that remove 10 to 90 % of a 64 or 224 px image converge to ``tol = 1e-6`` in 14 to 28
iterations, the 18 ROAD masks of a Grad-CAM map of a 224 px image together in 32; 1024 px
images in up to 39."""


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
    only (``noise=0`` gives a deterministic result). The residuals are computed in float64 and the
    corrections in float32 (see :func:`harmonic_cg`), without autograd.

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
            solved = solved + noise * torch.randn(shape, generator=generator,
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


def tent(x: Tensor) -> Tensor:
    """``sum_j t_ij x_j`` with the 3 x 3 kernel ``t = [1, 2, 1]^T [1, 2, 1]``, zero outside ``x``
    ``(N, C, H, W)``: one pass along each axis, adding shifted slices (1.5 to 2 times faster than
    a depthwise 3 x 3 convolution on the CPU)."""
    p = x.new_zeros(*x.shape[:-2], x.shape[-2] + 2, x.shape[-1] + 2)
    p[..., 1:-1, 1:-1] = x  # faster than F.pad
    rows = torch.add(p[..., :-2], p[..., 2:]).add_(p[..., 1:-1], alpha=2)
    return torch.add(rows[..., :-2, :], rows[..., 2:, :]).add_(rows[..., 1:-1, :], alpha=2)


def neighbour_sum(x: Tensor) -> Tensor:
    """``sum_j w_ij x_j`` over the 8 neighbours ``j`` of every pixel ``i`` of ``x`` ``(N, C, H,
    W)``, zero outside: ``w`` is the tent without its centre, ``w = (t - 4 delta) / 12``."""
    return tent(x).div_(12).sub_(x, alpha=1 / 3)


REFINEMENT = 1e-4
"""How far each float32 solve of :func:`harmonic_cg` reduces the residual it is given: well above
the float32 rounding floor (about ``1e-6`` relative for 224 px), and two solves reach ``tol =
1e-6``. On the 18 ROAD masks of a Grad-CAM map of a 224 px image, ``1e-2`` takes 38 iterations
in all, ``1e-3`` 36, and ``1e-4`` to ``1e-6`` 31 or 32."""


def harmonic_cg(values: Tensor, removed: Tensor, *, tol: float, max_iter: int,
                levels: int | None = None) -> tuple[Tensor, int, float]:
    """Solve ``(diag(S) - W_RR) x = W_RK v`` for every image and channel of ``values``
    ``(N, C, H, W)`` (float64, 0 at the ``removed`` pixels, ``(N, 1, H, W)`` bool) by the
    preconditioned conjugate gradient method in float32 with iterative refinement in float64.

    Returns ``values`` with ``x`` filled in, the number of iterations, and the largest relative
    residual ``|r| / |W_RK v|`` left. The systems are stacked. The ones that have converged stop
    changing while the others go on.

    With the tent ``t`` of :func:`tent`, ``W = (t - 4 delta) / 12`` and ``12 S + 4 = t 1`` (the
    tent summed over the pixels inside the image), so for ``u = v + x``, the image with ``x``
    filled in, 12 times the residual is::

        r = 12 (W_RK v - (diag(S) - W_RR) x) = m (t u - (t 1) u),

    with ``m`` the 0/1 mask of the removed pixels. Refinement (defect correction; Moler, J. ACM
    1967): ``r`` is computed in float64, the correction ``12 A d = r`` is solved in float32 by
    :func:`_pcg` until its residual is below :data:`REFINEMENT` times ``|r|``, and ``u += d``; until
    the float64 ``|r|`` is below ``tol`` times its first value, or ``max_iter`` float32 iterations
    in all. Float32 halves the memory traffic of every iteration (an 18 x 3 x 224 x 224 array
    takes 11 MB instead of 22, small enough for a large cache); each correction starts from
    ``|r| = 1`` (``r`` divided by its norm), so no image can overflow float32. The two solves
    take up to three iterations more than one float64 solve (32 and 27 instead of 29 and 26 for
    the 18 ROAD masks of a Grad-CAM and of a random map of a 224 px image), and the whole is
    about twice as fast.

    The preconditioner is :func:`multilevel_preconditioner` with ``levels`` coarse grids
    (default: down to 4 or 5 nodes per side; 0 is the Jacobi preconditioner ``r / S`` alone). It
    changes the number of iterations, not the solution.

    Speed, on the 18 ROAD masks of a 224 px image with 2 CPU threads: float32 iterations with
    float64 refinement, the stencil and the grid transfers as shifted slices (not grouped
    convolutions), the coarse scales without convolutions, and two coarse levels fewer take
    0.6 s where one float64 solve with convolutions took 2.4 s. Tried and not kept: a looser
    internal tolerance (``tol = 1e-5`` is 1.1e-4 away from a direct solve on the masks of a
    random map); solving on the bounding box of the removed pixels only (the masks of the
    ROAD fractions of one image cover all of it together); ``avg_pool2d`` and ``interpolate``
    for the grid transfers (slower than slices, or no faster).
    """
    m = removed.to(values.dtype)
    centre = tent(torch.ones_like(values[:1, :1]))  # t 1 = 12 S + 4

    def residual(u: Tensor) -> Tensor:  # m (t u - (t 1) u)
        return tent(u).addcmul_(centre, u, value=-1).mul_(m)

    inner = removed.float()
    solve = partial(_pcg, minus=-inner, centre=centre.float(),
                    precondition=multilevel_preconditioner(inner, levels))
    u = values.clone()
    r = residual(u)
    size = _norm(r)
    threshold = tol * size
    active = size > threshold
    steps = 0
    while bool(active.any()) and steps < max_iter:
        scale = torch.where(active, size, 1.0)
        goal = (threshold / scale).clamp_min(REFINEMENT).float()
        d, taken = solve((r / scale).float().mul_(active), goal, max_iter - steps)
        u.addcmul_(d.to(u.dtype), scale)
        steps += taken
        r = residual(u)
        size = _norm(r)
        active = size > threshold
    worst = float((size / threshold.clamp_min(1e-300)).max()) * tol
    return u, steps, worst


def _pcg(b: Tensor, goal: Tensor, max_iter: int, *, minus: Tensor, centre: Tensor,
         precondition: Callable[[Tensor], Tensor]) -> tuple[Tensor, int]:
    """Preconditioned conjugate gradients (Hestenes & Stiefel, 1952) for ``12 A d = b``, ``b``
    ``(N, C, H, W)`` 0 at the known pixels, until ``|b - 12 A d| <= goal |b|`` for each image and
    channel, or ``max_iter`` iterations. Returns ``d`` and the number of iterations. ``minus`` is
    ``-m``, ``centre`` is ``t 1`` (see :func:`harmonic_cg`)."""

    def apply(p: Tensor) -> Tensor:  # 12 A p = m ((t 1) p - t p), for p zero at the known pixels
        return tent(p).addcmul_(centre, p, value=-1).mul_(minus)

    x = torch.zeros_like(b)
    r = b.clone()
    threshold = goal * _norm(r)
    active = _norm(r) > threshold
    z = precondition(r)
    p, rz = z, _dot(r, z)
    steps = 0
    while bool(active.any()) and steps < max_iter:
        q = apply(p)
        alpha = torch.where(active, rz / _dot(p, q).where(active, 1.0), 0.0)
        x.addcmul_(alpha, p)
        r.addcmul_(alpha, q, value=-1)
        steps += 1
        active = active & (_norm(r) > threshold)
        if not bool(active.any()):
            break
        z = precondition(r)
        rz, rz_last = _dot(r, z), rz
        beta = torch.where(active, rz / rz_last.where(active, 1.0), 0.0)
        p = torch.addcmul(z, beta, p, out=p)  # in place: p is no longer z
    return x, steps


def _dot(a: Tensor, b: Tensor) -> Tensor:
    """One inner product per image and channel, ``(N, C, 1, 1)``."""
    return torch.linalg.vecdot(a.flatten(2), b.flatten(2))[..., None, None]


def _norm(a: Tensor) -> Tensor:
    """One Euclidean norm per image and channel, ``(N, C, 1, 1)``."""
    return torch.linalg.vector_norm(a, dim=(2, 3), keepdim=True)


def multilevel_preconditioner(removed: Tensor, levels: int | None = None
                              ) -> Callable[[Tensor], Tensor]:
    """The preconditioner ``B r = m * (r / S + sum_l P_l Theta_l P_l^T r)``, for ``removed``
    ``m`` ``(N, 1, H, W)`` (float 0/1) and ``r`` ``(N, C, H, W)``, 0 at the known pixels.

    This is multilevel diagonal scaling (Bramble, Pasciak & Xu, Math. Comp. 1990). Jacobi alone
    (``levels=0``) needs 300 to 600 iterations to fill a large block of a 224 px image, because
    smooth errors move by about one pixel per iteration. The coarse terms correct them on grids of
    every ``2^l``-th pixel. ``P_l`` is bilinear interpolation from level ``l``, whose hat function
    ``phi_j`` has half-width ``2^l``. The last node of each level lies on or past the far edge,
    so the hats sum to 1 everywhere. ``P_l^T r`` is computed level by level with
    :func:`restrict`, and the sum from the coarsest level down with :func:`prolong`.

    ``Theta_l`` is one over an estimate of ``<m phi_j, A m phi_j>``, the energy of the hat cut
    to the removed pixels. With ``g_i = sum_{k in K} w_ik``, the weight of the known neighbours
    of ``i``, the energy is ``x^T A x = 1/2 sum_{i, j in R} w_ij (x_i - x_j)^2 +
    sum_{i in R} g_i x_i^2``. The second sum is computed exactly for ``x = m phi_j``. The first
    is taken as 1 (a whole hat's is 8/9; 1 converged a little faster) times the share of
    ``phi_j^2`` inside the image.
    Coarse corrections are therefore damped where known pixels already pin the solution down
    (a random mask), and kept where they do not (a large block).

    Every term is symmetric positive semi-definite and the first is definite, so conjugate
    gradients converge to the same solution with any ``levels``. The default stops at a coarsest
    grid of 4 or 5 nodes per side, two levels before 2: that saves a few iterations (on 64, 224
    and 1024 px masks the most is 23, 28 and 39 instead of 23, 29 and 42). Stopping earlier
    still costs iterations on large smooth masks (the 18 ROAD masks of a Grad-CAM map of a 224 px
    image: 32 iterations with 6 levels, 44 with 5, 70 with 4).
    """
    h, w = removed.shape[2:]
    if levels is None:
        levels = max(0, (max(h, w) - 2).bit_length() - 2)  # down to 4 or 5 nodes per side
    total = neighbour_sum(torch.ones_like(removed[:1]))  # S_i
    scales = coarse_scales(removed, total, levels)
    inverse = 1 / total

    def precondition(r: Tensor) -> Tensor:
        pyramid = [r]
        for _ in scales:
            pyramid.append(restrict(pyramid[-1]))
        correction = torch.zeros_like(pyramid[-1])
        for level in range(levels, 0, -1):  # sum_l P_l Theta_l P_l^T r, coarsest first
            correction.addcmul_(scales[level - 1], pyramid[level])
            correction = prolong(correction, pyramid[level - 1].shape[2:])
        return correction.mul_(removed).addcmul_(r, inverse)  # r / S is 0 where r is

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
        mass = ((1 - offsets.abs() / half) ** 2).sum() ** 2  # sum of a whole hat's phi^2
        scales.append(1 / (_hat_sums(inside, half) / mass + _hat_sums(known_weight, half)))
    return scales


def _hat_sums(x: Tensor, stride: int) -> Tensor:
    """``sum_i phi_j(i)^2 x_i`` for every node ``j`` of the level with that ``stride``, for ``x``
    ``(N, 1, H, W)``: the 1-D sums along the rows, then along the columns."""
    return _hat_sums_along(_hat_sums_along(x, stride).transpose(-1, -2), stride).transpose(-1, -2)


def _hat_sums_along(x: Tensor, stride: int) -> Tensor:
    """``sum_i (1 - |i - j stride| / stride)^2 x_i`` along the last dimension of ``x`` for the
    nodes ``j = 0, 1, ...`` up to the first on or past the far edge. Padded with ``stride`` zeros
    in front and cut into blocks of ``stride``: block ``j`` holds ``x`` from node ``j - 1`` up to
    node ``j``, so node ``j`` gets block ``j`` times the rising half of the hat and block
    ``j + 1`` times the falling half."""
    n = x.shape[-1]
    nodes = (n - 2) // stride + 2  # 1 for n = 1: (-1) // stride = -1
    rising = torch.arange(stride, dtype=x.dtype, device=x.device) / stride  # (i - (j-1) s) / s
    blocks = F.pad(x, (stride, nodes * stride - n)).unflatten(-1, (nodes + 1, stride))
    return blocks[..., :-1, :] @ rising**2 + blocks[..., 1:, :] @ (1 - rising) ** 2


def restrict(r: Tensor) -> Tensor:
    """``P^T r``: the tent-weighted sums ``r_{2j} + (r_{2j-1} + r_{2j+1}) / 2`` of ``r`` ``(N, C,
    H, W)`` at every other pixel, with one node more past an even-sized edge (``floor(H / 2) + 1``
    rows). Every other row first: slices of every other column are slower, and then only half
    as many rows are sliced."""
    return _restrict_along(_restrict_along(r, -2), -1)


def _restrict_along(r: Tensor, dim: int) -> Tensor:
    """:func:`restrict` along one dimension, written into a new tensor in ``r``'s layout."""
    n = r.shape[dim] // 2  # the odd positions 2j + 1
    shape = list(r.shape)
    shape[dim] = n + 1
    out = r.new_empty(shape).movedim(dim, -1)
    r = r.movedim(dim, -1)
    odd = r[..., 1::2]
    torch.add(r[..., : 2 * n : 2], odd, alpha=0.5, out=out[..., :n])
    out[..., n] = r[..., 2 * n] if r.shape[-1] % 2 else 0
    out[..., 1:].add_(odd, alpha=0.5)
    return out.movedim(-1, dim)


def prolong(c: Tensor, size: torch.Size) -> Tensor:
    """``P c``: bilinear interpolation of the nodes ``c`` to the finer grid of ``size``, the
    adjoint of :func:`restrict` (a node is copied, a pixel between two gets their mean). The
    columns first, on the coarse rows only."""
    return _prolong_along(_prolong_along(c, -1, size[1]), -2, size[0])


def _prolong_along(c: Tensor, dim: int, size: int) -> Tensor:
    """:func:`prolong` along one dimension, to ``size`` points."""
    shape = list(c.shape)
    shape[dim] = size
    out = c.new_empty(shape).movedim(dim, -1)
    c = c.movedim(dim, -1)
    out[..., 0::2] = c[..., : (size + 1) // 2]
    torch.add(c[..., : size // 2], c[..., 1 : size // 2 + 1], out=out[..., 1::2]).mul_(0.5)
    return out.movedim(-1, dim)
