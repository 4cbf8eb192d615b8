"""The multi-person outputs, in the released extension's layout and formats, each written atomically.

`<out>/global_parsing/<stem>.png` class map, `<out>/instance_parsing/<stem>.png` part map and `.txt`
("class confidence" per part), `<out>/global_tag/<stem>.png` person map and `.txt` ("score Y0 X0 Y1 X1"
per person, expanded box); all PNGs 8-bit palette with the 256-entry VOC colour map. Beyond the
original: `<out>/overlay/<stem>.jpg` (class colours over the photo, each person outlined in a colour
of its own) and `<out>/instances/<stem>.json` (the persons kept, their boxes and what found them).
"""
import colorsys
import json
from pathlib import Path
from typing import Dict, List, Sequence

import cv2
import numpy as np

from schp.multi_person.fusion import Fused
from schp.multi_person.nms import People
from schp.utils.outputs import atomic_path, save_label_png
from schp.utils.palette import get_palette

PALETTE = get_palette(256)
FOLDERS = ("global_parsing", "instance_parsing", "global_tag")


def output_paths(output_dir: Path, stem: str, overlay: bool = True) -> Dict[str, Path]:
    out = Path(output_dir)
    paths = {
        "global_parsing": out / "global_parsing" / f"{stem}.png",
        "instance_parsing": out / "instance_parsing" / f"{stem}.png",
        "instance_txt": out / "instance_parsing" / f"{stem}.txt",
        "global_tag": out / "global_tag" / f"{stem}.png",
        "global_tag_txt": out / "global_tag" / f"{stem}.txt",
        "instances": out / "instances" / f"{stem}.json",
    }
    if overlay:
        paths["overlay"] = out / "overlay" / f"{stem}.jpg"
    return paths


def save_text(lines: Sequence[str], path: Path) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text("".join(line + "\n" for line in lines))


def confidence_lines(fused: Fused) -> List[str]:
    """`class confidence` per part, the confidence as Python prints a float (as the original wrote it)."""
    return [f"{cls} {float(conf)}" for cls, conf in fused.confidences]


def tag_lines(fused: Fused) -> List[str]:
    """`score Y0 X0 Y1 X1` per person present in the final person map, expanded box, ints."""
    return [f"{score:.6f} {box[1]} {box[0]} {box[3]} {box[2]}" for _, score, box in fused.tags]


def person_colors(count: int) -> np.ndarray:
    """count x 3 uint8 BGR colours, far apart in hue (golden-ratio steps), bright and saturated."""
    colors = []
    for k in range(count):
        r, g, b = colorsys.hsv_to_rgb((k * 0.618033988749895) % 1.0, 0.9, 1.0)
        colors.append((int(b * 255), int(g * 255), int(r * 255)))
    return np.array(colors, dtype=np.uint8).reshape(-1, 3)


def overlay_image(image: np.ndarray, fused: Fused, alpha: float = 0.5) -> np.ndarray:
    """Class colours blended over the photo where a class was found, each person outlined and numbered."""
    colors = np.array(PALETTE, dtype=np.uint8).reshape(-1, 3)[:, ::-1]
    out = image.copy()
    fg = fused.classes != 0
    blended = cv2.addWeighted(image, 1.0 - alpha, colors[fused.classes], alpha, 0.0)
    out[fg] = blended[fg]
    ids = [int(k) for k in np.unique(fused.persons) if k != 0]
    palette = person_colors(max(ids, default=0))
    thickness = max(2, round(max(image.shape[:2]) / 400))
    for k in ids:
        mask = (fused.persons == k).astype(np.uint8)
        contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        color = tuple(int(v) for v in palette[k - 1])
        cv2.drawContours(out, contours, -1, color, thickness)
        ys, xs = np.nonzero(mask)
        top = int(np.argmin(ys))
        cv2.putText(out, str(k), (int(xs[top]), max(int(ys[top]) - 4, 12)), cv2.FONT_HERSHEY_SIMPLEX,
                    thickness / 3, color, thickness)
    return out


def instances_record(image_name: str, height: int, width: int, people: People, source: Dict) -> Dict:
    """The original's crop.json item for one image, with what found the persons."""
    return {
        "dataset": "CIHP", "im_name": image_name, "img_height": height, "img_width": width,
        "person_num": people.count,
        "person_bbox": [list(b) for b in people.crop_boxes],
        "real_person_bbox": [list(b) for b in people.boxes],
        "person_bbox_score": list(people.scores),
        "instances": source,
    }


def save_outputs(paths: Dict[str, Path], image: np.ndarray, fused: Fused, record: Dict, label_map=None) -> None:
    """Every output of one image; each file appears complete or not at all. The record goes last, so
    a run cut short redoes the image. `label_map` rewrites the class map (global_parsing) into another
    label scheme; the part classes of the .txt files stay CIHP's, as the multi-person evaluation reads them."""
    for path in paths.values():
        path.parent.mkdir(parents=True, exist_ok=True)
    if label_map is not None:
        save_label_png(label_map.apply(fused.classes), label_map.palette, paths["global_parsing"])
    else:
        save_label_png(fused.classes, PALETTE, paths["global_parsing"])
    save_label_png(fused.parts, PALETTE, paths["instance_parsing"])
    save_text(confidence_lines(fused), paths["instance_txt"])
    save_label_png(fused.persons.astype(np.uint8), PALETTE, paths["global_tag"])
    save_text(tag_lines(fused), paths["global_tag_txt"])
    if "overlay" in paths:
        ok, data = cv2.imencode(".jpg", overlay_image(image, fused), [cv2.IMWRITE_JPEG_QUALITY, 90])
        if not ok:
            raise OSError(f"cannot encode {paths['overlay'].name} as JPEG")
        with atomic_path(paths["overlay"]) as tmp:
            tmp.write_bytes(data.tobytes())
    with atomic_path(paths["instances"]) as tmp:
        tmp.write_text(json.dumps(record, indent=1) + "\n")
