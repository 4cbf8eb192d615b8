"""Images in, network-ready crops out: listing, decoding and the affine crop of SCHP's extractor.

Decoding follows cv2.imread(IMREAD_COLOR) (8-bit BGR, grey and palette expanded, alpha dropped,
16-bit scaled down, EXIF orientation applied), as the original did; what it would silently accept
but is damaged (empty, truncated) is refused here with a reason instead.
"""
import os
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import cv2
import numpy as np
from torch.utils.data import Dataset

from utils.transforms import box_center_scale, warp_to_input

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
JPEG_EOI, JPEG_SOS = b"\xff\xd9", b"\xff\xda"


class ImageError(Exception):
    """An input that cannot be parsed; the message is the reason, for one line naming the file."""


def is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def read_image(path: Path) -> np.ndarray:
    """H x W x 3 uint8 BGR pixels of an image file, or ImageError with the reason."""
    path = Path(path)
    if path.is_symlink() and not path.exists():
        try:
            path.stat()
        except OSError as err:
            if getattr(err, "errno", None) == 40:  # ELOOP
                raise ImageError("symbolic link loop") from None
        raise ImageError(f"broken symbolic link (to {os.readlink(path)})") from None
    try:
        data = path.read_bytes()
    except OSError as err:
        raise ImageError(f"cannot read: {err.strerror or err}") from None
    if not data:
        raise ImageError("empty file (0 bytes)")
    if data[:2] == b"\xff\xd8" and data.rfind(JPEG_EOI) < data.rfind(JPEG_SOS):
        # libjpeg decodes a cut JPEG with only a warning, grey-filling the rest: refuse it instead
        raise ImageError("truncated JPEG (no end-of-image marker after the last scan)")
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if image is None:
        head = data[:16].split(b"\n")[0]
        raise ImageError(f"not a decodable image (damaged or another format; starts with {head!r})")
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8 or 0 in image.shape:
        raise ImageError(f"decoded to an unexpected array {image.shape} {image.dtype}")
    return image


def list_images(input_dir: Path, recursive: bool = False,
                exclude: Optional[Path] = None) -> Tuple[List[Path], List[Path]]:
    """(images, others): files under `input_dir` relative to it, sorted, split by extension.

    Extensions match in any case. Folders are not followed through symbolic links (no loops);
    `exclude` (e.g. an output folder inside the input folder) is not walked.
    """
    input_dir = Path(input_dir)
    exclude_real = Path(os.path.realpath(exclude)) if exclude is not None else None
    images, others = [], []
    for folder, dirs, files in os.walk(input_dir):
        folder_path = Path(folder)
        dirs[:] = sorted(d for d in dirs if recursive and not d.startswith(".") and
                         Path(os.path.realpath(folder_path / d)) != exclude_real)
        for name in files:
            rel = (folder_path / name).relative_to(input_dir)
            (images if is_image_name(name) else others).append(rel)
        if not recursive:
            break
    return sorted(images, key=str), sorted(others, key=str)


@dataclass
class Prepared:
    """One input after decoding and cropping (or the reason it failed)."""
    index: int
    image: Optional[np.ndarray]  # in_h x in_w x 3 uint8, BGR
    center: Optional[np.ndarray] = None
    scale: Optional[np.ndarray] = None
    width: int = 0
    height: int = 0
    error: Optional[str] = None


def prepare_image(index: int, image: np.ndarray, input_size: Tuple[int, int]) -> Prepared:
    """The affine crop of a decoded H x W x 3 uint8 BGR image to the network's input size."""
    h, w = image.shape[:2]
    center, scale = box_center_scale(w, h, input_size[1] / input_size[0])
    return Prepared(index, warp_to_input(image, center, scale, input_size), center, scale, w, h)


class SimpleFolderDataset(Dataset):
    """Decodes and crops a list of image files; a failing file becomes a `Prepared` with `error`.

    Runs in DataLoader worker processes, so decoding and warping overlap the forward pass.
    """

    def __init__(self, paths: Sequence[Path], input_size: Tuple[int, int]):
        self.paths = list(paths)
        self.input_size = tuple(input_size)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> Prepared:
        try:
            image = read_image(self.paths[index])
        except ImageError as err:
            return Prepared(index, None, error=str(err))
        except MemoryError:
            return Prepared(index, None, error="out of memory while decoding")
        # a numpy array travels from the worker through a pipe; a tensor would need /dev/shm, which
        # is small in containers and fails with a hang rather than an error when full
        return prepare_image(index, image, self.input_size)


def collate_prepared(items: List[Prepared]) -> List[Prepared]:
    """Keep items as a list: images of different sizes share a batch, failures travel with them."""
    return items
