"""Decoding workers for a run: DataLoader processes that leave the stop signals to the main process.

Workers ignore Ctrl-C, SIGTERM and SIGHUP, so that a signal to the whole process group (as batch
schedulers and terminals send) ends the run like one Ctrl-C to the main process; they are forked with
those signals blocked, so none dies of one before it ignores them, and the kernel kills them when the
main process dies (kill -9 included).
"""
import signal
import sys
import threading
from dataclasses import dataclass
from typing import Any, Callable, Iterator, List, Optional, Tuple

import cv2
import torch

from schp.runs.loop import STOP_SIGNALS, stop_signals_held


def _die_with_parent() -> None:
    """Linux: have the kernel kill this worker when the main process dies (kill -9 included).

    Otherwise an orphaned DataLoader worker can block forever flushing its result queue into a pipe
    nobody reads, holding the caller's stderr open.
    """
    if sys.platform.startswith("linux"):
        import ctypes
        try:
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except OSError:
            pass


def worker_init(_: int) -> None:
    _die_with_parent()
    for signum in STOP_SIGNALS:  # the main process handles them, and stops us
        signal.signal(signum, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)  # blocked while we were forked
    cv2.setNumThreads(1)
    torch.set_num_threads(1)


def start_workers(loader) -> Iterator:
    """Iterate `loader`, forking its workers with the stop signals blocked (the main process gets a
    signal that arrived meanwhile as soon as the mask is lifted).

    torch's SIGCHLD handler, which raises wherever the main thread happens to be when a worker dies,
    is taken off again: the death is then seen where a batch is awaited (within seconds), so that
    `surviving_workers` can fail the input in flight and go on."""
    if not getattr(loader, "num_workers", 0):
        return iter(loader)
    main = threading.current_thread() is threading.main_thread()
    child = signal.getsignal(signal.SIGCHLD) if main else None
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        return iter(loader)
    finally:
        if main and child is not None:
            signal.signal(signal.SIGCHLD, child)
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


@dataclass
class LostInput:
    """An input whose decoding worker died (killed, out of memory, crashed); `reason` says so."""
    index: int
    reason: str


def _lost_batch(batches) -> Optional[Tuple[int, str]]:
    """(batch number, reason) of the batch a dead worker of `batches` was decoding; None if no worker
    died. A worker takes its batches in order, so its oldest outstanding one was in flight."""
    workers = list(getattr(batches, "_workers", ()))
    dead = [k for k, w in enumerate(workers) if not w.is_alive()]
    if not dead:
        return None
    info = getattr(batches, "_task_info", {}) or {}
    theirs = sorted(idx for idx, task in info.items() if len(task) == 1 and task[0] in dead)
    number = theirs[0] if theirs else getattr(batches, "_rcvd_idx", 0)
    code = workers[dead[0]].exitcode
    how = f"killed by signal {-code}" if code is not None and code < 0 else f"exit status {code}"
    if code == -signal.SIGKILL:
        how += ", e.g. by the kernel when out of memory"
    return number, f"the decoding worker died on this input ({how}); the other inputs went on"


def surviving_workers(make_loader: Callable[[List[int]], Any], count: int,
                      started: Callable[[Any], None]) -> Iterator[Tuple[int, Any]]:
    """(position, item) for inputs 0..count-1, in order, from `make_loader(positions)` (a DataLoader
    over those positions, its items' `.index` = place in that list, sequential batches). When a
    worker dies, its input comes as a LostInput and a new pool decodes the rest: one input lost, not
    the run. `started(batches)` is told each pool (so a stop can end it); a stop signal held while a
    dead pool is shut down raises KeyboardInterrupt."""
    remaining = list(range(count))
    while remaining:
        loader = make_loader(remaining)
        batches = start_workers(loader)
        started(batches)
        done = set()
        try:
            for items in batches:
                for item in items:
                    done.add(item.index)
                    yield remaining[item.index], item
            return
        except RuntimeError:
            lost = _lost_batch(batches)
            if lost is None:
                raise
        number, reason = lost
        size = getattr(loader, "batch_size", 1) or 1
        gone = [j for j in range(number * size, min((number + 1) * size, len(remaining))) if j not in done]
        if not gone:  # nothing matched: the next input in order is the one awaited
            gone = [next(j for j in range(len(remaining)) if j not in done)]
        if stop_workers(batches):
            raise KeyboardInterrupt
        for j in gone:
            yield remaining[j], LostInput(j, reason)
        remaining = [p for j, p in enumerate(remaining) if j not in done and j not in gone]


def stop_workers(batches) -> bool:
    """Shut the loader's workers down now; True if a stop signal arrived meanwhile.

    The DataLoader asks them to leave, waits, then sends SIGTERM, which ours ignore: a worker still
    there after that (stuck on a hung file) is killed, or leaving Python would wait for it forever.
    Stop signals are held meanwhile (seconds at most), so the shutdown is never left half done.
    """
    shutdown = getattr(batches, "_shutdown_workers", None)
    if shutdown is None:
        return False
    workers: List = list(getattr(batches, "_workers", ()))
    with stop_signals_held() as held:
        try:
            shutdown()
        finally:
            for worker in workers:
                if worker.is_alive():
                    worker.kill()
                    worker.join(timeout=5)
    return bool(held.received)
