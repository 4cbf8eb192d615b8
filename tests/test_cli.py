"""The command line for pipelines and people: legend, dry run, shards, manifest, overlay, recursion."""
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import corpus
from conftest import ROOT
from schp.data.catalog import DATASETS
from schp.utils.palette import class_colors


def photos(folder, names):
    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.roll(corpus.base_bgr(40, 30)[:, :, ::-1], 3 * i, axis=1)).save(folder / name)
    return folder


def test_original_command_line_is_accepted_as_written(checkpoints, tmp_path):
    inputs = photos(tmp_path / "in", ["a.jpg"])
    result = subprocess.run([sys.executable, str(ROOT / "simple_extractor.py"), "--dataset", "pascal",
                             "--model-restore", str(checkpoints("pascal")), "--gpu", "0",
                             "--input-dir", str(inputs), "--output-dir", str(tmp_path / "out"), "--logits"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "out" / "a.png").is_file() and (tmp_path / "out" / "a.npy").is_file()
    assert result.stdout == ""  # messages and progress go to stderr


@pytest.mark.parametrize("dataset", sorted(DATASETS))
def test_legend_lists_every_class_with_its_colour(run_cli, dataset):
    code, out, _ = run_cli("--dataset", dataset, "--list-labels")
    assert code == 0
    spec = DATASETS[dataset]
    lines = out.strip().splitlines()[1:]
    assert len(lines) == spec.num_classes
    for i, (line, name, rgb) in enumerate(zip(lines, spec.labels, class_colors(spec.num_classes))):
        assert line.split()[0] == str(i) and line.endswith(name)
        assert f"#{rgb[0]:02x}{rgb[1]:02x}{rgb[2]:02x}" in line
    assert run_cli("--dataset", dataset, "--legend")[1] == out


def test_dry_run_lists_work_without_loading_the_model(run_cli, tmp_path):
    inputs = photos(tmp_path / "in", ["a.jpg", "b.png"])
    out = tmp_path / "out"
    out.mkdir()
    (out / "a.png").write_bytes(b"done before")
    code, stdout, _ = run_cli("--model-restore", tmp_path / "no-such.pth", "--input-dir", inputs,
                              "--output-dir", out, "--dry-run", "--logits")
    assert code == 0
    rows = [line.split("\t") for line in stdout.strip().splitlines()]
    assert rows == [["process", str(inputs / "a.jpg"), str(out / "a.png"), str(out / "a.npy")],
                    ["process", str(inputs / "b.png"), str(out / "b.png"), str(out / "b.npy")]]
    code, stdout, _ = run_cli("--model-restore", tmp_path / "no-such.pth", "--input-dir", inputs,
                              "--output-dir", out, "--dry-run")
    assert [line.split("\t")[0] for line in stdout.strip().splitlines()] == ["skip", "process"]
    assert sorted(p.name for p in out.iterdir()) == ["a.png"]  # nothing written


def test_shards_cover_every_input_exactly_once(run_cli, tmp_path):
    names = [f"img{i:02d}.jpg" for i in range(11)]
    inputs = photos(tmp_path / "in", names)
    seen = []
    for i in range(1, 5):
        code, stdout, _ = run_cli("--input-dir", inputs, "--output-dir", tmp_path / "out", "--dry-run",
                                  "--shard", f"{i}/4")
        assert code == 0
        seen += [line.split("\t")[1] for line in stdout.strip().splitlines()]
    assert sorted(seen) == [str(inputs / n) for n in names]
    for bad in ("0/4", "5/4", "x", "1/0"):
        assert run_cli("--input-dir", inputs, "--output-dir", tmp_path / "o", "--shard", bad)[0] == 2


def test_manifest_records_every_input_and_the_run(small_model, run_cli, tmp_path):
    inputs = photos(tmp_path / "in", ["a.jpg", "b.png"])
    (inputs / "broken.jpg").write_bytes(b"")
    out = tmp_path / "out"
    summary = tmp_path / "report" / "run.json"
    code, _, _ = run_cli(*small_model, "--input-dir", inputs, "--output-dir", out, "--summary", summary)
    assert code == 1
    manifest = json.loads(summary.read_text())
    assert manifest["totals"] == {"processed": 2, "skipped": 0, "failed": 1, "not-run": 0, "inputs": 3}
    assert manifest["dataset"] == "custom" and manifest["device"] == "cpu"
    assert manifest["precision"] == "fp32" and manifest["checkpoint"] == small_model[-1]
    assert {"python", "torch", "opencv", "numpy"} <= manifest["versions"].keys()
    by_input = {entry["input"]: entry for entry in manifest["inputs"]}
    a = by_input[str(inputs / "a.jpg")]
    assert a["status"] == "processed" and a["outputs"] == [str(out / "a.png")]
    assert (a["width"], a["height"]) == (40, 30) and a["seconds"] > 0
    broken = by_input[str(inputs / "broken.jpg")]
    assert broken["status"] == "failed" and "empty file" in broken["reason"]
    code, _, _ = run_cli(*small_model, "--input-dir", inputs, "--output-dir", out, "--summary", summary)
    statuses = [e["status"] for e in json.loads(summary.read_text())["inputs"]]
    assert sorted(statuses) == ["failed", "skipped", "skipped"]


def test_overlay_blends_the_colour_map_over_the_image(checkpoints, run_cli, tmp_path):
    inputs = photos(tmp_path / "in", ["a.png"])
    code, _, _ = run_cli("--model-restore", checkpoints("pascal"), "--input-dir", inputs,
                         "--output-dir", tmp_path / "out", "--overlay")
    assert code == 0
    overlay = np.array(Image.open(tmp_path / "out" / "a_overlay.jpg").convert("RGB")).astype(int)
    labels = np.array(Image.open(tmp_path / "out" / "a.png"))
    image = np.array(Image.open(inputs / "a.png").convert("RGB")).astype(int)
    colors = np.array(class_colors(7))
    assert overlay.shape == image.shape
    person = labels > 0
    assert person.any()
    blended = (image + colors[labels]) / 2
    assert np.abs(overlay[person] - blended[person]).mean() < 12  # JPEG quality 90
    assert np.abs(overlay[~person] - image[~person]).mean() < 12


def test_recursive_mode_mirrors_subfolders(small_model, run_cli, tmp_path):
    inputs = photos(tmp_path / "in", ["top.jpg", "x/one.jpg", "x/y/two.png"])
    code, _, err = run_cli(*small_model, "--input-dir", inputs,
                           "--output-dir", tmp_path / "out", "--recursive")
    assert code == 0, err
    written = sorted(str(p.relative_to(tmp_path / "out")) for p in (tmp_path / "out").rglob("*.png"))
    assert written == ["top.png", "x/one.png", "x/y/two.png"]
    code, _, err = run_cli(*small_model, "--input-dir", inputs, "--output-dir", tmp_path / "flat")
    assert code == 0 and sorted(p.name for p in (tmp_path / "flat").iterdir()) == ["top.png"]


def test_quiet_hides_the_progress_bar_but_not_errors(small_model, tmp_path):
    inputs = photos(tmp_path / "in", ["a.jpg"])
    (inputs / "bad.png").write_text("not a png")
    base = [sys.executable, str(ROOT / "simple_extractor.py"), *small_model, "--input-dir", str(inputs)]
    loud = subprocess.run(base + ["--output-dir", str(tmp_path / "o1")], capture_output=True, text=True)
    quiet = subprocess.run(base + ["--output-dir", str(tmp_path / "o2"), "--quiet"], capture_output=True,
                           text=True)
    assert loud.returncode == quiet.returncode == 1
    assert "img/s" in loud.stderr or "it/s" in loud.stderr or "%|" in loud.stderr
    assert "%|" not in quiet.stderr
    assert quiet.stderr.count("error: ") == 1 and "bad.png" in quiet.stderr
    assert quiet.stderr.strip().splitlines()[-1].startswith("done: 1 processed, 0 skipped, 1 failed")


def test_device_choice_follows_the_original_gpu_option():
    import torch

    from schp.errors import SCHPWarning
    from schp.inference import select_device

    assert select_device("auto", "None") == torch.device("cpu")
    assert select_device("cpu", "0") == torch.device("cpu")
    if not torch.cuda.is_available():
        with pytest.warns(SCHPWarning, match="no CUDA device"):
            assert select_device("auto", "0") == torch.device("cpu")  # no CUDA: the CPU, not a crash
        assert select_device("auto", None) == torch.device("cpu")
        with pytest.raises(ValueError, match="CUDA is not available"):
            select_device("cuda", None)
    else:
        assert select_device("auto", "0") == torch.device("cuda:0")


def test_cuda_device_without_cuda_is_a_setup_error(small_model, run_cli, tmp_path):
    import torch

    inputs = photos(tmp_path / "in", ["a.jpg"])
    code, _, err = run_cli(*small_model, "--input-dir", inputs, "--output-dir", tmp_path / "out", "--gpu", "None")
    assert code == 0 and (tmp_path / "out" / "a.png").is_file()
    if not torch.cuda.is_available():
        code, _, err = run_cli(*small_model, "--input-dir", inputs,
                               "--output-dir", tmp_path / "out2", "--device", "cuda")
        assert code == 2 and "CUDA is not available" in err
