"""50 explain requests at once against one live server: each answer is its own request's map,
equal to the map computed alone, and the server's memory comes back to where it started."""

from __future__ import annotations

import base64
import gc
import io
import itertools
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import requests
from PIL import Image
from skimage import data

import heatlens

METHODS = ("gradcam", "gradcam++", "xgradcam", "layercam", "saliency")


def resident_bytes() -> int:
    """This process's resident memory (the server runs in it, in a thread)."""
    with open("/proc/self/status", encoding="ascii") as status:
        line = next(line for line in status if line.startswith("VmRSS:"))
    return int(line.split()[1]) * 1024


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def test_fifty_concurrent_requests_each_get_their_own_serial_result(app_server, app_workbench):
    """Two photos x five methods x five classes, all sent at once: every answer names its own
    request and holds the map `heatlens.explain` gives for it alone; afterwards the server's
    memory is within 100 MB of where it was before the burst."""
    photos = {name: png(getattr(data, name)()) for name in ("astronaut", "rocket")}
    uploads = {name: requests.post(f"{app_server}/api/images", data=body, timeout=60).json()
               for name, body in photos.items()}
    model = app_workbench.loaded.model
    asks, expected = [], []
    for (name, upload), method, rank in itertools.product(uploads.items(), METHODS, range(5)):
        cls = upload["top"][rank]["class"]
        asks.append({"image": upload["image"], "method": method, "target": cls})
        batch, _ = app_workbench.loaded.preset(heatlens.load_image(photos[name]))
        expected.append(heatlens.explain(model, batch, method=method, target=cls).maps[0])
    assert len(asks) == 50
    gc.collect()
    before = resident_bytes()

    def ask(body: dict) -> dict:
        answer = requests.post(f"{app_server}/api/explain", json=body, timeout=300)
        answer.raise_for_status()
        return answer.json()

    with ThreadPoolExecutor(max_workers=50) as pool:
        answers = list(pool.map(ask, asks))
    for body, answer, alone in zip(asks, answers, expected, strict=True):
        assert (answer["image"], answer["method"], answer["class"]) == (
            body["image"], body["method"], body["target"])
        values = np.frombuffer(base64.b64decode(answer["map"]), dtype="<f4").reshape(224, 224)
        np.testing.assert_allclose(values, alone.numpy(), atol=1e-5)
    del answers
    gc.collect()
    grown = resident_bytes() - before
    assert grown < 100 << 20, f"the server kept {grown / 2**20:.0f} MB after the burst"
