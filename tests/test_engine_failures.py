"""The model comes back as it went in also when a call fails (docs/design.md, promises 1, 2 and
11): a forward pass that raises (the first pass of the call, or the last one), and a target
callable that raises, on a model in eval mode and on one in training mode with batch norm.

Afterwards every module's hook dicts (``_forward_hooks``, ``_forward_pre_hooks``,
``_backward_hooks`` and every other ``*hooks*`` dict) and torch's global module hooks hold exactly
what they held before, and every buffer (batch-norm running statistics, the batch counter),
parameter value, ``.grad``, ``requires_grad`` flag and ``training`` flag is as it was. These kill
a hook removal or a buffer restore that only happens when the call succeeds.
"""

from __future__ import annotations

import copy
from contextlib import nullcontext

import pytest
import torch
from threads import one_intraop_thread
from torch import Tensor, nn
from torch.nn.modules import module as torch_module

import heatlens

GLOBAL_HOOKS = ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
                "_global_backward_pre_hooks", "_global_forward_hooks_always_called")


def hook_dicts(module: nn.Module) -> dict[str, list]:
    """Every hook dict of the module (``_forward_hooks``, ``_backward_hooks``, ...), as lists."""
    return {name: list(value.items()) for name, value in vars(module).items()
            if "hooks" in name and isinstance(value, dict)}


def full_state(model: nn.Module) -> dict:
    """What an explainer could change: hooks, buffers, parameters, grads, flags."""
    return {
        "hooks": {n: hook_dicts(m) for n, m in model.named_modules()},
        "global_hooks": {g: list(getattr(torch_module, g, {}).items()) for g in GLOBAL_HOOKS},
        "training": {n: m.training for n, m in model.named_modules()},
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "grad": {n: None if p.grad is None else p.grad.clone()
                 for n, p in model.named_parameters()},
        "parameters": {n: p.detach().clone() for n, p in model.named_parameters()},
        "buffers": {n: b.clone() for n, b in model.named_buffers()},
        "fused_attn": [getattr(m, "fused_attn", None) for m in model.modules()],
    }


def assert_same(before: dict, after: dict) -> None:
    assert after["hooks"] == before["hooks"], "a hook was left on (or taken off) a module"
    assert after["global_hooks"] == before["global_hooks"]
    assert after["training"] == before["training"]
    assert after["requires_grad"] == before["requires_grad"]
    assert after["fused_attn"] == before["fused_attn"]
    for kind in ("parameters", "buffers"):
        assert after[kind].keys() == before[kind].keys()
        for name, value in before[kind].items():
            assert torch.equal(after[kind][name], value), f"{kind[:-1]} {name} changed"
    for name, grad in before["grad"].items():
        if grad is None:
            assert after["grad"][name] is None, name
        else:
            assert torch.equal(after["grad"][name], grad), name
    assert torch._C._len_torch_function_stack() == 0  # no torch function mode left active


class Fails(Exception):
    """Raised by the models below, so that no other error can pass for it."""


class BatchNormNet(nn.Module):
    """conv -> batch norm -> ReLU -> conv -> batch norm -> ReLU -> mean -> linear. The forward
    pass number ``fail_on`` (counted from 1 since ``calls`` was last reset) raises :class:`Fails`
    after both batch norms ran (in training mode their statistics have moved by then)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(6)
        self.conv2 = nn.Conv2d(6, 8, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 4)
        self.calls = 0
        self.fail_on: int | None = None

    def forward(self, x: Tensor) -> Tensor:
        self.calls += 1
        h = torch.relu(self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))
        if self.calls == self.fail_on:
            raise Fails(f"forward pass {self.calls} fails")
        return self.fc(h.mean(dim=(2, 3)))


def lived_in(model: nn.Module, x: Tensor, training: bool) -> nn.Module:
    """The model as a user leaves it: a .grad filled, a frozen layer, hooks of their own, and
    batch-norm statistics that are not the defaults."""
    model = copy.deepcopy(model)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(x + torch.randn(x.shape, generator=torch.Generator().manual_seed(9)))
    model(x).sum().backward()
    model.conv1.requires_grad_(False)
    model.conv2.register_forward_hook(lambda module, args, output: None)
    model.bn1.register_forward_pre_hook(lambda module, args: None)
    model.fc.register_full_backward_hook(lambda module, grad_in, grad_out: None)
    return model.train(training)


def training_warning(model: nn.Module):
    """heatlens warns when a module is in training mode (and only then)."""
    if any(m.training for m in model.modules()):
        return pytest.warns(UserWarning, match="training mode")
    return nullcontext()


# method -> options (small, so each call is quick); the CAM methods explain layer "bn2"
METHODS = {
    "gradcam": {"layer": "bn2"},
    "layercam": {"layer": ["bn1", "bn2"]},
    "scorecam": {"layer": "bn2"},
    "ablationcam": {"layer": "bn2"},
    "eigencam": {"layer": "bn2"},
    "fullgrad": {},
    "saliency": {},
    "guided_backprop": {},
    "integrated_gradients": {"steps": 3},
    "occlusion": {"window": 4, "stride": 4},
    "rise": {"masks": 6, "cells": 2},
}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Many tiny calls: one intra-op thread is faster on a shared machine; restored after."""
    with one_intraop_thread():
        yield


@pytest.fixture(scope="module")
def net_and_x() -> tuple[BatchNormNet, Tensor]:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = BatchNormNet()
    return model.eval(), torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))


_PASSES: dict[tuple[str, bool], int] = {}


def passes_of(model: BatchNormNet, x: Tensor, method: str) -> int:
    """How many forward passes a successful call makes (counted once, on a copy)."""
    key = (method, model.training)
    if key not in _PASSES:
        _PASSES[key] = _count_passes(model, x, method)
    return _PASSES[key]


def _count_passes(model: BatchNormNet, x: Tensor, method: str) -> int:
    counted = copy.deepcopy(model)
    counted.calls, counted.fail_on = 0, None
    with training_warning(counted):
        heatlens.explain(counted, x, method, target=[1, 2], **METHODS[method])
    return counted.calls


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("failure", ["first_pass", "last_pass", "target"])
@pytest.mark.parametrize("method", list(METHODS))
def test_failed_call_leaves_the_model_as_it_was(net_and_x, method, failure, training):
    """A call that raises leaves no hook on any module and restores every buffer (batch-norm
    statistics moved by a training-mode forward pass before the failure), parameter, .grad and
    flag. Kills hook removal, or the buffer restore, done only when the call succeeds."""
    model, x = net_and_x
    model = lived_in(model, x, training)
    last = passes_of(model, x, method)
    model.calls = 0
    if failure == "target":
        def target(output: Tensor) -> Tensor:
            raise Fails("the target callable fails")
    else:
        target = [1, 2]
        model.fail_on = 1 if failure == "first_pass" else last
    before = full_state(model)
    with pytest.raises(Fails), training_warning(model):
        heatlens.explain(model, x, method, target=target, **METHODS[method])
    assert model.calls >= 1
    model.calls, model.fail_on = 0, None
    assert_same(before, full_state(model))


def test_training_mode_forward_moves_the_statistics_the_test_checks(net_and_x):
    """The premise of the training-mode cases: one forward pass in training mode changes the
    batch-norm buffers, so a restore that is skipped shows up as a changed buffer."""
    model, x = net_and_x
    model = lived_in(model, x, training=True)
    before = {n: b.clone() for n, b in model.named_buffers()}
    with torch.no_grad():
        model(x)
    changed = [n for n, b in model.named_buffers() if not torch.equal(b, before[n])]
    assert {"bn1.running_mean", "bn2.running_var", "bn1.num_batches_tracked"} <= set(changed)


class RaisingHead(nn.Module):
    """A head that raises on demand: the failure comes after every attention layer ran."""

    def __init__(self, head: nn.Module) -> None:
        super().__init__()
        self.head = head
        self.fail = False

    def forward(self, x: Tensor) -> Tensor:
        if self.fail:
            raise Fails("the head fails")
        return self.head(x)


@pytest.mark.parametrize("method", ["attention_rollout", "gradient_rollout", "chefer", "gradcam"])
def test_failed_call_on_a_transformer_leaves_hooks_and_fused_attention(method):
    """On a timm ViT (fused attention), a forward pass that raises after the attention layers
    leaves no hook on any module and every ``fused_attn`` flag back as it was."""
    from timm.models.vision_transformer import VisionTransformer

    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = VisionTransformer(img_size=16, patch_size=4, num_classes=5, embed_dim=16,
                                  depth=2, num_heads=2, mlp_ratio=2.0)
    model.head = RaisingHead(model.head)
    model.eval()
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    heatlens.explain(model, x, method, target=[0, 1])  # works, and settles "auto" layer choice
    model.head.fail = True
    before = full_state(model)
    assert all(before["fused_attn"][i] for i, m in enumerate(model.modules())
               if hasattr(m, "fused_attn"))
    with pytest.raises(Fails):
        heatlens.explain(model, x, method, target=[0, 1])
    assert_same(before, full_state(model))
