"""Nothing lost, nothing run: bad inputs, interruptions, write failures and huge images (issue 4)."""
import json
import os
import resource
import signal
import subprocess
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

import corpus
from conftest import EXTRACTOR, wait_until

CLI = EXTRACTOR


def expected_collisions(names):
    """Inputs refused because an earlier (sorted) input has the same stem: a.jpg, a.png -> a.png."""
    by_stem = defaultdict(list)
    for name in sorted(names):
        by_stem[Path(name).with_suffix("")].append(name)
    return {n for group in by_stem.values() for n in group[1:]}


def partial_files(folder):
    return [p for p in Path(folder).rglob("*") if ".schp-tmp-" in p.name]


def test_mixed_folder_gives_maps_for_good_files_and_one_line_per_bad_one(small_model, run_cli, tmp_path):
    inputs, out = tmp_path / "in", tmp_path / "out"
    kinds = corpus.make_mixed_folder(inputs)
    images = [n for n, k in kinds.items() if k != "not-an-image"]
    refused = expected_collisions(images)
    code, _, err = run_cli(*small_model, "--input-dir", inputs, "--output-dir", out)
    assert code == 1
    lines = err.strip().splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    for name in images:
        mentioned = [line for line in errors if line.startswith(f"error: {inputs / name}:")]
        if kinds[name] == "fail" or name in refused:
            assert len(mentioned) == 1, (name, errors)
            assert not (out / Path(name).with_suffix(".png")).exists() or name in refused
        else:
            assert not mentioned, mentioned
            labels = Image.open(out / Path(name).with_suffix(".png"))
            decoded = cv2.imread(str(inputs / name), cv2.IMREAD_COLOR)  # the orientation rule of imread
            assert labels.mode == "P" and labels.size == (decoded.shape[1], decoded.shape[0]), name
    failed = sum(kinds[n] == "fail" or n in refused for n in images)
    assert len(errors) == failed
    assert "skipping 1 file(s) that are not images" in err  # notes.txt; --quiet counts them in one line
    processed = sum(kinds[n] == "ok" for n in images if n not in refused)
    assert f"done: {processed} processed, 0 skipped, {failed} failed" in lines[-1]
    assert not partial_files(out) and not partial_files(inputs)


def test_exif_rotated_jpeg_is_parsed_upright(small_model, run_cli, tmp_path):
    (tmp_path / "in").mkdir()
    path = corpus.make_exif_jpg(tmp_path / "in", 6, name="exif_rot6.jpg")
    stored = corpus.stored_pixels(path)
    code, _, _ = run_cli(*small_model, "--input-dir", path.parent,
                         "--output-dir", tmp_path / "out")
    assert code == 0
    labels = Image.open(tmp_path / "out" / "exif_rot6.png")
    assert labels.size == (stored.shape[0], stored.shape[1])  # width and height swapped by orientation 6


def test_output_folder_inside_the_input_folder_is_not_read_back(small_model, run_cli, tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    corpus.make_good_jpg(inputs)
    args = (*small_model, "--input-dir", inputs, "--output-dir", inputs / "maps")
    assert run_cli(*args, "--recursive")[0] == 0
    code, _, err = run_cli(*args, "--recursive")
    assert code == 0 and "0 processed, 1 skipped, 0 failed of 1 inputs" in err
    code, _, err = run_cli(*small_model, "--input-dir", inputs, "--output-dir", inputs)
    assert code == 2 and "must differ" in err


def test_setup_errors_exit_2_before_any_work(checkpoints, run_cli, tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    corpus.make_good_jpg(inputs)
    code, _, err = run_cli("--model-restore", checkpoints("pascal"), "--input-dir", tmp_path / "nope",
                           "--output-dir", tmp_path / "o")
    assert code == 2 and "no such folder" in err
    (tmp_path / "file").write_text("x")
    code, _, err = run_cli("--model-restore", checkpoints("pascal"), "--input-dir", inputs,
                           "--output-dir", tmp_path / "file" / "out")
    assert code == 2 and "cannot write to" in err
    (tmp_path / "bad.pth").write_bytes(b"\x80\x02garbage")
    code, _, err = run_cli("--model-restore", tmp_path / "bad.pth", "--input-dir", inputs,
                           "--output-dir", tmp_path / "o2")
    assert code == 2 and "bad.pth" in err and len(err.strip().splitlines()) == 1
    assert not list((tmp_path / "o2").glob("*.png"))
    code, _, err = run_cli("--model-restore", checkpoints("lip"), "--input-dir", inputs,
                           "--output-dir", tmp_path / "o3")
    assert code == 2 and "looks like a lip checkpoint" in err


def test_stale_temporaries_of_dead_runs_are_removed_and_live_ones_kept(small_model, run_cli, tmp_path):
    inputs, out = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    out.mkdir()
    corpus.make_good_jpg(inputs)
    from schp.utils.outputs import host_tag
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = out / f".good.schp-tmp-{host_tag()}-{dead.pid}.png"
    stale.write_bytes(b"half a png")
    live = out / f".other.schp-tmp-{host_tag()}-{os.getpid()}.png"
    live.write_bytes(b"being written by a live process")
    assert run_cli(*small_model, "--input-dir", inputs, "--output-dir", out)[0] == 0
    assert not stale.exists() and live.exists()
    assert (out / "good.png").is_file()


def make_photos(folder: Path, count: int, size=(160, 120)):
    folder.mkdir(parents=True, exist_ok=True)
    base = corpus.base_bgr(*size)
    for i in range(count):
        cv2.imwrite(str(folder / f"img{i:02d}.png"), np.roll(base, 7 * i, axis=1))


def final_pngs(folder):
    """PNGs under their final names (pathlib's glob also matches the hidden temporaries)."""
    return sorted(p for p in Path(folder).glob("*.png") if not p.name.startswith("."))


def label_maps(folder):
    return {p.name: np.array(Image.open(p)) for p in final_pngs(folder)}


def feed_if_read(fifo: Path, data: bytes, proc) -> None:
    """Write `data` into a named pipe if a reader opens it before `proc` ends (run in a thread)."""
    fds = []

    def reader_waiting():
        try:
            fds.append(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))  # ENXIO until a reader opens it
            return True
        except OSError:
            return proc.poll() is not None

    wait_until(reader_waiting, 120)
    if not fds:
        return
    os.set_blocking(fds[0], True)
    try:
        os.write(fds[0], data)
    except BrokenPipeError:
        pass
    finally:
        os.close(fds[0])


@pytest.mark.parametrize("how", [signal.SIGINT, signal.SIGKILL])
def test_interrupted_run_leaves_no_partial_file_and_resumes_to_the_same_result(small_model, tmp_path, how):
    inputs, out, reference = tmp_path / "in", tmp_path / "out", tmp_path / "reference"
    make_photos(inputs, 6)
    # The last input is a named pipe, fed only after the signal: the run cannot end before it, however
    # fast the machine. It becomes an ordinary PNG for the resumed run.
    held = inputs / "img99.png"
    os.mkfifo(held)
    held_image = np.roll(corpus.base_bgr(160, 120), 50, axis=0)
    base = CLI + small_model + ["--input-dir", str(inputs), "--quiet", "--logits"]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    summary = tmp_path / "run.json"
    proc = subprocess.Popen(base + ["--output-dir", str(out), "--summary", str(summary)], stderr=subprocess.PIPE,
                            text=True, env=env)
    assert wait_until(lambda: len(final_pngs(out)) >= 1)
    proc.send_signal(how)
    start = time.monotonic()
    feeder = threading.Thread(target=feed_if_read, args=(held, cv2.imencode(".png", held_image)[1].tobytes(), proc))
    feeder.start()  # a worker may be reading the pipe already, or the run may stop before it does
    _, err = proc.communicate(timeout=60)
    feeder.join()
    held.unlink()
    cv2.imwrite(str(held), held_image)
    if how == signal.SIGINT:
        assert time.monotonic() - start < 10
        assert proc.returncode == 130, err
        assert "interrupted" in err and "run again to resume" in err
        assert not partial_files(out)
        manifest = json.loads(summary.read_text())  # written also when interrupted
        assert manifest["interrupted"] is True
        assert manifest["totals"]["processed"] + manifest["totals"]["not-run"] == 7
        assert manifest["totals"]["not-run"] >= 1
    done = {p.name for p in final_pngs(out)}
    assert 1 <= len(done) <= 6 and "img99.png" not in done
    for name in done:  # whatever carries a final name is complete
        assert np.array(Image.open(out / name)).shape == (120, 160)
        assert np.load(out / name.replace(".png", ".npy")).shape == (120, 160, 7)
    rerun = subprocess.run(base + ["--output-dir", str(out)], capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert f"{7 - len(done)} processed, {len(done)} skipped, 0 failed" in rerun.stderr
    assert not partial_files(out)
    whole = subprocess.run(base + ["--output-dir", str(reference)], capture_output=True, text=True, timeout=300)
    assert whole.returncode == 0
    resumed, uninterrupted = label_maps(out), label_maps(reference)
    assert resumed.keys() == uninterrupted.keys() and len(resumed) == 7
    assert all(np.array_equal(resumed[k], uninterrupted[k]) for k in resumed)


def _limit_file_size():
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG, like a full disk
    resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))


def test_write_failure_is_reported_in_one_line_and_leaves_no_partial_file(small_model, tmp_path):
    inputs, out = tmp_path / "in", tmp_path / "out"
    make_photos(inputs, 2, size=(320, 240))  # logits: 320*240*7*4 = 2.1 MB > the 200 kB limit
    result = subprocess.run(CLI + small_model + ["--input-dir", str(inputs),
                                   "--output-dir", str(out), "--quiet", "--logits"],
                            capture_output=True, text=True, preexec_fn=_limit_file_size, timeout=300,
                            env=dict(os.environ, SCHP_CACHE_DIR=""))
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 2, result.stderr
    for line, stem in zip(errors, ("img00", "img01")):
        assert line.startswith(f"error: {inputs / stem}.png: cannot write {out / stem}.npy: File too large")
    assert "Traceback" not in result.stderr
    assert not list(out.glob("*.npy")) and not partial_files(out)


def test_hundred_megapixel_image_stays_under_3_gib(checkpoints, tmp_path):
    inputs, out = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    image = cv2.resize(corpus.base_bgr(), (10000, 10000), interpolation=cv2.INTER_NEAREST)
    cv2.imwrite(str(inputs / "huge.jpg"), image, [cv2.IMWRITE_JPEG_QUALITY, 80])
    del image
    code = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(r.returncode)")
    result = subprocess.run([sys.executable, "-c", code] + CLI + [
        "--model-restore", str(checkpoints("pascal")), "--input-dir", str(inputs), "--output-dir", str(out),
        "--quiet"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    peak_gib = int(result.stdout.split()[-1]) / 2**20
    assert peak_gib < 3.0, f"peak RSS {peak_gib:.2f} GiB"
    Image.MAX_IMAGE_PIXELS = None  # our own 100 MP output, not a decompression bomb
    with Image.open(out / "huge.png") as labels:
        assert labels.size == (10000, 10000) and labels.mode == "P"
