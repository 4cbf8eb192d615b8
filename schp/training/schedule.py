"""The learning rate of each epoch, in closed form (SGDR with warm-up, as released).

Set once at the start of an epoch and constant for all its iterations:
  e < warmup:               eta_min + e * (base - eta_min) / warmup
  warmup <= e < schp_start: cosine from base down to eta_min over [warmup, schp_start)
  e >= schp_start:          cosine restarts from base/2 every cycle_epochs
with eta_min = base / 100.
"""
import math


def learning_rate(epoch: int, base: float, warmup: int = 10, schp_start: int = 100,
                  cycle_epochs: int = 10) -> float:
    eta_min = base / 100
    if epoch < warmup:
        return eta_min + epoch * (base - eta_min) / warmup
    if epoch < schp_start:
        return eta_min + (base - eta_min) * (1 + math.cos(math.pi * (epoch - warmup) / (schp_start - warmup))) / 2
    cyclic_base = base / 2
    return eta_min + (cyclic_base - eta_min) * (1 + math.cos(math.pi * ((epoch - schp_start) % cycle_epochs)
                                                             / cycle_epochs)) / 2


def is_cycle_end(epoch: int, schp_start: int, cycle_epochs: int) -> bool:
    """Whether self-correction (aggregation, re-estimation, schp_k checkpoint) follows 0-based `epoch`."""
    done = epoch + 1
    return done >= schp_start and (done - schp_start) % cycle_epochs == 0
