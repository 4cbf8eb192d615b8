"""What a training job is given (TrainConfig, built by train.py from its command line) and how it fails."""
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Optional, Tuple

from schp.data.catalog import DatasetSpec
from schp.data.decode import DEFAULT_MAX_PIXELS
from schp.errors import EXIT_SETUP, SCHPError


class TrainingError(SCHPError):
    """A problem that stops training; the message is one line for the user."""

    def __init__(self, message: str, exit_code: int = EXIT_SETUP):
        super().__init__(message)
        self.exit_code = exit_code


@dataclass
class TrainConfig:
    spec: DatasetSpec
    data_dir: Path
    log_dir: Path
    split: str = "train"
    flip_pairs: Tuple[Tuple[int, int], ...] = ()
    batch_size: int = 16
    epochs: int = 150
    warmup_epochs: int = 10
    schp_start: int = 100
    cycle_epochs: int = 10
    eval_epochs: int = 10
    learning_rate: float = 7e-3
    momentum: float = 0.9
    weight_decay: float = 5e-4
    lambda_s: float = 1.0
    lambda_e: float = 1.0
    lambda_c: float = 0.1
    fix_ignore: bool = False
    soft_eval_mode: bool = False
    sync_bn: bool = False
    device: str = "auto"
    gpu: Optional[str] = None
    num_workers: int = 4
    seed: Optional[int] = None
    precision: str = "fp32"
    imagenet_pretrain: Optional[Path] = None
    init_from: Optional[Path] = None
    model_restore: Optional[Path] = None
    schp_restore: Optional[Path] = None
    resume: Optional[Path] = None
    stop_after: Optional[int] = None
    check_data_only: bool = False
    max_pixels: Optional[int] = DEFAULT_MAX_PIXELS  # images and labels declaring more are refused
    quiet: bool = False
    args: Dict = field(default_factory=dict)  # the command line, stored in args.json and last.pth.tar
