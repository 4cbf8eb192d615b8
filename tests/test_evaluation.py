"""Evaluation: the released protocol (tests/original_evaluate.py) on labelled folders made here.

Each folder holds small crops of real photos (odd and even sides) whose ground truth is the released
evaluator's own prediction, perturbed (class blocks, scattered wrong labels, ignore pixels), so every
metric is far from 0 and 100. Inputs run at a small --input-size except where the catalog sizes are
checked.
"""
import json
import os
import shutil
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import original_evaluate as orig
import original_pipeline
from conftest import ROOT
from dataclasses import replace
from schp.data.catalog import DATASETS
from schp.evaluation import (confusion_matrix, evaluate, metrics, score_files, scored_center, warp_labels)
from schp.checkpoint import read_state_dict
from schp.inference import HumanParser
from schp.utils.transforms import box_center_scale, get_affine_transform
from synth_checkpoint import save_checkpoint, synthetic_checkpoint

SIZES = [(96, 64), (75, 101), (61, 88)]  # (width, height): even/even, odd/odd, odd/even
SMALL = {"lip": (64, 64), "atr": (64, 56), "pascal": (56, 64)}  # input sizes for the quick runs
TTA = {"plain": (False, (1.0,)), "flip": (True, (1.0,)), "multi-scale": (False, (0.75, 1.0, 1.25)),
       "flip+multi-scale": (True, (0.75, 1.0, 1.25))}
CPU = torch.device("cpu")


def photo(index, width, height):
    """A crop of one of the repository's photos, resized to width x height (BGR uint8)."""
    source = cv2.imread(str(ROOT / ("demo/demo.jpg" if index % 2 == 0 else "tests/data/group.jpg")))
    h, w = source.shape[:2]
    y0, x0 = (h // 7) * (index % 3), (w // 9) * (index % 4)
    crop = source[y0:y0 + h // 2, x0:x0 + w // 2]
    return cv2.resize(crop, (width, height), interpolation=cv2.INTER_AREA)


def perturb(pred, num_classes, seed):
    """Ground truth from a prediction: a block of another class, 8% random labels, 5% and a strip of 255."""
    rng = np.random.default_rng(seed)
    gt = pred.astype(np.uint8).copy()
    h, w = gt.shape
    y, x = rng.integers(0, h // 2), rng.integers(0, w // 2)
    gt[y:y + h // 3, x:x + w // 3] = rng.integers(0, num_classes)
    noise = rng.random(gt.shape) < 0.08
    gt[noise] = rng.integers(0, num_classes, noise.sum())
    gt[rng.random(gt.shape) < 0.05] = 255
    gt[:, :2] = 255
    return gt


class Models:
    """Checkpoints and networks made once per module: the oracle's transliterated network and the project's parsers.

    The checkpoints are the seed-0 synthetic ones with the classifier standardised per class on these
    photos at the small input sizes (w/s, (b - mean)/s), so that their maps hold many classes there (the
    raw synthetic weights give almost only background on tiny crops); still the released container.
    """

    def __init__(self, folder):
        self.folder, self.paths, self.oracles, self.states = folder, {}, {}, {}

    def checkpoints(self, dataset):
        if dataset not in self.paths:
            num_classes, (in_h, in_w) = DATASETS[dataset].num_classes, SMALL[dataset]
            state = {k[len("module."):]: v for k, v in synthetic_checkpoint(dataset, 0)["state_dict"].items()}
            model = original_pipeline.ResNet(num_classes=num_classes)
            model.load_state_dict(state)
            crops = []
            for i, (w, h) in enumerate(SIZES):
                center = np.array([(w - 1) / 2, (h - 1) / 2], np.float32)
                side = max(w - 1, (h - 1) * in_w / in_h)
                trans = orig.get_affine_transform(center, np.array([side, side * in_h / in_w], np.float32), 0,
                                                  [in_h, in_w])
                crops.append(cv2.warpAffine(photo(i, w, h), trans, (in_w, in_h), flags=cv2.INTER_LINEAR))
            x = torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).float().div(255)
            mean, std = torch.tensor([0.406, 0.456, 0.485]), torch.tensor([0.225, 0.224, 0.229])
            x = (x - mean[:, None, None]) / std[:, None, None]
            with torch.no_grad():
                z = model.eval()(x)[0][1]
            mean, std = z.mean((0, 2, 3)), z.std((0, 2, 3))
            state["fushion.3.weight"] = state["fushion.3.weight"] / std[:, None, None, None]
            state["fushion.3.bias"] = (state["fushion.3.bias"] - mean) / std
            path = self.folder / f"balanced-{dataset}.pth"
            save_checkpoint({"state_dict": {"module." + k: v for k, v in state.items()}, "cycle_n": 3}, path)
            self.paths[dataset] = path
        return self.paths[dataset]

    def oracle(self, dataset):
        if dataset not in self.oracles:
            self.oracles[dataset] = original_pipeline.load_model(str(self.checkpoints(dataset)),
                                                                 DATASETS[dataset].num_classes)
        return self.oracles[dataset]

    def parser(self, dataset, flip=False, scales=(1.0,), input_size=None):
        spec = DATASETS[dataset]
        if input_size is not None:
            spec = replace(spec, input_size=tuple(input_size))
        if dataset not in self.states:
            self.states[dataset] = read_state_dict(self.checkpoints(dataset))
        return HumanParser(spec, self.states[dataset], CPU, flip=flip, scales=scales)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return Models(tmp_path_factory.mktemp("checkpoints"))


def write_split(root, images, gts, split="val", ext=".jpg"):
    for sub in (f"{split}_images", f"{split}_segmentations"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    ids = []
    for i, (image, gt) in enumerate(zip(images, gts)):
        name = f"img{i}"
        cv2.imwrite(str(root / f"{split}_images" / f"{name}{ext}"), image, [cv2.IMWRITE_JPEG_QUALITY, 95])
        if gt is not None:
            Image.fromarray(gt).save(root / f"{split}_segmentations" / f"{name}.png")
        ids.append(name)
    (root / f"{split}_id.txt").write_text("\n".join(ids) + "\n")
    return root


@pytest.fixture(scope="module")
def folders(tmp_path_factory, models):
    """folders(dataset) -> a labelled split whose ground truth is the oracle's plain prediction, perturbed."""
    made = {}

    def get(dataset):
        if dataset not in made:
            root = tmp_path_factory.mktemp(f"labelled-{dataset}")
            images = [photo(i, w, h) for i, (w, h) in enumerate(SIZES)]
            write_split(root, images, [np.zeros((h, w), np.uint8) for w, h in SIZES])
            orig.run_original_evaluate(models.oracle(dataset), str(root), dataset, SMALL[dataset],
                                       save_dir=str(root / "seed"))
            num_classes = DATASETS[dataset].num_classes
            gts = [perturb(np.array(Image.open(root / "seed" / f"img{i}.png")), num_classes, i)
                   for i in range(len(SIZES))]
            write_split(root, images, gts)
            made[dataset] = root
        return made[dataset]

    return get


def read_png(path):
    return np.array(Image.open(path))


# ----------------------------------------------------------------------------- formulas
def test_worked_example_of_the_metrics():
    pa, ma, miou, iou = metrics(np.array([[5, 1, 0], [2, 3, 0], [0, 0, 0]], dtype=float))
    assert pa == pytest.approx(100 * 8 / 11) and round(pa, 4) == 72.7273
    assert ma == pytest.approx(100 * (5 / 6 + 3 / 5) / 3) and round(ma, 4) == 47.7778
    assert iou == pytest.approx([62.5, 50.0, 0.0])
    assert miou == pytest.approx(37.5)  # the absent class 2 counts as 0


def test_confusion_per_image_equals_the_released_one_over_the_list():
    rng = np.random.default_rng(1)
    num_classes, total, gts, preds = 7, np.zeros((7, 7)), [], []
    for shape in [(13, 17), (20, 9), (5, 31)]:
        gt = rng.integers(0, num_classes, shape).astype(np.uint8)
        gt[rng.random(shape) < 0.2] = 255
        gt[rng.random(shape) < 0.05] = 9  # >= C: dropped by the released code
        pred = rng.integers(0, num_classes, shape).astype(np.uint8)
        total += confusion_matrix(gt, pred, num_classes)
        gts.append(gt.astype(np.int32).ravel())
        preds.append(pred.astype(np.int32).ravel())
    gt, pred = np.concatenate(gts), np.concatenate(preds)
    keep = gt != 255
    expected = orig.get_confusion_matrix(gt[keep], pred[keep], num_classes)
    np.testing.assert_array_equal(total, expected)
    assert total.sum() == np.sum(keep & (gt < num_classes))


def test_int32_centre_moves_the_inverse_warp_half_a_pixel_for_a_500x400_image():
    center, scale = box_center_scale(500, 400)
    assert list(center) == [249.5, 199.5]
    float_m = get_affine_transform(scored_center(center, False), scale, (473, 473), inv=True)
    int_m = get_affine_transform(scored_center(center, True), scale, (473, 473), inv=True)
    assert float_m[:, 2] == pytest.approx([0.0, -50.0], abs=1e-4)
    assert int_m[:, 2] == pytest.approx([-0.5, -50.5], abs=1e-4)
    np.testing.assert_allclose(int_m[:, :2], float_m[:, :2])
    # and the same matrices as the released transform_parsing builds
    np.testing.assert_array_equal(int_m, orig.get_affine_transform(np.int32(center), scale, 0, [473, 473], inv=1))
    labels = np.random.default_rng(0).integers(0, 20, (473, 473)).astype(np.int64)
    np.testing.assert_array_equal(warp_labels(labels, scored_center(center), scale, 500, 400, (473, 473)),
                                  orig.transform_parsing(labels, np.int32(center), scale, 500, 400, [473, 473]))


class FixedLogits(torch.nn.Module):
    """A stand-in network returning fixed fusion logits for each input size (records what it was fed)."""

    def __init__(self, num_classes):
        super().__init__()
        self.num_classes, self.inputs, self.outputs = num_classes, [], {}

    def forward(self, x):
        key = tuple(x.shape)
        if key not in self.outputs:
            g = torch.Generator().manual_seed(sum(key))
            self.outputs[key] = torch.randn(x.shape[0], self.num_classes, (x.shape[2] + 3) // 4,
                                            (x.shape[3] + 3) // 4, generator=g)
        self.inputs.append(x.clone())
        return type("Out", (), {"fusion": self.outputs[key].clone()})()


def stub_parser(dataset, flip, scales, input_size=(40, 36)):
    parser = HumanParser.__new__(HumanParser)
    parser.spec = replace(DATASETS[dataset], input_size=input_size)
    parser.flip, parser.scales, parser.precision, parser.device = flip, tuple(scales), "fp32", CPU
    parser.model, parser.runner = FixedLogits(parser.spec.num_classes), None  # None: the torch model runs
    parser.backend, parser.background, parser.switch_on_forward, parser.crops_by_backend = "torch", None, True, {}
    parser.trial = parser.rivals = None
    return parser


@pytest.mark.parametrize("dataset", ["lip", "atr", "pascal"])
def test_flip_averages_the_swapped_mirrored_logits(dataset):
    parser = stub_parser(dataset, True, (1.0,))
    x = torch.randn(3, 3, 40, 36)
    out = parser.logits_normalized(x)
    z = parser.model.outputs[(6, 3, 40, 36)]
    torch.testing.assert_close(parser.model.inputs[0], torch.cat([x, x.flip(-1)]), rtol=0, atol=0)
    perm = list(range(parser.spec.num_classes))
    for a, b in DATASETS[dataset].flip_pairs:
        perm[a], perm[b] = b, a
    for k in range(3):
        fused = (z[k] + z[3 + k][perm].flip(-1)) * 0.5
        expected = F.interpolate(fused[None], size=(40, 36), mode="bilinear", align_corners=True)[0]
        torch.testing.assert_close(out[k], expected, rtol=0, atol=0)
        # the oracle's in-place version (LIP indices as released; the fix for the others)
        raw = z[[k, 3 + k]].clone()

        class Once(torch.nn.Module):
            def forward(self, _):
                return [[None, raw], [None]]
        _, hwc = orig.multi_scale_testing(Once(), x[[k]], crop_size=[40, 36], flip=True, swap=orig.FLIP_SWAPS[dataset])
        np.testing.assert_array_equal(out[k].permute(1, 2, 0).numpy(), hwc)


def test_multi_scale_sizes_are_floor_and_scale_one_is_identity():
    x = torch.randn(2, 3, 473, 473)
    assert torch.equal(F.interpolate(x, scale_factor=1.0, mode="bilinear", align_corners=True), x)
    for s in (0.75, 1.25, 0.5, 1.5):  # the released nn.Upsample(scale_factor=s) gives floor(H * s), same samples
        up = torch.nn.Upsample(scale_factor=s, mode="bilinear", align_corners=True)(x)
        assert up.shape[-2:] == (int(np.floor(473 * s)),) * 2
        torch.testing.assert_close(up, F.interpolate(x, size=up.shape[-2:], mode="bilinear", align_corners=True),
                                   rtol=0, atol=0)
    parser = stub_parser("lip", False, (0.75, 1.0, 1.25), input_size=(473, 470))
    x = torch.randn(1, 3, 473, 470)
    out = parser.logits_normalized(x)
    assert [tuple(i.shape[-2:]) for i in parser.model.inputs] == [(354, 352), (473, 470), (591, 587)]
    assert torch.equal(parser.model.inputs[1], x)
    expected = torch.stack([F.interpolate(parser.model.outputs[tuple(i.shape)], size=(473, 470), mode="bilinear",
                                          align_corners=True)[0] for i in parser.model.inputs]).mean(0)
    torch.testing.assert_close(out[0], expected, rtol=0, atol=0)


# ----------------------------------------------------------------------------- against the released evaluator
def assert_same_metrics(fields, reference):
    """`fields` (EvalResult.as_dict) against the released evaluator's OrderedDict, at the issue's tolerances."""
    names = [k for k in reference if k not in ("Pixel accuracy", "Mean accuracy", "Mean IU")]
    assert len(fields["iou"]) == len(names)
    assert np.abs(np.array(fields["iou"]) - np.array([reference[k] for k in names])).max() <= 0.05
    assert abs(fields["mean_iou"] - reference["Mean IU"]) <= 0.02
    assert abs(fields["pixel_accuracy"] - reference["Pixel accuracy"]) <= 0.05
    assert abs(fields["mean_accuracy"] - reference["Mean accuracy"]) <= 0.05


class ProjectNetwork:
    """The project's folded network as the callable the released code calls: x -> [[parsing, fusion], [edge]]."""

    def __init__(self, parser):
        self.model = parser.model

    def __call__(self, x):
        return [[None, self.model(x.contiguous(memory_format=torch.channels_last)).fusion.float()], [None]]


def released_run(model, dataset, tta, root, folder):
    """The released evaluator on `root`'s images with ground truth made from its own predictions (perturbed).

    Returns (OrderedDict, confusion, data folder); its --save-results maps are in `folder / "ref"`.
    As released, all predictions are made first and the ground truth is read afterwards."""
    flip, scales = TTA[tta]
    input_size, num_classes = SMALL[dataset], DATASETS[dataset].num_classes
    preds, pred_scales, centers = orig.original_predictions(model, str(root), dataset, input_size, flip, scales,
                                                            save_dir=str(folder / "ref"))
    data = folder / "data"
    shutil.copytree(root / "val_images", data / "val_images")
    shutil.copy(root / "val_id.txt", data / "val_id.txt")
    (data / "val_segmentations").mkdir()
    for i in range(len(SIZES)):
        gt = perturb(read_png(folder / "ref" / f"img{i}.png"), num_classes, 10 + i)
        Image.fromarray(gt).save(data / "val_segmentations" / f"img{i}.png")
    reference, confusion = orig.compute_mean_ioU(preds, pred_scales, centers, num_classes, str(data), input_size)
    return reference, confusion, data


def saved_agreement(ours, ref):
    same = total = 0
    for i in range(len(SIZES)):
        a, b = read_png(ours / f"img{i}.png"), read_png(ref / f"img{i}.png")
        assert a.shape == b.shape
        same, total = same + np.sum(a == b), total + a.size
    return same / total


@pytest.mark.parametrize("dataset,tta", [("lip", "plain"), ("lip", "flip"), ("lip", "flip+multi-scale"),
                                         ("atr", "plain"), ("atr", "flip"), ("atr", "multi-scale"),
                                         ("pascal", "plain"), ("pascal", "flip"), ("pascal", "multi-scale")])
def test_protocol_equals_the_released_evaluator_exactly(dataset, tta, models, folders, tmp_path):
    """Same network on both sides: crop, augmentation, warp back, confusion and metrics must agree exactly."""
    flip, scales = TTA[tta]
    parser = models.parser(dataset, flip, scales, SMALL[dataset])
    reference, ref_confusion, data = released_run(ProjectNetwork(parser), dataset, tta, folders(dataset), tmp_path)
    result = evaluate(parser, data, "val", save_dir=tmp_path / "ours", quiet=True)
    assert result.images == len(SIZES) and result.failed == []
    np.testing.assert_array_equal(result.confusion, ref_confusion)
    assert result.iou == [reference[str(c)] for c in range(len(result.iou))]
    assert (result.pixel_accuracy, result.mean_accuracy, result.mean_iou) == \
        (reference["Pixel accuracy"], reference["Mean accuracy"], reference["Mean IU"])
    assert 10 < result.mean_iou < 90  # a meaningful case: many classes, neither all right nor all wrong
    assert saved_agreement(tmp_path / "ours", tmp_path / "ref") == 1.0


@pytest.mark.parametrize("dataset,tta", [("lip", "flip+multi-scale"), ("atr", "flip"), ("pascal", "multi-scale")])
def test_metrics_equal_the_released_evaluator_with_its_own_network(dataset, tta, models, folders, tmp_path):
    """Fully independent: the transliterated network (InPlace-ABN unfolded) against the project's folded one.

    fp32 rounding differs between them, which flips the argmax at a few near-tie crop pixels; on folders
    this small one such pixel moves a class's IoU by up to ~0.2 points, so per-class IoU is held to 0.5
    here and the issue's 0.05 / 0.02 apply to the means (mIoU) and accuracies.
    """
    flip, scales = TTA[tta]
    reference, ref_confusion, data = released_run(models.oracle(dataset), dataset, tta, folders(dataset), tmp_path)
    parser = models.parser(dataset, flip, scales, SMALL[dataset])
    result = evaluate(parser, data, "val", batch_size=2, save_dir=tmp_path / "ours", quiet=True)
    assert result.images == len(SIZES) and result.confusion.sum() == ref_confusion.sum()
    names = [str(c) for c in range(len(result.iou))]
    assert np.abs(np.array(result.iou) - np.array([reference[k] for k in names])).max() <= 0.5
    assert abs(result.mean_iou - reference["Mean IU"]) <= 0.02
    assert abs(result.pixel_accuracy - reference["Pixel accuracy"]) <= 0.05
    assert abs(result.mean_accuracy - reference["Mean accuracy"]) <= 0.05
    assert 10 < result.mean_iou < 90
    assert saved_agreement(tmp_path / "ours", tmp_path / "ref") >= 0.999


@pytest.mark.parametrize("dataset", ["lip", "atr", "pascal"])
def test_catalog_input_size_from_the_command_line(dataset, checkpoints, tmp_path, capsys):
    """One image at the dataset's own input size (no --input-size), plain seed-0 synthetic checkpoint,
    through evaluate.main, against the released evaluator with its own network."""
    from schp.commands import evaluate as cli

    w, h = (70, 52)
    image = photo(5, w, h)
    root = write_split(tmp_path / "data", [image], [np.zeros((h, w), np.uint8)])
    num_classes = DATASETS[dataset].num_classes
    oracle = original_pipeline.load_model(str(checkpoints(dataset)), num_classes)
    preds, scales, centers = orig.original_predictions(oracle, str(root), dataset, save_dir=str(tmp_path / "seed"))
    write_split(root, [image], [perturb(read_png(tmp_path / "seed" / "img0.png"), num_classes, 7)])
    reference, _ = orig.compute_mean_ioU(preds, scales, centers, num_classes, str(root),
                                         orig.default_input_size(dataset))
    code = cli.main(["--dataset", dataset, "--data-dir", str(root), "--model-restore",
                     str(checkpoints(dataset)), "--device", "cpu", "--summary", str(tmp_path / "s.json"),
                     "--quiet"])
    out, err = capsys.readouterr()
    assert code == 0, err
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["dataset"] == dataset and summary["input_size"] == list(DATASETS[dataset].input_size)
    assert summary["images"] == 1 and summary["failed"] == [] and summary["legacy_int_centers"] is True
    assert summary["tta"] == {"flip": False, "scales": [1.0]}
    assert len(summary["iou"]) == num_classes
    assert sum(v > 0 for v in summary["iou"]) >= 2  # more than one class found
    assert_same_metrics(summary, reference)
    for name, value in zip(DATASETS[dataset].labels, summary["iou"]):  # the table names the dataset's classes
        assert any(line.split()[1:] == name.split() + [f"{value:.2f}"] for line in out.splitlines())
    assert f"Mean IU: {summary['mean_iou']:f}" in out


# ----------------------------------------------------------------------------- files mode, flip invariance
def test_files_mode_equals_model_mode(models, folders, tmp_path):
    root = folders("atr")
    parser = models.parser("atr", True, (1.0,), SMALL["atr"])
    saved = tmp_path / "maps"
    floated = evaluate(parser, root, legacy_int_centers=False, save_dir=saved, quiet=True)
    files = score_files(saved, root, "val", 18, quiet=True)
    np.testing.assert_array_equal(files.confusion, floated.confusion)
    assert files.iou == floated.iou and files.images == floated.images == len(SIZES)
    # the released int32 centres score a map shifted by half a pixel on even sides: not the saved one
    legacy = evaluate(parser, root, quiet=True)
    assert not np.array_equal(legacy.confusion, floated.confusion)
    assert legacy.confusion.sum() == floated.confusion.sum()


@pytest.mark.parametrize("dataset", ["lip", "atr"])
def test_flip_makes_an_image_and_its_mirror_give_mirrored_maps(dataset, models, tmp_path):
    """With flip on, the logits are mirror-symmetric up to the left/right exchange, so a mirrored image gets
    the mirrored map with pairs exchanged. At width 91 OpenCV's fixed-point crop of the mirror is exactly the
    mirrored crop; only the columns that the nearest-neighbour warp back samples at a tie (crop position
    exactly half-way between two pixels: k * (x - 45) an integer, k = (in_w - 1) / 90) may differ."""
    spec = DATASETS[dataset]
    width, height, centre = 91, 72, 45
    k = (SMALL[dataset][1] - 1) / (width - 1)
    ties = [x for x in range(width) if abs(k * (x - centre) - round(k * (x - centre))) < 1e-9]
    image = photo(3, width, height)
    perm = np.array(spec.flip_permutation)
    gt = np.zeros((height, width), np.uint8)
    gt[20:60, 10:40], gt[20:60, 50:70], gt[:10, :30] = spec.flip_pairs[0][0], spec.flip_pairs[0][1], 255
    gt[:, ties] = 255
    mirrored = gt[:, ::-1]
    mirror_gt = np.where(mirrored == 255, 255, perm[np.minimum(mirrored, spec.num_classes - 1)]).astype(np.uint8)
    root = write_split(tmp_path / "data", [image, image[:, ::-1].copy()], [gt, mirror_gt], ext=".png")
    parser = models.parser(dataset, True, (1.0, 0.75), SMALL[dataset])
    crops = torch.from_numpy(np.stack([cv2.resize(image, SMALL[dataset][::-1]),
                                       cv2.resize(image, SMALL[dataset][::-1])[:, ::-1]]))
    logits = parser.logits(crops)
    torch.testing.assert_close(logits[1], logits[0][list(perm)].flip(-1), rtol=1e-5, atol=1e-5)
    result = evaluate(parser, root, legacy_int_centers=False, save_dir=tmp_path / "maps", quiet=True)
    assert result.images == 2
    a, b = read_png(tmp_path / "maps" / "img0.png"), read_png(tmp_path / "maps" / "img1.png")
    assert len(np.unique(a)) >= 3
    same = perm[a][:, ::-1] == b
    assert np.delete(same, ties, axis=1).all() and len(ties) < 10
    # each image against its own ground truth: the same counts once left and right are exchanged
    one = confusion_matrix(gt, a, spec.num_classes)
    other = confusion_matrix(mirror_gt, b, spec.num_classes)
    np.testing.assert_array_equal(one[np.ix_(perm, perm)], other)


# ----------------------------------------------------------------------------- command line, bad input
def test_bad_inputs_are_named_left_out_and_counted(models, folders, tmp_path, capsys):
    from schp.commands import evaluate as cli

    root = tmp_path / "data"
    good = folders("lip")
    images = [cv2.imread(str(good / "val_images" / f"img{i}.jpg")) for i in range(2)]
    gts = [read_png(good / "val_segmentations" / f"img{i}.png") for i in range(2)]
    bad_value = gts[0].copy()
    bad_value[5, 5] = 20
    write_split(root, images + [images[0]] * 3 + [images[1]], gts + [None, gts[0][:-1], bad_value, gts[1]])
    Image.fromarray(np.stack([gts[1]] * 3, axis=2)).save(root / "val_segmentations" / "img5.png")  # RGB
    with open(root / "val_id.txt", "a") as f:
        f.write("missing\n")
    argv = ["--data-dir", str(root), "--model-restore", str(models.checkpoints("lip")), "--device", "cpu",
            "--input-size", "64,64", "--summary", str(tmp_path / "s.json"), "--quiet"]
    code = cli.main(argv)
    out, err = capsys.readouterr()
    assert code == 1
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 5, err
    for name, words in [("val_images/missing.jpg", "no such image"), ("val_images/img2.jpg", "no ground truth"),
                        ("val_segmentations/img3.png", "label is 96x63 but its image is 96x64"),
                        ("val_segmentations/img4.png", "label values 20"),
                        ("val_segmentations/img5.png", "RGB")]:
        assert any(str(root / name) in line and words in line for line in errors), (name, errors)
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["images"] == 2 and len(summary["failed"]) == 5
    # the two good images score as they do alone
    alone = write_split(tmp_path / "alone", images, gts)
    parser = models.parser("lip", input_size=(64, 64))
    np.testing.assert_allclose(summary["iou"], evaluate(parser, alone, quiet=True).iou)
    # set-up errors: one line, exit 2
    for extra, words in [(["--data-dir", str(tmp_path / "nowhere")], "no such id file"),
                         (["--model-restore", str(tmp_path / "none.pth")], "no such file"),
                         (["--num-classes", "18", "--dataset", "lip"], "does not match"),
                         (["--multi-scales", "a,b"], "--multi-scales"),
                         (["--pred-dir", str(tmp_path / "nothing")], "no such folder")]:
        assert cli.main(argv + extra) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and words in err[0], err


def test_files_mode_refuses_bad_predictions(folders, tmp_path, capsys):
    from schp.commands import evaluate as cli

    root = tmp_path / "data"
    shutil.copytree(folders("pascal"), root)
    with open(root / "val_id.txt", "a") as f:
        f.write("img3\n")
    shutil.copy(root / "val_segmentations" / "img0.png", root / "val_segmentations" / "img3.png")
    preds = tmp_path / "preds"
    preds.mkdir()
    gts = [read_png(root / "val_segmentations" / f"img{i}.png") for i in range(3)]
    Image.fromarray(np.where(gts[0] == 255, 0, gts[0]).astype(np.uint8)).save(preds / "img0.png")
    Image.fromarray(gts[1][:, 1:] % 7).save(preds / "img1.png")  # wrong size
    Image.fromarray(np.full(gts[2].shape, 7, np.uint8)).save(preds / "img2.png")  # not a class
    code = cli.main(["--dataset", "pascal", "--data-dir", str(root), "--pred-dir", str(preds), "--quiet",
                     "--summary", str(tmp_path / "s.json")])
    err = capsys.readouterr().err
    assert code == 1
    assert f"error: {preds / 'img1.png'}: prediction is" in err and f"error: {preds / 'img2.png'}:" in err
    assert f"error: {preds / 'img3.png'}: no such label file" in err
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["images"] == 1 and summary["mode"] == "files"
    present = np.unique(gts[0][gts[0] != 255])
    assert summary["pixel_accuracy"] == 100.0 and summary["mean_accuracy"] == pytest.approx(100 * len(present) / 7)
    assert [v > 0 for v in summary["iou"]] == [c in present for c in range(7)]  # absent classes score 0
    assert summary["mean_iou"] == pytest.approx(100 * len(present) / 7)


def test_original_command_line_runs_as_written(models, folders, tmp_path):
    root = folders("lip")
    log = tmp_path / "log"
    result = subprocess.run(
        [sys.executable, str(ROOT / "evaluate.py"), "--arch", "resnet101", "--data-dir", str(root),
         "--model-restore", str(models.checkpoints("lip")), "--gpu", "0", "--input-size", "64,64",
         "--num-classes", "20", "--ignore-label", "255", "--random-mirror", "--random-scale", "--flip",
         "--multi-scales", "0.75,1.0,1.25", "--save-results", "--log-dir", str(log), "--batch-size", "2"],
        capture_output=True, text=True, timeout=600, env={**os.environ, "SCHP_CACHE_DIR": ""})
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (log / "sp_results").iterdir()) == [f"img{i}.png" for i in range(len(SIZES))]
    saved = Image.open(log / "sp_results" / "img0.png")
    assert saved.mode == "P" and saved.size == SIZES[0]
    lines = result.stdout.splitlines()
    assert lines[1].split()[:2] == ["0", "Background"] and lines[20].split()[:2] == ["19", "Right-shoe"]
    assert lines[-1].startswith("Mean IU: ")


# ----------------------------------------------------------------------------- extractor TTA
def test_extractor_flip_and_scales_equal_the_released_tta_then_inverse_warp(checkpoints, run_cli, tmp_path):
    image = cv2.resize(cv2.imread(str(ROOT / "demo" / "demo.jpg")), (120, 80), interpolation=cv2.INTER_AREA)
    oracle = original_pipeline.load_model(str(checkpoints("pascal")), 7)
    (tmp_path / "in").mkdir()
    cv2.imwrite(str(tmp_path / "in" / "a.png"), image)
    code, _, err = run_cli("--dataset", "pascal", "--model-restore", checkpoints("pascal"), "--device", "cpu",
                           "--input-dir", tmp_path / "in", "--output-dir", tmp_path / "out",
                           "--flip", "--multi-scales", "0.75")
    assert code == 0, err
    x, c, s, w, h = original_pipeline.preprocess(str(tmp_path / "in" / "a.png"), [512, 512])

    def released(flip):  # the released evaluator's averaged crop logits, then the extractor's inverse warp
        with torch.no_grad():
            _, hwc = orig.multi_scale_testing(oracle, torch.cat([x, x.flip(-1)]) if flip else x, crop_size=[512, 512],
                                              flip=flip, multi_scales=(0.75,), swap=None)
        return np.argmax(original_pipeline.transform_logits(hwc, c, s, w, h, [512, 512]), axis=2)

    expected = released(True)
    assert len(np.unique(expected)) >= 3
    assert np.mean(read_png(tmp_path / "out" / "a.png") == expected) >= 0.999
    assert np.mean(released(False) == expected) < 0.99  # the flip average is not the plain map
    assert run_cli("--dataset", "pascal", "--model-restore", checkpoints("pascal"), "--input-dir",
                   tmp_path / "in", "--output-dir", tmp_path / "x", "--multi-scales", "0")[0] == 2


def test_gpu_warning_only_when_the_user_gave_gpu(checkpoints, tmp_path, capsys):
    """The original's --gpu default ('0') is no reason to warn on a CPU run; a given --gpu 0 without
    CUDA is, once, as one line naming the flag."""
    import torch
    from schp.commands import evaluate as cli

    w, h = (40, 30)
    root = write_split(tmp_path / "data", [photo(1, w, h)], [np.zeros((h, w), np.uint8)])
    argv = ["--dataset", "pascal", "--data-dir", str(root), "--model-restore", str(checkpoints("pascal")),
            "--input-size", "64,64", "--quiet"]
    assert cli.main(argv) == 0
    assert [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning")] == []
    assert cli.main(argv + ["--gpu", "0"]) == 0
    warned = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning")]
    expected = [] if torch.cuda.is_available() else [
        "warning: --gpu 0: this machine has no CUDA device; running on the CPU"]
    assert warned == expected
