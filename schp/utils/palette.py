"""Colours of the label maps: the Pascal VOC bit-interleaved colour map used by SCHP's extractor."""
from typing import List, Tuple


def get_palette(num_classes: int) -> List[int]:
    """Flat [r0, g0, b0, r1, ...] palette for PIL's putpalette, `num_classes` entries.

    Class j's bits, three at a time, go to the top bits of R, G and B (lowest triple highest).
    """
    palette = [0] * (num_classes * 3)
    for j in range(num_classes):
        lab, i = j, 0
        while lab:
            palette[j * 3 + 0] |= ((lab >> 0) & 1) << (7 - i)
            palette[j * 3 + 1] |= ((lab >> 1) & 1) << (7 - i)
            palette[j * 3 + 2] |= ((lab >> 2) & 1) << (7 - i)
            i += 1
            lab >>= 3
    return palette


def class_colors(num_classes: int) -> List[Tuple[int, int, int]]:
    """(r, g, b) of each class."""
    flat = get_palette(num_classes)
    return [tuple(flat[i:i + 3]) for i in range(0, len(flat), 3)]
