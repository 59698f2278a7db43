"""``heatlens.evaluate`` end to end: the robustness and sanity metrics that run a method again,
through the front door; and ``heatlens compare`` on real photos, with boxes, the HTML report,
CSV and Parquet."""

from __future__ import annotations

import csv
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from test_engine import assert_same_state, snapshot
from test_metrics_sanity import held_out, trained  # noqa: F401 (fixtures)

import heatlens
from heatlens.cli import main
from heatlens.loading.images import sample_image_path
from heatlens.metrics.evaluate import evaluate


def test_sanity_and_robustness_through_evaluate(trained, held_out):  # noqa: F811
    """Grad-CAM passes the sanity checks; the edge-map control, which ignores the model,
    fails cascading randomisation; raw maps cannot be run again and say so."""
    model = trained
    x, c, _ = held_out
    cam = heatlens.explain(model, x, "gradcam", target=c)
    before = snapshot(model)
    report = evaluate(model, x, {"gradcam": cam, "raw": cam.maps},
                      ("max_sensitivity", "infidelity", "sanity"), seed=1)
    assert_same_state(before, snapshot(model))
    cascading, random_logit = report.sanity["gradcam"]
    assert cascading.passed and random_logit.passed
    assert not report.sanity["edges"][0].passed
    assert "does not explain the model" in report.sanity["edges"][0].reason
    assert set(report.scores["max_sensitivity"]) == {"gradcam", "edges"}
    assert set(report.scores["infidelity"]) == {"gradcam", "raw", "random", "gaussian", "edges"}
    assert any("'raw'" in note and "no method to run again" in note for note in report.notes)
    assert "sanity, edges: Cascading randomisation" in report.table()


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("photos")
    (folder / "cats").mkdir()
    Image.open(sample_image_path()).save(folder / "cats" / "chelsea.png")
    Image.open(sample_image_path()).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(
        folder / "cats" / "mirrored.jpg")
    (folder / "notes.png").write_text("not an image")
    (folder / "boxes.csv").write_text("path,x1,y1,x2,y2\ncats/chelsea.png,100,20,330,250\n"
                                      "cats/mirrored.jpg,121,20,351,250\n"
                                      "notes.png,0,0,10,10\n")
    return folder


def test_compare_ranks_methods_and_writes_its_report(photos, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, [
        "compare", str(photos), "--methods", "gradcam,layercam", "--metrics",
        "deletion,insertion,pointing_game,energy", "--boxes", str(photos / "boxes.csv"),
        "--step", "0.1", "--arch", "mobilenet_v2", "--weights", _mobilenet_weights()])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert any(line.startswith("gradcam ") for line in lines)
    assert any(line.startswith("edges (control)") for line in lines)
    assert "skipped notes.png: " in result.stdout and "not an image" in result.stdout
    folder = tmp_path / "heatlens_compare"
    page = (folder / "report.html").read_text()
    assert "<table>" in page and page.count("data:image/png;base64,") == 2 + 4
    assert "cats/chelsea.png" in page and "cats/mirrored.jpg" in page
    with (folder / "scores.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 2 * 5  # 2 images x (2 methods + 3 controls)
    assert {row["image"] for row in rows} == {"cats/chelsea.png", "cats/mirrored.jpg"}
    assert float(rows[0]["pointing_game"]) in (0.0, 1.0)
    table = pq.read_table(folder / "scores.parquet")
    assert table.num_rows == 10 and "energy_inside" in table.column_names
    again = CliRunner().invoke(main, ["compare", "--methods", "gradcam", "--metrics",
                                      "deletion", "--step", "0.25"])
    assert again.exit_code == 0, again.output
    assert (tmp_path / "heatlens_compare-1" / "report.html").exists()  # never overwritten


@pytest.mark.parametrize(("args", "message"), [
    (["--metrics", "delition"], "unknown metric 'delition'. Did you mean 'deletion'"),
    (["--methods", "gradcma"], "unknown method 'gradcma'"),
    (["missing_folder"], "no image or folder at missing_folder"),
    (["--boxes", "nowhere.csv"], "no boxes file at nowhere.csv"),
])
def test_compare_refuses_bad_input_at_once(tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["compare", *args])
    assert result.exit_code == 1
    assert message in result.stderr and "model:" not in result.stdout


def _mobilenet_weights() -> str:
    from test_models import MOBILENET_WEIGHTS

    return str(MOBILENET_WEIGHTS)


def test_the_class_is_the_one_the_explanations_explained(trained, held_out):  # noqa: F811
    """Without target=, the class is the one the explanations explained."""
    model = trained
    inputs, classes, _ = held_out
    other = (classes[:2] + 1) % 4
    cam = heatlens.explain(model, inputs[:2], "gradcam", target=other)
    report = evaluate(model, inputs[:2], cam, "drop", controls=())
    assert report.classes.tolist() == other.tolist()
    assert torch.isfinite(report.scores["average_drop"]["gradcam"]).all()


@pytest.mark.filterwarnings("ignore:the map of image")  # a destroyed model may show no evidence
def test_cascading_randomisation_on_a_real_imagenet_model(mobilenet_v2_imagenet, imagenet_photos):
    """MobileNetV2 with its ImageNet weights, on two photos: with every layer re-initialised
    (in five blocks, top first), Grad-CAM's rank correlation with its original map falls below
    the threshold, while the edge-map control, which ignores the model, stays at 1 at every
    step."""
    from heatlens.metrics.controls import edge_map
    from heatlens.metrics.sanity import cascading_randomisation

    x = imagenet_photos[:2]
    classes = heatlens.explain(mobilenet_v2_imagenet, x, "gradcam").targets
    blocks = ["classifier", "features.18", "features.14", "features.7", "features"]
    before = snapshot(mobilenet_v2_imagenet)
    cam = cascading_randomisation(
        mobilenet_v2_imagenet, x,
        lambda model, inputs, c: heatlens.explain(model, inputs, "gradcam", target=c,
                                                  layer="features.18").maps, classes,
        layers=blocks)
    edges = cascading_randomisation(mobilenet_v2_imagenet, x,
                                    lambda model, inputs, c: edge_map(inputs), classes,
                                    layers=blocks)
    assert_same_state(before, snapshot(mobilenet_v2_imagenet))
    assert cam.passed and not edges.passed
    assert len(cam.steps) == len(blocks)
    assert float(cam.steps[-1].spearman.mean()) < 0.5
    assert all(float(step.spearman.mean()) > 0.999 for step in edges.steps)
