"""Start-up times: each command in a fresh Python process, several runs, the median reported.

    python benchmarks/startup.py [--repeats 7]

Measures ``import torch`` (the floor every PyTorch tool pays), ``import heatlens``, what the first
``heatlens.explain`` look-up costs, the ``heatlens --help`` and ``heatlens methods`` commands,
and, beside them, the imports of the anchor libraries (pytorch-grad-cam, torch-cam, Captum)
where they are installed. Times are wall-clock seconds of the whole process, interpreter
start-up included; the first run of each is a warm-up and is not counted.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import time

CASES = {
    "python (empty)": "pass",
    "import torch": "import torch",
    "import heatlens": "import heatlens",
    "heatlens.explain (first use)": "import heatlens; heatlens.explain",
    "heatlens --help": "from heatlens.cli import main; main(['--help'])",
    "heatlens methods": "from heatlens.cli import main; main(['methods'])",
}
ANCHORS = {
    "import pytorch_grad_cam": "pytorch_grad_cam",
    "import torchcam": "torchcam",
    "import captum.attr": "captum",
}


def timed(code: str, repeats: int) -> list[float]:
    """Wall-clock seconds of ``python -c code`` in fresh processes, after one warm-up."""
    times = []
    for run in range(repeats + 1):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], check=False, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
        if run:
            times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    cases = dict(CASES)
    for label, module in ANCHORS.items():
        if importlib.util.find_spec(module) is not None:
            cases[label] = label
    results = {label: timed(code, args.repeats) for label, code in cases.items()}
    torch_median = statistics.median(results["import torch"])
    print(f"{'case':<30} {'median s':>9} {'min s':>7} {'vs import torch':>16}")
    for label, times in results.items():
        median = statistics.median(times)
        print(f"{label:<30} {median:>9.3f} {min(times):>7.3f} {median - torch_median:>+15.3f}s")


if __name__ == "__main__":
    main()
