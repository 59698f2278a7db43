"""Resolve the layer(s) to explain: a dotted name, a module, a list of these, or ``"auto"``.

``"auto"`` runs one probe pass on the first image and picks the last block whose output is a
spatial feature map ``(B, C, *spatial)`` that the model's output depends on: the last module
that computes features (a block or a convolution; normalisation, activation, dropout, pooling,
padding and identity modules do not count as blocks), taken after the normalisation and
activation modules that the model applies to it next (EfficientNet-Lite's ``_conv_head`` is
followed by ``_bn1`` and the ReLU6 ``_swish``: the map is taken at ``_swish``, where the features
are what the classifier reads). A module whose input is the model's own input (a trunk such as
MobileNetV2's ``features``) is descended into, since explaining at it would be explaining at the
whole network. Chosen this way: torchvision ResNet ``layer4``, MobileNetV2 ``features.18``,
VGG-11 ``features.19``, EfficientNet-Lite0 ``_swish`` (after ``_conv_head``), DenseNet
``features.norm5``, whose output ``DenseNet.forward`` passes through ``F.relu``: the probe records
such functional activations (:mod:`heatlens.engine.activations`), ``Candidate.followed_by`` names
them, and capture explains their result.

Two families are recognised before probing: torchvision's segmentation models and detectors
explain in their backbone (:func:`~heatlens.engine.backbones.backbone_stage`), and transformers at
the first normalisation of their last block (:func:`~heatlens.engine.tokens.transformer_layer`),
whose tokens are laid out on the patch grid by :func:`~heatlens.engine.tokens.infer_layout`.
"""

from __future__ import annotations

import difflib
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from math import prod
from typing import Any

import torch
from torch import Tensor, nn

from heatlens.engine.activations import FirstReads
from heatlens.engine.backbones import backbone_stage
from heatlens.engine.entry import buffers_kept
from heatlens.engine.hooks import forward_hooks
from heatlens.engine.targets import primary_output
from heatlens.engine.tokens import infer_layout, is_feature_map, transformer_layer

LayerSpec = str | nn.Module | Sequence[str | nn.Module]

_PASSED_OVER = (
    "torch.nn.modules.activation",
    "torch.nn.modules.batchnorm",
    "torch.nn.modules.normalization",
    "torch.nn.modules.instancenorm",
    "torch.nn.modules.dropout",
    "torch.nn.modules.pooling",
    "torch.nn.modules.padding",
    "torch.nn.modules.linear",
    "torch.nn.modules.flatten",
)

_FOLLOWERS = _PASSED_OVER[:4]  # activation and normalisation modules


@dataclass(frozen=True)
class LayerChoice:
    """Resolved layers in the order given, and why they were chosen."""

    names: tuple[str, ...]
    modules: tuple[nn.Module, ...]
    reason: str

    def as_dict(self) -> dict[str, nn.Module]:
        return dict(zip(self.names, self.modules, strict=True))


@dataclass(frozen=True)
class Candidate:
    """A module that produced a spatial feature map in the probe pass."""

    name: str
    module_type: str
    shape: tuple[int, ...]
    output_depends: bool
    followed_by: str = ""
    """The functional activation applied to the output before anything else reads it (``"a
    functional ReLU in DenseNet.forward"``): methods explain its result."""


def _name_of(model: nn.Module, module: nn.Module) -> str:
    for name, sub in model.named_modules():
        if sub is module:
            return name
    raise ValueError(
        f"the given {type(module).__name__} is not a submodule of the model; "
        "pass a module of this model or its dotted name as in model.named_modules()"
    )


def module_by_name(model: nn.Module, name: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        names = [n for n, _ in model.named_modules() if n]
        close = difflib.get_close_matches(name, names, n=5, cutoff=0.5)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise ValueError(
            f"the model has no layer named {name!r}.{hint} "
            "List the names with `heatlens layers` or heatlens.candidate_layers(model, inputs)."
        ) from None


def _is_spatial(output: Any, inputs: Tensor) -> bool:
    return (isinstance(output, Tensor) and is_feature_map(output, inputs)
            and prod(output.shape[2:]) > 1)


def _passed_over(module: nn.Module) -> bool:
    return type(module).__module__.startswith(_PASSED_OVER) or isinstance(module, nn.Identity)


@dataclass(frozen=True)
class _Probe:
    candidates: list[Candidate]
    """The modules with spatial outputs, in the order they finished."""
    takes_input: list[bool]
    """For each candidate, whether its input was the model's input tensor itself."""
    classes: int | None
    """``K`` of a ``(B, K)`` score output, else ``None``."""


def _probe(model: nn.Module, sample: Tensor) -> _Probe:
    """Run the model once on ``sample`` and list the modules with spatial outputs."""
    finished: list[tuple[str, nn.Module, Tensor, bool]] = []
    followers: dict[int, str] = {}  # id of an output -> the functional activation after it
    reads = FirstReads()
    with torch.inference_mode(False):
        x = sample.detach().clone().requires_grad_(True)

    def note(how: str, run: Callable[[], Any], watched: Tensor) -> Any:
        followers[id(watched)] = how
        return run()

    def make_hook(name: str):
        def hook(module: nn.Module, args: Any, output: Any) -> Tensor | None:
            with reads.quiet():
                if _is_spatial(output, x) or (
                        isinstance(output, Tensor) and infer_layout(model, output, x) is not None):
                    watched = reads.watch(output, note)
                    finished.append((name, module, watched, bool(args) and args[0] is x))
                    return watched
                return None

        return hook

    hooks = [(m, make_hook(n)) for n, m in model.named_modules() if n]
    with buffers_kept(model), torch.inference_mode(False), torch.enable_grad():
        with forward_hooks(hooks), reads:
            output = model(x)
        total = _output_total(output)
        acts = [act for _, _, act, _ in finished]
        tracked = [i for i, act in enumerate(acts) if act.requires_grad]
        depends = [False] * len(acts)
        if tracked and total.requires_grad:
            grads = torch.autograd.grad(total, [acts[i] for i in tracked], allow_unused=True)
            for i, grad in zip(tracked, grads, strict=True):
                depends[i] = grad is not None
    candidates = [
        Candidate(n, type(m).__name__, tuple(a.shape[1:]), d, followers.get(id(a), ""))
        for (n, m, a, _), d in zip(finished, depends, strict=True)
    ]
    try:
        scores = primary_output(output)
    except (TypeError, ValueError):
        scores = None
    classes = scores.shape[1] if scores is not None and scores.ndim == 2 else None
    return _Probe(candidates, [t for *_, t in finished], classes)


def _output_total(output: Any) -> Tensor:
    """The sum of every floating-point tensor in a model output (a tensor, or dicts, lists and
    tuples of them, such as a detector's boxes and scores): what "the output depends on a
    layer" is measured against."""
    if isinstance(output, Tensor):
        return output.float().sum() if output.is_floating_point() else output.new_zeros(())
    if hasattr(output, "logits") and isinstance(output.logits, Tensor):  # Hugging Face outputs
        return output.logits.float().sum()
    parts = output.values() if isinstance(output, Mapping) else (
        output if isinstance(output, list | tuple) else ())
    totals = [_output_total(part) for part in parts]
    return torch.stack(totals).sum() if totals else torch.zeros(())


def candidate_layers(model: nn.Module, inputs: Tensor) -> list[Candidate]:
    """Modules with a spatial output ``(B, C, *spatial)`` on ``inputs``, in the order they
    finished. A module called several times is listed once, at its last call, which is the call
    that explaining at it uses."""
    candidates = _probe(model, inputs[:1]).candidates
    last = {c.name: c for c in candidates}
    return [c for c in candidates if last[c.name] is c]


def auto_layer(model: nn.Module, inputs: Tensor) -> tuple[str, str]:
    """Choose the layer to explain (see the module docstring); returns (name, reason)."""
    known = backbone_stage(model, inputs)
    if known is not None:
        return known
    tokens = transformer_layer(model)
    probe = _probe(model, inputs[:1])
    candidates, takes_input = probe.candidates, probe.takes_input
    if tokens is not None and any(c.name == tokens[0] for c in candidates):
        return tokens  # its output holds the patch grid (windowed attention's does not)
    modules = dict(model.named_modules())
    classifier = [c.name for c in candidates
                  if _classifier_convolution(modules[c.name], probe.classes)]
    usable = [
        i
        for i, c in enumerate(candidates)
        if c.output_depends and not _passed_over(modules[c.name]) and c.name not in classifier
    ]
    if not usable:
        raise ValueError(
            "found no layer with a spatial output (B, C, *spatial) that the prediction depends on; "
            "pass layer= with a module name (list them with `heatlens layers`)"
        )
    chosen = usable[-1]
    note = ""
    while takes_input[chosen]:
        prefix = candidates[chosen].name + "."
        inner = [i for i in usable if candidates[i].name.startswith(prefix)]
        if not inner:
            break
        spans = candidates[chosen].name
        note = f"; chosen inside '{spans}', which spans the network from its input"
        chosen = inner[-1]
    if classifier:
        note += (f"; '{classifier[-1]}' (a 1 x 1 convolution to the {probe.classes} classes) is "
                 "the classifier, not explained")
    block = candidates[chosen]
    trailing = _followers(candidates, chosen, modules)
    if trailing:  # the normalisation and activation applied to the block's output
        last = candidates[trailing[-1]]
        return last.name, (
            f"'{last.name}' ({last.module_type}, output {last.shape}) is the output of "
            f"'{block.name}' ({block.module_type}) after the normalisation and activation that "
            f"follow it; '{block.name}' is the last block with a spatial feature map that the "
            f"output depends on{note}"
        )
    return block.name, (
        f"'{block.name}' ({block.module_type}, output {block.shape}) is the last module with a "
        f"spatial feature map that the output depends on{note}"
    )


def _followers(candidates: list[Candidate], chosen: int, modules: dict[str, nn.Module]
               ) -> list[int]:
    """The normalisation and activation modules that run on the chosen block's output right
    after it (skipping the containers that finish around it), in order."""
    block = candidates[chosen]
    found = []
    for i in range(chosen + 1, len(candidates)):
        candidate = candidates[i]
        if block.name.startswith(candidate.name + "."):
            continue
        if not (candidate.output_depends and candidate.shape == block.shape
                and type(modules[candidate.name]).__module__.startswith(_FOLLOWERS)):
            break
        found.append(i)
    return found


def _classifier_convolution(module: nn.Module, classes: int | None) -> bool:
    """A 1 x 1 convolution to the model's ``K`` classes: a classifier that scores every position
    (SqueezeNet's ``classifier.1``), the role of a linear head, not a feature layer."""
    return (classes is not None and classes > 1 and isinstance(module, nn.modules.conv._ConvNd)
            and module.out_channels == classes and all(k == 1 for k in module.kernel_size))


_AUTO_CACHE: weakref.WeakKeyDictionary[nn.Module, dict[tuple, tuple[str, str]]] = (
    weakref.WeakKeyDictionary()
)


def resolve_layers(model: nn.Module, layer: LayerSpec | None, inputs: Tensor) -> LayerChoice:
    """Turn a layer specification into names and modules, resolving ``"auto"`` once per shape."""
    if layer is None or (isinstance(layer, str) and layer == "auto"):
        key = (tuple(inputs.shape[1:]), inputs.dtype, inputs.device.type)
        per_model = _AUTO_CACHE.setdefault(model, {})
        if key not in per_model:
            per_model[key] = auto_layer(model, inputs)
        name, reason = per_model[key]
        if name not in dict(model.named_modules()):  # the model changed since the probe
            name, reason = per_model[key] = auto_layer(model, inputs)
        return LayerChoice((name,), (model.get_submodule(name),), f"auto: {reason}")
    if isinstance(layer, str | nn.Module):
        specs = [layer]
    elif isinstance(layer, Sequence):
        specs = list(layer)
    else:
        raise TypeError(
            f"layer must be 'auto', a module name, an nn.Module or a list of these, not "
            f"{type(layer).__name__} ({layer!r}); list the names with `heatlens layers`"
        )
    if not specs:
        raise ValueError("layer= is an empty list; pass at least one layer or 'auto'")
    names, modules = [], []
    for spec in specs:
        if isinstance(spec, nn.Module):
            names.append(_name_of(model, spec))
            modules.append(spec)
        elif isinstance(spec, str):
            modules.append(module_by_name(model, spec))
            names.append(spec)
        else:
            raise TypeError(
                f"layer must be 'auto', a module name, an nn.Module or a list of these, "
                f"not {type(spec).__name__}"
            )
    if len(set(names)) != len(names):
        raise ValueError(f"layer= names a layer twice: {names}")
    return LayerChoice(tuple(names), tuple(modules), "given by the caller")
