"""train.py end to end on CPU with tiny coloured-shape datasets (64 x 64, the real ResNet-101 CE2P).

The runs are few and short: the released-format files, the closed-form lr, loading in the extractor
and in the released loader, resume == uninterrupted (through a SIGTERM mid-epoch), learning, bad data
(every file decoded), files that cannot be resumed, a full disk, a non-finite loss, torchrun.
"""
import json
import os
import signal
import subprocess
import sys
import threading
import time

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
    assert run_train(*args, "--log-dir", parts, "--stop-after", 1) == 0
    # resumed in a process of its own, stopped by SIGTERM in the epoch after the second (as a batch
    # scheduler stops a job): exit 130, the state of the last finished epoch kept, no temporary
    code, err = sigterm_after_epoch(1, *args, "--log-dir", parts, "--resume")
    assert code == 130, err
    assert "interrupted; continue with --resume" in err and "Traceback" not in err, err
    # no temporary beside them; the interrupted epoch's SCHP checkpoint is there only if the signal came
    # after it was complete (the signal lands in that epoch's step, its self-correction or its saving)
    assert set(files(parts)) - {"schp_2_checkpoint.pth.tar"} == {
        "args.json", "checkpoint_2.pth.tar", "curves.png", "last.pth.tar", "metrics.jsonl",
        "schp_1_checkpoint.pth.tar"}, files(parts)
    assert torch.load(parts / "last.pth.tar", map_location="cpu", weights_only=True)["epoch"] == 2
    assert len(metrics(parts)) == 2
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

    # evaluate.py reads the same label set from the checkpoint, and its mean IoU is the released formula
    # over the maps it scored (saved with --save-results: with the true crop centres they are the scored
    # ones) and the ground truth
    from schp.commands import evaluate
    assert evaluate.main(["--dataset", "custom", "--model-restore", str(whole / "schp_2_checkpoint.pth.tar"),
                          "--data-dir", str(data), "--split", "train", "--float-centers", "--quiet",
                          "--save-results", "--log-dir", str(tmp_path / "eval"),
                          "--summary", str(tmp_path / "eval.json")]) == 0
    scored = json.loads((tmp_path / "eval.json").read_text())
    confusion = np.zeros((4, 4))
    maps = {}
    for name in ("img_train_000", "img_train_001"):
        gt = np.array(Image.open(data / "train_segmentations" / f"{name}.png")).astype(int)
        pred = np.array(Image.open(tmp_path / "eval" / "sp_results" / f"{name}.png")).astype(int)
        maps[name] = pred, np.array(Image.open(tmp_path / "out" / f"{name}.png")).astype(int)
        np.add.at(confusion, (gt[gt != 255], pred[gt != 255]), 1)
    tp = np.diag(confusion)
    iou = tp / np.maximum(1, confusion.sum(0) + confusion.sum(1) - tp) * 100
    assert scored["labels"] == ["bg", "square", "disc", "box"] and scored["dataset"] == "custom"
    assert scored["mean_iou"] == pytest.approx(iou.mean(), abs=1e-9) and 0 < iou.mean() < 100
    # ...and those maps are the extractor's where the crop is the image itself (64 x 64 at the input size
    # 64 x 64). Elsewhere the released evaluator warps the crop's argmax back (nearest neighbour) where the
    # extractor warps the logits (bilinear) before its argmax, so the two may part at a class boundary:
    # 25 of the 4,608 pixels of the 64 x 72 image after this training on a Zen 5 CPU (AVX-512)
    evaluated, extracted = maps["img_train_000"]
    assert np.array_equal(evaluated, extracted)
    evaluated, extracted = maps["img_train_001"]
    assert evaluated.shape == extracted.shape == (64, 72) and (evaluated == extracted).mean() >= 0.97


def sigterm_after_epoch(epoch, *argv):
    """Run train.py in a process of its own; SIGTERM it once the line of `epoch` is out (the next epoch
    is then running). Returns (exit code, stderr). Same thread count as this process, so that its
    floating-point sums are those of the in-process runs."""
    env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()), PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *[str(a) for a in argv], *COMMON],
                            stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env)
    seen = []
    deadline = threading.Timer(600, proc.kill)  # the lines below wait on the process: bounded
    deadline.start()
    try:
        for line in proc.stderr:  # bounded: the process ends, at the latest when killed below
            seen.append(line)
            if line.startswith(f"epoch {epoch}:"):
                time.sleep(0.3)  # into the next epoch (its first step, on a fast machine its saving)
                proc.send_signal(signal.SIGTERM)
                break
        seen.append(proc.communicate(timeout=300)[1])
    finally:
        deadline.cancel()
        proc.kill()
    return proc.returncode, "".join(seen)


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
    assert code == 2  # a set-up error: found before any epoch
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert reason in lines[0] and (bad.stem in lines[0] or "train_id.txt" in lines[0])
    assert not log.exists()  # nothing started


def test_check_data_decodes_every_file_and_names_every_problem(tmp_path, capsys):
    """Each broken file of the split is one line naming it and its reason, found by decoding it as
    training does (a JPEG cut in half has a complete header), before any epoch; then exit 2 with a count."""
    from test_hostile import png_declaring

    data = make_dataset(tmp_path / "data", 4, train=9)
    images, labels = sorted((data / "train_images").iterdir()), sorted((data / "train_segmentations").iterdir())
    whole = images[0].read_bytes()
    images[0].write_bytes(whole[: len(whole) // 2])  # header intact, half the scan data
    images[1].write_text("<html>a page saved under an image's name</html>")
    png = labels[2].read_bytes()
    labels[2].write_bytes(png[: len(png) // 2])  # a cut label PNG
    png_declaring(labels[3], 20000, 20000)  # Pillow would stop on its bomb limit
    values = np.array(Image.open(labels[4]))
    values[5, 5] = 7
    Image.fromarray(values).save(labels[4])
    Image.open(labels[5]).resize((30, 30)).save(labels[5])
    labels[6].unlink()
    images[7].unlink()
    expected = {images[0]: "truncated JPEG", images[1]: "not a decodable image", labels[2]: "not a readable",
                labels[3]: "20000 x 20000 pixels", labels[4]: "label values 7 are not classes 0..3",
                labels[5]: "label is 30x30 but its image is", labels[6]: "no such label file",
                images[7]: "no such image"}
    log = tmp_path / "log"
    code = run_train("--dataset", "custom", "--num-classes", 4, "--data-dir", data, "--log-dir", log,
                     "--check-data")
    err = capsys.readouterr().err
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == len(expected) + 1 and "Traceback" not in err, err
    for path, reason in expected.items():
        named = [line for line in lines if f" {path}: " in line]
        assert len(named) == 1 and reason in named[0], (path, lines)
    assert lines[-1] == f"error: 8 problem(s) in the train split of {data}; nothing was trained"
    assert not log.exists()
    assert all(images[8].stem not in line for line in lines)  # the good sample is not refused


def test_check_data_passes_on_good_data(tmp_path, capsys):
    data = make_dataset(tmp_path / "data", 4, train=3)
    assert run_train("--dataset", "custom", "--num-classes", 4, "--data-dir", data, "--log-dir",
                     tmp_path / "log", "--check-data") == 0
    assert "3 samples" in capsys.readouterr().err and not (tmp_path / "log").exists()


@pytest.fixture
def not_resumable(pascal_run, tmp_path, checkpoints):
    """Files --resume must refuse, each with what the file is: (path, extra argv, words of the line)."""
    _, _, log = pascal_run
    cut = tmp_path / "cut.pth.tar"
    with open(log / "last.pth.tar", "rb") as f:
        cut.write_bytes(f.read(1 << 20))
    text = tmp_path / "notes.pth.tar"
    text.write_text("epoch 3 went well\n")
    model = "is a model checkpoint, not a training state: pass it as --init-from"
    return {
        "checkpoint_N": (log / "checkpoint_4.pth.tar", ["--dataset", "pascal"], model),
        "schp_N_checkpoint": (log / "schp_3_checkpoint.pth.tar", ["--dataset", "pascal"], model),
        "released .pth": (checkpoints("lip"), ["--dataset", "lip"], model),
        "another dataset": (log / "last.pth.tar", ["--dataset", "lip"],
                            "is a pascal training state (7 classes), but --dataset lip (20 classes)"),
        "another class count": (log / "last.pth.tar", ["--dataset", "custom", "--num-classes", "4"],
                                "is a pascal training state (7 classes), but --dataset custom (4 classes)"),
        "truncated": (cut, ["--dataset", "pascal"], "the file is truncated or not a PyTorch checkpoint"),
        "text": (text, ["--dataset", "pascal"], "not a PyTorch checkpoint (it is a text file)"),
    }


def test_a_file_that_is_not_a_resumable_state_is_one_line_and_leaves_no_log_folder(not_resumable, tmp_path,
                                                                                   capsys):
    data = make_dataset(tmp_path / "data", 4, train=2)
    log = tmp_path / "new" / "log"
    for case, (path, argv, words) in not_resumable.items():
        code = run_train(*argv, "--data-dir", data, "--log-dir", log, "--resume", path)
        err = capsys.readouterr().err
        lines = err.strip().splitlines()
        assert code == 2, (case, err)
        assert len(lines) == 1 and lines[0].startswith(f"error: --resume {path}") and words in lines[0], (case, err)
        assert not (tmp_path / "new").exists(), case


def test_a_failed_setup_leaves_no_log_folder_it_made(tmp_path, capsys):
    data = make_dataset(tmp_path / "data", 4, train=2)
    log = tmp_path / "new" / "log"
    code = train.main(["--dataset", "custom", "--num-classes", "4", "--data-dir", str(data), "--log-dir", str(log),
                       "--batch-size", "2", "--quiet", "--imagenet-pretrain", str(tmp_path / "missing.pth")])
    err = capsys.readouterr().err
    assert code == 2 and "--imagenet-pretrain" in err.strip().splitlines()[-1], err
    assert not (tmp_path / "new").exists()
    kept = tmp_path / "kept"
    kept.mkdir()  # a folder that was there before is the user's: left as it was
    assert train.main(["--dataset", "custom", "--num-classes", "4", "--data-dir", str(data), "--log-dir",
                       str(kept), "--batch-size", "2", "--quiet", "--imagenet-pretrain",
                       str(tmp_path / "missing.pth")]) == 2
    assert kept.is_dir() and not list(kept.iterdir())


SIGNAL_DURING_WRITE = """
import os, signal, sys, torch
from pathlib import Path
from schp.checkpoint import write_checkpoint
from schp.runs.loop import raise_keyboard_interrupt

class SignalWhilePickled:  # sends the signal from inside torch.save, at a known point
    def __reduce__(self):
        os.kill(os.getpid(), signal.SIGTERM)
        return (int, (7,))

signal.signal(signal.SIGTERM, raise_keyboard_interrupt)  # as train.py's entry point does
state = {"state_dict": {"w": torch.arange(1 << 20, dtype=torch.float32)}, "marker": SignalWhilePickled()}
try:
    write_checkpoint(state, Path(sys.argv[1]))
except KeyboardInterrupt:
    sys.exit(130)
"""


def test_a_stop_signal_during_a_checkpoint_write_waits_for_the_complete_file(tmp_path):
    """SIGTERM (train.py's handler: KeyboardInterrupt) arriving while a checkpoint is written: the file
    is completed and renamed, then the KeyboardInterrupt comes (train.py exits 130); an interrupt raised
    inside torch's zip writer would instead reach its C++ code mid-record ('unexpected pos'). In a
    fresh interpreter: the signal goes to the whole process, which here is only this scenario."""
    done = subprocess.run([sys.executable, "-c", SIGNAL_DURING_WRITE, str(tmp_path / "last.pth.tar")],
                          capture_output=True, text=True, timeout=120, cwd=ROOT,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert done.returncode == 130 and "Traceback" not in done.stderr, done.stderr
    assert files(tmp_path) == ["last.pth.tar"]  # complete, renamed, no temporary
    saved = torch.load(tmp_path / "last.pth.tar", map_location="cpu", weights_only=False)
    assert saved["marker"] == 7 and torch.equal(saved["state_dict"]["w"], torch.arange(1 << 20, dtype=torch.float32))


def test_a_full_disk_while_saving_a_checkpoint_is_one_line_and_exit_1(tmp_path):
    """On a real 20 MiB tmpfs when mounting is permitted (root), else under a 20 MiB file-size limit
    (EFBIG where a small disk gives ENOSPC), as tests/test_hostile.py does for export."""
    data = make_dataset(tmp_path / "data", 4, train=2)
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = os.geteuid() == 0 and subprocess.run(["mount", "-t", "tmpfs", "-o", "size=20m", "tmpfs", str(disk)],
                                                   capture_output=True).returncode == 0
    pre = "import runpy, sys; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')"
    if not mounted:
        pre = "import resource, signal; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); " \
              "resource.setrlimit(resource.RLIMIT_FSIZE, (20 << 20, 20 << 20)); " + pre
    log = disk / "log"
    try:
        done = subprocess.run([sys.executable, "-c", pre, str(ROOT / "train.py"), "--dataset", "custom",
                               "--num-classes", "4", "--data-dir", str(data), "--log-dir", str(log), "--epochs", "2",
                               "--eval-epochs", "1", "--warmup-epochs", "0", *COMMON], capture_output=True,
                              text=True, timeout=600, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)))
        left = sorted(p.name for p in log.iterdir())
    finally:
        if mounted:
            subprocess.run(["umount", str(disk)])
    assert done.returncode == 1, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in done.stderr, done.stderr
    reason = "No space left on device" if mounted else "File too large"
    assert errors[0].startswith(f"error: cannot write {log / 'checkpoint_1.pth.tar'}: {reason}"), errors
    assert left == ["args.json"]  # the checkpoint's temporary is gone; nothing else was due yet


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
