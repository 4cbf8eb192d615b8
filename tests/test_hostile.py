"""Every front door keeps the extractor's promises (issue 20): one size limit for every reader, signals
and full disks in export, non-finite detections, failed set-ups, the API's input rules, a stop signal
during the workers' shutdown, a dead decoding worker, videos, and --summary under a file.

Every input is made here; the command lines run for real (in-process where that is enough).
"""
import json
import os
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest

from conftest import EXTRACTOR, ROOT, wait_until

PY = sys.executable


def png_declaring(path: Path, width: int, height: int) -> Path:
    """A grey PNG whose header declares width x height (one tiny row of data: never decodable whole)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    data = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    path.write_bytes(data)
    return path


def jpeg_declaring(path: Path, width: int, height: int, app_bytes: int = 0) -> Path:
    """A JPEG header with an APP1 segment of `app_bytes` (beyond the first 64 KiB when large) and a
    start-of-frame declaring width x height, then nothing decodable."""
    out = b"\xff\xd8"
    while app_bytes > 0:
        n = min(app_bytes, 65533)
        out += b"\xff\xe1" + struct.pack(">H", n + 2) + b"\0" * n
        app_bytes -= n
    out += b"\xff\xc0" + struct.pack(">HBHHB", 11, 8, height, width, 1) + b"\x01\x11\x00"
    path.write_bytes(out + b"\xff\xd9")
    return path


def write_image(path: Path, seed: int = 0, size=(48, 64)) -> Path:
    rng = np.random.default_rng(seed)
    cv2.imwrite(str(path), rng.integers(0, 255, (*size, 3), dtype=np.uint8))
    return path


def temporaries(folder: Path):
    return sorted(p.name for p in Path(folder).rglob(".*") if "tmp" in p.name)


# ----------------------------------------------------------------------------- item 2: one size limit
def test_every_reader_refuses_a_declared_bomb_from_its_header(tmp_path):
    from schp.data.decode import ImageError, check_image_file, read_image
    from schp.data.labelled import read_label
    from schp.multi_person.evaluation import InputError, read_map
    from schp.multi_person.instances import InstanceError, read_instance_png

    bomb = png_declaring(tmp_path / "bomb.png", 20000, 20000)
    with pytest.raises(ValueError, match="20000 x 20000 pixels .* above --max-pixels"):
        read_label(bomb)
    with pytest.raises(InputError, match="above --max-pixels"):
        read_map(bomb)
    with pytest.raises(InstanceError, match="above --max-pixels"):
        read_instance_png(bomb)
    with pytest.raises(ImageError, match="above --max-pixels"):
        read_image(bomb)  # the default limit, for evaluation's images too
    # a JPEG whose frame header sits after 200 KiB of metadata: found by walking the segments
    deep = jpeg_declaring(tmp_path / "deep.jpg", 30000, 30000, app_bytes=200_000)
    with pytest.raises(ImageError, match="30000 x 30000"):
        read_image(deep)
    side = png_declaring(tmp_path / "side.png", 40000, 1)
    with pytest.raises(ImageError, match="32766"):
        check_image_file(side)


def test_a_huge_regular_file_is_refused_before_it_is_read(tmp_path, monkeypatch):
    from schp.data.decode import ImageError, read_image

    huge = tmp_path / "huge.png"
    png_declaring(huge, 10, 10)
    with open(huge, "r+b") as f:  # sparse: 3 GiB on paper, nothing on disk
        f.truncate(3 << 30)
    read = []
    monkeypatch.setattr(Path, "read_bytes", lambda self: read.append(self) or b"")
    with pytest.raises(ImageError, match="larger than any image"):
        read_image(huge, max_pixels=1000)
    assert not read


def test_evaluate_scores_without_an_oversized_label_and_writes_the_summary(tmp_path):
    from schp.commands import evaluate

    data, pred = tmp_path / "data", tmp_path / "pred"
    (data / "val_segmentations").mkdir(parents=True)
    pred.mkdir()
    (data / "val_id.txt").write_text("good\nbomb\n")
    label = np.zeros((6, 8), np.uint8)
    label[2:4, 2:6] = 1
    cv2.imwrite(str(data / "val_segmentations" / "good.png"), label)
    cv2.imwrite(str(pred / "good.png"), label)
    png_declaring(data / "val_segmentations" / "bomb.png", 20000, 20000)
    cv2.imwrite(str(pred / "bomb.png"), label)
    summary = tmp_path / "metrics.json"
    code = evaluate.main(["--dataset", "lip", "--data-dir", str(data), "--pred-dir", str(pred),
                          "--summary", str(summary), "--quiet"])
    assert code == 1
    metrics = json.loads(summary.read_text())
    assert metrics["images"] == 1
    assert [Path(f["file"]).name for f in metrics["failed"]] == ["bomb.png"]
    assert "above --max-pixels" in metrics["failed"][0]["reason"]
    assert metrics["pixel_accuracy"] == 100.0 and metrics["iou"][:2] == [100.0, 100.0]  # the good image alone


# ----------------------------------------------------------------------------- item 4: export
def _export(tmp_path, model_args, output, *extra, **popen):
    return subprocess.Popen([PY, str(ROOT / "export.py"), *model_args, "--output", str(output), "--no-verify", *extra],
                            stderr=subprocess.PIPE, text=True, cwd=tmp_path, **popen)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_export_on_a_stop_signal_exits_130_and_leaves_no_temporary(tmp_path, small_model, signum):
    out = tmp_path / "out"
    out.mkdir()
    proc = _export(tmp_path, small_model, out / "m.pt", "--format", "torchscript")
    try:
        line = proc.stderr.readline()  # "exporting ...": the network is being built and traced
        assert line.startswith("exporting"), line
        time.sleep(0.5)
        proc.send_signal(signum)
        err = proc.communicate(timeout=120)[1]
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    assert os.listdir(out) == []


def test_export_on_a_full_disk_is_one_line_and_exit_1(tmp_path, small_model):
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = os.geteuid() == 0 and subprocess.run(["mount", "-t", "tmpfs", "-o", "size=20m", "tmpfs", str(disk)],
                                                   capture_output=True).returncode == 0
    try:
        if mounted:
            proc = _export(tmp_path, small_model, disk / "m.pt", "--format", "torchscript")
        else:  # a file-size limit gives EFBIG where a small disk gives ENOSPC
            pre = "import resource, signal; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); " \
                  "resource.setrlimit(resource.RLIMIT_FSIZE, (20 << 20, 20 << 20))"
            proc = subprocess.Popen([PY, "-c", pre + "; import runpy, sys; sys.argv = sys.argv[1:]; "
                                     "runpy.run_path(sys.argv[0], run_name='__main__')", str(ROOT / "export.py"),
                                     *small_model, "--output", str(disk / "m.pt"), "--no-verify", "--format",
                                     "torchscript"],
                                    stderr=subprocess.PIPE, text=True)
        err = proc.communicate(timeout=300)[1]
        left = os.listdir(disk)
    finally:
        if mounted:
            subprocess.run(["umount", str(disk)])
    assert proc.returncode == 1, err
    lines = [ln for ln in err.splitlines() if not ln.startswith("exporting")]
    assert len(lines) == 1 and lines[0].startswith("error: cannot write"), err
    assert left == []


# ----------------------------------------------------------------------------- item 5: detections
def test_non_finite_detections_are_refused_before_nms(tmp_path):
    pytest.importorskip("pycocotools")
    import torch
    from pycocotools import mask as mask_util
    from schp.multi_person.instances import Detectron2FileSource, InstanceError

    image = np.zeros((20, 30, 3), np.uint8)
    mask = np.zeros((20, 30), np.uint8, order="F")
    mask[2:10, 3:12] = 1
    rle = mask_util.encode(mask)
    rle["counts"] = rle["counts"].decode("ascii")

    def source(score, box):
        path = tmp_path / f"pred-{len(os.listdir(tmp_path))}.pth"
        good = {"bbox": [3, 2, 9, 8], "score": 0.9, "segmentation": dict(rle)}
        bad = {"bbox": box, "score": score, "segmentation": dict(rle)}
        torch.save([{"image_id": 1, "instances": [bad, good]}], path)
        return Detectron2FileSource(path, names=["a.jpg"])

    assert len(source(0.8, [3, 2, 9, 8]).instances(image, Path("a.jpg"))) == 2
    for score, box in ((float("nan"), [3, 2, 9, 8]), (float("inf"), [3, 2, 9, 8]), (0.8, [3, float("inf"), 9, 8]),
                       (0.8, [float("nan"), 2, 9, 8])):
        with pytest.raises(InstanceError, match="detection 1 .*not a finite number"):
            source(score, box).instances(image, Path("a.jpg"))


# ----------------------------------------------------------------------------- item 6: failed set-up
def test_a_failed_multi_person_setup_leaves_no_output_folder(tmp_path, capsys):
    pytest.importorskip("pycocotools")
    from schp.commands import multi_person

    photos = tmp_path / "photos"
    photos.mkdir()
    write_image(photos / "a.jpg")
    bad = tmp_path / "preds.pth"
    bad.write_bytes(b"not a predictions file")
    out = tmp_path / "deep" / "out"
    code = multi_person.main(["--input-dir", str(photos), "--output-dir", str(out),
                              "--instances", "detectron2", str(bad), "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert not (tmp_path / "deep").exists()


# ----------------------------------------------------------------------------- item 7: the API
def test_the_api_applies_the_command_lines_size_rules(checkpoints):
    from PIL import Image
    from schp.api import SCHP, to_bgr
    from schp.errors import ParameterError

    with pytest.raises(ValueError, match="a side longer than 32766 pixels"):
        to_bgr(np.zeros((1, 40000, 3), np.uint8), "bgr")
    with pytest.raises(ParameterError, match="32766"):
        to_bgr(Image.new("RGB", (1, 40000)))
    with pytest.raises(ParameterError, match="above --max-pixels"):
        to_bgr(np.lib.stride_tricks.as_strided(np.zeros(1, np.uint8), (20000, 20000), (0, 0)))
    model = SCHP("lip", checkpoint=checkpoints("lip"), device="cpu")
    with pytest.raises(ParameterError, match="32766"):
        model.parse(np.zeros((1, 40000), np.uint8))


# ----------------------------------------------------------------------------- item 8: a held stop signal
SHUTDOWN_SIGNAL = """
import json, os, signal, sys
from pathlib import Path
import schp.runs.workers as workers
from schp.runs.extract import parse_folder
photos, out, checkpoint = map(Path, sys.argv[1:4])
real, sent = workers.stop_workers, []

def stop_with_a_signal(batches):  # the signal lands while the workers are being shut down
    shutdown = batches._shutdown_workers

    def late():  # once: torch calls it again when the iterator is collected
        if not sent:
            sent.append(os.kill(os.getpid(), signal.SIGINT))
        shutdown()
    batches._shutdown_workers = late
    return real(batches)

workers.stop_workers = stop_with_a_signal
report = parse_folder(photos, out, dataset="custom", checkpoint=checkpoint, device="cpu", num_workers=1,
                      backend="torch", summary=out.parent / "run.json")
print(json.dumps({"interrupted": report.interrupted, "code": report.exit_code()}))
"""


def test_a_stop_signal_during_the_workers_shutdown_is_not_lost(tmp_path, small_model):
    """In a fresh interpreter (the signal state of earlier in-process tests must not matter)."""
    photos = tmp_path / "photos"
    photos.mkdir()
    write_image(photos / "0.jpg")
    done = subprocess.run([sys.executable, "-c", "import sys; sys.path.insert(0, %r)\n" % str(ROOT) + SHUTDOWN_SIGNAL,
                           str(photos), str(tmp_path / "out"), small_model[-1]],
                          capture_output=True, text=True, timeout=300, env=dict(os.environ, SCHP_BACKEND="torch"))
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["interrupted"] and report["code"] == 130, done.stderr
    assert json.loads((tmp_path / "run.json").read_text())["interrupted"] is True


# ----------------------------------------------------------------------------- item 9: a dead worker
def _children(pid: int):
    kids = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            kids += [int(k) for k in (task / "children").read_text().split()]
        except OSError:
            pass
    return kids


def _holding(pid: int, target: Path) -> bool:
    try:
        return any(os.readlink(f) == str(target) for f in Path(f"/proc/{pid}/fd").iterdir())
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_killed_decoding_worker_loses_only_its_input(tmp_path, small_model):
    photos = tmp_path / "photos"
    photos.mkdir()
    write_image(photos / "1.jpg")  # after the hung input: decoded by the new pool
    hang = photos / "0-hang.png"  # a FIFO: its worker waits on it, so we know which one to kill
    os.mkfifo(hang)
    out = tmp_path / "out"
    proc = subprocess.Popen(EXTRACTOR + small_model + ["--input-dir", str(photos), "--output-dir", str(out),
                                                       "--num-workers", "2", "--device", "cpu", "--quiet"],
                            stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, SCHP_BACKEND="torch"))
    writer = None
    try:
        def opened():
            nonlocal writer
            try:
                writer = os.open(hang, os.O_WRONLY | os.O_NONBLOCK)  # succeeds once a worker reads it
                return True
            except OSError:
                return proc.poll() is not None
        assert wait_until(opened, timeout=120) and writer is not None
        victim = []
        assert wait_until(lambda: victim.extend(p for p in _children(proc.pid) if _holding(p, hang)) or victim,
                          timeout=30)
        os.kill(victim[0], signal.SIGKILL)
        err = proc.communicate(timeout=120)[1]
    finally:
        proc.kill()
        if writer is not None:
            os.close(writer)
    assert proc.returncode == 1, err
    failed = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(failed) == 1 and "0-hang.png" in failed[0] and "decoding worker died" in failed[0], err
    assert "input pipeline failed" not in err
    assert sorted(p.name for p in out.glob("*.png")) == ["1.png"]


# ----------------------------------------------------------------------------- item 10: videos, --summary
def test_undecodable_and_oversized_videos_leave_no_folder_and_no_opencv_warning(tmp_path, small_model):
    photos = tmp_path / "in"
    photos.mkdir()
    (photos / "junk.mp4").write_bytes(os.urandom(4000))
    writer = cv2.VideoWriter(str(photos / "big.avi"), cv2.VideoWriter_fourcc(*"MJPG"), 5, (64, 48))
    for k in range(3):
        writer.write(np.full((48, 64, 3), 40 * k, np.uint8))
    writer.release()
    out = tmp_path / "out"
    done = subprocess.run(EXTRACTOR + small_model + ["--input-dir", str(photos), "--output-dir", str(out), "--quiet",
                                                     "--max-pixels", "1000"], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, SCHP_BACKEND="torch"))
    assert done.returncode == 1, done.stderr
    assert "WARN" not in done.stderr and "VIDEOIO" not in done.stderr, done.stderr
    assert "big.avi: frames of 64 x 48 pixels" in done.stderr
    assert not (out / "big").exists() and not (out / "junk").exists()


def test_summary_under_a_file_is_a_setup_error_in_every_command(tmp_path, capsys):
    from schp.commands import evaluate, extract, multi_person
    from schp.errors import SetupError
    from schp.runs.extract import check_summary

    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(SetupError, match="is a file"):
        check_summary(blocker / "run.json")
    (tmp_path / "in").mkdir()
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "val_id.txt").write_text("a\n")
    runs = {
        "extract": lambda: extract.main(["--input-dir", str(tmp_path / "in"), "--output-dir", str(tmp_path / "o1"),
                                         "--summary", str(blocker / "run.json")]),
        "multi_person": lambda: multi_person.main(["--input-dir", str(tmp_path / "in"), "--output-dir",
                                                   str(tmp_path / "o2"), "--summary", str(blocker / "run.json")]),
        "evaluate": lambda: evaluate.main(["--data-dir", str(tmp_path / "data"), "--pred-dir", str(tmp_path / "in"),
                                           "--summary", str(blocker / "run.json")]),
    }
    for name, call in runs.items():
        code = call()
        err = capsys.readouterr().err
        assert code == 2, (name, err)
        assert f"--summary {blocker / 'run.json'}" in err and "is a file" in err, (name, err)
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


def test_a_stop_signal_once_the_outcome_is_decided_is_not_a_death_by_signal():
    """The commands' entry point: a Ctrl-C or SIGTERM landing as main() ends (after its handlers are
    restored, as the second of a double Ctrl-C can) gives 130 or main's code, never -2 / -15."""
    for signum in (signal.SIGINT, signal.SIGTERM):
        script = ("import os, signal, sys\n"
                  f"sys.path.insert(0, {str(ROOT)!r})\n"
                  "from schp.commands.console import exit_with\n"
                  "def main():\n"
                  f"    os.kill(os.getpid(), {int(signum)})\n"
                  "    return 0\n"
                  "exit_with(main)\n")
        done = subprocess.run([PY, "-c", script], capture_output=True, text=True, timeout=60)
        assert done.returncode in (0, 130) and "Traceback" not in done.stderr, (signum, done.returncode, done.stderr)
    for shim in ("simple_extractor.py", "multi_person.py", "evaluate.py", "export.py", "train.py"):
        assert "exit_with(main)" in (ROOT / shim).read_text(), shim
