"""Geometry of the SCHP extractor: the affine crop into the network and the inverse warp of its logits.

Follows the published SCHP code (datasets/simple_extractor_dataset.py, utils/transforms.py) with the
corner-aligned destination of the IntegratedPIFu fork; OpenCV's fixed-point bilinear is part of the
contract, so the warps go through cv2 exactly as the original did (SPEC.md section 1).
"""
from typing import Iterator, Tuple

import cv2
import numpy as np

Size = Tuple[int, int]  # (height, width)
# The input contract of the released models: BGR order, x/255, then per-channel mean/std (B, G, R).
MEAN_BGR = (0.406, 0.456, 0.485)
STD_BGR = (0.225, 0.224, 0.229)


def box_center_scale(width: int, height: int, aspect_ratio: float = 1.0) -> Tuple[np.ndarray, np.ndarray]:
    """Center and scale (both float32, x then y) of the whole-image box (0, 0, w-1, h-1).

    The box is widened or heightened to the network's aspect ratio; no padding, no rotation.
    """
    x, y, w, h = 0.0, 0.0, float(width - 1), float(height - 1)
    center = np.array([x + w * 0.5, y + h * 0.5], dtype=np.float32)
    if w > aspect_ratio * h:
        h = w / aspect_ratio
    elif w < aspect_ratio * h:
        w = h * aspect_ratio
    return center, np.array([w, h], dtype=np.float32)


def _third_point(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    direction = a - b
    return b + np.array([-direction[1], direction[0]], dtype=np.float32)


def get_affine_transform(center: np.ndarray, scale: np.ndarray, output_size: Size,
                         inv: bool = False, rotation: float = 0.0) -> np.ndarray:
    """2 x 3 float64 matrix mapping image -> network input (or back with `inv`).

    Built like the original, from three float32 point pairs through cv2.getAffineTransform, so the
    matrix is bit-identical to the one the released pipeline used (the fixed-point warp is sensitive
    to its last bits). Corner-aligned: the destination centre is ((in_w-1)/2, (in_h-1)/2).
    `rotation` (degrees, training augmentation) turns the content counter-clockwise about the centre.
    """
    dst_h, dst_w = output_size
    if rotation:
        sn, cs = np.sin(np.pi * rotation / 180), np.cos(np.pi * rotation / 180)
        point = [0, scale[0] * -0.5]  # the original's get_dir, same float types and order
        src_dir = np.array([point[0] * cs - point[1] * sn, point[0] * sn + point[1] * cs])
    else:
        src_dir = np.array([0.0, scale[0] * -0.5], dtype=np.float32)
    dst_dir = np.array([0.0, (dst_w - 1) * -0.5], dtype=np.float32)
    src = np.zeros((3, 2), dtype=np.float32)
    dst = np.zeros((3, 2), dtype=np.float32)
    src[0] = center
    src[1] = center + src_dir
    dst[0] = [(dst_w - 1) * 0.5, (dst_h - 1) * 0.5]
    dst[1] = np.array([(dst_w - 1) * 0.5, (dst_h - 1) * 0.5]) + dst_dir
    src[2] = _third_point(src[0], src[1])
    dst[2] = _third_point(dst[0], dst[1])
    if inv:
        return cv2.getAffineTransform(dst, src)
    return cv2.getAffineTransform(src, dst)


def warp_to_input(image: np.ndarray, center: np.ndarray, scale: np.ndarray, input_size: Size) -> np.ndarray:
    """Crop-and-resize an H x W x 3 uint8 BGR image to in_h x in_w x 3 uint8 (OpenCV bilinear, black border)."""
    trans = get_affine_transform(center, scale, input_size)
    return cv2.warpAffine(image, trans, (int(input_size[1]), int(input_size[0])), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=(0, 0, 0))


def invert_affine(matrix: np.ndarray) -> np.ndarray:
    """cv2.invertAffineTransform's arithmetic, in the same order as warpAffine's internal inversion.

    warpAffine inverts the matrix it is given unless WARP_INVERSE_MAP is set; doing the inversion here
    (bit-identically) lets us warp a band of rows by shifting the already-inverted matrix.
    """
    m = [float(v) for v in np.asarray(matrix, dtype=np.float64).ravel()]
    d = m[0] * m[4] - m[1] * m[3]
    d = 1.0 / d if d != 0 else 0.0
    a11, a22 = m[4] * d, m[0] * d
    m[0], m[1], m[3], m[4] = a11, m[1] * -d, m[3] * -d, a22
    b1 = -m[0] * m[2] - m[1] * m[5]
    b2 = -m[3] * m[2] - m[4] * m[5]
    m[2], m[5] = b1, b2
    return np.array(m, dtype=np.float64).reshape(2, 3)


def output_to_input_map(center: np.ndarray, scale: np.ndarray, input_size: Size) -> np.ndarray:
    """2 x 3 matrix sending an output (image) pixel to its source position in the network's logits."""
    return invert_affine(get_affine_transform(center, scale, input_size, inv=True))


def row_bands(height: int, rows: int) -> Iterator[Tuple[int, int]]:
    """(start, stop) of consecutive bands of at most `rows` rows covering 0..height."""
    for start in range(0, height, rows):
        yield start, min(start + rows, height)


def warp_channel_rows(channel: np.ndarray, out_to_in: np.ndarray, width: int, start: int, stop: int) -> np.ndarray:
    """Rows start..stop of one inverse-warped logit channel: in_h x in_w float32 -> (stop-start) x width.

    One channel per call, as the original's transform_logits did; a band is the whole-image warp
    shifted by `start` rows (identical up to the last float bit, see tests/test_transforms.py).
    """
    band = out_to_in.copy()
    band[:, 2] += band[:, 1] * start
    return cv2.warpAffine(channel, band, (width, stop - start), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=0)


def _opencv_taps(position_1024: np.ndarray, source_size: int):
    """Source taps and bilinear weights of OpenCV's fixed-point warp along one axis.

    `position_1024` is the source coordinate already rounded to 1/1024 px, as warpAffine does
    (AB_BITS = 10); it adds half a 1/32 step and keeps 1/32 px (INTER_BITS = 5). Taps outside the
    source get weight 0 (BORDER_CONSTANT 0). Returns (index int64 n x 2, weight float32 n x 2).
    """
    fixed = (position_1024 + 16) >> 5
    first = fixed >> 5
    fraction = (fixed & 31).astype(np.float32) * np.float32(1.0 / 32)
    index = np.stack([first, first + 1], axis=1)
    weight = np.stack([np.float32(1) - fraction, fraction], axis=1)
    weight[(index < 0) | (index >= source_size)] = 0
    return np.clip(index, 0, source_size - 1), weight


def warp_argmax_torch(logits, out_to_in: np.ndarray, width: int, height: int, band_bytes: int = 64 << 20):
    """Inverse warp and argmax on the logits' own device (the CUDA path): C x in_h x in_w -> H x W uint8.

    Replicates warpAffine's fixed-point sampling for the axis-aligned matrices of this pipeline, so the
    labels equal those of the cv2 path up to float rounding (tests/test_transforms.py measures it).
    """
    import torch

    if out_to_in[0, 1] != 0 or out_to_in[1, 0] != 0:
        raise ValueError("warp_argmax_torch handles axis-aligned transforms only")
    channels, in_h, in_w = logits.shape
    m = out_to_in
    # as warpAffine: x from round(M00*x*1024) + round(M02*1024), y from round((M11*y + M12)*1024)
    x_1024 = np.rint(m[0, 0] * np.arange(width) * 1024.0).astype(np.int64) + np.int64(np.rint(m[0, 2] * 1024.0))
    y_1024 = np.rint((m[1, 1] * np.arange(height) + m[1, 2]) * 1024.0).astype(np.int64)
    x_index, x_weight = (torch.from_numpy(a).to(logits.device) for a in _opencv_taps(x_1024, in_w))
    y_index, y_weight = _opencv_taps(y_1024, in_h)
    labels = torch.empty((height, width), dtype=torch.uint8, device=logits.device)
    rows = max(1, band_bytes // max(1, channels * width * 4))
    for start, stop in row_bands(height, rows):
        yi, yw = (torch.from_numpy(a[start:stop]).to(logits.device) for a in (y_index, y_weight))
        across = logits[:, yi[:, 0], :] * yw[:, 0, None] + logits[:, yi[:, 1], :] * yw[:, 1, None]
        band = across[:, :, x_index[:, 0]] * x_weight[:, 0] + across[:, :, x_index[:, 1]] * x_weight[:, 1]
        labels[start:stop] = band.argmax(dim=0).to(torch.uint8)
    return labels
