"""Tests of heatlens.loading.presets: the model's preprocessing and the matching display image."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data
from torchvision.models import MobileNet_V2_Weights
from torchvision.transforms import InterpolationMode
from torchvision.transforms._presets import ImageClassification

from heatlens.loading.presets import IMAGENET, Preset

PHOTOS = {"chelsea": data.chelsea, "coffee": data.coffee, "astronaut": data.astronaut}


@pytest.fixture(scope="module", params=sorted(PHOTOS))
def photo(request) -> Image.Image:
    return Image.fromarray(PHOTOS[request.param]())


def test_imagenet_tensor_equals_torchvision_weights_transforms(photo: Image.Image):
    expected = MobileNet_V2_Weights.IMAGENET1K_V1.transforms()(photo)

    tensor = IMAGENET.tensor(photo)

    assert tensor.shape == (3, 224, 224)
    assert tensor.dtype == torch.float32
    assert torch.allclose(tensor, expected, rtol=0, atol=1e-5)


def test_other_presets_equal_torchvision_too(photo: Image.Image):
    preset = Preset(
        resize=160, crop=128, mean=(0.5, 0.5, 0.5), std=(0.25, 0.5, 1.0), interpolation="bicubic"
    )
    reference = ImageClassification(
        crop_size=128,
        resize_size=160,
        mean=(0.5, 0.5, 0.5),
        std=(0.25, 0.5, 1.0),
        interpolation=InterpolationMode.BICUBIC,
    )
    assert torch.allclose(preset.tensor(photo), reference(photo), rtol=0, atol=1e-5)


def test_display_is_the_geometry_the_model_sees(photo: Image.Image):
    display = IMAGENET.display(photo)

    assert display.mode == "RGB"
    assert display.size == (224, 224)
    pixels = torch.from_numpy(np.array(display)).permute(2, 0, 1).float() / 255
    mean = torch.tensor(IMAGENET.mean).view(3, 1, 1)
    std = torch.tensor(IMAGENET.std).view(3, 1, 1)
    assert torch.allclose(IMAGENET.tensor(photo), (pixels - mean) / std, atol=1e-6)
    assert torch.allclose(IMAGENET.unnormalize(IMAGENET.tensor(photo)), pixels, atol=1e-6)


def test_display_crops_the_centre():
    # A 512x256 photo: resized to 448x224 (shorter side 224 with resize=crop=224), the crop
    # keeps the central 224 columns, i.e. the central half of the original.
    wide = Image.fromarray(data.astronaut()[128:384])
    preset = Preset(resize=224, crop=224, mean=(0, 0, 0), std=(1, 1, 1))
    expected = wide.crop((128, 0, 384, 256)).resize((224, 224), Image.Resampling.BILINEAR)

    display = np.asarray(preset.display(wide)).astype(float)

    assert np.abs(display - np.asarray(expected)).mean() < 2
    shifted = wide.crop((0, 0, 256, 256)).resize((224, 224), Image.Resampling.BILINEAR)
    assert np.abs(display - np.asarray(shifted)).mean() > 20


def test_call_batches_one_or_many_images():
    cat, cup = Image.fromarray(data.chelsea()), Image.fromarray(data.coffee())

    batch, displays = IMAGENET([cat, cup])

    assert batch.shape == (2, 3, 224, 224)
    assert batch.dtype == torch.float32
    assert [d.size for d in displays] == [(224, 224), (224, 224)]
    assert torch.equal(batch[0], IMAGENET.tensor(cat))
    assert torch.equal(batch[1], IMAGENET.tensor(cup))
    np.testing.assert_array_equal(np.asarray(displays[1]), np.asarray(IMAGENET.display(cup)))

    single, single_displays = IMAGENET(cat)
    assert single.shape == (1, 3, 224, 224)
    assert len(single_displays) == 1
    assert torch.equal(single[0], batch[0])


def test_non_rgb_and_rotated_images_are_made_upright_rgb():
    cat = Image.fromarray(data.chelsea())
    grey = cat.convert("L")
    display = np.asarray(IMAGENET.display(grey))
    assert display.shape == (224, 224, 3)
    np.testing.assert_array_equal(display[..., 0], display[..., 2])

    rotated = cat.transpose(Image.Transpose.ROTATE_90)  # stored sideways ...
    exif = rotated.getexif()
    exif[0x0112] = 6  # ... with the EXIF tag that says how to turn it upright
    assert torch.allclose(IMAGENET.tensor(rotated), IMAGENET.tensor(cat), atol=1e-6)


def test_unnormalize_clamps_and_keeps_shape():
    batch, _ = IMAGENET([Image.fromarray(data.coffee())] * 2)
    restored = IMAGENET.unnormalize(batch * 10)
    assert restored.shape == batch.shape
    assert restored.min() >= 0 and restored.max() <= 1
    assert (restored == 0).any() and (restored == 1).any()
    with pytest.raises(ValueError, match=r"\(3, H, W\) or \(B, 3, H, W\).*\(224, 224\)"):
        IMAGENET.unnormalize(batch[0, 0])


def test_preset_is_a_frozen_hashable_value():
    preset = Preset(resize=256, crop=224, mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])
    assert preset == IMAGENET
    assert hash(preset) == hash(IMAGENET)
    with pytest.raises(AttributeError):
        preset.crop = 100  # type: ignore[misc]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"crop": 300}, r"crop \(300\) is larger than resize \(256\)"),
        ({"crop": 0}, "crop must be a positive int"),
        ({"resize": 256.0}, "resize must be a positive int"),
        ({"std": (0.2, 0.0, 0.2)}, "std values must all be positive"),
        ({"mean": (0.5, 0.5)}, r"mean needs one value per RGB channel \(3\)"),
        ({"interpolation": "cubic"}, "unknown Preset interpolation 'cubic'; use one of .*bicubic"),
    ],
)
def test_bad_presets_are_refused(kwargs: dict, message: str):
    arguments = {"resize": 256, "crop": 224, "mean": IMAGENET.mean, "std": IMAGENET.std} | kwargs
    with pytest.raises(ValueError, match=message):
        Preset(**arguments)


def test_bad_inputs_are_refused():
    with pytest.raises(TypeError, match="load_image"):
        IMAGENET.display(data.chelsea())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="empty sequence"):
        IMAGENET([])
