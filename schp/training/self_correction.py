"""Self-correction at the end of a cycle: average the model into the SCHP model, re-estimate its BN.

After k cycles the SCHP model's parameters are the plain mean of the k end-of-cycle snapshots of the
trained model (running averages of parameters only; buffers are not averaged). Its batch-norm
statistics are then recomputed from the training data: the mean over batches of each batch's
mean and unbiased variance, computed with train-mode normalisation upstream.
"""
from typing import Iterable

import torch
from torch import nn

from schp.networks import InPlaceABN


@torch.no_grad()
def aggregate_parameters(schp_model: nn.Module, model: nn.Module, cycle_n: int) -> None:
    """p_schp = (1 - a) p_schp + a p_model with a = 1/(cycle_n + 1), cycle_n counted before this cycle."""
    a = 1.0 / (cycle_n + 1)
    for p_schp, p_model in zip(schp_model.parameters(), model.parameters()):
        p_schp.mul_(1.0 - a).add_(p_model.detach().to(p_schp.dtype), alpha=a)


def norm_layers(model: nn.Module):
    return [m for m in model.modules() if isinstance(m, InPlaceABN)]


@torch.no_grad()
def reestimate_bn(model: nn.Module, batches: Iterable[torch.Tensor], device: torch.device,
                  autocast=None) -> int:
    """Recompute every InPlace-ABN's running statistics as the cumulative mean over `batches`.

    Train mode, statistics reset to (0, 1), momentum b/(n+b) for the batch of b images after n;
    momentum 0.1 restored afterwards. Returns the number of images seen.
    """
    layers = norm_layers(model)
    was_training = model.training
    model.train()
    for layer in layers:
        layer.running_mean.zero_()
        layer.running_var.fill_(1)
    seen = 0
    try:
        for images in batches:
            b = images.shape[0]
            for layer in layers:
                layer.momentum = b / (seen + b)
            images = images.to(device, non_blocking=True)
            if autocast is None:
                model(images)
            else:
                with autocast():
                    model(images)
            seen += b
    finally:
        for layer in layers:
            layer.momentum = 0.1
        model.train(was_training)
    return seen
