"""One bad input never stops a run: oversized and odd images, JPEGs with trailing data, unsafe subject ids."""
import json
import os
import struct
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

import corpus
from schp.commands import extract as simple_extractor
from schp.data.crop import SimpleFolderDataset
from schp.data.decode import ImageError, read_image


def files_under(folder):
    return {p for p in Path(folder).rglob("*") if p.is_file() or p.is_symlink()}


def test_opencv_warp_asserts_on_a_40000_pixel_side(tmp_path):
    """The reproduction: such a PNG decodes, then the affine crop's warpAffine asserts (SHRT_MAX)."""
    image = corpus.imread_reference(corpus.make_wide_png(tmp_path))
    assert image.shape == (8, 40000, 3)
    with pytest.raises(cv2.error, match="SHRT_MAX"):
        cv2.warpAffine(image, np.eye(2, 3), (512, 512))


def test_wide_and_huge_images_are_refused_from_their_header(tmp_path):
    with pytest.raises(ImageError, match=r"40000 x 8 pixels: a side longer than 32766"):
        read_image(corpus.make_wide_png(tmp_path), max_pixels=None)
    # a 100-byte PNG declaring 50000 x 50000: refused before decoding (7.5 GB) is attempted
    with pytest.raises(ImageError, match=r"50000 x 50000 pixels \(2500.0 megapixels\) is above --max-pixels"):
        read_image(corpus.make_png_header_bomb(tmp_path), max_pixels=200_000_000)
    # formats read through Pillow's lazy header: a BMP declaring 60000 x 60000, 24 bits
    bmp = tmp_path / "bomb.bmp"
    info = struct.pack("<IiiHHIIiiII", 40, 60000, 60000, 1, 24, 0, 0, 2835, 2835, 0, 0)
    bmp.write_bytes(b"BM" + struct.pack("<IHHI", 54 + 16, 0, 0, 54) + info + bytes(16))
    with pytest.raises(ImageError, match=r"60000 x 60000 pixels .* above --max-pixels 1000"):
        read_image(bmp, max_pixels=1000)
    good = corpus.make_good_jpg(tmp_path)  # 64 x 48 = 3072 pixels
    assert read_image(good, max_pixels=3072).shape == (48, 64, 3)
    with pytest.raises(ImageError, match="64 x 48 pixels"):
        read_image(good, max_pixels=3071)
    with pytest.raises(ImageError, match="40 x 30 pixels"):  # a PNG too: IHDR
        read_image(_png(tmp_path, 40, 30), max_pixels=1199)


def _png(folder, width, height):
    p = Path(folder) / f"img_{width}x{height}.png"
    cv2.imwrite(str(p), corpus.base_bgr(width, height))
    return p


def test_a_device_with_an_image_name_is_refused_not_read(tmp_path):
    os.symlink("/dev/zero", tmp_path / "zero.jpg")  # reading it would never end
    with pytest.raises(ImageError, match="not a regular file"):
        read_image(tmp_path / "zero.jpg")


def test_any_failure_while_preparing_an_input_fails_only_that_input(tmp_path, monkeypatch):
    import schp.data.crop as sed
    paths = [corpus.make_good_jpg(tmp_path), corpus.make_wide_png(tmp_path), corpus.make_grey_png(tmp_path)]
    items = [SimpleFolderDataset(paths, (64, 64))[i] for i in range(3)]
    assert items[0].error is None and items[2].error is None
    assert "a side longer than 32766" in items[1].error

    def broken_warp(*args, **kwargs):
        raise cv2.error("OpenCV(4) imgwarp.cpp:1: error: (-215:Assertion failed) something in function 'remap'")
    monkeypatch.setattr(sed, "warp_to_input", broken_warp)
    item = SimpleFolderDataset(paths[:1], (64, 64))[0]
    assert item.image is None and item.error.startswith("cannot crop: error: ") and "remap" in item.error


def test_jpeg_with_trailing_data_is_accepted_and_every_cut_refused(tmp_path):
    from schp.data.decode import jpeg_layout
    motion = corpus.make_motion_photo_jpg(tmp_path)
    data = motion.read_bytes()
    assert corpus.jpeg_is_truncated(data)  # the byte search the old check used calls it truncated
    np.testing.assert_array_equal(read_image(motion), corpus.imread_reference(motion))
    valid = corpus.make_valid_jpegs(tmp_path / "valid") + [motion]
    cut_file = tmp_path / "cut.jpg"
    for path in valid:
        data = path.read_bytes()
        np.testing.assert_array_equal(read_image(path), corpus.imread_reference(path))
        end = corpus.jpeg_primary_end(data)
        assert end is not None and jpeg_layout(data)[:2] == ("complete", end)
        for cut in range(2, end):  # every cut: inside headers, scans, restart intervals
            assert jpeg_layout(data[:cut])[0] == "truncated", (path.name, cut)
        for cut in range(2, end, end // 6):  # and through the reader, a few
            cut_file.write_bytes(data[:cut])
            with pytest.raises(ImageError):
                read_image(cut_file)
        cut_file.write_bytes(data[:end - 1])
        with pytest.raises(ImageError, match="truncated JPEG"):
            read_image(cut_file)
        if end < len(data):  # trailing data cut anywhere: the image itself is whole
            cut_file.write_bytes(data[:end + (len(data) - end) // 2])
            assert read_image(cut_file).shape == corpus.imread_reference(path).shape


def run_main(*argv):
    """simple_extractor.main without the --quiet that run_cli adds."""
    return simple_extractor.main([str(a) for a in argv])


def test_non_image_files_are_counted_in_one_line_with_quiet(tmp_path, capsys):
    inputs = tmp_path / "in"
    inputs.mkdir()
    corpus.make_good_jpg(inputs)
    for i in range(12):
        np.save(inputs / f"params_{i:02d}.npy", np.zeros(3))
    args = ("--input-dir", inputs, "--output-dir", tmp_path / "out", "--dry-run")
    assert run_main(*args, "--quiet", "--summary", tmp_path / "run.json") == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"skipping 12 file(s) that are not images (extension not one of .jpg .jpeg .png .bmp .tif "
                   f".tiff .webp); listed in {tmp_path / 'run.json'}"]
    assert run_main(*args) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 6 and err[0].startswith(f"skipping {inputs / 'params_00.npy'}: not an image (extension")
    assert err[4] == f"skipping {inputs / 'params_04.npy'}: not an image"
    assert err[5] == "skipping 7 more file(s) that are not images"


def test_an_unexpected_failure_of_the_run_still_writes_summary_and_manifest(run_cli, tmp_path, monkeypatch):
    import schp.runs.loop

    inputs, out, summary = tmp_path / "in", tmp_path / "out", tmp_path / "run.json"
    inputs.mkdir()
    out.mkdir()
    corpus.make_good_jpg(inputs)
    (out / "good.png").write_bytes(b"done before")  # nothing to compute: no model is loaded

    def broken_run(job, tasks, overwrite=False, reporter=None):
        raise ValueError("a defect in the run loop")
    monkeypatch.setattr(schp.runs.loop, "run", broken_run)
    code, _, err = run_cli("--input-dir", inputs, "--output-dir", out, "--summary", summary)
    assert code == 1
    lines = err.strip().splitlines()
    assert len(lines) == 2 and lines[0] == "error: the run failed unexpectedly: ValueError: a defect in the run loop"
    assert lines[1].startswith("stopped: 0 processed, 0 skipped, 0 failed of 1 inputs in ")
    assert lines[1].endswith(" (1 not reached; run again to resume)")
    manifest = json.loads(summary.read_text())
    assert manifest["stopped"] == "unexpected error" and manifest["totals"]["not-run"] == 1


def test_cli_default_pixel_limit_is_the_readers(capsys):
    from schp.data.decode import DEFAULT_MAX_PIXELS
    assert simple_extractor.parse_args([]).max_pixels == DEFAULT_MAX_PIXELS
    assert run_main("--input-dir", ".", "--output-dir", "x", "--max-pixels", "-1") == 2
    assert capsys.readouterr().err.strip() == "error: --max-pixels must be >= 0 (0 = no limit)"


def test_done_when_folder_of_good_and_bad_images(checkpoints, run_cli, tmp_path):
    """Good images, a 40000 x 8 PNG, a 50000 x 50000 PNG header, a motion photo, a truncated JPEG and a
    text file: every good image and the motion photo parsed, one line per bad one, summary and
    manifest written, exit 1, nothing outside the tree."""
    inputs, out, summary = tmp_path / "in", tmp_path / "out", tmp_path / "run.json"
    inputs.mkdir()
    good = [corpus.make_good_jpg(inputs), corpus.make_motion_photo_jpg(inputs)]
    bad = [corpus.make_wide_png(inputs), corpus.make_png_header_bomb(inputs), corpus.make_truncated_jpg(inputs)]
    corpus.make_notes_txt(inputs)
    before = files_under(tmp_path)
    code, _, err = run_cli("--model-restore", checkpoints("pascal", legacy=False), "--input-dir", inputs,
                           "--output-dir", out, "--summary", summary)
    assert code == 1
    lines = err.strip().splitlines()
    errors = sorted(line for line in lines if line.startswith("error: "))
    assert len(errors) == 3 and [e.split(": ")[1] for e in errors] == sorted(str(p) for p in bad), err
    assert lines[-1].startswith("done: 2 processed, 0 skipped, 3 failed of 5 inputs"), err
    assert "Traceback" not in err
    for path in good:
        with Image.open(out / f"{path.stem}.png") as labels:
            assert labels.mode == "P" and labels.size == (64, 48)
    manifest = json.loads(summary.read_text())
    assert manifest["totals"] == {"processed": 2, "skipped": 0, "failed": 3, "not-run": 0, "inputs": 5}
    assert manifest["not_images"] == [str(inputs / "notes.txt")]
    assert {e["input"]: e["status"] for e in manifest["inputs"]}[str(bad[0])] == "failed"
    made = files_under(tmp_path) - before
    assert made == {summary} | {out / f"{p.stem}.png" for p in good} | \
        {p for p in made if p.is_relative_to(tmp_path / "cache")}


def small_integratedpifu_tree(root: Path, subjects, render_size=(64, 64)):
    """A tree in IntegratedPIFu's layout with small renders (the layout matters here, not the size)."""
    renders = root / "rendering_script" / "buffer_fixed_full_mesh"
    for subject in subjects:
        (renders / subject).mkdir(parents=True)
        cv2.imwrite(str(renders / subject / "rendered_image_000.png"), corpus.base_bgr(*render_size))
    return renders


def test_done_when_integratedpifu_unsafe_ids_and_bad_renders(checkpoints, run_cli, tmp_path):
    root = tmp_path / "tree"
    renders = small_integratedpifu_tree(root, ["0001"])
    (renders / "0002").mkdir()  # only bad renders
    # what ../../../outside would reach from the render and parse folders: a render to be parsed there
    outside = tmp_path / "outside"
    outside.mkdir()
    cv2.imwrite(str(outside / "rendered_image_000.png"), corpus.base_bgr())
    corpus.make_wide_png(renders / "0002", "rendered_image_090.png")
    corpus.make_png_header_bomb(renders / "0002", "rendered_image_180.png")
    cv2.imwrite(str(renders / "0001" / "rendered_image_000.PNG"), corpus.base_bgr())  # same outputs as .png
    (root / "train_set_list.txt").write_text("0001\n../../escape\n../../../outside\n")
    (root / "test_set_list.txt").write_text(f"{outside}\n..\n0002\n")
    summary = tmp_path / "run.json"
    before = files_under(tmp_path)
    code, _, err = run_cli("--integratedpifu-dir", root, "--model-restore", checkpoints("pascal", legacy=False),
                           "--summary", summary)
    assert code == 1
    lines = err.strip().splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    train, test = root / "train_set_list.txt", root / "test_set_list.txt"
    for path, line, subject in ((train, 2, "../../escape"), (train, 3, "../../../outside"),
                                (test, 1, str(outside)), (test, 2, "..")):
        assert sum(e.startswith(f"error: {path}: line {line}: subject id {subject!r} ") for e in errors) == 1, err
    assert sum(f"{renders / '0001' / 'rendered_image_000.png'}: its outputs would overwrite those of "
               f"{renders / '0001' / 'rendered_image_000.PNG'}" in e for e in errors) == 1, err
    assert sum(e.startswith(f"error: {renders / '0002' / 'rendered_image_090.png'}: 40000 x 8") for e in errors) == 1
    assert sum(e.startswith(f"error: {renders / '0002' / 'rendered_image_180.png'}: 50000 x 50000") for e in errors) == 1
    assert len(errors) == 7, err
    assert lines[-1].startswith("done: 1 processed, 0 skipped, 7 failed of 8 inputs"), err
    parses = root / "rendering_script" / "render_human_parse_results"
    made = files_under(tmp_path) - before
    assert made - {p for p in made if p.is_relative_to(tmp_path / "cache")} == {
        summary, parses / "0001" / "rendered_parse_000.npy", renders / "0001" / "rendered_parse_000.png"}
    manifest = json.loads(summary.read_text())
    assert manifest["totals"]["failed"] == 7 and manifest["totals"]["processed"] == 1
