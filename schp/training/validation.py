"""Validation during training: the model of that point scored on the `val` split with the evaluator's code."""
from pathlib import Path
from typing import Dict

import torch

from schp.data.catalog import DatasetSpec


def has_split(data_dir: Path, split: str) -> bool:
    return (Path(data_dir) / f"{split}_id.txt").is_file()


def validate(spec: DatasetSpec, state: Dict[str, torch.Tensor], data_dir: Path, device: torch.device) -> Dict:
    """Metrics of a model (state dict without `module.`) on the `val` split, with the evaluator's code.

    Returns {"val_mean_iou": ..., "val_pixel_accuracy": ..., "val_mean_accuracy": ..., "val": as_dict()}.
    """
    from schp.evaluation import evaluate
    from schp.inference import HumanParser

    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        parser = HumanParser(spec, state, device)  # sets the TF32 switches for exact inference
        result = evaluate(parser, data_dir, "val", quiet=True)
    finally:  # training goes on with the switches it had
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    return {"val_mean_iou": float(result.mean_iou), "val_pixel_accuracy": float(result.pixel_accuracy),
            "val_mean_accuracy": float(result.mean_accuracy), "val": result.as_dict()}
