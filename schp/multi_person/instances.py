"""Instance sources: who is in an image, as score-sorted person masks with boxes.

A source answers `instances(image_bgr, path) -> [Instance]` sorted by score, highest first (stable), and
`describe()` (what made the instances, for the output metadata). Three sources: a folder of instance-id
PNGs, a detectron2 `instances_predictions.pth` (the original pipeline's detections), and torchvision's
Mask R-CNN. A problem with one image raises InstanceError (one line for the user); a problem with the
source itself (missing file, missing package) raises SourceError before any work.
"""
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from schp.data.decode import ImageError, open_checked
from schp.errors import SCHPError, SetupError

PERSON_COCO_LABEL = 1  # torchvision's COCO category id of "person"
# The original detector's test settings, mirrored on torchvision's Mask R-CNN
DETECTOR_SCORE_THRESH = 0.5
DETECTOR_NMS_THRESH = 0.95
DETECTOR_MAX_DETECTIONS = 100
DETECTOR_MIN_SIZE, DETECTOR_MAX_SIZE = 800, 1333
MASK_THRESHOLD = 0.5


class InstanceError(SCHPError):
    """The instances of one image cannot be had; the message is the reason."""


class SourceError(SetupError):
    """The instance source cannot be used at all (set-up error)."""


@dataclass
class Instance:
    score: float
    box: Tuple[float, float, float, float]  # x0, y0, x1, y1 in continuous coordinates (x1 = x0 + w)
    mask: np.ndarray  # H x W bool


def sort_by_score(instances: List[Instance]) -> List[Instance]:
    """Highest score first; equal scores keep their order. A detection whose score, box or mask is not
    finite is refused (InstanceError naming it): NaN would reorder the others and inf reach outputs."""
    for k, inst in enumerate(instances):
        mask = np.asarray(inst.mask)
        if not (all(math.isfinite(float(v)) for v in (inst.score, *inst.box))
                and (mask.dtype == bool or np.isfinite(mask).all())):
            raise InstanceError(f"detection {k + 1} has a score, box or mask that is not a finite number "
                                f"(score {inst.score}, box {tuple(inst.box)})")
    return sorted(instances, key=lambda inst: -inst.score)


def mask_box(mask: np.ndarray) -> Tuple[float, float, float, float]:
    """COCO's toBbox convention as x0, y0, x1, y1: (min_col, min_row, max_col + 1, max_row + 1)."""
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    if not rows.size:
        return (0.0, 0.0, 0.0, 0.0)
    return (float(cols[0]), float(rows[0]), float(cols[-1] + 1), float(rows[-1] + 1))


def read_instance_png(path: Path) -> np.ndarray:
    """H x W int32 person ids (0 = nobody) of an 8- or 16-bit grey or palette PNG."""
    try:
        with open_checked(path) as image:  # the header-first size check of every reader
            mode = image.mode
            if mode in ("L", "P", "I", "I;16", "I;16B", "I;16L"):
                return np.array(image).astype(np.int32)
    except (OSError, SyntaxError, ImageError) as err:
        raise InstanceError(f"instance mask {path}: not a readable image ({err})") from None
    raise InstanceError(f"instance mask {path} is {mode}, not person ids: save it as an 8-bit grey or palette "
                        "PNG (0 = nobody, 1..K = persons)")


class MaskFolderSource:
    """`DIR/<stem>.png` holds person ids (0 = nobody, 1..K), `DIR/<stem>.json` optional scores {"id": s}.

    Scores default to 1.0; persons are ordered by score (descending) then id, and boxes come from the
    mask extent. They then go through the same score threshold and mask NMS as detections.
    """

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise SourceError(f"--instances masks {self.folder}: no such folder")

    def describe(self) -> Dict:
        return {"source": "masks", "folder": str(self.folder)}

    def paths(self, stem: str) -> List[Path]:
        """The files this source reads for an image (its png, and json when present)."""
        return [self.folder / f"{stem}.png"]

    def scores(self, stem: str) -> Dict[int, float]:
        path = self.folder / f"{stem}.json"
        if not path.exists():
            return {}
        try:
            raw = json.loads(path.read_text())
            scores = {int(k): float(v) for k, v in raw.items()}
        except (OSError, ValueError, AttributeError, TypeError) as err:
            raise InstanceError(f"scores {path}: expected {{\"1\": 0.98, ...}} ({err})") from None
        bad = [k for k, v in scores.items() if not math.isfinite(v)]
        if bad:
            raise InstanceError(f"scores {path}: person {bad[0]} has a score that is not a number")
        return scores

    def instances(self, image: np.ndarray, path: Path) -> List[Instance]:
        stem = Path(path).stem
        png = self.folder / f"{stem}.png"
        if not png.is_file():
            raise InstanceError(f"no instance mask {png}")
        ids = read_instance_png(png)
        if ids.shape != image.shape[:2]:
            raise InstanceError(f"instance mask {png} is {ids.shape[1]}x{ids.shape[0]} but the image is "
                                f"{image.shape[1]}x{image.shape[0]}")
        scores = self.scores(stem)
        present = [int(v) for v in np.unique(ids) if v != 0]
        order = sorted(present, key=lambda k: (-scores.get(k, 1.0), k))
        result = []
        for k in order:
            mask = ids == k
            result.append(Instance(scores.get(k, 1.0), mask_box(mask), mask))
        return result


def _require_pycocotools():
    try:
        from pycocotools import mask as mask_util
    except ImportError:
        raise SourceError("--instances detectron2 needs the package pycocotools "
                          "(pip install -r requirements-multiperson.txt)") from None
    return mask_util


class Detectron2FileSource:
    """Detections written by detectron2 (`instances_predictions.pth`), as the original pipeline made them.

    Each entry is `{'image_id', 'instances': [{'bbox': [x, y, w, h], 'score', 'segmentation': COCO RLE}]}`.
    Images are matched by `image_id`: through the COCO image list of the original's first step
    (`--image-list`, file_name -> id) when given, else ids 1..N in the sorted order of the inputs.
    """

    def __init__(self, path: Path, image_list: Optional[Path] = None, names: Sequence[str] = ()):
        import torch
        self.mask_util = _require_pycocotools()
        self.path = Path(path)
        if not self.path.is_file():
            raise SourceError(f"--instances detectron2 {self.path}: no such file")
        try:
            predictions = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as err:  # torch raises many types; all mean "unusable"
            first = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise SourceError(f"--instances detectron2 {self.path}: not a readable predictions file "
                              f"({first[:200]}); nothing from it was executed") from None
        if not isinstance(predictions, list) or not all(isinstance(p, dict) and "image_id" in p
                                                        for p in predictions):
            raise SourceError(f"--instances detectron2 {self.path}: expected a list of "
                              "{'image_id', 'instances'} entries (detectron2's instances_predictions.pth)")
        self.by_id = {int(p["image_id"]): p.get("instances", []) for p in predictions}
        self.image_list = Path(image_list) if image_list else None
        if self.image_list is not None:
            try:
                images = json.loads(self.image_list.read_text())["images"]
                self.ids = {str(im["file_name"]): int(im["id"]) for im in images}
            except (OSError, ValueError, KeyError, TypeError) as err:
                raise SourceError(f"--image-list {self.image_list}: not a COCO image list ({err})") from None
        else:
            self.ids = {str(name): i + 1 for i, name in enumerate(names)}

    def describe(self) -> Dict:
        return {"source": "detectron2", "file": str(self.path),
                "image_ids": str(self.image_list) if self.image_list else "1..N in sorted input order"}

    def instances(self, image: np.ndarray, path: Path, name: Optional[str] = None) -> List[Instance]:
        key = name if name is not None else Path(path).name
        image_id = self.ids.get(key, self.ids.get(Path(path).name))
        if image_id is None:
            raise InstanceError(f"not in --image-list {self.image_list}")
        if image_id not in self.by_id:
            raise InstanceError(f"no entry for image_id {image_id} in {self.path}")
        h, w = image.shape[:2]
        result = []
        for k, inst in enumerate(self.by_id[image_id]):
            try:
                rle = dict(inst["segmentation"])
                x, y, bw, bh = (float(v) for v in inst["bbox"])
                score = float(inst["score"])
                if tuple(int(v) for v in rle["size"]) != (h, w):
                    raise InstanceError(f"detection {k + 1} of image_id {image_id} is for a "
                                        f"{rle['size'][1]}x{rle['size'][0]} image, this one is {w}x{h}")
                if isinstance(rle["counts"], str):
                    rle["counts"] = rle["counts"].encode("ascii")
                mask = self.mask_util.decode(rle).astype(bool)
            except InstanceError:
                raise
            except Exception as err:  # malformed entry
                raise InstanceError(f"detection {k + 1} of image_id {image_id} in {self.path} is malformed "
                                    f"({type(err).__name__}: {err})") from None
            result.append(Instance(score, (x, y, x + bw, y + bh), mask))
        return sort_by_score(result)


class TorchvisionSource:
    """torchvision's Mask R-CNN (ResNet-50 FPN v2, COCO), person class only, the original's thresholds.

    Not the original detector (a Cascade Mask R-CNN X-152 fine-tuned on CIHP): it finds different
    people and masks, which the output metadata says.
    """

    def __init__(self, device, weights: Optional[Path] = None, min_size: int = DETECTOR_MIN_SIZE,
                 max_size: int = DETECTOR_MAX_SIZE, model=None):
        import torch
        self.device = device
        self.weights = Path(weights) if weights else None
        if model is None:
            model = build_torchvision_detector(self.weights, min_size, max_size)
        configure_detector(model, min_size, max_size)
        self.model = model.to(device).eval()
        self.torch = torch

    def describe(self) -> Dict:
        return {"source": "torchvision", "detector": "maskrcnn_resnet50_fpn_v2 (COCO, person class)",
                "weights": str(self.weights) if self.weights else "torchvision COCO_V1 (downloaded)",
                "score_thresh": self.model.roi_heads.score_thresh, "nms_thresh": self.model.roi_heads.nms_thresh,
                "detections_per_img": self.model.roi_heads.detections_per_img,
                "min_size": list(self.model.transform.min_size), "max_size": self.model.transform.max_size,
                "note": "not the original CIHP-fine-tuned Cascade Mask R-CNN X-152: other instances"}

    def instances(self, image: np.ndarray, path: Path) -> List[Instance]:
        torch = self.torch
        rgb = torch.from_numpy(np.ascontiguousarray(image[:, :, ::-1])).to(self.device)
        x = rgb.permute(2, 0, 1).float().div(255)
        with torch.inference_mode():
            out = self.model([x])[0]
        keep = out["labels"] == PERSON_COCO_LABEL
        scores = out["scores"][keep].cpu().numpy()
        boxes = out["boxes"][keep].cpu().numpy()
        masks = (out["masks"][keep][:, 0] > MASK_THRESHOLD).cpu().numpy()
        result = [Instance(float(s), tuple(float(v) for v in b), m) for s, b, m in zip(scores, boxes, masks)]
        return sort_by_score(result)


def configure_detector(model, min_size: int = DETECTOR_MIN_SIZE, max_size: int = DETECTOR_MAX_SIZE) -> None:
    """The original detector's test settings on a torchvision Mask R-CNN."""
    model.roi_heads.score_thresh = DETECTOR_SCORE_THRESH
    model.roi_heads.nms_thresh = DETECTOR_NMS_THRESH
    model.roi_heads.detections_per_img = DETECTOR_MAX_DETECTIONS
    model.transform.min_size = (int(min_size),)
    model.transform.max_size = int(max_size)


def build_torchvision_detector(weights: Optional[Path], min_size: int = DETECTOR_MIN_SIZE,
                               max_size: int = DETECTOR_MAX_SIZE):
    """maskrcnn_resnet50_fpn_v2 with COCO weights from a local file, else torchvision's own download."""
    try:
        from torchvision.models.detection import MaskRCNN_ResNet50_FPN_V2_Weights, maskrcnn_resnet50_fpn_v2
    except ImportError:
        raise SourceError("--instances torchvision needs the package torchvision "
                          "(pip install -r requirements-multiperson.txt)") from None
    import torch
    if weights is None:
        try:
            return maskrcnn_resnet50_fpn_v2(weights=MaskRCNN_ResNet50_FPN_V2_Weights.COCO_V1,
                                            min_size=min_size, max_size=max_size)
        except Exception as err:  # network errors of every kind
            first = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise SourceError(f"cannot download torchvision's Mask R-CNN weights ({first[:200]}); get "
                              f"{MaskRCNN_ResNet50_FPN_V2_Weights.COCO_V1.url} by hand and pass "
                              "--detector-weights FILE") from None
    weights = Path(weights)
    if not weights.is_file():
        raise SourceError(f"--detector-weights {weights}: no such file")
    model = maskrcnn_resnet50_fpn_v2(weights=None, weights_backbone=None, min_size=min_size, max_size=max_size)
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and isinstance(state.get("model"), dict):
            state = state["model"]
        model.load_state_dict(state, strict=True)
    except Exception as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise SourceError(f"--detector-weights {weights}: not maskrcnn_resnet50_fpn_v2 COCO weights "
                          f"({first[:200]})") from None
    return model


class FrameSource:
    """The instances of one video's frames, from a source made for photos: masks from `DIR/<video>/`
    (`<frame>.png`, optional `<frame>.json`), detectron2 entries by the image list's `<video>/<frame
    file>`, the detector on each frame."""

    def __init__(self, source, video: str):
        self.source, self.video = source, video
        if isinstance(source, MaskFolderSource):
            self.source = MaskFolderSource.__new__(MaskFolderSource)
            self.source.folder = source.folder / video

    def instances(self, image: np.ndarray, frame: Path) -> List[Instance]:
        if isinstance(self.source, MaskFolderSource) and not self.source.folder.is_dir():
            raise InstanceError(f"no mask folder {self.source.folder} for video {self.video}")
        if isinstance(self.source, Detectron2FileSource):
            return self.source.instances(image, frame, f"{self.video}/{Path(frame).name}")
        return self.source.instances(image, frame)
