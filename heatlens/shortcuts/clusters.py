"""SpRAy, spectral relevance analysis (Lapuschkin et al., "Unmasking Clever Hans predictors and
assessing what machines really learn", Nature Communications 10, 2019): the maps of one class,
made small and comparable, are clustered spectrally, so that the few strategies a model uses for
the class (the object itself, or a watermark in a corner) come out as clusters, and their number
as the largest gap among the smallest eigenvalues of the graph Laplacian.

Notation: ``N`` maps, ``x_i`` map ``i`` down-sampled and flattened, ``W`` the ``(N, N)``
affinity, ``D = diag(sum_j W_ij)`` the degrees, ``lambda_0 <= lambda_1 <= ...`` the eigenvalues
of the normalised Laplacian. Everything runs in torch on the maps' device; the graph and its
eigenvectors in float64.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Generator, Tensor

from heatlens.engine.maps import safe_divide

__all__ = ["Clusters", "choose_k", "downsample", "kmeans", "spectral_embedding", "spray"]


@dataclass(frozen=True, eq=False)
class Clusters:
    """The strategies :func:`spray` found among one class's maps.

    Attributes:
        labels: ``(N,)`` long, the cluster of each map, ``0 .. k-1`` numbered by size (0 is the
            largest; equal sizes in the order of their first map).
        k: the number of clusters, chosen by the eigengap (:func:`choose_k`).
        eigenvalues: the ``max_k + 1`` (at most ``N``) smallest eigenvalues of the normalised
            Laplacian, ascending, float64.
        eigengap: their successive differences ``lambda_i - lambda_{i-1}``; ``k`` is one more
            than the index of the largest.
        means: ``(k, size, size)``, the mean down-sampled map of each cluster.
        exemplars: per cluster, the indices of up to ``exemplars`` of its maps closest (Euclidean,
            down-sampled) to its mean map, closest first.
    """

    labels: Tensor
    k: int
    eigenvalues: Tensor
    eigengap: Tensor
    means: Tensor
    exemplars: list[list[int]]


def downsample(maps: Tensor, size: int = 16) -> Tensor:
    """Maps ``(N, H, W)`` made comparable for SpRAy (Lapuschkin et al. 2019, Methods: the maps of
    a class are brought to one shape and a small size before they are compared):
    ``x = relu(pool(R)) / sum relu(pool(R))``, with ``pool`` adaptive average pooling to
    ``(size, size)`` (the block mean where ``size`` divides the sides).

    The scaling to sum 1 is heatlens's choice: only positive evidence counts, and only where it
    lies, not how strong the map is overall (which differs from image to image). A
    map with no positive value after pooling stays all zeros. Returns ``(N, size, size)`` in the
    maps' floating dtype (float32 for integer maps).
    """
    if maps.ndim != 3:
        raise ValueError(f"downsample needs maps (N, H, W), got shape {tuple(maps.shape)}")
    _check_int(size, "size", 1)
    work = maps.detach().to(torch.promote_types(maps.dtype, torch.float32))
    pooled = F.adaptive_avg_pool2d(work[:, None], size)[:, 0].clamp_min(0)
    return safe_divide(pooled, pooled.sum(dim=(1, 2), keepdim=True))


def spectral_embedding(features: Tensor, neighbours: int = 10,
                       dims: int = 8) -> tuple[Tensor, Tensor]:
    """The spectral embedding of the rows of ``features`` ``(N, D)`` on their nearest-neighbour
    graph, as SpRAy builds it (Lapuschkin et al. 2019, Methods):

        W_ij = 1 if j is among the ``neighbours`` nearest (Euclidean) rows to i, or i to j
        L = I - D^-1/2 W D^-1/2                      (von Luxburg 2007, Sec. 3.2: L_sym)
        L u_m = lambda_m u_m,  lambda_0 <= ... <= lambda_{dims-1}
        y_i = (u_0i, ..., u_(dims-1)i) / ||(u_0i, ..., u_(dims-1)i)||   (Ng, Jordan & Weiss 2001)

    ``lambda_0 = 0``, and zero comes once per connected component of the graph (von Luxburg 2007,
    Prop. 4). Solved by ``torch.linalg.eigh`` in float64; each eigenvector's sign is fixed so its
    largest-magnitude entry is positive (equal eigenvalues still leave a rotation open, to which
    distances between the rows ``y_i`` are blind). Ties among distances go to the lower index.

    Returns:
        The ``dims`` smallest eigenvalues, ascending ``(dims,)``, and the embedding
        ``(N, dims)`` with rows of unit length, both float64.
    """
    if features.ndim != 2:
        raise ValueError(f"spectral_embedding needs features (N, D), got shape "
                         f"{tuple(features.shape)}")
    count = features.shape[0]
    _check_int(neighbours, "neighbours", 1, count - 1)
    _check_int(dims, "dims", 1, count)
    x = features.detach().to(torch.float64)
    distance = _distances(x, x).fill_diagonal_(float("inf"))
    nearest = distance.argsort(dim=1, stable=True)[:, :neighbours]
    knn = torch.zeros(count, count, dtype=torch.bool, device=x.device).scatter_(1, nearest, True)
    affinity = (knn | knn.T).to(torch.float64)
    scale = affinity.sum(dim=1).rsqrt()  # every row has at least one neighbour
    laplacian = torch.eye(count, dtype=torch.float64, device=x.device) - (
        scale[:, None] * affinity * scale[None, :])
    eigenvalues, eigenvectors = torch.linalg.eigh(laplacian)
    vectors = eigenvectors[:, :dims]
    peak = vectors.gather(0, vectors.abs().argmax(dim=0, keepdim=True))
    return eigenvalues[:dims], _unit_rows(vectors * torch.where(peak < 0, -1.0, 1.0))


def choose_k(eigenvalues: Tensor, max_k: int) -> int:
    """The number of clusters by the eigengap heuristic (von Luxburg 2007, Sec. 8.2; SpRAy,
    Lapuschkin et al. 2019, uses it to read off the number of strategies):

        k = argmax_{1 <= i <= max_k} (lambda_i - lambda_{i-1})

    with ``eigenvalues`` ascending and 0-based, so ``k`` is the number of eigenvalues before the
    largest gap. Gaps beyond the eigenvalues given are not considered; the first of equal gaps
    wins; with fewer than two eigenvalues ``k = 1``.
    """
    if eigenvalues.ndim != 1:
        raise ValueError(f"choose_k needs a vector of eigenvalues, got shape "
                         f"{tuple(eigenvalues.shape)}")
    _check_int(max_k, "max_k", 1)
    gaps = eigenvalues.diff()[:max_k]
    return int(gaps.argmax()) + 1 if gaps.numel() else 1


def kmeans(points: Tensor, k: int, seed: int = 0, restarts: int = 10,
           iterations: int = 100) -> Tensor:
    """k-means on the rows of ``points`` ``(N, D)``: the partition ``C_1 .. C_k`` minimising the
    inertia ``sum_j sum_{i in C_j} ||p_i - mu_j||^2``, ``mu_j`` the mean of ``C_j``.

    Lloyd's algorithm (assign each point to its nearest centre, move each centre to the mean of
    its points, until no point changes cluster or after ``iterations`` rounds), started by
    k-means++ seeding (Arthur & Vassilvitskii, SODA 2007: the first centre uniform, each next
    one a point drawn with probability ``D(p)^2 / sum D^2``, ``D`` the distance to the nearest
    centre so far). A cluster left empty takes the point farthest from its centre among those
    in clusters of two or more. Of ``restarts`` runs the one with the least inertia is kept
    (the first on a tie). All draws come from one generator seeded with ``seed`` on the points'
    device, in float64: the same seed gives the same labels.

    Returns:
        ``(N,)`` long labels ``0 .. k-1``, numbered by cluster size (0 the largest; equal
        sizes in the order of their first point).
    """
    if points.ndim != 2:
        raise ValueError(f"kmeans needs points (N, D), got shape {tuple(points.shape)}")
    _check_int(k, "k", 1, points.shape[0])
    _check_int(seed, "seed", None)
    _check_int(restarts, "restarts", 1)
    _check_int(iterations, "iterations", 1)
    x = points.detach().to(torch.float64)
    generator = torch.Generator(device=x.device).manual_seed(seed)
    best, least = None, float("inf")
    for _ in range(restarts):
        labels, inertia = _lloyd(x, _plus_plus(x, k, generator), iterations)
        if inertia < least:
            best, least = labels, inertia
    assert best is not None
    return _by_size(best, k)


def spray(maps: Tensor, *, size: int = 16, neighbours: int = 10, max_k: int = 6, seed: int = 0,
          exemplars: int = 4, min_maps: int = 8) -> Clusters:
    """Spectral relevance analysis (SpRAy; Lapuschkin et al., Nature Communications 2019) of one
    class's maps ``(N, H, W)``:

        x_i = downsample(R_i)                                    (:func:`downsample`)
        lambda, Y = spectral_embedding(x, neighbours, max_k + 1)  (:func:`spectral_embedding`)
        k = argmax_{1 <= i <= max_k} (lambda_i - lambda_{i-1})    (:func:`choose_k`)
        labels = kmeans(Y[:, :k] with rows rescaled to unit length, k)   (:func:`kmeans`)

    the normalised spectral clustering of Ng, Jordan & Weiss (NIPS 2001) on the k-nearest-
    neighbour graph of the maps, with ``k`` from the eigengap. A cluster is one way the model
    decides the class; a small cluster whose mean map lights up a corner or the background is
    the Clever Hans strategy to look at, through its exemplars.

    ``neighbours`` is clamped to ``N - 1`` and ``max_k`` to ``N - 1``; ``max_k`` bounds how many
    strategies can be told apart. Read ``k`` with its eigenvalues: groups that do not touch give
    ``lambda_0 .. lambda_(k-1)`` all 0 (one per connected component of the graph). One group
    of maps that differ only by noise gives a well-knit graph, a large ``lambda_1`` and
    ``k = 1``; but one pattern that moves continuously (a blob shifted by a few pixels) gives a
    graph like a grid, whose spectrum rises in steps (two small eigenvalues for two directions of
    movement, then a jump), and the eigengap then cuts the continuum into ``k > 1`` pieces with
    ``lambda_(k-1)`` clearly above 0.

    Raises:
        ValueError: fewer than ``min_maps`` maps, a map that is not finite, or maps not 3-D.
        TypeError: an option that is not an int.
    """
    if maps.ndim != 3:
        raise ValueError(f"spray needs the maps of one class (N, H, W), got shape "
                         f"{tuple(maps.shape)}")
    for value, name, minimum in ((size, "size", 1), (neighbours, "neighbours", 1),
                                 (max_k, "max_k", 1), (seed, "seed", None),
                                 (exemplars, "exemplars", 0), (min_maps, "min_maps", 2)):
        _check_int(value, name, minimum)
    count = maps.shape[0]
    if count < min_maps:
        raise ValueError(f"{count} maps are too few to cluster (at least {min_maps})")
    bad = (~torch.isfinite(maps)).flatten(1).any(dim=1).nonzero()
    if bad.numel():
        raise ValueError(f"map {int(bad[0])} holds NaN or infinite values; spray needs finite maps")
    small = downsample(maps, size)
    features = small.flatten(1)
    eigenvalues, embedding = spectral_embedding(features, min(neighbours, count - 1),
                                                min(max_k + 1, count))
    k = choose_k(eigenvalues, max_k)
    labels = kmeans(_unit_rows(embedding[:, :k]), k, seed=seed)
    means = _means(features, labels, k)
    distance = (features - means[labels]).norm(dim=1)
    order = distance.argsort(stable=True)
    ranked = labels[order]
    chosen = [order[ranked == j][:exemplars].tolist() for j in range(k)]
    return Clusters(labels, k, eigenvalues, eigenvalues.diff(), means.reshape(k, size, size),
                    chosen)


def _check_int(value: Any, name: str, minimum: int | None, maximum: int | None = None) -> None:
    """Refuse what is not an int (a bool too) or lies outside ``minimum .. maximum``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    low = -float("inf") if minimum is None else minimum
    high = float("inf") if maximum is None else maximum
    if not low <= value <= high:
        bounds = f"from {minimum} to {maximum}" if maximum is not None else f"at least {minimum}"
        raise ValueError(f"{name} must be {bounds}, got {value}")


def _distances(a: Tensor, b: Tensor) -> Tensor:
    """Euclidean distances ``(len(a), len(b))``, computed pair by pair (no ``|a|^2 - 2ab +
    |b|^2`` cancellation, so near ties come out as numpy computes them)."""
    return torch.cdist(a, b, compute_mode="donot_use_mm_for_euclid_dist")


def _unit_rows(vectors: Tensor) -> Tensor:
    """Each row scaled to unit Euclidean length (a zero row stays zero)."""
    return safe_divide(vectors, vectors.norm(dim=1, keepdim=True))


def _means(x: Tensor, labels: Tensor, k: int) -> Tensor:
    """The mean of the rows of each cluster, ``(k, D)`` (0 for an empty one)."""
    sums = x.new_zeros(k, x.shape[1]).index_add_(0, labels, x)
    return safe_divide(sums, torch.bincount(labels, minlength=k).to(x.dtype)[:, None])


def _plus_plus(x: Tensor, k: int, generator: Generator) -> Tensor:
    """k-means++ seeding (Arthur & Vassilvitskii 2007): ``k`` centres drawn from the rows of
    ``x``; uniform when every point already coincides with a centre."""
    pick = torch.randint(x.shape[0], (1,), generator=generator, device=x.device)
    centres = x[pick]
    closest = _distances(x, centres)[:, 0].square()
    for _ in range(1, k):
        weights = closest if bool(closest.sum() > 0) else torch.ones_like(closest)
        pick = torch.multinomial(weights, 1, generator=generator)
        centres = torch.cat([centres, x[pick]])
        closest = torch.minimum(closest, _distances(x, x[pick])[:, 0].square())
    return centres


def _assign(x: Tensor, centres: Tensor) -> Tensor:
    """Each row's nearest centre (the lower index on a tie); an empty cluster takes the point
    farthest from its centre among those in clusters of two or more."""
    k = centres.shape[0]
    distance = _distances(x, centres)
    labels = distance.argmin(dim=1)
    counts = torch.bincount(labels, minlength=k)
    if bool((counts == 0).any()):
        own = distance.gather(1, labels[:, None])[:, 0]
        for empty in (counts == 0).nonzero()[:, 0].tolist():
            movable = torch.bincount(labels, minlength=k)[labels] > 1
            point = torch.where(movable, own, -1.0).argmax()
            labels[point], own[point] = empty, 0.0
    return labels


def _lloyd(x: Tensor, centres: Tensor, iterations: int) -> tuple[Tensor, float]:
    """Lloyd's iterations from ``centres``: the labels and their inertia."""
    k = centres.shape[0]
    labels = _assign(x, centres)
    for _ in range(iterations):
        moved = _assign(x, _means(x, labels, k))
        if torch.equal(moved, labels):
            break
        labels = moved
    inertia = (x - _means(x, labels, k)[labels]).square().sum()
    return labels, float(inertia)


def _by_size(labels: Tensor, k: int) -> Tensor:
    """Clusters renumbered by size, largest first; equal sizes in the order of their first
    point."""
    count = labels.shape[0]
    sizes = torch.bincount(labels, minlength=k)
    first = torch.full((k,), count, device=labels.device).scatter_reduce(
        0, labels, torch.arange(count, device=labels.device), "amin")
    order = torch.argsort(first - sizes * (count + 1))
    renumber = torch.empty_like(order)
    renumber[order] = torch.arange(k, device=labels.device)
    return renumber[labels]
