"""A labelled split as training samples: decoded, augmented, normalised; and the data check before training.

Augmentation runs for the splits `train` and `trainval` only (as released); every other split is
trained on the whole-image crop. Randomness comes from (seed, epoch, index, pass), never from a
global generator, so worker processes never share a stream and a resumed run repeats an epoch exactly.
"""
import random
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from schp.data.augment import augment, whole_image_crop
from schp.data.labelled import LabelledDataError, Sample, label_problem, list_samples, read_label
from schp.data.decode import ImageError, read_image
from schp.errors import SCHPError
from schp.utils.transforms import MEAN_BGR, STD_BGR

AUGMENTED_SPLITS = ("train", "trainval")


class DataError(SCHPError):
    """Training data that cannot be used; the message names the file."""


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """in_h x in_w x 3 uint8 BGR -> 3 x in_h x in_w float32, x/255 then per-channel (x - mean)/std."""
    x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div_(255)
    mean = torch.tensor(MEAN_BGR)[:, None, None]
    std = torch.tensor(STD_BGR)[:, None, None]
    return x.sub_(mean).div_(std)


def sample_generators(seed: int, epoch: int, index: int, stream: int):
    """(numpy Generator, random.Random) of one sample in one pass over the data."""
    sequence = np.random.SeedSequence([seed, epoch, index, stream])
    return np.random.default_rng(sequence), random.Random(int(sequence.generate_state(1)[0]))


class TrainingSet(Dataset):
    """(image 3 x in_h x in_w float32, label in_h x in_w int64) pairs of a labelled split."""

    def __init__(self, samples: Sequence[Sample], input_size: Tuple[int, int],
                 flip_pairs: Sequence[Tuple[int, int]], augmented: bool, seed: int = 0):
        self.samples = list(samples)
        self.input_size = tuple(int(v) for v in input_size)
        self.flip_pairs = tuple(flip_pairs)
        self.augmented = augmented
        self.seed = int(seed)
        self.epoch = 0
        self.stream = 0  # 0 = training pass, 1 = batch-norm re-estimation pass

    def set_epoch(self, epoch: int, stream: int = 0) -> None:
        self.epoch, self.stream = int(epoch), int(stream)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        sample = self.samples[index]
        try:
            image = read_image(sample.image)
        except ImageError as err:
            raise DataError(f"{sample.image}: {err}") from None
        try:
            label = read_label(sample.label)
        except ValueError as err:
            raise DataError(f"{sample.label}: {err}") from None
        if label.shape != image.shape[:2]:
            raise DataError(f"{sample.label}: {label_problem(label, 256, image.shape[:2])}")
        if self.augmented:
            rng, gates = sample_generators(self.seed, self.epoch, index, self.stream)
            image, label = augment(image, label, self.input_size, rng, gates, self.flip_pairs)
        else:
            image, label = whole_image_crop(image, label, self.input_size)
        return to_tensor(image), torch.from_numpy(np.ascontiguousarray(label)).long()


def load_split(root: Path, split: str) -> List[Sample]:
    """The samples of a split, or DataError naming the id file."""
    try:
        return list_samples(Path(root), split)
    except LabelledDataError as err:
        raise DataError(str(err)) from None


def _image_size(path: Path) -> Tuple[int, int]:
    """(height, width) as OpenCV will decode it (EXIF rotations by 90 degrees swap the sides)."""
    with Image.open(path) as image:
        width, height = image.size
        orientation = image.getexif().get(274, 1)
    return (width, height) if orientation in (5, 6, 7, 8) else (height, width)


def sample_problem(sample: Sample, num_classes: int) -> Optional[str]:
    """One line `<file>: <reason>` for an unusable sample, else None. Reads the image header only."""
    if not sample.image.is_file():
        return f"{sample.image}: no such image (listed in the id file)"
    try:
        size = _image_size(sample.image)
    except Exception as err:  # PIL raises several types for a damaged or foreign file
        return f"{sample.image}: not a readable image ({str(err).splitlines()[0] if str(err) else err})"
    if not sample.label.is_file():
        return f"{sample.label}: no such label file (image {sample.image.name} has no label)"
    try:
        label = read_label(sample.label)
    except ValueError as err:
        return f"{sample.label}: {err}"
    problem = label_problem(label, num_classes, size)
    return f"{sample.label}: {problem}" if problem else None


def check_samples(samples: Sequence[Sample], num_classes: int, workers: int = 4) -> List[str]:
    """Problems of all samples (one line each, in id order); empty when the split is usable."""
    with ThreadPoolExecutor(max(1, workers)) as pool:
        problems = pool.map(lambda s: sample_problem(s, num_classes), samples)
        return [p for p in problems if p]
