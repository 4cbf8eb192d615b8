"""Which instances become persons: score threshold, mask NMS, and the expanded crop boxes.

As the released pipeline's crop step: instances are taken in descending score order and the first one
under the score threshold stops the scan; a mask that mostly overlaps persons already kept is dropped,
one that partly overlaps loses the contested pixels (the higher-scored person keeps them); each kept
person gets the next id in the person map and a crop box: the detector box widened by `expand` about its
centre, rounded half to even and clipped to the image (inclusive corners).
"""
from dataclasses import dataclass, field
from typing import List, Sequence, Tuple

import numpy as np

from schp.multi_person.instances import Instance

SCORE_THRESHOLD = 0.5
OVERLAP_THRESHOLD = 0.5
EXPAND_RATIO = 1.2
MAX_PERSONS = 255  # the person map is written as an 8-bit PNG


@dataclass
class People:
    """The persons kept in one image."""
    ids: np.ndarray  # H x W int32 person map, 0 = nobody, k = k-th kept person
    scores: List[float] = field(default_factory=list)
    boxes: List[Tuple[float, float, float, float]] = field(default_factory=list)  # detector boxes x0 y0 x1 y1
    crop_boxes: List[Tuple[int, int, int, int]] = field(default_factory=list)  # expanded, inclusive X0 Y0 X1 Y1
    dropped_over_cap: int = 0  # persons past MAX_PERSONS, not kept

    @property
    def count(self) -> int:
        return len(self.scores)


def expand_box(box: Sequence[float], width: int, height: int, ratio: float = EXPAND_RATIO) -> Tuple[int, int, int, int]:
    """The crop box of a detector box: widened by (ratio - 1) / 2 of its size on each side, then clipped."""
    x0, y0, x1, y1 = (float(v) for v in box)
    dx = (x1 - x0) * ((ratio - 1) / 2)
    dy = (y1 - y0) * ((ratio - 1) / 2)
    nx0 = 0 if x0 - dx < 0 else np.round(x0 - dx)
    ny0 = 0 if y0 - dy < 0 else np.round(y0 - dy)
    nx1 = width - 1 if x1 + dx > width - 1 else np.round(x1 + dx)
    ny1 = height - 1 if y1 + dy > height - 1 else np.round(y1 + dy)
    return int(nx0), int(ny0), int(nx1), int(ny1)


def select_people(instances: Sequence[Instance], height: int, width: int,
                  score_threshold: float = SCORE_THRESHOLD, overlap_threshold: float = OVERLAP_THRESHOLD,
                  expand: float = EXPAND_RATIO) -> People:
    """Mask NMS over score-sorted instances -> person map, scores and boxes."""
    people = People(np.zeros((height, width), dtype=np.int32))
    taken = np.zeros((height, width), dtype=bool)
    for inst in instances:
        if inst.score < score_threshold:
            break
        mask = np.asarray(inst.mask, dtype=bool)
        area = int(np.count_nonzero(mask))
        if area == 0:
            continue
        overlap = mask & taken
        inter = int(np.count_nonzero(overlap))
        if inter / area > overlap_threshold:
            continue
        if people.count == MAX_PERSONS:
            people.dropped_over_cap += 1
            continue
        if inter > 0:
            mask = mask & ~taken
        people.ids[mask] = people.count + 1
        taken |= mask
        people.scores.append(float(inst.score))
        people.boxes.append(tuple(float(v) for v in inst.box))
        people.crop_boxes.append(expand_box(inst.box, width, height, expand))
    return people
