"""Video inputs in folder mode: frame maps equal to those of the frames parsed as images, colour and
overlay videos at the source size and rate, a truncated file, and the resume."""
import json

import cv2
import numpy as np
import pytest
from PIL import Image

import corpus
from schp.data.catalog import DATASETS
from schp.utils.outputs import host_tag
from schp.utils.palette import class_colors

W, H = 64, 48


def make_video(path, frames, fps=10, fourcc="mp4v"):
    """A clip of the test photo drifting sideways, written with OpenCV."""
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), fps, (W, H))
    assert writer.isOpened()
    base = corpus.base_bgr(W, H)
    for i in range(frames):
        writer.write(np.roll(base, 3 * i, axis=1))
    writer.release()
    return path


def decode(path):
    capture = cv2.VideoCapture(str(path))
    frames = []
    while True:
        ok, frame = capture.read()
        if not ok:
            break
        frames.append(frame)
    fps = capture.get(cv2.CAP_PROP_FPS)
    capture.release()
    return frames, fps


def read_map(path):
    with Image.open(path) as image:
        assert image.mode == "P"
        return np.asarray(image)


def test_three_second_video_gives_frame_maps_equal_to_images_and_videos(small_model, run_cli, tmp_path):
    inputs, out = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    make_video(inputs / "clip.mp4", 30)  # 3 s at 10 fps
    frames, _ = decode(inputs / "clip.mp4")
    assert len(frames) == 30
    for i in (0, 15):  # the same frames as lossless images, parsed in the same run
        cv2.imwrite(str(inputs / f"still_{i:02d}.png"), frames[i])
    code, _, err = run_cli(*small_model, "--device", "cpu", "--input-dir", inputs,
                           "--output-dir", out, "--every", "15", "--overlay", "--logits",
                           "--summary", tmp_path / "run.json")
    assert code == 0, err
    assert sorted(p.name for p in (out / "clip").iterdir()) == [
        f"frame_{i:06d}.{ext}" for i in (0, 15) for ext in ("npy", "png")]
    colors = np.array(class_colors(DATASETS["pascal"].num_classes), dtype=np.uint8)[:, ::-1]  # BGR
    maps = []
    for i in (0, 15):
        labels = read_map(out / "clip" / f"frame_{i:06d}.png")
        assert np.array_equal(labels, read_map(out / f"still_{i:02d}.png"))
        assert np.array_equal(np.load(out / "clip" / f"frame_{i:06d}.npy"), np.load(out / f"still_{i:02d}.npy"))
        maps.append(labels)
    assert len(np.unique(maps[0])) > 1  # a real map, so the video comparison below means something

    parsing, fps = decode(out / "clip_parsing.mp4")
    assert len(parsing) == 2 and fps == pytest.approx(10 / 15, rel=1e-3)  # 10 fps / every 15: the source's 3 seconds
    assert all(f.shape == (H, W, 3) for f in parsing)
    for frame, labels in zip(parsing, maps):  # mp4v is lossy: close to the palette colours, not equal
        assert np.abs(frame.astype(int) - colors[labels]).mean() < 12
    overlay, fps = decode(out / "clip_overlay.mp4")
    assert len(overlay) == 2 and fps == pytest.approx(10 / 15, rel=1e-3)
    for frame, labels, source in zip(overlay, maps, (frames[0], frames[15])):
        blend = np.where(labels[:, :, None] == 0, source, (source.astype(int) + colors[labels]) / 2)
        assert np.abs(frame.astype(int) - blend).mean() < 12
    manifest = json.loads((tmp_path / "run.json").read_text())
    video = [entry for entry in manifest["inputs"] if entry["input"].endswith("clip.mp4")]
    assert video == [{"input": str(inputs / "clip.mp4"), "status": "processed", "reason": None,
                      "outputs": [str(out / "clip"), str(out / "clip_parsing.mp4"), str(out / "clip_overlay.mp4")],
                      "width": W, "height": H, "seconds": video[0]["seconds"]}]
    assert manifest["totals"]["inputs"] == 3

    code, _, err = run_cli("--model-restore", tmp_path / "gone.pth", "--input-dir", inputs, "--output-dir", out,
                           "--every", "15", "--overlay", "--logits")
    assert code == 0 and "0 processed, 3 skipped" in err  # all done: no model needed


def test_truncated_video_parses_what_decodes_then_resumes(small_model, run_cli, tmp_path):
    inputs, out = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    full = make_video(tmp_path / "full.avi", 10, fourcc="MJPG").read_bytes()
    (inputs / "clip.avi").write_bytes(full[:len(full) // 2])  # a copy cut short
    args = (*small_model, "--device", "cpu", "--input-dir", inputs,
            "--output-dir", out, "--every", "3")
    dead = 2 ** 22 + 1  # above Linux's largest pid: temporaries of a process of this host that is gone
    host = host_tag()
    (out / "clip").mkdir(parents=True)
    (out / "clip" / f".frame_000003.schp-tmp-{host}-{dead}.png").write_bytes(b"partial")
    (out / f".clip_parsing.schp-tmp-{host}-{dead}.mp4").write_bytes(b"partial")
    code, _, err = run_cli(*args)
    assert code == 1
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(f"error: {inputs / 'clip.avi'}: decoding stopped at frame ")
    done = sorted(p.name for p in (out / "clip").iterdir())
    assert done and done == [f"frame_{i:06d}.png" for i in range(0, 3 * len(done), 3)]
    assert sorted(p.name for p in out.iterdir()) == ["clip"]  # no video, and the stale temporaries are gone
    first = {name: (out / "clip" / name).stat().st_mtime_ns for name in done}

    (inputs / "clip.avi").write_bytes(full)  # the complete file arrives: the same command resumes
    code, _, err = run_cli(*args)
    assert code == 0, err
    assert sorted(p.name for p in (out / "clip").iterdir()) == [f"frame_{i:06d}.png" for i in (0, 3, 6, 9)]
    assert {name: (out / "clip" / name).stat().st_mtime_ns for name in done} == first  # not parsed again
    frames, fps = decode(out / "clip_parsing.mp4")
    assert len(frames) == 4 and fps == pytest.approx(10 / 3, rel=1e-3)


def test_unreadable_video_fails_alone(small_model, run_cli, tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    (inputs / "empty.mp4").write_bytes(b"")
    (inputs / "junk.webm").write_bytes(b"not a video at all" * 10)
    code, stdout, _ = run_cli("--input-dir", inputs, "--output-dir", tmp_path / "out", "--dry-run")
    assert code == 0 and [line.split("\t")[:2] for line in stdout.splitlines()] == [
        ["process", str(inputs / "empty.mp4")], ["process", str(inputs / "junk.webm")]]
    code, _, err = run_cli(*small_model, "--device", "cpu", "--input-dir", inputs,
                           "--output-dir", tmp_path / "out")
    assert code == 1
    assert f"error: {inputs / 'empty.mp4'}: empty file (0 bytes)" in err
    assert f"error: {inputs / 'junk.webm'}: cannot be opened as a video" in err
    assert "0 processed, 0 skipped, 2 failed of 2 inputs" in err
    assert run_cli("--input-dir", inputs, "--output-dir", tmp_path / "out", "--every", "0")[0] == 2
