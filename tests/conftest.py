"""Shared fixtures: synthetic checkpoints in the released container format, and running the CLI.

The released weights cannot be downloaded in CI, so every test uses the deterministic checkpoints of
tests/data/synth_checkpoint.py (copied from the project's reference material), seed 0 = calibrated.
"""
import os
import shutil
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
