"""Vision transformers with no configuration: token layouts, CAMs on tokens, attention capture
under fused attention, and rollout against a reference written out here.

Models are random-init timm, torchvision and Hugging Face transformers (no weights exist offline;
the trained transformer is in tests/test_transformer_evidence.py). The method matrix runs at
small input sizes (each architecture built for that size) so that Score-CAM's one pass per
channel stays fast; every architecture also runs at its native 224 px with ``layer="auto"``.
Every CAM method on every token layout (class, distillation and register tokens; channels-last
Swin maps) is also checked against the same method on the layer's output reshaped by hand
(``test_token_cam_equals_cam_on_a_hand_reshaped_grid``).
"""

from __future__ import annotations

import copy
import math
import warnings

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision.models as torchvision_models
import transformers
from threads import one_intraop_thread
from torch import Tensor, nn

import heatlens
from heatlens.engine.attention import attention_recorded
from heatlens.engine.tokens import infer_layout, transformer_layer
from heatlens.methods.rollout import discard_lowest, fuse_heads, rollout

CAM_METHODS = ("gradcam", "gradcam++", "xgradcam", "layercam", "scorecam", "ablationcam",
               "eigencam")


def seeded(build, seed: int = 0) -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = build()
    return model.eval()


def tv_vit(**options) -> nn.Module:
    """torchvision's ViT-B/16 with a random head (torchvision initialises it to zeros, which
    would make every gradient zero)."""
    model = torchvision_models.vit_b_16(**options)
    nn.init.normal_(model.heads.head.weight, std=0.02)
    return model


def tv_vit_tiny() -> nn.Module:
    """torchvision's ``VisionTransformer`` (the class of ViT-B/16) at 64 px, 3 layers of 32
    channels: Score-CAM's one pass per channel is 32 passes instead of ViT-B's 768."""
    model = torchvision_models.VisionTransformer(image_size=64, patch_size=16, num_layers=3,
                                                 num_heads=2, hidden_dim=32, mlp_dim=64,
                                                 num_classes=10)
    nn.init.normal_(model.heads.head.weight, std=0.02)
    return model


def hf_vit(size: int, patch: int) -> nn.Module:
    config = transformers.ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                    intermediate_size=128, image_size=size, patch_size=patch,
                                    num_labels=10)
    return transformers.ViTForImageClassification(config)


# name -> (builder at a small size, input size, expected auto layer, expected prefix tokens)
SMALL = {
    "timm_vit_tiny": (lambda: timm.create_model("vit_tiny_patch16_224", img_size=64),
                      64, "blocks.11.norm1", 1),
    "timm_deit_distilled": (
        lambda: timm.create_model("deit_tiny_distilled_patch16_224", img_size=64),
        64, "blocks.11.norm1", 2),
    "timm_vit_registers": (
        lambda: timm.create_model("vit_tiny_patch16_224", img_size=64, reg_tokens=4),
        64, "blocks.11.norm1", 5),
    "timm_swin_tiny": (
        lambda: timm.create_model("swin_tiny_patch4_window7_224", img_size=128, window_size=4),
        128, "layers.3.blocks.1.norm1", 0),
    "torchvision_vit_b_16": (lambda: tv_vit(image_size=64), 64,
                             "encoder.layers.encoder_layer_11.ln_1", 1),
    "torchvision_vit_tiny": (tv_vit_tiny, 64, "encoder.layers.encoder_layer_2.ln_1", 1),
    "torchvision_swin_t": (lambda: torchvision_models.swin_t(), 64, "features.7.1.norm1", 0),
    "hf_vit": (lambda: hf_vit(64, 16), 64, "vit.layers.1.layernorm_before", 1),
}

# Methods with one pass per channel: Swin at its first stage (96 channels, still channels-last);
# timm's Swin cannot be cut for Ablation-CAM, so that runs full passes
PER_CHANNEL_LAYER = {("scorecam", "timm_swin_tiny"): "layers.0.blocks.1.norm1",
                     ("ablationcam", "timm_swin_tiny"): "layers.0.blocks.1.norm1",
                     ("scorecam", "torchvision_swin_t"): "features.1.1.norm1"}
# Score-CAM on torchvision's ViT runs on torchvision_vit_tiny (the same VisionTransformer class
# and token layout): ViT-B's 768 passes take 45 s here
MATRIX = [(method, arch) for arch in SMALL for method in CAM_METHODS
          if (method, arch) != ("scorecam", "torchvision_vit_b_16")]

NATIVE = {
    "timm_vit_tiny": lambda: timm.create_model("vit_tiny_patch16_224"),
    "timm_deit_distilled": lambda: timm.create_model("deit_tiny_distilled_patch16_224"),
    "timm_vit_registers": lambda: timm.create_model("vit_tiny_patch16_224", reg_tokens=4),
    "timm_swin_tiny": lambda: timm.create_model("swin_tiny_patch4_window7_224"),
    "torchvision_vit_b_16": lambda: tv_vit(),
    "torchvision_swin_t": lambda: torchvision_models.swin_t(),
    "hf_vit": lambda: hf_vit(224, 16),
}


@pytest.fixture(scope="module")
def small_models() -> dict[str, nn.Module]:
    return {name: seeded(build) for name, (build, *_) in SMALL.items()}


def batch(size: int, seed: int = 0) -> Tensor:
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(seed))


def state(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


# --- 1. every CAM method on every family, no reshape code --------------------------------------


@pytest.mark.parametrize(("method", "arch"), MATRIX)
def test_cam_methods_run_on_transformers(small_models, arch, method):
    """Every CAM method runs on every family with no reshape code: the token layout is named,
    the map varies, and the model is left as it was."""
    model = small_models[arch]
    _, size, layer, prefix = SMALL[arch]
    layer = PER_CHANNEL_LAYER.get((method, arch), layer)
    before = state(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. Ablation-CAM falling back to full passes
        if arch == "timm_swin_tiny":  # its blocks read the batch size from their own input
            warnings.filterwarnings("ignore", "Ablation-CAM cannot evaluate only the layers")
        options = {"show_progress": False} if method in ("scorecam", "ablationcam") else {}
        if (method, arch) in PER_CHANNEL_LAYER:
            options["layer"] = layer
        result = heatlens.explain(model, batch(size), method, target=[1, 2], **options)
    assert result.layers == (layer,)
    assert result.maps.shape == (2, size, size)
    assert bool(torch.isfinite(result.maps).all())
    assert float(result.raw.std()) > 0
    description = result.details["token_layout"][layer]
    assert (f"{prefix} prefix token" in description) == (prefix > 0)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


class HandGrid(nn.Module):
    """A transformer layer whose output is rearranged by hand to a feature map ``(B, C, h, w)``,
    passed through the identity module ``grid`` (the layer a CAM explains on the wrapped copy),
    and put back: tokens ``(B, P + h w, C)`` (the ``P`` prefix tokens kept aside, the patches in
    row-major order) or a channels-last map ``(B, h, w, C)``. What other libraries ask users to
    write as a ``reshape_transform``."""

    def __init__(self, inner: nn.Module, prefix: int) -> None:
        super().__init__()
        self.inner, self.prefix, self.grid = inner, prefix, nn.Identity()

    def forward(self, *args, **kwargs) -> Tensor:
        out = self.inner(*args, **kwargs)
        if out.ndim == 4:  # Swin: (B, h, w, C)
            return self.grid(out.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        b, n, c = out.shape
        side = math.isqrt(n - self.prefix)
        patches = out[:, self.prefix :].reshape(b, side, side, c).permute(0, 3, 1, 2)
        patches = self.grid(patches).permute(0, 2, 3, 1).reshape(b, side * side, c)
        return torch.cat([out[:, : self.prefix], patches], dim=1)


def with_hand_grid(model: nn.Module, layer: str, prefix: int) -> nn.Module:
    """A deep copy of ``model`` whose ``layer`` is wrapped in :class:`HandGrid`."""
    wrapped = copy.deepcopy(model)
    parent, _, child = layer.rpartition(".")
    owner = wrapped.get_submodule(parent)
    inner = getattr(owner, child)
    setattr(owner, child, HandGrid(inner, prefix).train(inner.training))
    return wrapped


def tiny_timm(name: str, **options) -> nn.Module:
    """A timm architecture at 32 px with 8 px patches (a 4 x 4 grid), 2 blocks of 32 channels."""
    return timm.create_model(name, img_size=32, patch_size=8, embed_dim=32, depth=2,
                             num_heads=2, num_classes=10, **options)


def tiny_timm_swin() -> nn.Module:
    return timm.create_model("swin_tiny_patch4_window7_224", img_size=32, window_size=4,
                             embed_dim=16, depths=(1, 1), num_heads=(1, 2), num_classes=10)


def tiny_tv_swin() -> nn.Module:
    return torchvision_models.swin_transformer.SwinTransformer(
        patch_size=[4, 4], embed_dim=16, depths=[1, 1], num_heads=[1, 2], window_size=[4, 4],
        num_classes=10)


# Each token layout on a model small enough for every method (Score-CAM's pass per channel
# included): arch -> (builder, input size, layer, prefix tokens). The full-size models of the
# same classes run the method matrix above.
TOKEN_MODELS = {
    "timm_vit": (lambda: tiny_timm("vit_tiny_patch16_224"), 32, "blocks.1.norm1", 1),
    "timm_deit_distilled": (lambda: tiny_timm("deit_tiny_distilled_patch16_224"), 32,
                            "blocks.1.norm1", 2),
    "timm_vit_registers": (lambda: tiny_timm("vit_tiny_patch16_224", reg_tokens=4), 32,
                           "blocks.1.norm1", 5),
    "torchvision_vit": (tv_vit_tiny, 64, "encoder.layers.encoder_layer_2.ln_1", 1),
    "hf_vit": (lambda: hf_vit(64, 16), 64, "vit.layers.1.layernorm_before", 1),
    "timm_swin": (tiny_timm_swin, 32, "layers.1.blocks.0.norm1", 0),
    "torchvision_swin": (tiny_tv_swin, 32, "features.3.0.norm1", 0),
}


@pytest.fixture
def one_thread():
    """Many small passes: one intra-op thread is faster on a shared machine; restored after."""
    with one_intraop_thread():
        yield


@pytest.fixture(scope="module")
def token_models() -> dict[str, nn.Module]:
    return {name: seeded(build) for name, (build, *_) in TOKEN_MODELS.items()}


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("arch", list(TOKEN_MODELS))
@pytest.mark.parametrize("method", CAM_METHODS)
def test_token_cam_equals_cam_on_a_hand_reshaped_grid(token_models, method, arch):
    """A CAM method on a transformer layer gives the map it gives on that layer's output
    reshaped by hand to ``(B, C, h, w)`` (prefix tokens left out, patches row-major; Swin's
    channels moved first): the token layout is read right for every method and family, including
    Score-CAM's masks and Ablation-CAM's ablated tokens put back with the prefix kept. (The CAM
    math on feature maps is checked against pytorch-grad-cam in tests/test_agreement.py and
    tests/test_perturbation.py.)"""
    model = token_models[arch]
    _, size, layer, prefix = TOKEN_MODELS[arch]
    x = batch(size, 9)
    options = {"show_progress": False} if method in ("scorecam", "ablationcam") else {}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Ablation-CAM cannot evaluate only the layers")
        on_tokens = heatlens.explain(model, x, method, target=[1, 2], layer=layer, **options)
        on_grid = heatlens.explain(with_hand_grid(model, layer, prefix), x, method,
                                   target=[1, 2], layer=f"{layer}.grid", **options)
    assert f"{prefix} prefix token" in on_tokens.details["token_layout"][layer] or prefix == 0
    assert "token_layout" not in on_grid.details  # the hand-made grid is a plain feature map
    assert on_tokens.raw.shape == on_grid.raw.shape == (2, 4, 4)
    scale = float(on_grid.raw.abs().max())
    assert scale > 0 and float(on_grid.raw.std()) > 0
    assert float((on_tokens.raw - on_grid.raw).abs().max()) <= 1e-4 * scale, method
    assert float((on_tokens.maps - on_grid.maps).abs().max()) <= 1e-3


@pytest.mark.parametrize("arch", list(NATIVE))
def test_native_size_auto_layer(arch):
    """The named architectures at their own 224 px, with a gradient method and Eigen-CAM."""
    model = seeded(NATIVE[arch])
    grid = (14, 14) if "swin" not in arch else (7, 7)
    for method in ("gradcam", "eigencam"):
        result = heatlens.explain(model, batch(224), method, target=[3, 4])
        assert result.layers == (SMALL[arch][2],)
        assert result.maps.shape == (2, 224, 224)
        assert float(result.raw.std()) > 0
        assert f"{grid[0]} x {grid[1]}" in result.details["token_layout"][result.layers[0]]
        assert "auto:" in result.layer_reason and "transformer block" in result.layer_reason


def test_token_grad_cam_equals_hand_reshape(small_models):
    """Grad-CAM on tokens is Grad-CAM on the patch tokens reshaped by hand (the prefix left
    out), which is what users of other libraries write as a reshape_transform."""
    model = small_models["timm_deit_distilled"]
    x = batch(64, 1)
    seen: dict[str, Tensor] = {}

    def keep(module, args, output):
        output.retain_grad()
        seen["tokens"] = output

    handle = model.blocks[11].norm1.register_forward_hook(keep)
    try:
        out = model(x)
        out[:, 5].sum().backward()
    finally:
        handle.remove()
        model.zero_grad(set_to_none=True)
    tokens, grads = seen["tokens"], seen["tokens"].grad

    def grid(t: Tensor) -> Tensor:
        return t[:, 2:].reshape(2, 4, 4, -1).permute(0, 3, 1, 2)

    weights = grid(grads).mean(dim=(2, 3), keepdim=True)
    expected = (weights * grid(tokens)).sum(dim=1).detach()
    result = heatlens.explain(model, x, "gradcam", target=5)
    assert torch.allclose(result.raw, expected, atol=1e-6 * float(expected.abs().max()))


def test_layout_on_non_square_inputs():
    vit = seeded(lambda: timm.create_model("vit_tiny_patch16_224", img_size=(48, 80),
                                           reg_tokens=2))
    swin = seeded(lambda: torchvision_models.swin_t())
    for model, layer_grid in ((vit, (3, 5)), (swin, (2, 3))):
        x = torch.randn(2, 3, 48, 80) if model is vit else torch.randn(2, 3, 64, 96)
        result = heatlens.explain(model, x, "gradcam", target=0)
        assert result.maps.shape == (2, *x.shape[2:])
        text = result.details["token_layout"][result.layers[0]]
        assert f"{layer_grid[0]} x {layer_grid[1]}" in text


def test_infer_layout_cases(small_models):
    vit = small_models["timm_vit_registers"]
    x = torch.zeros(1, 3, 64, 64)
    assert infer_layout(vit, torch.zeros(1, 21, 192), x).prefix == 5
    assert infer_layout(vit, torch.zeros(1, 500, 192), x) is None  # not this grid
    assert infer_layout(vit, torch.zeros(1, 192, 4, 4), x) is None  # channels first
    assert infer_layout(vit, torch.zeros(1, 4, 4, 192), x).kind == "channels_last"
    cnn = torchvision_models.resnet18()
    assert infer_layout(cnn, torch.zeros(1, 17, 8), x) is None  # no patch embedding
    assert transformer_layer(cnn) is None


# --- 2. attention captured under fused attention -------------------------------------------------


def by_hand_timm(model: nn.Module, x: Tensor) -> list[Tensor]:
    """Each block's attention recomputed from its own q and k."""
    _, inputs = recorded_and_inputs(model, [b.attn for b in model.blocks], x)
    result = []
    for block, tokens in zip(model.blocks, inputs, strict=True):
        attn = block.attn
        b, n, c = tokens.shape
        qkv = attn.qkv(tokens).reshape(b, n, 3, attn.num_heads, c // attn.num_heads)
        q, k = attn.q_norm(qkv[:, :, 0].transpose(1, 2)), attn.k_norm(qkv[:, :, 1].transpose(1, 2))
        result.append(((q @ k.transpose(-2, -1)) * attn.scale).softmax(dim=-1))
    return result


def test_timm_fused_attention_captured(small_models):
    model = small_models["timm_vit_registers"]
    assert all(block.attn.fused_attn for block in model.blocks), "timm should default to fused"
    x = batch(64, 2)
    with torch.no_grad():
        reference_output = model(x)
    with attention_recorded(model) as captured, torch.no_grad():
        output = model(x)
    expected = by_hand_timm(model, x)
    assert len(captured) == 12
    for got, want in zip(captured, expected, strict=True):
        assert got.shape == (2, 3, 21, 21)
        assert torch.allclose(got, want, atol=1e-6)
    assert torch.allclose(output, reference_output, atol=1e-5)  # the eager path, same result
    assert all(block.attn.fused_attn for block in model.blocks)


def recorded_and_inputs(model: nn.Module, modules: list[nn.Module], x: Tensor
                        ) -> tuple[list[Tensor], list[Tensor]]:
    """The attention heatlens records, and the tokens each attention module received."""
    inputs: list[Tensor] = []
    handles = [m.register_forward_pre_hook(lambda mod, args: inputs.append(args[0]))
               for m in modules]
    try:
        with attention_recorded(model) as captured, torch.no_grad():
            model(x)
            if isinstance(modules[0], nn.MultiheadAttention):  # a caller asking for no weights
                assert modules[0](inputs[0], inputs[0], inputs[0], need_weights=False)[1] is None
    finally:
        for handle in handles:
            handle.remove()
    return captured[: len(modules)], inputs[: len(modules)]


def test_torchvision_attention_captured(small_models):
    model = small_models["torchvision_vit_b_16"]
    layers = [layer.self_attention for layer in model.encoder.layers]
    captured, inputs = recorded_and_inputs(model, layers, batch(64, 3))
    for mha, tokens, got in zip(layers, inputs, captured, strict=True):
        heads, dim = mha.num_heads, mha.embed_dim // mha.num_heads
        q, k, _ = F.linear(tokens, mha.in_proj_weight, mha.in_proj_bias).chunk(3, dim=-1)
        q = q.reshape(2, -1, heads, dim).transpose(1, 2)
        k = k.reshape(2, -1, heads, dim).transpose(1, 2)
        want = (q @ k.transpose(-2, -1) / dim**0.5).softmax(dim=-1)
        assert torch.allclose(got, want, atol=1e-6)


def test_hugging_face_attention_captured(small_models):
    model = small_models["hf_vit"]
    implementation = model.config._attn_implementation
    layers = [layer.attention for layer in model.vit.layers]
    captured, inputs = recorded_and_inputs(model, layers, batch(64, 4))
    assert model.config._attn_implementation == implementation
    for attn, tokens, got in zip(layers, inputs, captured, strict=True):
        q = attn.q_proj(tokens).reshape(2, -1, 4, 16).transpose(1, 2)
        k = attn.k_proj(tokens).reshape(2, -1, 4, 16).transpose(1, 2)
        assert torch.allclose(got, (q @ k.transpose(-2, -1) * attn.scaling).softmax(-1),
                              atol=1e-6)


# --- 3. rollout against a reference written out here -------------------------------------------


def reference_rollout(layers: list[np.ndarray], fusion: str, ratio: float, prefix: int
                      ) -> np.ndarray:
    """Per image, in float64 with explicit loops: fuse heads, zero the lowest ``ratio`` of the
    N*N entries outside the prefix columns, add I, halve, normalise rows, multiply."""
    batch_size, _, n, _ = layers[0].shape
    maps = []
    for b in range(batch_size):
        result = np.eye(n)
        for attention in layers:
            fused = {"mean": np.mean, "max": np.max, "min": np.min}[fusion](attention[b], axis=0)
            fused = fused.astype(np.float64).copy()
            candidates = [(fused[i, j], i, j) for i in range(n) for j in range(prefix, n)]
            for _, i, j in sorted(candidates)[: int(n * n * ratio)]:
                fused[i, j] = 0.0
            step = (fused + np.eye(n)) / 2
            step = step / step.sum(axis=1, keepdims=True)
            result = step @ result
        maps.append(result)
    return np.stack(maps)


@pytest.mark.parametrize(("fusion", "ratio", "prefix"), [
    ("mean", 0.0, 1), ("max", 0.5, 1), ("min", 0.9, 2), ("mean", 0.3, 0),
])
def test_rollout_equals_reference(fusion, ratio, prefix):
    generator = torch.Generator().manual_seed(5)
    layers = [torch.rand(3, 4, 11, 11, generator=generator).softmax(dim=-1) for _ in range(4)]
    ours = rollout([discard_lowest(fuse_heads(a, fusion), ratio, prefix) for a in layers])
    expected = reference_rollout([a.numpy() for a in layers], fusion, ratio, prefix)
    assert np.allclose(ours.double().numpy(), expected, atol=1e-6)
    assert torch.allclose(ours.sum(dim=-1), torch.ones(3, 11), atol=1e-5)  # rows stay normalised


def test_discard_never_touches_class_token_column():
    fused = torch.full((1, 5, 5), 0.5)
    fused[0, :, 0] = 1e-6  # attention paid to the class token is the smallest of all
    kept = discard_lowest(fused, 0.8, prefix=1)
    assert torch.equal(kept[0, :, 0], fused[0, :, 0])
    assert int((kept[0, :, 1:] == 0).sum()) == int(25 * 0.8)


@pytest.mark.parametrize("method", ["attention_rollout", "gradient_rollout", "chefer"])
@pytest.mark.parametrize("arch", ["timm_deit_distilled", "torchvision_vit_b_16", "hf_vit"])
def test_attention_methods_run(small_models, method, arch):
    model = small_models[arch]
    x = batch(64, 6)
    fused = [b.attn.fused_attn for b in getattr(model, "blocks", [])]
    result = heatlens.explain(model, x, method, target=[1, 2])
    assert result.maps.shape == (2, 64, 64)
    assert float(result.maps.amax()) == pytest.approx(1.0)
    assert result.raw.shape == (2, 4, 4)
    assert [b.attn.fused_attn for b in getattr(model, "blocks", [])] == fused
    alone = heatlens.explain(model, x[1:], method, target=[2])
    assert torch.allclose(alone.maps[0], result.maps[1], atol=1e-5)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_rollout_on_model_output_matches_reference(small_models):
    model = small_models["timm_deit_distilled"]
    x = batch(64, 7)
    result = heatlens.explain(model, x, "attention_rollout", head_fusion="max",
                              discard_ratio=0.5)
    with torch.no_grad():
        layers = [a.numpy() for a in by_hand_timm(model, x)]
    expected = reference_rollout(layers, "max", 0.5, 2)[:, 0, 2:].reshape(2, 4, 4)
    assert np.allclose(result.raw.double().numpy(), expected, atol=1e-5)


def test_chefer_equals_formula(small_models):
    """R = I; R += mean_h((dA * A)^+) R over layers, with gradients taken by hand through an
    eager copy of the attention."""
    model = small_models["hf_vit"]
    x = batch(64, 8)
    with attention_recorded(model) as attentions:
        out = model(x).logits
    grads = torch.autograd.grad(out[:, 3].sum(), attentions)
    relevance = torch.eye(17).expand(2, 17, 17)
    for a, g in zip(attentions, grads, strict=True):
        relevance = relevance + (a * g).clamp(min=0).mean(dim=1) @ relevance
    expected = relevance[:, 0, 1:].reshape(2, 4, 4).detach()
    result = heatlens.explain(model, x, "chefer", target=3)
    assert torch.allclose(result.raw, expected, atol=1e-6)


def test_attention_methods_errors(small_models):
    cnn = seeded(lambda: torchvision_models.resnet18())
    with pytest.raises(ValueError, match="no self-attention"):
        heatlens.explain(cnn, torch.randn(1, 3, 32, 32), "attention_rollout")
    with pytest.raises(ValueError, match="windowed attention"):
        heatlens.explain(small_models["torchvision_swin_t"], batch(64), "attention_rollout")
    with pytest.raises(ValueError, match="layer= does not apply"):
        heatlens.explain(small_models["hf_vit"], batch(64), "chefer", layer="vit")
    with pytest.raises(ValueError, match="head_fusion"):
        heatlens.explain(small_models["hf_vit"], batch(64), "attention_rollout",
                         head_fusion="median")


# --- 4. the command line -----------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["vit_tiny_patch16_224", "deit_tiny_distilled_patch16_224"])
def test_cli_explains_timm_transformers(tmp_path, arch):
    from click.testing import CliRunner

    from heatlens.cli import main

    out = tmp_path / "vit.png"
    result = CliRunner().invoke(main, ["explain", "--arch", arch, "--method",
                                       "attention_rollout,chefer,gradcam", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "layer blocks.11.norm1" in result.output and "layer attention" in result.output
    assert out.stat().st_size > 10_000


def test_cli_lists_transformer_layers():
    from click.testing import CliRunner

    from heatlens.cli import main

    result = CliRunner().invoke(main, ["layers", "--arch", "vit_tiny_patch16_224"])
    assert result.exit_code == 0, result.output
    assert "blocks.11.norm1" in result.output


def test_threads_sharing_a_transformer(small_models):
    """Overlapping calls on threads get the maps they get one after another, and the fused
    attention setting is restored when the last one leaves."""
    from concurrent.futures import ThreadPoolExecutor

    model = small_models["timm_vit_tiny"]
    inputs = [batch(64, seed) for seed in range(4)]
    methods = ["chefer", "attention_rollout", "gradcam", "gradient_rollout"]
    alone = [heatlens.explain(model, x, m, target=[1, 2]).maps for x, m in zip(inputs, methods,
                                                                               strict=True)]
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(lambda pair: heatlens.explain(model, pair[0], pair[1],
                                                               target=[1, 2]).maps,
                                 zip(inputs * 3, methods * 3, strict=True)))
    for i, maps in enumerate(together):
        assert torch.allclose(maps, alone[i % 4], atol=1e-5)
    assert all(block.attn.fused_attn for block in model.blocks)
