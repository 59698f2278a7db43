"""``heatlens.evaluate``: which of these maps shows what the model used? One call, every metric,
the model-blind controls beside them."""

from __future__ import annotations

import difflib
import importlib.util
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from heatlens.engine.budget import DEFAULT_BUDGET, budget_bytes
from heatlens.engine.entry import OutputKey, entered, model_to_explain
from heatlens.engine.targets import ClassLogit, Target, TargetSpec, as_target
from heatlens.explanation import Explanation
from heatlens.methods.sampling import seeded_generator
from heatlens.metrics import controls as control_maps
from heatlens.metrics import faithfulness
from heatlens.metrics.report import HIGHER_IS_BETTER, Report

METRICS = (*HIGHER_IS_BETTER, "sanity")
"""Every metric :func:`evaluate` computes (``heatlens.metrics.report.HIGHER_IS_BETTER`` says
which way each is better; ``"sanity"`` gives verdicts, not scores)."""

ALIASES = {"drop": "average_drop", "increase_in_confidence": "increase",
           "pointing": "pointing_game", "energy": "energy_inside", "sensitivity":
           "max_sensitivity", "sanity_checks": "sanity", "randomisation": "sanity"}

CONTROLS = ("random", "gaussian", "edges")
"""The model-blind maps scored beside the explanations: uniform noise, a centred Gaussian and
the Sobel edges of the image (:mod:`heatlens.metrics.controls`)."""

_LOCALISATION = ("pointing_game", "energy_inside", "relevance_mass", "relevance_rank")
_NEEDS_METHOD = ("max_sensitivity", "sanity")

Explain = Callable[[nn.Module, Tensor, Tensor], Tensor]
ExplanationsLike = (Explanation | Tensor | Sequence[Explanation]
                    | Mapping[str, Explanation | Tensor])


def metric_names(metrics: str | Sequence[str]) -> list[str]:
    """Canonical names of ``metrics`` (a name, a comma-separated list or a sequence); an unknown
    name is a ``ValueError`` suggesting the close ones."""
    requested = metrics.split(",") if isinstance(metrics, str) else list(metrics)
    names = []
    for name in requested:
        key = name.strip().lower().replace("-", "_")
        key = ALIASES.get(key, key)
        if key not in METRICS:
            close = difflib.get_close_matches(key, [*METRICS, *ALIASES], n=3, cutoff=0.5)
            hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
            raise ValueError(f"unknown metric {name.strip()!r}.{hint} Available: "
                             f"{', '.join(METRICS)}")
        names.append(key)
    if not names:
        raise ValueError("no metric named; pass for example metrics=('deletion', 'insertion')")
    return list(dict.fromkeys(names))


def evaluate(model: nn.Module, inputs: Tensor, explanations: ExplanationsLike,
             metrics: str | Sequence[str] = ("deletion", "insertion", "road"),
             target: TargetSpec = None, boxes: Any = None, masks: Tensor | None = None,
             seed: int = 0, *, protocol: str | faithfulness.Protocol = "heatlens",
             controls: Sequence[str] = CONTROLS, road_fractions: Sequence[float] =
             faithfulness.ROAD_FRACTIONS, road_noise: float = 0.01, tolerance: int = 15,
             labels: Sequence[str] | None = None, output: OutputKey | None = None,
             memory_budget: int = DEFAULT_BUDGET, show_progress: bool | None = None) -> Report:
    """Score explanations of ``model`` on ``inputs`` with ``metrics``, beside model-blind
    controls.

    Args:
        model: the model explained; it is left exactly as it was.
        inputs: the preprocessed batch ``(B, C, *spatial)`` that was explained.
        explanations: an :class:`~heatlens.Explanation`, a list of them (several methods), raw
            maps ``(B, *spatial)``, or a dict from a name to either.
        metrics: names from :data:`METRICS` (``"deletion"``, ``"insertion"``, ``"road"``,
            ``"aopc"``, ``"average_drop"``, ``"increase"``, ``"deletion_lerf"``, the
            localisation metrics with ``boxes`` or ``masks``, ``"infidelity"``,
            ``"max_sensitivity"`` and ``"sanity"``, which re-run an explanation's method).
        target: the class to evaluate for; default: the class the explanations explained
            (where they agree), else the prediction. A class name is looked up in ``labels``.
        boxes, masks: the objects, for the localisation metrics: boxes per image (x1, y1, x2,
            y2 in input pixels) or masks ``(B, *spatial)`` (True on the object).
        seed: seeds the random control, ROAD's noise, the robustness perturbations, the sanity
            checks and the bootstrap; the same seed gives the same report.
        protocol: ``"heatlens"`` (1 % of the pixels a step, deletion to 0, insertion from a
            blur), ``"rise"`` (the RISE paper's settings) or a
            :class:`~heatlens.metrics.faithfulness.Protocol`.
        controls: which of :data:`CONTROLS` to score (``()`` for none).
        road_fractions, road_noise: ROAD's removal fractions and imputation noise.
        tolerance: the pointing game's tolerance in pixels (Zhang et al.'s 15).
        memory_budget: bytes one chunk of perturbed inputs may use.

    Returns:
        A :class:`~heatlens.metrics.report.Report`.
    """
    names = metric_names(metrics)
    chosen_protocol = _protocol(protocol)
    unknown = [c for c in controls if c not in CONTROLS]
    if unknown:
        raise ValueError(f"unknown control {unknown[0]!r}; choose from {', '.join(CONTROLS)}")
    if any(n in _LOCALISATION for n in names) and boxes is None and masks is None:
        raise ValueError(f"{', '.join(n for n in names if n in _LOCALISATION)} need the "
                         "objects: pass boxes= (x1, y1, x2, y2 per image) or masks=")
    if "sanity" in names:
        needs_extra("torchmetrics", "the sanity checks' SSIM")
    run = {"memory_budget": budget_bytes(memory_budget), "show_progress": show_progress}
    model = model_to_explain(model)
    with entered(model, inputs, output=output) as x:
        sources, explainers, explained = _sources(explanations, x)
        goal = as_target(target, labels)
        classes = _classes(model, x, goal, target, explained)
        goal = ClassLogit(classes) if isinstance(goal, ClassLogit) else goal
        control_names = list(controls)
        everything = {**sources, **_controls(x, control_names, seed)}
        stacked = torch.stack(list(everything.values()))
        objects = None if boxes is None and masks is None else _objects(boxes, masks, x)
        scores, curves = _faithfulness(model, x, stacked, list(everything), classes, goal,
                                       names, chosen_protocol, road_fractions, road_noise,
                                       seed, run)
        if objects is not None:
            scores.update(_localisation(stacked, list(everything), objects, names, tolerance))
        notes: list[str] = []
        if "infidelity" in names:
            scores["infidelity"] = _infidelity(model, x, stacked, list(everything), classes,
                                               seed, run)
        sanity: dict[str, list[Any]] = {}
        if any(n in _NEEDS_METHOD for n in names):
            sensitivity, sanity, skipped = _reruns(model, x, classes, explainers, control_names,
                                                   names, seed)
            if sensitivity:
                scores["max_sensitivity"] = sensitivity
            notes += skipped
    ordered = {metric: scores[metric] for metric in names if metric in scores}
    return Report(ordered, curves, list(sources), control_names, classes.detach().cpu(),
                  sanity, chosen_protocol.description, notes, seed)


def needs_extra(module: str, what: str, extra: str = "metrics") -> None:
    """A one-line error, before the work, when an optional library of heatlens' ``extra`` is
    missing."""
    if importlib.util.find_spec(module) is None:
        raise ImportError(f"{what} needs {module}: pip install 'heatlens[{extra}]'")


def _protocol(protocol: str | faithfulness.Protocol) -> faithfulness.Protocol:
    if isinstance(protocol, faithfulness.Protocol):
        return protocol
    if protocol == "rise":
        return faithfulness.RISE_PROTOCOL
    if protocol == "heatlens":
        return faithfulness.heatlens_protocol()
    raise ValueError(f"protocol must be 'heatlens', 'rise' or a Protocol, not {protocol!r}")


def _sources(explanations: ExplanationsLike, x: Tensor
             ) -> tuple[dict[str, Tensor], dict[str, Explain | None], set[tuple[int, ...]]]:
    """The maps to evaluate by name, ``(B, *spatial)`` float32 on the inputs' device, checked;
    for each how to explain again (``None`` for raw maps); and the classes the explanations
    explained."""
    if isinstance(explanations, Explanation | Tensor):
        items: list[tuple[str, Explanation | Tensor]] = [
            (_name(explanations, "maps"), explanations)]
    elif isinstance(explanations, Mapping):
        items = [(str(k), v) for k, v in explanations.items()]
    elif isinstance(explanations, Sequence) and explanations:
        items = [(_name(e, f"maps {i}"), e) for i, e in enumerate(explanations)]
    else:
        raise TypeError("explanations must be an Explanation, a list of them, maps "
                        f"(B, *spatial) or a dict of these, not {type(explanations).__name__}")
    maps: dict[str, Tensor] = {}
    explainers: dict[str, Explain | None] = {}
    explained = {tuple(item.targets.tolist()) for _, item in items
                 if isinstance(item, Explanation)}
    for name, item in items:
        unique = name
        while unique in maps or unique in CONTROLS:
            unique = f"{unique}'"
        values = item.maps if isinstance(item, Explanation) else item
        if not isinstance(values, Tensor):
            raise TypeError(f"{unique}: maps must be a tensor (B, *spatial), not "
                            f"{type(values).__name__}")
        maps[unique] = _checked(values, x, unique)
        explainers[unique] = _again(item) if isinstance(item, Explanation) else None
    return maps, explainers, explained


def _name(item: Any, default: str) -> str:
    return item.method if isinstance(item, Explanation) else default


def _checked(values: Tensor, x: Tensor, name: str) -> Tensor:
    expected = (x.shape[0], *x.shape[2:])
    if tuple(values.shape) != expected:
        raise ValueError(f"the maps of {name!r} have shape {tuple(values.shape)}, but the inputs "
                         f"{tuple(x.shape)} need {expected}: one map per image at the input's "
                         "size (Explanation.maps is)")
    bad = (~torch.isfinite(values)).flatten(1).any(dim=1).nonzero().flatten().tolist()
    if bad:
        raise ValueError(f"the map of image {bad[0]} of {name!r} holds NaN or infinite values")
    values = values.detach().to(x.device, torch.float32)
    low = values.flatten(1).amin(1).reshape(-1, *[1] * (values.ndim - 1))
    high = values.flatten(1).amax(1).reshape(-1, *[1] * (values.ndim - 1))
    if bool((low < 0).any()) or bool((high > 1).any()):  # raw maps: scaled to [0, 1]
        values = (values - low) / (high - low).clamp_min(1e-12)
    return values


def _again(explanation: Explanation) -> Explain | None:
    """How to compute ``explanation`` again on another model or input (its method and layers,
    the method's default options); ``None`` for a noise tunnel's combined name."""
    from heatlens.api import explain
    from heatlens.methods.registry import canonical_name

    try:
        method = canonical_name(explanation.method)
    except ValueError:
        return None
    layers = list(explanation.layers)
    layer = "auto" if {"input", "attention"} & set(layers) else layers

    def again(model: nn.Module, inputs: Tensor, classes: Tensor) -> Tensor:
        return explain(model, inputs, method, target=classes, layer=layer).maps

    return again


def _classes(model: nn.Module, x: Tensor, goal: Target, target: TargetSpec,
             explained: set[tuple[int, ...]]) -> Tensor:
    """The class per image: the target's; without one, the class the explanations explained
    where they all explained the same; else the prediction."""
    if target is None and isinstance(goal, ClassLogit) and len(explained) == 1:
        (classes,) = explained
        if -1 not in classes:
            return torch.tensor(classes, device=x.device)
    with torch.inference_mode():
        output = model(x)
    return goal.classes(output, x.shape[0]).to(x.device)


def _controls(x: Tensor, names: Sequence[str], seed: int) -> dict[str, Tensor]:
    batch, size = x.shape[0], tuple(x.shape[2:])
    made = {
        "random": lambda: control_maps.random_map(batch, size,
                                                  seeded_generator(seed, 0, x.device)),
        "gaussian": lambda: control_maps.centred_gaussian(batch, size),
        "edges": lambda: control_maps.edge_map(x),
    }
    return {name: _checked(made[name]().to(x.device), x, name) for name in names}


def _faithfulness(model: nn.Module, x: Tensor, maps: Tensor, names: list[str], classes: Tensor,
                  goal: Target, metrics: list[str], protocol: faithfulness.Protocol,
                  fractions: Sequence[float], noise: float, seed: int, run: dict[str, Any]
                  ) -> tuple[dict[str, dict[str, Tensor]], dict[str, dict[str, tuple]]]:
    scores: dict[str, Tensor] = {}
    curves: dict[str, faithfulness.Curve] = {}
    if {"deletion", "aopc"} & set(metrics):
        curves["deletion"] = faithfulness.step_curve(model, x, maps, classes, goal,
                                                     mode="deletion", protocol=protocol, **run)
        scores["deletion"] = curves["deletion"].auc()
        scores["aopc"] = faithfulness.aopc(curves["deletion"])
    if "deletion_lerf" in metrics:
        curves["deletion_lerf"] = faithfulness.step_curve(
            model, x, maps, classes, goal, mode="deletion", protocol=protocol, order="lerf",
            **run)
        scores["deletion_lerf"] = curves["deletion_lerf"].auc()
    if "insertion" in metrics:
        curves["insertion"] = faithfulness.step_curve(model, x, maps, classes, goal,
                                                      mode="insertion", protocol=protocol,
                                                      **run)
        scores["insertion"] = curves["insertion"].auc()
    if "road" in metrics:
        morf, lerf = faithfulness.road_curves(model, x, maps, classes, goal,
                                              fractions=fractions, noise=noise, seed=seed,
                                              **run)
        curves["road_morf"], curves["road_lerf"] = morf, lerf
        scores["road"] = faithfulness.road(morf, lerf)
    if {"average_drop", "increase"} & set(metrics):
        scores["average_drop"], scores["increase"] = faithfulness.confidence_change(
            model, x, maps, classes, goal, **run)
    by_source = {metric: dict(zip(names, values, strict=True))
                 for metric, values in scores.items()}
    curves_by_source = {name: {source: (curve.x, y) for source, y in zip(names, curve.y,
                                                                          strict=True)}
                        for name, curve in curves.items()}
    return by_source, curves_by_source


def _objects(boxes: Any, masks: Tensor | None, x: Tensor) -> Tensor:
    from heatlens.metrics.localisation import boxes_to_masks

    if masks is not None:
        if not isinstance(masks, Tensor):
            masks = torch.as_tensor(masks)
        expected = (x.shape[0], *x.shape[2:])
        if tuple(masks.shape) != expected:
            raise ValueError(f"masks have shape {tuple(masks.shape)}; the inputs "
                             f"{tuple(x.shape)} need {expected}")
        return masks.to(x.device).bool()
    return boxes_to_masks(boxes, tuple(x.shape[2:])).to(x.device)


def _localisation(maps: Tensor, names: list[str], objects: Tensor, metrics: list[str],
                  tolerance: int) -> dict[str, dict[str, Tensor]]:
    from heatlens.metrics import localisation

    functions = {
        "pointing_game": lambda m: localisation.pointing_game(m, objects, tolerance=tolerance),
        "energy_inside": lambda m: localisation.energy_inside(m, objects),
        "relevance_mass": lambda m: localisation.relevance_mass(m, objects),
        "relevance_rank": lambda m: localisation.relevance_rank(m, objects),
    }
    return {metric: {name: functions[metric](m) for name, m in zip(names, maps, strict=True)}
            for metric in metrics if metric in functions}


def _infidelity(model: nn.Module, x: Tensor, maps: Tensor, names: list[str], classes: Tensor,
                seed: int, run: dict[str, Any]) -> dict[str, Tensor]:
    from heatlens.metrics.robustness import infidelity

    return {name: infidelity(model, x, m, target=classes, seed=seed,
                             memory_budget=run["memory_budget"])
            for name, m in zip(names, maps, strict=True)}


def _reruns(model: nn.Module, x: Tensor, classes: Tensor, explainers: dict[str, Explain | None],
            controls: list[str], metrics: list[str], seed: int
            ) -> tuple[dict[str, Tensor], dict[str, list[Any]], list[str]]:
    """Max-sensitivity and the sanity checks: they explain again, on perturbed inputs or on
    randomised copies of the model, so they need each explanation's method."""
    from heatlens.metrics import robustness, sanity

    runnable: dict[str, Explain] = {name: e for name, e in explainers.items() if e is not None}
    if "edges" in controls:  # the model-blind control: the checks must catch it
        runnable["edges"] = lambda model, inputs, classes: control_maps.edge_map(inputs)
    skipped = [f"{', '.join(n for n in metrics if n in _NEEDS_METHOD)} left out for "
               f"{name!r}: raw maps carry no method to run again"
               for name, e in explainers.items() if e is None]
    sensitivity: dict[str, Tensor] = {}
    verdicts: dict[str, list[Any]] = {}
    for name, again in runnable.items():
        if "max_sensitivity" in metrics:
            sensitivity[name] = robustness.max_sensitivity(
                lambda inputs, again=again: again(model, inputs, classes), x, seed=seed)
        if "sanity" in metrics:
            verdicts[name] = [sanity.cascading_randomisation(model, x, again, classes,
                                                             seed=seed),
                              sanity.random_logit(model, x, again, classes, seed=seed)]
    return sensitivity, verdicts, skipped
