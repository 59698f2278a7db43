"""The page in a real headless Chromium (Debian's, driven by Playwright): upload a photo, choose
two methods, see two panels drawn as heatlens draws overlays, move the opacity slider (the
pixels change and nothing is asked of the server), switch the class, hover a value, download
the PNG and the map, cancel a slow method, browse a run.

Set ``HEATLENS_SCREENSHOTS=docs/images`` to write the README's screenshot there."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from playwright.sync_api import Page, sync_playwright
from skimage import data

import heatlens
from heatlens.pictures.overlays import overlay

CHOSEN = ("gradcam", "layercam")


@pytest.fixture(scope="module")
def photo(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("browser") / "coffee.jpg"
    Image.fromarray(data.coffee()).save(path, quality=92)
    return path


@pytest.fixture(scope="module")
def browser(chromium):
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync"])
        yield browser
        browser.close()


@pytest.fixture
def page(browser, app_server) -> Page:
    context = browser.new_context(viewport={"width": 1280, "height": 1000}, accept_downloads=True)
    page = context.new_page()
    page.goto(app_server)
    page.wait_for_selector("body[data-ready=yes]")
    yield page
    context.close()


def choose_methods(page: Page, methods: tuple[str, ...]) -> None:
    for box in page.locator("#methods input[type=checkbox]").all():
        box.set_checked(box.get_attribute("value") in methods)


def canvas_pixels(page: Page, method: str) -> np.ndarray:
    flat = page.evaluate("""(method) => {
        const canvas = document.querySelector(`.panel[data-method="${method}"] canvas`);
        const image = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height);
        return Array.from(image.data);
    }""", method)
    return np.asarray(flat, dtype=np.uint8).reshape(224, 224, 4)[..., :3]


def drawn(page: Page, method: str, cls: int) -> None:
    """Wait until the panel of ``method`` shows class ``cls``."""
    page.wait_for_selector(f'.panel[data-method="{method}"][data-drawn*=\'"target":{cls},\']',
                           timeout=60_000)


def expected_overlay(workbench, photo: Path, method: str, cls: int, alpha: float,
                     cmap: str = "jet") -> tuple[np.ndarray, np.ndarray]:
    """heatlens' own overlay of the map, and the map, computed here."""
    batch, shown = workbench.loaded.preset(heatlens.load_image(photo))
    maps = heatlens.explain(workbench.loaded.model, batch, method=method, target=cls).maps[0]
    return np.asarray(overlay(shown[0], maps, alpha=alpha, cmap=cmap)), maps.numpy()


def assert_same_picture(mine: np.ndarray, theirs: np.ndarray) -> None:
    """Equal but for the few pixels whose value sits on a colour table's step (float rounding
    of the map across processes moves them one entry)."""
    differ = np.abs(mine.astype(int) - theirs.astype(int)).max(axis=2)
    assert (differ > 0).mean() < 0.002 and differ.max() <= 4, (differ > 0).mean()


def test_upload_two_methods_slider_class_hover_and_downloads(page, photo, app_workbench,
                                                             tmp_path):
    choose_methods(page, CHOSEN)
    page.locator("#trust").set_checked(False)  # its scores come last, below
    asked: list[str] = []
    page.on("request", lambda request: asked.append(request.url))
    page.set_input_files("#file", str(photo))
    first = int(page.locator("#classes input").first.get_attribute("value"))
    for method in CHOSEN:
        drawn(page, method, first)
    assert page.locator(".panel").count() == 2
    title = page.locator('.panel[data-method="gradcam"] .title').inner_text()
    top = app_workbench.loaded.labels[first]
    assert title.startswith(f"gradcam | {top} | 0.")

    picture, maps = expected_overlay(app_workbench, photo, "gradcam", first, 0.5)
    assert_same_picture(canvas_pixels(page, "gradcam"), picture)

    # the opacity slider recolours in the page: new pixels, no request
    before, count = canvas_pixels(page, "gradcam"), len(asked)
    page.locator("#alpha").fill("0.8")
    after = canvas_pixels(page, "gradcam")
    assert np.abs(after.astype(int) - before.astype(int)).mean() > 5
    assert_same_picture(after, expected_overlay(app_workbench, photo, "gradcam", first, 0.8)[0])
    page.locator("#cmap").select_option("viridis")
    assert_same_picture(canvas_pixels(page, "gradcam"), expected_overlay(
        app_workbench, photo, "gradcam", first, 0.8, "viridis")[0])
    assert len(asked) == count, asked[count:]

    # hovering shows the map's value under the pointer
    canvas = page.locator('.panel[data-method="gradcam"] canvas')
    box = canvas.bounding_box()
    canvas.hover(position={"x": box["width"] * 100.5 / 224, "y": box["height"] * 60.5 / 224})
    text = page.locator('.panel[data-method="gradcam"] .value').inner_text()
    assert text == f"value {maps[60, 100]:.3f} at (100, 60)"

    # another class: both panels are drawn again for it
    second = page.locator("#classes input").nth(2)
    cls = int(second.get_attribute("value"))
    second.check()
    for method in CHOSEN:
        drawn(page, method, cls)
    assert app_workbench.loaded.labels[cls] in page.locator(
        '.panel[data-method="layercam"] .title').inner_text()
    layercam, layercam_map = expected_overlay(app_workbench, photo, "layercam", cls, 0.8,
                                              "viridis")
    assert_same_picture(canvas_pixels(page, "layercam"), layercam)

    # the panel as a PNG and its map as .npy
    with page.expect_download() as png:
        page.locator('.panel[data-method="layercam"] .png').click()
    saved = tmp_path / png.value.suggested_filename
    png.value.save_as(saved)
    assert saved.name == f"heatlens_coffee_layercam_class{cls}.png"
    assert np.array_equal(np.asarray(Image.open(saved).convert("RGB")),
                          canvas_pixels(page, "layercam"))
    with page.expect_download() as npy:
        page.locator('.panel[data-method="layercam"] .npy').click()
    npy.value.save_as(tmp_path / "map.npy")
    np.testing.assert_allclose(np.load(tmp_path / "map.npy"), layercam_map, atol=1e-5)

    # the faithfulness line appears under each panel
    page.locator("#trust").set_checked(True)
    page.wait_for_selector('.panel[data-method="layercam"] .trust span', timeout=120_000)
    assert "random" in page.locator('.panel[data-method="layercam"] .trust').inner_text()
    shots = os.environ.get("HEATLENS_SCREENSHOTS")
    if shots:
        page.wait_for_selector('.panel[data-method="gradcam"] .trust span', timeout=120_000)
        page.screenshot(path=str(Path(shots) / "serve.png"), full_page=True)


def test_a_slow_method_shows_progress_and_can_be_cancelled(page, photo, app_workbench):
    """Score-CAM's panel shows a progress bar that fills; another class cancels the job for
    the first one; the cancel button stops the second."""
    choose_methods(page, ("scorecam",))
    page.locator("#trust").set_checked(False)
    page.locator("#sample").click()
    filling = """() => document.querySelector('.panel[data-method="scorecam"] progress')
                         .value > 0"""
    page.wait_for_selector('.panel[data-method="scorecam"] progress[value]', timeout=60_000)
    page.wait_for_function(filling, timeout=60_000)
    with page.expect_request(lambda request: request.method == "DELETE"):
        page.locator("#classes input").nth(1).check()
    page.wait_for_selector('.panel[data-method="scorecam"] progress:not([value])')
    page.wait_for_function(filling, timeout=60_000)
    page.locator('.panel[data-method="scorecam"] .cancel').click()
    page.wait_for_selector('.panel.failed[data-method="scorecam"]', timeout=60_000)
    assert page.locator('.panel[data-method="scorecam"] .title').inner_text() == (
        "scorecam: cancelled")
    assert all(not m._forward_hooks for m in app_workbench.loaded.model.modules())


def test_a_file_that_is_not_an_image_is_named_on_the_page(page, tmp_path):
    notes = tmp_path / "notes.jpg"
    notes.write_text("these are notes, not a photo")
    page.set_input_files("#file", str(notes))
    page.wait_for_selector("#message:not([hidden])")
    assert page.locator("#message").inner_text() == (
        "notes.jpg: the image data is not an image Pillow can read")


def test_a_run_is_browsed_filtered_and_opened(page, app_run_folder):
    page.locator("#tab-runs").click()
    page.wait_for_selector("#rows tbody tr")
    assert page.locator("#rows tbody tr").count() == 12
    page.locator("#filter-method").select_option("gradcam")
    page.wait_for_function("document.querySelectorAll('#rows tbody tr').length === 6")
    page.locator("#sort").select_option("deletion")
    page.locator("#descending").check()
    page.wait_for_function("""() => {
        const cells = [...document.querySelectorAll('#rows tbody tr td:last-child')];
        const v = cells.map((c) => Number(c.textContent));
        return v.length === 6 && v.every((x, i) => i === 0 || v[i - 1] >= x);
    }""")
    page.locator("#rows tbody tr").first.click()
    page.wait_for_selector(".entry-map")
    shown = page.evaluate("""() => [...document.querySelectorAll('.entry-map')].map((c) => [
        c.dataset.method, c.width, c.height, Array.from(c.getContext('2d').getImageData(
            0, 0, c.width, c.height).data).some((v, i) => i % 4 !== 3 && v !== 128)])""")
    assert shown == [["gradcam", 64, 64, True], ["saliency", 64, 64, True]]
    assert "gradcam" in page.locator("#entry dl").inner_text()


def test_an_image_dropped_on_the_page_is_explained(page):
    """Drag and drop: the dropped file is uploaded and its top class explained."""
    import io

    choose_methods(page, ("gradcam",))
    page.locator("#trust").set_checked(False)
    buffer = io.BytesIO()
    Image.fromarray(data.rocket()).resize((200, 150)).save(buffer, format="PNG")
    page.evaluate("""(bytes) => {
        const file = new File([new Uint8Array(bytes)], "rocket.png", {type: "image/png"});
        const dropped = new DataTransfer();
        dropped.items.add(file);
        document.getElementById("drop").dispatchEvent(
            new DragEvent("drop", {dataTransfer: dropped, bubbles: true, cancelable: true}));
    }""", list(buffer.getvalue()))
    page.wait_for_selector("#picture:not([hidden])")
    assert page.locator("#picture-name").inner_text() == "rocket.png, 200x150"
    drawn(page, "gradcam", int(page.locator("#classes input").first.get_attribute("value")))
