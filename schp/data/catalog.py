"""The released SCHP models: input size, labels, checkpoint file and where to download it.

Everything dataset-specific reads from DATASETS (single-person) and MULTI_PERSON (the CIHP global and
local parsers); figures from the SCHP README.
"""
from dataclasses import dataclass
from typing import Tuple


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    input_size: Tuple[int, int]  # (height, width) of the network input
    labels: Tuple[str, ...]
    checkpoint: str  # file name of the released checkpoint
    drive_id: str  # Google Drive file id of that checkpoint
    miou: str  # reported mIoU, for the README and --list-labels
    flip_pairs: Tuple[Tuple[int, int], ...] = ()  # left/right classes exchanged when an image is mirrored

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    @property
    def flip_permutation(self) -> Tuple[int, ...]:
        """Class order of a mirrored prediction: index c holds the channel that class c becomes."""
        order = list(range(self.num_classes))
        for left, right in self.flip_pairs:
            order[left], order[right] = right, left
        return tuple(order)

    @property
    def url(self) -> str:
        return f"https://drive.google.com/uc?id={self.drive_id}"


DATASETS = {
    "lip": DatasetSpec(
        name="lip", input_size=(473, 473),
        labels=("Background", "Hat", "Hair", "Glove", "Sunglasses", "Upper-clothes", "Dress", "Coat",
                "Socks", "Pants", "Jumpsuits", "Scarf", "Skirt", "Face", "Left-arm", "Right-arm",
                "Left-leg", "Right-leg", "Left-shoe", "Right-shoe"),
        checkpoint="exp-schp-201908261155-lip.pth", drive_id="1k4dllHpu0bdx38J7H28rVVLpU-kOHmnH",
        miou="59.36 (LIP val)", flip_pairs=((14, 15), (16, 17), (18, 19))),
    "atr": DatasetSpec(
        name="atr", input_size=(512, 512),
        labels=("Background", "Hat", "Hair", "Sunglasses", "Upper-clothes", "Skirt", "Pants", "Dress",
                "Belt", "Left-shoe", "Right-shoe", "Face", "Left-leg", "Right-leg", "Left-arm",
                "Right-arm", "Bag", "Scarf"),
        checkpoint="exp-schp-201908301523-atr.pth", drive_id="1ruJg4lqR_jgQPj-9K0PP-L2vJERYOxLP",
        miou="82.29 (ATR test)", flip_pairs=((9, 10), (12, 13), (14, 15))),
    "pascal": DatasetSpec(
        name="pascal", input_size=(512, 512),
        labels=("Background", "Head", "Torso", "Upper Arms", "Lower Arms", "Upper Legs", "Lower Legs"),
        checkpoint="exp-schp-201908270938-pascal-person-part.pth",
        drive_id="1E5YwNKW2VOEayK9mWCS3Kpsxf-3z04ZE", miou="71.46 (Pascal-Person-Part val)"),
}


# The multi-person (CIHP) models: a global parser for whole images and a local parser for person crops.
# Kept apart from DATASETS (the single-person extractor's --dataset choices). CIHP's 20 classes use LIP's
# indices except 10 (Torso-skin where LIP has Jumpsuits), so LIP's left/right pairs hold for them.
CIHP_LABELS = ("Background", "Hat", "Hair", "Glove", "Sunglasses", "Upper-clothes", "Dress", "Coat", "Socks",
               "Pants", "Torso-skin", "Scarf", "Skirt", "Face", "Left-arm", "Right-arm", "Left-leg",
               "Right-leg", "Left-shoe", "Right-shoe")
MULTI_PERSON = {
    "global": DatasetSpec(
        name="cihp-global", input_size=(473, 473), labels=CIHP_LABELS,
        checkpoint="exp_schp_multi_cihp_global.pth", drive_id="1s30hj8zeYj0wuTA5Rek-one-v5uT7kX9",
        miou="not reported separately (CIHP multi-person track)", flip_pairs=((14, 15), (16, 17), (18, 19))),
    "local": DatasetSpec(
        name="cihp-local", input_size=(473, 473), labels=CIHP_LABELS,
        checkpoint="exp_schp_multi_cihp_local.pth", drive_id="1dwDrXHkhAe_nYtnSqi548zrjo5mlSPF0",
        miou="not reported separately (CIHP multi-person track)", flip_pairs=((14, 15), (16, 17), (18, 19))),
}


def dataset_for_num_classes(num_classes: int) -> str:
    """Name(s) of the dataset(s) whose model has this many classes, for error messages."""
    names = [d.name for d in DATASETS.values() if d.num_classes == num_classes]
    return " or ".join(names) if names else f"none of {sorted(DATASETS)}"


def custom_spec(num_classes: int, labels=None, input_size=(473, 473), flip_pairs=()) -> DatasetSpec:
    """A label set of the user's own (training with --dataset custom, or read back from its checkpoint).

    Class ids are 8-bit with 255 = ignore, so 2..255 classes; `labels` default to "class 0", "class 1"...
    `flip_pairs` are (left, right) class pairs exchanged when an image is mirrored.
    """
    num_classes = int(num_classes)
    if not 2 <= num_classes <= 255:
        raise ValueError(f"a custom label set needs 2..255 classes (labels are 8-bit, 255 = ignore), "
                         f"got {num_classes}")
    labels = tuple(str(n) for n in labels) if labels else tuple(f"class {i}" for i in range(num_classes))
    if len(labels) != num_classes:
        raise ValueError(f"{len(labels)} label names for {num_classes} classes")
    pairs = tuple((int(a), int(b)) for a, b in flip_pairs)
    used = [c for pair in pairs for c in pair]
    if any(not 0 <= c < num_classes for c in used) or len(set(used)) != len(used) \
            or any(a == b for a, b in pairs):
        raise ValueError(f"flip pairs {pairs}: each class at most once, all in 0..{num_classes - 1}")
    height, width = (int(v) for v in input_size)
    return DatasetSpec(name="custom", input_size=(height, width), labels=labels, checkpoint="",
                       drive_id="", miou="", flip_pairs=pairs)


def parse_flip_pairs(text: str):
    """'14:15,16:17' -> ((14, 15), (16, 17)); '' -> ()."""
    pairs = []
    for item in (text or "").replace(" ", "").split(","):
        if not item:
            continue
        try:
            left, right = (int(v) for v in item.split(":"))
        except ValueError:
            raise ValueError(f"flip pair {item!r}: expected LEFT:RIGHT class ids, e.g. 14:15") from None
        pairs.append((left, right))
    return tuple(pairs)
