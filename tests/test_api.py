"""The Python API: what users pass in (arrays of every layout, PIL images, paths), and the same maps as
the command line, bit for bit. Pixels are checked against cv2.imread of the same picture saved to a
file (the extractor's own decoder), maps against the PNG/NPY files the command line writes."""
import re
import shutil
import subprocess
import sys

import cv2
import numpy as np
import pytest
from PIL import Image

import corpus
from conftest import ROOT
from schp.data.catalog import DATASETS
from schp.api import SCHP, to_bgr
from schp.utils.palette import class_colors


@pytest.fixture(scope="module")
def model(small_model):
    """pascal's seed-0 weights and labels at a 160 x 160 input (conftest.small_model): what the API does
    around the network is the same at any input size."""
    return SCHP("custom", small_model[-1], device="cpu")


def test_import_schp_is_light_and_exports_the_api():
    code = ("import sys, schp; light = 'torch' not in sys.modules and 'cv2' not in sys.modules; "
            "from schp import SCHP; print(light, SCHP.__module__)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["True", "schp.api"], out.stderr


# every PIL mode a file can open in, against cv2.imread of that file
PIL_CASES = ["make_good_jpg", "make_grey_jpg", "make_progressive_jpg", "make_grey_png", "make_grey_alpha_png",
             "make_palette_png", "make_palette_trns_png", "make_rgba_png", "make_rgb16_png", "make_grey16_png",
             "make_misnamed_png_as_jpg"]


@pytest.mark.parametrize("maker", PIL_CASES)
def test_pil_images_convert_as_imread_decodes_their_file(tmp_path, maker):
    path = getattr(corpus, maker)(tmp_path)
    with Image.open(path) as image:
        assert np.array_equal(to_bgr(image), cv2.imread(str(path), cv2.IMREAD_COLOR)), image.mode


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_pil_exif_orientation_applied_as_imread_does(tmp_path, orientation):
    path = corpus.make_exif_jpg(tmp_path, orientation)
    with Image.open(path) as image:
        assert np.array_equal(to_bgr(image), cv2.imread(str(path), cv2.IMREAD_COLOR))


def test_array_layouts_match_imread_of_the_same_picture(tmp_path):
    bgr = corpus.base_bgr(64, 48)
    rgb = np.ascontiguousarray(bgr[:, :, ::-1])
    alpha = np.random.RandomState(0).randint(0, 256, (48, 64, 1), dtype=np.uint8)
    grey = cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY)

    def imread_of(pil_image):  # save losslessly, decode as the command line does
        path = tmp_path / f"{len(list(tmp_path.iterdir()))}.png"
        pil_image.save(path)
        return cv2.imread(str(path), cv2.IMREAD_COLOR)

    assert np.array_equal(to_bgr(bgr, "bgr"), imread_of(Image.fromarray(rgb)))
    assert np.array_equal(to_bgr(rgb, "rgb"), imread_of(Image.fromarray(rgb)))
    assert np.array_equal(to_bgr(bgr[:, ::-1], "bgr"), imread_of(Image.fromarray(rgb[:, ::-1])))  # a view
    rgba = np.concatenate([rgb, alpha], axis=2)
    assert np.array_equal(to_bgr(rgba, "rgb"), imread_of(Image.fromarray(rgba, "RGBA")))
    bgra = np.concatenate([bgr, alpha], axis=2)
    assert np.array_equal(to_bgr(bgra, "bgr"), imread_of(Image.fromarray(rgba, "RGBA")))
    assert np.array_equal(to_bgr(grey), imread_of(Image.fromarray(grey, "L")))
    assert np.array_equal(to_bgr(grey[:, :, None]), imread_of(Image.fromarray(grey, "L")))
    path = tmp_path / "photo.png"
    Image.fromarray(rgb).save(path)
    assert np.array_equal(to_bgr(path), bgr) and np.array_equal(to_bgr(str(path)), bgr)


@pytest.mark.parametrize("value, error, words", [
    (np.zeros((48, 64, 3), np.float32), TypeError, "must be uint8"),
    (np.zeros((48, 64, 3), np.float64), TypeError, "must be uint8"),
    (np.zeros((48, 64, 3), np.uint16), TypeError, "must be uint8"),
    (np.zeros((48, 64), bool), TypeError, "must be uint8"),
    (np.zeros((48, 64, 2), np.uint8), ValueError, "not shape (48, 64, 2)"),
    (np.zeros((48, 64, 5), np.uint8), ValueError, "not shape (48, 64, 5)"),
    (np.zeros((2, 48, 64, 3), np.uint8), ValueError, "not shape (2, 48, 64, 3)"),
    (np.zeros((64,), np.uint8), ValueError, "not shape (64,)"),
    (np.zeros((0, 64, 3), np.uint8), ValueError, "empty"),
    (np.zeros((48, 64, 3), np.uint8), ValueError, "color='bgr'"),  # 3 channels, order not said
    (np.zeros((48, 64, 4), np.uint8), ValueError, "color='bgr'"),
    ([[0, 1], [2, 3]], TypeError, "cannot parse a list"),
    (None, TypeError, "cannot parse a NoneType"),
    (Image.new("F", (8, 8)), ValueError, "mode 'F'"),
])
def test_unsupported_images_raise_one_clear_sentence(value, error, words):
    with pytest.raises(error) as caught:
        to_bgr(value)
    assert words in str(caught.value)


def test_bad_paths_and_colors_raise_value_errors(tmp_path):
    with pytest.raises(ValueError, match="no-such.jpg: cannot read"):
        to_bgr(tmp_path / "no-such.jpg")
    (tmp_path / "empty.jpg").write_bytes(b"")
    with pytest.raises(ValueError, match="empty file"):
        to_bgr(tmp_path / "empty.jpg")
    with pytest.raises(ValueError, match="'bgr' or 'rgb', not 'hsv'"):
        to_bgr(np.zeros((4, 4, 3), np.uint8), "hsv")


def test_constructor_refuses_unknown_settings(checkpoints, tmp_path):
    with pytest.raises(ValueError, match="unknown dataset"):
        SCHP("coco", checkpoints("pascal"))
    with pytest.raises(ValueError, match="^backend='nonsense': unknown"):
        SCHP("pascal", checkpoints("pascal"), device="cpu", backend="nonsense")
    with pytest.raises(Exception, match="no such file"):
        SCHP("pascal", tmp_path / "missing.pth", device="cpu")


def test_api_maps_and_logits_equal_the_command_line_on_a_folder(model, run_cli, tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    cv2.imwrite(str(inputs / "a.jpg"), corpus.base_bgr(64, 48))
    rgba = np.concatenate([corpus.base_bgr(48, 64)[:, :, ::-1], np.full((64, 48, 1), 7, np.uint8)], axis=2)
    Image.fromarray(rgba, "RGBA").save(inputs / "b.png")
    Image.fromarray(np.roll(corpus.base_bgr(40, 30), 5, axis=1)[:, :, ::-1]).save(inputs / "c.png")
    code, _, err = run_cli("--dataset", "custom", "--model-restore", model.checkpoint, "--device", "cpu",
                           "--input-dir", inputs, "--output-dir", tmp_path / "out", "--logits")
    assert code == 0, err

    with Image.open(inputs / "b.png") as b:  # RGBA PIL image: alpha dropped as the CLI's decoder does
        rgb_c = np.asarray(Image.open(inputs / "c.png"))  # RGB array
        results = model.parse_batch([inputs / "a.jpg", b, rgb_c], color="rgb", logits=True)
    for name, (labels, logits) in zip("abc", results):
        with Image.open(tmp_path / "out" / f"{name}.png") as png:
            assert np.array_equal(labels, np.asarray(png)), name
            assert model.to_pil(labels).getpalette() == png.getpalette()
        assert logits.dtype == np.float32 and np.array_equal(logits, np.load(tmp_path / "out" / f"{name}.npy"))
    bgr_a = cv2.imread(str(inputs / "a.jpg"))
    assert np.array_equal(model.parse(bgr_a, color="bgr"), results[0][0])  # one image, without logits
    assert len(set(np.unique(results[0][0]))) > 1  # a real map, not a blank one


def test_colorize_and_overlay_follow_the_palette(model):
    labels = np.arange(7, dtype=np.uint8).repeat(6).reshape(6, 7)
    colors = np.array(class_colors(DATASETS["pascal"].num_classes), dtype=np.uint8)
    assert np.array_equal(model.colorize(labels), colors[labels])
    assert np.array_equal(model.colorize(labels, color="bgr"), colors[labels][:, :, ::-1])
    rgb = np.random.RandomState(1).randint(0, 256, (6, 7, 3), dtype=np.uint8)
    mixed = model.overlay(rgb, labels, color="rgb").astype(int)
    expected = np.where(labels[:, :, None] == 0, rgb, (rgb.astype(int) + colors[labels]) / 2)
    assert np.abs(mixed - expected).max() <= 0.5 + 1e-9  # rounding of the 50/50 blend only
    assert np.array_equal(model.overlay(rgb[:, :, ::-1], labels, color="bgr"), mixed[:, :, ::-1])
    with pytest.raises(ValueError, match="differ in size"):
        model.overlay(rgb, labels[:5], color="rgb")
    with pytest.raises(ValueError, match="beyond the 7"):
        model.colorize(labels + 1)


def test_readme_example_runs_from_a_fresh_clone(checkpoints, tmp_path):
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Python API"):]
    example = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    clone = tmp_path / "clone"
    for part in ("schp", "datasets", "networks", "utils", "demo", "checkpoints"):
        shutil.copytree(ROOT / part, clone / part, ignore=shutil.ignore_patterns("*.pth", "__pycache__"))
    spec = DATASETS["pascal"]
    shutil.copy(checkpoints("pascal"), clone / "checkpoints" / spec.checkpoint)  # the released file's name
    result = subprocess.run([sys.executable, "-c", example], cwd=clone, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr
    assert (clone / "demo_parsing.png").is_file() and (clone / "demo_overlay.jpg").is_file()
    with Image.open(clone / "demo_parsing.png") as png:
        assert png.mode == "P" and png.size == Image.open(clone / "demo" / "demo.jpg").size
