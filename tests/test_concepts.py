"""Deep Feature Factorization: the NMF against scikit-learn, concepts on a real two-object photo,
seeding, the model left alone, errors, pictures and the ``heatlens concepts`` command."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from torch import nn

from heatlens import Concepts, factorize
from heatlens.cli import main
from heatlens.concepts.factorize import nmf
from heatlens.loading.models import imagenet_categories
from heatlens.pictures.concepts import concept_colors, concept_overlay

CATS = {"tabby", "tiger cat", "Persian cat", "Siamese cat", "Egyptian cat"}
CUPS = {"espresso", "cup", "coffee mug", "consomme", "eggnog"}
FAST = {"max_iter": 50}  # where convergence does not matter: keeps the tests fast
MEAN = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
STD = torch.tensor([0.229, 0.224, 0.225])[:, None, None]


@pytest.fixture(scope="module")
def two_objects(imagenet_photos: torch.Tensor) -> torch.Tensor:
    """chelsea (a cat, left half) and coffee (a cup, right half) side by side: (1, 3, 224, 448)."""
    return torch.cat([imagenet_photos[0], imagenet_photos[1]], dim=2)[None]


@pytest.fixture(scope="module")
def found(mobilenet_v2_imagenet: nn.Module, two_objects: torch.Tensor) -> Concepts:
    return factorize(mobilenet_v2_imagenet, two_objects, n_components=5, top_k=2, seed=0)


@pytest.fixture(scope="module")
def small(imagenet_photos: torch.Tensor) -> torch.Tensor:
    """chelsea at 96 x 96 (a 3 x 3 feature map at MobileNetV2's last layer), for fast checks."""
    return nn.functional.interpolate(imagenet_photos[:1], size=(96, 96), mode="bilinear")


def activation_matrix(model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """MobileNetV2's ``features`` output as A (N, C), computed without heatlens."""
    with torch.no_grad():
        acts = model.features(inputs)
    return acts.permute(0, 2, 3, 1).reshape(-1, acts.shape[1])


# ---------------------------------------------------------------------------------------------
# The factorization
# ---------------------------------------------------------------------------------------------


def test_exact_low_rank_matrix_is_recovered():
    generator = torch.Generator().manual_seed(1)
    matrix = torch.rand(200, 3, generator=generator) @ torch.rand(3, 64, generator=generator)
    result = nmf(matrix, 3)
    assert result.relative_error < 1e-2  # measured 2.3e-3 (scikit-learn's NMF: 8e-4)
    reconstruction = result.weights @ result.components
    error = torch.linalg.matrix_norm(matrix - reconstruction) / torch.linalg.matrix_norm(matrix)
    assert float(error) == pytest.approx(result.relative_error, rel=1e-4)
    assert bool((result.weights >= 0).all()) and bool((result.components >= 0).all())
    assert torch.allclose(result.weights.amax(dim=0), torch.ones(3))  # canonical scale
    parts = (torch.linalg.vector_norm(result.weights, dim=0)
             * torch.linalg.vector_norm(result.components, dim=1))
    assert bool((parts[:-1] >= parts[1:]).all())  # largest component first


def test_reconstruction_error_on_real_model_is_close_to_sklearn(mobilenet_v2_imagenet,
                                                                  two_objects, found):
    from sklearn.decomposition import NMF

    matrix = activation_matrix(mobilenet_v2_imagenet, two_objects)
    assert bool((matrix >= 0).all())  # after ReLU6: nothing to clamp
    reference = NMF(n_components=5, max_iter=1000, random_state=0)
    data = matrix.double().numpy()
    w = reference.fit_transform(data)
    sklearn_error = np.linalg.norm(data - w @ reference.components_) / np.linalg.norm(data)
    # Measured: heatlens 0.480 (470 iterations, seed 0), scikit-learn 0.476; the seeds 0 to 3
    # reach 0.476 to 0.484.
    assert found.relative_error < 0.5
    assert found.relative_error <= sklearn_error * 1.02
    assert found.converged and found.iterations < 1000
    # The result's maps and embeddings reconstruct the activations to the stated error.
    rebuilt = torch.einsum("bkhw,kc->bhwc", found.raw, found.embeddings).reshape(matrix.shape)
    error = torch.linalg.matrix_norm(matrix - rebuilt) / torch.linalg.matrix_norm(matrix)
    assert float(error) == pytest.approx(found.relative_error, rel=1e-4)


def test_seeded_runs_are_identical_and_leave_global_rng_alone(mobilenet_v2_imagenet, small):
    state = torch.get_rng_state()
    first = factorize(mobilenet_v2_imagenet, small, 3, seed=7, **FAST)
    second = factorize(mobilenet_v2_imagenet, small, 3, seed=7, **FAST)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(first.maps, second.maps)
    assert torch.equal(first.embeddings, second.embeddings)
    assert first.relative_error == second.relative_error


def test_different_seeds_start_differently(mobilenet_v2_imagenet, two_objects):
    matrix = activation_matrix(mobilenet_v2_imagenet, two_objects)
    one = nmf(matrix, 5, seed=0, max_iter=10)
    other = nmf(matrix, 5, seed=1, max_iter=10)
    assert not torch.equal(one.components, other.components)


# ---------------------------------------------------------------------------------------------
# Concepts on a real model and a real two-object photo
# ---------------------------------------------------------------------------------------------


def test_concepts_on_two_object_photo(found: Concepts):
    names = imagenet_categories()
    top1 = [names[c] for c in found.classes[:, 0].tolist()]
    assert len(set(top1)) >= 2
    assert CATS & set(top1) and CUPS & set(top1)  # measured: espresso, tiger cat, Egyptian cat,
    # consomme, Egyptian cat
    raw = found.raw[0]  # (k, 7, 14): the cat fills columns 0-6, the cup 7-13
    on_cat_half = raw[:, :, :7].sum(dim=(1, 2)) / raw.sum(dim=(1, 2))
    cat_concepts = [j for j, name in enumerate(top1) if name in CATS]
    cup_concepts = [j for j, name in enumerate(top1) if name in CUPS]
    for j in cat_concepts:  # measured 1.00, 0.99, 0.69
        assert on_cat_half[j] > 0.6, (j, top1[j], float(on_cat_half[j]))
    surest_cat = max(cat_concepts, key=lambda j: float(found.probabilities[j, 0]))
    assert on_cat_half[surest_cat] > 0.9
    for j in cup_concepts:  # measured 0.02, 0.05
        assert on_cat_half[j] < 0.1, (j, top1[j], float(on_cat_half[j]))


def test_result_shapes_and_labels_follow_the_formula(mobilenet_v2_imagenet, found: Concepts):
    assert found.layer == "features.18"
    assert "'classifier'" in found.head
    assert found.maps.shape == (1, 5, 224, 448) and found.raw.shape == (1, 5, 7, 14)
    assert found.embeddings.shape == (5, 1280) and found.n_components == 5
    assert float(found.maps.min()) >= 0 and float(found.maps.max()) <= 1
    with torch.no_grad():
        scores = mobilenet_v2_imagenet.classifier(found.embeddings)
    assert torch.allclose(found.scores, scores)
    probabilities, classes = scores.softmax(dim=1).topk(2, dim=1)
    assert torch.equal(found.classes, classes)
    assert torch.allclose(found.probabilities, probabilities)
    lines = found.legend(imagenet_categories())
    name = imagenet_categories()[int(classes[0, 0])]
    assert lines[0] == f"1: {name} {float(probabilities[0, 0]):.2f}, " + lines[0].split(", ")[1]
    assert found.legend()[0].startswith(f"1: class {int(classes[0, 0])} ")


def test_head_found_on_resnet_and_efficientnet_lite(resnet18_seeded, lite0, small):
    on_resnet = factorize(resnet18_seeded, small, 2, **FAST)
    assert on_resnet.layer == "layer4" and on_resnet.head.startswith("'fc'")
    with torch.no_grad():
        assert torch.allclose(on_resnet.scores, resnet18_seeded.fc(on_resnet.embeddings))
    on_lite0 = factorize(lite0, small, 2, **FAST)
    assert on_lite0.layer == "_swish" and on_lite0.head.startswith("'_fc'")


def test_given_head_and_no_head(mobilenet_v2_imagenet, small):
    auto = factorize(mobilenet_v2_imagenet, small, 3, **FAST)
    given = factorize(mobilenet_v2_imagenet, small, 3, head=mobilenet_v2_imagenet.classifier,
                      **FAST)
    named = factorize(mobilenet_v2_imagenet, small, 3, head="classifier.1", **FAST)
    assert torch.equal(auto.scores, given.scores) and torch.equal(auto.scores, named.scores)
    unlabelled = factorize(mobilenet_v2_imagenet, small, 3, head=None, **FAST)
    assert unlabelled.scores is None and unlabelled.classes is None
    assert unlabelled.legend() == ["1", "2", "3"]
    assert torch.equal(unlabelled.maps, auto.maps)


def test_one_dimensional_signals_and_batches():
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv1d(2, 8, 3, padding=1), nn.ReLU()).eval()
        signals = torch.randn(3, 2, 16)
    result = factorize(model, signals, 2, layer="1", head=None)
    assert result.raw.shape == (3, 2, 16) and result.maps.shape == (3, 2, 16)
    assert torch.allclose(result.raw.amax(dim=(0, 2)), torch.ones(2))  # peak 1 over the batch
    with pytest.raises(ValueError, match="2-D maps"):
        result.overlay(np.zeros((16, 16, 3), dtype=np.uint8))


def test_signed_layer_is_clamped_with_a_note(mobilenet_v2_imagenet, small):
    with pytest.warns(UserWarning, match="negative activations"):
        result = factorize(mobilenet_v2_imagenet, small, 3, layer="features.17", head=None,
                           **FAST)
    assert len(result.notes) == 1 and "set to 0" in result.notes[0]
    with torch.no_grad():
        acts = mobilenet_v2_imagenet.features[:18](small)
    matrix = acts.permute(0, 2, 3, 1).reshape(-1, acts.shape[1]).clamp_min(0)
    rebuilt = torch.einsum("bkhw,kc->bhwc", result.raw, result.embeddings).reshape(matrix.shape)
    error = torch.linalg.matrix_norm(matrix - rebuilt) / torch.linalg.matrix_norm(matrix)
    assert float(error) == pytest.approx(result.relative_error, rel=1e-4)


# ---------------------------------------------------------------------------------------------
# The model comes back as it went in
# ---------------------------------------------------------------------------------------------


def snapshot(model: nn.Module) -> dict:
    return {
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "training": [m.training for m in model.modules()],
        "requires_grad": [p.requires_grad for p in model.parameters()],
        "grads": [p.grad for p in model.parameters()],
        "hooks": [
            (len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks))
            for m in model.modules()
        ],
    }


def assert_same(before: dict, after: dict) -> None:
    assert before["training"] == after["training"]
    assert before["requires_grad"] == after["requires_grad"]
    assert all(a is b for a, b in zip(before["grads"], after["grads"], strict=True))
    assert before["hooks"] == after["hooks"]
    for key, value in before["state"].items():
        assert torch.equal(value, after["state"][key]), key


def test_model_unchanged_also_after_an_error(mobilenet_v2_imagenet, small):
    before = snapshot(mobilenet_v2_imagenet)
    factorize(mobilenet_v2_imagenet, small, 2, **FAST)
    with pytest.raises(ValueError):
        factorize(mobilenet_v2_imagenet, small, 5000, **FAST)
    assert_same(before, snapshot(mobilenet_v2_imagenet))


def test_model_in_training_mode_keeps_its_mode_and_statistics(mobilenet_v2_imagenet, small):
    model = copy.deepcopy(mobilenet_v2_imagenet).train()
    before = snapshot(model)
    with pytest.warns(UserWarning, match="training mode"):
        factorize(model, small, 2, head=None, **FAST)
    assert_same(before, snapshot(model))


def test_inside_inference_mode(mobilenet_v2_imagenet, small):
    with torch.inference_mode():
        result = factorize(mobilenet_v2_imagenet, small, 2, **FAST)
    assert result.maps.shape == (1, 2, 96, 96)


# ---------------------------------------------------------------------------------------------
# Bad input: the error names the problem and the fix
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"n_components": 0}, ValueError, "n_components must be at least 1"),
        ({"n_components": 1281}, ValueError, "more than the 1280 channels.*n_components <= 1280"),
        ({"n_components": 2.5}, TypeError, "n_components must be an int"),
        ({"top_k": 1001}, ValueError, "top_k <= 1000"),
        ({"layer": "classifier"}, ValueError, "neither a feature map.*choose another layer"),
        ({"layer": "features.17"}, ValueError, "cannot find the classifier head.*head=None"),
        ({"head": "fc"}, ValueError, "head='fc'.*no layer named 'fc'"),
        ({"head": 3}, TypeError, "head must be 'auto'"),
        ({"head": lambda h: h.sum()}, ValueError, r"not \(3, num_classes\)"),
        ({"max_iter": 0}, ValueError, "max_iter must be at least 1"),
    ],
)
def test_bad_input_is_named(mobilenet_v2_imagenet, small, options, error, match):
    arguments = {"n_components": 3, **FAST, **options}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # features.17 is signed
        with pytest.raises(error, match=match):
            factorize(mobilenet_v2_imagenet, small, **arguments)


def test_bad_inputs_and_model(mobilenet_v2_imagenet):
    with pytest.raises(TypeError, match="torch.nn.Module"):
        factorize(lambda x: x, torch.zeros(1, 3, 32, 32))
    with pytest.raises(TypeError, match="float tensor"):
        factorize(mobilenet_v2_imagenet, torch.zeros(1, 3, 32, 32, dtype=torch.uint8))
    with pytest.raises(ValueError, match="non-negative"):
        nmf(torch.tensor([[1.0, -1.0]]), 1)


# ---------------------------------------------------------------------------------------------
# Pictures
# ---------------------------------------------------------------------------------------------


def test_overlay_colours_each_pixel_by_its_strongest_concept():
    image = np.full((4, 4, 3), 100, dtype=np.uint8)
    maps = torch.zeros(2, 4, 4)
    maps[0, 0, 0] = 1.0
    maps[1, 0, 0] = 0.5  # weaker than concept 0 here
    maps[1, 3, 3] = 0.5
    colors = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    picture = np.asarray(concept_overlay(image, maps, colors, image_weight=0.3), dtype=float)
    np.testing.assert_allclose(picture[0, 0], [0.3 * 100 + 0.7 * 255, 30, 30], atol=0.5)
    opacity = 0.7 * 0.5
    np.testing.assert_allclose(picture[3, 3], [(1 - opacity) * 100] * 2
                               + [(1 - opacity) * 100 + opacity * 255], atol=0.5)
    assert (picture[1:3, 1:3] == 100).all()  # no concept: the image itself
    unchanged = concept_overlay(image, maps, colors, image_weight=1.0)
    assert (np.asarray(unchanged) == image).all()
    with pytest.raises(ValueError, match="image_weight"):
        concept_overlay(image, maps, colors, image_weight=1.5)


def test_figure_has_a_legend_and_saves(found: Concepts, two_objects, tmp_path):
    display = (two_objects[0] * STD + MEAN).clamp(0, 1)
    labels = imagenet_categories()
    overlay = found.overlay(display)
    assert overlay.size == (448, 224)
    figure = found.figure(display, labels=labels, titles=["chelsea | coffee"])
    (legend,) = figure.legends
    assert [t.get_text() for t in legend.get_texts()] == found.legend(labels)
    colours = [tuple(p.get_facecolor()[:3]) for p in legend.get_patches()]
    np.testing.assert_allclose(colours, concept_colors(5))
    path = found.save(tmp_path / "concepts.png", [display], labels=labels)
    with Image.open(path) as saved:
        assert saved.format == "PNG" and min(saved.size) > 200
    with pytest.raises(ValueError, match="2 images for 1 maps"):
        found.figure([display, display])


# ---------------------------------------------------------------------------------------------
# heatlens concepts
# ---------------------------------------------------------------------------------------------


def test_cli_concepts_follows_the_out_rule(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """The one rule of every figure command: a named file is replaced, a directory gets the
    default name inside it, never overwriting."""
    from skimage import data

    monkeypatch.chdir(tmp_path)
    Image.fromarray(data.chelsea()).save("chelsea.png")
    Path("out.png").write_bytes(b"an earlier figure")
    Path("figures").mkdir()
    Path("figures/heatlens_chelsea_concepts.png").write_bytes(b"the user's own file")
    runner = CliRunner()
    result = runner.invoke(main, ["concepts", "chelsea.png", "--n-components", "3",
                                  "--top-k", "2", "-o", "out.png"])
    assert result.exit_code == 0, result.output
    lines = [line for line in result.stdout.splitlines() if line.startswith("concept ")]
    assert len(lines) == 3 and all(line.count(", ") == 1 for line in lines)
    assert any(cat in result.stdout for cat in CATS)
    assert "wrote out.png" in result.stdout
    with Image.open("out.png") as saved:
        assert saved.format == "PNG"

    inside = runner.invoke(main, ["concepts", "chelsea.png", "--n-components", "3",
                                  "--out", "figures"])
    assert inside.exit_code == 0, inside.output
    assert "wrote figures/heatlens_chelsea_concepts-1.png" in inside.stdout
    assert Path("figures/heatlens_chelsea_concepts.png").read_bytes() == b"the user's own file"

    usage = runner.invoke(main, ["concepts", "chelsea.png", "--n-components", "0"])
    assert usage.exit_code == 2 and "--n-components" in usage.output
    bad = runner.invoke(main, ["concepts", "chelsea.png", "--layer", "nope"])
    assert bad.exit_code == 1 and "Error: the model has no layer named 'nope'" in bad.output
