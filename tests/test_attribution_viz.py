"""Signed pictures of attributions (heatlens.pictures.attribution): Captum's normalisation on real
attributions, the colours of every method and sign at known pixels, figures, panels and errors."""

from __future__ import annotations

import warnings

import matplotlib
import numpy as np
import pytest
import torch
from matplotlib.figure import Figure
from PIL import Image

import heatlens
from heatlens.pictures.attribution import (
    METHODS,
    SIGNS,
    attribution_figure,
    attribution_image,
    attribution_panels,
    auto_sign,
    cumulative_sum_threshold,
    normalize_attribution,
    sign_colormap,
)
from heatlens.pictures.overlays import save_figure

SIDE = 40
POSITIVE = (slice(5, 15), slice(5, 15))  # the positive square
NEGATIVE = (slice(25, 35), slice(25, 35))  # the negative square
P, N, Z = (10, 10), (30, 30), (20, 2)  # a pixel in each square and one where the map is zero
COLOUR = np.array([200, 100, 50], dtype=np.uint8)  # the image: one orange colour


@pytest.fixture(scope="module")
def squares() -> torch.Tensor:
    """A (3, 40, 40) attribution: +1 per channel on one square, -1 on another, 0 elsewhere."""
    attr = torch.zeros(3, SIDE, SIDE)
    attr[(slice(None), *POSITIVE)] = 1.0
    attr[(slice(None), *NEGATIVE)] = -1.0
    return attr


@pytest.fixture(scope="module")
def orange() -> np.ndarray:
    return np.tile(COLOUR, (SIDE, SIDE, 1))


def rgb(picture: Image.Image, pixel: tuple[int, int]) -> np.ndarray:
    return np.asarray(picture, dtype=np.int64)[pixel]


def cmap_rgb(name: str, value: float) -> np.ndarray:
    return np.array(matplotlib.colormaps[name](float(value))[:3]) * 255  # an int is a LUT index


GREY = COLOUR.mean()
WHITE = np.array([255.0, 255.0, 255.0])
GREEN, RED = np.array([0.0, 128.0, 0.0]), np.array([255.0, 0.0, 0.0])

# (method, sign) -> expected RGB at the positive square, the negative square and the zero pixel.
EXPECTED = {
    ("heat_map", "all"): (GREEN, RED, WHITE),
    ("heat_map", "positive"): (cmap_rgb("Greens", 1), cmap_rgb("Greens", 0), cmap_rgb("Greens", 0)),
    ("heat_map", "negative"): (cmap_rgb("Reds", 0), cmap_rgb("Reds", 1), cmap_rgb("Reds", 0)),
    ("heat_map", "absolute_value"): (cmap_rgb("Blues", 1), cmap_rgb("Blues", 1),
                                     cmap_rgb("Blues", 0)),
    ("blended_heat_map", "all"): ((GREY + GREEN) / 2, (GREY + RED) / 2, (GREY + WHITE) / 2),
    ("blended_heat_map", "positive"): ((GREY + cmap_rgb("Greens", 1)) / 2,
                                       (GREY + cmap_rgb("Greens", 0)) / 2,
                                       (GREY + cmap_rgb("Greens", 0)) / 2),
    ("blended_heat_map", "absolute_value"): ((GREY + cmap_rgb("Blues", 1)) / 2,
                                             (GREY + cmap_rgb("Blues", 1)) / 2,
                                             (GREY + cmap_rgb("Blues", 0)) / 2),
    ("masked_image", "positive"): (COLOUR, np.zeros(3), np.zeros(3)),
    ("masked_image", "negative"): (np.zeros(3), COLOUR, np.zeros(3)),
    ("masked_image", "absolute_value"): (COLOUR, COLOUR, np.zeros(3)),
    ("alpha_scaling", "positive"): (COLOUR, WHITE, WHITE),
    ("alpha_scaling", "negative"): (WHITE, COLOUR, WHITE),
    ("alpha_scaling", "absolute_value"): (COLOUR, COLOUR, WHITE),
    ("original_image", "all"): (COLOUR, COLOUR, COLOUR),
    ("original_image", "positive"): (COLOUR, COLOUR, COLOUR),
}


# ------------------------------------------------------------------------------------------------
# Normalisation: Captum's semantics
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real_attributions(mobilenet_v2_imagenet, imagenet_photos) -> dict[str, np.ndarray]:
    """Signed (2, 3, 224, 224) float64 attributions of MobileNetV2 for chelsea and coffee:
    saliency, and input x gradient made from it (one model pass: the CPU is shared)."""
    photos = imagenet_photos[:2]
    saliency = heatlens.explain(mobilenet_v2_imagenet, photos, method="saliency").raw.double()
    return {"saliency": saliency.numpy(), "input_x_gradient": (photos * saliency).numpy()}


@pytest.mark.parametrize("outlier_perc", [2, 0.5, 10, 37.5])
def test_normalization_agrees_with_captum_on_real_attributions(real_attributions, outlier_perc):
    from captum.attr._utils.visualization import _normalize_attr

    for method, batch in real_attributions.items():
        for attr in batch:
            assert (attr > 0).any() and (attr < 0).any(), method  # really signed
            channels_last = np.transpose(attr, (1, 2, 0))  # Captum's layout
            for sign in SIGNS:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # Captum warns about small scales
                    expected = _normalize_attr(channels_last.sum(axis=2), sign, outlier_perc)
                ours = normalize_attribution(attr, sign, outlier_perc)
                assert ours.shape == (224, 224)
                np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-6,
                                           err_msg=f"{method} {sign} {outlier_perc}")
                low = -1 if sign == "all" else 0
                assert ours.min() >= low and np.abs(ours).max() == 1  # the outliers saturate
                np.testing.assert_allclose(normalize_attribution(channels_last, sign,
                                                                 outlier_perc), ours)


def test_normalization_takes_tensors_arrays_and_2d_maps(real_attributions):
    attr = real_attributions["saliency"][0]
    expected = normalize_attribution(attr, "all")
    for same in (torch.from_numpy(attr), torch.from_numpy(attr).float(), attr.sum(axis=0)):
        np.testing.assert_allclose(normalize_attribution(same, "all"), expected, atol=1e-6)


def test_cumulative_sum_threshold_agrees_with_captum():
    from captum.attr._utils.visualization import _cumulative_sum_threshold

    values = np.array([[1.0, 1.0], [1.0, 1.0], [96.0, 0.0]])
    assert cumulative_sum_threshold(values, 98) == 96  # 1+1+1+1 = 4 % of the total < 98 %
    assert cumulative_sum_threshold(values, 4) == 1
    assert cumulative_sum_threshold(values, 0) == 0
    generator = np.random.default_rng(0)
    for _ in range(20):
        values = np.abs(generator.standard_cauchy((30, 20)))
        for percentile in (0, 50, 98, 99.9):
            assert cumulative_sum_threshold(values, percentile) == \
                _cumulative_sum_threshold(values, percentile)
        # Captum's own can fail with IndexError here: its 100 % of the total, rounded, may
        # exceed the total. No outliers means the largest value.
        assert cumulative_sum_threshold(values, 100) == values.max()


def test_no_outliers_scales_by_the_largest_magnitude(real_attributions):
    attr = real_attributions["input_x_gradient"][1]
    total = attr.sum(axis=0)
    np.testing.assert_allclose(normalize_attribution(attr, "all", 0), total / np.abs(total).max())


@pytest.mark.parametrize("sign", SIGNS)
def test_nothing_of_a_sign_gives_zeros_not_nan(sign):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not normalize_attribution(np.zeros((3, 8, 8)), sign).any()
    only = np.full((8, 8), -2.0 if sign == "positive" else 2.0)
    result = normalize_attribution(only, sign)
    assert np.isfinite(result).all()
    assert np.all(result == (0 if sign in ("positive", "negative") else 1))


def test_signs_keep_their_part(squares):
    assert normalize_attribution(squares, "all")[P] == 1
    assert normalize_attribution(squares, "all")[N] == -1
    assert normalize_attribution(squares, "positive")[N] == 0
    assert normalize_attribution(squares, "negative")[N] == 1  # a magnitude
    assert normalize_attribution(squares, "negative")[P] == 0
    assert normalize_attribution(squares, "absolute_value")[N] == 1


def test_auto_sign(squares):
    assert auto_sign(squares) == "all"
    assert auto_sign(squares.clamp_min(0)) == "absolute_value"
    assert auto_sign(-squares.clamp_min(0)) == "absolute_value"


# ------------------------------------------------------------------------------------------------
# Pictures
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("method", "sign"), list(EXPECTED))
def test_colours_at_known_pixels(squares, orange, method, sign):
    picture = attribution_image(squares, orange, method=method, sign=sign)
    assert picture.mode == "RGB" and picture.size == (SIDE, SIDE)
    for pixel, expected in zip((P, N, Z), EXPECTED[method, sign], strict=True):
        np.testing.assert_allclose(rgb(picture, pixel), expected, atol=1.5,
                                   err_msg=f"{method} {sign} at {pixel}")


def test_signed_heat_map_is_green_red_and_white(squares):
    picture = attribution_image(squares, method="heat_map", sign="all")  # no image needed
    (r, g, b), (r2, g2, b2), zero = rgb(picture, P), rgb(picture, N), rgb(picture, Z)
    assert g > r + 100 and g > b + 100  # green-ish
    assert r2 > g2 + 200 and r2 > b2 + 200  # red-ish
    assert zero.min() >= 250  # white-ish


def test_every_method_and_sign_renders_at_the_image_size(squares):
    image = Image.new("RGB", (60, 80), (10, 200, 30))  # 80 high, 60 wide
    for method in METHODS:
        for sign in SIGNS:
            if sign == "all" and method in ("masked_image", "alpha_scaling"):
                continue
            picture = attribution_image(squares, image, method=method, sign=sign)
            assert picture.size == (60, 80), (method, sign)


def test_a_coarse_map_is_resized_to_the_image(squares, orange):
    coarse = squares[:, ::4, ::4]  # 10 x 10: the squares are at rows/columns 1-3 and 6-8
    picture = attribution_image(coarse, orange, method="heat_map", sign="all")
    assert picture.size == (SIDE, SIDE)
    np.testing.assert_allclose(rgb(picture, P), GREEN, atol=1.5)
    np.testing.assert_allclose(rgb(picture, N), RED, atol=1.5)


def test_images_as_pil_arrays_and_tensors_give_the_same_picture(squares, orange):
    reference = np.asarray(attribution_image(squares, orange, method="blended_heat_map",
                                             sign="all"))
    as_float = orange / 255.0
    for image in (Image.fromarray(orange), as_float, torch.from_numpy(as_float).permute(2, 0, 1)):
        picture = attribution_image(squares.numpy(), image, method="blended_heat_map", sign="all")
        np.testing.assert_array_equal(np.asarray(picture), reference)


def test_cmap_alpha_and_outliers(squares, orange):
    viridis = attribution_image(squares, method="heat_map", cmap="viridis")
    np.testing.assert_allclose(rgb(viridis, P), cmap_rgb("viridis", 1.0), atol=1.5)
    only_image = attribution_image(squares, orange, method="blended_heat_map", alpha_overlay=0)
    assert np.all(np.asarray(only_image) == round(GREY))
    ramp = torch.linspace(0, 1, 100).reshape(10, 10)
    assert normalize_attribution(ramp, outlier_perc=50)[-1, -1] == 1
    assert normalize_attribution(ramp, outlier_perc=0)[-1, -1] == 1
    assert normalize_attribution(ramp, outlier_perc=0)[5, 0] < 0.55


def test_figure_draws_the_same_picture_with_title_and_colorbar(squares, orange, tmp_path):
    kwargs = {"method": "blended_heat_map", "sign": "all", "alpha_overlay": 0.7}
    figure = attribution_figure(squares, orange, show_colorbar=True, title="signed", **kwargs)
    assert isinstance(figure, Figure)
    picture_axes, colorbar_axes = figure.axes
    assert picture_axes.get_title() == "signed"
    np.testing.assert_array_equal(picture_axes.images[0].get_array(),
                                  np.asarray(attribution_image(squares, orange, **kwargs)))
    assert colorbar_axes.get_xlim() == (-1, 1)
    saved = save_figure(figure, tmp_path / "signed.png")
    assert Image.open(saved).size[0] > 300

    plain = attribution_figure(squares)
    assert len(plain.axes) == 1 and plain.axes[0].get_title() == ""
    masked = attribution_figure(squares, orange, method="masked_image", sign="positive",
                                show_colorbar=True)
    assert not masked.axes[1].axison  # room kept for a colorbar, but none drawn


def test_figure_on_given_axes(squares):
    figure = Figure()
    left, right = figure.subplots(1, 2)
    assert attribution_figure(squares, ax=right, sign="positive", cmap="magma") is figure
    assert not left.images and len(right.images) == 1


def test_panels_side_by_side(squares, orange):
    methods = ["original_image", "heat_map", "blended_heat_map", "masked_image", "alpha_scaling"]
    signs = ["all", "all", "all", "positive", "absolute_value"]
    figure = attribution_panels(squares, orange, methods, signs, titles=methods,
                                show_colorbar=True)
    pictures = [ax for ax in figure.axes if ax.images]
    assert [ax.get_title() for ax in pictures] == methods
    assert len({round(ax.get_position().y0, 3) for ax in pictures}) == 1  # one row, aligned
    np.testing.assert_array_equal(pictures[3].images[0].get_array(), np.asarray(
        attribution_image(squares, orange, method="masked_image", sign="positive")))
    default = attribution_panels(squares, orange)
    assert len(default.axes) == 2


def test_sign_colormaps():
    cmap, low, high = sign_colormap("all")
    assert (low, high) == (-1, 1) and cmap.name == "RdWhGn"
    assert [sign_colormap(s)[0].name for s in ("positive", "negative", "absolute_value")] == [
        "Greens", "Reds", "Blues"]


# ------------------------------------------------------------------------------------------------
# Errors
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (lambda a, i: attribution_image(a, i, method="heatmap"), ValueError,
         "unknown method 'heatmap'; choose one of heat_map"),
        (lambda a, i: attribution_image(a, i, sign="both"), ValueError, "unknown sign 'both'"),
        (lambda a, i: attribution_figure(a, method="blended_heat_map"), ValueError,
         "draws on the image: pass image="),
        (lambda a, i: attribution_image(a, method="original_image"), ValueError, "pass image="),
        (lambda a, i: attribution_image(a, i, method="masked_image", sign="all"), ValueError,
         "cannot show positive and negative"),
        (lambda a, i: attribution_figure(a, i, method="alpha_scaling", sign="all"), ValueError,
         "cannot show positive and negative"),
        (lambda a, i: normalize_attribution(a, outlier_perc=101), ValueError, "outlier_perc"),
        (lambda a, i: attribution_image(a, i, alpha_overlay=1.5), ValueError, "alpha_overlay"),
        (lambda a, i: attribution_image(a, cmap="jett"), ValueError, "unknown colormap 'jett'"),
        (lambda a, i: attribution_image(a[None]), ValueError, "e.g. explanation.raw[0]"),
        (lambda a, i: attribution_image(a * float("nan")), ValueError, "NaN"),
        (lambda a, i: attribution_image(a.tolist()), TypeError, "numpy array or torch tensor"),
        (lambda a, i: attribution_image(a, i * 2.0), ValueError, "[0, 1]"),
        (lambda a, i: attribution_panels(a, i, ["heat_map"], ["all", "all"]), ValueError,
         "one sign per method"),
        (lambda a, i: attribution_panels(a, i, ["heat_map"], ["all"], ["a", "b"]), ValueError,
         "one title per panel"),
        (lambda a, i: attribution_panels(a, i, ["heat_map", "masked_image"], ["all", "all"]),
         ValueError, "cannot show positive and negative"),
    ],
)
def test_errors_say_what_to_do(squares, call, error, message):
    with pytest.raises(error, match=None) as info:
        call(squares, torch.rand(3, SIDE, SIDE))
    assert message in str(info.value)
