"""Speed and memory of the faithfulness metrics, against their floor and the anchor libraries.

One process, side by side, CPU, on a seeded randomly initialised torchvision ResNet-50 in eval
mode (each library on its own deep copy), one 224 px image (the packaged sample photo) and the
Grad-CAM map of it (``layer4``):

* **Deletion + insertion**, RISE's protocol (224-pixel steps: 2 x 225 images): heatlens against
  its floor, the same 450 images pre-built and run through the model in inference mode in the
  same chunks and memory layout (what no implementation can avoid).
* **Deletion alone**, heatlens against Quantus' ``PixelFlipping`` with the same number of steps
  (Quantus flips 224 input elements a step over the 3 channels: 672 steps; heatlens 672 even
  steps of pixels), deletion to zeros in both.
* **ROAD**, most and least relevant first at 10 % ... 90 % (2 x 9 images, imputed), heatlens
  against pytorch-grad-cam's ``ROADCombined`` at the same percentiles.

Memory (a fresh subprocess per case; once the model and input are ready the kernel's peak
resident mark is reset through ``/proc/self/clear_refs``, and the growth is the new peak,
``VmHWM``, minus the resident memory then, ``VmRSS``): heatlens' deletion + insertion and ROAD
under a 256 MiB budget.

Run from the repository root (Quantus takes minutes; ``--skip-quantus`` leaves it out)::

    python benchmarks/metrics_speed.py [--repeats 3] [--skip-quantus]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torchvision
from torch import Tensor, nn

import heatlens
from heatlens.engine.budget import channels_last, items_per_chunk
from heatlens.engine.targets import ClassLogit
from heatlens.metrics import faithfulness

BUDGET = 256 << 20
MIB = 1 << 20


def setup() -> tuple[nn.Module, Tensor, Tensor, Tensor]:
    """ResNet-50 (seeded), the sample photo as a 224 px batch, its Grad-CAM map and class."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = torchvision.models.resnet50().eval()
    x, _ = heatlens.IMAGENET(heatlens.load_image(heatlens.sample_image_path()))
    cam = heatlens.explain(model, x, "gradcam", layer="layer4")
    return model, x, cam.maps, cam.targets


def timed(call: Callable[[], object], repeats: int) -> tuple[float, object]:
    """The median wall time of ``repeats`` calls after one warm-up, and the last result."""
    result = call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = call()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def deletion_insertion(model: nn.Module, x: Tensor, maps: Tensor, classes: Tensor
                       ) -> tuple[Tensor, Tensor]:
    run = {"protocol": faithfulness.RISE_PROTOCOL, "memory_budget": BUDGET}
    goal = ClassLogit(classes)
    deletion = faithfulness.step_curve(model, x, maps[None], classes, goal, mode="deletion", **run)
    insertion = faithfulness.step_curve(model, x, maps[None], classes, goal, mode="insertion",
                                        **run)
    return deletion.auc(), insertion.auc()


def floor(model: nn.Module, x: Tensor) -> Callable[[], None]:
    """450 pre-built images through the model, chunked as heatlens chunks them."""
    images = x.expand(450, -1, -1, -1).clone()
    chunk = items_per_chunk(model, x[:1], BUDGET, extra_per_item=x[:1].numel() * 8)

    def run() -> None:
        with torch.inference_mode():
            for start in range(0, images.shape[0], chunk):
                model(channels_last(images[start : start + chunk])).softmax(dim=1)

    return run


def case_deletion_insertion(model: nn.Module, x: Tensor, maps: Tensor, classes: Tensor,
                            repeats: int) -> dict:
    ours, aucs = timed(lambda: deletion_insertion(model, x, maps, classes), repeats)
    bare, _ = timed(floor(model, x), repeats)
    return {"heatlens s": ours, "floor s": bare, "heatlens / floor": ours / bare,
            "deletion auc": float(aucs[0]), "insertion auc": float(aucs[1])}


def case_quantus(model: nn.Module, x: Tensor, maps: Tensor, classes: Tensor) -> dict:
    """Quantus flips attribution *elements* of the flattened input, 224 at a time over the 3
    channels (it refuses 672, since 224 x 224 is not a multiple): 672 steps. heatlens deletes
    in 672 even steps of pixels (1/672 of them each); both run 673 images through the model."""
    import quantus

    theirs_model = copy.deepcopy(model)
    metric = quantus.PixelFlipping(features_in_step=224, perturb_baseline="black",
                                   normalise=False, disable_warnings=True,
                                   display_progressbar=False)
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        curve = metric(model=theirs_model, x_batch=x.numpy(), y_batch=classes.numpy(),
                       a_batch=maps[:, None].numpy(), device="cpu", softmax=True)
    quantus_seconds = time.perf_counter() - start
    run = {"protocol": faithfulness.heatlens_protocol(step=1 / 672), "memory_budget": BUDGET}
    ours_seconds, ours = timed(lambda: faithfulness.step_curve(
        model, x, maps[None], classes, ClassLogit(classes), mode="deletion", **run), 1)
    return {"heatlens s": ours_seconds, "quantus s": quantus_seconds,
            "quantus / heatlens": quantus_seconds / ours_seconds,
            "steps": f"{ours.y.shape[-1] - 1} vs {len(curve[0])}"}


def case_road(model: nn.Module, x: Tensor, maps: Tensor, classes: Tensor, repeats: int) -> dict:
    from pytorch_grad_cam.metrics.road import ROADCombined
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget

    theirs_model = copy.deepcopy(model)

    def ours() -> Tensor:
        morf, lerf = faithfulness.road_curves(model, x, maps[None], classes,
                                              ClassLogit(classes), memory_budget=BUDGET)
        return faithfulness.road(morf, lerf)

    def theirs() -> np.ndarray:
        road = ROADCombined(percentiles=[10, 20, 30, 40, 50, 60, 70, 80, 90])
        return road(x, maps.numpy(), [ClassifierOutputSoftmaxTarget(int(classes[0]))],
                    theirs_model)

    ours_seconds, ours_score = timed(ours, repeats)
    theirs_seconds, theirs_score = timed(theirs, max(1, repeats // 2))
    return {"heatlens s": ours_seconds, "pytorch-grad-cam s": theirs_seconds,
            "pytorch-grad-cam / heatlens": theirs_seconds / ours_seconds,
            "road": f"{float(ours_score[0, 0]):.4f} vs {float(theirs_score[0]):.4f} (noise "
                    "differs)"}


def memory_child(case: str) -> None:
    """Runs in a subprocess: prints the peak resident growth (MiB) of one case as JSON."""
    model, x, maps, classes = setup()
    calls = {"deletion+insertion": lambda: deletion_insertion(model, x, maps, classes),
             "road": lambda: faithfulness.road_curves(model, x, maps[None], classes,
                                                      ClassLogit(classes),
                                                      memory_budget=BUDGET)}
    Path("/proc/self/clear_refs").write_text("5")  # the peak mark starts again from here
    before = resident("VmRSS")
    calls[case]()
    print(json.dumps({"case": case, "peak_growth_mib": resident("VmHWM") - before}))


def resident(field: str) -> float:
    """``VmRSS`` (now) or ``VmHWM`` (the peak) of this process, in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def case_memory() -> list[dict]:
    found = []
    for case in ("deletion+insertion", "road"):
        done = subprocess.run([sys.executable, __file__, "--memory-child", case],
                              capture_output=True, text=True, check=True)
        found.append(json.loads(done.stdout.strip().splitlines()[-1]))
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-quantus", action="store_true")
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        memory_child(args.memory_child)
        return
    model, x, maps, classes = setup()
    print(f"resnet50, 224 px, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"memory budget {BUDGET // MIB} MiB")
    results = {"deletion + insertion (RISE protocol)":
               case_deletion_insertion(model, x, maps, classes, args.repeats),
               "ROAD, 2 x 9 fractions": case_road(model, x, maps, classes, args.repeats)}
    if not args.skip_quantus:
        results["deletion vs Quantus PixelFlipping"] = case_quantus(model, x, maps, classes)
    for name, numbers in results.items():
        print(f"\n{name}")
        for key, value in numbers.items():
            shown = f"{value:.3f}" if isinstance(value, float) else value
            print(f"  {key}: {shown}")
    print("\npeak memory growth (MiB):")
    for row in case_memory():
        print(f"  {row['case']}: {row['peak_growth_mib']:.0f}")


if __name__ == "__main__":
    main()
