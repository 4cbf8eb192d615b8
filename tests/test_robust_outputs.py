"""Outputs on shared and full storage: host-named temporaries, space reserved before the logits are mapped."""
import os
import subprocess
import sys

import cv2
import pytest

import corpus
from conftest import ROOT, EXTRACTOR
from schp.utils.outputs import TEMP_MARK, remove_stale_temporaries, temp_path

CLI = EXTRACTOR


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_temporaries_name_the_host_and_only_this_hosts_dead_ones_are_removed(tmp_path):
    from schp.utils.outputs import host_tag
    assert f"{TEMP_MARK}{host_tag()}-{os.getpid()}" in temp_path(tmp_path / "a.png").name
    gone = dead_pid()
    mine_dead = tmp_path / f".a{TEMP_MARK}{host_tag()}-{gone}.png"
    mine_live = tmp_path / f".b{TEMP_MARK}{host_tag()}-{os.getpid()}.npy"
    # another host's live writer on shared storage: its pid means nothing here (and may be free here)
    other_host = tmp_path / f".c{TEMP_MARK}{host_tag()}x-{gone}.png"
    no_host = tmp_path / f".d{TEMP_MARK}{gone}.png"  # the old naming: whose host is unknown
    for p in (mine_dead, mine_live, other_host, no_host):
        p.write_bytes(b"partial")
    assert remove_stale_temporaries(tmp_path) == [mine_dead]
    assert not mine_dead.exists() and mine_live.exists() and other_host.exists() and no_host.exists()


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 1 MiB tmpfs: a real full disk (root only; skipped where mounting is not permitted)."""
    mount = tmp_path / "full"
    mount.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({result.stderr.strip() or 'mount failed'}); "
                    "the RLIMIT_FSIZE test in test_robustness.py covers write failures")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_memmap_on_a_full_disk_is_an_oserror_not_sigbus(small_tmpfs):
    # 2 MiB of logits on a 1 MiB disk: sparse pages would SIGBUS when touched; reserved, ENOSPC is raised
    code = ("import sys, numpy as np; sys.path.insert(0, sys.argv[2]); from pathlib import Path; "
            "from schp.utils.outputs import npy_memmap\n"
            "try:\n"
            "    with npy_memmap(Path(sys.argv[1]), (512, 512, 2)) as a: a[:] = 1.0\n"
            "except OSError as err: print('OSError', err.errno, err.filename)")
    result = subprocess.run([sys.executable, "-c", code, str(small_tmpfs / "x.npy"), str(ROOT)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, (result.returncode, result.stderr)  # -7 = killed by SIGBUS
    assert result.stdout.split() == ["OSError", str(28), str(small_tmpfs / "x.npy")]  # ENOSPC
    assert os.listdir(small_tmpfs) == []


def test_full_disk_during_a_run_stops_it_with_one_line_per_input(checkpoints, small_tmpfs, tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    for i in range(3):  # logits 320 x 240 x 7 float32 = 2.1 MB each, on a 1 MiB disk
        cv2.imwrite(str(inputs / f"img{i}.png"), corpus.base_bgr(320, 240))
    result = subprocess.run(CLI + ["--model-restore", str(checkpoints("pascal", legacy=False)), "--input-dir",
                                   str(inputs), "--output-dir", str(small_tmpfs), "--quiet", "--logits",
                                   "--summary", str(tmp_path / "run.json")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, (result.returncode, result.stderr)  # not -7 (SIGBUS)
    lines = result.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    assert errors and errors[0] == (f"error: {inputs / 'img0.png'}: cannot write {small_tmpfs / 'img0.npy'}: "
                                    "No space left on device"), result.stderr
    assert any(line.startswith("stopped: cannot write") for line in lines), result.stderr
    assert lines[-1].startswith("stopped: 0 processed") and "Traceback" not in result.stderr
    assert (tmp_path / "run.json").is_file()
    assert not [p for p in small_tmpfs.iterdir() if TEMP_MARK in p.name]
