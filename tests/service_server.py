"""Running the service for the tests: serve.py in a subprocess on a free loopback port, the command
line on the same images, and a small-input checkpoint for the tests that need many forward passes.

The small checkpoint holds the synthetic Pascal weights of checkpoints("pascal") in train.py's
container (state_dict + labels + input_size), read with --dataset custom: the same network and
pipeline at a 160 x 160 crop, about ten times fewer operations per image than the 512 x 512 of the
released Pascal model, so that 64 images fit in the suite's time on a 2-core machine.
"""
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from conftest import ROOT

SMALL_INPUT = 160


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def small_checkpoint(pascal_checkpoint: Path, folder: Path) -> Path:
    import torch
    from schp.data.catalog import DATASETS

    path = folder / f"synth-pascal-{SMALL_INPUT}.pth"
    if not path.exists():
        spec = DATASETS["pascal"]
        obj = torch.load(pascal_checkpoint, map_location="cpu", weights_only=True)
        obj.update(dataset="custom", labels=list(spec.labels), input_size=[SMALL_INPUT, SMALL_INPUT],
                   flip_pairs=[list(p) for p in spec.flip_pairs])
        torch.save(obj, path)
    return path


def model_args(checkpoint: Path, dataset: str):
    return ["--dataset", dataset, "--model-restore", str(checkpoint), "--backend", "torch", "--device", "cpu"]


class Server:
    """serve.py on 127.0.0.1:<free port>; `url`, `proc`, `stderr()`; stop() sends SIGTERM."""

    def __init__(self, checkpoint: Path, dataset: str, log: Path, *options, env=None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        self._log_file = open(log, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "serve.py", *model_args(checkpoint, dataset), "--host", "127.0.0.1",
             "--port", str(self.port), "--log-level", "warning", *map(str, options)],
            cwd=ROOT, stdout=self._log_file, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})

    def wait_ready(self, timeout: float = 180) -> "Server":
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"serve.py exited with {self.proc.returncode}: {self.stderr()}")
            try:
                if httpx.get(self.url + "/healthz", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"serve.py not ready after {timeout} s: {self.stderr()}")

    def stderr(self) -> str:
        self._log_file.flush()
        return self.log.read_text(errors="replace")

    def stop(self, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log_file.close()
        return self.proc.returncode


def run_extractor(checkpoint: Path, dataset: str, inputs: Path, outputs: Path, *options):
    """simple_extractor.py on a folder, as a user runs it: (exit code, stderr)."""
    result = subprocess.run([sys.executable, "simple_extractor.py", *model_args(checkpoint, dataset),
                             "--input-dir", str(inputs), "--output-dir", str(outputs), "--quiet", *options],
                            cwd=ROOT, capture_output=True, text=True, timeout=600)
    return result.returncode, result.stderr
