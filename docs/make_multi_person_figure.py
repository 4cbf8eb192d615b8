#!/usr/bin/env python3
"""docs/multi_person_released.png: the released multi-person pipeline's own outputs for its group photo.

Made from the original authors' results (their detector and CIHP checkpoints), not from this project:
photo | class map (palette colours) | part map (one colour per part id, person outlines).
usage: python docs/make_multi_person_figure.py PHOTO GLOBAL_PNG INSTANCE_PNG PERSONS_PNG OUT_PNG
"""
import sys
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from schp.multi_person.outputs import PALETTE, person_colors  # noqa: E402


def main(photo, global_png, instance_png, persons_png, out, width=400):
    image = cv2.imread(photo)
    classes = np.array(Image.open(global_png))
    parts = np.array(Image.open(instance_png))
    persons = np.array(Image.open(persons_png))
    class_rgb = np.array(PALETTE, np.uint8).reshape(-1, 3)[:, ::-1][classes]
    part_rgb = np.zeros_like(image)
    part_rgb[parts > 0] = person_colors(int(parts.max()) + 1)[parts[parts > 0]]
    for k in np.unique(persons):
        if k:
            contours, _ = cv2.findContours((persons == k).astype(np.uint8), cv2.RETR_EXTERNAL,
                                           cv2.CHAIN_APPROX_SIMPLE)
            cv2.drawContours(part_rgb, contours, -1, (255, 255, 255), 3)
    height = round(image.shape[0] * width / image.shape[1])
    panels = [cv2.resize(p, (width, height), interpolation=cv2.INTER_AREA if p is image else cv2.INTER_NEAREST)
              for p in (image, class_rgb, part_rgb)]
    cv2.imwrite(out, np.concatenate(panels, axis=1), [cv2.IMWRITE_PNG_COMPRESSION, 9])


if __name__ == "__main__":
    main(*sys.argv[1:6])
