"""Labelled image sets in the released layout, shared by evaluation and training.

    <root>/<split>_id.txt              one id per line
    <root>/<split>_images/<id>.jpg     the image (any format OpenCV decodes)
    <root>/<split>_segmentations/<id>.png   class indices, 255 = ignore

Labels are read as raw indices (8-bit grey or palette PNG); an RGB label is refused, since its colours
are not class ids. Every problem is reported as (file, reason), so a command can name it in one line.
"""
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np

from schp.data.decode import DEFAULT_MAX_PIXELS, ImageError, open_checked

from schp.errors import SetupError

IGNORE_LABEL = 255


class LabelledDataError(SetupError):
    """A labelled set that cannot be used at all (e.g. its id file is missing); the message names the file."""


@dataclass(frozen=True)
class Sample:
    id: str
    image: Path
    label: Path


def id_file(root: Path, split: str) -> Path:
    return Path(root) / f"{split}_id.txt"


def read_ids(root: Path, split: str) -> List[str]:
    """The ids of a split, in file order; blank lines are skipped, an id that is not a plain name is refused."""
    path = id_file(root, split)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise LabelledDataError(f"{path}: no such id file (expected one id per line)") from None
    except (OSError, UnicodeDecodeError) as err:
        raise LabelledDataError(f"{path}: cannot read: {getattr(err, 'strerror', None) or err}") from None
    ids = []
    for number, line in enumerate(text.splitlines(), 1):
        name = line.strip()
        if not name:
            continue
        if "/" in name or "\\" in name or name in (".", ".."):
            raise LabelledDataError(f"{path}:{number}: id {name!r} is not a plain file name")
        ids.append(name)
    if not ids:
        raise LabelledDataError(f"{path}: no ids in it")
    return ids


def list_samples(root: Path, split: str, image_ext: str = ".jpg",
                 label_dir: Optional[str] = None) -> List[Sample]:
    """Samples of a split (paths only; nothing is opened but the id file)."""
    root = Path(root)
    labels = root / (label_dir or f"{split}_segmentations")
    return [Sample(i, root / f"{split}_images" / f"{i}{image_ext}", labels / f"{i}.png")
            for i in read_ids(root, split)]


def read_label(path: Path, max_pixels: Optional[int] = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """H x W uint8 class indices of a label PNG ('L' or 'P' mode), or ValueError with the reason.

    The header is checked first, as for images (`max_pixels`), so a label too large to hold is one
    refused file."""
    path = Path(path)
    if not path.exists():
        raise ValueError("no such label file")
    try:
        with open_checked(path, max_pixels) as image:
            mode = image.mode
            if mode in ("L", "P"):
                return np.array(image, dtype=np.uint8)
            if mode in ("I", "I;16", "I;16B", "I;16L"):
                values = np.array(image)
                if values.size and (values.min() < 0 or values.max() > 255):
                    raise ValueError(f"16-bit label with values outside 0..255 (max {values.max()})")
                return values.astype(np.uint8)
    except ImageError as err:
        raise ValueError(str(err)) from None
    except (OSError, SyntaxError) as err:
        raise ValueError(f"not a readable PNG ({err})") from None
    raise ValueError(f"label PNG is {mode}, not class indices: save labels as 8-bit grey or palette PNGs")


def label_problem(label: np.ndarray, num_classes: int,
                  image_size: Optional[Tuple[int, int]] = None) -> Optional[str]:
    """Why a label map cannot be used with `num_classes` classes (None when it can).

    `image_size` is the image's (height, width), which the label must match.
    """
    if image_size is not None and tuple(label.shape[:2]) != tuple(image_size):
        return (f"label is {label.shape[1]}x{label.shape[0]} but its image is "
                f"{image_size[1]}x{image_size[0]}")
    bad = np.unique(label[(label >= num_classes) & (label != IGNORE_LABEL)])
    if bad.size:
        shown = ", ".join(str(v) for v in bad[:5]) + (" ..." if bad.size > 5 else "")
        return f"label values {shown} are not classes 0..{num_classes - 1} (or 255 = ignore)"
    return None
