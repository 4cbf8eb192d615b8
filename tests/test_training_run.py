"""train.py end to end on CPU with tiny coloured-shape datasets (64 x 64, the real ResNet-101 CE2P).

The runs are few and short: the released-format files, the closed-form lr, loading in the extractor
and in the released loader, resume == uninterrupted, learning, bad data, a non-finite loss, torchrun.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from schp.commands import train
from conftest import ROOT
from schp.training.schedule import learning_rate
from tiny_parsing_data import make_dataset

COMMON = ["--input-size", "64,64", "--batch-size", "2", "--imagenet-pretrain", "none", "--num-workers", "0",
          "--quiet", "--seed", "3"]


def run_train(*argv):
    return train.main([str(a) for a in argv] + COMMON)


def metrics(log_dir):
    return [json.loads(line) for line in (log_dir / "metrics.jsonl").read_text().splitlines()]


def files(log_dir):
    return sorted(p.name for p in log_dir.iterdir())


@pytest.fixture(scope="module")
def pascal_run(tmp_path_factory):
    """The issue's command: pascal, 4 epochs, warm-up 1, cycles from epoch 2 every epoch, eval every 2."""
    root = tmp_path_factory.mktemp("pascal")
    data = make_dataset(root / "data", 7, train=2, val=1)
    log = root / "log"
    code = run_train("--dataset", "pascal", "--data-dir", data, "--epochs", 4, "--warmup-epochs", 1,
                     "--schp-start", 2, "--cycle-epochs", 1, "--eval-epochs", 2, "--log-dir", log)
    yield code, data, log
    remove_checkpoints(root)


def remove_checkpoints(folder):
    """Each run writes ~2 GB of checkpoints (66.8 M values per model); don't leave them in /tmp."""
    for path in folder.rglob("*.pth.tar"):
        path.unlink()


@pytest.fixture(autouse=True)
def no_big_files_left(tmp_path):
    yield
    remove_checkpoints(tmp_path)


def test_pascal_run_writes_the_released_files_and_follows_the_schedule(pascal_run):
    code, _, log = pascal_run
    assert code == 0
    assert files(log) == ["args.json", "checkpoint_2.pth.tar", "checkpoint_4.pth.tar", "curves.png",
                          "last.pth.tar", "metrics.jsonl", "schp_1_checkpoint.pth.tar",
                          "schp_2_checkpoint.pth.tar", "schp_3_checkpoint.pth.tar"]
    rows = metrics(log)
    assert [r["epoch"] for r in rows] == [0, 1, 2, 3]
    assert [r["lr"] for r in rows] == [learning_rate(e, 7e-3, 1, 2, 1) for e in range(4)]
    assert [r["cycle_n"] for r in rows] == [0, 0, 1, 2]
    for r in rows:
        assert all(np.isfinite(r[k]) for k in ("loss", "loss_parsing", "loss_fusion", "loss_edge"))
        assert r["loss_consistency"] == 0.0 and r["iterations"] == 1 and r["seconds"] > 0
    with Image.open(log / "curves.png") as im:
        assert im.format == "PNG" and im.size[0] > im.size[1]
    # validation after epochs 2 and 4 scored the SCHP model of that point, with evaluate.py's code
    assert [("val_mean_iou" in r) for r in rows] == [False, True, False, True]
    assert rows[1]["val_model"] == rows[3]["val_model"] == "schp"

    ckpt = torch.load(log / "checkpoint_4.pth.tar", map_location="cpu", weights_only=True)
    assert ckpt["epoch"] == 4 and ckpt["labels"][1] == "Head" and ckpt["input_size"] == [64, 64]
    schp = torch.load(log / "schp_3_checkpoint.pth.tar", map_location="cpu", weights_only=True)
    assert schp["cycle_n"] == 3 and "epoch" not in schp
    keys = json.loads((ROOT / "tests" / "data" / "state_dict_keys.json").read_text())["pascal"]
    assert [[k, list(v.shape)] for k, v in schp["state_dict"].items()] == \
        [["module." + k, s] for k, s in keys]


def test_validation_figures_equal_evaluate_py_on_the_saved_checkpoints(pascal_run, tmp_path, capsys):
    from schp.commands import evaluate

    _, data, log = pascal_run
    rows = metrics(log)
    for row, saved in ((rows[1], "schp_1_checkpoint.pth.tar"), (rows[3], "schp_3_checkpoint.pth.tar")):
        summary = tmp_path / f"{saved}.json"
        code = evaluate.main(["--dataset", "pascal", "--data-dir", str(data), "--model-restore", str(log / saved),
                              "--input-size", "64,64", "--device", "cpu", "--summary", str(summary), "--quiet"])
        assert code == 0, capsys.readouterr().err
        scored = json.loads(summary.read_text())
        assert scored["images"] == 1
        assert row["val_mean_iou"] == pytest.approx(scored["mean_iou"], abs=1e-9)
        assert row["val_pixel_accuracy"] == pytest.approx(scored["pixel_accuracy"], abs=1e-9)


def test_final_schp_model_loads_in_the_extractor_and_the_released_loader(pascal_run, run_cli, tmp_path):
    _, data, log = pascal_run
    final = log / "schp_3_checkpoint.pth.tar"
    code, _, err = run_cli("--dataset", "pascal", "--model-restore", final, "--input-dir",
                           data / "val_images", "--output-dir", tmp_path / "out")
    assert code == 0, err
    assert len(list((tmp_path / "out").glob("*.png"))) == 1
    import original_pipeline  # the transliteration of the released extractor (an independent loader)
    model = original_pipeline.load_model(final, 7)
    assert sum(v.numel() for v in model.state_dict().values()) > 60e6


def test_custom_labels_learn_resume_equals_uninterrupted_and_extract(tmp_path, run_cli):
    data = make_dataset(tmp_path / "data", 4, train=2, seed=5)
    args = ["--dataset", "custom", "--num-classes", 4, "--labels", "bg,square,disc,box",
            "--flip-pairs", "1:3", "--data-dir", data, "--epochs", 3, "--warmup-epochs", 0,
            "--learning-rate", 0.02, "--schp-start", 2, "--cycle-epochs", 1, "--eval-epochs", 2]
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert run_train(*args, "--log-dir", whole) == 0
    assert run_train(*args, "--log-dir", parts, "--stop-after", 2) == 0
    assert files(parts) == ["args.json", "checkpoint_2.pth.tar", "curves.png", "last.pth.tar", "metrics.jsonl",
                            "schp_1_checkpoint.pth.tar"]
    assert run_train(*args, "--log-dir", parts, "--resume") == 0

    assert files(whole) == files(parts)
    a, b = metrics(whole), metrics(parts)
    for row in a + b:
        row.pop("seconds")
    assert a == b  # same lr, cycle points, losses
    assert [r["cycle_n"] for r in a] == [0, 0, 1]
    assert a[1]["loss"] < a[0]["loss"]  # hard-label training lowers the loss
    for name in ("checkpoint_2.pth.tar", "schp_2_checkpoint.pth.tar", "last.pth.tar"):
        sa = torch.load(whole / name, map_location="cpu", weights_only=True)["state_dict"]
        sb = torch.load(parts / name, map_location="cpu", weights_only=True)["state_dict"]
        assert all(torch.equal(sa[k], sb[k]) for k in sa), name

    code, _, err = run_cli("--dataset", "custom", "--model-restore", whole / "schp_2_checkpoint.pth.tar",
                           "--input-dir", data / "train_images", "--output-dir", tmp_path / "out")
    assert code == 0, err
    with Image.open(tmp_path / "out" / "img_train_000.png") as im:
        assert im.mode == "P" and im.size == (64, 64) and np.array(im).max() < 4
    code, out, _ = run_cli("--dataset", "custom", "--model-restore", whole / "schp_2_checkpoint.pth.tar",
                           "--legend")
    assert code == 0 and "square" in out and "4 classes" in out


def break_split(root, how):
    images, labels = root / "train_images", root / "train_segmentations"
    first = sorted(labels.iterdir())[0]
    if how == "missing label":
        first.unlink()
    elif how == "rgb label":
        Image.open(first).convert("RGB").save(first)
    elif how == "other size":
        Image.open(first).resize((30, 30)).save(first)
    elif how == "bad value":
        a = np.array(Image.open(first))
        a[0, 0] = 9
        Image.fromarray(a).save(first)
    elif how == "missing image":
        sorted(images.iterdir())[0].unlink()
    elif how == "no id file":
        (root / "train_id.txt").unlink()
    return first


@pytest.mark.parametrize("how, reason", [
    ("missing label", "no such label file"), ("rgb label", "not class indices"),
    ("other size", "but its image is"), ("bad value", "label values 9 are not classes"),
    ("missing image", "no such image"), ("no id file", "no such id file")])
def test_bad_data_is_refused_before_training_with_one_line(tmp_path, capsys, how, reason):
    data = make_dataset(tmp_path / "data", 4, train=3)
    bad = break_split(data, how)
    log = tmp_path / "log"
    code = run_train("--dataset", "custom", "--num-classes", 4, "--data-dir", data, "--log-dir", log,
                     "--check-data")
    err = capsys.readouterr().err
    assert code == 1
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert reason in lines[0] and (bad.stem in lines[0] or "train_id.txt" in lines[0])
    assert not log.exists()  # nothing started


def test_check_data_passes_on_good_data(tmp_path, capsys):
    data = make_dataset(tmp_path / "data", 4, train=3)
    assert run_train("--dataset", "custom", "--num-classes", 4, "--data-dir", data, "--log-dir",
                     tmp_path / "log", "--check-data") == 0
    assert "3 samples" in capsys.readouterr().err and not (tmp_path / "log").exists()


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, capsys):
    data = make_dataset(tmp_path / "data", 4, train=2)
    log = tmp_path / "log"
    code = run_train("--dataset", "custom", "--num-classes", 4, "--data-dir", data, "--log-dir", log,
                     "--epochs", 3, "--warmup-epochs", 0, "--learning-rate", 1e30, "--schp-start", 9)
    err = capsys.readouterr().err
    assert code == 1
    assert "at epoch 1 iteration 0" in err and "last.pth.tar" in err
    last = torch.load(log / "last.pth.tar", map_location="cpu", weights_only=True)
    assert last["epoch"] == 1 and all(torch.isfinite(v).all() for v in last["state_dict"].values())
    assert len(metrics(log)) == 1


def test_torchrun_two_cpu_processes_write_one_set_of_files(tmp_path):
    data = make_dataset(tmp_path / "data", 4, train=4)
    log = tmp_path / "log"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(ROOT / "train.py"), "--dataset", "custom", "--num-classes", 4, "--data-dir", data,
           "--log-dir", log, "--epochs", 2, "--warmup-epochs", 1, "--schp-start", 1, "--cycle-epochs", 1,
           "--eval-epochs", 1, "--sync-bn", *COMMON]
    done = subprocess.run([str(c) for c in cmd], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert files(log) == ["args.json", "checkpoint_1.pth.tar", "checkpoint_2.pth.tar", "curves.png",
                          "last.pth.tar", "metrics.jsonl", "schp_1_checkpoint.pth.tar",
                          "schp_2_checkpoint.pth.tar"]
    rows = metrics(log)
    assert [r["epoch"] for r in rows] == [0, 1]  # written once, by rank 0
    assert all(r["iterations"] == 1 for r in rows)  # 4 images, 2 ranks x batch 2: each rank its shard
    assert done.stderr.count("samples in") == 1  # only rank 0 prints


@pytest.mark.parametrize("argv, message", [
    (["--dataset", "custom"], "--dataset custom needs --num-classes"),
    (["--dataset", "pascal", "--num-classes", "20"], "pascal has 7 classes"),
    (["--dataset", "custom", "--num-classes", "4", "--flip-pairs", "1:9"], "flip pairs"),
    (["--input-size", "64"], "--input-size 64: expected H,W"),
    (["--resume", "/nonexistent/last.pth.tar", "--num-classes", "4", "--batch-size", "2"],
     "no such file (nothing to resume)")])
def test_usage_errors_are_one_line_and_exit_2(tmp_path, capsys, argv, message):
    data = make_dataset(tmp_path / "data", 4, train=2)
    code = train.main(argv + ["--data-dir", str(data), "--log-dir", str(tmp_path / "log"), "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("error: ") and message in err[-1]


def test_released_command_lines_pick_the_dataset_from_the_class_count():
    for count, name in (("20", "lip"), ("18", "atr"), ("7", "pascal"), ("5", "custom")):
        config = train.build_config(train.parse_args(["--num-classes", count]))
        assert config.spec.name == name and config.spec.num_classes == int(count)
    atr = train.build_config(train.parse_args(["--dataset", "atr"]))
    assert atr.flip_pairs == ((9, 10), (12, 13), (14, 15)) and atr.spec.input_size == (512, 512)
    legacy = train.build_config(train.parse_args(["--dataset", "atr", "--legacy-lip-pairs"]))
    assert legacy.flip_pairs == ((14, 15), (16, 17), (18, 19))
