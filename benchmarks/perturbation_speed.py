"""Speed and memory of the methods that run the model many times, against the anchor libraries.

Timing (one process, side by side, CPU, every library on its own deep copy of one seeded,
randomly initialised torchvision model in eval mode; the maps or attributions are compared first,
so the comparison is at equal output):

* Score-CAM on resnet18 ``layer4``: heatlens (``variant="softmax"``, pytorch-grad-cam's
  weighting) vs pytorch-grad-cam vs torch-cam.
* Ablation-CAM on resnet50 ``layer4``: heatlens vs pytorch-grad-cam.
* Occlusion (window 32 stride 16; and Captum tutorial's window 15 stride 8) and integrated
  gradients (50 Gauss-Legendre steps) on resnet50: heatlens vs Captum; occlusion also with
  heatlens's incremental inference switched off (``incremental=False``), to show its share.

Memory (each case in a fresh subprocess, peak resident memory minus the resident memory after
the model and inputs are ready, read from ``getrusage``): Score-CAM on resnet50 at 224 px, and
integrated gradients with 200 steps on resnet50, heatlens with ``memory_budget`` = 512 MiB vs the
anchor library's default.

Run from the repository root::

    python benchmarks/perturbation_speed.py            # timing and memory
    python benchmarks/perturbation_speed.py --only memory
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch
import torchvision
from torch import Tensor, nn

import heatlens

MIB = 1 << 20
BUDGET = 512 * MIB


def seeded(arch: str) -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = getattr(torchvision.models, arch)()
    return model.eval()


def images(batch: int, size: int) -> Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))


def best_and_median(fn: Callable[[], object], repeats: int) -> tuple[float, float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times), statistics.median(times)


def to_tensor(maps: object) -> Tensor:
    return maps if isinstance(maps, Tensor) else torch.as_tensor(maps)


def upsampled_minmax(maps: Tensor, size: int) -> Tensor:
    maps = torch.nn.functional.interpolate(maps[:, None].float(), size=(size, size),
                                           mode="bilinear", align_corners=False)[:, 0]
    flat = maps.flatten(1)
    low, high = flat.min(1, keepdim=True).values, flat.max(1, keepdim=True).values
    return ((flat - low) / (high - low).clamp_min(1e-12)).reshape(maps.shape)


def case_scorecam(repeats: int) -> list[dict]:
    from pytorch_grad_cam import ScoreCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    from torchcam.methods import ScoreCAM as TorchcamScoreCAM

    size, classes = 224, [1, 2]
    model, x = seeded("resnet18"), images(2, size)
    pgc_model, tc_model = copy.deepcopy(model), copy.deepcopy(model)
    pgc = ScoreCAM(pgc_model, [pgc_model.layer4])
    pgc.batch_size = 64
    targets = [ClassifierOutputTarget(c) for c in classes]

    def ours() -> Tensor:
        return heatlens.explain(model, x, method="scorecam", layer="layer4", target=classes,
                                variant="softmax", show_progress=False).maps

    def theirs() -> Tensor:
        return to_tensor(pgc(x, targets))

    def torchcam() -> Tensor:
        with TorchcamScoreCAM(tc_model, "layer4", batch_size=64) as extractor, \
                torch.no_grad():
            scores = tc_model(x)
            maps = extractor(classes, scores)[0]
        return upsampled_minmax(maps, size)

    diff = float((ours() - theirs()).abs().max())
    rows = [{"case": "Score-CAM, resnet18 layer4, batch 2, 224 px", "library": name,
             "best_s": t[0], "median_s": t[1]}
            for name, fn in (("heatlens", ours), ("pytorch-grad-cam", theirs),
                             ("torch-cam", torchcam))
            for t in [best_and_median(fn, repeats)]]
    rows[1]["max_abs_diff_vs_heatlens"] = diff
    return rows


def case_ablation(repeats: int) -> list[dict]:
    from pytorch_grad_cam import AblationCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    model, x = seeded("resnet50"), images(1, 224)
    other = copy.deepcopy(model)
    pgc = AblationCAM(other, [other.layer4])

    def ours() -> Tensor:
        return heatlens.explain(model, x, method="ablationcam", layer="layer4", target=[1],
                                show_progress=False).maps

    def theirs() -> Tensor:
        return to_tensor(pgc(x, [ClassifierOutputTarget(1)]))

    diff = float((ours() - theirs()).abs().max())
    rows = [{"case": "Ablation-CAM, resnet50 layer4, batch 1, 224 px", "library": name,
             "best_s": t[0], "median_s": t[1]}
            for name, fn, n in (("heatlens", ours, repeats), ("pytorch-grad-cam", theirs, 1))
            for t in [best_and_median(fn, n)]]
    rows[1]["max_abs_diff_vs_heatlens"] = diff
    return rows


def case_captum(repeats: int) -> list[dict]:
    from captum.attr import IntegratedGradients, Occlusion

    model, x = seeded("resnet50"), images(2, 224)
    other = copy.deepcopy(model)
    classes = [1, 2]
    rows = []

    def occlusion(window: int, stride: int, batch: int) -> list[tuple[str, Callable]]:
        """heatlens (incremental, the default), heatlens with full passes, Captum."""
        inputs, targets = x[:batch], classes[:batch]

        def run(incremental: bool) -> Callable[[], Tensor]:
            return lambda: heatlens.explain(model, inputs, method="occlusion", target=targets,
                                            window=window, stride=stride,
                                            incremental=incremental, show_progress=False).raw

        def captum() -> Tensor:
            return Occlusion(other).attribute(inputs, target=targets,
                                              sliding_window_shapes=(3, window, window),
                                              strides=(3, stride, stride), baselines=0)

        return [("heatlens", run(True)), ("heatlens, full passes", run(False)),
                ("captum", captum)]

    def ours_ig() -> Tensor:
        return heatlens.explain(model, x, method="integrated_gradients", target=classes,
                                steps=50, show_progress=False).raw

    def captum_ig() -> Tensor:
        return IntegratedGradients(other).attribute(x, target=classes, n_steps=50,
                                                    method="gausslegendre")

    for case, runs in (
        ("Occlusion, resnet50, window 32 stride 16, batch 2, 224 px", occlusion(32, 16, 2)),
        ("Occlusion, resnet50, window 15 stride 8 (Captum's tutorial), batch 1, 224 px",
         occlusion(15, 8, 1)),
        ("Integrated gradients, resnet50, 50 steps, batch 2, 224 px",
         [("heatlens", ours_ig), ("captum", captum_ig)]),
    ):
        reference = None
        for name, fn in runs:
            outputs: list[Tensor] = []
            best, median = best_and_median(
                lambda fn=fn, outputs=outputs: outputs.append(fn()), repeats)
            row = {"case": case, "library": name, "best_s": best, "median_s": median}
            if reference is None:
                reference = outputs[-1]
            else:
                row["max_abs_diff_vs_heatlens"] = float((outputs[-1] - reference).abs().max())
            rows.append(row)
    return rows


def memory_child(case: str) -> None:
    """Runs in a subprocess: prints peak RSS growth (MiB) of one call as JSON."""
    model, x = seeded("resnet50"), images(1, 224)
    if case.endswith("pytorch-grad-cam"):
        from pytorch_grad_cam import ScoreCAM
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

        cam = ScoreCAM(model, [model.layer4])

        def run() -> object:
            return cam(x, [ClassifierOutputTarget(1)])
    elif case.endswith("captum"):
        # Captum's default (internal_batch_size=None) differentiates all 200 points at once:
        # about 200 x 90 MiB of saved activations on resnet50, more than this 24 GiB machine
        # can spare, so it is not run; heatlens's chunked run is measured against its budget.
        print(json.dumps({"case": f"{case} (not run: all 200 points in one batch)",
                          "peak_growth_mib": float("nan"), "seconds": float("nan")}))
        return
    else:
        method = "scorecam" if case.startswith("scorecam") else "integrated_gradients"
        options = {"steps": 200} if method == "integrated_gradients" else {"layer": "layer4"}

        def run() -> object:
            return heatlens.explain(model, x, method=method, target=1, memory_budget=BUDGET,
                                    show_progress=False, **options)
    with torch.inference_mode():
        model(x)  # allocator warm-up
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start = time.perf_counter()
    run()
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"case": case, "peak_growth_mib": peak - before, "seconds": seconds}))


def case_memory() -> list[dict]:
    rows = []
    for case in ("scorecam-heatlens", "scorecam-pytorch-grad-cam", "ig200-heatlens",
                 "ig200-captum"):
        done = subprocess.run([sys.executable, __file__, "--memory-child", case],
                              capture_output=True, text=True, check=True)
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", choices=("scorecam", "ablation", "captum", "memory"))
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        memory_child(args.memory_child)
        return
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"memory budget for heatlens {BUDGET // MIB} MiB")
    cases = {"scorecam": lambda: case_scorecam(args.repeats),
             "ablation": lambda: case_ablation(args.repeats),
             "captum": lambda: case_captum(args.repeats), "memory": case_memory}
    for name, run in cases.items():
        if args.only in (None, name):
            rows = run()
            if name == "memory":
                print("\n| case | peak RSS growth (MiB) | seconds |\n|---|---|---|")
                for row in rows:
                    print(f"| {row['case']} | {row['peak_growth_mib']:.0f} | "
                          f"{row['seconds']:.1f} |")
                continue
            for case in dict.fromkeys(row["case"] for row in rows):
                group = [row for row in rows if row["case"] == case]
                mine = group[0]["best_s"]
                print(f"\n| {case} | best s | median s | x heatlens (best) | max abs diff |")
                print("|---|---|---|---|---|")
                for row in group:
                    diff = row.get("max_abs_diff_vs_heatlens")
                    shown = "" if diff is None else f"{diff:.1e}"
                    print(f"| {row['library']} | {row['best_s']:.2f} | {row['median_s']:.2f} | "
                          f"{row['best_s'] / mine:.1f} | {shown} |")


if __name__ == "__main__":
    main()
