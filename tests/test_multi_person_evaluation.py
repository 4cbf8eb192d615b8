"""Multi-person evaluation (evaluate.py --multi-person): AP^r against the numbers of CIHP's reference
script on a synthetic CIHP-layout set, a worked example computed by hand, the reference's quirks and
fixes, bad inputs, identity switches in a VIP-layout video, and multi_person.py's outputs end to end."""
import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

import evaluate  # noqa: E402
from cihp_eval_data import build_cihp_set  # noqa: E402
from schp.multi_person.evaluation import APAccumulator, evaluate_multi_person, list_items  # noqa: E402

DATA = Path(__file__).resolve().parent / "data"

# AP of classes 1..19 at IoU 0.1..0.9 (fractions) on build_cihp_set(seed 0), as printed by CIHP_PGN's
# evaluation/test_inst_part_ap.py (commit 0cf1cbe, run unchanged under Python 3.11 / NumPy 2.4 on the
# same files laid out as it reads them: `python tests/measure_cihp_oracle.py test_inst_part_ap.py`).
# Class 12 above 1: several predictions on one instance all count (no one-to-one matching), so recall
# passes 1. Class 16 at 0.3-0.5: two equal scores, ranked by the reversed argsort (a stable order
# would give 0.5556 at 0.3).
REFERENCE_AP = {
    1: [0.6666666667, 0.6666666667, 0.6666666667, 0.6666666667, 0.1666666667, 0.08333333333, 0, 0, 0],
    2: [1, 1, 0.6875, 0.6875, 0.25, 0.25, 0, 0, 0],
    5: [1, 1, 1, 1, 1, 0.5, 0.5, 0, 0],
    6: [0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0, 0],
    7: [0.8333333333, 0.8333333333, 0.8333333333, 0.8333333333, 0.4583333333, 0.1666666667, 0.04166666667, 0, 0],
    9: [0.8333333333, 0.1666666667, 0.1666666667, 0, 0, 0, 0, 0, 0],
    12: [1.2, 1.2, 0.8666666667, 0.4533333333, 0.06666666667, 0, 0, 0, 0],
    13: [0.85, 0.85, 0.85, 0.505, 0.1777777778, 0.05833333333, 0, 0, 0],
    14: [0.3333333333, 0.125, 0, 0, 0, 0, 0, 0, 0],
    15: [0.25, 0.25, 0, 0, 0, 0, 0, 0, 0],
    16: [1, 1, 0.4444444444, 0.1111111111, 0.1111111111, 0, 0, 0, 0],
    18: [1, 1, 1, 1, 0.5555555556, 0.1111111111, 0, 0, 0],
    19: [0.6448979592, 0.6448979592, 0.6448979592, 0.6448979592, 0.2761904762, 0.1142857143, 0.04761904762, 0, 0],
}  # every other class: 0 at every threshold
REFERENCE_MAP = [0.532187611887, 0.486134980308, 0.403167144051, 0.336939073875, 0.187489557226,
                 0.09388053467, 0.0573308270677, 0, 0]  # the script's mAP line
REFERENCE_VOL = 0.233014414343  # its last line, np.mean(mAP)


def save(array, path):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(array, np.uint8), mode="L").save(path)


def run_eval(capsys, *argv):
    code = evaluate.main(["--multi-person"] + [str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def cihp_set(tmp_path_factory):
    return build_cihp_set(tmp_path_factory.mktemp("cihp-eval"))


# ----------------------------------------------------------------------------- the reference's numbers
def test_part_ap_equals_the_reference_script(cihp_set):
    data, pred = cihp_set
    result = evaluate_multi_person(data, pred)
    expected = np.array([REFERENCE_AP.get(c, [0] * 9) for c in range(1, 20)], dtype=np.float64)
    np.testing.assert_allclose(np.array(result.part_ap) / 100, expected, rtol=0, atol=1e-6)
    np.testing.assert_allclose(np.array(result.part_map) / 100, REFERENCE_MAP, rtol=0, atol=1e-6)
    assert abs(result.part_ap_vol / 100 - REFERENCE_VOL) < 1e-6
    assert abs(result.part_ap_at(0.5) / 100 - REFERENCE_MAP[4]) < 1e-6
    assert result.images == 4 and not result.failed


# ----------------------------------------------------------------------------- a worked example
def worked_example(root: Path):
    """One 20x20 image. Ground truth: hair of person 1 (rows 0-9, cols 0-9, instance 2) and of person 2
    (rows 10-19, cols 10-19, instance 22). Predicted hair parts: 1 = rows 0-7 of person 1's (IoU 80/100),
    2 = its rows 8-9 (IoU 20/100), 3 = rows 10-19, cols 0-9 (nobody's); scores 0.9, 0.7, 0.8. Predicted
    persons: 1 = person 1's pixels (IoU 1, score 0.6), 2 = part 3's pixels (IoU 0, score 0.9)."""
    data, pred = root / "data", root / "pred"
    classes, humans, instances = (np.zeros((20, 20), np.uint8) for _ in range(3))
    classes[:10, :10] = classes[10:, 10:] = 2
    humans[:10, :10], humans[10:, 10:] = 1, 2
    instances[:10, :10], instances[10:, 10:] = 2, 22
    for folder, values in (("Category_ids", classes), ("Human_ids", humans), ("Instance_ids", instances)):
        save(values, data / folder / "a.png")
    parts = np.zeros((20, 20), np.uint8)
    parts[:8, :10], parts[8:10, :10], parts[10:, :10] = 1, 2, 3
    save(np.where(parts > 0, 2, 0), pred / "global_parsing" / "a.png")
    save(parts, pred / "instance_parsing" / "a.png")
    (pred / "instance_parsing" / "a.txt").write_text("2 0.9\n2 0.7\n2 0.8\n")
    persons = np.zeros((20, 20), np.uint8)
    persons[:10, :10], persons[10:, :10] = 1, 2
    save(persons, pred / "global_tag" / "a.png")
    (pred / "global_tag" / "a.txt").write_text("0.600000 0 0 11 11\n0.900000 9 0 19 11\n")
    return data, pred


def test_worked_example(tmp_path):
    """By hand: ranked 1 (IoU .8), 3 (0), 2 (.2) against 2 instances. At 0.1 hits T F T: precision
    1, 1/2, 2/3 at recall 1/2, 1/2, 1 -> AP = 1/2 * 1 + 1/2 * 2/3 = 5/6. At 0.2 .. 0.7 (0.2 is not
    > 0.2): T F F -> 1/2. At 0.8 (0.8 is not > 0.8) and 0.9: 0. The other 18 classes have neither
    instances nor predictions: 0, and they count in the mean. Persons, ranked 2 (miss), 1 (IoU 1):
    precision 0, 1/2 at recall 0, 1/2 -> 1/4 at every threshold. Global parsing: background and hair
    each 100 of 200 + 200 - 100 pixels right (IoU 1/3), pixel accuracy 200/400."""
    data, pred = worked_example(tmp_path)
    result = evaluate_multi_person(data, pred)
    hair = [5 / 6] + [0.5] * 6 + [0, 0]
    np.testing.assert_allclose(np.array(result.part_ap[1]) / 100, hair, atol=1e-12)
    assert all(v == 0 for c, row in enumerate(result.part_ap, 1) if c != 2 for v in row)
    np.testing.assert_allclose(np.array(result.part_map) / 100, np.array(hair) / 19, atol=1e-12)
    assert result.part_ap_vol / 100 == pytest.approx((5 / 6 + 3) / 9 / 19, abs=1e-12)
    assert result.part_ap_at(0.5) / 100 == pytest.approx(0.5 / 19, abs=1e-12)
    np.testing.assert_allclose(result.person_ap, [25.0] * 9, atol=1e-10)
    assert result.pixel_accuracy == pytest.approx(50.0)
    assert result.iou[0] == pytest.approx(100 / 3) and result.iou[2] == pytest.approx(100 / 3)
    assert result.mean_iou == pytest.approx(2 * 100 / 3 / 20)
    assert result.id_switches is None and result.videos == 0
    tags = pred / "global_tag" / "a.txt"
    tags.write_text(tags.read_text() * 2)  # the original appended to it on a rerun: the first lines count
    assert evaluate_multi_person(data, pred).person_ap == result.person_ap


def test_reference_crashes_fixed(tmp_path):
    """A txt line whose part has no pixel (the reference: IndexError) is no prediction; a class
    predicted where no ground truth has it (the reference: NaN in every mean) scores 0."""
    data, pred = worked_example(tmp_path)
    (pred / "instance_parsing" / "a.txt").write_text("2 0.9\n2 0.7\n2 0.8\n2 0.95\n")  # part 4: no pixel
    result = evaluate_multi_person(data, pred)
    np.testing.assert_allclose(np.array(result.part_ap[1]) / 100, [5 / 6] + [0.5] * 6 + [0, 0], atol=1e-12)
    parts = np.array(Image.open(pred / "instance_parsing" / "a.png"))
    parts[19, 19] = 4
    save(parts, pred / "instance_parsing" / "a.png")
    (pred / "instance_parsing" / "a.txt").write_text("2 0.9\n2 0.7\n2 0.8\n13 0.95\n")  # face: nobody has one
    result = evaluate_multi_person(data, pred)
    assert np.isfinite(result.part_map).all() and result.part_ap[12] == [0.0] * 9
    np.testing.assert_allclose(np.array(result.part_ap[1]) / 100, [5 / 6] + [0.5] * 6 + [0, 0], atol=1e-12)


def test_duplicates_all_count_and_ties_rank_reversed():
    """Two predictions on one instance are both true positives (recall 2/1, AP above 1); equal scores
    rank the later one first."""
    gt = np.zeros((4, 10), np.uint8)
    gt[:, :10] = 1
    acc = APAccumulator(3)
    pred = np.zeros((4, 10), np.uint8)
    pred[:, :5], pred[:, 5:] = 1, 2  # each IoU 0.5 with the one instance
    acc.add(gt, {1: 1}, pred, {1: (1, 0.9), 2: (1, 0.8)})
    assert acc.average_precision()[0, 0] == pytest.approx(2.0)  # recall 1, 2 at precision 1
    acc = APAccumulator(3)
    pred = np.zeros((4, 10), np.uint8)
    pred[:, :8], pred[:, 8:] = 1, 2  # IoU 0.8 and 0.2
    acc.add(gt, {1: 1}, pred, {1: (1, 0.5), 2: (1, 0.5)})
    # at 0.3: 2 (miss) ranks first, then 1: precision 1/2 at recall 1
    assert acc.average_precision()[0, 2] == pytest.approx(0.5)


# ----------------------------------------------------------------------------- bad inputs
def test_bad_inputs_one_line_each_counted_exit_1(tmp_path, capsys, cihp_set):
    data, pred = (tmp_path / "data", tmp_path / "pred")
    shutil.copytree(cihp_set[0], data), shutil.copytree(cihp_set[1], pred)
    for new in ("0000005", "0000006"):  # copies of image 1, so one good image is left to score
        for folder in ("Category_ids", "Human_ids", "Instance_ids"):
            shutil.copy(data / folder / "0000001.png", data / folder / f"{new}.png")
        for name in ("global_parsing/0000001.png", "instance_parsing/0000001.png", "instance_parsing/0000001.txt",
                     "global_tag/0000001.png", "global_tag/0000001.txt"):
            shutil.copy(pred / name, pred / name.replace("0000001", new))
    (data / "val_id.txt").write_text("0000001\n0000002\n0000003\n0000004\n0000005\n0000006\n")
    (pred / "global_parsing" / "0000001.png").unlink()  # missing
    (pred / "instance_parsing" / "0000003.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")  # undecodable
    small = np.array(Image.open(data / "Human_ids" / "0000004.png"))[:-1]
    save(small, data / "Human_ids" / "0000004.png")  # a size mismatch
    (pred / "instance_parsing" / "0000006.txt").write_text("2 0.5\nhair high\n")  # not 'class score'
    # 0000002 (72x56 = 4032 pixels) is over --max-pixels 4000
    code, out, err = run_eval(capsys, "--data-dir", data, "--pred-dir", pred, "--max-pixels", 4000,
                              "--summary", tmp_path / "s.json")
    assert code == 1
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 5, err
    assert any("global_parsing/0000001.png: no such file" in e for e in errors)
    assert any("0000002.png" in e and "4000" in e for e in errors)
    assert any("instance_parsing/0000003.png: not a readable image" in e for e in errors)
    assert any("0000004.png" in e and "48x63" in e for e in errors)
    assert any("0000006.txt: line 2" in e for e in errors)
    assert "1 images scored, 5 left out" in err
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["images"] == 1 and len(summary["failed"]) == 5
    # what was scored is image 0000005 alone, the same as image 1 of the intact set
    alone = tmp_path / "one.txt"
    alone.write_text("0000001\n")
    reference = evaluate_multi_person(cihp_set[0], cihp_set[1], alone)
    assert summary["ap_r"] == reference.part_map and summary["mean_iou"] == reference.mean_iou
    assert summary["ap_h"] == reference.person_ap
    assert "Mean IU:" in out and "AP^r_vol:" in out and "AP^h@0.5:" in out


def test_library_reports_and_prints_nothing(tmp_path, capsys, cihp_set):
    data, pred = tmp_path / "data", tmp_path / "pred"
    shutil.copytree(cihp_set[0], data), shutil.copytree(cihp_set[1], pred)
    (pred / "global_tag" / "0000002.txt").write_text("")
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = evaluate_multi_person(data, pred)
    assert capsys.readouterr() == ("", "")
    assert result.images == 3 and len(result.failed) == 1
    assert result.failed[0][0].endswith("0000002.txt") and "0 score lines for 2 persons" in result.failed[0][1]


def test_set_up_errors_exit_2(tmp_path, capsys, cihp_set):
    code, _, err = run_eval(capsys, "--data-dir", tmp_path / "none", "--pred-dir", cihp_set[1])
    assert code == 2 and "Category_ids: no such folder" in err
    code, _, err = run_eval(capsys, "--data-dir", cihp_set[0], "--pred-dir", tmp_path / "none")
    assert code == 2 and "no such folder" in err
    (tmp_path / "empty.txt").write_text("\n")
    code, _, err = run_eval(capsys, "--data-dir", cihp_set[0], "--pred-dir", cihp_set[1], "--id-list",
                            tmp_path / "empty.txt")
    assert code == 2 and "nothing to score" in err
    with pytest.raises(SystemExit) as stop:  # multi_person.py's options only with --run-multi-person
        run_eval(capsys, "--data-dir", cihp_set[0], "--pred-dir", cihp_set[1], "--instances", "masks", "x")
    assert stop.value.code == 2 and "unrecognized arguments: --instances masks x" in capsys.readouterr().err


# ----------------------------------------------------------------------------- videos
def test_vip_video_identity_switches(tmp_path, capsys):
    """Video v1: persons A (left) and B (right). Predicted ids 1, 2 in frames 1-2, B missed in frame 3,
    ids swapped in frame 4: A 1 -> 2 and B 2 -> 1, 2 switches. Video v2: the source numbers them 5 and 3
    throughout: 0 switches (ids need not equal the ground truth's, only stay the same)."""
    data, pred = tmp_path / "VIP", tmp_path / "out"
    plan = {"v1": [(1, 2), (1, 2), (1, 0), (2, 1)], "v2": [(5, 3), (5, 3)]}
    for video, frames in plan.items():
        for f, (left, right) in enumerate(frames, 1):
            frame = f"{f:06d}"
            classes = np.zeros((12, 16), np.uint8)
            classes[2:10, 1:7], classes[2:10, 9:15] = 5, 9
            humans = np.zeros((12, 16), np.uint8)
            humans[2:10, 1:7], humans[2:10, 9:15] = 1, 2
            instances = np.where(humans > 0, (humans.astype(int) - 1) * 20 + classes, 0)
            for folder, values in (("Category_ids", classes), ("Human_ids", humans), ("Instance_ids", instances)):
                save(values, data / folder / video / f"{frame}.png")
            save(classes, pred / video / "global_parsing" / f"{frame}.png")
            save(humans, pred / video / "instance_parsing" / f"{frame}.png")
            (pred / video / "instance_parsing" / f"{frame}.txt").write_text("5 0.9\n9 0.8\n")
            persons = np.zeros((12, 16), np.uint8)
            persons[2:10, 1:7], persons[2:10, 9:15] = left, right
            save(persons, pred / video / "instance_segmentation" / f"{frame}.png")
            # v1: line k is person k; v2: one line per person present (ids 3, 5: the 1st and 2nd lines)
            lines = int(persons.max()) if video == "v1" else len(np.unique(persons)) - 1
            (pred / video / "instance_segmentation" / f"{frame}.txt").write_text(
                "".join(f"1 {0.5 + k / 100}\n" for k in range(1, lines + 1)))
    items = list_items(data)  # no id list: every video folder of Category_ids, frames sorted
    assert [i.key for i in items] == ["v1/000001", "v1/000002", "v1/000003", "v1/000004", "v2/000001",
                                      "v2/000002"]
    (data / "one.txt").write_text("v2/000002\n")
    assert [(i.video, i.frame) for i in list_items(data, data / "one.txt")] == [("v2", "000002")]
    (data / "val_videos.txt").write_text("v1\nv2\n")
    code, out, err = run_eval(capsys, "--data-dir", data, "--pred-dir", pred, "--id-list",
                              data / "val_videos.txt", "--summary", tmp_path / "s.json")
    assert code == 0, err
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["id_switches"] == 2 and summary["id_switches_per_video"] == {"v1": 2, "v2": 0}
    assert summary["person_matches"] == 11 and summary["videos"] == 2 and summary["images"] == 6
    assert "Identity switches: 2 (11 person matches in 2 videos)" in out
    assert summary["ap_r_50"] == pytest.approx(100 * 2 / 19)  # upper-clothes and pants found exactly


# ----------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def cihp_checkpoints(tmp_path_factory):
    """Synthetic (global, local) CIHP checkpoints made as tests/test_multi_person.py makes them."""
    from synth_checkpoint import save_checkpoint, synthetic_checkpoint
    folder = tmp_path_factory.mktemp("cihp-ckpt")
    ckpt = synthetic_checkpoint("lip", 0)
    ckpt["state_dict"]["module.fushion.3.bias"][0] -= 6.0  # or the fusion leaves the persons background
    save_checkpoint(ckpt, folder / "global.pth", legacy=False)
    local = dict(ckpt["state_dict"])
    local["module.fushion.3.bias"] = local["module.fushion.3.bias"] + torch.linspace(-0.3, 0.3, 20)
    torch.save(local, folder / "local.pth")
    return folder / "global.pth", folder / "local.pth"


def test_multi_person_outputs_end_to_end(tmp_path, capsys, cihp_checkpoints):
    """The group photo at 240x180 with the released extension's own maps as ground truth;
    evaluate.py --multi-person --run-multi-person runs multi_person.py --instances masks (two of the four
    persons) on it, then scores its output folder. The mIoU equals a direct count of the two PNGs; at most half the persons can be found."""
    data, masks, out = tmp_path / "CIHP", tmp_path / "masks", tmp_path / "out"
    size = (240, 180)
    image = cv2.resize(cv2.imread(str(DATA / "group.jpg")), size, interpolation=cv2.INTER_AREA)
    (data / "Images").mkdir(parents=True)
    cv2.imwrite(str(data / "Images" / "group.png"), image)
    for folder, name in (("Category_ids", "group_global_parsing.png"), ("Human_ids", "group_person_masks.png"),
                         ("Instance_ids", "group_instance_parsing.png")):
        values = cv2.resize(np.array(Image.open(DATA / name)), size, interpolation=cv2.INTER_NEAREST)
        save(values, data / folder / "group.png")
    humans = np.array(Image.open(data / "Human_ids" / "group.png"))
    save(np.where(humans <= 2, humans, 0), masks / "group.png")  # two of the four found: fewer crops to parse
    (data / "val_id.txt").write_text("group\n")
    code, printed, err = run_eval(capsys, "--data-dir", data, "--pred-dir", out, "--summary", tmp_path / "s.json",
                                  "--run-multi-person", "--instances", "masks", masks, "--global-restore",
                                  cihp_checkpoints[0], "--local-restore", cihp_checkpoints[1], "--input-size",
                                  "96,96", "--device", "cpu", "--no-overlay", "--quiet")
    assert code == 0, err
    for name in ("global_parsing/group.png", "instance_parsing/group.txt", "global_tag/group.png"):
        assert (out / name).is_file()  # written by multi_person.py
    summary = json.loads((tmp_path / "s.json").read_text())
    gt = np.array(Image.open(data / "Category_ids" / "group.png")).astype(int)
    pr = np.array(Image.open(out / "global_parsing" / "group.png")).astype(int)
    iou = [100 * ((gt == c) & (pr == c)).sum() / max(1, ((gt == c) | (pr == c)).sum()) for c in range(20)]
    assert summary["iou"] == pytest.approx(iou) and summary["mean_iou"] == pytest.approx(np.mean(iou))
    assert summary["pixel_accuracy"] == pytest.approx(100 * (gt == pr).mean())
    assert summary["images"] == 1 and summary["failed"] == [] and summary["id_switches"] is None
    assert len(summary["ap_r"]) == 9 and summary["ap_h"] is not None and 0 < summary["ap_h"][0] <= 50
    for line in ("Pixel accuracy:", "Mean IU:", "AP^r@0.5:", "AP^r_vol:", "AP^h@0.9:", "AP^h_vol:", "Right-shoe"):
        assert line in printed
