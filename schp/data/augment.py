"""Training augmentation and edge targets of SCHP: scale jitter, rotation, mirror, affine crop.

Each sample draws from its own random generators (made by the caller from seed, epoch and index), so
the augmentation of a sample does not depend on the loader's worker count and a resumed run repeats
it exactly. The draws follow the released order: scale (normal), rotate-or-not, angle (normal, only
when rotating), mirror-or-not.
"""
import random
from typing import Sequence, Tuple

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from schp.utils.transforms import box_center_scale, get_affine_transform

IGNORE_LABEL = 255
# The released code swapped these for every dataset (LIP's left/right arm, leg, shoe).
LEGACY_LIP_PAIRS = ((14, 15), (16, 17), (18, 19))


def flip_lookup(pairs: Sequence[Tuple[int, int]]) -> np.ndarray:
    """256-entry uint8 table exchanging each (left, right) pair; other values (255 too) stay."""
    table = np.arange(256, dtype=np.uint8)
    for left, right in pairs:
        table[left], table[right] = right, left
    return table


def augment(image: np.ndarray, label: np.ndarray, input_size: Tuple[int, int], rng: np.random.Generator,
            gates: random.Random, flip_pairs: Sequence[Tuple[int, int]], scale_factor: float = 0.25,
            rotation_factor: float = 30.0, rotation_prob: float = 0.6, flip_prob: float = 0.5):
    """Randomly scaled, rotated and mirrored crop of (H x W x 3 uint8 BGR, H x W uint8 label).

    Returns the in_h x in_w x 3 image (bilinear, black border) and in_h x in_w label (nearest,
    border 255 = ignore). Mirroring exchanges the classes of `flip_pairs`.
    """
    height, width = label.shape[:2]
    center, scale = box_center_scale(width, height, input_size[1] / input_size[0])
    scale = scale * np.clip(rng.standard_normal() * scale_factor + 1, 1 - scale_factor, 1 + scale_factor)
    rotation = 0.0
    if gates.random() <= rotation_prob:
        rotation = float(np.clip(rng.standard_normal() * rotation_factor, -2 * rotation_factor,
                                 2 * rotation_factor))
    if gates.random() <= flip_prob:
        image = image[:, ::-1]
        label = flip_lookup(flip_pairs)[label[:, ::-1]]
        center[0] = width - center[0] - 1
    return crop(image, label, center, scale.astype(np.float32), input_size, rotation)


def crop(image: np.ndarray, label: np.ndarray, center: np.ndarray, scale: np.ndarray,
         input_size: Tuple[int, int], rotation: float = 0.0):
    """The affine crop of image and label (no randomness); the whole image when not augmenting."""
    matrix = get_affine_transform(center, scale, input_size, rotation=rotation)
    size = (int(input_size[1]), int(input_size[0]))
    image = cv2.warpAffine(np.ascontiguousarray(image), matrix, size, flags=cv2.INTER_LINEAR,
                           borderMode=cv2.BORDER_CONSTANT, borderValue=(0, 0, 0))
    label = cv2.warpAffine(np.ascontiguousarray(label), matrix, size, flags=cv2.INTER_NEAREST,
                           borderMode=cv2.BORDER_CONSTANT, borderValue=IGNORE_LABEL)
    return image, label


def whole_image_crop(image: np.ndarray, label: np.ndarray, input_size: Tuple[int, int]):
    """The crop used for splits trained without augmentation."""
    height, width = label.shape[:2]
    center, scale = box_center_scale(width, height, input_size[1] / input_size[0])
    return crop(image, label, center, scale, input_size)


@torch.no_grad()
def edge_target(labels: torch.Tensor) -> torch.Tensor:
    """B x H x W float {0, 1} edges of B x H x W label maps, as the released training computes them.

    A pixel is marked where it differs from its lower, right, lower-right or lower-left neighbour
    (the vertical pair marks the lower pixel), both values not 255; then a 3 x 3 dilation. Ignored
    pixels are non-edge, never ignored themselves.
    """
    lab = labels.float()
    valid = lab != IGNORE_LABEL
    edge = torch.zeros_like(lab)
    # vertical: mark the lower pixel
    diff = (lab[:, 1:, :] != lab[:, :-1, :]) & valid[:, 1:, :] & valid[:, :-1, :]
    edge[:, 1:, :][diff] = 1
    # horizontal: mark the left pixel
    diff = (lab[:, :, :-1] != lab[:, :, 1:]) & valid[:, :, :-1] & valid[:, :, 1:]
    edge[:, :, :-1][diff] = 1
    # diagonal (y, x) vs (y+1, x+1)
    diff = (lab[:, :-1, :-1] != lab[:, 1:, 1:]) & valid[:, :-1, :-1] & valid[:, 1:, 1:]
    edge[:, :-1, :-1][diff] = 1
    # anti-diagonal (y, x) vs (y+1, x-1)
    diff = (lab[:, :-1, 1:] != lab[:, 1:, :-1]) & valid[:, :-1, 1:] & valid[:, 1:, :-1]
    edge[:, :-1, 1:][diff] = 1
    kernel = torch.ones((1, 1, 3, 3), dtype=edge.dtype, device=edge.device)
    dilated = F.conv2d(edge[:, None], kernel, padding=1)[:, 0]
    return (dilated != 0).float()
