"""How fast the web app answers, as a user meets it: ``heatlens serve`` started as a command
(the default model, EfficientNet-Lite0, loaded once), then in Debian's Chromium, the time from
choosing a photo to its first Grad-CAM panel drawn on the page; over HTTP alone, the upload
and the map; and the server's memory around 50 concurrent requests.

    python benchmarks/app_speed.py [--rounds 7] [--chromium /usr/bin/chromium]

Needs ``heatlens[app]``, playwright and Chromium (``apt-get install chromium``).
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests
from PIL import Image
from playwright.sync_api import sync_playwright
from skimage import data

FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]
PHOTOS = ("coffee", "astronaut", "rocket", "chelsea", "camera", "cat", "immunohistochemistry")


def started_server() -> tuple[subprocess.Popen, str, float]:
    began = time.perf_counter()
    command = "from heatlens.cli import main; main()"
    server = subprocess.Popen([sys.executable, "-c", command, "serve", "--port", "0"],
                              stdout=subprocess.PIPE, text=True)
    for line in server.stdout:
        found = re.search(r"http://\S+/", line)
        if found:
            return server, found.group(0).rstrip("/"), time.perf_counter() - began
    raise RuntimeError("heatlens serve did not start")


def rss_mb(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+)", status).group(1)) / 1024


def photo(name: str, folder: Path) -> Path:
    path = folder / f"{name}.jpg"
    Image.fromarray(getattr(data, name)()).convert("RGB").save(path, quality=92)
    return path


def in_the_browser(url: str, chromium: str, paths: list[Path]) -> list[float]:
    """Seconds from choosing each file to its Grad-CAM panel drawn."""
    seconds = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=FLAGS)
        page = browser.new_page()
        page.goto(url)
        page.wait_for_selector("body[data-ready=yes]")
        for box in page.locator("#methods input[type=checkbox]").all():
            box.set_checked(box.get_attribute("value") == "gradcam")
        page.locator("#trust").set_checked(False)
        for path in paths:
            panel = '.panel[data-method="gradcam"]'
            before = page.evaluate(f"() => document.querySelector('{panel}')?.dataset.drawn")
            began = time.perf_counter()
            page.set_input_files("#file", str(path))
            page.wait_for_function(f"""(before) => {{
                const panel = document.querySelector('{panel}');
                return panel && panel.dataset.drawn && panel.dataset.drawn !== before;
            }}""", arg=before)
            seconds.append(time.perf_counter() - began)
        browser.close()
    return seconds


def over_http(url: str, paths: list[Path]) -> tuple[list[float], list[float]]:
    uploads, maps = [], []
    for path in paths:
        began = time.perf_counter()
        image = requests.post(f"{url}/api/images", data=path.read_bytes(), timeout=60).json()
        middle = time.perf_counter()
        requests.post(f"{url}/api/explain", json={"image": image["image"]}, timeout=60)
        uploads.append(middle - began)
        maps.append(time.perf_counter() - middle)
    return uploads, maps


def burst(url: str, server: subprocess.Popen, paths: list[Path]) -> tuple[float, float, float]:
    images = [requests.post(f"{url}/api/images", data=p.read_bytes(), timeout=60).json()
              for p in paths[:2]]
    asks = [{"image": image["image"], "method": method, "target": entry["class"]}
            for image in images for method in ("gradcam", "gradcam++", "xgradcam", "layercam",
                                               "saliency") for entry in image["top"]]
    before = rss_mb(server.pid)
    began = time.perf_counter()
    with ThreadPoolExecutor(50) as pool:
        list(pool.map(lambda body: requests.post(f"{url}/api/explain", json=body,
                                                  timeout=300).raise_for_status(), asks))
    return time.perf_counter() - began, before, rss_mb(server.pid)


def show(name: str, values: list[float]) -> None:
    print(f"{name:<44} median {statistics.median(values):6.3f} s   min {min(values):6.3f}   "
          f"max {max(values):6.3f}   ({len(values)} runs)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    arguments = parser.parse_args()
    server, url, start = started_server()
    try:
        with tempfile.TemporaryDirectory() as folder:
            paths = [photo(PHOTOS[i % len(PHOTOS)], Path(folder)) for i in range(arguments.rounds)]
            print(f"heatlens serve answered after {start:.1f} s (model loaded and warmed once)")
            show("browser: file chosen -> Grad-CAM panel drawn",
                 in_the_browser(url, arguments.chromium, paths))
            uploads, maps = over_http(url, paths)
            show("HTTP: upload (decode, top-5)", uploads)
            show("HTTP: Grad-CAM map", maps)
            seconds, before, after = burst(url, server, paths)
            print(f"50 concurrent explain requests: {seconds:.1f} s; server memory "
                  f"{before:.0f} MB before, {after:.0f} MB after ({after - before:+.0f} MB)")
    finally:
        server.terminate()
        server.wait(10)


if __name__ == "__main__":
    main()
