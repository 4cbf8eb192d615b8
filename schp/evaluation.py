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
from schp.errors import EXIT_FAILED, SCHPError
from schp.inference import HumanParser
from schp.runs.loop import Job, Reporter, Task, Unit, run as run_loop
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
class EvalTask(Task):
    """One labelled image to score; `outputs` is its saved prediction (none without a save folder)."""

    def __init__(self, sample: Sample, image_path: Path, save_dir: Optional[Path]):
        self.sample, self.source, self.save_dir = sample, image_path, save_dir
        if not image_path.is_file():
            self.source, self.refusal = sample.image, "no such image file"
        elif not sample.label.is_file():
            self.refusal = f"no ground truth ({sample.label} does not exist)"

    @property
    def outputs(self) -> List[Path]:
        return [] if self.save_dir is None else [self.save_dir / f"{self.sample.id}.png"]


@dataclass
class _Item:
    crop: np.ndarray
    center: np.ndarray
    scale: np.ndarray
    width: int
    height: int
    gt: np.ndarray


def _prepare(index: int, task: EvalTask, num_classes: int, input_size: Size) -> Unit:
    """Read and check the ground truth, then decode and crop the image (the label first: it is cheaper).
    An error names the file at fault: the ground truth or the image."""
    sample = task.sample
    try:
        gt = read_label(sample.label)
    except ValueError as err:
        return Unit(index, error=str(err), source=str(sample.label))
    try:
        image = read_image(task.source)
    except ImageError as err:
        return Unit(index, error=str(err))
    problem = label_problem(gt, num_classes, image.shape[:2])
    if problem:
        return Unit(index, error=problem, source=str(sample.label))
    prepared = prepare_image(0, image, input_size)
    item = _Item(prepared.image, prepared.center, prepared.scale, prepared.width, prepared.height, gt)
    return Unit(index, item, width=prepared.width, height=prepared.height)


class EvaluationJob(Job):
    """The run loop's stages for scoring: decode + crop ahead in two threads (OpenCV and PIL release the
    GIL), the network on a batch of crops, then per image the inverse warp, its confusion matrix and
    the saved map in the writer threads; the matrices are summed in the calling thread."""
    noun = "images"

    def __init__(self, parser: HumanParser, batch_size: int, legacy_int_centers: bool):
        self.parser, self.batch_size, self.legacy = parser, batch_size, legacy_int_centers
        self.num_classes, self.input_size = parser.spec.num_classes, tuple(parser.spec.input_size)
        self.palette = get_palette(self.num_classes)
        self.confusion = np.zeros((self.num_classes, self.num_classes), dtype=np.float64)
        self.scored = 0

    def prepare(self, tasks: Sequence[EvalTask]) -> Iterator[Unit]:
        ahead = 2 * self.batch_size
        with ThreadPoolExecutor(max_workers=2, thread_name_prefix="schp-decode") as pool:
            pending = []
            for index, task in enumerate(tasks):
                pending.append(pool.submit(_prepare, index, task, self.num_classes, self.input_size))
                if len(pending) > ahead:
                    yield pending.pop(0).result()
            for future in pending:
                yield future.result()

    def forward(self, units: List[Unit]) -> List[np.ndarray]:
        logits = self.parser.logits(torch.from_numpy(np.stack([u.payload.crop for u in units])))
        return list(logits.argmax(1).to(torch.uint8).cpu().numpy())  # ties: the lowest class

    def write(self, task: EvalTask, unit: Unit, labels: np.ndarray) -> np.ndarray:
        item = unit.payload
        center = scored_center(item.center, self.legacy)
        pred = warp_labels(labels, center, item.scale, item.width, item.height, self.input_size)
        confusion = confusion_matrix(item.gt, pred, self.num_classes)
        if task.save_dir is not None:
            if self.legacy:  # saved maps use the float centre, as released
                pred = warp_labels(labels, item.center, item.scale, item.width, item.height, self.input_size)
            save_label_png(pred, self.palette, task.outputs[0])
        return confusion

    def collected(self, task: EvalTask, unit: Unit, confusion: np.ndarray) -> None:
        self.confusion += confusion
        self.scored += 1


class EvaluationStopped(SCHPError):
    """The run stopped before every image was scored (a full disk under the save folder)."""
    exit_code = EXIT_FAILED


class _SayReporter(Reporter):
    def __init__(self, say: Callable[[str], None]):
        self.line = say


def evaluate(parser: HumanParser, data_dir, split: str = "val", *, legacy_int_centers: bool = True,
             batch_size: int = 1, save_dir=None, quiet: bool = False, say: Callable[[str], None] = _log,
             label_dir: Optional[str] = None, reporter: Optional[Reporter] = None) -> EvalResult:
    """Score `parser` (with its own flip / multi-scale settings) on `<data_dir>/<split>_id.txt`.

    Images go `batch_size` per forward (the crops all have the input size), through the one run loop.
    An image that cannot be scored (unreadable, no ground truth, ground truth of another size or with
    labels that are not classes) is reported as `error: <file>: <reason>` (through `reporter`, else
    `say`), left out and listed in `failed`. With `save_dir`, each prediction is written there as
    `<id>.png` (palette PNG, float centre, image size), as the released `--save-results` did. A missing
    or empty id file raises LabelledDataError; a stop signal KeyboardInterrupt (after the maps being
    saved are complete); a full disk EvaluationStopped. `quiet` is kept for callers; progress shows
    only through a `reporter` that draws bars.
    """
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    samples = list_samples(Path(data_dir), split, label_dir=label_dir)
    if save_dir is not None:
        save_dir = Path(save_dir)
        save_dir.mkdir(parents=True, exist_ok=True)
    tasks = [EvalTask(sample, find_image(sample), save_dir) for sample in samples]
    job = EvaluationJob(parser, batch_size, legacy_int_centers)
    report = run_loop(job, tasks, overwrite=True, reporter=reporter or _SayReporter(say))
    if report.interrupted:
        raise KeyboardInterrupt
    if report.stopped_reason:
        raise EvaluationStopped(report.stopped_reason)
    failed = [(o.details.get("source", str(o.task.source)), o.reason) for o in report.outcomes
              if o.status == "failed"]
    return result_from_confusion(job.confusion, job.scored, failed, parser.spec.labels)


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
