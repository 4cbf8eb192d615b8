"""Tiny labelled datasets for training tests: 64 x 64 images whose classes are coloured shapes.

Class c > 0 is a filled shape of a fixed colour at a random place; the label PNG (8-bit grey) holds the
class ids, with a thin 255 (ignore) outline around one shape like real annotations have.
"""
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np

COLOURS = [(30, 30, 30), (40, 40, 220), (40, 200, 40), (220, 60, 60), (40, 220, 220), (220, 40, 220),
           (220, 220, 40), (130, 130, 250), (250, 130, 130), (130, 250, 130)]


def make_split(root: Path, split: str, count: int, num_classes: int, size: int = 64, seed: int = 0,
               shapes: Sequence[int] = ()) -> None:
    root = Path(root)
    rng = np.random.default_rng(seed)
    (root / f"{split}_images").mkdir(parents=True, exist_ok=True)
    (root / f"{split}_segmentations").mkdir(parents=True, exist_ok=True)
    ids = []
    for i in range(count):
        height, width = size, size + (8 if i % 2 else 0)  # not all square
        image = np.empty((height, width, 3), np.uint8)
        image[:] = COLOURS[0]
        image = np.clip(image.astype(int) + rng.integers(-10, 10, image.shape), 0, 255).astype(np.uint8)
        label = np.zeros((height, width), np.uint8)
        for c in range(1, num_classes):
            x0, y0 = int(rng.integers(0, width - 20)), int(rng.integers(0, height - 20))
            w, h = int(rng.integers(10, 20)), int(rng.integers(10, 20))
            if c % 2:
                cv2.rectangle(label, (x0, y0), (x0 + w, y0 + h), c, -1)
            else:
                cv2.ellipse(label, (x0 + w // 2, y0 + h // 2), (w // 2, h // 2), 0, 0, 360, c, -1)
        for c in range(1, num_classes):
            image[label == c] = COLOURS[c % len(COLOURS)]
        if i % 3 == 0:
            cv2.rectangle(label, (2, 2), (10, 10), 255, 1)
        name = f"img_{split}_{i:03d}"
        cv2.imwrite(str(root / f"{split}_images" / f"{name}.jpg"), image, [cv2.IMWRITE_JPEG_QUALITY, 95])
        cv2.imwrite(str(root / f"{split}_segmentations" / f"{name}.png"), label)
        ids.append(name)
    (root / f"{split}_id.txt").write_text("\n".join(ids) + "\n")


def make_dataset(root: Path, num_classes: int, train: int = 4, val: int = 0, seed: int = 0) -> Path:
    make_split(root, "train", train, num_classes, seed=seed)
    if val:
        make_split(root, "val", val, num_classes, seed=seed + 1)
    return Path(root)
