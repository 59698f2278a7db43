"""Speed and memory of ``heatlens.explain_dataset``: against its floor and pytorch-grad-cam.

One process, side by side, CPU, Grad-CAM at ``--layer`` (``layer4``) of a seeded, randomly
initialised torchvision ``--arch`` (ResNet-50) in eval mode; each contender gets its own deep
copy of the same model (no weights are downloaded). The images: ``--images`` (256) files
generated once into a temporary folder from scikit-image's bundled photos (``skimage.data``:
astronaut, chelsea, coffee, rocket, ...), each a random crop resized so that its longer side
lies between 300 and 800 px, three in four saved as JPEG (quality 75-95) and one in four as
PNG, a few of them greyscale. All three contenders see the same files and the same
preprocessing (``heatlens.IMAGENET``: 256 px resize, 224 px centre crop).

* **floor**: the model's own batched Grad-CAM throughput, with nothing to read: the files are
  decoded and preprocessed before the clock starts, and one ``heatlens.create_explainer(
  "gradcam", model, layer=...)`` explains them in batches of ``--batch-size`` (32), after one
  warm-up batch. No data-set run can be faster.
* **heatlens**: ``heatlens.explain_dataset(model, folder, fresh_out, "gradcam", layer=...,
  batch_size=..., workers=...)`` into a new run folder per repeat (one warm-up call on a
  one-batch list file first, so imports and first-use costs of pyarrow, matplotlib etc. are
  paid outside the clock). Two rates are given: the **whole call** (everything: model
  fingerprint, listing, DataLoader start-up and first batch, chunk writes, the final index,
  ``load_run`` and ``summary.png``), and the **steady state**: the images of batches 2..last
  over the time between the first and the last progress update (the progress bar's class,
  ``tqdm.auto.tqdm``, is wrapped for the call to time-stamp its ``update``s; with the default
  ``chunk_images`` and 256 images, the chunk write comes after the last update, so the steady
  state is the decode-overlapped explain pipeline). The 0.85x target is for the steady state,
  i.e. loading hidden behind compute; the whole call shows what the fixed costs weigh.
* **pytorch-grad-cam**: the per-image loop as its users write it: for each file, ``PIL.Image
  .open(...).convert("RGB")``, ``heatlens.IMAGENET``, ``with GradCAM(model=model,
  target_layers=[layer]) as cam: cam(input_tensor=x, targets=None)`` (a new ``GradCAM`` per
  image), and ``np.save`` of the float16 map into a fresh folder (heatlens writes too). The 3x
  target compares heatlens' *whole call* with it.

Each of ``--repeats`` (3) rounds runs the three once, in an order rotated from round to round;
the medians are reported, with the process CPU time per image (this process's threads plus
its finished children: the DataLoader workers), which shows the work done independently of
what other processes took from the two cores.

**Memory** (``--skip-memory`` leaves it out): a fresh subprocess runs ``explain_dataset`` with
``--memory-arch`` (MobileNetV3-Small: the same code path in a minute instead of half an hour;
Grad-CAM at ``--layer`` where the model has it, else at heatlens' ``"auto"`` choice) on
``--memory-images`` (2,000) small files (longer side 256-320 px, JPEG and PNG), with
``chunk_images=100`` and the same batch size and workers. A background thread samples every
0.2 s this process's resident memory (``VmRSS`` of ``/proc/self/status``), the summed
``VmRSS`` of the DataLoader workers, and how many images the run folder holds: the rows of the
finished chunk files ``parts/rows-*.parquet`` (from their Parquet footers; a chunk file appears
whole, by a rename, after its maps), read from the run folder's documented layout rather than
from heatlens' internals. The samples fall into plateaus, one per chunk count (chunks close on
batch boundaries: 128, 256, ... images with batches of 32); within a plateau the RSS swings
with each batch's activations, so each plateau is summarised by its trough (its least RSS,
what stays between batches) and its peak. The growth reported is the trough of the last
plateau of the loop (the last chunk written while the workers live: 1,920 of 2,000 images)
minus the trough of the first plateau past 200 images (256), with the least-squares slope of
all the loop's troughs; the tail (all images written: the index, ``load_run`` and
``summary.png``, whose matplotlib import and figure alone take about 40 MiB once) is given
apart. The target (< 100 MB) is checked against the larger of the two.

Run from the repository root (about 40 minutes with the defaults on two cores shared with
other work; pytorch-grad-cam's loop is three quarters of it)::

    python benchmarks/dataset_speed.py [--repeats 3] [--images 256] [--batch-size 32]
        [--workers 2] [--arch resnet50] [--skip-memory] [--json FILE]

and a quick trial: ``python benchmarks/dataset_speed.py --arch resnet18 --images 64
--repeats 1 --skip-memory``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np
import PIL
import torch
import torchvision
from PIL import Image
from torch import nn

import heatlens

MIB = 1 << 20
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field",
          "immunohistochemistry", "retina", "stereo_motorcycle", "colorwheel", "camera",
          "coins", "moon", "brick", "grass", "gravel", "cat")
"""The scikit-image photos the files are cut from (all bundled with scikit-image)."""


# ----------------------------------------------------------------------------------- images


def photos() -> list[np.ndarray]:
    """The :data:`PHOTOS` as ``(H, W, 3)`` RGB or ``(H, W)`` greyscale uint8 arrays."""
    import skimage.data

    found = []
    for name in PHOTOS:
        image = getattr(skimage.data, name)()
        if isinstance(image, tuple):  # stereo_motorcycle: (left, right, disparity)
            image = image[0]
        found.append(np.ascontiguousarray(image[..., :3] if image.ndim == 3 else image))
    return found


def make_images(folder: Path, count: int, longer: tuple[int, int], seed: int) -> list[Path]:
    """``count`` files in ``folder``: random crops of the photos (half to all of each side),
    resized so the longer side lies in ``longer``; 3 in 4 JPEG, 1 in 4 PNG."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    sources = photos()
    files = []
    for i in range(count):
        photo = sources[int(rng.integers(len(sources)))]
        height, width = photo.shape[:2]
        h = int(height * rng.uniform(0.5, 1.0))
        w = int(width * rng.uniform(0.5, 1.0))
        top, left = int(rng.integers(height - h + 1)), int(rng.integers(width - w + 1))
        crop = Image.fromarray(photo[top:top + h, left:left + w])
        side = int(rng.integers(longer[0], longer[1] + 1))
        scale = side / max(w, h)
        crop = crop.resize((max(1, round(w * scale)), max(1, round(h * scale))),
                           Image.Resampling.BILINEAR)
        if rng.random() < 0.25:
            path = folder / f"img-{i:05d}.png"
            crop.save(path)
        else:
            path = folder / f"img-{i:05d}.jpg"
            crop.save(path, quality=int(rng.integers(75, 96)))
        files.append(path)
    return files


# ----------------------------------------------------------------------------------- model


def seeded_model(arch: str, seed: int) -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return torchvision.models.get_model(arch, weights=None).eval()


def cpu_seconds() -> float:
    """CPU time of this process (all threads) and of its finished, waited-for children."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


# --------------------------------------------------------------------------------- contenders


def floor_runner(model: nn.Module, files: list[Path], args: argparse.Namespace
                 ) -> Callable[[], dict]:
    """Batched Grad-CAM on tensors decoded and preprocessed beforehand."""
    tensors = torch.stack([heatlens.IMAGENET(heatlens.load_image(f))[0][0] for f in files])
    batches = list(tensors.split(args.batch_size))
    explainer = heatlens.create_explainer("gradcam", model, layer=args.layer)
    explainer(batches[0])  # warm-up

    def run() -> dict:
        cpu = cpu_seconds()
        start = time.perf_counter()
        for batch in batches:
            explainer(batch).maps  # noqa: B018  (the maps at input resolution, as returned)
        return {"wall": time.perf_counter() - start, "cpu": cpu_seconds() - cpu}

    return run


@contextlib.contextmanager
def progress_marks() -> Iterator[list[tuple[float, int]]]:
    """Time-stamp every ``update`` of the ``tqdm.auto.tqdm`` bars made inside the block."""
    import tqdm.auto

    marks: list[tuple[float, int]] = []
    original = tqdm.auto.tqdm

    class Marking(original):  # type: ignore[misc, valid-type]
        def update(self, n: float | None = 1) -> bool | None:
            marks.append((time.perf_counter(), int(n or 0)))
            return super().update(n)

    tqdm.auto.tqdm = Marking
    try:
        yield marks
    finally:
        tqdm.auto.tqdm = original


def heatlens_runner(model: nn.Module, folder: Path, files: list[Path], scratch: Path,
                    args: argparse.Namespace) -> Callable[[], dict]:
    """``explain_dataset`` over ``folder`` into a fresh run folder per call."""
    calls = iter(range(1_000_000))

    def explain(source: Path, out: Path) -> Any:
        return heatlens.explain_dataset(model, source, out, "gradcam", layer=args.layer,
                                        batch_size=args.batch_size, workers=args.workers,
                                        show_progress=False)

    warm = scratch / "warm-up.txt"
    warm.write_text("".join(f"{f}\n" for f in files[:args.batch_size]))
    explain(warm, scratch / "heatlens-warm-up")

    def run() -> dict:
        out = scratch / f"heatlens-{next(calls)}"
        with progress_marks() as marks:
            cpu = cpu_seconds()
            start = time.perf_counter()
            done = explain(folder, out)
            wall = time.perf_counter() - start
            cpu = cpu_seconds() - cpu
        images = len(set(done.index.column("path").to_pylist()))
        if images != len(files) or done.errors:
            raise RuntimeError(f"explain_dataset explained {images} of {len(files)} images, "
                               f"errors {done.errors[:3]}")
        shutil.rmtree(out)
        found = {"wall": wall, "cpu": cpu, "batches": len(marks)}
        if len(marks) >= 2:
            found["steady"] = marks[-1][0] - marks[0][0]
            found["steady_images"] = sum(n for _, n in marks[1:])
            found["before_first"] = marks[0][0] - start
            found["after_last"] = start + wall - marks[-1][0]
        return found

    return run


def pytorch_grad_cam_runner(model: nn.Module, files: list[Path], scratch: Path,
                            args: argparse.Namespace) -> Callable[[], dict]:
    """The per-image loop of a pytorch-grad-cam user, saving each map as float16."""
    from pytorch_grad_cam import GradCAM

    layer = model.get_submodule(args.layer)
    calls = iter(range(1_000_000))

    def one(path: Path, out: Path) -> None:
        with Image.open(path) as opened:
            image = opened.convert("RGB")
        x, _ = heatlens.IMAGENET(image)
        with GradCAM(model=model, target_layers=[layer]) as cam:
            grayscale = cam(input_tensor=x, targets=None)
        np.save(out / f"{path.stem}.npy", np.asarray(grayscale[0], dtype=np.float16))

    warm = scratch / "pgc-warm-up"
    warm.mkdir()
    one(files[0], warm)

    def run() -> dict:
        out = scratch / f"pgc-{next(calls)}"
        out.mkdir()
        cpu = cpu_seconds()
        start = time.perf_counter()
        for path in files:
            one(path, out)
        wall = time.perf_counter() - start
        cpu = cpu_seconds() - cpu
        shutil.rmtree(out)
        return {"wall": wall, "cpu": cpu}

    return run


def speed(args: argparse.Namespace, scratch: Path) -> dict:
    start = time.perf_counter()
    folder = scratch / "images"
    files = make_images(folder, args.images, (300, 800), args.seed)
    made = time.perf_counter() - start
    base = seeded_model(args.arch, args.seed)
    runners = {
        "floor": floor_runner(copy.deepcopy(base), files, args),
        "heatlens": heatlens_runner(copy.deepcopy(base), folder, files, scratch, args),
        "pytorch-grad-cam": pytorch_grad_cam_runner(copy.deepcopy(base), files, scratch, args),
    }
    names = list(runners)
    samples: dict[str, list[dict]] = {name: [] for name in names}
    for r in range(args.repeats):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            samples[name].append(runners[name]())
            print(f"  round {r + 1}: {name} {args.images / samples[name][-1]['wall']:.2f} img/s",
                  file=sys.stderr, flush=True)
    return {"samples": samples, "files_seconds": made,
            "bytes": sum(f.stat().st_size for f in files),
            "png": sum(f.suffix == ".png" for f in files)}


# ------------------------------------------------------------------------------------ memory


def status(field: str, pid: str = "self") -> float:
    """A ``kB`` line of ``/proc/PID/status`` in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/{pid}/status")


def workers_rss() -> float:
    """The summed ``VmRSS`` (MiB) of this process's children (the DataLoader workers; pages
    they share with this process, copy-on-write after the fork, count in each). Their ``Pss``
    would not double-count, but reading ``smaps_rollup`` of a process holding torch costs tens
    of milliseconds of kernel time, too much to sample five times a second."""
    total = 0.0
    for pid in Path(f"/proc/self/task/{os.getpid()}/children").read_text().split():
        with contextlib.suppress(OSError, RuntimeError):
            total += status("VmRSS", pid)
    return total


class Sampler(threading.Thread):
    """Every ``interval`` s: (seconds, images written, VmRSS MiB, workers' VmRSS MiB)."""

    def __init__(self, out: Path, methods: int, interval: float = 0.2) -> None:
        super().__init__(daemon=True)
        self.out, self.methods, self.interval = out, methods, interval
        self.rows: dict[str, int] = {}
        self.samples: list[tuple[float, int, float, float]] = []
        self.stop = threading.Event()
        self.start_time = time.perf_counter()

    def written(self) -> int:
        import pyarrow.parquet as pq

        for part in sorted((self.out / "parts").glob("rows-*.parquet")):
            if part.name not in self.rows:
                self.rows[part.name] = pq.read_metadata(part).num_rows
        return sum(self.rows.values()) // self.methods

    def sample(self) -> None:
        self.samples.append((time.perf_counter() - self.start_time, self.written(),
                             status("VmRSS"), workers_rss()))

    def run(self) -> None:
        while not self.stop.wait(self.interval):
            with contextlib.suppress(OSError):
                self.sample()


def memory_child(args: argparse.Namespace) -> None:
    """In a fresh process: RSS of ``explain_dataset`` as the images get written (JSON)."""
    folder = Path(args.memory_child)
    count = sum(1 for _ in folder.iterdir())
    model = seeded_model(args.memory_arch, args.seed)
    names = dict(model.named_modules())
    layer = args.layer if args.layer in names else "auto"
    out = folder.parent / "memory-run"
    shutil.rmtree(out, ignore_errors=True)
    rss_before = status("VmRSS")
    sampler = Sampler(out, methods=1)
    sampler.start()
    start = time.perf_counter()
    heatlens.explain_dataset(model, folder, out, "gradcam", layer=layer,
                             batch_size=args.batch_size, workers=args.workers,
                             chunk_images=100, show_progress=False)
    seconds = time.perf_counter() - start
    sampler.stop.set()
    sampler.join()
    sampler.sample()
    # One plateau per number of images written (between two chunk files): its trough (the
    # least RSS, between two batches' activations) and its peak. The plateaus while the
    # DataLoader workers live are the loop's; the last one, once they are gone, is the tail
    # (index.parquet, load_run, summary.png).
    plateaus: dict[int, list[float]] = {}
    workers: dict[int, list[float]] = {}
    for _, written, rss, children in sampler.samples:
        plateaus.setdefault(written, []).append(rss)
        workers.setdefault(written, []).append(children)
    kept = sorted(k for k in plateaus if k >= min(200, count))
    loop = [k for k in kept if min(workers[k]) > 0] or kept
    first, last, tail = loop[0], loop[-1], max(plateaus)
    troughs = [min(plateaus[k]) for k in loop]
    slope = float(np.polyfit(loop, troughs, 1)[0]) if len(loop) >= 3 else float("nan")
    print(json.dumps({
        "arch": args.memory_arch, "layer": layer, "images": count, "seconds": seconds,
        "rss_before_mib": rss_before, "at_images": [first, last],
        "trough_mib": [min(plateaus[first]), min(plateaus[last])],
        "peak_mib": [max(plateaus[first]), max(plateaus[last])],
        "growth_mib": min(plateaus[last]) - min(plateaus[first]),
        "peak_growth_mib": max(plateaus[last]) - max(plateaus[first]),
        "slope_mib_per_1000_images": slope * 1000,
        "tail_images": tail, "tail_trough_mib": min(plateaus[tail]),
        "vmhwm_mib": status("VmHWM"), "rss_after_mib": status("VmRSS"),
        "workers_rss_mib": [max(workers[first]), max(workers[last])],
        "samples": [list(s) for s in sampler.samples],
    }))


def memory(args: argparse.Namespace, scratch: Path) -> dict:
    folder = scratch / "memory" / "images"
    make_images(folder, args.memory_images, (256, 320), args.seed + 1)
    command = [sys.executable, __file__, "--memory-child", str(folder), "--memory-arch",
               args.memory_arch, "--layer", args.layer, "--batch-size", str(args.batch_size),
               "--workers", str(args.workers), "--seed", str(args.seed)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode:
        raise RuntimeError(f"the memory subprocess failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------ report


def environment() -> str:
    return (f"{datetime.date.today().isoformat()}; {os.cpu_count()} CPUs ({platform.machine()}), "
            f"Python {platform.python_version()}, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads), torchvision {torchvision.__version__}, "
            f"heatlens {heatlens.__version__}, grad-cam {version('grad-cam')}, Pillow "
            f"{PIL.__version__}, numpy {np.__version__}")


def report(args: argparse.Namespace, found: dict, mem: dict | None) -> dict:
    samples, n = found["samples"], args.images

    def rates(name: str, key: str = "wall", images: str | None = None) -> list[float]:
        return [(s[images] if images else n) / s[key] for s in samples[name] if key in s]

    def median(values: list[float]) -> float:
        return statistics.median(values) if values else float("nan")

    floor = median(rates("floor"))
    whole = median(rates("heatlens"))
    steady = median(rates("heatlens", "steady", "steady_images"))
    theirs = median(rates("pytorch-grad-cam"))
    cpu = {name: median([s["cpu"] / n for s in samples[name]]) for name in samples}
    hl = samples["heatlens"]

    def verdict(ok: bool) -> str:
        return "met" if ok else "MISSED"

    if not rates("heatlens", "steady", "steady_images"):
        print("(a single batch: no steady state; give more --images)")

    print(f"\n# explain_dataset speed: {args.arch}, Grad-CAM at {args.layer}, CPU, "
          f"{args.images} files, batch {args.batch_size}, {args.workers} workers")
    print(f"\n{environment()}")
    print(f"\narguments: {' '.join(sys.argv[1:]) or '(defaults)'} -> "
          + ", ".join(f"{k}={v}" for k, v in vars(args).items() if k != "memory_child"))
    print(f"files: {n} ({found['png']} PNG, the rest JPEG), {found['bytes'] / MIB:.1f} MiB, "
          f"longer side 300-800 px, made in {found['files_seconds']:.1f} s; "
          f"median of {args.repeats} rotated rounds; load average before "
          f"{args.load_before}, after {' '.join(f'{v:.1f}' for v in os.getloadavg())}")
    print("\n| measure | images/s | ratio | target |")
    print("|---|---:|---:|---|")
    print(f"| floor: batched Grad-CAM on pre-loaded tensors | {floor:.2f} | 1.00x floor | |")
    print(f"| heatlens explain_dataset, steady state (batches 2..last) | {steady:.2f} | "
          f"{steady / floor:.2f}x floor | >= 0.85x: "
          f"{verdict(steady / floor >= 0.85) if steady == steady else 'n/a'} |")
    print(f"| heatlens explain_dataset, whole call | {whole:.2f} | {whole / floor:.2f}x floor | |")
    print(f"| pytorch-grad-cam, per-image loop | {theirs:.2f} | heatlens whole call "
          f"{whole / theirs:.2f}x it | >= 3x: {verdict(whole / theirs >= 3)} |")
    if mem is not None:
        tail = mem["tail_trough_mib"] - mem["trough_mib"][0]
        print(f"| memory: VmRSS growth (troughs) from image {mem['at_images'][0]} to "
              f"{mem['at_images'][1]}, last chunk in the loop ({mem['arch']}, 256-320 px files) "
              f"| {mem['growth_mib']:+.1f} MiB | to the end of the call ({mem['tail_images']} "
              f"images, index, summary): {tail:+.1f} MiB | < 100 MB: "
              f"{verdict(max(mem['growth_mib'], tail) * MIB < 100e6)} |")

    print("\n## CPU seconds per image (this process + its finished children)\n")
    print("| floor | heatlens | pytorch-grad-cam |")
    print("|---:|---:|---:|")
    print(f"| {cpu['floor']:.3f} | {cpu['heatlens']:.3f} | {cpu['pytorch-grad-cam']:.3f} |")

    print("\n## heatlens whole call, per round\n")
    for s in hl:
        parts = ""
        if "steady" in s:
            parts = (f": {s['before_first']:.1f} s to the first batch, {s['steady']:.1f} s for "
                     f"{s['steady_images']} more images, {s['after_last']:.1f} s after the last "
                     "(final chunk, index, summary)")
        print(f"- {s['wall']:.1f} s{parts}")
    print("\n## All rounds, images/s\n")
    for name in samples:
        print(f"- {name}: {', '.join(f'{v:.2f}' for v in rates(name))}")
    if mem is not None:
        print(f"\n## Memory ({mem['arch']} at {mem['layer']}, {mem['images']} files, "
              f"chunk_images=100, {mem['seconds']:.0f} s, {len(mem['samples'])} samples)\n")
        print(f"- VmRSS, least between two chunk files (trough): {mem['trough_mib'][0]:.0f} MiB "
              f"once {mem['at_images'][0]} images were written, {mem['trough_mib'][1]:.0f} MiB "
              f"once {mem['at_images'][1]} were (the last chunk written in the loop): growth "
              f"{mem['growth_mib']:+.1f} MiB; least-squares slope of the troughs "
              f"{mem['slope_mib_per_1000_images']:+.1f} MiB per 1,000 images")
        print(f"- VmRSS, most between two chunk files (peak): {mem['peak_mib'][0]:.0f} -> "
              f"{mem['peak_mib'][1]:.0f} MiB ({mem['peak_growth_mib']:+.1f} MiB)")
        print(f"- after the loop (all {mem['tail_images']} written; index.parquet, load_run, "
              f"summary.png): trough {mem['tail_trough_mib']:.0f} MiB "
              f"({mem['tail_trough_mib'] - mem['trough_mib'][0]:+.1f} MiB from the first)")
        print(f"- before the call {mem['rss_before_mib']:.0f} MiB, VmHWM {mem['vmhwm_mib']:.0f}"
              f" MiB, after it {mem['rss_after_mib']:.0f} MiB; DataLoader workers' VmRSS (sum, "
              f"shared pages counted in each) {mem['workers_rss_mib'][0]:.0f} -> "
              f"{mem['workers_rss_mib'][1]:.0f} MiB")
    return {"environment": environment(), "arguments": {
                k: v for k, v in vars(args).items() if k != "memory_child"},
            "images_per_second": {"floor": floor, "heatlens_steady": steady,
                                  "heatlens_whole": whole, "pytorch_grad_cam": theirs},
            "ratios": {"steady_vs_floor": steady / floor, "whole_vs_floor": whole / floor,
                       "whole_vs_pytorch_grad_cam": whole / theirs},
            "cpu_seconds_per_image": cpu, "samples": samples, "memory": mem}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--layer", default="layer4")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--memory-arch", default="mobilenet_v3_small")
    parser.add_argument("--memory-images", type=int, default=2000)
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        memory_child(args)
        return
    args.load_before = " ".join(f"{v:.1f}" for v in os.getloadavg())
    with tempfile.TemporaryDirectory(prefix="heatlens-dataset-speed-") as temporary:
        scratch = Path(temporary)
        found = speed(args, scratch)
        mem = None if args.skip_memory else memory(args, scratch)
    result = report(args, found, mem)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2, default=str))


if __name__ == "__main__":
    main()
