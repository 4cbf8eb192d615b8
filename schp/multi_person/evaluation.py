"""Scoring multi-person parsing results (multi_person.py's outputs) on the CIHP / VIP layout.

Ground truth under `data_dir`: `Category_ids/<id>.png` (class per pixel), `Human_ids/<id>.png` (person
per pixel), `Instance_ids/<id>.png` (part instance per pixel); for VIP one subfolder per video
(`Category_ids/<video>/<frame>.png`). Predictions under `pred_dir` as multi_person.py (and the released
extension) writes them: `global_parsing/<id>.png` (classes), `instance_parsing/<id>.png` (part ids) with
`<id>.txt` (line j = "class score" of part j), and a person map: `instance_segmentation/<id>.png` with
`<id>.txt` (line k = "class score" of person k, or of the k-th id present), else `global_tag/<id>.png` with `<id>.txt` (one
"score Y0 X0 Y1 X1" line per person present, in ascending id order). Videos: `pred_dir/<video>/<folder>/`.

Metrics, all in percent:
- pixel accuracy, mean accuracy, per-class and mean IoU of the global parsing: the single-person
  evaluator's confusion matrix and formulas (schp.evaluation);
- AP^r, instance-level part AP at IoU 0.1..0.9, as CIHP's authors compute it (their
  evaluation/test_inst_part_ap.py; an independent implementation that gives its numbers);
- AP^h, the same protocol on whole persons (one class);
- for videos, identity switches of the predicted person ids against Human_ids across frames.

The reference protocol's quirks that change numbers are kept:
- a prediction is scored against its best-overlapping ground-truth instance of its class in its image,
  with no one-to-one matching: several predictions on one instance can all be true positives;
- a prediction is a true positive when that IoU is strictly greater than the threshold;
- the class of a predicted part is its txt line's, not the global parsing's; map ids without a line are
  ignored, as are lines of class 0 or of no class;
- ranking by the reversed ascending sort of the scores: among equal scores the later prediction (in
  id-list order, then line order) comes first (the reference's `np.argsort(scores)[::-1]`, made stable:
  NumPy's default sort keeps ties in order for short lists only, so the reference's own order for many
  ties depends on the NumPy build);
- AP = area under the precision envelope (continuous VOC), recall over all ground-truth instances;
- every class 1..C-1 enters the mean, a class with neither instances nor predictions at AP 0.
Fixed, because the reference only crashed or gave NaN there:
- a txt line whose part has no pixel: the reference misaligns scores and masks and raises IndexError;
  here such lines are not predictions (the same numbers wherever the reference runs);
- a class predicted but absent from every ground truth: the reference divides by zero and every mean
  is NaN; here its AP is 0 (all its predictions are false positives);
- the reference scores whatever `os.listdir` finds in the prediction folder (arbitrary order, images
  without a prediction silently skipped, ones without ground truth crash); here the id list is scored
  and a missing or unreadable file is reported and its image left out (so its ground truth does not
  count either, as in the reference).
Ground-truth part classes: the reference reads a "part class person" txt per image; here the class of a
part instance is the most frequent Category_ids value on its pixels (instances whose majority is
background are not parts).
"""
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from schp.data.catalog import CIHP_LABELS
from schp.data.labelled import read_label
from schp.data.decode import DEFAULT_MAX_PIXELS
from schp.evaluation import confusion_matrix, result_from_confusion

IOU_THRESHOLDS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
GT_FOLDERS = ("Category_ids", "Human_ids", "Instance_ids")
PERSON_FOLDERS = ("instance_segmentation", "global_tag")  # the first one present is scored


class MultiPersonDataError(Exception):
    """A set-up problem that stops the whole evaluation (missing folder, empty id list); names the path."""


class InputError(ValueError):
    """One input that cannot be scored: (file, reason)."""

    def __init__(self, path, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = str(path), reason


@dataclass(frozen=True)
class Item:
    """One scored image: `key` names it in the id list ("<id>" or "<video>/<frame>")."""
    key: str
    video: Optional[str]
    frame: str


@dataclass
class MultiPersonResult:
    """Every metric in percent; `failed` lists the (file, reason) of each item left out."""
    pixel_accuracy: float
    mean_accuracy: float
    mean_iou: float
    iou: List[float]
    part_ap: List[List[float]]  # classes 1..C-1 x thresholds
    part_map: List[float]  # AP^r per threshold (mean over classes)
    person_ap: Optional[List[float]]  # AP^h per threshold; None when no person maps were given
    thresholds: Tuple[float, ...]
    images: int
    videos: int = 0
    id_switches: Optional[int] = None  # None unless some item is a video frame
    id_switches_per_video: Dict[str, int] = field(default_factory=dict)
    person_matches: int = 0  # ground-truth persons matched (IoU > 0.5) over all video frames
    failed: List[Tuple[str, str]] = field(default_factory=list)
    labels: Tuple[str, ...] = CIHP_LABELS

    @property
    def part_ap_vol(self) -> float:
        return float(np.mean(self.part_map))

    def part_ap_at(self, threshold: float) -> float:
        return self.part_map[self._index(threshold)]

    @property
    def person_ap_vol(self) -> Optional[float]:
        return None if self.person_ap is None else float(np.mean(self.person_ap))

    def person_ap_at(self, threshold: float) -> Optional[float]:
        return None if self.person_ap is None else self.person_ap[self._index(threshold)]

    def _index(self, threshold: float) -> int:
        return [round(t, 6) for t in self.thresholds].index(round(threshold, 6))

    def as_dict(self) -> dict:
        """The --summary JSON fields."""
        return {
            "images": self.images, "videos": self.videos,
            "pixel_accuracy": self.pixel_accuracy, "mean_accuracy": self.mean_accuracy,
            "mean_iou": self.mean_iou, "iou": list(self.iou), "labels": list(self.labels),
            "iou_thresholds": list(self.thresholds),
            "ap_r": list(self.part_map), "ap_r_vol": self.part_ap_vol,
            "ap_r_50": self.part_ap_at(0.5) if 0.5 in self.thresholds else None,
            "ap_r_per_class": {name: row for name, row in zip(self.labels[1:], self.part_ap)},
            "ap_h": self.person_ap, "ap_h_vol": self.person_ap_vol,
            "ap_h_50": self.person_ap_at(0.5) if 0.5 in self.thresholds else None,
            "id_switches": self.id_switches, "id_switches_per_video": dict(self.id_switches_per_video),
            "person_matches": self.person_matches,
            "failed": [{"file": f, "reason": r} for f, r in self.failed],
        }

    def lines(self) -> List[str]:
        """One line per metric, then the per-class IoU table."""
        out = [f"Pixel accuracy: {self.pixel_accuracy:f}", f"Mean accuracy: {self.mean_accuracy:f}",
               f"Mean IU: {self.mean_iou:f}"]
        out += [f"AP^r@{t:g}: {v:f}" for t, v in zip(self.thresholds, self.part_map)]
        out.append(f"AP^r_vol: {self.part_ap_vol:f}")
        if self.person_ap is not None:
            out += [f"AP^h@{t:g}: {v:f}" for t, v in zip(self.thresholds, self.person_ap)]
            out.append(f"AP^h_vol: {self.person_ap_vol:f}")
        else:
            out.append("AP^h: not scored (no instance_segmentation/ or global_tag/ person maps)")
        if self.id_switches is not None:
            out.append(f"Identity switches: {self.id_switches} ({self.person_matches} person matches "
                       f"in {self.videos} videos)")
        width = max(len(n) for n in self.labels)
        out.append(f"{'class':>5}  {'name':<{width}}  {'IoU':>7}")
        out += [f"{i:5d}  {n:<{width}}  {v:7.2f}" for i, (n, v) in enumerate(zip(self.labels, self.iou))]
        return out


# ----------------------------------------------------------------------------- reading
def read_map(path: Path, max_pixels: Optional[int] = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """H x W uint8 ids of an 8-bit (or small 16-bit) PNG; InputError when missing, too large or unreadable."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "no such file")
    try:
        return read_label(path, max_pixels)  # the header-first size check of every reader
    except ValueError as err:
        raise InputError(path, str(err)) from None


def read_lines(path: Path, columns: int) -> List[List[str]]:
    """The whitespace-split non-blank lines of a text file, each with at least `columns` fields."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "no such file")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(path, f"cannot read ({getattr(err, 'strerror', None) or err})") from None
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) < columns:
            raise InputError(path, f"line {number}: expected {columns} fields, got {line.strip()!r}")
        rows.append(fields)
    return rows


def read_part_scores(path: Path) -> List[Tuple[int, float]]:
    """[(class, score)] of an instance_parsing / instance_segmentation txt: line j is part (person) j."""
    out = []
    for number, fields in enumerate(read_lines(path, 2), 1):
        try:
            out.append((int(fields[0]), float(fields[1])))
        except ValueError:
            raise InputError(path, f"line {number}: expected 'class score', got {' '.join(fields)!r}") from None
    return out


def read_tag_scores(path: Path, person_ids: Sequence[int]) -> Dict[int, float]:
    """{person id: score} from a global_tag txt: one 'score Y0 X0 Y1 X1' line per person present, in
    ascending id order. A file the original appended to on a rerun repeats its lines: the first ones count."""
    rows = read_lines(path, 1)
    if len(rows) < len(person_ids):
        raise InputError(path, f"{len(rows)} score lines for {len(person_ids)} persons in the map")
    try:
        return {int(k): float(row[0]) for k, row in zip(person_ids, rows)}
    except ValueError:
        raise InputError(path, "a line does not start with a score") from None


def person_line_scores(path: Path, persons: np.ndarray) -> Dict[int, float]:
    """{person id: score} from an instance_segmentation txt ("class score" lines): line k is person k,
    or, when there are exactly as many lines as persons present but fewer than the largest id (ids
    kept through a video), the k-th line is the k-th smallest id present."""
    rows = read_part_scores(path)
    ids = [int(k) for k in np.unique(persons) if k]
    if not ids or len(rows) >= ids[-1]:
        return {k: rows[k - 1][1] for k in ids}
    if len(rows) == len(ids):
        return {k: row[1] for k, row in zip(ids, rows)}
    raise InputError(path, f"{len(rows)} score lines for persons {', '.join(map(str, ids[:5]))}"
                           f"{' ...' if len(ids) > 5 else ''} in the map")


# ----------------------------------------------------------------------------- the id list
def list_items(data_dir: Path, id_list: Optional[Path] = None) -> List[Item]:
    """The items to score, in id-list order. The list is `id_list`, else the only `*_id.txt` in
    `data_dir`, else every entry of Category_ids/. An entry naming a folder of Category_ids/ is a video
    (its PNG frames in sorted order); "<video>/<frame>" is one frame; anything else an image id."""
    data_dir = Path(data_dir)
    for name in GT_FOLDERS:
        if not (data_dir / name).is_dir():
            raise MultiPersonDataError(f"{data_dir / name}: no such folder (the CIHP layout has "
                                       f"{', '.join(GT_FOLDERS)})")
    categories = data_dir / "Category_ids"
    if id_list is None:
        found = sorted(data_dir.glob("*_id.txt"))
        id_list = found[0] if len(found) == 1 else None
    if id_list is not None:
        id_list = Path(id_list)
        try:
            entries = [line.strip() for line in id_list.read_text(encoding="utf-8").splitlines()]
        except (OSError, UnicodeDecodeError) as err:
            raise MultiPersonDataError(f"{id_list}: cannot read ({getattr(err, 'strerror', None) or err})") \
                from None
        entries = [e for e in entries if e]
        source = str(id_list)
    else:
        entries = sorted(p.stem if p.is_file() else p.name for p in categories.iterdir()
                         if p.is_dir() or p.suffix.lower() == ".png")
        source = str(categories)
    items = []
    for entry in entries:
        parts = entry.replace("\\", "/").split("/")
        if entry.startswith("/") or any(p in ("", ".", "..") for p in parts) or len(parts) > 2:
            raise MultiPersonDataError(f"{source}: entry {entry!r} is not an id, a video or <video>/<frame>")
        if len(parts) == 1 and (categories / entry).is_dir():
            frames = sorted(p.stem for p in (categories / entry).iterdir() if p.suffix.lower() == ".png")
            items += [Item(f"{entry}/{f}", entry, f) for f in frames]
        elif len(parts) == 2:
            items.append(Item(entry, parts[0], parts[1]))
        else:
            items.append(Item(entry, None, entry))
    if not items:
        raise MultiPersonDataError(f"{source}: nothing to score in it")
    return items


# ----------------------------------------------------------------------------- the AP protocol
def envelope_ap(recall: np.ndarray, precision: np.ndarray) -> float:
    """Area under the precision envelope (continuous VOC AP), with sentinels recall 0 -> 1, precision 0."""
    r = np.concatenate(([0.0], recall, [1.0]))
    p = np.concatenate(([0.0], precision, [0.0]))
    p = np.maximum.accumulate(p[::-1])[::-1]
    steps = np.flatnonzero(r[1:] != r[:-1])
    return float(np.sum((r[steps + 1] - r[steps]) * p[steps + 1]))


class APAccumulator:
    """Per class: every prediction's score and best IoU, and the number of ground-truth instances."""

    def __init__(self, num_classes: int, thresholds: Sequence[float] = IOU_THRESHOLDS):
        self.num_classes = num_classes
        self.thresholds = tuple(thresholds)
        self.scores: List[List[float]] = [[] for _ in range(num_classes)]
        self.best: List[List[float]] = [[] for _ in range(num_classes)]
        self.gt_count = np.zeros(num_classes, dtype=np.int64)

    def add(self, gt_map: np.ndarray, gt_classes: Dict[int, int], pred_map: np.ndarray,
            predictions: Dict[int, Tuple[int, float]]) -> None:
        """One image: `gt_classes` {instance id: class}, `predictions` {map id: (class, score)}; only the
        ids present in their map count."""
        joint = np.bincount(pred_map.astype(np.int64).ravel() * 256 + gt_map.astype(np.int64).ravel(),
                            minlength=256 * 256).reshape(256, 256)
        pred_area, gt_area = joint.sum(1), joint.sum(0)
        by_class: Dict[int, List[int]] = {}
        for g, c in gt_classes.items():
            if 0 < g < 256 and gt_area[g] > 0 and 0 < c < self.num_classes:
                by_class.setdefault(c, []).append(g)
        for c, gs in by_class.items():
            self.gt_count[c] += len(gs)
        for p in sorted(predictions):
            c, score = predictions[p]
            if not (0 < p < 256 and pred_area[p] > 0 and 0 < c < self.num_classes):
                continue
            gs = np.array(by_class.get(c, []), dtype=np.int64)
            if gs.size:
                inter = joint[p, gs]
                iou = float(np.max(inter / (pred_area[p] + gt_area[gs] - inter)))
            else:
                iou = 0.0
            self.scores[c].append(score)
            self.best[c].append(iou)

    def average_precision(self) -> np.ndarray:
        """(num_classes - 1) x thresholds AP in [0, 1], classes 1..C-1."""
        ap = np.zeros((self.num_classes - 1, len(self.thresholds)))
        for c in range(1, self.num_classes):
            if not self.scores[c] or self.gt_count[c] == 0:
                continue  # no prediction, or no instance to find: AP 0
            order = np.argsort(self.scores[c], kind="stable")[::-1]
            best = np.asarray(self.best[c])[order]
            for k, t in enumerate(self.thresholds):
                hit = best > t
                tp = np.cumsum(hit)
                fp = np.cumsum(~hit)
                recall = tp / float(self.gt_count[c])
                precision = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
                ap[c - 1, k] = envelope_ap(recall, precision)
        return ap


def gt_part_classes(instances: np.ndarray, categories: np.ndarray, num_classes: int) -> Dict[int, int]:
    """{part instance id: its most frequent class} for the ids of an Instance_ids map."""
    joint = np.bincount(instances.astype(np.int64).ravel() * 256 + categories.astype(np.int64).ravel(),
                        minlength=256 * 256).reshape(256, 256)
    out = {}
    for g in np.flatnonzero(joint.sum(1)):
        if g != 0:
            c = int(np.argmax(joint[g]))
            if 0 < c < num_classes:
                out[int(g)] = c
    return out


def identity_matches(gt_persons: np.ndarray, pred_persons: np.ndarray) -> Dict[int, int]:
    """{ground-truth person: predicted person} for the pairs with mask IoU > 0.5 (unique, as both
    maps are partitions)."""
    joint = np.bincount(gt_persons.astype(np.int64).ravel() * 256 + pred_persons.astype(np.int64).ravel(),
                        minlength=256 * 256).reshape(256, 256)
    gt_area, pred_area = joint.sum(1), joint.sum(0)
    out = {}
    for g, p in zip(*np.nonzero(joint)):
        if g and p and joint[g, p] * 2 > gt_area[g] + pred_area[p] - joint[g, p]:
            out[int(g)] = int(p)
    return out


# ----------------------------------------------------------------------------- one item
@dataclass
class _Loaded:
    classes_gt: np.ndarray
    classes_pred: np.ndarray
    parts_gt: np.ndarray
    part_classes_gt: Dict[int, int]
    parts_pred: np.ndarray
    part_predictions: Dict[int, Tuple[int, float]]
    persons_gt: np.ndarray
    persons_pred: Optional[np.ndarray]
    person_scores: Dict[int, float]


def _pred_root(pred_dir: Path, item: Item) -> Path:
    return pred_dir / item.video if item.video else pred_dir


def person_folder(pred_root: Path) -> Optional[str]:
    """The person-map folder scored for AP^h and identities: instance_segmentation/, else global_tag/."""
    for name in PERSON_FOLDERS:
        if (pred_root / name).is_dir():
            return name
    return None


def _load(data_dir: Path, pred_dir: Path, item: Item, num_classes: int, max_pixels: Optional[int]) -> _Loaded:
    rel = Path(*item.key.split("/"))
    classes_gt = read_map(data_dir / "Category_ids" / rel.with_suffix(".png"), max_pixels)
    persons_gt = read_map(data_dir / "Human_ids" / rel.with_suffix(".png"), max_pixels)
    parts_gt = read_map(data_dir / "Instance_ids" / rel.with_suffix(".png"), max_pixels)
    root = _pred_root(pred_dir, item)
    classes_path = root / "global_parsing" / f"{item.frame}.png"
    classes_pred = read_map(classes_path, max_pixels)
    parts_path = root / "instance_parsing" / f"{item.frame}.png"
    parts_pred = read_map(parts_path, max_pixels)
    lines = read_part_scores(parts_path.with_suffix(".txt"))
    folder = person_folder(root)
    persons_pred, person_scores = None, {}
    if folder:
        persons_path = root / folder / f"{item.frame}.png"
        persons_pred = read_map(persons_path, max_pixels)
        if folder == "global_tag":
            ids = [int(k) for k in np.unique(persons_pred) if k]
            person_scores = read_tag_scores(persons_path.with_suffix(".txt"), ids)
        else:
            person_scores = person_line_scores(persons_path.with_suffix(".txt"), persons_pred)
    shape = classes_gt.shape
    for path, values in ((data_dir / "Human_ids" / rel.with_suffix(".png"), persons_gt),
                         (data_dir / "Instance_ids" / rel.with_suffix(".png"), parts_gt),
                         (classes_path, classes_pred), (parts_path, parts_pred),
                         (persons_path if folder else None, persons_pred)):
        if values is not None and values.shape != shape:
            raise InputError(path, f"is {values.shape[1]}x{values.shape[0]} but the ground truth "
                                   f"{rel.with_suffix('.png')} is {shape[1]}x{shape[0]}")
    bad = np.unique(classes_gt[(classes_gt >= num_classes) & (classes_gt != 255)])
    if bad.size:
        raise InputError(data_dir / "Category_ids" / rel.with_suffix(".png"),
                         f"values {', '.join(map(str, bad[:5]))} are not classes 0..{num_classes - 1}")
    if classes_pred.size and int(classes_pred.max()) >= num_classes:
        raise InputError(classes_path, f"values up to {int(classes_pred.max())} are not classes "
                                       f"0..{num_classes - 1}")
    return _Loaded(classes_gt, classes_pred, parts_gt, gt_part_classes(parts_gt, classes_gt, num_classes),
                   parts_pred, {j: line for j, line in enumerate(lines, 1)}, persons_gt, persons_pred,
                   person_scores)


# ----------------------------------------------------------------------------- the evaluation
def evaluate_multi_person(data_dir, pred_dir, id_list=None, *, num_classes: int = len(CIHP_LABELS),
                          labels: Sequence[str] = CIHP_LABELS, thresholds: Sequence[float] = IOU_THRESHOLDS,
                          max_pixels: Optional[int] = DEFAULT_MAX_PIXELS,
                          on_error: Optional[Callable[[str, str], None]] = None,
                          on_item: Optional[Callable[[Item], None]] = None) -> MultiPersonResult:
    """Score `pred_dir` against `data_dir` (layouts in the module docstring). An item with a missing,
    unreadable, too large or mis-sized file is left out whole and listed in `failed` (and passed to
    `on_error(file, reason)` as it happens); a set-up problem raises MultiPersonDataError."""
    data_dir, pred_dir = Path(data_dir), Path(pred_dir)
    if not pred_dir.is_dir():
        raise MultiPersonDataError(f"{pred_dir}: no such folder")
    items = list_items(data_dir, id_list)
    confusion = np.zeros((num_classes, num_classes), dtype=np.float64)
    parts = APAccumulator(num_classes, thresholds)
    persons = APAccumulator(2, thresholds)
    has_person_maps = False
    failed: List[Tuple[str, str]] = []
    last_match: Dict[str, Dict[int, int]] = {}  # video -> {gt person: last predicted id}
    switches: Dict[str, int] = {}
    matches = 0
    scored = 0
    for item in items:
        try:
            x = _load(data_dir, pred_dir, item, num_classes, max_pixels)
        except InputError as err:
            failed.append((err.path, err.reason))
            if on_error:
                on_error(err.path, err.reason)
            continue
        confusion += confusion_matrix(x.classes_gt, x.classes_pred, num_classes)
        parts.add(x.parts_gt, x.part_classes_gt, x.parts_pred, x.part_predictions)
        if x.persons_pred is not None:
            has_person_maps = True
            gt_ids = {int(k): 1 for k in np.unique(x.persons_gt) if k}
            persons.add(x.persons_gt, gt_ids, x.persons_pred, {k: (1, s) for k, s in x.person_scores.items()})
            if item.video is not None:
                last = last_match.setdefault(item.video, {})
                switches.setdefault(item.video, 0)
                for g, p in identity_matches(x.persons_gt, x.persons_pred).items():
                    matches += 1
                    if g in last and last[g] != p:
                        switches[item.video] += 1
                    last[g] = p
        scored += 1
        if on_item:
            on_item(item)
    base = result_from_confusion(confusion, scored)
    part_ap = parts.average_precision() * 100
    person_ap = persons.average_precision()[0] * 100 if has_person_maps else None
    videos = sorted({i.video for i in items if i.video is not None})
    return MultiPersonResult(
        base.pixel_accuracy, base.mean_accuracy, base.mean_iou, base.iou,
        [[float(v) for v in row] for row in part_ap], [float(v) for v in part_ap.mean(0)],
        None if person_ap is None else [float(v) for v in person_ap], tuple(thresholds), scored,
        videos=len(videos), id_switches=sum(switches.values()) if videos and has_person_maps else None,
        id_switches_per_video=switches, person_matches=matches, failed=failed, labels=tuple(labels))
