"""Set-up problems: one line `error: ...`, exit 2, no traceback, nothing left behind; device choice.

Everything here happens before the first input is read: arguments, folders, devices, checkpoints.
"""
import os
import shutil
import subprocess
import time
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import run_command, EXTRACTOR
from schp.data.catalog import DATASETS
from schp import inference
from schp.errors import SCHPWarning
from schp.inference import cpu_flags, select_device, slow_bf16_warning

CLI = EXTRACTOR
PASCAL = DATASETS["pascal"]


def one_image(folder, name="a.png"):
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((12, 10, 3), 120, np.uint8)).save(folder / name)
    return folder


def assert_one_line_error(code, err, *parts):
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for part in parts:
        assert part in lines[0], (part, lines[0])


@pytest.mark.parametrize("argv, message", [
    (["--device", "tpu"], "--device tpu: expected auto, cpu, cuda or cuda:N"),
    (["--gpu", "abc"], "--gpu abc: expected a CUDA device index"),
    (["--input-dir", "x", "--integratedpifu-dir", "y"], "--input-dir and --integratedpifu-dir"),
    (["--dataset", "coco"], "argument --dataset: invalid choice"),
])
def test_usage_errors_answer_in_one_line_before_torch_is_imported(argv, message, tmp_path):
    start = time.monotonic()
    result = run_command("extract", *argv, "--output-dir", tmp_path / "out", timeout=120)
    seconds = time.monotonic() - start
    assert_one_line_error(result.code, result.err, message)
    assert result.torch_imported is False
    assert not (tmp_path / "out").exists()
    print(f"{argv}: answered in {seconds:.2f} s")


def test_a_torch_run_builds_the_network_without_importing_sympy(small_model, tmp_path):
    """The network is built on the meta device and handed copies of the weights: no random init, and
    none of the symbolic-shape machinery (sympy) that `to_empty` on meta tensors imports, which cost
    every command about 0.5 s of start-up (exports import it, as they must)."""
    inputs = one_image(tmp_path / "in")
    result = run_command("extract", *small_model, "--backend", "torch", "--device", "cpu", "--input-dir", inputs,
                         "--output-dir", tmp_path / "out", "--quiet", timeout=300)
    assert result.code == 0, result.err
    assert (tmp_path / "out" / "a.png").is_file()
    assert result.torch_imported is True and result.sympy_imported is False


def test_device_index_the_machine_lacks_is_a_setup_error_with_the_count():
    with pytest.raises(ValueError, match=r"^device='cuda:7': this machine has 2 CUDA devices \(cuda:0 to cuda:1\)"):
        select_device("cuda:7", None, cuda_count=2)
    with pytest.raises(ValueError, match=r"^gpu='5': this machine has 1 CUDA device \(indices 0 to 0\)"):
        select_device("auto", "5", cuda_count=1)
    with pytest.raises(ValueError, match="CUDA is not available"):
        select_device("cuda:0", None, cuda_count=0)
    with pytest.raises(ValueError, match="^device='tpu': expected auto, cpu, cuda or cuda:N"):
        select_device("tpu", None, cuda_count=0)
    assert select_device("cuda:1", None, cuda_count=2) == torch.device("cuda:1")
    assert select_device("auto", "1,0", cuda_count=2) == torch.device("cuda:1")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert select_device("auto", "0", cuda_count=0) == torch.device("cpu")
        assert select_device("auto", "None", cuda_count=2) == torch.device("cpu")
        assert select_device("auto", None, cuda_count=0) == torch.device("cpu")
    assert [(w.category, str(w.message)) for w in caught] == [
        (SCHPWarning, "gpu='0': this machine has no CUDA device; running on the CPU")]


def test_cuda_device_beyond_this_machine_is_one_line_exit_2(checkpoints, run_cli, tmp_path):
    count = torch.cuda.device_count()  # 0 here without CUDA: then any cuda:N is beyond the machine
    code, _, err = run_cli("--model-restore", checkpoints("pascal"), "--input-dir", one_image(tmp_path / "in"),
                           "--output-dir", tmp_path / "out", "--device", f"cuda:{count}")
    assert_one_line_error(code, err, f"--device cuda:{count}")
    assert not (tmp_path / "out").exists()  # the failed set-up removed the folder it had made
    if count:
        code, _, err = run_cli("--model-restore", checkpoints("pascal"), "--input-dir", tmp_path / "in",
                               "--output-dir", tmp_path / "out", "--gpu", str(count))
        assert_one_line_error(code, err, f"--gpu {count}: this machine has {count} CUDA device")


def test_gpu_on_a_machine_without_cuda_warns_once_and_runs_on_the_cpu(checkpoints, run_cli, tmp_path):
    inputs = one_image(tmp_path / "in")
    code, _, err = run_cli("--model-restore", checkpoints("pascal"), "--input-dir", inputs,
                           "--output-dir", tmp_path / "out", "--gpu", "0", "--summary", tmp_path / "run.json")
    assert code == 0, err
    import json
    device = json.loads((tmp_path / "run.json").read_text())["device"]
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    if torch.cuda.is_available():
        assert device == "cuda:0" and warnings == []
    else:
        assert device == "cpu"
        assert warnings == ["warning: --gpu 0: this machine has no CUDA device; running on the CPU"]


def test_output_folder_that_is_a_file_says_not_a_folder(checkpoints, run_cli, tmp_path):
    inputs = one_image(tmp_path / "in")
    (tmp_path / "file").write_text("x")
    code, _, err = run_cli("--model-restore", checkpoints("pascal"), "--input-dir", inputs,
                           "--output-dir", tmp_path / "file")
    assert_one_line_error(code, err, f"--output-dir {tmp_path / 'file'}: not a folder (it is a file)")
    code, _, err = run_cli("--model-restore", checkpoints("pascal"), "--input-dir", inputs,
                           "--output-dir", tmp_path / "file" / "deeper")
    assert_one_line_error(code, err, "not a folder", f"({tmp_path / 'file'} is a file)")
    assert (tmp_path / "file").read_text() == "x"


def test_missing_integratedpifu_folder_says_no_such_folder(run_cli, tmp_path):
    code, _, err = run_cli("--integratedpifu-dir", tmp_path / "absent")
    assert_one_line_error(code, err, f"--integratedpifu-dir {tmp_path / 'absent'}: no such folder")


def test_failed_setup_leaves_no_empty_output_folder(run_cli, tmp_path):
    inputs = one_image(tmp_path / "in")
    (tmp_path / "bad.pth").write_bytes(b"\x80\x02garbage")
    code, _, err = run_cli("--model-restore", tmp_path / "bad.pth", "--input-dir", inputs,
                           "--output-dir", tmp_path / "new" / "out")
    assert_one_line_error(code, err, "bad.pth")
    assert not (tmp_path / "new").exists()
    (tmp_path / "kept").mkdir()  # a folder that was there before is left alone
    code, _, err = run_cli("--model-restore", tmp_path / "bad.pth", "--input-dir", inputs,
                           "--output-dir", tmp_path / "kept")
    assert code == 2 and (tmp_path / "kept").is_dir()


def test_os_error_during_setup_is_one_line_not_a_traceback(tmp_path):
    """The released name under a path whose parent is a file: the download cannot even make its folder."""
    inputs = one_image(tmp_path / "in")
    (tmp_path / "file").write_text("x")
    target = tmp_path / "file" / PASCAL.checkpoint
    result = subprocess.run(CLI + ["--model-restore", str(target), "--input-dir", str(inputs),
                                   "--output-dir", str(tmp_path / "out"), "--quiet"],
                            capture_output=True, text=True, timeout=300)
    assert_one_line_error(result.returncode, result.stderr, str(tmp_path / "file"))
    assert not (tmp_path / "out").exists()


def without_privileges():
    """Command prefix under which file permissions apply (root ignores them unless its capabilities go)."""
    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv: permissions cannot be made to apply")
    return ["setpriv", "--inh-caps", "-all", "--bounding-set", "-all", "--"]


def test_unreadable_checkpoint_folder_is_one_line(checkpoints, tmp_path):
    inputs = one_image(tmp_path / "in")
    locked = tmp_path / "locked"
    locked.mkdir()
    shutil.copy(checkpoints("pascal"), locked / "mine.pth")
    locked.chmod(0)
    try:
        result = subprocess.run(without_privileges() + CLI + [
            "--model-restore", str(locked / "mine.pth"), "--input-dir", str(inputs),
            "--output-dir", str(tmp_path / "out"), "--quiet"], capture_output=True, text=True, timeout=300)
    finally:
        locked.chmod(0o755)
    assert_one_line_error(result.returncode, result.stderr, f"checkpoint {locked / 'mine.pth'}: cannot be read",
                          "Permission denied")
    assert not (tmp_path / "out").exists()


def closed_pipe_run(argv):
    """Run the CLI with a stdout pipe whose reader is already gone, as `| head -1` leaves it."""
    process = subprocess.Popen(CLI + argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    process.stdout.close()
    _, err = process.communicate(timeout=120)
    return process.returncode, err.decode()


@pytest.mark.parametrize("mode", ["legend", "dry-run"])
def test_listing_into_a_closed_pipe_ends_quietly(mode, tmp_path):
    if mode == "legend":
        argv = ["--dataset", "lip", "--legend"]
    else:
        inputs = tmp_path / "in"
        for i in range(50):
            one_image(inputs, f"img{i:03d}.png")
        argv = ["--input-dir", str(inputs), "--output-dir", str(tmp_path / "out"), "--dry-run"]
    code, err = closed_pipe_run(argv)
    assert code == 0, err
    assert "Traceback" not in err and "BrokenPipeError" not in err and "Exception ignored" not in err, err
    shell = subprocess.run(" ".join(f"'{a}'" for a in CLI + argv) + " | head -1", shell=True,
                           capture_output=True, text=True, timeout=120)
    assert len(shell.stdout.splitlines()) == 1 and "Traceback" not in shell.stderr, shell.stderr


def test_cpu_flags_are_read_from_cpuinfo(tmp_path):
    (tmp_path / "x86").write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f\n\nprocessor\t: 1\n")
    (tmp_path / "arm").write_text("processor\t: 0\nFeatures\t: fp asimd bf16 i8mm\n")
    assert cpu_flags(str(tmp_path / "x86")) == {"fpu", "sse2", "avx2", "avx512f"}
    assert cpu_flags(str(tmp_path / "arm")) >= {"bf16"}
    assert cpu_flags(str(tmp_path / "absent")) is None


def test_bf16_on_a_cpu_without_bf16_units_names_the_faster_choice(small_model, run_cli, tmp_path, monkeypatch):
    cpu = torch.device("cpu")
    warning = slow_bf16_warning(cpu, "bf16", frozenset({"avx2", "fma"}))
    assert isinstance(warning, SCHPWarning)
    assert str(warning).startswith("precision='bf16': this CPU has no bf16 units") and "fp32 is faster" in str(warning)
    for flags in ({"avx512_bf16"}, {"amx_bf16", "amx_tile"}, {"bf16"}):
        assert slow_bf16_warning(cpu, "bf16", frozenset(flags)) is None
    assert slow_bf16_warning(cpu, "fp32", frozenset({"avx2"})) is None
    # this machine: a warning exactly when its /proc/cpuinfo lacks every bf16 flag
    real = cpu_flags()
    assert (slow_bf16_warning(cpu, "bf16") is not None) == (real is not None and not real & inference.BF16_CPU_FLAGS)
    # the command line on a CPU reporting AVX2 only (the flags are what is replaced, not the model)
    monkeypatch.setattr(inference, "cpu_flags", lambda: frozenset({"avx2"}))
    code, _, err = run_cli(*small_model, "--input-dir", one_image(tmp_path / "in"),
                           "--output-dir", tmp_path / "out", "--precision", "bf16", "--device", "cpu")
    assert code == 0, err
    assert [line for line in err.splitlines() if line.startswith("warning:")] == [
        "warning: --precision bf16: " + warning.reason]
