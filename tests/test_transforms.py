"""Geometry: the affine crop into the network and the banded inverse warp of the logits."""
import cv2
import numpy as np
import pytest

from original_pipeline import transform_logits  # the released whole-image inverse warp, transliterated
from schp.inference import labels_from_logits
from schp.utils.transforms import (box_center_scale, get_affine_transform, output_to_input_map, row_bands,
                                   warp_channel_rows, warp_to_input)

SIZES = [(1024, 1024), (2000, 1333), (1333, 2000), (61, 97), (1, 40), (40, 1), (1, 1), (3, 2)]  # (w, h)


def test_square_render_maps_corner_to_corner():
    center, scale = box_center_scale(1024, 1024)
    matrix = get_affine_transform(center, scale, (512, 512))
    np.testing.assert_array_equal(matrix[:, 2], [0.0, 0.0])
    assert matrix[0, 0] == pytest.approx(511 / 1023, abs=1e-12)
    assert matrix[1, 1] == pytest.approx(511 / 1023, abs=1e-12)
    assert matrix[0, 1] == 0 and matrix[1, 0] == 0


@pytest.mark.parametrize("w, h", [(2000, 1333), (1333, 2000), (61, 97)])
def test_long_side_fills_the_input_and_the_short_side_is_centred(w, h):
    center, scale = box_center_scale(w, h)
    assert scale[0] == scale[1] == max(w, h) - 1
    m = get_affine_transform(center, scale, (473, 473))
    corners = np.array([[0, 0, 1], [w - 1, h - 1, 1]], dtype=np.float64) @ m.T
    long_axis = 0 if w >= h else 1
    np.testing.assert_allclose(corners[:, long_axis], [0, 472], atol=1e-3)
    short = corners[:, 1 - long_axis]
    np.testing.assert_allclose(short.mean(), 236, atol=1e-3)  # centred
    inverse = get_affine_transform(center, scale, (473, 473), inv=True)
    back = np.array([[0, 0, 1], [472, 472, 1]], dtype=np.float64) @ inverse.T
    np.testing.assert_allclose(back[:, long_axis], [0, max(w, h) - 1], atol=1e-3)


@pytest.mark.parametrize("w, h", SIZES)
def test_crop_has_input_size_for_any_image(w, h):
    image = np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)
    center, scale = box_center_scale(w, h)
    crop = warp_to_input(image, center, scale, (473, 473))
    assert crop.shape == (473, 473, 3) and crop.dtype == np.uint8
    if (w, h) == (1, 1):
        assert (crop == image[0, 0]).all() or (crop == 0).all()


@pytest.mark.parametrize("w, h", SIZES)
@pytest.mark.parametrize("channels", [7, 20])
def test_inverse_warp_equals_the_original_per_channel_warp(w, h, channels):
    """The original warps each channel of the whole image; we warp each channel in bands of rows."""
    size = (473, 473) if channels == 20 else (512, 512)
    logits = np.random.default_rng(1).normal(size=size + (channels,)).astype(np.float32)
    center, scale = box_center_scale(w, h)
    inverse = get_affine_transform(center, scale, size, inv=True)
    original = np.stack([cv2.warpAffine(logits[:, :, c], inverse, (w, h), flags=cv2.INTER_LINEAR,
                                        borderMode=cv2.BORDER_CONSTANT, borderValue=0)
                         for c in range(channels)], axis=2)
    whole = transform_logits(logits, center, scale, w, h, size)
    assert whole.shape == (h, w, channels)
    np.testing.assert_array_equal(whole, original)
    out_to_in = output_to_input_map(center, scale, size)
    # the banded warp is one channel's: three of them (first, middle, last) stand for all
    for c in (0, channels // 2, channels - 1):
        banded = np.concatenate([warp_channel_rows(np.ascontiguousarray(logits[:, :, c]), out_to_in, w, a, b)
                                 for a, b in row_bands(h, 7)])
        assert banded.shape == (h, w) and float(np.abs(banded - original[:, :, c]).max()) <= 1e-6, c
    labels = labels_from_logits(logits, center, scale, w, h, size)
    assert labels.dtype == np.uint8 and labels.shape == (h, w)
    assert (labels == original.argmax(axis=2)).mean() >= 0.9999


def test_labels_break_ties_towards_the_lowest_class():
    logits = np.zeros((8, 8, 5), dtype=np.float32)
    logits[:, :, 3] = 1.0
    logits[:, :, 4] = 1.0
    center, scale = box_center_scale(8, 8)
    assert (labels_from_logits(logits, center, scale, 8, 8, (8, 8)) == 3).all()


def test_row_bands_cover_every_row_once():
    assert list(row_bands(10, 4)) == [(0, 4), (4, 8), (8, 10)]
    assert list(row_bands(1, 100)) == [(0, 1)]


@pytest.mark.parametrize("w, h", SIZES)
@pytest.mark.parametrize("channels", [7, 20])
def test_torch_warp_for_gpus_matches_the_opencv_warp(w, h, channels):
    import torch

    from schp.utils.transforms import warp_argmax_torch

    size = (473, 473) if channels == 20 else (512, 512)
    logits = np.random.default_rng(2).normal(size=size + (channels,)).astype(np.float32)
    center, scale = box_center_scale(w, h)
    expected = transform_logits(logits, center, scale, w, h, size).argmax(axis=2)
    got = warp_argmax_torch(torch.from_numpy(logits).permute(2, 0, 1).contiguous(),
                            output_to_input_map(center, scale, size), w, h, band_bytes=1 << 16).numpy()
    assert got.dtype == np.uint8
    assert (got != expected).sum() <= max(1, expected.size // 1_000_000)  # float ties only


@pytest.mark.parametrize("band_bytes", [1 << 12, 1 << 30])
def test_labels_are_the_argmax_of_the_inverse_warp_in_any_band_size(band_bytes, monkeypatch):
    """The running maximum over channels, band by band (here 4 KiB bands, i.e. many of them, and one
    band), gives exactly np.argmax of the whole-image inverse warp, ties included."""
    import schp.inference

    rng = np.random.default_rng(5)
    logits = rng.normal(size=(64, 64, 7)).astype(np.float32)
    logits[:20, :, 4] = logits[:20, :, 2]  # exact ties: the lower class wins
    center, scale = box_center_scale(90, 130)
    monkeypatch.setattr(schp.inference, "BAND_BYTES", band_bytes)
    warped = transform_logits(logits, center, scale, 90, 130, (64, 64))
    full = np.empty_like(warped)
    labels = labels_from_logits(logits, center, scale, 90, 130, (64, 64), full)
    np.testing.assert_array_equal(full, warped)
    np.testing.assert_array_equal(labels, warped.argmax(axis=2))
    assert (labels == 2).sum() > 0 and (labels == 4).sum() > 0
