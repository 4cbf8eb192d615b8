#!/usr/bin/env python3
"""Region growing of the multi-person fusion: the released pixel-by-pixel flood fill vs ours.

On the released pipeline's own maps of the group photo (tests/data: class map and person map, 1200x900),
with the person map eroded by --erode pixels so that the growth has regions to fill. Both must give
the same part and person maps; prints the seconds of each, their ratio and the machine.
usage: python benchmarks/multi_person_growth.py [--erode 15] [--repeat 3]
"""
import argparse
import os
import platform
import sys
import time
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "tests" / "data"))
import multi_person_original as released  # noqa: E402
from schp.multi_person import fusion  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--erode", type=int, default=15)
    p.add_argument("--repeat", type=int, default=3)
    a = p.parse_args()
    classes = np.array(Image.open(ROOT / "tests/data/group_global_parsing.png"))
    persons = np.array(Image.open(ROOT / "tests/data/group_person_masks.png"))
    kernel = np.ones((2 * a.erode + 1, 2 * a.erode + 1), np.uint8)
    eroded = np.zeros_like(persons)
    for k in np.unique(persons):
        if k:
            eroded[cv2.erode((persons == k).astype(np.uint8), kernel) > 0] = k
    eroded[classes == 0] = 0
    t0 = time.perf_counter()
    theirs_t = eroded.copy()
    theirs_i, class_map = released.get_instance(classes, theirs_t)
    released.refine(theirs_i, theirs_t, classes, class_map)
    literal = time.perf_counter() - t0
    ours = []
    for _ in range(a.repeat):
        t0 = time.perf_counter()
        ours_t = eroded.astype(np.int32)
        ours_i, _, _ = fusion.assign_parts(classes, ours_t)
        fusion.grow_parts(ours_i, ours_t, classes)
        ours.append(time.perf_counter() - t0)
    assert np.array_equal(ours_i, theirs_i) and np.array_equal(ours_t, theirs_t), "results differ"
    grown = int(((eroded == 0) & (ours_t > 0)).sum())
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cpus, "
          f"load {os.getloadavg()[0]:.1f}")
    print(f"maps {classes.shape[1]}x{classes.shape[0]}, {int(ours_i.max())} parts, {grown} pixels grown")
    print(f"released loops: {literal:.2f} s; ours: {min(ours):.3f} s (best of {a.repeat}); "
          f"ratio {min(ours) / literal:.4f}; identical maps")


if __name__ == "__main__":
    main()
