"""The ``heatlens`` command: real models, real photos, files written, and one-line errors."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from click.testing import CliRunner, Result
from PIL import Image
from test_models import CAT_CLASSES, MOBILENET_WEIGHTS, CatDogFiles, save_catdog

from heatlens.cli import main
from heatlens.loading.images import sample_image_path
from heatlens.methods import list_methods, method_class

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def catdog(tmp_path_factory: pytest.TempPathFactory) -> CatDogFiles:
    return save_catdog(tmp_path_factory.mktemp("catdog"))


@pytest.fixture
def run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Run ``heatlens ARGS`` in-process from an empty working directory."""
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()

    def invoke(*args: str) -> Result:
        return runner.invoke(main, [str(a) for a in args])

    return invoke


def panel_lines(result: Result) -> list[str]:
    """The per-panel lines: ``<image>: <method> | <label> | <probability> (layer <name>)``."""
    return [line for line in result.stdout.splitlines() if "(layer " in line]


def written(result: Result) -> Path:
    (line,) = [line for line in result.stdout.splitlines() if line.startswith("wrote ")]
    return Path(line.removeprefix("wrote "))


def assert_png(path: Path, min_side: int = 200) -> Image.Image:
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    with Image.open(path) as image:
        image.load()
    assert min(image.size) >= min_side
    return image


def assert_clean_error(result: Result, message: str) -> None:
    """Exit code != 0 from click itself (not an escaped exception), one line, no traceback."""
    assert result.exit_code != 0
    assert isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    assert message in lines[0]


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_entry_point_explains_the_sample_offline_and_never_overwrites(tmp_path, run):
    script = shutil.which("heatlens", path=str(Path(sys.executable).parent))
    assert script, "pip install -e . to create the heatlens script"
    first = subprocess.run([script, "explain"], cwd=tmp_path, capture_output=True, text=True,
                           timeout=120, check=False)
    assert first.returncode == 0, first.stderr
    assert "Traceback" not in first.stderr
    (panel,) = [line for line in first.stdout.splitlines() if "(layer " in line]
    head, _, layer = panel.partition(" (layer ")
    image, _, title = head.partition(": ")
    method, label, probability = title.split(" | ")
    assert (image, method) == ("chelsea.jpg", "gradcam")
    assert label in CAT_CLASSES
    assert 0.2 < float(probability) <= 1
    assert layer.endswith(")") and " " not in layer  # the layer the engine chose
    assert "wrote heatlens_chelsea_gradcam.png" in first.stdout
    path = tmp_path / "heatlens_chelsea_gradcam.png"
    assert_png(path)
    before = digest(path)

    second = run("explain")
    assert second.exit_code == 0, second.output
    assert written(second) == Path("heatlens_chelsea_gradcam-1.png")
    assert_png(tmp_path / "heatlens_chelsea_gradcam-1.png")
    assert digest(path) == before


def test_explicit_out_is_overwritten(tmp_path, run):
    out = tmp_path / "figures" / "why.png"
    out.parent.mkdir()
    out.write_bytes(b"old")
    result = run("explain", "--arch", "mobilenet_v2", "--weights", MOBILENET_WEIGHTS,
                 "--out", out)
    assert result.exit_code == 0, result.output
    assert written(result) == out
    assert_png(out)
    (panel,) = panel_lines(result)
    assert "gradcam | Egyptian cat | 0." in panel


def test_grid_of_methods_and_top_classes(tmp_path, run):
    result = run("explain", "--arch", "mobilenet_v2", "--weights", MOBILENET_WEIGHTS,
                 "--method", "gradcam,layer-cam,gradcam", "--top-k", "2", "--rows", "2",
                 "--layer", "features.18",
                 "--cmap", "viridis", "--alpha", "0.3")
    assert result.exit_code == 0, result.output
    lines = panel_lines(result)
    assert [line.split(" | ")[0] for line in lines] == ["chelsea.jpg: gradcam"] * 2 + [
        "chelsea.jpg: layercam"] * 2
    assert "Egyptian cat" in lines[0] and "Egyptian cat" not in lines[1]
    assert lines[1].split(" | ")[1] == lines[3].split(" | ")[1]
    assert written(result) == Path("heatlens_chelsea.png")
    grid = assert_png(tmp_path / "heatlens_chelsea.png")
    assert grid.width < 1.5 * grid.height  # 2 x 2 panels


def test_several_images_with_a_chosen_class(tmp_path, run):
    copy = tmp_path / "copy.png"
    Image.open(sample_image_path()).rotate(180).save(copy)
    result = run("explain", sample_image_path(), copy, "--arch", "resnet18", "--layer", "layer4",
                 "--class-idx", "281")
    assert result.exit_code == 0, result.output
    lines = panel_lines(result)
    assert [line.split(":")[0] for line in lines] == ["chelsea.jpg", "copy.png"]
    assert all(" | tabby | " in line for line in lines)
    assert written(result) == Path("heatlens_chelsea_and_1_more_gradcam.png")
    grid = assert_png(tmp_path / written(result))
    assert grid.width > 1.5 * grid.height  # 1 x 2 panels


def test_fine_tuned_cat_dog_state_dict(tmp_path, run, catdog: CatDogFiles):
    before = digest(catdog.state_dict)
    result = run("explain", "--model", catdog.state_dict, "--arch", "resnet18",
                 "--num-classes", "2", "--labels", catdog.labels, "--top-k", "2",
                 "--layer", "layer4", "--out", tmp_path / "catdog.png")
    assert result.exit_code == 0, result.output
    labels = [line.split(" | ")[1] for line in panel_lines(result)]
    assert sorted(labels) == ["cat", "dog"]
    assert all(line.endswith("(layer layer4)") for line in panel_lines(result))
    assert digest(catdog.state_dict) == before


def test_pickled_model_needs_trust_pickle(tmp_path, run, catdog: CatDogFiles):
    before = digest(catdog.pickled)
    refused = run("explain", "--model", catdog.pickled)
    assert_clean_error(refused, "--trust-pickle")
    assert "arbitrary code" in refused.stderr
    accepted = run("explain", "--model", catdog.pickled, "--trust-pickle", "--labels",
                   catdog.labels)
    assert accepted.exit_code == 0, accepted.output
    assert written(accepted) == Path("heatlens_chelsea_gradcam.png")
    assert digest(catdog.pickled) == before


def test_show_opens_a_window(run, monkeypatch):
    shown = []
    monkeypatch.setattr(plt, "show", lambda: shown.append(plt.gcf().get_size_inches()))
    result = run("explain", "--arch", "resnet18", "--layer", "layer4", "--show")
    plt.close("all")
    assert result.exit_code == 0, result.output
    assert len(shown) == 1



# Signed pictures of attribution methods (heatlens.pictures.attribution).


@pytest.fixture
def grid_panels(monkeypatch: pytest.MonkeyPatch) -> dict:
    """Records the panels (as int arrays), titles and figure that ``heatlens explain`` lays out."""
    import heatlens.pictures.overlays

    recorded: dict = {}
    real = heatlens.pictures.overlays.figure_grid

    def recording(panels, titles, **kwargs):
        recorded["panels"] = [np.asarray(panel, dtype=np.int64) for panel in panels]
        recorded["titles"] = list(titles)
        recorded["figure"] = real(panels, titles, **kwargs)
        return recorded["figure"]

    monkeypatch.setattr(heatlens.pictures.overlays, "figure_grid", recording)
    return recorded


def grey_fraction(panel: np.ndarray) -> float:
    """The fraction of pixels without colour (channels within 12 levels of each other)."""
    return float(((panel.max(axis=2) - panel.min(axis=2)) < 12).mean())


def green_pixels(panel: np.ndarray) -> int:
    return int(((panel[..., 1] - panel[..., 0] > 40) & (panel[..., 1] - panel[..., 2] > 20)).sum())


def red_pixels(panel: np.ndarray) -> int:
    return int(((panel[..., 0] - panel[..., 1] > 40) & (panel[..., 0] - panel[..., 2] > 40)).sum())


def test_attribution_methods_get_signed_pictures_in_one_grid(tmp_path, run, grid_panels):
    result = run("explain", "--arch", "mobilenet_v2", "--weights", MOBILENET_WEIGHTS,
                 "--method", "saliency,guided_backprop,gradcam")
    assert result.exit_code == 0, result.output
    assert [line.split(" | ")[0] for line in panel_lines(result)] == [
        "chelsea.jpg: saliency", "chelsea.jpg: guided_backprop", "chelsea.jpg: gradcam"]
    assert all(" | Egyptian cat | 0." in title for title in grid_panels["titles"])
    assert written(result) == Path("heatlens_chelsea.png")
    grid = assert_png(tmp_path / "heatlens_chelsea.png")
    assert grid.width > 2.5 * grid.height  # one grid, 1 x 3 panels
    saliency, guided, gradcam = grid_panels["panels"]
    for signed in (saliency, guided):  # green and red specks over the photo in grey
        assert signed.shape == (224, 224, 3)
        assert grey_fraction(signed) > 0.5
        assert green_pixels(signed) > 50 and red_pixels(signed) > 50
    assert grey_fraction(gradcam) < 0.2  # the jet overlay, as before
    assert grid_panels["figure"].get_supxlabel().startswith("red: negative, white: zero")


def test_sign_and_visual_options(run, grid_panels):
    result = run("explain", "--arch", "mobilenet_v2", "--weights", MOBILENET_WEIGHTS,
                 "--method", "saliency,gradcam", "--visual", "heat_map", "--sign", "positive",
                 "--out", "positive.png")
    assert result.exit_code == 0, result.output
    for panel in grid_panels["panels"]:  # Greens heat maps, no photo: CAMs too, with --visual
        assert (panel[..., 1] >= panel[..., 0]).all() and (panel[..., 1] >= panel[..., 2]).all()
    saliency = grid_panels["panels"][0]
    assert (saliency == (247, 252, 245)).all(axis=2).mean() > 0.3  # Greens' 0: the negatives
    assert grid_panels["figure"].get_supxlabel() == "green: positive attribution"

    masked = run("explain", "--arch", "mobilenet_v2", "--weights", MOBILENET_WEIGHTS,
                 "--method", "saliency", "--visual", "masked_image", "--out", "masked.png")
    assert masked.exit_code == 0, masked.output  # --sign auto: absolute_value
    (panel,) = grid_panels["panels"]
    assert (panel.max(axis=2) < 30).mean() > 0.5  # mostly masked out, dark


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--visual", "masked_image", "--sign", "all"], "--visual masked_image cannot show both"),
        (["--visual", "alpha_scaling", "--sign", "all"], "--visual alpha_scaling cannot show"),
        (["--sign", "both"], "'both' is not one of"),
        (["--visual", "original_image"], "'original_image' is not one of"),
    ],
)
def test_bad_sign_or_visual_is_a_usage_error(run, args, message):
    result = run("explain", "--method", "saliency", *args)
    assert result.exit_code == 2
    assert message in result.stderr

def test_methods_lists_names_aliases_and_summaries(run):
    result = run("methods")
    assert result.exit_code == 0
    lines = result.stdout.splitlines()
    assert [line.split()[0] for line in lines] == list_methods()
    gradcam = next(line for line in lines if line.startswith("gradcam "))
    assert "Selvaraju" in gradcam
    assert next(line for line in lines if line.startswith("gradcam++ ")).startswith(
        "gradcam++ (gradcampp, gradcam_plus_plus)")
    assert all("``" not in line and ":func:" not in line for line in lines)
    assert method_class("grad-cam++").name in result.stdout


def starred_and_chosen(result: Result) -> tuple[list[str], str]:
    """The layer names marked ``*`` in the table, and the name the reason line gives."""
    lines = result.stdout.splitlines()
    starred = [line.split()[1] for line in lines[1:-1] if line.startswith("* ")]
    assert lines[-1].startswith("* automatic choice: '"), lines[-1]
    return starred, lines[-1].split("'")[1]


def test_layers_marks_the_automatic_choice(run):
    result = run("layers", "--arch", "resnet18", "--size", "64")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0] == "model: resnet18 (random init), input (1, 3, 64, 64)"
    assert lines[1].split() == ["LAYER", "TYPE", "OUTPUT"]
    assert ["layer1.0.conv1", "Conv2d", "(64,", "16,", "16)"] in [line.split() for line in lines]
    starred, chosen = starred_and_chosen(result)
    assert starred == [chosen]
    assert chosen.startswith("layer4")


def test_layers_of_the_default_model(run):
    result = run("layers", "--size", "64")
    assert result.exit_code == 0, result.output
    assert "efficientnet_lite0" in result.stdout and "input (1, 3, 64, 64)" in result.stdout
    starred, chosen = starred_and_chosen(result)
    assert starred == [chosen]


def text_file(tmp_path: Path) -> Path:
    path = tmp_path / "notes.jpg"
    path.write_text("not an image\n")
    return path


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["explain", "missing.jpg"], "no image at missing.jpg"),
        (["explain", "{text}"], "is not an image"),
        (["explain", "--arch", "resnet19"], "Did you mean 'resnet18'"),
        (["explain", "--method", "gradcma"], "unknown method 'gradcma'"),
        (["explain", "--method", ","], "names no method"),
        (["explain", "--arch", "resnet18", "--class-idx", "1000"],
         "target class 1000 is out of range: the model has 1000 classes"),
        (["explain", "--model", "missing.pth"], "no checkpoint at missing.pth"),
        (["explain", "--model", "{text}", "--arch", "resnet18"], "not a PyTorch checkpoint"),
        (["explain", "--model", "{state_dict}"], "--arch"),
        (["explain", "--model", "{state_dict}", "--arch", "resnet18"], "--num-classes"),
        (["explain", "--arch", "mobilenet_v2", "--weights", "missing.pth"],
         "no weights file at missing.pth"),
        (["explain", "--model", "{state_dict}", "--arch", "resnet18", "--num-classes", "2",
          "--labels", "{text}"], "got 1 labels for a model with 2 classes"),
        (["explain", "--model", "{state_dict}", "--arch", "resnet18", "--num-classes", "2",
          "--top-k", "3"], "--top-k 3"),
        (["explain", "--out", "no/such/dir/x.png"], "the directory no/such/dir does not exist"),
        (["layers", "--arch", "nope_net"], "unknown architecture 'nope_net'"),
        pytest.param(["explain", "--device", "cuda"], "CUDA is not available",
                     marks=pytest.mark.skipif(torch.cuda.is_available(), reason="has CUDA")),
    ],
)
def test_bad_input_is_one_line_without_traceback(tmp_path, run, catdog: CatDogFiles, args,
                                                 message):
    files = {"{text}": str(text_file(tmp_path)), "{state_dict}": str(catdog.state_dict)}
    result = run(*[files.get(arg, arg) for arg in args])
    assert_clean_error(result, message)


def test_class_idx_and_top_k_exclude_each_other(run):
    result = run("explain", "--class-idx", "1", "--top-k", "2")
    assert result.exit_code == 2
    assert "either --class-idx or --top-k" in result.stderr


# --- checked before the work, one rule for --out, the noise tunnel ------------------------------


@pytest.mark.parametrize(
    ("args", "message", "code"),
    [
        (["--rows", "5"], "--rows 5 is more than the 1 panel of the figure", 2),
        (["--method", "gradcam,layercam", "--rows", "3"], "more than the 2 panels", 2),
        (["--out", "figure.txt"], "matplotlib does not write '.txt' files", 1),
    ],
)
def test_figure_options_are_checked_before_any_work(run, args, message, code):
    result = run("explain", *args)
    assert result.exit_code == code
    assert message in result.stderr
    assert "model:" not in result.stdout  # refused before the model was loaded


def test_out_naming_a_directory_writes_inside_it(tmp_path, run):
    (tmp_path / "figures").mkdir()
    (tmp_path / "figures" / "heatlens_chelsea_gradcam.png").write_bytes(b"the user's")
    result = run("explain", "--arch", "resnet18", "--layer", "layer4", "--out", "figures")
    assert result.exit_code == 0, result.output
    assert written(result) == Path("figures/heatlens_chelsea_gradcam-1.png")
    assert_png(tmp_path / "figures" / "heatlens_chelsea_gradcam-1.png")
    assert (tmp_path / "figures" / "heatlens_chelsea_gradcam.png").read_bytes() == b"the user's"
    assert not (tmp_path / "figures.png").exists()


def test_a_binary_labels_file_is_named(tmp_path, run):
    labels = tmp_path / "labels.txt"
    labels.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe")
    result = run("explain", "--labels", labels)
    assert_clean_error(result, f"the labels file {labels} is not UTF-8 text")


def test_several_images_have_their_names_in_the_titles(tmp_path, run, grid_panels):
    copy = tmp_path / "upside_down.png"
    Image.open(sample_image_path()).rotate(180).save(copy)
    result = run("explain", sample_image_path(), copy, "--arch", "mobilenet_v2", "--weights",
                 MOBILENET_WEIGHTS)
    assert result.exit_code == 0, result.output
    first, second = grid_panels["titles"]
    assert first.startswith("chelsea.jpg | gradcam | ")
    assert second.startswith("upside_down.png | gradcam | ")


def test_noise_tunnel_on_the_command_line(run, grid_panels):
    result = run("explain", "--arch", "mobilenet_v2", "--weights", MOBILENET_WEIGHTS,
                 "--method", "gradcam,saliency", "--noise-tunnel", "vargrad",
                 "--nt-samples", "3")
    assert result.exit_code == 0, result.output
    assert [line.split(" | ")[0] for line in panel_lines(result)] == [
        "chelsea.jpg: gradcam+vargrad", "chelsea.jpg: saliency+vargrad"]
    assert len(grid_panels["panels"]) == 2
    plain = run("explain", "--arch", "mobilenet_v2", "--weights", MOBILENET_WEIGHTS,
                "--method", "smoothgrad", "--nt-samples", "3")
    assert plain.exit_code == 0, plain.output
    (line,) = panel_lines(plain)
    assert line.startswith("chelsea.jpg: smoothgrad | Egyptian cat | 0.")
    bad = run("explain", "--noise-tunnel", "smooth")
    assert bad.exit_code == 2 and "'smooth' is not one of" in bad.stderr
    twice = run("explain", "--method", "smoothgrad", "--noise-tunnel", "vargrad")
    assert_clean_error(twice, "smoothgrad is a noise tunnel already (SmoothGrad); put the "
                              "method it runs (saliency) in the tunnel instead")
    assert "model:" not in twice.stdout


def test_class_idx_takes_a_label_name(run):
    result = run("explain", "--arch", "mobilenet_v2", "--weights", MOBILENET_WEIGHTS,
                 "--class-idx", "tabby")
    assert result.exit_code == 0, result.output
    (line,) = panel_lines(result)
    assert " | tabby | " in line
    unknown = run("explain", "--arch", "mobilenet_v2", "--weights", MOBILENET_WEIGHTS,
                  "--class-idx", "tabbby")
    assert_clean_error(unknown, "no class is named 'tabbby' among the 1000 labels. Did you mean")


def test_layers_names_a_functional_activation(run):
    result = run("layers", "--arch", "densenet121", "--size", "64")
    assert result.exit_code == 0, result.output
    norm5 = next(line for line in result.stdout.splitlines() if " features.norm5 " in line)
    assert norm5.startswith("* ")
    assert norm5.endswith("then a functional ReLU in DenseNet.forward")
    assert result.stdout.splitlines()[-1].endswith(
        "explained after a functional ReLU in DenseNet.forward, as the rest of the network "
        "reads it")
