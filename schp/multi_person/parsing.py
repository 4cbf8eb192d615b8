"""Global and local parsing: logits of the whole image and of each person's crop, at their own sizes.

Both go through the shared model path (HumanParser.parse: the affine crop of the whole file, the network
with the parser's flip / multi-scale averaging, the per-channel inverse warp), exactly what the
released extension's evaluator writes as `.npy` logits.
"""
from typing import List, Sequence, Tuple

import cv2
import numpy as np

from schp.inference import HumanParser

CROP_JPEG_QUALITY = 95  # the released pipeline saved crops with cv2.imwrite's default and read them back


def crop_images(image: np.ndarray, crop_boxes: Sequence[Tuple[int, int, int, int]],
                jpeg_roundtrip: bool = True) -> List[np.ndarray]:
    """The person crops `image[Y0:Y1+1, X0:X1+1]`; by default through a JPEG encode and decode, as the
    original's crops went through files (a lossy step that changes the logits a little)."""
    crops = []
    for x0, y0, x1, y1 in crop_boxes:
        crop = np.ascontiguousarray(image[y0:y1 + 1, x0:x1 + 1])
        if jpeg_roundtrip:
            ok, data = cv2.imencode(".jpg", crop, [cv2.IMWRITE_JPEG_QUALITY, CROP_JPEG_QUALITY])
            if not ok:
                raise ValueError(f"cannot encode a {crop.shape[1]}x{crop.shape[0]} crop as JPEG")
            crop = cv2.imdecode(data, cv2.IMREAD_COLOR)
        crops.append(crop)
    return crops


def image_logits(parser: HumanParser, images: Sequence[np.ndarray], batch_size: int = 1) -> List[np.ndarray]:
    """H x W x C float32 logits of each image at its own size, `batch_size` images per forward pass."""
    out = []
    for start in range(0, len(images), max(1, batch_size)):
        out.extend(logits for _, logits in parser.parse(images[start:start + batch_size], with_logits=True))
    return out
