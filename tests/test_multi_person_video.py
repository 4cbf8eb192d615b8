"""Multi-person video parsing: ids that persist through a synthetic video (two persons crossing, one
leaving and coming back, the source numbering them anew in every frame), scored with the multi-person
evaluator's identity switches against the ground-truth person ids; frame maps equal to the still-image
maps; the VIP submission layout; a truncated video; the resume. Small frames, input size 32."""
import itertools
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

import multi_person
from conftest import cihp_checkpoints
from schp.multi_person.evaluation import evaluate_multi_person
from schp.multi_person.tracking import IdentityTracker, linear_assignment, mask_ious

DATA = Path(__file__).parent / "data"
W, H, FRAMES = 64, 64, 8
GONE = range(3, 5)  # frames in which person 3 is out of view
STILL_FRAMES = (0, 4, 5, 6)  # frames also parsed as photos
PERSON_CLASS = 13  # the ground truth's class of every person pixel (CIHP "face"; any class will do)


# ----------------------------------------------------------------------------- the tracker alone
def brute_force(cost):
    n, m = cost.shape
    if n <= m:
        return min(sum(cost[i, p[i]] for i in range(n)) for p in itertools.permutations(range(m), n))
    return min(sum(cost[p[j], j] for j in range(m)) for p in itertools.permutations(range(n), m))


def test_assignment_is_optimal_against_brute_force():
    rng = np.random.default_rng(0)
    for trial in range(400):
        n, m = (int(v) for v in rng.integers(1, 6, 2))
        cost = rng.random((n, m)) if trial % 2 else rng.integers(0, 3, (n, m)).astype(float)  # ties too
        pairs = linear_assignment(cost)
        assert len(pairs) == min(n, m)
        assert len({r for r, _ in pairs}) == len({c for _, c in pairs}) == min(n, m)
        assert sum(cost[r, c] for r, c in pairs) == pytest.approx(brute_force(cost), abs=1e-12)
    # a case where taking each row's best column greedily is wrong
    assert linear_assignment(np.array([[1.0, 2.0], [1.0, 10.0]])) == [(0, 1), (1, 0)]
    assert linear_assignment(np.zeros((0, 3))) == []


def box_mask(x0, y0, x1, y1):
    m = np.zeros((20, 20), dtype=bool)
    m[y0:y1, x0:x1] = True
    return m


def test_tracker_keeps_ids_within_the_window_and_never_reuses_one():
    a, b = box_mask(0, 0, 6, 6), box_mask(10, 10, 16, 16)
    assert mask_ious([a], [a, b]).tolist() == [[1.0, 0.0]]
    t = IdentityTracker(window=3, min_iou=0.3)
    assert t.assign(0, [a, b]) == [1, 2]
    assert t.assign(1, [b, a]) == [2, 1]  # the source's order does not matter
    assert t.assign(2, [b]) == [2]  # person 1 gone
    assert t.assign(4, [box_mask(1, 0, 7, 6), b]) == [1, 2]  # back after 3 frames: the same id
    assert t.assign(8, [a]) == [3]  # gone longer than the window: a new id, never 1 again
    assert t.assign(9, [box_mask(0, 14, 4, 20)]) == [4]  # no overlap with anyone: new person
    t.observe(10, np.where(b, 7, 0))  # a resumed run: ids read from a written map
    assert t.next_id == 8 and t.assign(11, [b]) == [7]
    assert t.assign(12, [np.ones((5, 5), dtype=bool)]) == [8]  # a frame of another size: nobody to match
    capped = IdentityTracker(max_id=1)
    assert capped.assign(0, [a, b]) == [1, 0] and capped.unassigned == 1


# ----------------------------------------------------------------------------- the synthetic video
def person_boxes(frame):
    """{true id: (x0, y0, x1, y1)} of frame `frame`: 1 walks right in front of 2, who walks left (they
    cross halfway; 2's head stays in view), 3 stands at the top and is out of view in the GONE frames."""
    boxes = {1: (2 + 4 * frame, 34, 16 + 4 * frame, 62), 2: (44 - 4 * frame, 12, 60 - 4 * frame, 63)}
    if frame not in GONE:
        boxes[3] = (20, 0, 44, 11)
    return boxes


def true_ids(frame):
    """H x W true person ids; 1 in front of 2 where they overlap."""
    ids = np.zeros((H, W), dtype=np.uint8)
    for k in (3, 2, 1):
        x0, y0, x1, y1 = person_boxes(frame).get(k, (0, 0, 0, 0))
        ids[max(y0, 0):y1, max(x0, 0):x1] = k
    return ids


def frame_pixels(frame):
    rng = np.random.default_rng(100 + frame)
    image = rng.integers(0, 60, (H, W, 3), dtype=np.uint8)
    colours = {1: (40, 40, 220), 2: (70, 20, 190), 3: (20, 70, 240)}  # the synthetic models' foreground
    ids = true_ids(frame)
    for k, c in colours.items():
        image[ids == k] = c
    return image


def write_source_masks(folder: Path, stem: str, frame: int, seed: int = 0):
    """The instance source's view of a frame: person ids shuffled (and spread over 1..6) every frame,
    random scores, so neither the order nor the numbers say who is who."""
    rng = np.random.default_rng(1000 + frame + 100 * seed)
    truth = true_ids(frame)
    present = [k for k in (1, 2, 3) if (truth == k).any()]
    given = rng.choice(np.arange(1, 7), size=len(present), replace=False)
    ids = np.zeros_like(truth)
    scores = {}
    for k, g in zip(present, given):
        ids[truth == k] = g
        scores[str(int(g))] = round(float(rng.uniform(0.6, 1.0)), 3)
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(ids).save(folder / f"{stem}.png")
    (folder / f"{stem}.json").write_text(json.dumps(scores))
    return {int(g): k for k, g in zip(present, given)}


@pytest.fixture(scope="module")
def cihp(tmp_path_factory):
    """Synthetic CIHP checkpoints (conftest.cihp_checkpoints) with the background bias lowered by 30
    instead of 6: inside the crop boxes no pixel is background, so the person maps follow the source's
    masks and the evaluator can match them to the true persons."""
    return cihp_checkpoints(tmp_path_factory.mktemp("cihp"), 30.0)


@pytest.fixture(scope="module")
def vip(tmp_path_factory):
    """A VIP-layout set: Images/walk/<frame>.png, the ground truth beside it, the source's masks."""
    root = tmp_path_factory.mktemp("vip")
    for frame in range(FRAMES):
        stem = f"{frame:06d}"
        for folder in ("Images", "Category_ids", "Human_ids", "Instance_ids"):
            (root / folder / "walk").mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(root / "Images" / "walk" / f"{stem}.png"), frame_pixels(frame))
        truth = true_ids(frame)
        Image.fromarray(np.where(truth > 0, PERSON_CLASS, 0).astype(np.uint8)).save(
            root / "Category_ids" / "walk" / f"{stem}.png")
        Image.fromarray(truth).save(root / "Human_ids" / "walk" / f"{stem}.png")
        Image.fromarray(truth).save(root / "Instance_ids" / "walk" / f"{stem}.png")  # one part per person
        write_source_masks(root / "masks" / "walk", stem, frame)
    return root


def run(capsys, *argv):
    code = multi_person.main([str(a) for a in argv] + ["--quiet"])
    return code, capsys.readouterr().err


def common(cihp, masks):
    return ["--global-restore", cihp[0], "--local-restore", cihp[1], "--input-size", "32,32",
            "--device", "cpu", "--backend", "torch", "--batch-size", "4", "--instances", "masks", masks]


@pytest.fixture(scope="module")
def parsed(cihp, vip, tmp_path_factory):
    """The video parsed with --sequences, and some of its frames parsed as photos (module-wide: the
    slow part): the first, two in the crossing (person 3 gone in one) and person 3's return."""
    out, still = tmp_path_factory.mktemp("video-out"), tmp_path_factory.mktemp("still-out")
    code = multi_person.main([str(a) for a in common(cihp, vip / "masks") + [
        "--input-dir", vip / "Images", "--output-dir", out, "--sequences", "--summary", out / "run.json",
        "--quiet"]])
    assert code == 0
    photos = tmp_path_factory.mktemp("photos")
    for frame in STILL_FRAMES:
        (photos / f"{frame:06d}.png").write_bytes((vip / "Images" / "walk" / f"{frame:06d}.png").read_bytes())
    code = multi_person.main([str(a) for a in common(cihp, vip / "masks" / "walk") + [
        "--input-dir", photos, "--output-dir", still / "walk", "--no-overlay", "--quiet"]])
    assert code == 0
    return out, still


def source_as_predictions(vip, folder):
    """The source's own ids written as a prediction (class maps = the truth's): what the evaluator
    counts when nothing keeps the ids."""
    for frame in range(FRAMES):
        stem = f"{frame:06d}"
        ids = read(vip / "masks" / "walk" / f"{stem}.png")
        lines = "".join("1 1.0\n" for k in np.unique(ids) if k)
        for name in ("global_parsing", "instance_parsing", "instance_segmentation"):
            (folder / "walk" / name).mkdir(parents=True, exist_ok=True)
        Image.fromarray(read(vip / "Category_ids" / "walk" / f"{stem}.png")).save(
            folder / "walk" / "global_parsing" / f"{stem}.png")
        for name in ("instance_parsing", "instance_segmentation"):
            Image.fromarray(ids).save(folder / "walk" / name / f"{stem}.png")
            (folder / "walk" / name / f"{stem}.txt").write_text(lines.replace("1 ", f"{PERSON_CLASS} ")
                                                                if name == "instance_parsing" else lines)
    return folder


def read(path):
    with Image.open(path) as image:
        return np.array(image)


def test_identities_persist_through_crossing_and_absence(vip, parsed, tmp_path):
    out, still = parsed
    result = evaluate_multi_person(vip, out)
    persons_in_view = sum(len(person_boxes(f)) for f in range(FRAMES))
    assert result.videos == 1 and result.images == FRAMES
    assert result.person_matches >= 0.8 * persons_in_view  # the ids are checked on most persons
    assert result.id_switches == 0
    # the source's own ids, kept as they come: the evaluator sees the switches
    shuffled = evaluate_multi_person(vip, source_as_predictions(vip, tmp_path / "source"))
    assert shuffled.person_matches == persons_in_view and shuffled.id_switches >= 10  # 18 measured
    record = json.loads((out / "walk" / "identities.json").read_text())
    assert record["frames"] == FRAMES and sorted(record["identities"]) == ["1", "2", "3"]
    assert sorted(i["frames"] for i in record["identities"].values()) == [FRAMES - len(GONE), FRAMES, FRAMES]


def test_frame_maps_equal_the_still_image_maps(parsed):
    out, still = parsed
    for frame in STILL_FRAMES:
        stem = f"{frame:06d}"
        for folder in ("global_parsing", "instance_parsing"):
            np.testing.assert_array_equal(read(out / "walk" / folder / f"{stem}.png"),
                                          read(still / "walk" / folder / f"{stem}.png"), err_msg=folder)
        assert (out / "walk" / "instance_parsing" / f"{stem}.txt").read_text() == \
            (still / "walk" / "instance_parsing" / f"{stem}.txt").read_text()
        video_ids, still_ids = read(out / "walk" / "global_tag" / f"{stem}.png"), \
            read(still / "walk" / "global_tag" / f"{stem}.png")
        np.testing.assert_array_equal(read(out / "walk" / "instance_segmentation" / f"{stem}.png"), video_ids)
        pairs = set(zip(still_ids.ravel().tolist(), video_ids.ravel().tolist()))
        assert len(pairs) == len({s for s, _ in pairs}) == len({v for _, v in pairs})  # a relabelling
        assert (0, 0) in pairs or not (still_ids == 0).any()
        relabel = dict(pairs)
        still_tags = (still / "walk" / "global_tag" / f"{stem}.txt").read_text().splitlines()
        still_ids_sorted = sorted(k for k in relabel if k)
        by_new = sorted(zip((relabel[k] for k in still_ids_sorted), still_tags))
        assert (out / "walk" / "global_tag" / f"{stem}.txt").read_text().splitlines() == [t for _, t in by_new]
        scores = [line.split()[0] for line in still_tags]
        seg = (out / "walk" / "instance_segmentation" / f"{stem}.txt").read_text().splitlines()
        assert [line.split()[0] for line in seg] == ["1"] * len(scores)
        assert [float(line.split()[1]) for line in seg] == pytest.approx([float(s) for _, s in sorted(
            zip((relabel[k] for k in still_ids_sorted), scores))], abs=1e-6)


def test_sequences_give_the_submission_layout(parsed):
    out, _ = parsed
    stems = [f"{f:06d}" for f in range(FRAMES)]
    for folder, ext in (("global_parsing", ".png"), ("instance_segmentation", ".png"),
                        ("instance_segmentation", ".txt"), ("instance_parsing", ".png"),
                        ("instance_parsing", ".txt"), ("global_tag", ".png"), ("global_tag", ".txt"),
                        ("instances", ".json")):
        names = sorted(p.name for p in (out / "walk" / folder).iterdir() if p.suffix == ext)
        assert names == [s + ext for s in stems], folder
    assert sorted(p.name for p in (out / "walk").iterdir()) == sorted(
        ["global_parsing", "instance_segmentation", "instance_parsing", "global_tag", "instances",
         "identities.json", "overlay.mp4"])
    capture = cv2.VideoCapture(str(out / "walk" / "overlay.mp4"))
    assert int(capture.get(cv2.CAP_PROP_FRAME_COUNT)) == FRAMES
    assert (int(capture.get(cv2.CAP_PROP_FRAME_WIDTH)), int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT))) == (W, H)
    capture.release()
    manifest = json.loads((out / "run.json").read_text())
    entry, = manifest["images"]
    assert entry["status"] == "processed" and entry["frames"] == FRAMES and entry["persons"] == 3


def make_video(path, frames):
    """The scene at half speed (frame i shows scene frame i // 2), as MJPG in an AVI."""
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, (W, H))
    assert writer.isOpened()
    for frame in range(frames):
        writer.write(frame_pixels(frame // 2))
    writer.release()
    return path


def test_truncated_video_keeps_its_frames_and_a_rerun_resumes(cihp, tmp_path, capsys):
    inputs, out, masks = tmp_path / "in", tmp_path / "out", tmp_path / "masks"
    inputs.mkdir()
    full = make_video(tmp_path / "full.avi", 10).read_bytes()
    (inputs / "clip.avi").write_bytes(full[:len(full) // 2])
    for frame in range(10):
        write_source_masks(masks / "clip", f"frame_{frame:06d}", frame // 2, seed=frame)
    cv2.imwrite(str(inputs / "photo.png"), frame_pixels(0))  # a photo beside the video, as before
    write_source_masks(masks, "photo", 0)
    args = common(cihp, masks) + ["--input-dir", inputs, "--output-dir", out, "--every", "2"]
    code, err = run(capsys, *args)
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 1 and len(errors) == 1, err
    assert (out / "global_tag" / "photo.png").is_file() and (out / "overlay" / "photo.jpg").is_file()
    assert errors[0].startswith(f"error: {inputs / 'clip.avi'}: decoding stopped at frame ")
    done = sorted(p.stem for p in (out / "clip" / "instance_segmentation").glob("*.png"))
    assert done and done == [f"frame_{i:06d}" for i in range(0, 2 * len(done), 2)] and len(done) < 5
    assert not (out / "clip" / "identities.json").exists() and not (out / "clip" / "overlay.mp4").exists()
    assert not [p for p in out.rglob("*") if "schp-tmp" in p.name]
    first = {p: p.stat().st_mtime_ns for p in (out / "clip").rglob("*.png")}

    (inputs / "clip.avi").write_bytes(full)  # the whole file: the same command finishes it
    code, err = run(capsys, *args)
    assert code == 0, err
    names = sorted(p.stem for p in (out / "clip" / "instance_segmentation").glob("*.png"))
    assert names == [f"frame_{i:06d}" for i in range(0, 10, 2)]
    assert {p: p.stat().st_mtime_ns for p in first} == first  # the frames done were not parsed again
    assert json.loads((out / "clip" / "identities.json").read_text())["frames"] == 5
    capture = cv2.VideoCapture(str(out / "clip" / "overlay.mp4"))  # frames done before are in it too
    assert int(capture.get(cv2.CAP_PROP_FRAME_COUNT)) == 5
    capture.release()
    ids = [read(out / "clip" / "instance_segmentation" / f"frame_{i:06d}.png") for i in range(0, 10, 2)]
    assert max(int(m.max()) for m in ids) == 3  # three persons, three ids, across the resume
    code, err = run(capsys, *args)
    assert code == 0 and "0 processed, 2 skipped" in err


def test_video_options_and_sources(tmp_path, capsys):
    from schp.multi_person.instances import Detectron2FileSource, FrameSource, InstanceError, MaskFolderSource
    from pycocotools import mask as mask_util

    (tmp_path / "in").mkdir()
    code, err = run(capsys, "--input-dir", tmp_path / "in", "--output-dir", tmp_path / "out", "--every", "0")
    assert code == 2 and err.strip().splitlines()[-1].startswith("error: --every") and "--every" in err
    # masks: DIR/<video>/<frame>.png; a video without its folder is one line naming it
    write_source_masks(tmp_path / "masks" / "walk", "000003", 3)
    image = frame_pixels(3)
    found = FrameSource(MaskFolderSource(tmp_path / "masks"), "walk").instances(image, Path("000003.png"))
    assert sorted(int(i.mask.sum()) for i in found) == sorted(int((true_ids(3) == k).sum()) for k in (1, 2))
    with pytest.raises(InstanceError, match="no mask folder .*run for video run"):
        FrameSource(MaskFolderSource(tmp_path / "masks"), "run").instances(image, Path("000003.png"))
    # detectron2: the image list names the frames <video>/<frame file>
    mask = np.asfortranarray((true_ids(3) == 1).astype(np.uint8))
    rle = mask_util.encode(mask)
    rle["counts"] = rle["counts"].decode("ascii")
    torch.save([{"image_id": 7, "instances": [{"bbox": [0, 0, 1, 1], "score": 0.9, "segmentation": rle}]}],
               tmp_path / "pred.pth")
    (tmp_path / "list.json").write_text(json.dumps({"images": [{"file_name": "walk/000003.png", "id": 7}]}))
    source = Detectron2FileSource(tmp_path / "pred.pth", tmp_path / "list.json")
    found, = FrameSource(source, "walk").instances(image, Path("000003.png"))
    np.testing.assert_array_equal(found.mask, true_ids(3) == 1)
    with pytest.raises(InstanceError, match="not in --image-list"):
        FrameSource(source, "other").instances(image, Path("000004.png"))
