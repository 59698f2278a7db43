"""Bad and unusual inputs, as an outside test of 118 of them found: each gets the right result or
a clear one-line error before the work, and the model is left as it was (docs/design.md,
promise 12)."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
from test_engine import assert_same_state, snapshot
from torch import nn

import heatlens

X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def resnet(resnet18_seeded) -> nn.Module:
    return resnet18_seeded


# --- silent wrong results, now right or refused ------------------------------------------------


@pytest.mark.parametrize("method", ["gradcam", "integrated_gradients", "scorecam"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_images_are_named(resnet, method, bad):
    x = X.clone()
    x[1, 0, 3, 4] = bad
    with pytest.raises(ValueError, match=r"image 1 of the batch of 2 holds NaN or infinite "
                                         r"values \(1 of 3072\)"):
        heatlens.explain(resnet, x, method)


def test_huge_finite_images_are_not_called_non_finite():
    """The finiteness check sums the batch first: a sum that overflows to inf must not be taken
    for a NaN or infinite pixel."""
    x = torch.full((2, 3, 8, 8), 3e38)
    assert torch.isinf(x.sum()) and torch.isfinite(x).all()
    explained = heatlens.explain(nn.Sequential(nn.Conv2d(3, 2, 3), nn.Flatten()).eval(), x,
                                 "sobelcam")
    assert explained.maps.shape == (2, 8, 8)


def test_a_model_blind_control_never_runs_the_model(recwarn):
    """SobelCAM checks the inputs but neither runs the model nor reads its modes: a model whose
    forward pass raises, left in training mode, gives the edges without a warning."""

    class Unusable(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 2, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            raise AssertionError("a control ran the model")

    x = torch.zeros(1, 3, 6, 6)
    x[..., 3:] = 1.0
    explained = heatlens.explain(Unusable().train(), x, "sobelcam")
    assert not [w for w in recwarn if "training mode" in str(w.message)]
    assert explained.maps[0, :, 2:4].eq(1).all() and explained.maps[0, :, [0, 5]].eq(0).all()
    with pytest.raises(ValueError, match="NaN or infinite"):
        heatlens.explain(Unusable(), torch.full((1, 3, 6, 6), float("nan")), "sobelcam")


def test_factorize_refuses_non_finite_images(resnet):
    x = X.clone()
    x[0] = float("nan")
    with pytest.raises(ValueError, match="image 0 of the batch of 2 holds NaN"):
        heatlens.factorize(resnet, x, 2)


def test_non_finite_scores_are_named_before_an_arg_max():
    class Broken(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = self.conv(x).mean(dim=(2, 3))
            return out / (x[:, :1, 0, 0] > 100).float()  # 0 / 0 and x / 0

    with pytest.raises(ValueError, match="scores for image 0 are NaN or infinite"):
        heatlens.explain(Broken().eval(), X, "gradcam")


def test_a_submodule_left_training_is_named(resnet):
    resnet.layer4.train()
    try:
        before = snapshot(resnet)
        with pytest.warns(UserWarning, match=r"module 'layer4' of the model is in training mode"):
            heatlens.explain(resnet, torch.randn(2, 3, 64, 64), "gradcam")
        assert_same_state(before, snapshot(resnet))
    finally:
        resnet.eval()


class Embedder(nn.Module):
    """A classifier that returns its embedding first, then its scores."""

    def __init__(self, key: str) -> None:
        super().__init__()
        self.key = key
        with torch.random.fork_rng():
            torch.manual_seed(4)
            self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
            self.embed = nn.Linear(8, 600)
            self.fc = nn.Linear(600, 10)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        embedding = self.embed(self.features(x).mean(dim=(2, 3)))
        return {"embedding": embedding, self.key: self.fc(embedding)}


def test_a_dict_output_is_explained_on_its_logits():
    model = Embedder("logits").eval()
    result = heatlens.explain(model, X, "gradcam")
    with torch.no_grad():
        expected = model(X)["logits"].argmax(dim=1)
    assert result.targets.tolist() == expected.tolist()
    assert result.output.shape == (2, 10)


def test_an_ambiguous_dict_asks_which_output():
    model = Embedder("scores").eval()
    with pytest.raises(ValueError, match=r"tensors 'embedding', 'scores': which one holds the "
                                         r"scores to explain\? Say so with output="):
        heatlens.explain(model, X, "gradcam")
    result = heatlens.explain(model, X, "gradcam", output="scores")
    with torch.no_grad():
        expected = model(X)["scores"].argmax(dim=1)
    assert result.targets.tolist() == expected.tolist()
    with pytest.raises(ValueError, match="output='logits' is not an entry .* 'embedding', "
                                         "'scores'"):
        heatlens.explain(model, X, "gradcam", output="logits")
    head = nn.Sequential(model.embed, model.fc)
    concepts = heatlens.factorize(model, X, 2, output="scores", head=head)
    assert concepts.scores.shape == (2, 10)


def test_a_tuple_output_by_index():
    class Pair(Embedder):
        def forward(self, x):  # type: ignore[override]
            out = super().forward(x)
            return out["embedding"], out["scores"]

    model = Pair("scores").eval()
    result = heatlens.explain(model, X, "gradcam", output=1)
    assert result.output.shape == (2, 10)
    assert not model._forward_hooks


def test_a_constant_map_stays_constant_and_says_so(resnet):
    with pytest.warns(UserWarning, match=r"at layer 'avgpool' holds one value at all its 1 x 1 "
                                         "positions"):
        result = heatlens.explain(resnet, X, "gradcam", layer="avgpool")
    assert float(result.maps.abs().max()) == 0.0  # no stripes of rounding noise


@pytest.fixture(scope="module")
def vit() -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64).eval()


def test_factorize_lays_out_a_transformers_tokens(vit):
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with pytest.warns(UserWarning, match="negative activations"):
        found = heatlens.factorize(vit, x, 3)
    assert found.layer == "blocks.11.norm1"
    assert found.raw.shape == (2, 3, 4, 4)  # the 4 x 4 patch grid, not 17 tokens as channels
    assert found.embeddings.shape == (3, 192)
    assert found.maps.shape == (2, 3, 64, 64)
    assert "reads the class token" in found.head
    assert found.classes.shape == (3, 2)


# --- clear errors that came late or unclear ----------------------------------------------------


def test_dtype_mismatches_say_what_to_convert(resnet):
    with pytest.raises(TypeError, match=r"inputs are torch.float64 but the model's parameters are "
                                        r"torch.float32; convert the inputs to match: "
                                        r"inputs.float\(\)"):
        heatlens.explain(resnet, X.double())
    half = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4, 2)).to(torch.bfloat16).eval()
    with pytest.raises(TypeError, match=r"inputs.bfloat16\(\)"):
        heatlens.explain(half, X)


def test_data_parallel_is_explained_through_its_module(resnet):
    wrapped = nn.DataParallel(resnet)  # the wrapper itself is in training mode
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = heatlens.explain(wrapped, X, "gradcam", target=[1, 2])
    direct = heatlens.explain(resnet, X, "gradcam", target=[1, 2])
    torch.testing.assert_close(result.raw, direct.raw)
    assert result.layers == direct.layers


@pytest.mark.parametrize("target", [torch.tensor(7), np.int64(7), np.array([7, 7]), [7, 7],
                                    torch.tensor([7])])
def test_one_class_for_all_in_any_integer_form(resnet, target):
    assert heatlens.explain(resnet, X, target=target).targets.tolist() == [7, 7]


def test_a_class_by_name(resnet):
    labels = [f"class {i}" for i in range(1000)]
    labels[281] = "tabby cat"
    result = heatlens.explain(resnet, X, target="Tabby_Cat", labels=labels)
    assert result.targets.tolist() == [281, 281]
    both = heatlens.explain(resnet, X, target=["tabby cat", "class 3"], labels=labels)
    assert both.targets.tolist() == [281, 3]
    with pytest.raises(ValueError, match="no class is named 'tabby kat'.*Did you mean "
                                         "'tabby cat'"):
        heatlens.explain(resnet, X, target="tabby kat", labels=labels)
    with pytest.raises(ValueError, match="target='cat' names a class, but no class names are "
                                         "known here: pass labels="):
        heatlens.explain(resnet, X, target="cat")


def test_a_layer_that_is_not_a_name_or_module(resnet):
    with pytest.raises(TypeError, match=r"layer must be 'auto', a module name, an nn.Module or "
                                        r"a list of these, not int \(123\)"):
        heatlens.explain(resnet, X, layer=123)
