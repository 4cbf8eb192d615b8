"""The IntegratedPIFu data tree: which renders to parse and where their parse maps go (SPEC.md s. 6).

<root>/{train,test}_set_list.txt name the subjects; renders are
<root>/rendering_script/buffer_fixed_full_mesh/<subject>/rendered_image_<yaw>.png and the maps that
IntegratedPIFu's loaders read are <root>/rendering_script/render_human_parse_results/<subject>/
rendered_parse_<yaw>.npy.

Subject ids become folder names under the output roots, so only plain names are taken: an id that is
a path (separator, `.`, `..`, absolute) is refused, or the extractor would write outside the tree.
"""
import re
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple

RENDERS = Path("rendering_script") / "buffer_fixed_full_mesh"
PARSE_RESULTS = Path("rendering_script") / "render_human_parse_results"
LIST_FILES = {"train": "train_set_list.txt", "test": "test_set_list.txt"}
RENDER_NAME = re.compile(r"^rendered_image_(?P<yaw>.+)\.png$", re.IGNORECASE)


@dataclass(frozen=True)
class Render:
    subject: str
    yaw: str  # as in the file name, e.g. "000"
    image: Path
    clash: Optional[Path] = None  # an earlier render with the same outputs (000.png and 000.PNG)


@dataclass(frozen=True)
class RefusedSubject:
    """A list-file line whose id is not a plain folder name."""
    list_file: Path
    line: int  # 1-based
    subject: str
    reason: str


def subject_id_problem(subject: str) -> Optional[str]:
    """Why `subject` cannot name a folder inside the tree, or None for a plain folder name."""
    if subject in (".", ".."):
        return f"is {subject!r}"
    if "/" in subject or "\\" in subject:
        return "is a path (it holds a separator)" + (", an absolute one" if subject.startswith("/") else "")
    if "\0" in subject:
        return "holds a NUL character"
    return None


def find_subjects(root: Path, which: str = "all") -> Tuple[List[str], Optional[str], List[RefusedSubject]]:
    """(subjects, note, refused): ids from the list files selected by `which` (all, train, test).

    With no list file at all, every subject folder under the render tree is taken, and `note` says so.
    Ids that are not plain folder names are not taken: `refused` names their list file and line.
    """
    names = list(LIST_FILES.values()) if which == "all" else [LIST_FILES[which]]
    lists = [root / n for n in names if (root / n).is_file()]
    if not lists:
        renders = root / RENDERS
        subjects = sorted(p.name for p in renders.iterdir() if p.is_dir()) if renders.is_dir() else []
        return subjects, f"no {' or '.join(names)} in {root}: taking every subject folder in {renders}", []
    subjects: List[str] = []
    refused: List[RefusedSubject] = []
    for path in lists:
        for number, line in enumerate(path.read_text().splitlines(), 1):
            subject = line.strip()
            if not subject or subject in subjects:
                continue
            problem = subject_id_problem(subject)
            if problem:
                refused.append(RefusedSubject(path, number, subject, problem))
            else:
                subjects.append(subject)
    return subjects, None, refused


def find_renders(root: Path, subjects: List[str]) -> Tuple[List[Render], List[str]]:
    """(renders, missing): the render images of each subject in order, and subjects without a folder."""
    renders, missing = [], []
    for subject in subjects:
        folder = root / RENDERS / subject
        if not folder.is_dir():
            missing.append(subject)
            continue
        first = {}  # yaw -> the render that writes its outputs (names differing in case only clash)
        for image in sorted(folder.iterdir()):
            match = RENDER_NAME.match(image.name)
            if match:
                yaw = match.group("yaw")
                renders.append(Render(subject, yaw, image, clash=first.get(yaw)))
                first.setdefault(yaw, image)
    return renders, missing


def parse_map_path(parse_root: Path, render: Render, suffix: str = "") -> Path:
    """Where IntegratedPIFu reads the parse map of `render` (suffix e.g. "_logits" for other files)."""
    return parse_root / render.subject / f"rendered_parse_{render.yaw}{suffix}.npy"


def preview_path(render: Render) -> Path:
    """The palette PNG written beside the render, for people to look at."""
    return render.image.with_name(f"rendered_parse_{render.yaw}.png")
