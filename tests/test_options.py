"""The commands' shared options: one-line usage errors (exit 2) and --version in all five, answered
before torch is imported; help without misleading defaults; engine errors and warnings named as
Python parameters in the library and as flags on the command line."""
import re
import warnings

import pytest

import schp
from conftest import run_command

COMMANDS = ["extract", "evaluate", "train", "export", "multi_person"]
REQUIRED = {"export": ["--output", "x.onnx"], "multi_person": ["--input-dir", "in", "--output-dir", "out"]}


def assert_one_line_usage_error(result, *parts):
    assert result.code == 2, result.err
    lines = result.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.err
    for part in parts:
        assert part in lines[0], (part, lines[0])
    assert result.torch_imported is False


@pytest.mark.parametrize("name", COMMANDS)
def test_every_command_answers_version_help_and_a_bad_choice_before_importing_torch(name):
    version = run_command(name, "--version", timeout=120)
    assert (version.code, version.out, version.torch_imported) == (0, f"schp {schp.__version__}\n", False)
    usage = run_command(name, "--help", timeout=120)
    assert usage.code == 0 and usage.torch_imported is False and "--precision" in usage.out
    text = " ".join(usage.out.split())  # help lines joined as one text
    for wrong in ("(default: True)", "(default: False)", "(default: )", "(default: None)"):
        assert wrong not in text, (wrong, usage.out)
    assert not re.search(r"\(default:[^)]*\) \(default:", text), usage.out  # a default said twice
    bad = run_command(name, *REQUIRED.get(name, []), "--precision", "fp64", timeout=120)
    assert_one_line_usage_error(bad, "argument --precision: invalid choice: 'fp64'", "(--help lists the options)")


@pytest.mark.parametrize("name, argv, message", [
    ("extract", ["--device", "tpu"], "--device tpu: expected auto, cpu, cuda or cuda:N"),
    ("evaluate", ["--device", "tpu"], "--device tpu: expected auto, cpu, cuda or cuda:N"),
    ("train", ["--device", "tpu"], "--device tpu: expected auto, cpu, cuda or cuda:N"),
    ("multi_person", ["--input-dir", "in", "--output-dir", "out", "--device", "tpu"], "--device tpu: expected"),
    ("extract", ["--gpu", "x"], "--gpu x: expected a CUDA device index"),
    ("evaluate", ["--multi-scales", "a,b"], "--multi-scales a,b: expected numbers separated by commas"),
    ("multi_person", ["--input-dir", "in", "--output-dir", "out", "--multi-scales", "9"],
     "--multi-scales 9: each scale must be in (0, 4]"),
    ("export", ["--dataset", "coco", "--output", "x.onnx"], "argument --dataset: invalid choice: 'coco'"),
    ("train", ["--dataset", "coco"], "argument --dataset: invalid choice: 'coco'"),
    ("multi_person", ["--output-dir", "out"], "the following arguments are required: --input-dir"),
])
def test_usage_errors_are_one_line_exit_2_without_torch(name, argv, message):
    assert_one_line_usage_error(run_command(name, *argv, timeout=120), message)


def test_missing_input_folders_are_answered_before_torch(tmp_path):
    absent = tmp_path / "absent"
    extract = run_command("extract", "--input-dir", absent, "--output-dir", tmp_path / "out", timeout=120)
    assert_one_line_usage_error(extract, f"--input-dir {absent}: no such folder")
    people = run_command("multi_person", "--input-dir", absent, "--output-dir", tmp_path / "out", timeout=120)
    assert_one_line_usage_error(people, f"--input-dir {absent}: no such folder")
    scored = run_command("evaluate", "--data-dir", absent, timeout=120)
    assert_one_line_usage_error(scored, f"{absent / 'val_id.txt'}: no such id file")
    assert not (tmp_path / "out").exists()


def test_library_errors_name_the_parameter_and_commands_the_flag():
    from schp.choices import parse_scales
    from schp.commands import multi_person, options
    from schp.errors import ParameterError, SetupError
    from schp.inference import select_device

    with pytest.raises(ParameterError) as caught:
        select_device("tpu", None, cuda_count=0)
    err = caught.value
    assert str(err) == "device='tpu': expected auto, cpu, cuda or cuda:N"
    assert isinstance(err, ValueError) and isinstance(err, SetupError) and err.exit_code == 2
    assert options.flag_message(err) == "--device tpu: expected auto, cpu, cuda or cuda:N"
    with pytest.raises(ParameterError) as caught:
        parse_scales("0.5,x")
    assert str(caught.value) == "scales='0.5,x': expected numbers separated by commas, e.g. 0.75,1.0,1.25"
    assert options.flag_message(caught.value).startswith("--multi-scales 0.5,x: expected numbers")
    checkpoint = ParameterError("cannot be read", "checkpoint", "a.pth")
    assert options.flag_message(checkpoint) == "--model-restore a.pth: cannot be read"
    assert options.flag_message(checkpoint, multi_person.FLAGS).startswith("--global-restore / --local-restore")
    assert options.flag_message(ValueError("plain")) == "plain"


def test_the_api_names_its_own_parameters(checkpoints):
    from schp.api import SCHP

    with pytest.raises(ValueError) as caught:
        SCHP("pascal", checkpoints("pascal"), device="tpu")
    assert str(caught.value) == "device='tpu': expected auto, cpu, cuda or cuda:N"
    with pytest.raises(ValueError, match=r"^dataset='coco': unknown dataset, expected one of atr, lip, pascal or "
                                         r"custom$"):
        SCHP("coco")
    with pytest.raises(ValueError, match=r"^dataset='custom' needs checkpoint \(a checkpoint written by train.py\)$"):
        SCHP("custom")
    with pytest.raises(ValueError, match=r"^batch_size=0: must be >= 1$"):
        SCHP("pascal", checkpoints("pascal"), batch_size=0)
    with pytest.raises(ValueError, match=r"^precision='fp16': fp16 needs a CUDA device"):
        SCHP("pascal", checkpoints("pascal"), device="cpu", precision="fp16")
    with pytest.raises(ValueError, match=r"^backend='openvino': supports the precision fp32 or bf16, not fp16"):
        from schp.backends import resolve_backend
        import torch
        resolve_backend("openvino", torch.device("cpu"), "fp16")


def test_every_engine_error_has_the_common_base_and_its_exit_code():
    from schp.backends import BackendError
    from schp.checkpoint import CheckpointError
    from schp.data.decode import ImageError
    from schp.data.labelled import LabelledDataError
    from schp.data.training_set import DataError
    from schp.errors import SCHPError, SetupError
    from schp.export import ExportError, MissingPackageError
    from schp.multi_person.instances import InstanceError, SourceError
    from schp.training.trainer import TrainingError
    from schp.runs.parsing import VideoError

    for cls in (ImageError, VideoError, InstanceError, ExportError, DataError):
        assert issubclass(cls, SCHPError) and cls("x").exit_code == 1, cls
    for cls in (CheckpointError, SourceError, LabelledDataError, BackendError, MissingPackageError):
        assert issubclass(cls, SetupError) and cls("x").exit_code == 2, cls
    assert issubclass(BackendError, ValueError) and issubclass(MissingPackageError, ExportError)
    assert TrainingError("x").exit_code == 2 and TrainingError("x", 1).exit_code == 1


def test_engine_warnings_reach_the_terminal_as_one_line_with_the_flag(capsys):
    from schp.commands import options
    from schp.errors import SCHPWarning

    with warnings.catch_warnings():
        options.show_engine_messages({"checkpoint": "--model-restore"})
        warnings.warn(SCHPWarning("this machine has no CUDA device; running on the CPU", "gpu", "0"))
        warnings.warn(SCHPWarning("this machine has no CUDA device; running on the CPU", "gpu", "0"))
        warnings.warn("something else\nwith a second line", RuntimeWarning)
    err = capsys.readouterr().err.splitlines()
    assert err[:2] == ["warning: --gpu 0: this machine has no CUDA device; running on the CPU"] * 2  # each time
    assert len(err) == 3 and err[2].startswith("warning: something else (RuntimeWarning, ")
