"""Running under torchrun: one process per GPU (or CPU slot); the extractor's shares, the trainer's ranks.

torchrun starts the processes and sets RANK, WORLD_SIZE and LOCAL_RANK (and where to meet) in their
environment. Each process takes shard rank+1 of world size of the sorted inputs, exactly as
`--shard` does, and runs on cuda:LOCAL_RANK when CUDA is used. At the end the processes gather their
outcomes with torch.distributed (gloo on CPU, NCCL on GPU) so that rank 0 prints one summary and
writes one manifest; every process then exits with the code of the whole run. The outputs are those
of a single-process run: sharding only splits the work. The trainer uses the same Rank for its
process group, loss averages and rank 0's decisions (`mean`, `broadcast`; a world of one needs none).
"""
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import List, Optional, Sequence, TypeVar

import torch

T = TypeVar("T")
# Ranks finish their shares at different times and wait for the slowest in the final gather; a
# process group's default timeout (10-30 min) would kill the fast ones on a long, uneven run.
WAIT = timedelta(days=7)


@dataclass
class Rank:
    """This process's place in a torchrun job."""
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int = 1  # processes on this machine
    started: bool = False  # the process group is up

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def share(self, items: Sequence[T]) -> List[T]:
        """This rank's items: every world_size-th from position rank (shard rank+1 of world_size)."""
        return list(items[self.rank::self.world_size])

    def merge(self, shares: Sequence[Sequence[T]]) -> List[T]:
        """Undo `share`: the per-rank lists (in rank order) back in the original order."""
        total = sum(len(s) for s in shares)
        return [shares[i % self.world_size][i // self.world_size] for i in range(total)]

    def device(self, device: str, gpu: Optional[str]) -> str:
        """The --device this rank uses: cuda:LOCAL_RANK where the run would use CUDA without a given index.

        An explicit cuda:N (or --device cpu, or --gpu None) is kept as given. With fewer visible GPUs
        than local ranks, ranks share them round-robin.
        """
        if gpu is not None and str(gpu).strip().lower() in ("none", "", "-1", "cpu"):
            return device
        if device in ("auto", "cuda") and torch.cuda.is_available():
            return f"cuda:{self.local_rank % torch.cuda.device_count()}"
        return device

    def backend(self, device: torch.device) -> str:
        """NCCL when every process of this machine has a GPU of its own (NCCL refuses two ranks on one
        GPU), else gloo."""
        if device.type == "cuda" and torch.cuda.device_count() >= self.local_world_size:
            return "nccl"
        return "gloo"

    def start(self, device: torch.device, timeout: timedelta = WAIT) -> None:
        """Join the other ranks (blocks until all have arrived)."""
        import torch.distributed as dist

        backend = self.backend(device)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend, timeout=timeout, device_id=device if backend == "nccl" else None)
        self.started = True

    def mean(self, values: torch.Tensor) -> torch.Tensor:
        """The average of `values` over the ranks (itself in a world of one)."""
        import torch.distributed as dist

        if not self.started:
            return values
        values = values.clone()
        dist.all_reduce(values)
        return values / self.world_size

    def broadcast(self, value: T) -> T:
        """Rank 0's `value`, on every rank (itself in a world of one)."""
        import torch.distributed as dist

        if not self.started:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, value: T) -> List[T]:
        """Every rank's `value`, in rank order, on every rank (waits for all)."""
        import torch.distributed as dist

        values: List[Optional[T]] = [None] * self.world_size
        dist.all_gather_object(values, value)
        return values

    def barrier(self) -> None:
        import torch.distributed as dist

        if self.started:
            dist.barrier()

    def stop(self) -> None:
        import torch.distributed as dist

        if self.started and dist.is_initialized():
            dist.destroy_process_group()
        self.started = False


def from_environment() -> Optional[Rank]:
    """The torchrun rank of this process, or None when not started by torchrun (or a world of one)."""
    try:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
        local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", str(world_size)))
    except ValueError:
        return None
    if world_size <= 1:
        return None
    if not 0 <= rank < world_size:
        raise ValueError(f"RANK={rank} is not below WORLD_SIZE={world_size}")
    return Rank(rank, world_size, local_rank, local_world_size)


def gather_report(ranks: Rank, report, parser):
    """(one RunReport of the whole run, each rank's device) from every rank's own report.

    Outcomes come back in the order of the inputs before sharing; the run counts as interrupted or
    stopped if any rank was, and lasted as long as the slowest rank.
    """
    from schp.runs.loop import RunReport

    mine = (report.outcomes, report.interrupted, report.stopped_reason, report.seconds,
            str(parser.device) if parser else None)
    everyone = ranks.gather(mine)
    merged = RunReport(outcomes=ranks.merge([r[0] for r in everyone]),
                       interrupted=any(r[1] for r in everyone),
                       stopped_reason=next((r[2] for r in everyone if r[2]), None),
                       seconds=max(r[3] for r in everyone))
    return merged, [r[4] for r in everyone]
