"""The web app's JSON API without a browser (FastAPI's TestClient): what each answer holds,
checked against heatlens computed here; the upload limits and errors; jobs with progress and
cancelling; browsing a data-set run without leaving its folder.

The default model (EfficientNet-Lite0, ImageNet) and real photos (scikit-image)."""

from __future__ import annotations

import base64
import io
import pickle
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image
from skimage import data

import heatlens
from heatlens.app.runs import RunShelf
from heatlens.app.server import create_app
from heatlens.app.workbench import FAMILIES, TRUST_STEP
from heatlens.engine.layers import auto_layer
from heatlens.metrics.faithfulness import heatlens_protocol


@pytest.fixture(scope="module")
def client(app_workbench, app_run_folder):
    with TestClient(create_app(app_workbench, RunShelf(app_run_folder))) as client:
        yield client


def jpeg(array: np.ndarray, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def coffee(client):
    """scikit-image's coffee photo, uploaded: (the upload's answer, the file's bytes)."""
    body = jpeg(data.coffee())
    answer = client.post("/api/images?name=coffee.jpg", content=body)
    assert answer.status_code == 201, answer.text
    return answer.json(), body


def values(answer: dict) -> np.ndarray:
    flat = np.frombuffer(base64.b64decode(answer["map"]), dtype="<f4")
    return flat.reshape(answer["height"], answer["width"])


def model_input(app_workbench, body: bytes) -> torch.Tensor:
    batch, _ = app_workbench.loaded.preset(heatlens.load_image(body))
    return batch


def test_info_lists_every_method_by_family_and_the_automatic_layer(client, app_workbench):
    """Every registered method is offered, in one of the families, with its summary; the layer
    list marks the choice `heatlens layers` makes, with its reason."""
    info = client.get("/api/info").json()
    offered = {m["name"]: m for m in info["methods"]}
    assert set(offered) == set(heatlens.list_methods())
    assert all(m["family"] in FAMILIES and m["summary"] for m in offered.values())
    assert offered["gradcam"]["family"] == "gradient CAMs" and offered["gradcam"]["layer"]
    assert offered["scorecam"]["family"] == "perturbation CAMs" and offered["scorecam"]["slow"]
    assert offered["saliency"]["family"] == "pixel attributions" and not offered["saliency"][
        "layer"]
    assert offered["layer_conductance"]["family"] == "layer attributions"
    assert offered["layer_conductance"]["layer"] and offered["finercam"]["layer"]
    assert offered["sobelcam"]["family"] == "controls"
    assert offered["attention_rollout"]["family"] == "transformer methods"
    assert set(info["default_methods"]) <= set(offered)
    probe = torch.zeros(1, 3, 224, 224)
    assert info["layers"]["auto"] == auto_layer(app_workbench.loaded.model, probe)[0]
    assert info["layers"]["auto"] in [c["name"] for c in info["layers"]["candidates"]]
    assert np.array_equal(info["colormaps"]["jet"][0], [0, 0, 127])  # matplotlib's jet(0)
    assert client.get("/").text.startswith("<!doctype html>")
    assert "/api/explain" in client.get("/openapi.json").json()["paths"]


def test_an_upload_answers_its_top_five_as_the_model_gives_them(coffee, app_workbench):
    """The top-5 classes and probabilities are the model's softmax on the preset's input."""
    upload, body = coffee
    with torch.inference_mode():
        probabilities = app_workbench.loaded.model(model_input(app_workbench, body)).softmax(1)[0]
    top = probabilities.topk(5)
    assert [c["class"] for c in upload["top"]] == top.indices.tolist()
    np.testing.assert_allclose([c["probability"] for c in upload["top"]], top.values.numpy(),
                               rtol=1e-5)
    labels = app_workbench.loaded.labels
    assert [c["name"] for c in upload["top"]] == [labels[i] for i in top.indices.tolist()]
    assert upload["predicted"] == upload["top"][0]["class"]
    assert (upload["width"], upload["height"]) == (600, 400)
    shown = Image.open(io.BytesIO(base64.b64decode(upload["shown"].split(",", 1)[1])))
    assert shown.size == (224, 224)


@pytest.mark.parametrize(("method", "rank", "layer"), [
    ("gradcam", 0, "auto"), ("gradcam++", 2, "auto"), ("layercam", 1, "_blocks.10"),
    ("saliency", 3, "auto"), ("layer_gradient_x_activation", 0, "_blocks.12"),
    ("finercam", 1, "_blocks.14"),
])
def test_a_map_is_what_heatlens_explain_gives(client, coffee, app_workbench, method, rank,
                                              layer):
    """The map sent is `heatlens.explain(...).maps[0]` for that method, class and layer."""
    upload, body = coffee
    cls = upload["top"][rank]["class"]
    answer = client.post("/api/explain", json={"image": upload["image"], "method": method,
                                               "target": cls, "layer": layer})
    assert answer.status_code == 200, answer.text
    answer = answer.json()
    expected = heatlens.explain(app_workbench.loaded.model, model_input(app_workbench, body),
                                method=method, target=cls, layer=layer)
    np.testing.assert_allclose(values(answer), expected.maps[0].numpy(), atol=1e-5)
    assert answer["class"] == cls and answer["method"] == method
    assert answer["title"] == expected.title(0, app_workbench.loaded.labels)
    assert answer["probability"] == pytest.approx(float(expected.probabilities[0]), rel=1e-5)
    if layer != "auto":
        assert answer["layer"] == layer


def test_the_scores_are_heatlens_evaluate_at_the_pages_step(client, coffee, app_workbench):
    """Deletion and insertion of the map and of the random control are what
    `heatlens.evaluate` gives at 5 % a step; deletion is better low, insertion high."""
    upload, body = coffee
    request = {"image": upload["image"], "method": "gradcam"}
    trust = client.post("/api/trust", json=request).json()
    batch = model_input(app_workbench, body)
    maps = torch.from_numpy(values(client.post("/api/explain", json=request).json()).copy())
    report = heatlens.evaluate(app_workbench.loaded.model, batch, {"gradcam": maps[None]},
                               metrics=("deletion", "insertion"), target=upload["predicted"],
                               protocol=heatlens_protocol(TRUST_STEP), controls=("random",))
    for metric in ("deletion", "insertion"):
        assert trust["scores"][metric] == pytest.approx(
            float(report.scores[metric]["gradcam"][0]), abs=1e-6)
        assert trust["random"][metric] == pytest.approx(
            float(report.scores[metric]["random"][0]), abs=1e-6)
    assert trust["better_than_random"]["insertion"] == (
        trust["scores"]["insertion"] > trust["random"]["insertion"])
    assert "5% of the pixels" in trust["protocol"]


def big_png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (width, height), 128).save(buffer, format="PNG")
    return buffer.getvalue()


class Payload:
    """Unpickling this runs code: it would create a file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_bad_uploads_get_a_4xx_json_error_naming_the_problem(client, app_workbench, tmp_path,
                                                             monkeypatch):
    """Not an image, a pickle, truncated, empty, a form, over the pixel or the byte limit:
    each a 4xx with a message that names it; a pickle is never unpickled."""
    marker = tmp_path / "unpickled"
    photo = jpeg(data.astronaut())
    cases = {
        "text": (b"hello, I am not an image", 415, "not an image"),
        "pickle": (pickle.dumps(Payload(marker)), 415, "not an image"),
        "truncated": (photo[: len(photo) // 2], 415, "damaged or truncated"),
        "empty": (b"", 422, "empty"),
        "huge": (big_png(8000, 6000), 413, "48,000,000 pixels"),
    }
    for name, (body, status, words) in cases.items():
        answer = client.post("/api/images", content=body)
        assert answer.status_code == status, (name, answer.text)
        assert words in answer.json()["error"], (name, answer.json())
    assert not marker.exists()
    form = client.post("/api/images", files={"file": ("cat.jpg", photo, "image/jpeg")})
    assert form.status_code == 415 and "--data-binary" in form.json()["error"]
    monkeypatch.setattr(app_workbench, "max_bytes", 1000)
    over = client.post("/api/images", content=photo)
    assert over.status_code == 413 and "limit of 1,000" in over.json()["error"]


def test_wrong_requests_name_what_is_wrong(client, coffee):
    """Unknown image, method, class, layer or job: 404 or 422, with the fix in the message."""
    image = coffee[0]["image"]
    asks = [
        ({"image": "nope", "method": "gradcam"}, 404, "upload it again"),
        ({"image": image, "method": "gradcamm"}, 422, "Did you mean 'gradcam'"),
        ({"image": image, "method": "gradcam", "target": 1000}, 422, "out of range"),
        ({"image": image, "method": "gradcam", "layer": "fc9"}, 422, "no layer 'fc9'"),
        ({"image": image, "method": "attention_rollout"}, 422, "vision transformer"),
        ({"image": image, "method": "gradcam", "target": "tabby"}, 422, "target"),
    ]
    for body, status, words in asks:
        answer = client.post("/api/explain", json=body)
        assert answer.status_code == status, (body, answer.text)
        assert words in answer.json()["error"], (body, answer.json())
    assert client.get("/api/jobs/unknown").status_code == 404


def no_hooks(model: torch.nn.Module) -> bool:
    return all(not (m._forward_hooks or m._forward_pre_hooks or m._backward_hooks)
               for m in model.modules())


def test_a_long_job_reports_progress_and_stops_when_cancelled(client, coffee, app_workbench):
    """Score-CAM's job counts its steps; cancelled, it stops at the next step, leaves no hook
    on the model, and a queued job cancelled with it never starts; the next job runs."""
    image = coffee[0]["image"]
    running = client.post("/api/jobs", json={"image": image, "method": "scorecam",
                                             "target": coffee[0]["top"][4]["class"]}).json()
    queued = client.post("/api/jobs", json={"image": image, "method": "ablationcam"}).json()
    status = running
    while status["done"] < 10:
        status = client.get(f"/api/jobs/{running['job']}?wait=0.2").json()
        assert status["state"] in ("queued", "running")
    assert status["total"] > status["done"] and status["stage"] == "scorecam"
    waiting = client.get(f"/api/jobs/{queued['job']}").json()
    assert waiting["state"] == "queued" and waiting["position"] == 1
    client.delete(f"/api/jobs/{queued['job']}")
    client.delete(f"/api/jobs/{running['job']}")
    status = client.get(f"/api/jobs/{running['job']}?wait=5").json()
    assert status["state"] == "cancelled" and status["done"] < status["total"]
    assert client.get(f"/api/jobs/{queued['job']}").json()["state"] == "cancelled"
    assert client.get(f"/api/jobs/{queued['job']}").json()["done"] == 0
    assert no_hooks(app_workbench.loaded.model)
    after = client.post("/api/jobs", json={"image": image, "method": "xgradcam", "wait": 10})
    assert after.json()["state"] == "done" and after.json()["result"]["method"] == "xgradcam"


# ------------------------------------------------------------------------------------------------
# Browsing a data-set run
# ------------------------------------------------------------------------------------------------


def test_runs_are_listed_filtered_and_sorted(client, app_run_folder):
    """The run's rows, filtered by true class, by right or wrong and by method, sorted by
    deletion: the same rows as the run's index says."""
    listed = client.get("/api/runs").json()
    assert [r["run"] for r in listed] == ["photos"]
    assert listed[0]["images"] == 6 and listed[0]["rows"] == 12
    assert listed[0]["metrics"] == ["deletion"]
    index = heatlens.load_run(app_run_folder / "photos").index.to_pylist()
    page = client.get("/api/runs/photos/rows", params={
        "label": "Egyptian cat", "method": "gradcam"}).json()
    assert page["total"] == 2
    assert {index[r["row"]]["path"] for r in page["rows"]} == {
        "Egyptian cat/chelsea0.png", "Egyptian cat/chelsea1.png"}
    wrong = client.get("/api/runs/photos/rows", params={"correct": False}).json()
    assert wrong["total"] == sum(1 for row in index if row["correct"] is False)
    assert all(index[r["row"]]["correct"] is False for r in wrong["rows"])
    ranked = client.get("/api/runs/photos/rows", params={
        "sort": "deletion", "descending": True, "limit": 5, "offset": 2}).json()
    everything = sorted((row["deletion"] for row in index), reverse=True)
    assert [r["deletion"] for r in ranked["rows"]] == pytest.approx(everything[2:7])
    assert client.get("/api/runs/photos/rows", params={"sort": "path"}).status_code == 422


def test_a_row_opens_with_its_map_and_image(client, app_run_folder):
    """A row opens with its image's maps, one per method of the run (its own first), each the
    stored map scaled and upsampled as Explanation.maps are; its image is the file as the model
    saw it."""
    run = heatlens.load_run(app_run_folder / "photos")
    number = next(i for i, row in enumerate(run.index.to_pylist())
                  if row["method"] == "gradcam" and row["path"] == "espresso/coffee0.png")
    entry = client.get(f"/api/runs/photos/rows/{number}").json()
    index = run.index.to_pylist()
    assert [m["method"] for m in entry["maps"]] == ["gradcam", "saliency"]
    for shown in entry["maps"]:
        assert index[shown["row"]]["path"] == "espresso/coffee0.png"
        heat = torch.from_numpy(run.map(shown["row"])).clamp_min(0)[None, None]
        up = torch.nn.functional.interpolate(heat, size=(64, 64), mode="bilinear")[0, 0]
        expected = (up - up.min()) / (up.max() - up.min())
        np.testing.assert_allclose(values({**shown, "height": 64, "width": 64}),
                                   expected.numpy(), atol=1e-6)
    assert entry["fields"]["path"] == "espresso/coffee0.png" and entry["note"] == ""
    preset = heatlens.Preset(resize=64, crop=64, mean=(0.485, 0.456, 0.406),
                             std=(0.229, 0.224, 0.225))
    shown = Image.open(io.BytesIO(base64.b64decode(entry["shown"].split(",", 1)[1])))
    photo = heatlens.load_image(Path(run.settings["source"]) / "espresso" / "coffee0.png")
    assert np.array_equal(np.asarray(shown), np.asarray(preset.display(photo)))


def test_nothing_outside_the_run_or_its_source_is_served(client, app_run_folder, tmp_path,
                                                         app_workbench):
    """Run names and rows are looked up, never joined as paths; an index that points outside
    the run (a map) or the source (an image) is refused, and a changed image is not shown."""
    for path in ("/api/runs/..%2F..%2Fetc/rows", "/api/runs/../rows/0",
                 "/api/runs/photos/rows/999", "/api/runs/%2Fetc%2Fpasswd/rows/0"):
        assert client.get(path).status_code == 404, path
    copied = tmp_path / "runs" / "copied"
    shutil.copytree(app_run_folder / "photos", copied)
    parts = sorted((copied / "parts").glob("rows-*.parquet"))
    table = pq.read_table(parts[0])
    rows = table.to_pylist()
    rows[0]["map_file"] = "../../../../etc/passwd"
    rows[1]["path"] = "../../../../etc/hostname"
    rows[2]["sha256"] = "0" * 64
    pq.write_table(type(table).from_pylist(rows, schema=table.schema), parts[0])
    (copied / "index.parquet").unlink(missing_ok=True)
    index = heatlens.load_run(copied).index.to_pylist()
    number = {key: next(i for i, row in enumerate(index) if row[key] == rows[k][key])
              for k, key in enumerate(("map_file", "path", "sha256"))}
    with TestClient(create_app(app_workbench, RunShelf(tmp_path / "runs"))) as other:
        map_out = other.get(f"/api/runs/copied/rows/{number['map_file']}")
        image_out = other.get(f"/api/runs/copied/rows/{number['path']}")
        changed = other.get(f"/api/runs/copied/rows/{number['sha256']}").json()
    assert map_out.status_code == 403 and "outside the run folder" in map_out.json()["error"]
    assert image_out.status_code == 403 and "outside the source" in image_out.json()["error"]
    assert changed["shown"] is None and "has changed since the run" in changed["note"]
    with pytest.raises(FileNotFoundError, match="no data-set run"):
        RunShelf(tmp_path / "nothing")


def test_the_serve_command_listens_on_loopback_and_names_bad_options_first(tmp_path):
    """`heatlens serve --port 0` prints its loopback address and answers there; a --runs folder
    without a run is a one-line error before the model loads."""
    import subprocess
    import sys

    import requests

    command = [sys.executable, "-c", "from heatlens.cli import main; main()", "serve"]
    refused = subprocess.run([*command, "--runs", str(tmp_path)], capture_output=True,
                             text=True, timeout=60)
    assert refused.returncode == 1
    assert refused.stderr.startswith("Error: no data-set run in") and "Traceback" not in (
        refused.stderr)
    server = subprocess.Popen([*command, "--port", "0"], stdout=subprocess.PIPE, text=True)
    try:
        line = next(line for line in server.stdout if "serving" in line)
        url = line.split(" on ")[1].split()[0]
        assert url.startswith("http://127.0.0.1:")
        info = requests.get(f"{url}api/info", timeout=30).json()
        assert info["model"].startswith("efficientnet_lite0") and info["runs"] is False
    finally:
        server.terminate()
        server.wait(30)


def test_only_loopback_names_are_answered_when_the_app_serves_loopback(app_workbench):
    """A request whose Host header names another site (a DNS-rebinding page) is refused."""
    from heatlens.app.server import LOOPBACK_NAMES

    with TestClient(create_app(app_workbench, hosts=LOOPBACK_NAMES),
                    base_url="http://127.0.0.1:8000") as local:
        assert local.get("/api/info").status_code == 200
        assert local.get("/api/info", headers={"host": "evil.example:8000"}).status_code == 400
        assert local.get("/api/info", headers={"host": "localhost:8000"}).status_code == 200
