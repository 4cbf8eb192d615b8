"""A labelled split as training samples: decoded, augmented, normalised; and the data check before training.

Augmentation runs for the splits `train` and `trainval` only (as released); every other split is
trained on the whole-image crop. Randomness comes from (seed, epoch, index, pass), never from a
global generator, so worker processes never share a stream and a resumed run repeats an epoch exactly.
"""
import os
import random
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset

from schp.data.augment import augment, whole_image_crop
from schp.data.labelled import LabelledDataError, Sample, label_problem, list_samples, read_label
from schp.data.decode import DEFAULT_MAX_PIXELS, ImageError, read_image
from schp.errors import SCHPError, describe_exception
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
                 flip_pairs: Sequence[Tuple[int, int]], augmented: bool, seed: int = 0,
                 max_pixels: Optional[int] = DEFAULT_MAX_PIXELS):
        self.samples = list(samples)
        self.max_pixels = max_pixels
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
        image, label = read_sample(self.samples[index], self.max_pixels)
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


def decode_sample(sample: Sample, max_pixels: Optional[int] = DEFAULT_MAX_PIXELS):
    """(image or None, label or None, problems): the one reader of a training sample, for training and
    for the data check alike. Both files are decoded whole, with the header-first size limit
    (`max_pixels`); each problem is one line `<file>: <reason>`."""
    problems: List[str] = []
    image = label = None
    if not os.path.lexists(sample.image):
        problems.append(f"{sample.image}: no such image (listed in the id file)")
    else:
        try:
            image = read_image(sample.image, max_pixels)
        except ImageError as err:
            problems.append(f"{sample.image}: {err}")
    if not os.path.lexists(sample.label):
        problems.append(f"{sample.label}: no such label file (image {sample.image.name} has no label)")
    else:
        try:
            label = read_label(sample.label, max_pixels)
        except ValueError as err:
            problems.append(f"{sample.label}: {err}")
    if image is not None and label is not None and label.shape != image.shape[:2]:
        problems.append(f"{sample.label}: {label_problem(label, 256, image.shape[:2])}")
    return image, label, problems


def read_sample(sample: Sample, max_pixels: Optional[int] = DEFAULT_MAX_PIXELS):
    """(image H x W x 3 BGR, label H x W) of a sample, or DataError naming the first unusable file."""
    image, label, problems = decode_sample(sample, max_pixels)
    if problems:
        raise DataError(problems[0])
    return image, label


def sample_problems(sample: Sample, num_classes: int, max_pixels: Optional[int] = DEFAULT_MAX_PIXELS) -> List[str]:
    """Every reason a sample cannot be trained on (one line each): what read_sample refuses, and label
    values that are not classes."""
    image, label, problems = decode_sample(sample, max_pixels)
    if label is not None and not problems:
        problem = label_problem(label, num_classes)
        if problem:
            problems.append(f"{sample.label}: {problem}")
    return problems


def _guarded(sample: Sample, num_classes: int, max_pixels: Optional[int]) -> List[str]:
    try:
        return sample_problems(sample, num_classes, max_pixels)
    except Exception as err:  # a decoder's unforeseen failure is this sample's problem, not the check's end
        return [f"{sample.image}: cannot be checked ({describe_exception(err)})"]


def check_workers() -> int:
    """Threads for the data check: one per core this process may use (decoding releases the GIL)."""
    try:
        return max(1, min(16, len(os.sched_getaffinity(0))))
    except AttributeError:  # not Linux
        return max(1, min(16, os.cpu_count() or 1))


def check_samples(samples: Sequence[Sample], num_classes: int, workers: Optional[int] = None,
                  max_pixels: Optional[int] = DEFAULT_MAX_PIXELS,
                  progress: Optional[Callable[[int], None]] = None) -> List[str]:
    """Problems of all samples (one line each, in id order), every image and label decoded as training
    will decode it; empty when the split is usable. `progress(n)` is told of each n samples checked.
    An interrupt (Ctrl-C, SIGTERM) cancels what is not started instead of waiting for it."""
    pool = ThreadPoolExecutor(workers or check_workers(), thread_name_prefix="schp-check")
    found: List[str] = []
    try:
        for problems in pool.map(lambda s: _guarded(s, num_classes, max_pixels), samples):
            found += problems
            if progress is not None:
                progress(1)
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
    return found
