"""Multi-person parsing: each step against the released extension (a literal port in
tests/multi_person_original.py) or a direct computation of its formulas, on the group photo with its real
detector masks and on random maps; the three instance sources; the command's standards."""
import json
import os
import shutil
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from pycocotools import mask as mask_util  # noqa: E402

from schp.commands import multi_person  # noqa: E402
from conftest import cihp_checkpoints, onnx_input_dims  # noqa: E402
import multi_person_original as released  # noqa: E402
import original_pipeline  # noqa: E402
from schp.multi_person import fusion  # noqa: E402
from schp.multi_person.instances import (Detectron2FileSource, Instance, InstanceError, MaskFolderSource,  # noqa: E402
                                         SourceError, TorchvisionSource, mask_box)
from schp.multi_person.nms import expand_box, select_people  # noqa: E402

DATA = Path(__file__).resolve().parent / "data"
SIZE = 96  # network input for the tests (fully convolutional networks run at any size; at 96 the
# synthetic models find several classes on the group photo, at 64 hardly any)
original_pipeline.DATASETS["cihp96"] = ([SIZE, SIZE], 20)  # the oracle at the same input size


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def cihp(tmp_path_factory):
    """Synthetic CIHP checkpoints (conftest.cihp_checkpoints), the background bias lowered by 6."""
    return cihp_checkpoints(tmp_path_factory.mktemp("cihp"), 6.0)


@pytest.fixture(scope="module")
def small_group(tmp_path_factory):
    """The group photo and its four persons' real detector masks at 300x225 (lossless PNG)."""
    folder = tmp_path_factory.mktemp("group")
    image = cv2.resize(cv2.imread(str(DATA / "group.jpg")), (300, 225), interpolation=cv2.INTER_AREA)
    ids = np.array(Image.open(DATA / "group_person_masks.png"))
    ids = cv2.resize(ids, (300, 225), interpolation=cv2.INTER_NEAREST)
    cv2.imwrite(str(folder / "group.png"), image)
    return folder / "group.png", ids


def run(capsys, *argv):
    code = multi_person.main([str(a) for a in argv] + ["--quiet"])
    out, err = capsys.readouterr()
    return code, err


@pytest.fixture(scope="module")
def oracle_models(cihp):
    """The released evaluator's (global, local) networks, loaded once."""
    return released.load_evaluator_model(str(cihp[0]), 20), released.load_evaluator_model(str(cihp[1]), 20)


def rle(mask):
    encoded = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": encoded["size"], "counts": encoded["counts"].decode("ascii")}  # as detectron2 saves it


def detection(mask, score, box=None):
    """A detectron2 instance dict; box (x, y, w, h) defaults to COCO's box of the mask."""
    box = [float(v) for v in (box if box is not None else mask_util.toBbox(mask_util.encode(
        np.asfortranarray(mask.astype(np.uint8)))))]
    return {"image_id": 1, "category_id": 0, "bbox": box, "score": float(score), "segmentation": rle(mask)}


def released_fused_logits(work_dir: Path, item: dict) -> np.ndarray:
    """H x W x C: the released steps' fused logits at image size, as their result_saving takes the argmax of."""
    stem = Path(item["im_name"]).stem
    fused = np.load(work_dir / "global_pic_parsing" / f"{stem}.npy") + released.patch2img_output(
        str(work_dir / "crop_pic_parsing"), item["im_name"], item["img_height"], item["img_width"],
        item["person_bbox"], bbox_type="msrcnn", num_class=20)
    return cv2.resize(fused, dsize=(item["img_width"], item["img_height"]), interpolation=cv2.INTER_LINEAR)


# A pixel's class may differ from the released steps' only at a float tie of their fused logits: our
# folded, reordered network reproduces the logits to about 1e-5 relative (docs/fidelity.md), so a gap
# under 1e-4 of the pixel's largest logit is a tie that float rounding may break either way.
TIE = 1e-4


def compare_outputs(ours: Path, theirs: Path, stem: str, fused: np.ndarray):
    """The three maps equal the released steps' except at class ties of `fused` (the released fused
    logits), where the class and with it the person and part of that pixel may go either way (seen on
    an AVX2 CPU: 1 pixel of 67,500; none on AVX-512)."""
    maps = {}
    for name in ("global_parsing", "instance_parsing", "global_tag"):
        a, b = Image.open(ours / name / f"{stem}.png"), Image.open(theirs / name / f"{stem}.png")
        assert a.mode == b.mode == "P" and a.getpalette() == b.getpalette(), name
        maps[name] = np.array(a), np.array(b)
    ours_class, their_class = maps["global_parsing"]
    ties = np.flatnonzero(ours_class != their_class)
    assert ties.size <= 1e-4 * ours_class.size, f"{ties.size} pixels of {ours_class.size} differ"
    for y, x in zip(*np.unravel_index(ties, ours_class.shape)):
        logits = fused[y, x]
        gap = abs(logits[ours_class[y, x]] - logits[their_class[y, x]])
        assert gap <= TIE * np.abs(logits).max(), (y, x, ours_class[y, x], their_class[y, x], logits)
    for name, (a, b) in maps.items():
        assert set(np.flatnonzero(a != b)) <= set(ties), name
    assert (ours / "global_tag" / f"{stem}.txt").read_text() == (theirs / "global_tag" / f"{stem}.txt").read_text()
    # confidences: the same parts and classes; the values are fused logits, which our folded network
    # reproduces to float rounding, not bit for bit
    a = [line.split() for line in (ours / "instance_parsing" / f"{stem}.txt").read_text().splitlines()]
    b = [line.split() for line in (theirs / "instance_parsing" / f"{stem}.txt").read_text().splitlines()]
    assert [x[0] for x in a] == [x[0] for x in b] and len(a) == len(b)
    np.testing.assert_allclose([float(x[1]) for x in a], [float(x[1]) for x in b], rtol=1e-4)
    parts = np.array(Image.open(ours / "instance_parsing" / f"{stem}.png"))
    persons = np.array(Image.open(ours / "global_tag" / f"{stem}.png"))
    assert len(np.unique(persons[parts > 0])) >= 2 and parts.max() >= 6  # a comparison with substance


# ----------------------------------------------------------------------------- the whole chain vs the released steps
def test_detectron2_file_gives_the_released_results(tmp_path, capsys, cihp, oracle_models, small_group):
    """Detections in detectron2's file format (RLE made here with pycocotools): a duplicate that mostly
    overlaps a kept person (dropped), one that partly overlaps (loses the contested pixels), one under
    the score threshold (stops the scan): our outputs equal the released steps 3, 5, 6 file for file."""
    image_path, ids = small_group
    masks = [ids == k for k in (1, 2, 3, 4)]
    duplicate = cv2.dilate(masks[1].astype(np.uint8), np.ones((5, 5), np.uint8)).astype(bool)
    partial = np.zeros_like(masks[0])
    partial[60:200, 40:140] = True  # straddles persons 1 and 2
    instances = [detection(masks[0], 0.99), detection(masks[1], 0.97, [150.5, 30.0, 73.0, 190.0]),
                 detection(duplicate, 0.9), detection(masks[2], 0.85), detection(partial, 0.8),
                 detection(masks[3], 0.45)]
    predictions = [{"image_id": 7, "instances": []}, {"image_id": 1, "instances": instances}]
    pth = tmp_path / "instances_predictions.pth"
    torch.save(predictions, pth)
    in_dir = tmp_path / "in"
    in_dir.mkdir()
    shutil.copy(image_path, in_dir / "group.png")
    h, w = ids.shape
    theirs, item = released.run_released(str(in_dir), {"id": 1, "file_name": "group.png", "width": w, "height": h},
                                         predictions[1], *oracle_models, "cihp96", str(tmp_path / "released"))
    assert item["person_num"] == 4  # the duplicate dropped, the partial kept, the last under 0.5
    # here person 1 keeps no foreground pixel, so the released count (3) leaves person 4 without parts;
    # --legacy-person-count reproduces that (the default gives person 4 its parts: see the unit test)
    code, err = run(capsys, "--input-dir", in_dir, "--output-dir", tmp_path / "out", "--instances", "detectron2",
                    pth, "--global-restore", cihp[0], "--local-restore", cihp[1], "--input-size", f"{SIZE},{SIZE}",
                    "--device", "cpu", "--legacy-person-count")
    assert code == 0, err
    compare_outputs(tmp_path / "out", Path(theirs), "group", released_fused_logits(tmp_path / "released", item))
    record = json.loads((tmp_path / "out" / "instances" / "group.json").read_text())
    assert record["person_bbox"] == item["person_bbox"] and record["person_bbox_score"] == item["person_bbox_score"]
    assert record["real_person_bbox"] == item["real_person_bbox"] and record["instances"]["source"] == "detectron2"


def test_masks_folder_gives_the_released_results(tmp_path, capsys, cihp, oracle_models, small_group):
    """User masks with a scores file: the same as feeding the released steps detections with those
    masks, scores and COCO boxes (with the released person count: here too a person keeps no
    foreground pixel); every part belongs to one person."""
    image_path, ids = small_group
    in_dir, mask_dir = tmp_path / "in", tmp_path / "masks"
    in_dir.mkdir(), mask_dir.mkdir()
    shutil.copy(image_path, in_dir / "group.png")
    Image.fromarray(ids.astype(np.uint8)).save(mask_dir / "group.png")
    scores = {"1": 0.9, "2": 0.97, "3": 0.9}  # person 4: default 1.0; ties keep id order
    (mask_dir / "group.json").write_text(json.dumps(scores))
    order = sorted((1, 2, 3, 4), key=lambda k: (-scores.get(str(k), 1.0), k))
    pred = {"image_id": 1, "instances": [detection(ids == k, scores.get(str(k), 1.0)) for k in order]}
    h, w = ids.shape
    theirs, item = released.run_released(str(in_dir), {"id": 1, "file_name": "group.png", "width": w, "height": h},
                                         pred, *oracle_models, "cihp96", str(tmp_path / "released"))
    code, err = run(capsys, "--input-dir", in_dir, "--output-dir", tmp_path / "out", "--instances", "masks",
                    mask_dir, "--global-restore", cihp[0], "--local-restore", cihp[1], "--input-size",
                    f"{SIZE},{SIZE}", "--device", "cpu", "--legacy-person-count")
    assert code == 0, err
    compare_outputs(tmp_path / "out", Path(theirs), "group", released_fused_logits(tmp_path / "released", item))
    persons = np.array(Image.open(tmp_path / "out" / "global_tag" / "group.png"))
    parts = np.array(Image.open(tmp_path / "out" / "instance_parsing" / "group.png"))
    owners = {j: np.unique(persons[parts == j]) for j in np.unique(parts) if j}
    assert all(len(o) == 1 and o[0] != 0 for o in owners.values())  # a part belongs to one person


# ----------------------------------------------------------------------------- step by step
def random_maps(rng, h, w, classes, persons):
    """A blobby class map and a person map made of overlapping rectangles (ids 1..persons)."""
    coarse = rng.integers(0, classes, size=(h // 4 + 1, w // 4 + 1)).astype(np.uint8)
    s = cv2.resize(coarse, (w, h), interpolation=cv2.INTER_NEAREST)
    noise = rng.random((h, w)) < 0.15
    s[noise] = rng.integers(0, classes, size=noise.sum())
    t = np.zeros((h, w), np.uint8)
    for k in range(1, persons + 1):
        y0, x0 = rng.integers(0, h - 4), rng.integers(0, w - 4)
        t[y0:y0 + rng.integers(4, h), x0:x0 + rng.integers(4, w)] = k
    return s, t


@pytest.mark.parametrize("legacy", [True, False])
def test_part_assignment_and_region_growing_match_the_loops(legacy):
    """get_instance + the flood fill of the released code vs the vectorised version, 300 random maps."""
    rng = np.random.default_rng(0)
    for trial in range(300):
        s, t = random_maps(rng, int(rng.integers(8, 28)), int(rng.integers(8, 28)), int(rng.integers(2, 6)),
                           int(rng.integers(1, 5)))
        t[s == 0] = 0
        if not legacy and len(np.unique(t)) - 1 != (t.max() if t.size else 0):
            continue  # ids with gaps: there the fix differs on purpose (next test)
        theirs_t = t.copy()
        theirs_i, class_map = released.get_instance(s, theirs_t)
        released.refine(theirs_i, theirs_t, s, class_map)
        ours_t = t.astype(np.int32)
        ours_i, part_classes, capped = fusion.assign_parts(s, ours_t, legacy_person_count=legacy)
        assert part_classes == {k: int(v) for k, v in class_map.items()} and not capped
        fusion.grow_parts(ours_i, ours_t, s)
        np.testing.assert_array_equal(ours_i, theirs_i, err_msg=f"trial {trial}")
        np.testing.assert_array_equal(ours_t, theirs_t, err_msg=f"trial {trial}")


def test_person_count_fix_gives_parts_to_every_person_present():
    """A person that lost all its pixels: the released count skips the highest id; the fix does not."""
    s = np.full((6, 9), 5, np.uint8)
    t = np.zeros((6, 9), np.int32)
    t[:, :3], t[:, 6:] = 1, 3  # person 2 is gone
    legacy, _, _ = fusion.assign_parts(s, t, legacy_person_count=True)
    fixed, classes, _ = fusion.assign_parts(s, t)
    theirs, _ = released.get_instance(s, t.astype(np.uint8))
    np.testing.assert_array_equal(legacy, theirs)
    assert set(np.unique(legacy[:, 6:])) == {0} and classes == {1: 5, 2: 5}
    assert set(np.unique(fixed[:, 6:])) == {2}


def test_part_cap_stops_at_255_parts():
    s = np.tile(np.arange(1, 20, dtype=np.uint8), (16, 1))  # 19 classes in every person
    t = np.repeat(np.arange(1, 17, dtype=np.int32), 1)[:, None] * np.ones((1, 19), np.int32)  # 16 persons: 304 parts
    ours, classes, capped = fusion.assign_parts(s, t)
    theirs, class_map = released.get_instance(s, t.astype(np.uint8))
    assert capped and len(classes) == 255
    np.testing.assert_array_equal(ours, theirs)


def test_mask_nms_and_box_expansion_against_the_formulas():
    rng = np.random.default_rng(1)
    h, w = 40, 50
    for trial in range(50):
        instances = []
        for score in sorted(rng.random(6) * 0.6 + 0.3, reverse=True):
            m = np.zeros((h, w), bool)
            y0, x0 = rng.integers(0, h - 5), rng.integers(0, w - 5)
            m[y0:y0 + rng.integers(2, 25), x0:x0 + rng.integers(2, 25)] = True
            if rng.random() < 0.1:
                m[:] = False
            box = (float(x0) - rng.random() * 3, float(y0) + 0.5, float(x0) + rng.random() * 30, float(y0) + 24.5)
            instances.append(Instance(float(score), box, m))
        people = select_people(instances, h, w)
        # direct computation of the rules
        t = np.zeros((h, w), np.int32)
        kept = []
        for inst in instances:
            if inst.score < 0.5:
                break
            area = inst.mask.sum()
            if area == 0 or (inst.mask & (t > 0)).sum() / area > 0.5:
                continue
            kept.append(inst)
            t[inst.mask & (t == 0)] = len(kept)
        np.testing.assert_array_equal(people.ids, t)
        assert people.scores == [i.score for i in kept]
        assert people.crop_boxes == [released.bbox_expand(h, w, list(i.box), 1.2) for i in kept]
    # half to even, and clipping to the image
    assert expand_box((3.5, 0.0, 13.5, 10.0), 100, 100) == (2, 0, 14, 11)  # 2.5 -> 2, 14.5 -> 14
    assert expand_box((4.5, 1.0, 14.5, 11.0), 100, 100) == (4, 0, 16, 12)  # 3.5 -> 4, 15.5 -> 16
    assert expand_box((0.5, 0.5, 99.0, 99.5), 100, 100) == (0, 0, 99, 99)


def test_fusion_against_the_released_loops_in_bands(tmp_path, monkeypatch):
    """Paste-back (mean foreground, minimum background, +inf outside every crop), argmax, parts,
    growth, confidences and tags: random logits through the released functions vs ours, with bands
    of a few rows so that crops straddle band edges."""
    rng = np.random.default_rng(2)
    monkeypatch.setattr(fusion, "BAND_BYTES", 7 * 31 * 20 * 8)  # 7-row bands
    h, w = 29, 31
    boxes = [(0, 0, 14, 20), (8, 3, 30, 28), (20, 10, 30, 28)]  # inclusive, overlapping, edges
    g = rng.normal(0, 1, (h, w, 20)).astype(np.float32)
    crops = [rng.normal(0, 1, (y1 - y0 + 1, x1 - x0 + 1, 20)).astype(np.float32) for x0, y0, x1, y1 in boxes]
    person_map = np.zeros((h, w), np.uint8)
    for k, (x0, y0, x1, y1) in enumerate(boxes, 1):
        region = person_map[y0 + 2:y1 - 1, x0 + 2:x1 - 1]
        region[region == 0] = k
    scores = [0.93, 0.71, 0.55]
    for k, logits in enumerate(crops, 1):
        np.save(tmp_path / f"img_{k}_msrcnn.npy", logits)
    (tmp_path / "g").mkdir()
    np.save(tmp_path / "g" / "img.npy", g)
    np.save(tmp_path / "img_mask.npy", person_map)
    item = {"im_name": "img.jpg", "img_height": h, "img_width": w, "person_bbox": [list(b) for b in boxes],
            "person_bbox_score": scores}
    released.fusion(item, str(tmp_path / "g"), str(tmp_path), str(tmp_path), str(tmp_path / "theirs"))
    fused = fusion.fuse(g, crops, person_map, scores, boxes)
    from schp.multi_person.outputs import confidence_lines, tag_lines
    theirs = tmp_path / "theirs"
    np.testing.assert_array_equal(fused.classes, np.array(Image.open(theirs / "global_parsing" / "img.png")))
    np.testing.assert_array_equal(fused.parts, np.array(Image.open(theirs / "instance_parsing" / "img.png")))
    np.testing.assert_array_equal(fused.persons, np.array(Image.open(theirs / "global_tag" / "img.png")))
    assert "".join(x + "\n" for x in confidence_lines(fused)) == (theirs / "instance_parsing" / "img.txt").read_text()
    assert "".join(x + "\n" for x in tag_lines(fused)) == (theirs / "global_tag" / "img.txt").read_text()
    assert (fused.classes[:, :] == 0).sum() > 0 and len(fused.confidences) > 3
    # the formula itself at one pixel covered by crops 2 and 3, and one outside every crop
    y, x = 25, 25
    a, b = crops[1][y - 3, x - 8].astype(np.float64), crops[2][y - 10, x - 20].astype(np.float64)
    expected = g[y, x].astype(np.float64) + np.concatenate([[min(a[0], b[0])], (a[1:] + b[1:]) / 2])
    assert fused.classes[y, x] == np.argmax(expected)
    assert fusion.classify(g, crops, boxes)[1][y, x] == expected.max()
    assert fusion.classify(g, crops, boxes)[0][0, 30] == 0  # outside every crop: +inf background


# ----------------------------------------------------------------------------- instance sources
def test_masks_source_order_boxes_and_refusals(tmp_path):
    ids = np.zeros((20, 30), np.uint8)
    ids[2:9, 3:7], ids[10:18, 20:29], ids[0:4, 25:30] = 1, 2, 5
    Image.fromarray(ids).save(tmp_path / "a.png")
    (tmp_path / "a.json").write_text('{"1": 0.7, "2": 0.95}')
    source = MaskFolderSource(tmp_path)
    found = source.instances(np.zeros((20, 30, 3), np.uint8), Path("x/a.jpg"))
    assert [i.score for i in found] == [1.0, 0.95, 0.7]  # 5 (default 1.0), then 2, then 1
    for inst, k in zip(found, (5, 2, 1)):
        np.testing.assert_array_equal(inst.mask, ids == k)
        x, y, bw, bh = mask_util.toBbox(mask_util.encode(np.asfortranarray((ids == k).astype(np.uint8))))
        assert inst.box == (x, y, x + bw, y + bh) == mask_box(ids == k)
    with pytest.raises(InstanceError, match="no instance mask"):
        source.instances(np.zeros((20, 30, 3), np.uint8), Path("b.jpg"))
    with pytest.raises(InstanceError, match="30x20 but the image is 31x20"):
        source.instances(np.zeros((20, 31, 3), np.uint8), Path("a.jpg"))
    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(tmp_path / "c.png")
    with pytest.raises(InstanceError, match="is RGB, not person ids"):
        source.instances(np.zeros((20, 30, 3), np.uint8), Path("c.jpg"))
    with pytest.raises(SourceError, match="no such folder"):
        MaskFolderSource(tmp_path / "missing")


class Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_detectron2_file_is_read_safely_and_matched_on_image_id(tmp_path, monkeypatch):
    mask = np.zeros((10, 12), bool)
    mask[2:5, 3:9] = True
    preds = [{"image_id": 3, "instances": [detection(mask, 0.6), detection(mask, 0.9, [1.5, 2.0, 8.0, 3.5])]},
             {"image_id": 1, "instances": []}]
    path = tmp_path / "p.pth"
    torch.save(preds, path)
    (tmp_path / "list.json").write_text(json.dumps({"images": [{"id": 3, "file_name": "b.jpg"},
                                                               {"id": 1, "file_name": "a.jpg"}]}))
    source = Detectron2FileSource(path, tmp_path / "list.json")
    found = source.instances(np.zeros((10, 12, 3), np.uint8), Path("in/b.jpg"))
    assert [i.score for i in found] == [0.9, 0.6] and found[0].box == (1.5, 2.0, 9.5, 5.5)
    np.testing.assert_array_equal(found[1].mask, mask)
    assert source.instances(np.zeros((10, 12, 3), np.uint8), Path("a.jpg")) == []
    with pytest.raises(InstanceError, match="is for a 12x10 image, this one is 13x10"):
        source.instances(np.zeros((10, 13, 3), np.uint8), Path("b.jpg"))
    by_order = Detectron2FileSource(path, None, ["a.jpg", "b.jpg", "c.jpg"])  # ids 1..N, sorted names
    assert by_order.instances(np.zeros((10, 12, 3), np.uint8), Path("a.jpg")) == []
    with pytest.raises(InstanceError, match="no entry for image_id 2"):
        by_order.instances(np.zeros((10, 12, 3), np.uint8), Path("b.jpg"))
    torch.save([{"image_id": 1, "instances": [Evil()]}], tmp_path / "evil.pth")
    with pytest.raises(SourceError, match="nothing from it was executed"):
        Detectron2FileSource(tmp_path / "evil.pth")
    monkeypatch.setitem(sys.modules, "pycocotools", None)
    with pytest.raises(SourceError, match="needs the package pycocotools"):
        Detectron2FileSource(path)


def person_detector(min_size=96):
    """torchvision's Mask R-CNN, randomly initialised (no download), its classifier made to say person or
    bicycle depending on the proposal, so that the person path, thresholds and shapes are exercised.
    Fewer RPN proposals than the default 1000 keep the CPU time of the test down."""
    from torchvision.models.detection import maskrcnn_resnet50_fpn_v2
    torch.manual_seed(0)
    model = maskrcnn_resnet50_fpn_v2(weights=None, weights_backbone=None, min_size=min_size, max_size=min_size * 2)
    model.rpn._pre_nms_top_n["testing"], model.rpn._post_nms_top_n["testing"] = 300, 150
    with torch.no_grad():
        cls = model.roi_heads.box_predictor.cls_score
        cls.weight.zero_()
        cls.bias.fill_(-10.0)
        cls.weight[1] = torch.randn(cls.weight.shape[1]) * 0.5
        cls.weight[2] = -cls.weight[1]
        cls.bias[1] = cls.bias[2] = 5.0
    return model


def test_torchvision_source_end_to_end(tmp_path, cihp, small_group):
    from schp.multi_person.instances import build_torchvision_detector
    from schp.multi_person.outputs import output_paths
    from schp.inference import load_human_parser
    from schp.multi_person.run import ImageTask, MultiPersonJob, Settings
    from schp.runs.loop import run as run_loop
    from schp.data.catalog import MULTI_PERSON
    import dataclasses

    image_path, _ = small_group
    image = cv2.resize(cv2.imread(str(image_path)), (128, 96))
    model = person_detector()
    source = TorchvisionSource(torch.device("cpu"), model=model, min_size=96, max_size=192)
    assert (model.roi_heads.score_thresh, model.roi_heads.nms_thresh, model.roi_heads.detections_per_img) == \
        (0.5, 0.95, 100)
    with torch.inference_mode():
        raw = model([torch.from_numpy(image[:, :, ::-1].copy()).permute(2, 0, 1).float() / 255])[0]
    person = raw["labels"] == 1
    expected = [Instance(float(sc), tuple(float(v) for v in b), m) for sc, b, m in
                zip(raw["scores"][person], raw["boxes"][person], (raw["masks"][person, 0] > 0.5).numpy())]
    expected.sort(key=lambda i: -i.score)
    assert set(raw["labels"].tolist()) == {1, 2} and 1 <= len(expected) <= 100
    assert all(i.score >= 0.5 and i.mask.shape == (96, 128) for i in expected) and any(i.mask.any() for i in expected)
    people = select_people(expected, 96, 128)
    # weights from a local file (what --detector-weights reads)
    weights = tmp_path / "maskrcnn.pth"
    torch.save(model.state_dict(), weights)
    try:
        loaded = build_torchvision_detector(weights, 96, 192)
    finally:
        weights.unlink()
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
    # the run: detector, persons, both parsers, fusion, files
    in_dir = tmp_path / "in"
    in_dir.mkdir()
    cv2.imwrite(str(in_dir / "g.png"), image)
    parsers = [load_human_parser(dataclasses.replace(MULTI_PERSON[role], input_size=(32, 32)), path,
                                 torch.device("cpu"))[0] for role, path in (("global", cihp[0]), ("local", cihp[1]))]
    task = ImageTask(in_dir / "g.png", "g.png", output_paths(tmp_path / "out", "g"))
    report = run_loop(MultiPersonJob(*parsers, source, Settings(batch_size=8)), [task])
    assert report.count("processed") == 1
    record = json.loads((tmp_path / "out" / "instances" / "g.json").read_text())
    assert record["instances"]["source"] == "torchvision" and "not the original" in record["instances"]["note"]
    # the source gave the run what the detector found: its persons, scores and boxes
    assert record["person_num"] == people.count >= 2
    assert record["person_bbox_score"] == pytest.approx(people.scores, rel=1e-6)
    np.testing.assert_allclose(record["real_person_bbox"], people.boxes, rtol=1e-6)
    tags = (tmp_path / "out" / "global_tag" / "g.txt").read_text().splitlines()
    persons = np.array(Image.open(tmp_path / "out" / "global_tag" / "g.png"))
    assert len(tags) == len(np.unique(persons)) - 1 and persons.shape == (96, 128)


# ----------------------------------------------------------------------------- the command's standards
def test_group_photo_nobody_bad_inputs_and_resume(tmp_path, capsys, cihp):
    """The done-when run: the full-size group photo with its masks gives the three outputs and an
    overlay, each person with their own parts; an image with nobody gives all-background outputs;
    a broken image and a missing mask get one line each; a second run skips what is done."""
    in_dir, mask_dir, out = tmp_path / "in", tmp_path / "masks", tmp_path / "out"
    in_dir.mkdir(), mask_dir.mkdir()
    shutil.copy(DATA / "group.jpg", in_dir / "group.jpg")
    shutil.copy(DATA / "group_person_masks.png", mask_dir / "group.png")
    cv2.imwrite(str(in_dir / "empty.png"), np.full((40, 50, 3), 128, np.uint8))
    Image.fromarray(np.zeros((40, 50), np.uint8)).save(mask_dir / "empty.png")
    cv2.imwrite(str(in_dir / "nomask.png"), np.full((40, 50, 3), 128, np.uint8))
    (in_dir / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really")
    args = ["--input-dir", in_dir, "--output-dir", out, "--instances", "masks", mask_dir, "--global-restore",
            cihp[0], "--local-restore", cihp[1], "--input-size", f"{SIZE},{SIZE}", "--device", "cpu",
            "--summary", tmp_path / "s.json"]
    code, err = run(capsys, *args)
    assert code == 1
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 2 and any("broken.jpg" in e for e in errors) and \
        any("nomask.png: no instance mask" in e for e in errors)
    for name in ("global_parsing/group.png", "instance_parsing/group.png", "instance_parsing/group.txt",
                 "global_tag/group.png", "global_tag/group.txt", "overlay/group.jpg"):
        assert (out / name).is_file(), name
    classes = np.array(Image.open(out / "global_parsing" / "group.png"))
    parts = np.array(Image.open(out / "instance_parsing" / "group.png"))
    persons = np.array(Image.open(out / "global_tag" / "group.png"))
    assert classes.shape == (900, 1200)
    conf = [line.split() for line in (out / "instance_parsing" / "group.txt").read_text().splitlines()]
    assert sorted(np.unique(parts[parts > 0])) == list(range(1, len(conf) + 1))
    for j, (cls, _) in enumerate(conf, 1):
        assert set(np.unique(classes[parts == j])) == {int(cls)}  # a part is one class
        assert len(np.unique(persons[parts == j])) == 1  # of one person
    assert {int(np.unique(persons[parts == j])[0]) for j in range(1, len(conf) + 1)} == {1, 2, 3, 4}
    tags = (out / "global_tag" / "group.txt").read_text().splitlines()
    assert [t.split()[0] for t in tags] == ["1.000000"] * 4
    for name in ("global_parsing", "instance_parsing", "global_tag"):
        assert not np.array(Image.open(out / name / "empty.png")).any()
    assert (out / "instance_parsing" / "empty.txt").read_text() == ""
    assert (out / "global_tag" / "empty.txt").read_text() == ""
    overlay = cv2.imread(str(out / "overlay" / "group.jpg"))
    assert overlay.shape == (900, 1200, 3)
    assert not list(out.rglob(".*schp-tmp*"))
    # resume: done images are skipped, without loading any model when nothing is left to do
    (in_dir / "broken.jpg").unlink(), (in_dir / "nomask.png").unlink()
    before = (out / "global_tag" / "group.txt").read_text()
    code, err = run(capsys, *args[:6], "--global-restore", tmp_path / "missing.pth", "--local-restore",
                    tmp_path / "missing.pth", "--summary", tmp_path / "s2.json")
    assert code == 0, err
    assert json.loads((tmp_path / "s2.json").read_text())["totals"]["skipped"] == 2
    assert (out / "global_tag" / "group.txt").read_text() == before  # rewritten, never appended


def test_setup_errors_are_one_line(tmp_path, capsys, cihp):
    in_dir = tmp_path / "in"
    in_dir.mkdir()
    cv2.imwrite(str(in_dir / "a.png"), np.zeros((8, 8, 3), np.uint8))
    base = ["--input-dir", in_dir, "--output-dir", tmp_path / "out", "--global-restore", cihp[0],
            "--local-restore", cihp[1], "--input-size", f"{SIZE},{SIZE}", "--device", "cpu"]
    for extra, expected in ((["--instances", "masks"], "expected 'masks DIR'"),
                            (["--instances", "masks", tmp_path / "nope"], "no such folder"),
                            (["--instances", "detectron2", tmp_path / "nope.pth"], "no such file"),
                            (["--instances", "torchvision", "--detector-weights", tmp_path / "w.pth"],
                             "--detector-weights"),
                            (["--instances", "masks", in_dir, "--local-restore", tmp_path / "x.pth"],
                             "--local-restore")):
        code, err = run(capsys, *base, *extra)
        assert code == 2 and len(err.strip().splitlines()) == 1 and expected in err, err


def test_part_ids_of_the_released_demo_are_reproduced():
    """The released pipeline's own outputs for the group photo: its part map follows from its class map
    and person map by our part numbering and growth, id for id (31 parts)."""
    classes = np.array(Image.open(DATA / "group_global_parsing.png"))
    persons = np.array(Image.open(DATA / "group_person_masks.png")).astype(np.int32)
    released_parts = np.array(Image.open(DATA / "group_instance_parsing.png"))
    persons[classes == 0] = 0
    parts, part_classes, capped = fusion.assign_parts(classes, persons)
    fusion.grow_parts(parts, persons, classes)
    np.testing.assert_array_equal(parts, released_parts)
    assert len(part_classes) == 31 and not capped
    assert all(set(np.unique(classes[parts == j])) == {c} for j, c in part_classes.items())


def test_flip_and_scales_reach_both_parsers(tmp_path, cihp, capsys):
    args = multi_person.parse_args(["--input-dir", str(tmp_path), "--output-dir", str(tmp_path / "o"),
                                    "--global-restore", str(cihp[0]), "--local-restore", str(cihp[1]), "--flip",
                                    "--multi-scales", "0.75,1,1.25", "--input-size", "40,48"])
    from schp.multi_person.run import MultiPersonOptions, load_parsers
    parsers, paths = load_parsers(MultiPersonOptions(**multi_person.run_options(args)), torch.device("cpu"))
    assert paths == [cihp[0], cihp[1]]
    for parser, name in zip(parsers, ("cihp-global", "cihp-local")):
        assert parser.flip and parser.scales == (0.75, 1.0, 1.25) and parser.spec.input_size == (40, 48)
        assert parser.spec.name == name and parser.spec.flip_pairs == ((14, 15), (16, 17), (18, 19))
    # a bad --multi-scales is a usage error, answered while the options are read
    assert multi_person.main(["--input-dir", str(tmp_path), "--output-dir", str(tmp_path / "o"),
                              "--multi-scales", "a"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --multi-scales a: expected numbers"), err


def test_backend_runs_both_networks_with_the_same_maps(tmp_path, capsys, cihp, small_group, monkeypatch):
    """--backend reaches the global and the local parser: OpenVINO on exported files gives torch's maps,
    with test-time scales, so through the files that take any crop size (made only for such jobs). Each
    checkpoint is read once, and its weights digested once to find its export, though the local
    network's export starts beside the global one's."""
    import schp.backends
    import schp.checkpoint

    reads, load_checkpoint = [], schp.checkpoint.load_checkpoint
    monkeypatch.setattr(schp.checkpoint, "load_checkpoint",
                        lambda spec, path, **kw: reads.append(Path(path).name) or load_checkpoint(spec, path, **kw))
    digested, digest = [], schp.backends.state_dict_digest
    monkeypatch.setattr(schp.backends, "state_dict_digest",
                        lambda state: digested.append(len(state)) or digest(state))
    image_path, ids = small_group
    in_dir, mask_dir = tmp_path / "in", tmp_path / "masks"
    in_dir.mkdir(), mask_dir.mkdir()
    shutil.copy(image_path, in_dir / "group.png")
    Image.fromarray(ids.astype(np.uint8)).save(mask_dir / "group.png")
    maps = {}
    for backend in ("torch", "openvino"):
        out = tmp_path / backend
        code, err = run(capsys, "--input-dir", in_dir, "--output-dir", out, "--instances", "masks", mask_dir,
                        "--global-restore", cihp[0], "--local-restore", cihp[1], "--input-size", f"{SIZE},{SIZE}",
                        "--device", "cpu", "--backend", backend, "--multi-scales", "0.75,1",
                        "--summary", tmp_path / f"{backend}.json")
        assert code == 0, err
        assert ("exporting the cihp-global network" in err) == (backend == "openvino")
        assert json.loads((tmp_path / f"{backend}.json").read_text())["backend"] == backend
        assert reads == [Path(cihp[0]).name, Path(cihp[1]).name], reads
        assert len(digested) == (2 if backend == "openvino" else 0), digested
        reads.clear(), digested.clear()
        maps[backend] = [np.array(Image.open(out / folder / "group.png"))
                         for folder in ("global_parsing", "instance_parsing", "global_tag")]
    exports = sorted((Path(os.environ["SCHP_CACHE_DIR"]) / "exports").glob(f"*-{SIZE}x{SIZE}-*"))
    assert [p.name.split(f"-{SIZE}x{SIZE}-")[0] for p in exports] == ["cihp-global", "cihp-local"], exports
    for path in exports:  # any batch, any height and width
        assert f"-{SIZE}x{SIZE}-anysize-" in path.name
        assert onnx_input_dims(path) == ["N", 3, "H", "W"], path.name
    assert maps["torch"][0].any() and maps["torch"][1].any()
    for got, expected in zip(maps["openvino"], maps["torch"]):
        assert (got == expected).mean() >= 0.9999
