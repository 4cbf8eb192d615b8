"""Listing a folder's inputs: images (by extension) apart from the other files, in a stable order."""
import os
from pathlib import Path
from typing import List, Optional, Tuple

from schp.data.decode import is_image_name


def list_images(input_dir: Path, recursive: bool = False,
                exclude: Optional[Path] = None) -> Tuple[List[Path], List[Path]]:
    """(images, others): files under `input_dir` relative to it, sorted, split by extension.

    Extensions match in any case. Folders are not followed through symbolic links (no loops);
    `exclude` (e.g. an output folder inside the input folder) is not walked.
    """
    input_dir = Path(input_dir)
    exclude_real = Path(os.path.realpath(exclude)) if exclude is not None else None
    images, others = [], []
    for folder, dirs, files in os.walk(input_dir):
        folder_path = Path(folder)
        dirs[:] = sorted(d for d in dirs if recursive and not d.startswith(".") and
                         Path(os.path.realpath(folder_path / d)) != exclude_real)
        for name in files:
            rel = (folder_path / name).relative_to(input_dir)
            (images if is_image_name(name) else others).append(rel)
        if not recursive:
            break
    return sorted(images, key=str), sorted(others, key=str)
