"""Speed of gradient CAMs: heatlens against pytorch-grad-cam, torch-cam and Captum, and the floor.

What is measured
----------------
For each method (Grad-CAM, Grad-CAM++, LayerCAM) the wall time (``time.perf_counter``) of one
call that turns a batch of images into class activation maps for fixed, per-image target
classes at one layer, on CPU, with ``torch.set_num_threads`` left at its default. Every library
gets its own deep copy of one seeded, randomly initialised torchvision model in eval mode (no
weights are downloaded), so hooks or ``.grad`` buffers one library leaves behind cannot slow
down another, and all compute from identical weights. Each call is timed from the input tensor
to a ``(B, H, W)`` map at input resolution, scaled to [0, 1] per image (what heatlens and
pytorch-grad-cam return); torch-cam and Captum return maps at the layer's resolution, so for
them the timed call includes their own forward pass and a bilinear upsampling plus per-image
min-max scaling, so that every library produces the same kind of output.

The floor is what any gradient CAM must pay: one forward pass with a hook that keeps the layer's
output, then ``torch.autograd.grad(sum of target logits, layer output)``. Two variants are timed:

* ``floor``: the recipe above with autograd recording the whole forward pass (what a plain
  hook-based implementation does, e.g. Captum);
* ``floor, no-grad trunk``: the part of the network before the layer runs under
  ``torch.no_grad()`` and the layer's output becomes a leaf that requires gradients, so autograd
  records only the head. No gradient CAM can be cheaper than this.

The CAM arithmetic itself (a few element-wise operations on a ``(B, 2048, 7, 7)`` tensor and a
bilinear upsampling) is tiny next to a ResNet-50 forward pass, so a good implementation should
land close to the floor; the project goal is heatlens within 1.2x of it.

Method
------
After warm-up calls, ``--repeats`` rounds are run; in each round, every (method, library) pair
is called once, in an order rotated from round to round (libraries interleaved to spread
thermal and scheduling drift evenly). Three tables are printed with the same columns: the
median wall time per pair (the headline), the best wall time per pair, and the median process
CPU time (all threads). On a machine shared with other work, a call can be stretched several
times over when another process takes one of the cores (PyTorch's parallel regions wait for
their slowest thread); the best-of-N wall time is then the better estimate of the undisturbed
cost, and the number of involuntary context switches of every call is printed to show how much
each was disturbed; a fourth table gives the median over the undisturbed calls only (at most
``--quiet`` switches, default 20), with their number.

Before timing, the maps are compared with heatlens's: the maximum absolute difference over all
pixels, on maps in [0, 1] at input resolution, so the comparison is made at equal output.

Run from the repository root::

    /work/venv/bin/python benchmarks/cam_speed.py --batch 8 --size 224 --repeats 5

``--profile`` adds ``torch.profiler`` tables of one heatlens call and one no-grad-trunk floor
call; ``--threads N`` sets ``torch.set_num_threads(N)`` (default: torch's own choice).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import os
import platform
import resource
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import version
from typing import Any

import captum
import numpy as np
import pytorch_grad_cam
import torch
import torch.nn.functional as F
import torchcam
import torchcam.methods
import torchvision
from captum.attr import LayerGradCam
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import Tensor, nn

import heatlens

METHODS = ("gradcam", "gradcam++", "layercam")
HEATLENS = {"gradcam": heatlens.GradCAM, "gradcam++": heatlens.GradCAMPlusPlus,
            "layercam": heatlens.LayerCAM}
PYTORCH_GRAD_CAM = {"gradcam": pytorch_grad_cam.GradCAM,
                    "gradcam++": pytorch_grad_cam.GradCAMPlusPlus,
                    "layercam": pytorch_grad_cam.LayerCAM}
TORCHCAM = {"gradcam": torchcam.methods.GradCAM, "gradcam++": torchcam.methods.GradCAMpp,
            "layercam": torchcam.methods.LayerCAM}

Runner = Callable[[], Any]


def minmax(maps: Tensor) -> Tensor:
    """Per-image min-max scaling of ``(B, H, W)`` maps to [0, 1]."""
    flat = maps.flatten(1)
    low = flat.amin(dim=1, keepdim=True)
    span = (flat.amax(dim=1, keepdim=True) - low).clamp_min(1e-12)
    return ((flat - low) / span).reshape(maps.shape)


def to_input_size(maps: Tensor, size: tuple[int, int]) -> Tensor:
    """``(B, h, w)`` or ``(B, 1, h, w)`` maps at layer resolution -> ``(B, H, W)`` in [0, 1]."""
    maps = maps.reshape(maps.shape[0], 1, *maps.shape[-2:]).float()
    up = F.interpolate(maps, size=size, mode="bilinear", align_corners=False)[:, 0]
    return minmax(up)


def floor_runner(model: nn.Module, layer: nn.Module, x: Tensor, classes: Tensor,
                 *, nograd_trunk: bool) -> Runner:
    """One forward pass keeping ``layer``'s output, then d(sum of target logits)/d(output)."""

    def run() -> Tensor:
        kept: list[Tensor] = []

        def hook(module: nn.Module, args: Any, output: Tensor) -> Tensor | None:
            if nograd_trunk:
                torch.set_grad_enabled(True)  # restored when the no_grad() block exits
                # no clone: nothing after layer4 of a torchvision ResNet works in place
                output = output.detach().requires_grad_(True)
                kept.append(output)
                return output
            kept.append(output)
            return None

        handle = layer.register_forward_hook(hook)
        try:
            with torch.set_grad_enabled(not nograd_trunk):
                logits = model(x)
        finally:
            handle.remove()
        score = logits.gather(1, classes[:, None]).sum()
        (grad,) = torch.autograd.grad(score, kept[0])
        return grad

    return run


def heatlens_runner(method: str, model: nn.Module, layer: str, x: Tensor,
                    targets: list[int]) -> Runner:
    explainer = HEATLENS[method](model, layer=layer)
    return lambda: explainer(x, target=targets).maps


def heatlens_explain_runner(method: str, model: nn.Module, layer: str, x: Tensor,
                            targets: list[int]) -> Runner:
    return lambda: heatlens.explain(model, x, method=method, target=targets, layer=layer).maps


def pytorch_grad_cam_runner(method: str, model: nn.Module, layer: nn.Module, x: Tensor,
                            targets: list[int]) -> Runner:
    cam = PYTORCH_GRAD_CAM[method](model=model, target_layers=[layer])
    wanted = [ClassifierOutputTarget(c) for c in targets]
    return lambda: torch.from_numpy(cam(input_tensor=x, targets=wanted))


def torchcam_runner(method: str, model: nn.Module, layer: str, x: Tensor,
                    targets: list[int]) -> Runner:
    # One extractor per method, each with hooks on its own model copy; the forward pass is part
    # of the timed call. class_idx as a list gives image i the map of class targets[i].
    extractor = TORCHCAM[method](model, target_layer=layer)

    def run() -> Tensor:
        with torch.enable_grad():
            scores = model(x)
            (cams,) = extractor(class_idx=targets, scores=scores)
        return to_input_size(cams, tuple(x.shape[2:]))

    return run


def captum_runner(method: str, model: nn.Module, layer: nn.Module, x: Tensor,
                  targets: list[int]) -> Runner | None:
    if method != "gradcam":
        return None  # Captum implements Grad-CAM only
    gradcam = LayerGradCam(model, layer)

    def run() -> Tensor:
        attr = gradcam.attribute(x, target=targets, relu_attributions=True)
        return to_input_size(attr.detach(), tuple(x.shape[2:]))

    return run


def build_runners(args: argparse.Namespace) -> tuple[dict[tuple[str, str], Runner], dict]:
    torch.manual_seed(args.seed)
    base = torchvision.models.get_model(args.arch, weights=None).eval()
    for p in base.parameters():
        p.requires_grad_(True)
    x = torch.randn(args.batch, 3, args.size, args.size,
                    generator=torch.Generator().manual_seed(args.seed + 1))
    num_classes = base(x[:1]).shape[1]
    targets = [(97 * i + 13) % num_classes for i in range(args.batch)]
    classes = torch.tensor(targets)

    def copy_of() -> nn.Module:
        return copy.deepcopy(base).eval()

    runners: dict[tuple[str, str], Runner] = {}
    floor_model = copy_of()
    layer_of = floor_model.get_submodule
    for method in args.methods:
        runners[(method, "floor")] = floor_runner(
            floor_model, layer_of(args.layer), x, classes, nograd_trunk=False)
        runners[(method, "floor-nograd-trunk")] = floor_runner(
            floor_model, layer_of(args.layer), x, classes, nograd_trunk=True)
        hl_model = copy_of()
        runners[(method, "heatlens")] = heatlens_runner(method, hl_model, args.layer, x, targets)
        runners[(method, "heatlens.explain")] = heatlens_explain_runner(
            method, hl_model, args.layer, x, targets)
        pgc_model = copy_of()
        runners[(method, "pytorch-grad-cam")] = pytorch_grad_cam_runner(
            method, pgc_model, pgc_model.get_submodule(args.layer), x, targets)
        tc_model = copy_of()
        runners[(method, "torch-cam")] = torchcam_runner(method, tc_model, args.layer, x, targets)
        cp_model = copy_of()
        captum_run = captum_runner(method, cp_model, cp_model.get_submodule(args.layer), x,
                                   targets)
        if captum_run is not None:
            runners[(method, "captum")] = captum_run
    return runners, {"targets": targets}


def agreement(runners: dict[tuple[str, str], Runner], methods: list[str]) -> dict:
    """Max |map - heatlens map| over all pixels, per method and library."""
    diffs: dict[tuple[str, str], float] = {}
    for method in methods:
        reference = runners[(method, "heatlens")]().float()
        lo, hi = float(reference.min()), float(reference.max())
        assert lo >= 0.0 and hi <= 1.0, (method, lo, hi)
        for lib in ("heatlens.explain", "pytorch-grad-cam", "torch-cam", "captum"):
            if (method, lib) in runners:
                other = runners[(method, lib)]().float()
                diffs[(method, lib)] = float((other - reference).abs().max())
    return diffs


@dataclass
class Samples:
    """Per-call measurements of one (method, library) pair."""

    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    preempted: list[int] = field(default_factory=list)


def time_all(runners: dict[tuple[str, str], Runner], warmup: int, repeats: int
             ) -> dict[tuple[str, str], Samples]:
    """Warm up, then ``repeats`` rounds calling every pair once, in an order rotated each round.

    Records wall time (``perf_counter``), process CPU time (all threads) and the number of
    involuntary context switches (how often another process took the CPU during the call).
    """
    keys = list(runners)
    for _ in range(warmup):
        for key in keys:
            runners[key]()
    samples = {key: Samples() for key in keys}
    for r in range(repeats):
        shift = r % len(keys)
        for key in keys[shift:] + keys[:shift]:
            switches = resource.getrusage(resource.RUSAGE_SELF).ru_nivcsw
            cpu = time.process_time()
            start = time.perf_counter()
            runners[key]()
            samples[key].wall.append(time.perf_counter() - start)
            samples[key].cpu.append(time.process_time() - cpu)
            samples[key].preempted.append(
                resource.getrusage(resource.RUSAGE_SELF).ru_nivcsw - switches)
    return samples


def profile_heatlens(runners: dict[tuple[str, str], Runner], method: str) -> None:
    from torch.profiler import ProfilerActivity, profile

    for lib in ("floor-nograd-trunk", "heatlens"):
        runners[(method, lib)]()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            runners[(method, lib)]()
        print(f"\n### torch.profiler: {lib} ({method}), top 12 ops by self CPU time\n")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f}"


def print_table(title: str, stat: dict[tuple[str, str], float], methods: list[str],
                count: dict[tuple[str, str], int] | None = None) -> None:
    """One Markdown table; a pair missing from ``stat`` shows as "-", ``count`` adds ``[n]``."""

    def cell(m: str, lib: str, versus: str | None = None, word: str = "") -> str:
        if (m, lib) not in stat:
            return "n/a" if lib == "captum" and m != "gradcam" else "-"
        text = ms(stat[(m, lib)])
        if versus is not None and (m, versus) in stat:
            text += f" ({stat[(m, lib)] / stat[(m, versus)]:.2f}x{word})"
        if count is not None:
            text += f" [{count[(m, lib)]}]"
        return text

    print(f"\n## {title}\n")
    print("| method | floor ms | heatlens ms (x floor) | pytorch-grad-cam ms (x heatlens) "
          "| torch-cam ms | captum ms |")
    print("|---|---:|---:|---:|---:|---:|")
    for m in methods:
        print(f"| {m} | {cell(m, 'floor')} | {cell(m, 'heatlens', 'floor')} | "
              f"{cell(m, 'pytorch-grad-cam', 'heatlens')} | {cell(m, 'torch-cam')} | "
              f"{cell(m, 'captum')} |")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--layer", default="layer4")
    parser.add_argument("--methods", default=",".join(METHODS),
                        help=f"comma-separated subset of {','.join(METHODS)}")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads(N); default: leave torch's default")
    parser.add_argument("--quiet", type=int, default=20,
                        help="a call with at most this many involuntary context switches "
                             "counts as undisturbed")
    parser.add_argument("--profile", action="store_true",
                        help="also print torch.profiler tables of one heatlens call and the floor")
    args = parser.parse_args(argv)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(args.methods) - set(METHODS))
    if unknown:
        parser.error(f"unknown method(s) {unknown}; choose from {list(METHODS)}")
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    load_before = os.getloadavg()
    runners, info = build_runners(args)
    diffs = agreement(runners, args.methods)
    samples = time_all(runners, args.warmup, args.repeats)
    load_after = os.getloadavg()

    print(f"# CAM speed: {args.arch}, batch {args.batch}, {args.size} px, layer {args.layer}, "
          f"CPU, {torch.get_num_threads()} torch threads")
    print(f"\n{datetime.date.today().isoformat()}; {os.cpu_count()} CPUs "
          f"({platform.machine()}), Python {platform.python_version()}, torch "
          f"{torch.__version__}, torchvision {torchvision.__version__}, heatlens "
          f"{heatlens.__version__}, grad-cam {version('grad-cam')}, torchcam "
          f"{torchcam.__version__}, captum {captum.__version__}, numpy {np.__version__}")
    print(f"\n{args.repeats} interleaved repeats after {args.warmup} warm-up rounds; targets "
          f"{info['targets']}; load average (1, 5, 15 min) "
          f"{' '.join(f'{v:.1f}' for v in load_before)} before, "
          f"{' '.join(f'{v:.1f}' for v in load_after)} after")

    median_wall = {k: statistics.median(s.wall) for k, s in samples.items()}
    print_table("Median wall time", median_wall, args.methods)
    print_table("Best wall time (the least disturbed call of each pair)",
                {k: min(s.wall) for k, s in samples.items()}, args.methods)
    quiet = {k: [w for w, n in zip(s.wall, s.preempted, strict=True) if n <= args.quiet]
             for k, s in samples.items()}
    print_table(f"Median of undisturbed calls (at most {args.quiet} involuntary context "
                "switches; [number of such calls])",
                {k: statistics.median(v) for k, v in quiet.items() if v}, args.methods,
                count={k: len(v) for k, v in quiet.items()})
    print_table("Median process CPU time (all threads)",
                {k: statistics.median(s.cpu) for k, s in samples.items()}, args.methods)

    print("\n## Details\n")
    print("| method | floor, no-grad trunk ms: median / best | heatlens x no-grad floor: "
          "median / best | heatlens.explain ms: median / best "
          "| max abs diff vs heatlens: pytorch-grad-cam / torch-cam / captum |")
    print("|---|---|---|---|---|")
    for m in args.methods:
        ng, hl, ex = (samples[(m, lib)].wall
                      for lib in ("floor-nograd-trunk", "heatlens", "heatlens.explain"))
        d = [f"{diffs[(m, lib)]:.1e}" if (m, lib) in diffs else "n/a"
             for lib in ("pytorch-grad-cam", "torch-cam", "captum")]
        print(f"| {m} | {ms(statistics.median(ng))} / {ms(min(ng))} | "
              f"{statistics.median(hl) / statistics.median(ng):.2f}x / {min(hl) / min(ng):.2f}x | "
              f"{ms(statistics.median(ex))} / {ms(min(ex))} | {' / '.join(d)} |")

    print("\n## All calls: wall ms [involuntary context switches], in round order\n")
    for (m, lib), s in samples.items():
        calls = ", ".join(f"{ms(w)} [{n}]" for w, n in zip(s.wall, s.preempted, strict=True))
        print(f"- {m} / {lib}: {calls}")

    if args.profile:
        profile_heatlens(runners, args.methods[0])


if __name__ == "__main__":
    main()
