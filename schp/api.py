"""The Python API: load a model once, then parse images held in memory, with the command line's maps.

`SCHP(...)` loads a checkpoint the way simple_extractor.py does (`load_parser`, which the command line
calls too); `parse` and `parse_batch` turn NumPy arrays, PIL images or file paths into the BGR pixels
that cv2.imread would give for the same picture and hand them to HumanParser.parse, the extractor's
own decode-crop-model-warp path. So a map from here equals, bit for bit, the PNG the command line
writes for the same image with the same options.
"""
import os
import warnings
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np

from schp.data.catalog import DATASETS, DatasetSpec
from schp.errors import ParameterError

COLORS = ("bgr", "rgb")
Labels = np.ndarray  # H x W uint8 class indices


def dataset_spec(dataset: str, checkpoint: Optional[Union[str, Path]] = None) -> DatasetSpec:
    """The catalog's dataset, or for 'custom' the label set, input size and flip pairs that train.py
    stored in `checkpoint`: how every front door that loads a network reads its dataset. Raises
    ParameterError, or CheckpointError for a checkpoint without a label set."""
    if dataset in DATASETS:
        return DATASETS[dataset]
    if dataset != "custom":
        raise ParameterError(f"unknown dataset, expected one of {', '.join(sorted(DATASETS))} or custom",
                             "dataset", dataset)
    if checkpoint is None:
        raise ParameterError("{dataset} needs {checkpoint} (a checkpoint written by train.py)",
                             mentions={"dataset": "custom", "checkpoint": ...})
    from schp.checkpoint import spec_from_checkpoint

    return spec_from_checkpoint(Path(checkpoint))


def load_parser(spec: DatasetSpec, checkpoint: Optional[Union[str, Path]] = None, device="auto",
                gpu: Optional[str] = None, precision: str = "fp32", allow_tf32: bool = False,
                **options):
    """(HumanParser, checkpoint path): the checkpoint read safely, checked against the network, on a device.

    `checkpoint` None means checkpoints/<released file of spec> in the repository, downloaded when
    missing (a given path is downloaded only if it has the released file name). `options` go to
    HumanParser (flip, scales, backend...). Raises CheckpointError or ParameterError (a ValueError)
    with one sentence naming the parameter; warns (SCHPWarning) where a setting is slow on this machine.
    """
    import torch
    from schp.inference import load_human_parser, select_device, slow_bf16_warning

    try:
        device = device if isinstance(device, torch.device) else select_device(str(device), gpu)
    except RuntimeError as err:  # torch.device("bogus")
        raise ParameterError(str(err).splitlines()[0], "device", device) from None
    warning = slow_bf16_warning(device, precision)
    if warning:
        warnings.warn(warning, stacklevel=2)
    return load_human_parser(spec, checkpoint, device, precision, allow_tf32=allow_tf32, **options)


def _check_color(color: Optional[str], what: str) -> str:
    if color is None:
        raise ParameterError(f"{what}: say which channel order it holds: color='bgr' (OpenCV) or "
                         "color='rgb' (PIL, imageio, matplotlib)")
    if color not in COLORS:
        raise ParameterError(f"must be 'bgr' or 'rgb', not {color!r}", "color", color)
    return color


def _pil_to_bgr(image) -> np.ndarray:
    """A PIL image as cv2.imread(IMREAD_COLOR) would decode the same file: EXIF orientation applied,
    alpha dropped (not blended), grey and palette expanded, 16-bit scaled down by 256."""
    from PIL import ImageOps

    image = ImageOps.exif_transpose(image)
    mode = image.mode
    if mode.startswith("I;16") or mode == "I":  # 16-bit grey (PNG, TIFF); "I" holds them as int32
        grey = (np.clip(np.asarray(image, dtype=np.int64), 0, 65535) >> 8).astype(np.uint8)
        return np.ascontiguousarray(np.repeat(grey[:, :, None], 3, axis=2))
    if mode == "F":
        raise ParameterError("a PIL image in mode 'F' (32-bit float) is not supported: convert it to 8-bit "
                         "(e.g. Image.fromarray(np.uint8(...))) first")
    rgb = np.asarray(image if mode == "RGB" else image.convert("RGB"))
    return np.ascontiguousarray(rgb[:, :, ::-1])


def _array_to_bgr(array: np.ndarray, color: Optional[str]) -> np.ndarray:
    if array.dtype != np.uint8:
        raise TypeError(f"image arrays must be uint8 (0-255), not {array.dtype}: convert with "
                        "np.clip(x * 255, 0, 255).astype(np.uint8) for 0-1 floats, or x.astype(np.uint8)")
    if array.size == 0:
        raise ParameterError(f"the image array is empty (shape {array.shape})")
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim == 2:  # grey, replicated as imread does
        return np.ascontiguousarray(np.repeat(array[:, :, None], 3, axis=2))
    if array.ndim != 3 or array.shape[2] not in (3, 4):
        raise ParameterError(f"an image array must be H x W (grey), H x W x 3 (colour) or H x W x 4 (colour "
                         f"and alpha), not shape {array.shape}")
    order = _check_color(color, f"an H x W x {array.shape[2]} array")
    pixels = array[:, :, :3]  # alpha dropped, as imread does
    return np.ascontiguousarray(pixels if order == "bgr" else pixels[:, :, ::-1])


def _check_size(width: int, height: int) -> None:
    """The command line's size rules for an image given as pixels (a file gets them from its reader)."""
    from schp.data.decode import DEFAULT_MAX_PIXELS, size_problem
    problem = size_problem(width, height, DEFAULT_MAX_PIXELS)
    if problem:
        raise ParameterError(f"image of {problem}")


def to_bgr(image, color: Optional[str] = None) -> np.ndarray:
    """H x W x 3 uint8 BGR pixels of `image`, as cv2.imread would decode the same picture from a file.

    `image`: a path (str or os.PathLike, decoded by the extractor's own reader), a PIL image (any
    mode), or a uint8 NumPy array: H x W grey, H x W x 3 or H x W x 4 (alpha dropped) whose channel
    order `color` ('bgr' or 'rgb') must name. TypeError / ValueError with a sentence for anything else.
    """
    if isinstance(image, (str, os.PathLike)):
        from schp.data.decode import ImageError, read_image
        try:
            return read_image(Path(image))
        except ImageError as err:
            raise ParameterError(f"{image}: {err}") from None
    if isinstance(image, np.ndarray):
        if image.ndim in (2, 3):
            _check_size(image.shape[1], image.shape[0])
        return _array_to_bgr(image, color)
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - Pillow is a requirement
        Image = None
    if Image is not None and isinstance(image, Image.Image):
        _check_size(*image.size)
        return _pil_to_bgr(image)
    raise TypeError(f"cannot parse a {type(image).__name__}: pass a NumPy uint8 array, a PIL image "
                    "or a path to an image file")


class SCHP:
    """A released SCHP model, loaded once, for parsing images from Python.

    >>> model = SCHP("lip")                      # checkpoints/exp-schp-201908261155-lip.pth
    >>> labels = model.parse(image, color="bgr")  # H x W uint8 class indices
    >>> model.labels[labels[0, 0]], model.colorize(labels)

    `checkpoint`: a file (default: the released file of `dataset` under checkpoints/, downloaded when
    missing; with dataset "custom", a checkpoint written by train.py, which holds its label set).
    `device`: "auto", "cpu", "cuda", "cuda:N". `precision`: "fp32" (the original's maps), "bf16",
    "fp16" (CUDA). `flip` / `scales`: test-time augmentation. `batch_size`: images per forward pass in
    parse_batch (the command line's --batch-size). `backend`: the inference engine.
    `labels_map`: maps in another label scheme (a JSON file as for --label-map, or a dict of its
    structure): parse returns those, and labels and colorize follow.
    """

    def __init__(self, dataset: str = "pascal", checkpoint: Optional[Union[str, Path]] = None,
                 device="auto", precision: str = "fp32", flip: bool = False,
                 scales: Sequence[float] = (1.0,), backend: str = "torch", batch_size: int = 1,
                 allow_tf32: bool = False, labels_map=None):
        from schp.data.label_map import resolve_label_map
        from schp.utils.palette import get_palette

        self.spec = dataset_spec(dataset, checkpoint)
        if batch_size < 1:
            raise ParameterError("must be >= 1", "batch_size", batch_size)
        self.label_map = resolve_label_map(labels_map, self.spec.labels)  # checked before the model loads
        self.parser, self.checkpoint = load_parser(self.spec, checkpoint, device, None, precision, allow_tf32,
                                                   flip=flip, scales=scales, backend=backend)
        self.batch_size = batch_size
        self.palette = self.label_map.palette if self.label_map else get_palette(self.spec.num_classes)

    @property
    def labels(self) -> Tuple[str, ...]:
        """Class names; a map's value i is the class labels[i]."""
        return self.label_map.labels if self.label_map else self.spec.labels

    @property
    def device(self):
        return self.parser.device

    def parse(self, image, color: Optional[str] = None, logits: bool = False):
        """H x W uint8 label map of one image at its own size; with `logits`, (labels, H x W x C float32
        logits) as --logits writes them. See `to_bgr` for what `image` may be."""
        return self.parse_batch([image], color, logits)[0]

    def parse_batch(self, images: Sequence, color: Optional[str] = None, logits: bool = False) -> List:
        """`parse` for a list of images (sizes may differ), `batch_size` per forward pass."""
        if isinstance(images, (np.ndarray, str, os.PathLike)) or not isinstance(images, Sequence):
            raise TypeError("parse_batch takes a list of images; use parse for one image")
        pixels = [to_bgr(image, color) for image in images]
        results = []
        for start in range(0, len(pixels), self.batch_size):
            results += self.parser.parse(pixels[start:start + self.batch_size], with_logits=logits)
        if self.label_map is not None:
            apply = self.label_map.apply
            results = [(apply(r[0]), r[1]) if logits else apply(r) for r in results]
        return results

    def colorize(self, labels: Labels, color: str = "rgb") -> np.ndarray:
        """H x W x 3 uint8 picture of a label map in the palette colours of the PNG outputs."""
        from schp.utils.outputs import colorize_bgr

        bgr = colorize_bgr(self._check_labels(labels), self.palette)
        return bgr if _check_color(color, "colorize") == "bgr" else np.ascontiguousarray(bgr[:, :, ::-1])

    def overlay(self, image, labels: Labels, color: Optional[str] = None, alpha: float = 0.5) -> np.ndarray:
        """H x W x 3 uint8: the colour map blended over the image (background left as is), as --overlay.

        The result's channel order is `color`: required for 3/4-channel arrays (it names their order
        too), 'rgb' by default for grey arrays, PIL images and paths.
        """
        from schp.utils.outputs import blend_overlay

        is_colour_array = isinstance(image, np.ndarray) and image.ndim == 3 and image.shape[2] > 1
        order = color if is_colour_array or color is not None else "rgb"
        bgr = to_bgr(image, order)
        labels = self._check_labels(labels)
        if labels.shape != bgr.shape[:2]:
            raise ParameterError(f"labels {labels.shape} and image {bgr.shape[:2]} differ in size")
        out = blend_overlay(bgr, labels, self.palette, alpha)
        return out if _check_color(order, "overlay") == "bgr" else np.ascontiguousarray(out[:, :, ::-1])

    def to_pil(self, labels: Labels):
        """The label map as a palette ('P') PIL image, the same as the PNG the command line writes."""
        from PIL import Image

        image = Image.fromarray(np.ascontiguousarray(self._check_labels(labels)))
        image.putpalette(list(self.palette))
        return image

    def _check_labels(self, labels) -> np.ndarray:
        labels = np.asarray(labels)
        if labels.ndim != 2 or labels.dtype != np.uint8:
            raise ParameterError(f"labels must be an H x W uint8 map (from parse), not {labels.dtype} {labels.shape}")
        count = len(self.labels)
        if labels.size and labels.max() >= count:
            raise ParameterError(f"labels hold class {labels.max()}, beyond the {count} of "
                                 f"{'the label map' if self.label_map else self.spec.name}")
        return labels

    def __repr__(self) -> str:
        p = self.parser
        return (f"SCHP(dataset={self.spec.name!r}, checkpoint={str(self.checkpoint)!r}, device={str(p.device)!r}, "
                f"precision={p.precision!r}, flip={p.flip}, scales={p.scales})")
