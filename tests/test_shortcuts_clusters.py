"""SpRAy (heatlens.shortcuts.clusters): each step against its equation written out here, the whole
analysis on synthetic maps of known structure, and agreement with scikit-learn's k-means and
spectral clustering where they compute the same thing."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.cluster import KMeans, SpectralClustering
from sklearn.datasets import make_blobs
from sklearn.metrics import adjusted_rand_score

from heatlens.shortcuts.clusters import (
    Clusters,
    choose_k,
    downsample,
    kmeans,
    spectral_embedding,
    spray,
)

SIDE = 32
# where each group's relevance lies in a 32 x 32 map: bottom-right corner, centre, left edge
GROUPS = ((27, 27), (16, 16), (16, 3))


def blobs(centre: tuple[int, int], count: int, generator: torch.Generator, *,
          jitter: int = 2, noise: float = 0.1) -> torch.Tensor:
    """``count`` maps of a Gaussian blob (sigma 3 px) at ``centre`` moved by up to ``jitter``
    pixels each way, plus uniform noise in ``[0, noise)``."""
    yy, xx = torch.meshgrid(torch.arange(SIDE), torch.arange(SIDE), indexing="ij")
    shifts = torch.randint(-jitter, jitter + 1, (count, 2), generator=generator)
    cy = centre[0] + shifts[:, 0, None, None]
    cx = centre[1] + shifts[:, 1, None, None]
    maps = torch.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * 3.0**2))
    return maps + noise * torch.rand(count, SIDE, SIDE, generator=generator)


@pytest.fixture(scope="module")
def three_groups() -> tuple[torch.Tensor, np.ndarray]:
    """60 maps, 20 per group of GROUPS, interleaved (so a partition in index order is not
    free), and each map's group."""
    generator = torch.Generator().manual_seed(0)
    maps = torch.cat([blobs(centre, 20, generator) for centre in GROUPS])
    truth = np.repeat(np.arange(3), 20)
    order = torch.randperm(60, generator=generator)
    return maps[order], truth[order.numpy()]


@pytest.fixture(scope="module")
def three_found(three_groups) -> Clusters:
    return spray(three_groups[0])


# --- the steps, each against its equation -----------------------------------------------------


def test_downsample_is_the_block_mean_scaled_to_sum_one():
    maps = torch.zeros(3, 4, 4)
    maps[0] = torch.arange(16.0).reshape(4, 4)
    maps[1, :2, :2] = 2.0
    maps[1, 2:, 2:] = -6.0  # negative evidence: dropped by the positive part
    maps[2] = -1.0  # nothing positive: stays all zeros
    blocks = torch.tensor([[[2.5, 4.5], [10.5, 12.5]],
                           [[2.0, 0.0], [0.0, 0.0]],
                           [[0.0, 0.0], [0.0, 0.0]]])
    expected = blocks / blocks.sum(dim=(1, 2), keepdim=True).clamp_min(1e-30)
    result = downsample(maps, 2)
    torch.testing.assert_close(result, expected)
    assert result[0].sum() == pytest.approx(1.0) and result[2].abs().sum() == 0


def test_downsample_uneven_sides_use_the_adaptive_windows():
    """5 -> 2: windows rows/columns [0, 3) and [2, 5), overlapping in the middle."""
    image = torch.arange(25.0).reshape(5, 5)
    windows = (slice(0, 3), slice(2, 5))
    blocks = torch.tensor([[float(image[r, c].mean()) for c in windows] for r in windows])
    torch.testing.assert_close(downsample(image[None], 2)[0], blocks / blocks.sum())


def numpy_laplacian_eigenvalues(features: np.ndarray, neighbours: int) -> np.ndarray:
    """``L = I - D^-1/2 W D^-1/2`` on the symmetric k-nearest-neighbour graph, in numpy."""
    count = len(features)
    distance = np.sqrt(((features[:, None, :] - features[None, :, :]) ** 2).sum(-1))
    np.fill_diagonal(distance, np.inf)
    knn = np.zeros((count, count), dtype=bool)
    for i in range(count):
        knn[i, np.argsort(distance[i], kind="stable")[:neighbours]] = True
    affinity = (knn | knn.T).astype(np.float64)
    d = 1 / np.sqrt(affinity.sum(1))
    return np.linalg.eigvalsh(np.eye(count) - d[:, None] * affinity * d[None, :])


@pytest.mark.parametrize("neighbours", [3, 10])
def test_spectral_embedding_eigenvalues_are_those_of_the_normalised_laplacian(neighbours):
    features = torch.randn(40, 12, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    eigenvalues, embedding = spectral_embedding(features, neighbours, dims=8)
    expected = numpy_laplacian_eigenvalues(features.numpy(), neighbours)[:8]
    np.testing.assert_allclose(eigenvalues.numpy(), expected, atol=1e-10)
    assert embedding.shape == (40, 8) and embedding.dtype == torch.float64
    torch.testing.assert_close(embedding.norm(dim=1), torch.ones(40, dtype=torch.float64))
    assert abs(float(eigenvalues[0])) < 1e-10  # the constant vector D^1/2 1


def test_spectral_embedding_checks_its_sizes():
    features = torch.randn(5, 3)
    with pytest.raises(ValueError, match="neighbours must be from 1 to 4, got 5"):
        spectral_embedding(features, 5, 2)
    with pytest.raises(ValueError, match="dims must be from 1 to 5, got 6"):
        spectral_embedding(features, 2, 6)


@pytest.mark.parametrize(("eigenvalues", "max_k", "k"), [
    ([0.0, 0.0, 0.0, 0.4, 0.45, 0.5], 6, 3),  # three components, then the gap
    ([0.0, 0.55, 0.6, 0.62], 6, 1),  # one group: the first gap is the largest
    ([0.0, 0.1, 0.2, 0.9], 2, 1),  # the gap at 3 lies beyond max_k; equal gaps: the first
    ([0.0, 0.1, 0.2, 0.9], 3, 3),
    ([0.0], 6, 1),
])
def test_choose_k_counts_the_eigenvalues_before_the_largest_gap(eigenvalues, max_k, k):
    assert choose_k(torch.tensor(eigenvalues, dtype=torch.float64), max_k) == k


# --- k-means, against scikit-learn ------------------------------------------------------------


def inertia(points: np.ndarray, labels: np.ndarray) -> float:
    return sum(float(((points[labels == j] - points[labels == j].mean(0)) ** 2).sum())
               for j in np.unique(labels))


def test_kmeans_agrees_with_scikit_learn_on_separated_blobs():
    points, truth = make_blobs(n_samples=300, centers=5, n_features=4, cluster_std=0.6,
                               random_state=0)
    reference = KMeans(n_clusters=5, n_init=10, random_state=0).fit(points)
    labels = kmeans(torch.from_numpy(points), 5).numpy()
    assert adjusted_rand_score(reference.labels_, labels) == 1.0
    assert adjusted_rand_score(truth, labels) == 1.0
    assert inertia(points, labels) == pytest.approx(reference.inertia_, rel=1e-4)
    sizes = np.bincount(labels)
    assert (np.diff(sizes) <= 0).all()  # numbered by size, largest first
    for seed in (1, 2):
        assert adjusted_rand_score(kmeans(torch.from_numpy(points), 5, seed=seed).numpy(),
                                   labels) == 1.0


def test_kmeans_fills_every_cluster_with_repeated_points():
    """Two distinct points, three clusters: the seeding must repeat a point, and the empty
    cluster takes one from a cluster of two or more."""
    points = torch.tensor([[0.0, 0.0]] * 4 + [[5.0, 5.0]] * 2)
    labels = kmeans(points, 3, restarts=2)
    assert torch.bincount(labels, minlength=3).tolist() == [3, 2, 1]
    assert labels[4] == labels[5] == 1


# --- the whole analysis on maps of known structure --------------------------------------------


def test_spray_finds_the_three_groups(three_groups, three_found):
    maps, truth = three_groups
    found = three_found
    assert found.k == 3
    assert found.labels.dtype == torch.long and found.labels.shape == (60,)
    assert adjusted_rand_score(truth, found.labels.numpy()) == 1.0
    # three connected components: three zero eigenvalues, then the gap
    assert found.eigenvalues.shape == (7,) and float(found.eigenvalues[:3].abs().max()) < 1e-10
    torch.testing.assert_close(found.eigengap, found.eigenvalues.diff())
    assert int(found.eigengap.argmax()) == 2

    corner = int(found.labels[int(np.flatnonzero(truth == 0)[0])])
    mean = found.means[corner]
    assert found.means.shape == (3, 16, 16)
    assert float(mean.sum()) == pytest.approx(1.0, rel=1e-5)
    quadrants = mean.reshape(2, 8, 2, 8).sum(dim=(1, 3))  # uniform noise spreads ~half the mass
    assert float(quadrants[1, 1]) > 0.5 and float(quadrants[1, 1]) > 4 * float(
        quadrants.flatten()[:3].max())
    assert int(mean.argmax()) // 16 >= 12 and int(mean.argmax()) % 16 >= 12

    assert [len(e) for e in found.exemplars] == [4, 4, 4]
    for j, exemplars in enumerate(found.exemplars):
        assert all(int(found.labels[i]) == j for i in exemplars)
        members = found.labels == j
        centre = downsample(maps, 16)[members].mean(0)
        distance = (downsample(maps, 16) - centre).flatten(1).norm(dim=1)
        nearest = torch.argsort(torch.where(members, distance, torch.inf), stable=True)[:4]
        assert exemplars == nearest.tolist()


@pytest.mark.filterwarnings("ignore:Graph is not fully connected")  # three groups: it is not
def test_spray_agrees_with_scikit_learn_spectral_clustering(three_groups, three_found):
    features = downsample(three_groups[0], 16).flatten(1).double().numpy()
    reference = SpectralClustering(n_clusters=3, affinity="nearest_neighbors", n_neighbors=10,
                                   assign_labels="kmeans", random_state=0).fit_predict(features)
    assert adjusted_rand_score(reference, three_found.labels.numpy()) == 1.0


def test_spray_is_seeded(three_groups, three_found):
    again = spray(three_groups[0])
    assert torch.equal(again.labels, three_found.labels)
    assert torch.equal(again.eigenvalues, three_found.eigenvalues)
    assert torch.equal(again.means, three_found.means)
    assert again.exemplars == three_found.exemplars
    for seed in (1, 7):
        other = spray(three_groups[0], seed=seed)
        assert adjusted_rand_score(other.labels.numpy(), three_found.labels.numpy()) == 1.0


def test_one_homogeneous_group_is_one_cluster():
    """Noise around one pattern: the k-NN graph is well knit (lambda_1 about 0.55), so the first
    gap is the largest."""
    maps = blobs((16, 16), 60, torch.Generator().manual_seed(2), jitter=0)
    found = spray(maps)
    assert found.k == 1 and float(found.eigenvalues[1]) > 0.4
    assert found.labels.tolist() == [0] * 60
    assert found.means.shape == (1, 16, 16) and len(found.exemplars) == 1
    assert len(found.exemplars[0]) == 4


def test_one_group_that_moves_is_cut_into_pieces_of_a_continuum():
    """Documented behaviour: the same blob moved by up to 3 pixels is a continuum of maps, whose
    graph Laplacian looks like that of a 2-D grid: ``lambda_0 = 0``, two small eigenvalues for
    the two directions of movement, then a jump. The eigengap reads that as ``k = 3`` (with
    other seeds of this data 3, 4 or 6). What tells it apart from true groups is
    ``lambda_(k-1)``: 0 to rounding for groups that do not touch, about 0.1 here."""
    maps = blobs((16, 16), 60, torch.Generator().manual_seed(0), jitter=3)
    found = spray(maps)
    assert found.k == 3
    assert float(found.eigenvalues[found.k - 1]) > 0.05
    assert float(found.eigenvalues[1]) < 0.2  # no large first gap: the graph is a chain-like grid


# --- bad input --------------------------------------------------------------------------------


def test_too_few_maps():
    maps = torch.rand(7, 8, 8)
    with pytest.raises(ValueError, match=r"^7 maps are too few to cluster \(at least 8\)$"):
        spray(maps)
    with pytest.raises(ValueError, match=r"^7 maps are too few to cluster \(at least 10\)$"):
        spray(maps, min_maps=10)
    assert spray(maps, min_maps=4).labels.shape == (7,)  # neighbours clamped to 6


def test_spray_refuses_maps_it_cannot_cluster():
    maps = torch.rand(10, 8, 8)
    maps[3, 2, 2] = float("nan")
    with pytest.raises(ValueError, match="map 3 holds NaN or infinite values"):
        spray(maps)
    with pytest.raises(ValueError, match=r"spray needs the maps of one class \(N, H, W\)"):
        spray(torch.rand(10, 1, 8, 8))
    with pytest.raises(TypeError, match="max_k must be an int, not float"):
        spray(torch.rand(10, 8, 8), max_k=3.0)
