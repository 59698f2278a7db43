"""ROAD's noisy linear imputation (heatlens/metrics/imputation.py). The tests check it against
the reference ``NoisyLinearImputer`` of pytorch-grad-cam and against the sparse system written out
here with SciPy. They also check the properties of the solution (known pixels kept, each removed
pixel the weighted mean of its neighbours, harmonic functions reproduced), the noise, and the
errors on bad input."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from scipy.sparse.linalg import spsolve

from heatlens.metrics.imputation import (
    harmonic_cg,
    multilevel_preconditioner,
    noisy_linear_impute,
    prolong,
    restrict,
)

FRACTIONS = (0.1, 0.5, 0.9)
KINDS = ("random", "block", "smooth top")
OFFSETS = {(-1, -1): 1 / 12, (-1, 0): 1 / 6, (-1, 1): 1 / 12, (0, -1): 1 / 6,
           (0, 1): 1 / 6, (1, -1): 1 / 12, (1, 0): 1 / 6, (1, 1): 1 / 12}


def photo(size: int, name: str = "chelsea") -> torch.Tensor:
    """A scikit-image photo as a ``(3, size, size)`` float64 tensor in [0, 1]."""
    from skimage import data

    image = torch.from_numpy(getattr(data, name)()).permute(2, 0, 1)[None].double() / 255
    return F.interpolate(image, size=(size, size), mode="bilinear", antialias=True)[0]


def smooth_map(h: int, w: int) -> torch.Tensor:
    """Two Gaussian blobs, the shape of a class activation map."""
    y, x = torch.meshgrid(torch.arange(h) / h, torch.arange(w) / w, indexing="ij")
    return (torch.exp(-((y - 0.3) ** 2 + (x - 0.6) ** 2) / 0.08)
            + 0.5 * torch.exp(-((y - 0.7) ** 2 + (x - 0.3) ** 2) / 0.02))


def removal_mask(kind: str, fraction: float, size: int) -> torch.Tensor:
    """``(size, size)`` bool, True on about ``fraction`` of the pixels."""
    count = round(fraction * size * size)
    if kind == "random":
        order = torch.randperm(size * size, generator=torch.Generator().manual_seed(size))
    elif kind == "smooth top":  # MoRF on a smooth map: its top pixels
        order = smooth_map(size, size).flatten().argsort(descending=True)
    else:  # a centred square block
        side = round(fraction**0.5 * size)
        start = (size - side) // 2
        mask = torch.zeros(size, size, dtype=torch.bool)
        mask[start:start + side, start:start + side] = True
        return mask
    mask = torch.zeros(size * size, dtype=torch.bool)
    mask[order[:count]] = True
    return mask.reshape(size, size)


def scipy_impute(image: np.ndarray, removed: np.ndarray) -> np.ndarray:
    """The system written out: for every removed pixel ``i`` of ``image`` ``(C, H, W)``,
    ``sum_j w_ij x_i - sum_{j removed} w_ij x_j = sum_{j known} w_ij v_j`` over its
    neighbours inside the image, solved by ``spsolve``."""
    c, h, w = image.shape
    unknown = np.flatnonzero(removed)
    number = np.full(h * w, -1)
    number[unknown] = np.arange(unknown.size)
    row, col = np.divmod(unknown, w)
    diagonal = np.zeros(unknown.size)
    rows, cols, vals = [], [], []
    b = np.zeros((unknown.size, c))
    flat = image.reshape(c, -1)
    for (dy, dx), weight in OFFSETS.items():
        y, x = row + dy, col + dx
        inside = np.flatnonzero((y >= 0) & (y < h) & (x >= 0) & (x < w))
        neighbour = y[inside] * w + x[inside]
        diagonal[inside] += weight
        gone = removed.flat[neighbour]
        rows.append(inside[gone])
        cols.append(number[neighbour[gone]])
        vals.append(np.full(gone.sum(), -weight))
        b[inside[~gone]] += weight * flat[:, neighbour[~gone]].T
    everything = np.arange(unknown.size)
    a = sp.coo_matrix((np.concatenate([*vals, diagonal]),
                       (np.concatenate([*rows, everything]), np.concatenate([*cols, everything]))),
                      shape=(unknown.size, unknown.size))
    solution = spsolve(a.tocsc(), b).reshape(unknown.size, c)
    out = image.copy()
    out[:, removed] = solution.T
    return out


def neighbour_mean(u: torch.Tensor) -> torch.Tensor:
    """``sum_j w_ij u_j / sum_j w_ij`` over the neighbours inside the image, by shifting ``u``
    ``(N, C, H, W)`` (no convolution)."""
    h, w = u.shape[-2:]
    padded = F.pad(u, (1, 1, 1, 1))
    inside = F.pad(torch.ones_like(u), (1, 1, 1, 1))
    total = torch.zeros_like(u)
    weights = torch.zeros_like(u)
    for (dy, dx), weight in OFFSETS.items():
        window = (..., slice(1 + dy, 1 + dy + h), slice(1 + dx, 1 + dx + w))
        total += weight * padded[window]
        weights += weight * inside[window]
    return total / weights


# --- agreement with the reference ---------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:__array_wrap__:DeprecationWarning")  # inside the reference
@pytest.mark.parametrize("size", [64, 224])
@pytest.mark.parametrize("fraction", FRACTIONS)
@pytest.mark.parametrize("kind", KINDS)
def test_agrees_with_pytorch_grad_cam(size, fraction, kind):
    from pytorch_grad_cam.metrics.road import NoisyLinearImputer

    image = photo(size).float()
    removed = removal_mask(kind, fraction, size)
    assert abs(float(removed.float().mean()) - fraction) < 0.02
    expected = NoisyLinearImputer(noise=0)(image, (~removed).float())  # its mask: 1 = keep
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # converged within the default max_iter
        result = noisy_linear_impute(image[None], removed[None], noise=0)[0]
    assert result.dtype == torch.float32
    assert (result - expected).abs().max() <= 1e-4


@pytest.mark.parametrize("shape", [(64, 64), (13, 21), (1, 9), (2, 2), (40, 7)])
@pytest.mark.parametrize("kind", KINDS)
def test_agrees_with_the_system_written_out(shape, kind):
    h, w = shape
    image = torch.rand(2, h, w, generator=torch.Generator().manual_seed(h * w), dtype=torch.float64)
    removed = removal_mask(kind, 0.5, max(shape))[:h, :w]
    if kind == "block" or not removed.any() or removed.all():
        removed = torch.zeros(h, w, dtype=torch.bool)  # the image border in the block's place
        removed[: (h + 1) // 2, w // 3:] = True
    expected = scipy_impute(image.numpy(), removed.numpy())
    result = noisy_linear_impute(image[None], removed[None], noise=0)[0]
    assert np.abs(result.numpy() - expected).max() <= 1e-5


def test_a_batch_gives_what_each_image_gives_alone():
    images = torch.stack([photo(48, name) for name in ("chelsea", "coffee", "astronaut")] * 2)
    removed = torch.stack([removal_mask(kind, fraction, 48)
                           for kind, fraction in zip(KINDS * 2, (0.1, 0.5, 0.9, 0.9, 0.5, 0.1),
                                                     strict=True)])
    removed[4] = False  # an image with nothing removed, among the others
    batch = noisy_linear_impute(images, removed, noise=0)
    alone = torch.cat([noisy_linear_impute(images[i:i + 1], removed[i:i + 1], noise=0)
                       for i in range(len(images))])
    torch.testing.assert_close(batch, alone, rtol=0, atol=1e-6)
    assert torch.equal(batch[4], images[4])


def test_the_preconditioner_changes_the_speed_not_the_solution():
    image = photo(96)[:, None]  # three single-channel images
    removed = removal_mask("smooth top", 0.9, 96).expand(3, 1, 96, 96)
    values = torch.where(removed, 0.0, image)
    jacobi, jacobi_steps, _ = harmonic_cg(values, removed, tol=1e-9, max_iter=5000, levels=0)
    multilevel, steps, worst = harmonic_cg(values, removed, tol=1e-9, max_iter=5000)
    assert worst <= 1e-9
    assert (jacobi - multilevel).abs().max() <= 1e-7
    assert steps < jacobi_steps / 4
    # float32 iterations, float64 residuals: the equation holds far below float32 rounding
    gone = removed.expand_as(multilevel)
    assert (multilevel - neighbour_mean(multilevel))[gone].abs().max() <= 1e-9


@pytest.mark.parametrize("shape", [(224, 224), (13, 21), (1, 9), (8, 1), (2, 3)])
def test_restrict_and_prolong_are_adjoint(shape):
    # <P^T r, c> = <r, P c>: the preconditioner must be symmetric for conjugate gradients.
    g = torch.Generator().manual_seed(sum(shape))
    r = torch.randn(2, 3, *shape, generator=g, dtype=torch.float64)
    c = torch.randn_like(restrict(r))
    assert c.shape[2:] == tuple(n // 2 + 1 for n in shape)
    torch.testing.assert_close((restrict(r) * c).sum(), (r * prolong(c, r.shape[2:])).sum())
    assert torch.equal(prolong(c, r.shape[2:])[..., ::2, ::2], c[..., : (shape[0] + 1) // 2,
                                                                   : (shape[1] + 1) // 2])


def test_the_preconditioner_is_symmetric_and_positive():
    removed = torch.stack([removal_mask(kind, 0.5, 50) for kind in KINDS])[:, None].double()
    precondition = multilevel_preconditioner(removed)
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn(3, 2, 50, 50, generator=g, dtype=torch.float64) * removed
            for _ in range(2))
    torch.testing.assert_close((precondition(a) * b).sum((2, 3)),
                               (a * precondition(b)).sum((2, 3)))
    assert ((precondition(a) * a).sum((2, 3)) > 0).all()


@pytest.mark.parametrize("scale", [1e-40, 1e40])
def test_values_beyond_the_float32_range(scale):
    # Each float32 correction is solved for the residual divided by its norm.
    image = photo(32)[None]
    removed = removal_mask("block", 0.5, 32)[None]
    result = noisy_linear_impute(image * scale, removed, noise=0)
    torch.testing.assert_close(result / scale, noisy_linear_impute(image, removed, noise=0),
                               rtol=0, atol=1e-6)


# --- properties of the solution -------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
def test_known_pixels_are_kept_exactly(dtype):
    images = torch.stack([photo(32), photo(32, "coffee")]).to(dtype)
    removed = torch.stack([removal_mask("random", 0.5, 32), removal_mask("block", 0.9, 32)])
    result = noisy_linear_impute(images, removed, noise=0.1,
                                 generator=torch.Generator().manual_seed(0))
    assert result.dtype == dtype
    assert result.shape == images.shape
    known = ~removed[:, None].expand_as(images)
    assert torch.equal(result[known], images[known])
    assert not torch.equal(result[~known], images[~known])


def test_removed_pixels_may_hold_nan():
    image = photo(32)[None]
    removed = removal_mask("block", 0.5, 32)[None]
    poisoned = image.masked_fill(removed[:, None], float("nan"))
    result = noisy_linear_impute(poisoned, removed, noise=0)
    assert result.isfinite().all()
    torch.testing.assert_close(result, noisy_linear_impute(image, removed, noise=0))


def test_each_removed_pixel_is_the_weighted_mean_of_its_neighbours():
    images = torch.stack([photo(40), photo(40, "astronaut")])
    removed = torch.stack([removal_mask("random", 0.9, 40), removal_mask("smooth top", 0.5, 40)])
    removed[1, :, :3] = True  # and along the image border
    result = noisy_linear_impute(images, removed, noise=0)
    gone = removed[:, None].expand_as(images)
    assert (result - neighbour_mean(result))[gone].abs().max() <= 1e-5
    assert (images - neighbour_mean(images))[gone].abs().max() > 1e-2  # not true of the photo


def test_a_constant_image_stays_constant():
    images = torch.full((2, 3, 30, 30), 0.3)
    removed = torch.stack([removal_mask("random", 0.9, 30), removal_mask("block", 0.9, 30)])
    result = noisy_linear_impute(images, removed, noise=0)
    assert (result - 0.3).abs().max() <= 1e-6


def harmonic_functions(h: int, w: int) -> dict[str, torch.Tensor]:
    """Harmonic polynomials in pixel units (one scale for both axes), about the centre."""
    y, x = torch.meshgrid(torch.arange(h, dtype=torch.float64) - h / 2,
                          torch.arange(w, dtype=torch.float64) - w / 2, indexing="ij")
    y, x = y / 20, x / 20
    return {"ramp": 0.2 + 0.5 * x - 0.3 * y, "x^2 - y^2": x**2 - y**2, "xy": x * y,
            "x^3 - 3xy^2": x**3 - 3 * x * y**2}


@pytest.mark.parametrize("name", ["ramp", "x^2 - y^2", "xy", "x^3 - 3xy^2"])
def test_harmonic_functions_are_reproduced_inside_the_image(name):
    # Inside the image the stencil is symmetric and sums to 1, so it averages every harmonic
    # polynomial up to degree 3 to its centre value, and the unique solution is that function.
    u = harmonic_functions(36, 44)[name][None, None]
    removed = torch.zeros(1, 36, 44, dtype=torch.bool)
    removed[0, 3:30, 5:40] = True
    result = noisy_linear_impute(u, removed, noise=0)
    assert (result - u).abs().max() <= 1e-6


def test_a_ramp_is_not_reproduced_along_the_image_border():
    # At the border the mean is over the neighbours inside the image only: one-sided, so a
    # ramp that rises towards the border is filled in lower than the ramp.
    u = harmonic_functions(36, 44)["ramp"][None, None]
    removed = torch.zeros(1, 36, 44, dtype=torch.bool)
    removed[0, 3:30, 30:] = True  # reaches the right edge, where x is largest
    result = noisy_linear_impute(u, removed, noise=0)
    assert (u - result)[0, 0, 3:30, -1].min() > 1e-2
    assert (result - neighbour_mean(result))[removed[:, None]].abs().max() <= 1e-6


def test_noise_is_seeded_and_has_the_spread_asked_for():
    images = torch.stack([photo(64), photo(64, "coffee")]).float()
    removed = torch.stack([removal_mask("random", 0.5, 64), removal_mask("block", 0.5, 64)])
    clean = noisy_linear_impute(images, removed, noise=0)
    first, again, other = (
        noisy_linear_impute(images, removed, noise=0.05,
                            generator=torch.Generator().manual_seed(seed))
        for seed in (7, 7, 8))
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    gone = removed[:, None].expand_as(images)
    noise = (first - clean)[gone].double()
    assert noise.numel() > 10_000
    assert abs(float(noise.std()) - 0.05) < 0.05 * 0.05
    assert abs(float(noise.mean())) < 0.002
    assert torch.equal(first[~gone], images[~gone])


def test_nothing_to_impute_returns_a_copy():
    images = photo(16)[None].float()
    result = noisy_linear_impute(images, torch.zeros(1, 16, 16, dtype=torch.bool))
    assert torch.equal(result, images)
    assert result.data_ptr() != images.data_ptr()
    empty = noisy_linear_impute(torch.zeros(0, 3, 8, 8), torch.zeros(0, 8, 8, dtype=torch.bool))
    assert empty.shape == (0, 3, 8, 8)


def test_too_few_iterations_are_reported():
    images = photo(64)[None]
    removed = removal_mask("block", 0.9, 64)[None]
    with pytest.warns(UserWarning, match=r"stopped after 2 iterations .* pass a larger max_iter"):
        noisy_linear_impute(images, removed, noise=0, max_iter=2)


# --- bad input: one line that names the problem and the fix --------------------------------

IMAGES = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
REMOVED = torch.rand(2, 8, 8, generator=torch.Generator().manual_seed(1)) < 0.5


def test_an_image_with_every_pixel_removed_is_named():
    removed = REMOVED.clone()
    removed[1] = True
    with pytest.raises(ValueError, match=r"image 1 of the batch of 2 has every pixel removed"):
        noisy_linear_impute(IMAGES, removed)


@pytest.mark.parametrize("shape", [(2, 8, 9), (8, 8), (1, 8, 8), (2, 1, 8, 8)])
def test_a_mask_of_the_wrong_shape_is_refused(shape):
    with pytest.raises(ValueError, match=r"removed must have shape \(N, H, W\) = \(2, 8, 8\)"):
        noisy_linear_impute(IMAGES, torch.zeros(shape, dtype=torch.bool))


@pytest.mark.parametrize("dtype", [torch.float32, torch.uint8, torch.int64])
def test_only_a_bool_mask_is_accepted(dtype):
    # A 0/1 mask could follow either convention (pytorch-grad-cam's 1 = keep), so none is guessed.
    with pytest.raises(TypeError, match=r"removed must be a bool tensor .* mask == 0 if 1 marks"):
        noisy_linear_impute(IMAGES, REMOVED.to(dtype))


def test_images_must_be_a_floating_batch():
    with pytest.raises(ValueError, match=r"must be a \(N, C, H, W\) tensor, got \(3, 8, 8\)"):
        noisy_linear_impute(IMAGES[0], REMOVED[0])
    with pytest.raises(TypeError, match=r"images must be floating point, got torch.uint8"):
        noisy_linear_impute((IMAGES * 255).to(torch.uint8), REMOVED)


def test_non_finite_known_pixels_are_named():
    images = IMAGES.clone()
    images[1, 2, ~REMOVED[1]] = float("inf")
    with pytest.raises(ValueError, match=r"image 1 of the batch of 2 holds NaN or infinite"):
        noisy_linear_impute(images, REMOVED)


@pytest.mark.parametrize(("option", "value", "message"), [
    ("noise", -0.1, "noise must be a standard deviation >= 0"),
    ("tol", 0.0, "tol must be > 0"),
    ("max_iter", 0, "max_iter must be >= 1"),
])
def test_bad_options_are_named(option, value, message):
    with pytest.raises(ValueError, match=message):
        noisy_linear_impute(IMAGES, REMOVED, **{option: value})
