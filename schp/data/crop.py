"""Decoded images to network-ready crops: the affine crop of SCHP's extractor, in DataLoader workers."""
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
from torch.utils.data import Dataset

from schp.data.decode import DEFAULT_MAX_PIXELS, ImageError, read_image
from schp.errors import describe_exception
from schp.utils.transforms import box_center_scale, warp_to_input


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

    def __init__(self, paths: Sequence[Path], input_size: Tuple[int, int],
                 max_pixels: Optional[int] = DEFAULT_MAX_PIXELS):
        self.paths = list(paths)
        self.input_size = tuple(input_size)
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> Prepared:
        return decode_and_crop(index, lambda: read_image(self.paths[index], self.max_pixels), self.input_size)


def decode_and_crop(index: int, load: Callable[[], np.ndarray], input_size: Tuple[int, int]) -> Prepared:
    """`load()` (the decoded BGR pixels: read_image of a file, decode_image of an object's bytes),
    then the crop; what fails is this input's alone and travels back as the reason."""
    # never as an exception that would end the DataLoader (and with it the run)
    try:
        image = load()
    except ImageError as err:
        return Prepared(index, None, error=str(err))
    except MemoryError:
        return Prepared(index, None, error="out of memory while decoding")
    except Exception as err:
        return Prepared(index, None, error=f"cannot decode: {describe_exception(err)}")
    # a numpy array travels from the worker through a pipe; a tensor would need /dev/shm, which
    # is small in containers and fails with a hang rather than an error when full
    try:
        return prepare_image(index, image, input_size)
    except MemoryError:
        return Prepared(index, None, width=image.shape[1], height=image.shape[0],
                        error="out of memory while cropping")
    except Exception as err:
        return Prepared(index, None, width=image.shape[1], height=image.shape[0],
                        error=f"cannot crop: {describe_exception(err)}")


def collate_prepared(items: List[Prepared]) -> List[Prepared]:
    """Keep items as a list: images of different sizes share a batch, failures travel with them."""
    return items
