"""The page at / in a real headless Chromium (Debian's chromium, driven by Playwright with the system
browser): upload an image, wait for the overlay, check it pixel by pixel against the blend formula,
read a class under the pointer, toggle the classes, and download the label PNG, which must be the
command line's file for the same image. A screenshot is kept in the test's folder; with
SCHP_PAGE_SCREENSHOT=PATH the test also parses demo/demo.jpg and saves the page there (the
README's picture)."""
import os
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

import corpus
from conftest import ROOT
from service_server import Server, run_extractor

playwright = pytest.importorskip("playwright.sync_api", reason="the page test needs the package 'playwright'")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (apt-get install chromium)")
def test_page_uploads_shows_the_overlay_and_downloads_the_command_lines_map(tmp_path, checkpoints):
    checkpoint = checkpoints("pascal")
    inputs = tmp_path / "in"
    inputs.mkdir()
    cv2.imwrite(str(inputs / "person.png"), corpus.base_bgr(64, 48))
    server = Server(checkpoint, "pascal", tmp_path / "server.log")
    try:
        code, err = run_extractor(checkpoint, "pascal", inputs, tmp_path / "out")
        assert code == 0, err
        expected_png = (tmp_path / "out" / "person.png").read_bytes()
        with Image.open(tmp_path / "out" / "person.png") as im:
            labels, palette = np.array(im), np.array(im.getpalette()[:21]).reshape(7, 3)
        assert len(np.unique(labels)) >= 2
        server.wait_ready()
        with playwright.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
            try:
                page = browser.new_page(viewport={"width": 1100, "height": 700}, accept_downloads=True)
                page.goto(server.url + "/")
                page.wait_for_function("document.querySelectorAll('#legend li').length === 7", timeout=20000)
                assert "checkpoint synth-pascal-legacy.pth" in page.inner_text("#model")
                page.set_input_files("#file", str(inputs / "person.png"))
                page.wait_for_selector("body[data-state=ready]", timeout=120000)
                page.wait_for_selector("#overlay[data-drawn]", timeout=10000)

                shown = canvas_pixels(page, "#overlay")
                image = canvas_pixels(page, "#image")
                rgb = cv2.imread(str(inputs / "person.png"))[:, :, ::-1].astype(int)
                assert np.array_equal(image, rgb)  # the picture as the server decoded it
                blend = (rgb + palette[labels] + 1) >> 1  # half image, half class colour; background as is
                assert np.array_equal(shown, np.where(labels[:, :, None] > 0, blend, rgb))

                y, x = map(int, np.argwhere(labels > 0)[0])
                box = page.locator("#overlay").bounding_box()
                page.mouse.move(box["x"] + (x + 0.5) * box["width"] / 64, box["y"] + (y + 0.5) * box["height"] / 48)
                names = ("Background", "Head", "Torso", "Upper Arms", "Lower Arms", "Upper Legs", "Lower Legs")
                assert page.inner_text("#hover") == f"x {x}, y {y}: {labels[y, x]} {names[labels[y, x]]}"

                page.click("#none")  # every class hidden: the overlay is the image
                page.wait_for_function("document.querySelector('#overlay').dataset.drawn", timeout=5000)
                assert np.array_equal(canvas_pixels(page, "#overlay"), rgb)
                page.click("#all")

                with page.expect_download() as download:
                    page.click("#download-png")
                saved = tmp_path / "downloaded.png"
                download.value.save_as(saved)
                assert download.value.suggested_filename == "person.png"
                assert saved.read_bytes() == expected_png
                with Image.open(saved) as im:
                    assert np.array_equal(np.array(im), labels)
                page.screenshot(path=str(tmp_path / "service_page.png"), full_page=True)
                assert (tmp_path / "service_page.png").stat().st_size > 10000

                # a saved map viewed without parsing: the command line's own file gives the same view
                page.click("#none")
                page.set_input_files("#map-file", str(tmp_path / "out" / "person.png"))
                page.wait_for_function("document.querySelector('#status').textContent.includes('saved map')")
                page.click("#all")
                assert np.array_equal(canvas_pixels(page, "#overlay"), shown)

                target = os.environ.get("SCHP_PAGE_SCREENSHOT")
                if target:  # the README's picture
                    readme_picture(page, Path(target), Path(os.environ["SCHP_PAGE_SCREENSHOT_MAP"]))
            finally:
                browser.close()
    finally:
        assert server.stop() == 0


def readme_picture(page, target: Path, released_map: Path) -> None:
    """The page showing demo/demo.jpg with the map the original authors' released Pascal checkpoint
    made for it (their demo_pascal.png), opened as a saved map: no released weights are at hand, and
    the synthetic ones the server holds make no meaningful map. The status line says which it is."""
    page.set_input_files("#file", str(ROOT / "demo" / "demo.jpg"))
    page.wait_for_function("document.querySelector('#status').textContent.startsWith('demo.jpg:')", timeout=300000)
    page.set_input_files("#map-file", str(released_map))
    page.wait_for_function("document.querySelector('#status').textContent.includes('saved map')", timeout=60000)
    with Image.open(released_map) as im:
        labels = np.array(im)
    y, x = (int(v) for v in np.median(np.argwhere(labels == 1), axis=0))  # inside the head
    box = page.locator("#overlay").bounding_box()
    page.mouse.move(box["x"] + (x + 0.5) * box["width"] / labels.shape[1],
                    box["y"] + (y + 0.5) * box["height"] / labels.shape[0])
    page.set_viewport_size({"width": 1100, "height": 540})
    page.wait_for_timeout(300)
    page.screenshot(path=str(target))


def canvas_pixels(page, selector: str) -> np.ndarray:
    """H x W x 3 RGB of a canvas, read in the page."""
    width, height, data = page.evaluate("""(sel) => {
        const c = document.querySelector(sel);
        return [c.width, c.height, Array.from(c.getContext('2d').getImageData(0, 0, c.width, c.height).data)];
    }""", selector)
    return np.array(data, dtype=int).reshape(height, width, 4)[:, :, :3]
