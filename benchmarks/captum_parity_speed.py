"""Speed of the Captum-parity methods (issue 15) against Captum 0.9, side by side.

One process, CPU; heatlens and Captum each on their own deep copy of one seeded model in eval
mode. Every case first checks that both give the same attribution (the largest difference,
relative to the attribution's largest magnitude, is printed), then times both, alternating
(best and median of ``--repeats`` runs each), and prints ``captum / heatlens`` of the best
times and of the medians (above 1: heatlens is faster; where both do the same work, the two
differ by the machine's noise, a few percent either way). LayerGradientXActivation is also
written by hand (a forward hook and one ``torch.autograd.grad``: the least work there is), timed
in the same rounds, whose ``floor / heatlens`` says how close both come to it.

``--memory`` instead runs each case's two calls once, each in a fresh subprocess, and prints the
peak resident memory each adds (``getrusage``'s peak after the call minus the resident memory
just before it, once the model and inputs are ready) and how many passes of the model heatlens
made, beside heatlens's memory budget: the check that its chunks stay within it.

Models: DeepLIFT and DeepLIFT-SHAP on a CNN whose nonlinear modules are never adjacent (where
they are, Captum's hooks lose summation-to-delta, see ``tests/test_parity_captum.py``);
GradientSHAP, the layer methods, KernelSHAP and LIME on torchvision ``resnet18`` (seeded random
weights); LRP on torchvision ``vgg11`` (seeded random weights). Captum's LIME and
KernelSHAP evaluate ``perturbations_per_eval=64`` samples per pass (its default of 1 is far
slower); the draws are the same (``draws="captum"``).

Run from the repository root::

    python benchmarks/captum_parity_speed.py [--repeats 3] [--only deeplift,lrp] [--budget 2048]
    python benchmarks/captum_parity_speed.py --memory [--only gradient_shap]
    python benchmarks/captum_parity_speed.py --threads 1   # on a machine loaded by other work

``--budget`` (MiB) sets heatlens's ``memory_budget`` (default: its own, 256 MiB); Captum runs
each of its batches whole (all steps or samples at once), whatever memory that takes.

Both sides compute the same outputs: heatlens returns the completeness delta
(``details["convergence_delta"]``) with every GradientSHAP and layer path attribution, so Captum
is asked for it too (``return_convergence_delta=True``, which costs it a forward pass over the
inputs and baselines). ``--no-delta`` times both without it: Captum's default, and heatlens's
GradientSHAP with ``delta=False`` (no forward pass over the references; the layer path methods
keep theirs, a pass over the images and one baseline).
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import subprocess
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torchvision
from perturbation_speed import best_and_median  # this folder is on the path when run
from torch import Tensor, nn

import heatlens

warnings.filterwarnings("ignore")
OPTIONS: dict[str, int] = {}
"""Options every heatlens call gets (``memory_budget``)."""
DELTA: dict[str, bool] = {"return_convergence_delta": True}
"""What Captum's path methods are asked for besides the attributions (``--no-delta``: nothing)."""
GRADIENT_SHAP: dict[str, bool] = {}
"""heatlens's GradientSHAP options besides the case's (``--no-delta``: ``delta=False``)."""


def explain(*args: object, **kwargs: object) -> heatlens.Explanation:
    return heatlens.explain(*args, **kwargs, **OPTIONS)


def seeded(build: Callable[[], nn.Module], seed: int = 0) -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return build().eval()


def alternating_cnn() -> nn.Module:
    """Conv, batch norm, ReLU, conv, max pooling, ...: no two nonlinear modules adjacent."""
    layers: list[nn.Module] = []
    width = 3
    for out in (32, 64, 128):
        layers += [nn.Conv2d(width, out, 3, padding=1), nn.BatchNorm2d(out), nn.ReLU(),
                   nn.Conv2d(out, out, 3, padding=1), nn.MaxPool2d(2)]
        width = out
    return nn.Sequential(*layers, nn.Conv2d(width, width, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 10))


def images(batch: int, size: int, seed: int = 1) -> Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def first(result: Tensor | tuple[Tensor, Tensor]) -> Tensor:
    """The attributions of a Captum result, with or without its convergence delta."""
    return result[0] if isinstance(result, tuple) else result


def captum_seeded(fn: Callable[[], Tensor], seed: int) -> Callable[[], Tensor]:
    """``fn`` run after ``np.random.seed(seed); torch.manual_seed(seed)``."""

    def run() -> Tensor:
        np.random.seed(seed)
        torch.manual_seed(seed)
        return fn()

    return run


@dataclass
class Case:
    name: str
    ours: Callable[[], Tensor]
    theirs: Callable[[], Tensor]
    model: nn.Module | None = None
    """heatlens's model (its passes are counted by ``--memory``)."""
    floor: Callable[[], Tensor] | None = None
    """The same attributions written by hand with the least work (timed alongside)."""


def cases() -> dict[str, Callable[[], Case]]:
    from captum import attr

    def plain(title: str, build: Callable[[], nn.Module], x: Tensor, method: str,
              captum_name: str) -> Callable[[], Case]:
        def make() -> Case:
            model = seeded(build)
            theirs = getattr(attr, captum_name)(copy.deepcopy(model))
            return Case(title, lambda: explain(model, x, method, target=3).raw,
                        lambda: theirs.attribute(x, target=3), model)

        return make

    def deeplift_shap() -> Case:
        model, x, refs = seeded(alternating_cnn), images(4, 64), 0.3 * images(8, 64, seed=2)
        theirs = attr.DeepLiftShap(copy.deepcopy(model))
        return Case("DeepLiftShap, same CNN, batch 4 x 8 baselines",
                    lambda: explain(model, x, "deeplift_shap", target=3,
                                             baseline=refs).raw,
                    lambda: theirs.attribute(x, baselines=refs, target=3), model)

    def gradient_shap() -> Case:
        model, x = seeded(torchvision.models.resnet18), images(2, 112)
        refs = 0.3 * images(8, 112, seed=2)
        theirs = attr.GradientShap(copy.deepcopy(model))
        return Case("GradientShap, resnet18, batch 2, 112 px, 20 samples, stdev 0.1",
                    lambda: explain(model, x, "gradient_shap", target=3, baseline=refs,
                                             samples=20, stdev=0.1, seed=4, draws="captum",
                                             **GRADIENT_SHAP).raw,
                    captum_seeded(lambda: first(theirs.attribute(
                        x, baselines=refs, target=3, n_samples=20, stdevs=0.1, **DELTA)), 4),
                    model)

    def layer_case(method: str, captum_cls: str, steps: int | None, size: int = 112
                   ) -> Callable[[], Case]:
        def build() -> Case:
            model, x = seeded(torchvision.models.resnet18), images(2, size)
            other = copy.deepcopy(model)
            theirs = getattr(attr, captum_cls)(other, other.layer3)
            ours_options = {} if steps is None else {"steps": steps}
            theirs_options = {} if steps is None else {"n_steps": steps, **DELTA}
            return Case(f"{captum_cls}, resnet18 layer3, batch 2, {size} px"
                        + ("" if steps is None else f", {steps} steps"),
                        lambda: explain(model, x, method, target=3, layer="layer3",
                                                 **ours_options).raw_by_layer["layer3"],
                        lambda: first(theirs.attribute(x, target=3, **theirs_options)), model,
                        None if steps is not None else lambda: by_hand(other, x))

        return build

    def by_hand(model: nn.Module, x: Tensor) -> Tensor:
        """Gradient x activation at ``layer3`` with a forward hook and one
        ``torch.autograd.grad``: one forward pass and a backward pass down to the layer."""
        kept: list[Tensor] = []
        hook = model.layer3.register_forward_hook(lambda module, args, out: kept.append(out))
        try:
            score = model(x)[:, 3].sum()
        finally:
            hook.remove()
        (grad,) = torch.autograd.grad(score, kept[0])
        return grad * kept[0]

    def surrogate(method: str, captum_cls: str) -> Callable[[], Case]:
        def build() -> Case:
            from heatlens.methods.features import grid_features

            model, x = seeded(torchvision.models.resnet18), images(1, 64)
            mask = grid_features(x, 8)  # 64 patches
            theirs = getattr(attr, captum_cls)(copy.deepcopy(model))
            options = {"surrogate": "linear"} if method == "lime" else {}
            if method == "lime":  # the same surrogate on both sides
                from captum._utils.models.linear_model import SkLearnLinearRegression

                theirs = attr.Lime(copy.deepcopy(model),
                                   interpretable_model=SkLearnLinearRegression())
            return Case(f"{captum_cls}, resnet18, 64 px, 64 patches, 256 samples",
                        lambda: explain(model, x, method, target=3, features=mask,
                                                 samples=256, seed=4, draws="captum",
                                                 **options).raw,
                        captum_seeded(lambda: theirs.attribute(
                            x, target=3, feature_mask=mask, n_samples=256,
                            perturbations_per_eval=64), 4), model)

        return build

    return {
        "deeplift": plain("DeepLift, 6-conv CNN, batch 4, 64 px", alternating_cnn,
                          images(4, 64), "deeplift", "DeepLift"),
        "deeplift_shap": deeplift_shap, "gradient_shap": gradient_shap,
        "layer_gradient_x_activation": layer_case("layer_gradient_x_activation",
                                                  "LayerGradientXActivation", None),
        "layer_gradient_x_activation_224": layer_case("layer_gradient_x_activation",
                                                      "LayerGradientXActivation", None, 224),
        "layer_integrated_gradients": layer_case("layer_integrated_gradients",
                                                 "LayerIntegratedGradients", 50),
        "layer_conductance": layer_case("layer_conductance", "LayerConductance", 50),
        "kernel_shap": surrogate("kernel_shap", "KernelShap"),
        "lime": surrogate("lime", "Lime"),
        "lrp": plain("LRP (epsilon), torchvision vgg11, batch 2, 64 px",
                     torchvision.models.vgg11, images(2, 64), "lrp", "LRP"),
    }


def resident_mib() -> float:
    """The process's resident memory now, in MiB (Linux)."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize() / 2**20


def memory_child(key: str, side: str) -> None:
    """In a fresh process: one call of one side of a case, and as JSON the peak resident
    memory it added (MiB) and, for heatlens, how many passes of the model it made."""
    case = cases()[key]()
    passes = [0]

    def count(module: nn.Module, args: object) -> None:
        passes[0] += 1

    assert case.model is not None
    hook = case.model.register_forward_pre_hook(count)
    before = resident_mib()
    (case.ours if side == "heatlens" else case.theirs)()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    hook.remove()
    print(json.dumps({"peak": peak - before, "passes": passes[0]}))


def memory(chosen: list[str], budget_mib: int) -> None:
    print(f"peak resident memory added by one call, MiB (heatlens budget {budget_mib} MiB); "
          "heatlens's passes include its one-off measurements on one input")
    print(f"{'case':<26} {'heatlens':>9} {'passes':>7} {'captum':>9}")
    for key in chosen:
        peaks = {}
        for side in ("heatlens", "captum"):
            command = [sys.executable, __file__, "--memory-child", key, side]
            if budget_mib != 256:
                command += ["--budget", str(budget_mib)]
            done = subprocess.run(command, capture_output=True, text=True, check=True)
            peaks[side] = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"{key:<26} {peaks['heatlens']['peak']:>9.1f} {peaks['heatlens']['passes']:>7} "
              f"{peaks['captum']['peak']:>9.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--only", default="", help="comma-separated case names")
    parser.add_argument("--budget", type=int, default=0, help="heatlens memory_budget, MiB")
    parser.add_argument("--memory", action="store_true", help="peak memory instead of time")
    parser.add_argument("--no-delta", action="store_true",
                        help="without the convergence delta (Captum's default; heatlens's "
                             "GradientSHAP with delta=False)")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads (default: torch's own); one thread is the least "
                             "disturbed by other work on a loaded machine")
    parser.add_argument("--memory-child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.budget:
        OPTIONS["memory_budget"] = args.budget << 20
    if args.no_delta:
        DELTA.clear()
        GRADIENT_SHAP["delta"] = False
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_child:
        memory_child(*args.memory_child)
        return
    chosen = [c for c in args.only.split(",") if c] or list(cases())
    if args.memory:
        memory(chosen, args.budget or 256)
        return
    budget = f"{args.budget} MiB" if args.budget else "default (256 MiB)"
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; heatlens memory "
          f"budget {budget}; best and median of {args.repeats} runs, in seconds; "
          "ratio = captum / heatlens (best; median)")
    print(f"{'case':<66} {'rel diff':>9} {'heatlens':>15} {'captum':>15} {'ratio':>6} "
          f"{'median':>6}")
    for key in chosen:
        case = cases()[key]()
        ours, theirs = case.ours(), case.theirs()  # also warms both up
        diff = float((ours - theirs.detach()).abs().max() / theirs.detach().abs().max())
        # alternate the two, so that a change of the machine's load falls on both
        sides = [case.ours, case.theirs] + ([case.floor] if case.floor else [])
        rounds = [[best_and_median(side, 1)[0] for side in sides] for _ in range(args.repeats)]
        mine, anchor, *floor = (sorted(times) for times in zip(*rounds, strict=True))
        middle = len(rounds) // 2
        print(f"{case.name:<66} {diff:>9.1e} {mine[0]:>7.3f} {mine[middle]:>7.3f} "
              f"{anchor[0]:>7.3f} {anchor[middle]:>7.3f} {anchor[0] / mine[0]:>6.2f} "
              f"{anchor[middle] / mine[middle]:>6.2f}")
        if floor:
            print(f"{'  by hand (a forward hook, one autograd.grad): floor / heatlens':<76}"
                  f"{floor[0][0]:>7.3f} {floor[0][middle]:>7.3f} {floor[0][0] / mine[0]:>6.2f} "
                  f"{floor[0][middle] / mine[middle]:>6.2f}")


if __name__ == "__main__":
    main()
