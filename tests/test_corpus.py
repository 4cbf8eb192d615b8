"""Checks on the edge-case image corpus itself (tests/corpus.py) and on the OpenCV facts it documents."""
import os
from pathlib import Path

import cv2
import numpy as np
import pytest

import corpus

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".webp"}


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    root = tmp_path_factory.mktemp("mixed")
    return root, corpus.make_mixed_folder(root)


def _same(a, b):
    return (a is None and b is None) or (a is not None and b is not None and np.array_equal(a, b))


def test_mixed_folder_lists_every_entry(mixed):
    root, expected = mixed
    assert set(expected) == set(os.listdir(root))
    assert set(expected.values()) == {"ok", "fail", "not-an-image"}
    for name, outcome in expected.items():
        is_image_name = Path(name).suffix.lower() in IMAGE_EXTENSIONS
        assert is_image_name == (outcome != "not-an-image"), name
    for name in corpus.MIXED_SUB_ENTRIES:
        assert (root / name).is_file()
    assert expected["sub"] == "not-an-image" and (root / "sub").is_dir()


def test_files_are_small(mixed):
    root, expected = mixed
    for name in expected:
        p = root / name
        if p.is_file():
            assert p.stat().st_size <= 16_000, name
    assert (root / "empty.jpg").stat().st_size == 0


def test_ok_files_decode(mixed):
    root, expected = mixed
    for name, outcome in expected.items():
        if outcome != "ok":
            continue
        img = corpus.imread_reference(root / name)
        assert img is not None, name
        assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3, name
        assert max(img.shape[:2]) <= 64, name


def test_fail_files_are_unreadable_or_truncated(mixed):
    root, expected = mixed
    for name, outcome in expected.items():
        if outcome != "fail":
            continue
        p = root / name
        if corpus.imread_reference(p) is not None:
            # the one case imread lets through: a truncated JPEG, caught by the proposed check
            assert name == "truncated.jpg"
            assert corpus.jpeg_is_truncated(p.read_bytes())


def test_imdecode_agrees_with_imread_except_truncated_jpeg(mixed):
    root, expected = mixed
    for name in expected:
        p = root / name
        if p.is_dir():
            continue
        a, b = corpus.imread_reference(p), corpus.imdecode_reference(p)
        if name == "truncated.jpg":
            assert a is not None and a.shape == (48, 64, 3)  # partial image, only a stderr warning
            assert b is None
        else:
            assert _same(a, b), name


@pytest.mark.parametrize("orientation, shape", [(3, (48, 64, 3)), (6, (64, 48, 3)), (8, (64, 48, 3))])
def test_exif_orientation_applied_by_imread_and_imdecode(tmp_path, orientation, shape):
    p = corpus.make_exif_jpg(tmp_path, orientation)
    stored = corpus.stored_pixels(p)
    assert stored.shape == (48, 64, 3)
    expected = corpus.apply_exif_orientation(stored, orientation)
    assert expected.shape == shape
    np.testing.assert_array_equal(corpus.imread_reference(p), expected)
    np.testing.assert_array_equal(corpus.imdecode_reference(p), expected)


def test_exif_with_thumbnail_decodes_main_image_rotated(tmp_path):
    p = corpus.make_exif_thumbnail_jpg(tmp_path)
    data = p.read_bytes()
    assert data.count(b"\xff\xd8") == 2  # main image + thumbnail
    img = corpus.imread_reference(p)
    np.testing.assert_array_equal(img, corpus.apply_exif_orientation(corpus.stored_pixels(p), 6))
    assert img.shape == (64, 48, 3)


def test_channel_and_depth_rules(tmp_path):
    base = corpus.base_bgr()
    for make in (corpus.make_grey_png, corpus.make_grey_alpha_png, corpus.make_grey_jpg):
        img = corpus.imread_reference(make(tmp_path))
        assert np.array_equal(img[..., 0], img[..., 1]) and np.array_equal(img[..., 1], img[..., 2])
    # alpha dropped, not composited: pixels under alpha 0 keep their colour
    np.testing.assert_array_equal(corpus.imread_reference(corpus.make_rgba_png(tmp_path)), base)
    # 16-bit -> 8-bit keeps the high byte
    np.testing.assert_array_equal(corpus.imread_reference(corpus.make_rgb16_png(tmp_path)),
                                  corpus.sixteen_bit_source() >> 8)
    grey16 = corpus.imread_reference(corpus.make_grey16_png(tmp_path))
    np.testing.assert_array_equal(grey16, np.dstack([corpus.sixteen_bit_source(grey=True) >> 8] * 3))
    cmyk = corpus.imread_reference(corpus.make_cmyk_jpg(tmp_path)).astype(int)
    assert np.abs(cmyk - base).mean() < 4


def test_empty_buffer_makes_imdecode_raise(tmp_path):
    p = corpus.make_empty_jpg(tmp_path)
    assert corpus.imread_reference(p) is None
    with pytest.raises(cv2.error):
        cv2.imdecode(np.fromfile(str(p), np.uint8), cv2.IMREAD_COLOR)


def test_broken_symlinks_are_listed_but_not_files(tmp_path):
    gone = corpus.make_dangling_symlink(tmp_path)
    loop = corpus.make_symlink_loop(tmp_path)
    assert {"gone.jpg", "loop_a.jpg", "loop_b.jpg"} <= set(os.listdir(tmp_path))
    for p in (gone, loop):
        assert p.is_symlink() and not p.is_file() and not p.exists()
        assert corpus.imread_reference(p) is None
        with pytest.raises(OSError):
            np.fromfile(str(p), np.uint8)
    good = corpus.make_symlink_to_good(tmp_path)
    assert corpus.imread_reference(good).shape == (48, 64, 3)


def test_truncation_check_has_no_false_alarm(tmp_path):
    valid = corpus.make_valid_jpegs(tmp_path)
    assert len(valid) == 11
    for p in valid:
        assert corpus.imread_reference(p) is not None, p.name
        assert not corpus.jpeg_is_truncated(p.read_bytes()), p.name
    assert corpus.jpeg_is_truncated(corpus.make_truncated_jpg(tmp_path).read_bytes())


def test_truncation_check_catches_every_cut_imread_accepts(tmp_path):
    """Cut each valid JPEG at every byte: wherever imread still returns an image, the check fires;
    and imdecode returns None at every cut."""
    cut_file = tmp_path / "cut" / "c.jpg"
    cut_file.parent.mkdir()
    for p in corpus.make_valid_jpegs(tmp_path):
        data = p.read_bytes()
        eoi = data.rfind(b"\xff\xd9") + 2
        partial = 0
        for cut in range(2, eoi):
            piece = data[:cut]
            assert cv2.imdecode(np.frombuffer(piece, np.uint8), cv2.IMREAD_COLOR) is None, (p.name, cut)
            cut_file.write_bytes(piece)
            if cv2.imread(str(cut_file), cv2.IMREAD_COLOR) is not None:
                partial += 1
                assert corpus.jpeg_is_truncated(piece), (p.name, cut)
        assert partial > 0, p.name  # imread did hand back partial images for this file


def test_truncated_png_never_decodes(tmp_path):
    data = cv2.imencode(".png", corpus.base_bgr())[1].tobytes()
    cut_file = tmp_path / "c.png"
    for cut in range(1, len(data)):
        piece = data[:cut]
        assert cv2.imdecode(np.frombuffer(piece, np.uint8), cv2.IMREAD_COLOR) is None, cut
        if cut % 7 == 0 or cut > len(data) - 20:
            cut_file.write_bytes(piece)
            assert cv2.imread(str(cut_file), cv2.IMREAD_COLOR) is None, cut
