"""A small synthetic CIHP-layout set with predictions in multi_person.py's layout, for the evaluator tests
and for the comparison with CIHP's reference script (tests/measure_cihp_oracle.py).

Four images, 2-3 persons each, every person a column of part bands with CIHP classes; part instance ids
as CIHP numbers them ((person - 1) * 20 + class). Predictions perturb the ground truth (shifted and
shrunk parts, wrong classes, a part split in two, a dropped part, a false positive, a part at exactly
IoU 0.5, an id without a txt line, two equal scores) so that the AP differs from threshold to threshold.
"""
from pathlib import Path
from typing import Tuple

import numpy as np
from PIL import Image

SIZES = [(48, 64), (56, 72), (40, 60), (64, 48)]  # (height, width)
PERSONS = [3, 2, 3, 2]
TOPS = [1, 2]  # hat, hair
MIDDLES = [5, 6, 7]  # upper-clothes, dress, coat
BOTTOMS = [9, 12, 16]  # pants, skirt, left leg
FEET = [18, 19]


def _save(array: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array.astype(np.uint8), mode="L").save(path)


def ground_truth(rng, h: int, w: int, persons: int):
    """(classes, persons map, part instances) of one image."""
    classes = np.zeros((h, w), np.uint8)
    humans = np.zeros((h, w), np.uint8)
    width = w // persons
    for k in range(1, persons + 1):
        x0, x1 = (k - 1) * width + 1, k * width - 1
        y0, y1 = int(rng.integers(1, 5)), h - int(rng.integers(1, 4))
        humans[y0:y1, x0:x1] = k
        bands = [int(rng.choice(TOPS)), 13, int(rng.choice(MIDDLES)), int(rng.choice(BOTTOMS)), int(rng.choice(FEET))]
        edges = np.linspace(y0, y1, len(bands) + 1).round().astype(int)
        for c, a, b in zip(bands, edges[:-1], edges[1:]):
            classes[a:b, x0:x1] = c
        if k == 1:  # arms at the sides of the middle band
            a, b = edges[2], edges[3]
            classes[a:b, x0:x0 + 2] = 14
            classes[a:b, x1 - 2:x1] = 15
    instances = np.where(classes > 0, (humans.astype(np.int32) - 1) * 20 + classes, 0).astype(np.uint8)
    return classes, humans, instances


def predictions(rng, classes, humans, instances, present_classes, image_index: int):
    """(class map, part map, txt lines, person map, tag lines) perturbing one image's ground truth."""
    h, w = classes.shape
    parts = np.zeros((h, w), np.int32)
    part_class = {}
    ids = [int(g) for g in np.unique(instances) if g]
    rng.shuffle(ids)
    j = 0
    for g in ids:
        if rng.random() < 0.12:
            continue  # missed
        mask = instances == g
        dy, dx = (int(v) for v in rng.integers(-3, 4, size=2))
        mask = np.roll(np.roll(mask, dy, 0), dx, 1)
        c = int(classes[instances == g][0])
        if rng.random() < 0.1:
            c = int(rng.choice(sorted(present_classes - {c})))  # a wrong class that exists in the set
        if rng.random() < 0.15:  # split in two: a duplicate, both may count
            rows = np.nonzero(mask.any(1))[0]
            if rows.size >= 2:
                half = rows[rows.size // 2]
                top, bottom = mask.copy(), mask.copy()
                top[half:] = False
                bottom[:half] = False
                for m in (top, bottom):
                    j += 1
                    parts[m] = j
                    part_class[j] = c
                continue
        j += 1
        parts[mask] = j
        part_class[j] = c
    if image_index == 0:  # a false positive in the background corner, and a part at exactly IoU 0.5
        j += 1
        parts[0:1, 0:3] = j
        part_class[j] = 13
        g = sorted(ids)[0]
        ys, xs = np.nonzero(instances == g)
        keep = np.zeros((h, w), bool)
        keep[ys[: ys.size // 2], xs[: ys.size // 2]] = True  # half of its pixels (row-major)
        j += 1
        parts[keep] = j
        part_class[j] = int(classes[instances == g][0])
    # the ids that kept pixels, renumbered 1..n in order (multi_person.py writes no line for a part
    # without pixels)
    kept = [k for k in range(1, j + 1) if (parts == k).any()]
    remap = np.zeros(j + 1, np.int32)
    for new, old in enumerate(kept, 1):
        remap[old] = new
    parts = remap[parts]
    cls = [part_class[old] for old in kept]
    scores = [round(float(s), 6) for s in rng.permutation(np.linspace(0.05, 0.95, len(kept))) + image_index * 1e-3]
    if image_index == 1:  # two equal scores within one class of one image
        repeated = [c for c in cls if cls.count(c) >= 2]
        same = [n for n in range(len(cls)) if repeated and cls[n] == repeated[0]]
        if same:
            scores[same[1]] = scores[same[0]]
    lines = [f"{c} {s}" for c, s in zip(cls, scores)]
    class_map = np.zeros((h, w), np.uint8)
    for n, c in enumerate(cls, 1):
        class_map[parts == n] = c
    noise = rng.random((h, w)) < 0.03
    class_map[noise] = rng.integers(0, 20, size=int(noise.sum()))
    if image_index == 2:  # a part id with no txt line: not a prediction
        parts[h - 2:, w - 3:] = len(cls) + 1
    # persons: the ground-truth persons shifted, one score per person present
    person_map = np.roll(humans, 1 + 2 * image_index, 1) * (rng.random((h, w)) > 0.05)
    present = [int(k) for k in np.unique(person_map) if k]
    tags = [f"{0.5 + 0.1 * k + image_index * 0.01:.6f} 0 0 {h - 1} {w - 1}" for k in present]
    return class_map, parts.astype(np.uint8), lines, person_map.astype(np.uint8), tags


def build_cihp_set(root: Path, seed: int = 0) -> Tuple[Path, Path]:
    """Writes `root/data` (CIHP layout, val_id.txt) and `root/pred` (multi_person.py's layout)."""
    rng = np.random.default_rng(seed)
    data, pred = Path(root) / "data", Path(root) / "pred"
    gts = [ground_truth(rng, h, w, n) for (h, w), n in zip(SIZES, PERSONS)]
    present = {int(c) for g in gts for c in np.unique(g[0]) if c}
    names = [f"{i:07d}" for i in range(1, len(SIZES) + 1)]
    for i, (name, (classes, humans, instances)) in enumerate(zip(names, gts)):
        h, w = classes.shape
        (data / "Images").mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((h, w, 3), 120, np.uint8)).save(data / "Images" / f"{name}.jpg")
        _save(classes, data / "Category_ids" / f"{name}.png")
        _save(humans, data / "Human_ids" / f"{name}.png")
        _save(instances, data / "Instance_ids" / f"{name}.png")
        class_map, parts, lines, persons, tags = predictions(rng, classes, humans, instances, present, i)
        _save(class_map, pred / "global_parsing" / f"{name}.png")
        _save(parts, pred / "instance_parsing" / f"{name}.png")
        (pred / "instance_parsing" / f"{name}.txt").write_text("".join(line + "\n" for line in lines))
        _save(persons, pred / "global_tag" / f"{name}.png")
        (pred / "global_tag" / f"{name}.txt").write_text("".join(t + "\n" for t in tags))
    (data / "val_id.txt").write_text("".join(n + "\n" for n in names))
    return data, pred
