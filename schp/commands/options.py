"""What the five commands share: their options (declared once, with one help text and one set of
choices), the parser that answers a usage error in one line, and the way the engine's errors and
warnings reach the terminal (its Python parameter names shown as the command's flags).

Imports nothing heavy, so `--help`, `--version` and every usage error answer before torch is loaded.
"""
import argparse
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Mapping, Optional, Sequence

from schp import __version__
from schp.choices import BACKENDS, DEFAULT_BACKEND, DEVICE_PATTERN, DEVICES, PRECISIONS, parse_scales
from schp.data.catalog import DATASETS
from schp.errors import EXIT_SETUP, SCHPError, SCHPWarning, SetupError

# The engine's parameter names whose flag is not `--<name with dashes>`; a command with other flags
# passes its own mapping (merged over this one) to `flag_message` and `parse`.
FLAGS = {"checkpoint": "--model-restore", "scales": "--multi-scales"}
GPU_CPU_VALUES = ("none", "cpu", "-1", "")  # --gpu values that mean the CPU (None is the original's)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a default only where it tells something: not for on/off flags, not for empty or None
    defaults, not where the help text states the default itself."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.nargs == 0 or action.default in (None, "", argparse.SUPPRESS) or "default" in text:
            return text
        return super()._get_help_string(action)


class CommandParser(argparse.ArgumentParser):
    """argparse with `--version`, errors as one line `error: ... (--help lists the options)` and exit 2."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)
        self.add_argument("--version", action="version", version=f"schp {__version__}",
                          help="print the version and exit")

    def error(self, message: str):
        self.exit(EXIT_SETUP, f"error: {message} (--help lists the options)\n")

    def fail(self, message: str):
        """A set-up problem found while reading the options (a folder that is not there): `error: ...`, exit 2."""
        self.exit(EXIT_SETUP, f"error: {message}\n")


# ----------------------------------------------------------------------------- the shared options
def add_dataset(p, default: Optional[str] = "pascal", custom: bool = False, help: Optional[str] = None) -> None:
    """--dataset: the catalog's datasets (and `custom`, a label set stored in a checkpoint, where supported)."""
    p.add_argument("--dataset", default=default, choices=list(DATASETS) + (["custom"] if custom else []),
                   help=help or "which released model: its labels and input size" +
                   ("; custom: those stored in --model-restore by train.py" if custom else ""))


def add_model_restore(p, default: Optional[str] = None, help: Optional[str] = None) -> None:
    p.add_argument("--model-restore", default=default,
                   help=help or "checkpoint file; default checkpoints/<released file of --dataset>, "
                                "downloaded there when missing")


def add_device(p, gpu_default: Optional[str] = None, device_help: str = "", gpu_help: str = "") -> None:
    """--device (auto, cpu, cuda, cuda:N) and the original's --gpu N ('None' = the CPU)."""
    p.add_argument("--gpu", default=gpu_default,
                   help=gpu_help or "CUDA device index as in the original; 'None' means CPU (--device wins)")
    p.add_argument("--device", default="auto",
                   help="auto (CUDA if available, else CPU), cpu, cuda, cuda:N" + device_help)


def add_precision(p, supported: Sequence[str] = PRECISIONS, help: Optional[str] = None) -> None:
    """--precision, from the one table of precisions (a command that supports fewer names its subset)."""
    p.add_argument("--precision", default="fp32", choices=[c for c in PRECISIONS if c in supported],
                   help=help or "fp32 reproduces the original; bf16 is faster on CPUs with bf16 units; "
                                "fp16 CUDA only")


def add_backend(p) -> None:
    """--backend: who runs the network (default: $SCHP_BACKEND, else auto)."""
    p.add_argument(
        "--backend", default=os.environ.get("SCHP_BACKEND") or DEFAULT_BACKEND, choices=("auto",) + BACKENDS,
        help="what runs the network: torch, or onnxruntime / openvino on an ONNX file exported once into "
             "the checkpoint cache; auto = the fastest installed on the CPU (fp32: openvino, onnxruntime, "
             "torch, or onnxruntime first on AVX2 CPUs without AVX-512; bf16: openvino on CPUs with bf16 "
             "units), starting on torch while that runtime is exported and loaded in the background, and "
             "torch only for a job too short to repay it; "
             "torch on GPUs; $SCHP_BACKEND sets the default")


def add_allow_tf32(p) -> None:
    p.add_argument("--allow-tf32", action="store_true", help="let CUDA use TF32 (faster, changes maps)")


def add_tta(p) -> None:
    """Test-time augmentation: --flip and --multi-scales, as the released evaluator."""
    p.add_argument("--flip", action="store_true",
                   help="test-time augmentation: average with the mirrored image's logits (left/right swapped)")
    p.add_argument("--multi-scales", default="1", metavar="S1,S2,...",
                   help="test-time augmentation: average the logits over these input scales, e.g. 0.75,1.0,1.25")


def add_batch_size(p, default: int = 1, help: str = "images per forward pass") -> None:
    p.add_argument("--batch-size", type=int, default=default, help=help)


def add_num_workers(p, default: int = 1, help: str = "processes decoding and cropping inputs") -> None:
    p.add_argument("--num-workers", type=int, default=default, help=help)


def add_overwrite(p, help: str = "redo inputs whose outputs already exist") -> None:
    p.add_argument("--overwrite", action="store_true", help=help)


def add_summary(p, help: str = "write a JSON manifest of the run") -> None:
    p.add_argument("--summary", default=None, metavar="PATH", help=help)


def add_quiet(p, help: str = "no progress bar; errors and the summary still print") -> None:
    p.add_argument("--quiet", action="store_true", help=help)


def parse_input_size(text: str, minimum: int):
    """`--input-size H,W` -> (H, W), each side at least `minimum`; SetupError naming the option otherwise."""
    try:
        h, w = (int(v) for v in str(text).split(","))
    except ValueError:
        h = w = None
    if h is None or min(h, w) < minimum:
        raise SetupError(f"--input-size {text}: expected H,W (each >= {minimum}), e.g. 473,473")
    return h, w


def is_cpu_gpu_value(gpu: str) -> bool:
    """The --gpu values that mean the CPU: None (the original's way), cpu, -1, empty."""
    return str(gpu).strip().lower() in GPU_CPU_VALUES


# ----------------------------------------------------------------------------- reading them
def parse(p: CommandParser, argv: Optional[Sequence[str]] = None,
          flags: Optional[Mapping[str, str]] = None) -> argparse.Namespace:
    """The options, with the shared ones checked (device, --gpu, --multi-scales) before anything heavy
    is imported; engine warnings and log lines are shown from here on as one line each.
    """
    args = p.parse_args(argv)
    device = getattr(args, "device", None)
    if device is not None and not DEVICE_PATTERN.fullmatch(device):
        p.error(f"--device {device}: expected {DEVICES}")
    gpu = getattr(args, "gpu", None)
    if gpu is not None and not is_cpu_gpu_value(gpu) and not all(v.strip().isdigit() for v in gpu.split(",")):
        p.error(f"--gpu {gpu}: expected a CUDA device index such as 0 (or 0,1), or None for the CPU")
    if getattr(args, "multi_scales", None) is not None:
        try:
            parse_scales(args.multi_scales)
        except SCHPError as err:
            p.error(flag_message(err, flags))
    show_engine_messages(flags)
    return args


def require_folders(p: CommandParser, args: argparse.Namespace, *dests: str) -> None:
    """The input folders named on the command line exist: `error: --input-dir X: no such folder`, exit 2."""
    for dest in dests:
        value = getattr(args, dest)
        if value and not Path(value).is_dir():
            what = "not a folder" if Path(value).exists() else "no such folder"
            p.fail(f"--{dest.replace('_', '-')} {value}: {what}")


# ----------------------------------------------------------------------------- engine -> terminal
def flag_message(err: BaseException, flags: Optional[Mapping[str, str]] = None) -> str:
    """The sentence of an engine error or warning, its parameter named as this command's flag
    (`device='tpu': ...` -> `--device tpu: ...`); anything else as its message."""
    if isinstance(err, (SCHPError, SCHPWarning)):
        names = {**FLAGS, **(flags or {})}
        return err.describe(flags=lambda parameter: names.get(parameter, "--" + parameter.replace("_", "-")))
    return str(err)


class _StderrHandler(logging.StreamHandler):
    """A log handler writing to the sys.stderr of the moment (a test may have replaced it)."""

    def __init__(self):
        super().__init__()
        self.setFormatter(logging.Formatter("%(message)s"))

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


_HANDLER = _StderrHandler()


def show_engine_messages(flags: Optional[Mapping[str, str]] = None) -> None:
    """Warnings as one line `warning: ...` on stderr (the engine's with flags for parameters), every time
    they occur as the prints they replace did; the engine's log (`schp.*`, INFO and up) on stderr."""

    def show(message, category, filename, lineno, file=None, line=None):
        if isinstance(message, SCHPWarning):
            text = flag_message(message, flags)
        else:
            first = (str(message).strip().splitlines() or [""])[0]
            text = f"{first} ({category.__name__}, {os.path.basename(filename)}:{lineno})"
        try:
            print(f"warning: {text}", file=sys.stderr, flush=True)
        except (OSError, ValueError):  # stderr gone: nothing to tell
            pass

    warnings.showwarning = show
    warnings.simplefilter("always", SCHPWarning)
    logger = logging.getLogger("schp")
    if _HANDLER not in logger.handlers:
        logger.addHandler(_HANDLER)
    if logger.level == logging.NOTSET or logger.level > logging.INFO:
        logger.setLevel(logging.INFO)
