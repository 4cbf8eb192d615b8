"""Shared fixtures: synthetic checkpoints in the released container format, and running the CLI.

The released weights cannot be downloaded in CI, so every test uses the deterministic checkpoints of
tests/data/synth_checkpoint.py (copied from the project's reference material), seed 0 = calibrated.
"""
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data"
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(DATA))

# One folder for the whole session, set before any test or fixture (module-scoped ones included) runs,
# and removed when the session ends: the synthetic checkpoints and the converted-checkpoint cache that
# every test and every CLI subprocess shares. The user's real ~/.cache/schp is never touched.
SESSION = Path(tempfile.mkdtemp(prefix="schp-tests-"))
SESSION_CACHE = SESSION / "cache"
os.environ["SCHP_CACHE_DIR"] = str(SESSION_CACHE)

# A suite started as a background job of a shell without job control (`pytest &` in a script) inherits
# SIGINT ignored, and so would every command it starts; those rightly keep ignoring it (as under nohup),
# and the Ctrl-C tests could not interrupt them. Caught here, it is at its default again in every child
# (exec resets a caught signal, never an ignored one).
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

from synth_checkpoint import save_checkpoint, synthetic_checkpoint  # noqa: E402


def pytest_unconfigure(config):
    shutil.rmtree(SESSION, ignore_errors=True)


@pytest.fixture(scope="session")
def checkpoints():
    """checkpoints(dataset, legacy=True) -> path of the seed-0 synthetic checkpoint, made once per session."""
    folder = SESSION / "checkpoints"
    folder.mkdir(exist_ok=True)
    made = {}

    def get(dataset: str = "pascal", legacy: bool = True) -> Path:
        key = (dataset, legacy)
        if key not in made:
            path = folder / f"synth-{dataset}-{'legacy' if legacy else 'zip'}.pth"
            save_checkpoint(synthetic_checkpoint(dataset, 0), path, legacy=legacy)
            made[key] = path
        return made[key]

    return get


@pytest.fixture(scope="session")
def small_model(checkpoints):
    """Command-line arguments of a train.py-style checkpoint (`--dataset custom`): pascal's seed-0 weights
    and labels with a small input (service_server.SMALL_INPUT). For tests of a run's mechanics (signals,
    bad inputs, resuming), where the network's input size only costs time: a 512 x 512 forward pass
    takes 1.5-2 s on a 2-core AVX2 CPU, a 160 x 160 one about a tenth of that."""
    from service_server import small_checkpoint

    folder = SESSION / "checkpoints"
    return ["--dataset", "custom", "--model-restore", str(small_checkpoint(checkpoints("pascal"), folder))]


@pytest.fixture(autouse=True)
def torch_backend_by_default(monkeypatch):
    """CLI runs use the torch backend unless a test asks for another (--backend or SCHP_BACKEND): the
    default 'auto' would export the network to ONNX again in every test's fresh cache."""
    monkeypatch.setenv("SCHP_BACKEND", "torch")


@pytest.fixture
def run_cli(capsys):
    """Run simple_extractor.main(argv) in this process; returns (exit code, stdout, stderr)."""
    from schp.commands import extract as simple_extractor

    def run(*argv):
        code = simple_extractor.main([str(a) for a in argv] + ["--quiet"])
        out, err = capsys.readouterr()
        return code, out, err

    return run


# Runs a command's main() in a fresh interpreter; its exit code and whether torch and sympy got imported
# on the way go to the file named first (stdout and stderr stay the command's own).
COMMAND_DRIVER = """
import json, sys
sys.path.insert(0, {root!r})
report, name, argv = sys.argv[1], sys.argv[2], sys.argv[3:]
code = None
try:
    import importlib
    code = importlib.import_module("schp.commands." + name).main(argv)
except SystemExit as stop:
    code = stop.code
finally:
    with open(report, "w") as f:
        json.dump({{"code": code, "torch": "torch" in sys.modules, "sympy": "sympy" in sys.modules}}, f)
"""


class CommandResult:
    """What run_command saw: exit code, stdout, stderr, and whether torch and sympy were imported."""

    def __init__(self, code, out, err, torch_imported, sympy_imported=None):
        self.code, self.out, self.err, self.torch_imported = code, out, err, torch_imported
        self.sympy_imported = sympy_imported


def run_command(name: str, *args, timeout: float = 300, env=None) -> CommandResult:
    """Run command `name` (extract, evaluate, train, export, multi_person) with `args` in a subprocess."""
    import json
    import subprocess

    with tempfile.TemporaryDirectory(prefix="schp-run-") as folder:
        report = Path(folder) / "report.json"
        done = subprocess.run([sys.executable, "-c", COMMAND_DRIVER.format(root=str(ROOT)), str(report), name]
                              + [str(a) for a in args], capture_output=True, text=True, timeout=timeout,
                              env=env)
        seen = json.loads(report.read_text()) if report.is_file() else {"code": done.returncode, "torch": None}
    return CommandResult(seen["code"], done.stdout, done.stderr, seen["torch"], seen.get("sympy"))


# The extractor's command line as a subprocess (tests of signals, disks and set-up run it for real).
EXTRACTOR = [sys.executable, str(ROOT / "simple_extractor.py")]


def onnx_input_dims(path) -> list:
    """An ONNX file's input dimensions: numbers where fixed, names where any size goes."""
    import onnx

    dims = onnx.load(str(path), load_external_data=False).graph.input[0].type.tensor_type.shape.dim
    return [d.dim_param or d.dim_value for d in dims]


def wait_until(predicate, timeout: float = 120.0, step: float = 0.01) -> bool:
    """Poll `predicate` until it is true (True) or `timeout` seconds pass (False): the one bounded wait."""
    import time
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(step)
    return False


def cihp_checkpoints(folder: Path, background_drop: float):
    """(global, local) synthetic CIHP checkpoints made like the LIP one (same 20-class layout): the global
    one in the released container ({'state_dict'}; zip format, so no per-test conversion), the local one
    as the multi-person evaluator loads them (a bare state dict) with shifted classifier biases so the
    two models differ. The background bias is lowered by `background_drop` in both: the fusion takes the
    smallest crop background logit, and without it the synthetic models would leave the persons all
    background."""
    import torch
    ckpt = synthetic_checkpoint("lip", 0)
    bias = ckpt["state_dict"]["module.fushion.3.bias"]
    bias[0] -= background_drop
    save_checkpoint(ckpt, folder / "global.pth", legacy=False)
    local = dict(ckpt["state_dict"])
    local["module.fushion.3.bias"] = bias + torch.linspace(-0.3, 0.3, 20)
    torch.save(local, folder / "local.pth")
    return folder / "global.pth", folder / "local.pth"
