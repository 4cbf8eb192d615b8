"""Scoring a parsing model on a labelled split with the released SCHP evaluation protocol.

Each image goes through the shared pipeline (affine crop of the whole image, the network with the
parser's flip / multi-scale augmentation, argmax in crop space); the crop-space label map is warped
back to the ground truth's size with nearest-neighbour sampling and counted in a confusion matrix over
the pixels whose ground truth is not 255. The metrics are the released formulas, averaged over all
classes (a class absent from both ground truth and predictions scores 0).

One quirk of the released evaluator is kept by default because it changes the published numbers:
it stored the crop centres in an int32 array, so for an even image side the centre (w-1)/2 = k + 0.5 is
truncated to k and the scored map lands half a pixel up/left (`legacy_int_centers`). Saved prediction
PNGs use the true (float) centre, as released. The confusion matrix is accumulated per image (the
original kept every map in memory first; the sum is the same).
"""
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, List, Optional, Sequence, Tuple

import cv2
import numpy as np
import torch
from tqdm import tqdm

from schp.data.labelled import IGNORE_LABEL, Sample, label_problem, list_samples, read_ids, read_label
from schp.data.crop import prepare_image
from schp.data.decode import IMAGE_EXTENSIONS, ImageError, read_image
from schp.inference import HumanParser
from schp.utils.outputs import save_label_png
from schp.utils.palette import get_palette
from schp.utils.transforms import Size, get_affine_transform


def _log(line: str) -> None:
    """Default `say`: the engine's log (a command shows it on stderr; see schp.commands.options)."""
    logging.getLogger(__name__).error(line)


@dataclass
class EvalResult:
    """Metrics of one evaluation run, in percent as the original printed them."""
    confusion: np.ndarray  # C x C float64, rows = ground truth, columns = prediction
    pixel_accuracy: float
    mean_accuracy: float
    mean_iou: float
    iou: List[float]  # per class, in class order
    images: int  # images scored
    failed: List[Tuple[str, str]] = field(default_factory=list)  # (file, reason) of images left out
    labels: Tuple[str, ...] = ()  # class names, when known

    def as_dict(self) -> dict:
        """The metric fields of the --summary JSON."""
        out = {"pixel_accuracy": self.pixel_accuracy, "mean_accuracy": self.mean_accuracy,
               "mean_iou": self.mean_iou, "iou": list(self.iou), "images": self.images,
               "failed": [{"file": f, "reason": r} for f, r in self.failed]}
        if self.labels:
            out["labels"] = list(self.labels)
        return out

    def table(self) -> str:
        """Per-class IoU with the class names, then the three summary figures as the original printed them."""
        names = self.labels or tuple(str(i) for i in range(len(self.iou)))
        width = max(len(n) for n in names)
        lines = [f"{'class':>5}  {'name':<{width}}  {'IoU':>7}"]
        lines += [f"{i:5d}  {n:<{width}}  {v:7.2f}" for i, (n, v) in enumerate(zip(names, self.iou))]
        lines += [f"Pixel accuracy: {self.pixel_accuracy:f}", f"Mean accuracy: {self.mean_accuracy:f}",
                  f"Mean IU: {self.mean_iou:f}"]
        return "\n".join(lines)


# ----------------------------------------------------------------------------- pure pieces
def confusion_matrix(gt: np.ndarray, pred: np.ndarray, num_classes: int) -> np.ndarray:
    """C x C float64 counts of (ground truth i, prediction j) over pixels whose ground truth is not 255.

    As released: ground-truth values C..254 fall outside the matrix and are not counted.
    """
    if gt.shape != pred.shape:
        raise ValueError(f"ground truth {gt.shape} and prediction {pred.shape} differ in size")
    valid = gt != IGNORE_LABEL
    index = gt[valid].astype(np.int64) * num_classes + pred[valid].astype(np.int64)
    counts = np.bincount(index, minlength=num_classes * num_classes)[:num_classes * num_classes]
    return counts.reshape(num_classes, num_classes).astype(np.float64)


def metrics(confusion: np.ndarray) -> Tuple[float, float, float, List[float]]:
    """(pixel accuracy, mean accuracy, mean IoU, per-class IoU), percent, the released formulas.

    Means run over all classes; max(1, .) only guards 0/0, so an absent class scores 0.
    """
    confusion = np.asarray(confusion, dtype=np.float64)
    pos = confusion.sum(1)
    res = confusion.sum(0)
    tp = np.diag(confusion)
    pixel_accuracy = tp.sum() / pos.sum() * 100 if pos.sum() > 0 else 0.0
    mean_accuracy = (tp / np.maximum(1.0, pos)).mean() * 100
    iou = tp / np.maximum(1.0, pos + res - tp) * 100
    return float(pixel_accuracy), float(mean_accuracy), float(iou.mean()), [float(v) for v in iou]


def result_from_confusion(confusion: np.ndarray, images: int, failed: Sequence[Tuple[str, str]] = (),
                          labels: Sequence[str] = ()) -> EvalResult:
    pa, ma, miou, iou = metrics(confusion)
    return EvalResult(confusion, pa, ma, miou, iou, images, list(failed), tuple(labels))


def scored_center(center: np.ndarray, legacy_int_centers: bool = True) -> np.ndarray:
    """The centre the scored map is warped back with: int32-truncated as released, or the float one."""
    return np.asarray(center).astype(np.int32) if legacy_int_centers else np.asarray(center, dtype=np.float32)


def warp_labels(labels: np.ndarray, center: np.ndarray, scale: np.ndarray, width: int, height: int,
                input_size: Size) -> np.ndarray:
    """A crop-space label map (in_h x in_w) back to height x width uint8, nearest neighbour, border 0.

    The released evaluator's transform_parsing: warpAffine of the labels with the crop -> image matrix.
    """
    trans = get_affine_transform(center, scale, input_size, inv=True)
    return cv2.warpAffine(np.ascontiguousarray(labels, dtype=np.uint8), trans, (int(width), int(height)),
                          flags=cv2.INTER_NEAREST, borderMode=cv2.BORDER_CONSTANT, borderValue=0)


def find_image(sample: Sample) -> Path:
    """The sample's image: `<id>.jpg` as released, else the same id with another image extension."""
    if sample.image.is_file():
        return sample.image
    for ext in IMAGE_EXTENSIONS:
        for candidate in (sample.image.with_suffix(ext), sample.image.with_suffix(ext.upper())):
            if candidate.is_file():
                return candidate
    return sample.image


# ----------------------------------------------------------------------------- model mode
@dataclass
class _Item:
    sample: Sample
    image_path: Path
    crop: Optional[np.ndarray] = None
    center: Optional[np.ndarray] = None
    scale: Optional[np.ndarray] = None
    width: int = 0
    height: int = 0
    gt: Optional[np.ndarray] = None
    error: Optional[Tuple[str, str]] = None  # (file, reason)


def _prepare(sample: Sample, image_path: Path, num_classes: int, input_size: Size) -> _Item:
    """Read and check the ground truth, then decode and crop the image (the label first: it is cheaper)."""
    item = _Item(sample, image_path)
    try:
        gt = read_label(sample.label)
    except ValueError as err:
        item.error = (str(sample.label), str(err))
        return item
    try:
        image = read_image(image_path)
    except ImageError as err:
        item.error = (str(image_path), str(err))
        return item
    problem = label_problem(gt, num_classes, image.shape[:2])
    if problem:
        item.error = (str(sample.label), problem)
        return item
    prepared = prepare_image(0, image, input_size)
    item.crop, item.center, item.scale = prepared.image, prepared.center, prepared.scale
    item.width, item.height, item.gt = prepared.width, prepared.height, gt
    return item


def _prefetched(jobs: Sequence[Tuple[Sample, Path]], prepare: Callable, ahead: int) -> Iterator[_Item]:
    """prepare(*job) for each job in order, computed up to `ahead` jobs early in a thread pool
    (OpenCV and PIL release the GIL while decoding and warping)."""
    with ThreadPoolExecutor(max_workers=2) as pool:
        pending = []
        for job in jobs:
            pending.append(pool.submit(prepare, *job))
            if len(pending) > ahead:
                yield pending.pop(0).result()
        for future in pending:
            yield future.result()


def _check_files(samples: Sequence[Sample], say) -> Tuple[List[Tuple[Sample, Path]], List[Tuple[str, str]]]:
    """Before any work: every image and its ground truth must exist; the others are reported and left out."""
    jobs, failed = [], []
    for sample in samples:
        image_path = find_image(sample)
        if not image_path.is_file():
            failed.append((str(sample.image), "no such image file"))
        elif not sample.label.is_file():
            failed.append((str(image_path), f"no ground truth ({sample.label} does not exist)"))
        else:
            jobs.append((sample, image_path))
            continue
        say(f"error: {failed[-1][0]}: {failed[-1][1]}")
    return jobs, failed


def evaluate(parser: HumanParser, data_dir, split: str = "val", *, legacy_int_centers: bool = True,
             batch_size: int = 1, save_dir=None, quiet: bool = False, say: Callable[[str], None] = _log,
             label_dir: Optional[str] = None) -> EvalResult:
    """Score `parser` (with its own flip / multi-scale settings) on `<data_dir>/<split>_id.txt`.

    Images go `batch_size` per forward (the crops all have the input size). An image that cannot be
    scored (unreadable, no ground truth, ground truth of another size or with labels that are not
    classes) is reported through `say` as `error: <file>: <reason>`, left out and listed in `failed`.
    With `save_dir`, each prediction is written there as `<id>.png` (palette PNG, float centre, image
    size), as the released `--save-results` did. A missing or empty id file raises LabelledDataError.
    """
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    spec = parser.spec
    num_classes, input_size = spec.num_classes, tuple(spec.input_size)
    samples = list_samples(Path(data_dir), split, label_dir=label_dir)
    jobs, failed = _check_files(samples, say)
    if save_dir is not None:
        save_dir = Path(save_dir)
        save_dir.mkdir(parents=True, exist_ok=True)
    palette = get_palette(num_classes)
    confusion = np.zeros((num_classes, num_classes), dtype=np.float64)
    scored = 0
    bar = tqdm(total=len(samples), initial=len(failed), unit="img", disable=quiet, dynamic_ncols=True)

    def run(batch: List[_Item]) -> None:
        nonlocal confusion, scored
        logits = parser.logits(torch.from_numpy(np.stack([item.crop for item in batch])))
        crop_labels = logits.argmax(1).to(torch.uint8).cpu().numpy()  # ties: the lowest class
        for item, labels in zip(batch, crop_labels):
            center = scored_center(item.center, legacy_int_centers)
            pred = warp_labels(labels, center, item.scale, item.width, item.height, input_size)
            confusion += confusion_matrix(item.gt, pred, num_classes)
            scored += 1
            if save_dir is not None:
                if legacy_int_centers:  # saved maps use the float centre, as released
                    pred = warp_labels(labels, item.center, item.scale, item.width, item.height, input_size)
                save_label_png(pred, palette, save_dir / f"{item.sample.id}.png")
        bar.update(len(batch))

    try:
        batch: List[_Item] = []
        prepare = lambda sample, path: _prepare(sample, path, num_classes, input_size)  # noqa: E731
        for item in _prefetched(jobs, prepare, ahead=2 * batch_size):
            if item.error:
                failed.append(item.error)
                say(f"error: {item.error[0]}: {item.error[1]}")
                bar.update(1)
                continue
            batch.append(item)
            if len(batch) == batch_size:
                run(batch)
                batch = []
        if batch:
            run(batch)
    finally:
        bar.close()
    return result_from_confusion(confusion, scored, failed, spec.labels)


# ----------------------------------------------------------------------------- files mode
def score_files(pred_dir, data_dir, split: str, num_classes: int, *, labels: Sequence[str] = (),
                label_dir: Optional[str] = None, quiet: bool = False,
                say: Callable[[str], None] = _log) -> EvalResult:
    """The same metrics from a folder of predicted label PNGs `<pred_dir>/<id>.png` (raw class indices,
    at the ground truth's size), without a network. Ground truth: `<data_dir>/<split>_segmentations`
    unless `label_dir` names another folder (relative to `data_dir`, or absolute)."""
    pred_dir, data_dir = Path(pred_dir), Path(data_dir)
    ids = read_ids(data_dir, split)
    gt_dir = data_dir / (label_dir or f"{split}_segmentations")
    confusion = np.zeros((num_classes, num_classes), dtype=np.float64)
    failed: List[Tuple[str, str]] = []
    scored = 0
    for name in tqdm(ids, unit="img", disable=quiet, dynamic_ncols=True):
        gt_path, pred_path = gt_dir / f"{name}.png", pred_dir / f"{name}.png"
        error = None
        try:
            gt = read_label(gt_path)
        except ValueError as err:
            error = (str(gt_path), str(err))
        if error is None:
            try:
                pred = read_label(pred_path)
            except ValueError as err:
                error = (str(pred_path), str(err))
        if error is None:
            problem = label_problem(gt, num_classes)
            if problem:
                error = (str(gt_path), problem)
            elif pred.shape != gt.shape:
                error = (str(pred_path), f"prediction is {pred.shape[1]}x{pred.shape[0]} but its ground truth "
                                         f"is {gt.shape[1]}x{gt.shape[0]}")
            elif pred.size and int(pred.max()) >= num_classes:
                error = (str(pred_path), f"prediction values up to {int(pred.max())} are not classes "
                                         f"0..{num_classes - 1}")
        if error is not None:
            failed.append(error)
            say(f"error: {error[0]}: {error[1]}")
            continue
        confusion += confusion_matrix(gt, pred, num_classes)
        scored += 1
    return result_from_confusion(confusion, scored, failed, labels)
