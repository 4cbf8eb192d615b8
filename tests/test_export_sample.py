"""The crop exports are verified on: drawn by the package itself, so an installed copy needs no demo file."""
import shutil
import subprocess
import sys

import numpy as np

from conftest import ROOT


def test_the_verification_crop_needs_no_file_outside_the_package(tmp_path):
    """A copy of the package alone (no demo/, no checkout around it) makes the same crop, every time."""
    shutil.copytree(ROOT / "schp", tmp_path / "schp", ignore=shutil.ignore_patterns("__pycache__"))
    code = ("import numpy as np, sys, schp; from schp.data.catalog import DATASETS; from schp.export import sample_crop; "
            "assert schp.__file__.startswith(sys.argv[2]), schp.__file__; "
            "x = sample_crop(DATASETS['lip']); np.save(sys.argv[1], x.numpy())")
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "crop.npy"), str(tmp_path)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    from schp.data.catalog import DATASETS
    from schp.export import sample_crop

    here = sample_crop(DATASETS["lip"]).numpy()
    there = np.load(tmp_path / "crop.npy")
    assert here.shape == (1, 3, 473, 473) and np.array_equal(here, there)  # deterministic
    figure = here[0, :, :, 100:373]  # inside the 3:4 portrait, away from the padding
    assert figure.std() > 0.3 and len(np.unique(figure.round(1))) > 20  # edges and texture, not a flat field
