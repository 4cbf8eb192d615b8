"""One epoch of training, and the self-correction step at the end of a cycle.

`train_one_epoch` runs this rank's shard once: the student on hard labels (and, from the first cycle
on, the SCHP teacher's soft targets), the loss averaged over the ranks so that every rank sees the
same value and all stop together on a non-finite one.
"""
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Optional

import torch
import torch.distributed as dist
from torch import nn

from schp.data.augment import edge_target
from schp.distributed import Rank
from schp.training.config import TrainingError
from schp.training.losses import SCHPLoss
from schp.training.self_correction import aggregate_parameters, reestimate_bn


@dataclass
class Models:
    model: nn.Module  # the student, trained by the optimizer
    schp_model: nn.Module  # the SCHP teacher: the running average of the student at cycle ends
    net: nn.Module  # `model`, or its DistributedDataParallel wrapper under torchrun
    optimizer: torch.optim.Optimizer


def train_one_epoch(models: Models, criterion: SCHPLoss, loader, epoch: int, lr: float, cycle_n: int, *,
                    device: torch.device, autocast: Callable, ranks: Rank, soft_eval_mode: bool,
                    last: Path, progress: Optional[Callable] = None) -> Dict:
    """Train one epoch at learning rate `lr`; returns its metrics row (mean losses, lr, cycle_n, iterations).

    A non-finite loss raises TrainingError (exit 1) before that step is taken, naming `last`, the last
    good checkpoint, when it exists. `progress` wraps the loader (a progress bar) on the main rank.
    """
    model, schp_model, optimizer = models.model, models.schp_model, models.optimizer
    started = time.time()
    for group in optimizer.param_groups:
        group["lr"] = lr
    model.train()
    schp_model.train(not soft_eval_mode)
    sums = torch.zeros(1 + len(SCHPLoss.TERMS), dtype=torch.float64)
    iterations = 0
    batches = progress(loader) if progress is not None else loader
    for iteration, (images, labels) in enumerate(batches):
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        edges = edge_target(labels)
        with autocast():
            outputs = models.net(images)
            soft = None
            if cycle_n >= 1:
                with torch.no_grad():
                    teacher = schp_model(images)
                soft = (teacher.fusion, teacher.edge)
        loss, terms = criterion(tuple(outputs), labels, edges, cycle_n, soft)
        values = torch.stack([loss.detach()] + [terms[k] for k in SCHPLoss.TERMS]).double()
        values = ranks.mean(values).cpu()  # every rank sees the same value, so all stop together
        if not math.isfinite(float(values[0])):
            kept = f"the last good checkpoint is {last}" if last.is_file() else "no checkpoint was written"
            raise TrainingError(f"the loss is {float(values[0])} at epoch {epoch} iteration {iteration}; "
                                f"training stopped before that step, {kept}", exit_code=1)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        sums += values
        iterations += 1
        if hasattr(batches, "set_postfix"):
            rate = (iteration + 1) * images.shape[0] * ranks.world_size / max(1e-9, time.time() - started)
            batches.set_postfix(loss=f"{float(values[0]):.4f}", lr=f"{lr:.3g}", img_s=f"{rate:.1f}")
    means = (sums / max(1, iterations)).tolist()
    return {"epoch": epoch, "lr": lr, "loss": means[0],
            **{f"loss_{k}": v for k, v in zip(SCHPLoss.TERMS, means[1:])},
            "cycle_n": cycle_n, "iterations": iterations}


def self_correct(models: Models, cycle_n: int, epoch: int, dataset, sampler, loader, *, device: torch.device,
                 autocast: Callable, ranks: Rank) -> int:
    """End of a cycle: average the student into the SCHP model, re-estimate its batch statistics on
    the training data (a shuffle of its own, not the next epoch's); returns the new cycle count."""
    aggregate_parameters(models.schp_model, models.model, cycle_n)
    dataset.set_epoch(epoch, 1)
    sampler.set_epoch(epoch + 1_000_000)
    reestimate_bn(models.schp_model, (images for images, _ in loader), device, autocast)
    if ranks.started:  # rank 0's statistics, as the released single-process run kept GPU 0's
        for buffer in models.schp_model.buffers():
            dist.broadcast(buffer, src=0)
    return cycle_n + 1
