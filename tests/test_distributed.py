"""torchrun: two CPU processes write the files of a single-process run, and one merged manifest."""
import json
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch

import corpus
from conftest import ROOT
from schp.distributed import Rank, from_environment


def test_shares_are_the_shards_and_merge_restores_the_order():
    items = list(range(11))
    ranks = [Rank(r, 3, r) for r in range(3)]
    shares = [rank.share(items) for rank in ranks]
    assert shares == [items[0::3], items[1::3], items[2::3]]  # as --shard 1/3, 2/3, 3/3
    assert ranks[0].merge(shares) == items
    assert ranks[0].merge([[0], [], []]) == [0]


def test_environment_of_torchrun(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert from_environment() is None
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert from_environment() is None  # torchrun --nproc-per-node 1: a plain run
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "5")
    with pytest.raises(ValueError, match="RANK=5"):
        from_environment()
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    rank = from_environment()
    assert (rank.rank, rank.world_size, rank.local_rank, rank.is_main) == (3, 4, 1, False)
    assert rank.device("cpu", None) == "cpu" and rank.device("cuda:0", None) == "cuda:0"
    assert rank.local_world_size == 4 and rank.backend(torch.device("cpu")) == "gloo"
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert from_environment().local_world_size == 2


def files(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_torchrun_two_processes_equal_one_process(small_model, run_cli, tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    for i, (w, h) in enumerate([(64, 48), (48, 64)]):
        cv2.imwrite(str(inputs / f"img{i}.jpg"), np.roll(corpus.base_bgr(w, h), 4 * i, axis=1))
    (inputs / "broken.jpg").write_bytes(b"")  # fails on whichever rank takes it
    writer = cv2.VideoWriter(str(inputs / "clip.mp4"), cv2.VideoWriter_fourcc(*"mp4v"), 10, (64, 48))
    for i in range(3):
        writer.write(np.roll(corpus.base_bgr(64, 48), 5 * i, axis=0))
    writer.release()
    common = [*small_model, "--device", "cpu", "--input-dir", inputs,
              "--every", "3", "--logits"]

    code, _, err = run_cli(*common, "--output-dir", tmp_path / "one", "--summary", tmp_path / "one.json")
    assert code == 1 and "3 processed, 0 skipped, 1 failed of 4 inputs" in err

    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    # CPU float sums depend on the thread count: give each rank this process's (torchrun would set 1)
    env["OMP_NUM_THREADS"] = str(torch.get_num_threads())
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         str(ROOT / "simple_extractor.py"), *map(str, common), "--output-dir", str(tmp_path / "two"),
         "--summary", str(tmp_path / "two.json"), "--quiet"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 1, result.stderr  # torchrun's code when the run's is not 0
    lines = result.stderr.splitlines()
    summaries = [line for line in lines if line.startswith("done:")]
    assert len(summaries) == 1 and "3 processed, 0 skipped, 1 failed of 4 inputs" in summaries[0]  # combined
    assert sum(line == f"error: {inputs / 'broken.jpg'}: empty file (0 bytes)" for line in lines) == 1

    one, two = files(tmp_path / "one"), files(tmp_path / "two")
    assert sorted(one) == sorted(two) == ["clip/frame_000000.npy", "clip/frame_000000.png", "clip_parsing.mp4",
                                          "img0.npy", "img0.png", "img1.npy", "img1.png"]
    for name in one:
        if name.endswith(".mp4"):  # same frames through the same encoder; compare the decoded pictures
            assert [f.tobytes() for f in read_video(tmp_path / "one" / name)] == \
                   [f.tobytes() for f in read_video(tmp_path / "two" / name)]
        else:
            assert one[name] == two[name], name

    assert sorted(p.name for p in tmp_path.glob("*.json")) == ["one.json", "two.json"]  # one manifest
    single, merged = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    assert merged["totals"] == single["totals"] == {"processed": 3, "skipped": 0, "failed": 1, "not-run": 0,
                                                     "inputs": 4}

    def strip(entries, out):  # times differ; output folders are named after the run
        return json.loads(json.dumps([{k: v for k, v in e.items() if k != "seconds"} for e in entries])
                          .replace(str(tmp_path / out), "OUT"))

    assert strip(merged["inputs"], "two") == strip(single["inputs"], "one")  # the same inputs, in the same order
    assert merged["devices"] == ["cpu", "cpu"]


def read_video(path):
    capture = cv2.VideoCapture(str(path))
    frames = []
    while True:
        ok, frame = capture.read()
        if not ok:
            return frames
        frames.append(frame)
