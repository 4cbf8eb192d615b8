"""AP^r of schp.multi_person.evaluation against CIHP's reference script on the same files.

The reference is evaluation/test_inst_part_ap.py of the CIHP_PGN repository (not shipped here: it
carries no licence). This script builds the test set of tests/cihp_eval_data.py, lays it out as the
reference reads it (`Instance_part_val/<id>.png` = Instance_ids, `<id>.txt` = "part class person"
lines; `../output/cihp_instance_part_maps/<id>.png/.txt` = instance_parsing), runs the reference
unchanged as a program (its printout), then imports it and calls its per-class function for the
unrounded figures, and prints both next to ours. The expected numbers of
tests/test_multi_person_evaluation.py were copied from this output.

    python tests/measure_cihp_oracle.py PATH/TO/test_inst_part_ap.py [work folder]
"""
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from cihp_eval_data import build_cihp_set  # noqa: E402
from schp.multi_person.evaluation import evaluate_multi_person, gt_part_classes  # noqa: E402


def reference_layout(data: Path, pred: Path, work: Path) -> Path:
    """The reference's folders under work/: returns its working directory (work/evaluation)."""
    gt_dir, pred_dir = work / "evaluation" / "Instance_part_val", work / "output" / "cihp_instance_part_maps"
    gt_dir.mkdir(parents=True), pred_dir.mkdir(parents=True)
    for name in (data / "val_id.txt").read_text().split():
        instances = np.array(Image.open(data / "Instance_ids" / f"{name}.png"))
        classes = np.array(Image.open(data / "Category_ids" / f"{name}.png"))
        humans = np.array(Image.open(data / "Human_ids" / f"{name}.png"))
        shutil.copy(data / "Instance_ids" / f"{name}.png", gt_dir / f"{name}.png")
        lines = [f"{g} {c} {int(np.bincount(humans[instances == g]).argmax())}"
                 for g, c in sorted(gt_part_classes(instances, classes, 20).items())]
        (gt_dir / f"{name}.txt").write_text("".join(line + "\n" for line in lines))
        for ext in (".png", ".txt"):
            shutil.copy(pred / "instance_parsing" / f"{name}{ext}", pred_dir / f"{name}{ext}")
    return work / "evaluation"


def main() -> int:
    script = Path(sys.argv[1]).resolve()
    work = Path(sys.argv[2]) if len(sys.argv) > 2 else Path(tempfile.mkdtemp(prefix="cihp-oracle-"))
    shutil.rmtree(work, ignore_errors=True)
    data, pred = build_cihp_set(work / "set")
    cwd = reference_layout(data, pred, work / "reference")
    printed = subprocess.run([sys.executable, str(script)], cwd=cwd, capture_output=True, text=True)
    print("---- reference script, run as a program ----")
    print("\n".join(line for line in printed.stdout.splitlines() if not line.startswith("process class")))
    if printed.returncode:
        print(printed.stderr)
        return 1
    spec = importlib.util.spec_from_file_location("reference_ap", script)
    reference = importlib.util.module_from_spec(spec)
    os.chdir(cwd)
    spec.loader.exec_module(reference)  # its constants are the relative paths laid out above
    ids = [x[:-4] for x in os.listdir(reference.PREDICT_DIR) if x[-3:] == "txt"]
    sys.stdout = open(os.devnull, "w")  # its per-class progress lines
    theirs = np.array([reference.compute_class_ap(ids, c, reference.IOU_THRE) for c in range(1, 20)])
    sys.stdout = sys.__stdout__
    ours = evaluate_multi_person(data, pred)
    mine = np.array(ours.part_ap) / 100
    np.set_printoptions(precision=10, linewidth=150, suppress=True)
    print("---- unrounded: reference mAP per threshold / ours ----")
    print(repr(theirs.mean(0)))
    print(repr(mine.mean(0)))
    print(f"AP^r_vol reference {theirs.mean():.10f} ours {mine.mean():.10f}")
    print(f"AP^r_50  reference {theirs.mean(0)[4]:.10f} ours {mine.mean(0)[4]:.10f}")
    print(f"largest difference over all classes and thresholds: {np.abs(theirs - mine).max():.3g}")
    print("per-class reference AP (classes 1..19 x thresholds):")
    print(repr(theirs))
    return 0 if np.allclose(theirs, mine, rtol=0, atol=1e-6) else 1


if __name__ == "__main__":
    sys.exit(main())
