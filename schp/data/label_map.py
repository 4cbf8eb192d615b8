"""Label maps in another label scheme: a JSON file maps the model's classes onto target classes.

Try-on and re-identification pipelines want their own classes (e.g. LIP's 20 folded into upper
clothes, lower clothes, skin); this replaces their hand-written remapping. The file:

    {"labels": ["background", "upper", "lower"],           # target classes; a map's value i is labels[i]
     "map": {"Upper-clothes": "upper", "Coat": "upper",    # source class -> target class, by name or index
             "Pants": "lower", "Skirt": "lower"},
     "palette": [[0, 0, 0], [255, 0, 0], [0, 0, 255]]}     # optional RGB per target class

Source classes the map does not name become target class 0. The file is checked against the source
labels before any model is loaded: a class outside them is an error naming the file and the class.
"""
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from schp.errors import SetupError
from schp.utils.palette import get_palette


@dataclass(frozen=True)
class LabelMap:
    labels: Tuple[str, ...]  # target class names
    table: np.ndarray  # source class -> target class, uint8, one entry per source class
    palette: Tuple[int, ...]  # flat RGB palette of the target classes, as get_palette gives one

    def apply(self, labels: np.ndarray) -> np.ndarray:
        """The H x W uint8 map in the target scheme."""
        return self.table[labels]

    def describe(self) -> dict:
        return {"labels": list(self.labels), "table": self.table.tolist()}


def _class_index(value, names: Sequence[str], what: str, source: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise SetupError(f"{what} {value!r} is neither a class name nor an index", "label_map", source)
    if isinstance(value, int):
        if not 0 <= value < len(names):
            raise SetupError(f"{what} {value} is outside the {len(names)} classes", "label_map", source)
        return value
    lowered = [n.lower() for n in names]
    if value.lower() not in lowered:
        raise SetupError(f"{what} {value!r} is not one of: {', '.join(names)}", "label_map", source)
    return lowered.index(value.lower())


def label_map_from_dict(data: Mapping, source_labels: Sequence[str], source: str = "<dict>") -> LabelMap:
    """A LabelMap from the JSON structure above; SetupError (parameter label_map) naming the problem."""
    if not isinstance(data, Mapping):
        raise SetupError("expected a JSON object with 'labels' and 'map'", "label_map", source)
    unknown = sorted(set(data) - {"labels", "map", "palette"})
    if unknown:
        raise SetupError(f"unknown key(s) {', '.join(map(repr, unknown))} (expected labels, map, palette)",
                         "label_map", source)
    targets = data.get("labels")
    if not isinstance(targets, list) or not targets or not all(isinstance(t, str) and t for t in targets):
        raise SetupError("'labels' must be a non-empty list of target class names", "label_map", source)
    if len(targets) > 256:
        raise SetupError(f"{len(targets)} target classes: a PNG label map holds at most 256", "label_map", source)
    if len({t.lower() for t in targets}) != len(targets):
        raise SetupError("'labels' names a target class twice", "label_map", source)
    mapping = data.get("map")
    if not isinstance(mapping, Mapping):
        raise SetupError("'map' must be an object: source class -> target class", "label_map", source)
    table = np.zeros(len(source_labels), dtype=np.uint8)
    for key, value in mapping.items():
        key = int(key) if isinstance(key, str) and key.isdigit() else key
        table[_class_index(key, source_labels, "source class", source)] = \
            _class_index(value, targets, "target class", source)
    palette = data.get("palette")
    if palette is None:
        flat = tuple(get_palette(len(targets)))
    else:
        if not isinstance(palette, list) or len(palette) != len(targets) or not all(
                isinstance(c, list) and len(c) == 3 and all(isinstance(v, int) and 0 <= v <= 255 for v in c)
                for c in palette):
            raise SetupError(f"'palette' must list one [R, G, B] (0-255) per target class ({len(targets)})",
                             "label_map", source)
        flat = tuple(v for c in palette for v in c)
    return LabelMap(tuple(targets), table, flat)


def load_label_map(path: Union[str, Path], source_labels: Sequence[str]) -> LabelMap:
    """Read and check a label map file against the model's classes (before any model is loaded)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise SetupError(f"cannot read ({err.strerror or err})", "label_map", str(path)) from None
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise SetupError(f"not valid JSON ({err})", "label_map", str(path)) from None
    return label_map_from_dict(data, source_labels, str(path))


def resolve_label_map(value: Optional[Union[str, Path, Mapping, LabelMap]],
                      source_labels: Sequence[str]) -> Optional[LabelMap]:
    """A file path, a dict of the file's structure, a LabelMap, or None."""
    if value is None or isinstance(value, LabelMap):
        return value
    if isinstance(value, Mapping):
        return label_map_from_dict(value, source_labels)
    return load_label_map(value, source_labels)
