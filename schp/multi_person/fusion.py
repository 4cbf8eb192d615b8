"""Fusion of global and local logits into a class map, a person map and a part map, with confidences.

The released extension's last step, value for value: local (crop) logits are pasted back over their
crop boxes (foreground channels averaged over the crops covering a pixel, background the minimum, +inf
where no crop reaches), added to the global logits in float64, and the argmax gives the class map.
Persons keep only foreground pixels; every (person, class) pair becomes a part id; unlabelled pixels of
a class connected to a part of that class join it (the original's flood fill, here per connected
component); each part's confidence is the mean detection-score-weighted fused logit of its class.

Everything runs in bands of rows, so memory stays a few bands of float64 logits beyond the inputs.
"""
from dataclasses import dataclass, field
from typing import Dict, List, Sequence, Tuple

import cv2
import numpy as np

from schp.utils.transforms import row_bands

MAX_PARTS = 255  # part ids are written as an 8-bit PNG
BAND_BYTES = 32 << 20


@dataclass
class Fused:
    """The fused maps of one image."""
    classes: np.ndarray  # H x W uint8 class map (global_parsing)
    persons: np.ndarray  # H x W int32 person map after growth (global_tag)
    parts: np.ndarray  # H x W uint8 part map (instance_parsing)
    part_classes: Dict[int, int] = field(default_factory=dict)  # part id -> class
    confidences: List[Tuple[int, float]] = field(default_factory=list)  # (class, confidence) per part id
    tags: List[Tuple[int, float, Tuple[int, int, int, int]]] = field(default_factory=list)  # person, score, box
    parts_capped: bool = False  # more than MAX_PARTS (person, class) pairs: the rest got no part id


def fused_rows(global_logits: np.ndarray, crop_logits: Sequence[np.ndarray],
               crop_boxes: Sequence[Tuple[int, int, int, int]], start: int, stop: int) -> np.ndarray:
    """Rows start..stop of the fused logits G + L (float64), L being the pasted-back crop logits.

    Per pixel, L's foreground channels are the sum of the covering crops' logits (added in crop order,
    in float64) divided by their number (0 where none), its background channel their minimum (+inf
    where none).
    """
    width, channels = global_logits.shape[1], global_logits.shape[2]
    total = np.zeros((stop - start, width, channels), dtype=np.float64)
    total[:, :, 0] = np.inf
    count = np.zeros((stop - start, width), dtype=np.int32)
    for logits, (x0, y0, x1, y1) in zip(crop_logits, crop_boxes):
        r0, r1 = max(y0, start), min(y1 + 1, stop)
        if r0 >= r1:
            continue
        src = logits[r0 - y0:r1 - y0]
        dst = total[r0 - start:r1 - start, x0:x1 + 1]
        dst[:, :, 1:] += src[:, :, 1:]
        np.minimum(dst[:, :, 0], src[:, :, 0], out=dst[:, :, 0])
        count[r0 - start:r1 - start, x0:x1 + 1] += 1
    count[count == 0] = 1
    total[:, :, 1:] /= count[:, :, None]
    total += global_logits[start:stop]
    return total


def classify(global_logits: np.ndarray, crop_logits: Sequence[np.ndarray],
             crop_boxes: Sequence[Tuple[int, int, int, int]]) -> Tuple[np.ndarray, np.ndarray]:
    """(class map uint8 = argmax of the fused logits, ties to the lowest class; the fused logit of that
    class per pixel, float64), computed band by band."""
    height, width, channels = global_logits.shape
    classes = np.zeros((height, width), dtype=np.uint8)
    best = np.empty((height, width), dtype=np.float64)
    rows = max(1, BAND_BYTES // max(1, width * channels * 8))
    for start, stop in row_bands(height, rows):
        fused = fused_rows(global_logits, crop_logits, crop_boxes, start, stop)
        classes[start:stop] = np.argmax(fused, axis=2)
        best[start:stop] = np.max(fused, axis=2)
    return classes, best


def assign_parts(classes: np.ndarray, persons: np.ndarray, legacy_person_count: bool = False):
    """Part map: one id per (person, class > 0) pair present, persons then classes ascending.

    Returns (parts uint8, {part id: class}, capped). With `legacy_person_count` the persons are
    1..(number of distinct person values - 1), as the original counted them (a person id past that
    count, e.g. after a person lost all its pixels, gets no parts).
    """
    parts = np.zeros(classes.shape, dtype=np.uint8)
    present = (persons > 0) & (classes > 0)
    if legacy_person_count:
        count = len(np.unique(persons)) - 1
        present &= persons <= count
    keys = persons[present].astype(np.int64) * 256 + classes[present]
    pairs = np.unique(keys)
    capped = len(pairs) > MAX_PARTS
    pairs = pairs[:MAX_PARTS]
    slot = np.minimum(np.searchsorted(pairs, keys), max(len(pairs) - 1, 0))
    kept = pairs[slot] == keys if len(pairs) else np.zeros(len(keys), dtype=bool)
    parts[present] = np.where(kept, slot + 1, 0)
    part_classes = {j + 1: int(key % 256) for j, key in enumerate(pairs)}
    return parts, part_classes, capped


_NEIGHBOURS = [(-1, 0), (0, 1), (1, 0), (0, -1), (1, 1), (1, -1), (-1, 1), (-1, -1)]


def grow_parts(parts: np.ndarray, persons: np.ndarray, classes: np.ndarray) -> None:
    """In place: every 8-connected region of unlabelled pixels of class c that touches a part of class c
    takes the part and person of the first touching part pixel in raster order (the original's flood
    fill from each labelled pixel in raster order, which gives exactly this)."""
    height, width = parts.shape
    for c in np.unique(classes[parts != 0]):
        if c == 0:
            continue
        of_class = classes == c
        rows = np.flatnonzero(of_class.any(axis=1))
        cols = np.flatnonzero(of_class.any(axis=0))
        r0, r1 = max(rows[0] - 1, 0), min(rows[-1] + 2, height)
        c0, c1 = max(cols[0] - 1, 0), min(cols[-1] + 2, width)
        sub_parts = parts[r0:r1, c0:c1]
        sub_class = of_class[r0:r1, c0:c1]
        empty = sub_class & (sub_parts == 0)
        if not empty.any():
            continue
        seeds = sub_class & (sub_parts != 0)
        h, w = empty.shape
        big = np.iinfo(np.int64).max
        index = np.arange(r0 * width, r1 * width, dtype=np.int64).reshape(h, width)[:, c0:c1]
        seed_index = np.full((h + 2, w + 2), big, dtype=np.int64)
        seed_index[1:-1, 1:-1] = np.where(seeds, index, big)
        nearest = np.full((h, w), big, dtype=np.int64)
        for dy, dx in _NEIGHBOURS:
            np.minimum(nearest, seed_index[1 + dy:1 + dy + h, 1 + dx:1 + dx + w], out=nearest)
        count, labels = cv2.connectedComponents(empty.astype(np.uint8), connectivity=8, ltype=cv2.CV_32S)
        comp = labels[empty]
        first = np.full(count, big, dtype=np.int64)
        np.minimum.at(first, comp, nearest[empty])
        source = first[comp]
        grown = source != big
        if not grown.any():
            continue
        ys, xs = np.nonzero(empty)
        ys, xs, source = ys[grown] + r0, xs[grown] + c0, source[grown]
        parts[ys, xs] = parts.flat[source]
        persons[ys, xs] = persons.flat[source]


def part_confidences(parts: np.ndarray, part_classes: Dict[int, int], persons: np.ndarray,
                     scores: Sequence[float], best: np.ndarray) -> List[Tuple[int, float]]:
    """(class, confidence) per part id ascending: the mean over the part's pixels of the person's
    detection score times the fused logit of the part's class (which is each pixel's highest)."""
    weight = np.concatenate([[0.0], np.asarray(scores, dtype=np.float64)])[persons]
    flat_parts = parts.ravel()
    order = np.argsort(flat_parts, kind="stable")  # raster order within each part
    bounds = np.searchsorted(flat_parts[order], np.arange(0, MAX_PARTS + 2))
    weight, best = weight.ravel(), best.ravel()
    result = []
    for j in sorted(part_classes):
        members = order[bounds[j]:bounds[j + 1]]
        picked = weight[members] * best[members]
        result.append((part_classes[j], picked.sum() / len(picked)))
    return result


def fuse(global_logits: np.ndarray, crop_logits: Sequence[np.ndarray], person_map: np.ndarray,
         scores: Sequence[float], crop_boxes: Sequence[Tuple[int, int, int, int]],
         legacy_person_count: bool = False) -> Fused:
    """All of the fusion step for one image (global_logits H x W x C, crop_logits h_k x w_k x C)."""
    classes, best = classify(global_logits, crop_logits, crop_boxes)
    persons = person_map.astype(np.int32, copy=True)
    persons[classes == 0] = 0
    parts, part_classes, capped = assign_parts(classes, persons, legacy_person_count)
    grow_parts(parts, persons, classes)
    confidences = part_confidences(parts, part_classes, persons, scores, best)
    tags = [(int(k), float(scores[k - 1]), tuple(int(v) for v in crop_boxes[k - 1]))
            for k in np.unique(persons) if k != 0]
    return Fused(classes, persons, parts, part_classes, confidences, tags, capped)


def nobody(height: int, width: int) -> Fused:
    """The fused maps of an image without persons: all background (what the fusion gives: +inf
    background logits everywhere)."""
    return Fused(np.zeros((height, width), np.uint8), np.zeros((height, width), np.int32),
                 np.zeros((height, width), np.uint8))
