"""Ctrl-C and SIGTERM from the first second: start-up, a kill of the whole process group, a second Ctrl-C.

Each signal is sent on an observable event (a temporary file appears, a proxy is contacted, an input
is being read), and inputs that are named pipes hold the run at a known point until the test feeds
them, so the outcome does not depend on the machine's speed.
"""
import json
import os
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import cv2
import pytest

import corpus
from conftest import EXTRACTOR, wait_until

CLI = EXTRACTOR
PASCAL_RELEASED = "exp-schp-201908270938-pascal-person-part.pth"


class Stderr:
    """Collects a child's stderr lines as they come."""

    def __init__(self, proc):
        self.lines = []
        self.thread = threading.Thread(target=self._read, args=(proc.stderr,), daemon=True)
        self.thread.start()

    def _read(self, stream):
        for line in stream:
            self.lines.append(line.rstrip("\n"))

    def wait_for(self, text, timeout=120.0):
        return wait_until(lambda: any(text in line for line in self.lines), timeout)

    @property
    def text(self):
        return "\n".join(self.lines)


def start(args, **kwargs):
    env = dict(os.environ, PYTHONUNBUFFERED="1", **kwargs.pop("env", {}))
    return subprocess.Popen(CLI + [str(a) for a in args], stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
                            text=True, env=env, **kwargs)


def reader_waiting(fifo: Path):
    """A write end of `fifo` once some process has it open for reading (None until then)."""
    try:
        return os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
    except OSError:  # ENXIO: no reader yet
        return None


def open_when_read(fifo: Path, timeout=120.0) -> int:
    fds = []
    assert wait_until(lambda: fds.append(reader_waiting(fifo)) or fds[-1] is not None, timeout), fifo
    os.set_blocking(fds[-1], True)
    return fds[-1]


def feed(fd: int, data: bytes) -> None:
    try:
        os.write(fd, data)
    except BrokenPipeError:  # the reader is gone (killed): what it would have read does not matter
        pass
    finally:
        os.close(fd)


def png_bytes(width=64, height=48):
    return cv2.imencode(".png", corpus.base_bgr(width, height))[1].tobytes()


def temporaries(folder):
    return [p for p in Path(folder).rglob("*") if p.name.startswith(".")]


def test_sigterm_while_converting_the_checkpoint_exits_130_and_leaves_no_temporary(checkpoints, tmp_path):
    (tmp_path / "in").mkdir()
    corpus.make_good_jpg(tmp_path / "in")
    cache = tmp_path / "cache"
    proc = start(["--model-restore", checkpoints("pascal"), "--input-dir", tmp_path / "in", "--output-dir",
                  tmp_path / "out", "--quiet"], env={"SCHP_CACHE_DIR": str(cache)})
    err = Stderr(proc)
    assert wait_until(lambda: any(p.name.endswith(".tmp") for p in cache.glob(".*"))), err.text  # writing
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 130, err.text
    err.thread.join(10)
    assert err.lines == ["interrupted before any input was processed"], err.text
    assert not temporaries(cache)
    assert not list((tmp_path / "out").glob("*.png"))


def test_sigterm_during_the_checkpoint_download_exits_130_and_leaves_no_temporary(tmp_path):
    """The real download code, against a proxy that accepts the connection and never answers."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    contacted = []

    def accept():
        conn, _ = server.accept()
        contacted.append(conn.recv(1024))  # the CONNECT line; then silence
        time.sleep(60)

    threading.Thread(target=accept, daemon=True).start()
    proxy = f"http://127.0.0.1:{server.getsockname()[1]}"
    (tmp_path / "in").mkdir()
    corpus.make_good_jpg(tmp_path / "in")
    folder = tmp_path / "checkpoints"
    proc = start(["--model-restore", folder / PASCAL_RELEASED, "--input-dir", tmp_path / "in",
                  "--output-dir", tmp_path / "out", "--quiet"],
                 env={"HTTPS_PROXY": proxy, "https_proxy": proxy, "HTTP_PROXY": proxy, "http_proxy": proxy,
                      "NO_PROXY": "", "no_proxy": "", "SCHP_CACHE_DIR": str(tmp_path / "cache")})
    err = Stderr(proc)
    try:
        assert wait_until(lambda: contacted, timeout=120), err.text
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 130, err.text
    finally:
        proc.kill()
        server.close()
    err.thread.join(10)
    assert err.lines[-1] == "interrupted before any input was processed" and "Traceback" not in err.text
    assert list(folder.iterdir()) == []  # neither our temporary nor gdown's .part


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_process_group_signal_exits_130_not_input_pipeline_failed(checkpoints, tmp_path, signum):
    """SIGTERM to the whole group (Slurm, `kill -- -PGID`) or SIGHUP (the terminal closed), while the
    workers are busy: the main process reports an interrupt; no worker dies of it."""
    inputs, out = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    for name in ("a.png", "b.png"):  # named pipes: the workers are reading them when the signal comes
        os.mkfifo(inputs / name)
    proc = start(["--model-restore", checkpoints("pascal", legacy=False), "--input-dir", inputs, "--output-dir",
                  out, "--quiet", "--num-workers", "2", "--summary", tmp_path / "run.json"],
                 start_new_session=True)  # its own process group, as under Slurm
    err = Stderr(proc)
    fds = [open_when_read(inputs / name) for name in ("a.png", "b.png")]
    os.killpg(proc.pid, signum)  # the main process and every worker
    assert err.wait_for("interrupted: finishing"), err.text
    for fd in fds:
        feed(fd, png_bytes())
    assert proc.wait(timeout=60) == 130, err.text
    err.thread.join(10)
    assert "input pipeline failed" not in err.text and "Traceback" not in err.text
    assert err.lines[-1].startswith("interrupted: 0 processed, 0 skipped, 0 failed of 2 inputs"), err.text
    manifest = json.loads((tmp_path / "run.json").read_text())
    assert manifest["interrupted"] is True and manifest["stopped"] is None
    assert manifest["totals"]["not-run"] == 2
    assert not temporaries(out)


def test_second_ctrl_c_while_outputs_drain_still_writes_summary_and_manifest(checkpoints, tmp_path):
    """With --overlay the writer reads the input again (after writing the logits): a named pipe holds
    that write open."""
    inputs, out = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    held = inputs / "held.png"
    os.mkfifo(held)
    proc = start(["--model-restore", checkpoints("pascal", legacy=False), "--input-dir", inputs, "--output-dir",
                  out, "--quiet", "--overlay", "--logits", "--summary", tmp_path / "run.json"])
    err = Stderr(proc)
    feed(open_when_read(held), png_bytes())  # decoded by the worker, then parsed
    assert wait_until(lambda: (out / "held.npy").exists()), err.text  # the writer is past the logits
    fd = open_when_read(held)  # and re-reads the input for the overlay: an output in flight
    proc.send_signal(signal.SIGINT)
    assert err.wait_for("interrupted: finishing the outputs in flight"), err.text
    proc.send_signal(signal.SIGINT)
    assert err.wait_for("interrupted again: not waiting for the 1 output(s) still being written"), err.text
    assert wait_until(lambda: (tmp_path / "run.json").exists()), err.text  # while the write still waits
    assert proc.poll() is None  # held by the writer: its output is finished, not cut
    feed(fd, png_bytes())
    assert proc.wait(timeout=60) == 130, err.text
    err.thread.join(10)
    assert "Traceback" not in err.text
    assert err.lines[-2].startswith("interrupted: 0 processed, 0 skipped, 0 failed of 1 inputs"), err.text
    assert err.lines[-1] == f"summary written to {tmp_path / 'run.json'}"
    manifest = json.loads((tmp_path / "run.json").read_text())
    assert manifest["interrupted"] is True and manifest["abandoned_in_flight"] == 1
    assert manifest["totals"]["not-run"] == 1
    assert not temporaries(out)
    assert sorted(p.name for p in out.iterdir()) == ["held.npy", "held.png", "held_overlay.jpg"]
