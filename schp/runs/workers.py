"""Decoding workers for a run: DataLoader processes that leave the stop signals to the main process.

Workers ignore Ctrl-C, SIGTERM and SIGHUP, so that a signal to the whole process group (as batch
schedulers and terminals send) ends the run like one Ctrl-C to the main process; they are forked with
those signals blocked, so none dies of one before it ignores them, and the kernel kills them when the
main process dies (kill -9 included).
"""
import signal
import sys
from typing import Iterator, List

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
    signal that arrived meanwhile as soon as the mask is lifted)."""
    if not getattr(loader, "num_workers", 0):
        return iter(loader)
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        return iter(loader)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


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
