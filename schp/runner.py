"""The loop over inputs: skip what is done, parse the rest in batches, write results off the critical path.

Each input ends as processed, skipped (its outputs already exist) or failed (one line on stderr naming
the file and the reason); a failure never stops the others. Decoding runs in DataLoader workers, the
forward pass in the main thread, the inverse warp and the writing in a small thread pool.

Signals: Ctrl-C, SIGTERM and SIGHUP (a closed terminal) stop the run after the outputs in flight are
written (a second one stops the waiting); workers ignore them and leave them to the main process, so
that a signal to the whole process group (as batch schedulers and terminals send) ends the run like a
Ctrl-C. A signal ignored when the run starts (nohup) stays ignored.
"""
import errno
import signal
import sys
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Deque, Dict, Iterator, List, Optional, Sequence, Tuple

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from schp.data.crop import Prepared, SimpleFolderDataset, collate_prepared
from schp.data.decode import DEFAULT_MAX_PIXELS, ImageError, read_image
from schp.errors import describe_exception
from schp.signals import raise_keyboard_interrupt
from schp.inference import HumanParser, labels_from_logits
from schp.utils.outputs import (integratedpifu_codes, npy_memmap, remove_stale_temporaries, save_label_png,
                           save_npy, save_overlay)

# Errors after which writing anything more is pointless: stop the run instead of failing every file.
FATAL_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS}
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def _handled(signals=STOP_SIGNALS) -> List[int]:
    """The stop signals this process does not ignore (nohup ignores SIGHUP; a background job SIGINT)."""
    return [s for s in signals if signal.getsignal(s) is not signal.SIG_IGN]


@dataclass
class Task:
    """One input image and the outputs it should produce (None = not asked for)."""
    source: Path
    name: str  # how messages name the input (relative to the input root)
    png: Optional[Path] = None  # palette label map
    codes: Optional[Path] = None  # IntegratedPIFu float32 code map
    logits: Optional[Path] = None  # H x W x C float32 logits
    overlay: Optional[Path] = None  # colour map over the image, JPEG
    refusal: Optional[str] = None  # known before the run not to be doable (e.g. an output name clash)

    @property
    def outputs(self) -> List[Path]:
        return [p for p in (self.png, self.codes, self.logits, self.overlay) if p is not None]

    def is_done(self) -> bool:
        return all(p.exists() for p in self.outputs)

    def plan(self, overwrite: bool) -> str:
        """What a run does with this task: "fail" (refused), "skip" (outputs exist) or "process"."""
        if self.refusal:
            return "fail"
        return "skip" if not overwrite and self.is_done() else "process"


@dataclass
class Outcome:
    task: Task
    status: str  # processed, skipped, failed, or not-run (interrupted before its turn)
    reason: Optional[str] = None
    width: int = 0
    height: int = 0
    seconds: float = 0.0


@dataclass
class RunReport:
    outcomes: List[Outcome] = field(default_factory=list)
    interrupted: bool = False
    stopped_reason: Optional[str] = None
    seconds: float = 0.0
    abandoned: int = 0  # outputs in flight not waited for (a second interrupt); counted as not-run

    def count(self, status: str) -> int:
        return sum(o.status == status for o in self.outcomes)

    def summary_line(self) -> str:
        done = self.count("processed")
        rate = f", {done / self.seconds:.2f} images/s" if done and self.seconds > 0 else ""
        head = "interrupted" if self.interrupted else ("stopped" if self.stopped_reason else "done")
        line = (f"{head}: {done} processed, {self.count('skipped')} skipped, {self.count('failed')} failed"
                f" of {len(self.outcomes)} inputs in {self.seconds:.1f} s{rate}")
        not_run = self.count("not-run")
        return line + (f" ({not_run} not reached; run again to resume)" if not_run else "")


def finish(task: Task, item: Prepared, parser: HumanParser, palette: Sequence[int],
           logits: Optional[np.ndarray] = None, labels: Optional[np.ndarray] = None) -> None:
    """Write every asked output of one image, from its label map or, on the CPU path, from its
    in_h x in_w x C logits (inverse warp + argmax here, in a writer thread)."""
    for path in task.outputs:
        path.parent.mkdir(parents=True, exist_ok=True)
    if labels is None:
        size = parser.spec.input_size
        if task.logits is not None:
            with npy_memmap(task.logits, (item.height, item.width, logits.shape[2])) as full:
                labels = labels_from_logits(logits, item.center, item.scale, item.width, item.height, size, full)
        else:
            labels = labels_from_logits(logits, item.center, item.scale, item.width, item.height, size)
    if task.codes is not None:
        save_npy(integratedpifu_codes(labels), task.codes)
    if task.overlay is not None:
        save_overlay(read_image(task.source), labels, palette, task.overlay)
    if task.png is not None:
        save_label_png(labels, palette, task.png)


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


def _worker_init(_: int) -> None:
    _die_with_parent()
    for signum in STOP_SIGNALS:  # the main process handles them, and stops us
        signal.signal(signum, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)  # blocked while we were forked
    cv2.setNumThreads(1)
    torch.set_num_threads(1)


def _start_workers(loader) -> Iterator:
    """Iterate `loader`, forking its workers with the stop signals (Ctrl-C, SIGTERM, SIGHUP) blocked.

    A worker thus never dies of a signal meant for the process group before `_worker_init` makes it
    ignore them (a dead worker would end the run as "input pipeline failed"); the main process gets
    a signal that arrived meanwhile as soon as the mask is lifted.
    """
    if not getattr(loader, "num_workers", 0):
        return iter(loader)
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        return iter(loader)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _stop_workers(batches) -> bool:
    """Shut the loader's workers down now; True if a stop signal arrived meanwhile.

    The DataLoader asks them to leave, waits, then sends SIGTERM, which ours ignore: a worker still
    there after that (stuck on a hung file) is killed, or leaving Python would wait for it forever.
    Stop signals are held meanwhile (seconds at most), so the shutdown is never left half done.
    """
    shutdown = getattr(batches, "_shutdown_workers", None)
    if shutdown is None:
        return False
    received: List[int] = []
    previous = {s: signal.signal(s, lambda signum, frame: received.append(signum)) for s in _handled()}
    workers = list(getattr(batches, "_workers", ()))
    try:
        shutdown()
    finally:
        for worker in workers:
            if worker.is_alive():
                worker.kill()
                worker.join(timeout=5)
        for s, handler in previous.items():
            signal.signal(s, handler)
    return bool(received)



def describe_error(err: BaseException) -> str:
    if isinstance(err, OSError):
        where = f" {err.filename}" if err.filename else ""
        return f"cannot write{where}: {err.strerror or err}"
    if isinstance(err, ImageError):
        return str(err)
    if isinstance(err, MemoryError):
        return "out of memory"
    return describe_exception(err)


class Runner:
    """Runs tasks through a HumanParser (None when every task is already done).

    `say` prints a line to stderr, kept apart from the progress bar.
    """

    def __init__(self, parser: Optional[HumanParser], palette: Sequence[int], batch_size: int = 1, num_workers: int = 1,
                 quiet: bool = False, write_threads: int = 2, max_pixels: Optional[int] = DEFAULT_MAX_PIXELS):
        self.parser, self.palette = parser, palette
        self.batch_size, self.num_workers = batch_size, num_workers
        self.quiet, self.write_threads = quiet, write_threads
        self.max_pixels = max_pixels  # inputs declaring more pixels are refused before decoding

    def _submit(self, good: List[Prepared], todo, pending, t0: float, pool: ThreadPoolExecutor) -> None:
        """Forward pass of a batch, then hand each image to a writer thread.

        Everything that can fail for the whole batch (forward, device post-processing) runs before
        anything is queued, so a failure leaves no image of the batch half-reported.
        """
        logits = self.parser.logits(torch.from_numpy(np.stack([item.image for item in good])))
        host = None
        works = []
        for k, item in enumerate(good):
            if self.parser.postprocess_on_device and todo[item.index][1].logits is None:
                works.append(dict(labels=self.parser.labels(logits[k], item.center, item.scale, item.width,
                                                            item.height)))
            else:
                if host is None:
                    host = logits.permute(0, 2, 3, 1).cpu().numpy()  # N x in_h x in_w x C
                works.append(dict(logits=host[k]))
        share = (time.perf_counter() - t0) / len(good)
        for item, work in zip(good, works):
            i, task = todo[item.index]
            pending.append((i, task, item, share, pool.submit(finish, task, item, self.parser, self.palette, **work)))

    def say(self, line: str) -> None:
        tqdm.write(line, file=sys.stderr)

    def run(self, tasks: Sequence[Task], overwrite: bool = False) -> RunReport:
        start = time.perf_counter()
        report = RunReport()
        outcomes: Dict[int, Outcome] = {}
        for folder in sorted({p.parent for t in tasks for p in t.outputs}):
            remove_stale_temporaries(folder)
        todo: List[Tuple[int, Task]] = []
        refused = []
        for i, task in enumerate(tasks):
            state = task.plan(overwrite)
            if state == "fail":
                refused.append((i, task))
            elif state == "skip":
                outcomes[i] = Outcome(task, "skipped")
            else:
                todo.append((i, task))
        bar = tqdm(total=len(tasks), initial=len(outcomes), unit="img", file=sys.stderr,
                   disable=self.quiet, dynamic_ncols=True)

        def fail(i: int, task: Task, reason: str, item: Optional[Prepared] = None) -> None:
            outcomes[i] = Outcome(task, "failed", reason, item.width if item else 0, item.height if item else 0)
            self.say(f"error: {task.source}: {reason}")
            bar.update(1)

        for i, task in refused:
            fail(i, task, task.refusal)
        previous_handlers = {s: signal.signal(s, raise_keyboard_interrupt)
                             for s in _handled((signal.SIGTERM, signal.SIGHUP))}
        pool = ThreadPoolExecutor(max_workers=self.write_threads, thread_name_prefix="schp-write")
        pending: Deque[Tuple[int, Task, Prepared, float, Future]] = deque()

        def drain() -> None:
            """Wait for every output in flight; a (further) interrupt stops the waiting."""
            try:
                collect(block_beyond=0)
            except KeyboardInterrupt:
                report.interrupted = True
                report.abandoned = len(pending)
                pending.clear()
                self.say(f"interrupted again: not waiting for the {report.abandoned} output(s) still being "
                         "written (each is completed or removed, never left partial); writing the summary")

        def collect(block_beyond: int) -> None:
            while pending and (len(pending) > block_beyond or pending[0][4].done()):
                err = pending[0][4].exception()  # waits; an interrupt here leaves the entry pending
                i, task, item, seconds, future = pending.popleft()
                if err is None:
                    outcomes[i] = Outcome(task, "processed", None, item.width, item.height, seconds)
                    bar.update(1)
                    continue
                fail(i, task, describe_error(err), item)
                if isinstance(err, OSError) and err.errno in FATAL_WRITE_ERRNOS and not report.stopped_reason:
                    report.stopped_reason = describe_error(err)

        batches = None
        try:
            loader = DataLoader(SimpleFolderDataset([t.source for _, t in todo], self.parser.spec.input_size,
                                                    self.max_pixels),
                                batch_size=self.batch_size, num_workers=self.num_workers,
                                collate_fn=collate_prepared, worker_init_fn=_worker_init,
                                prefetch_factor=2 if self.num_workers else None) if todo else []
            batches = _start_workers(loader)
            for items in batches:
                t0 = time.perf_counter()
                for item in items:
                    if item.error is not None:
                        fail(*todo[item.index], item.error, item)
                good = [item for item in items if item.error is None]
                if good:
                    try:
                        self._submit(good, todo, pending, t0, pool)
                    except Exception as err:  # e.g. CUDA out of memory: this batch only
                        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
                        for item in good:
                            fail(*todo[item.index], f"inference failed: {reason}", item)
                collect(block_beyond=2 * self.batch_size)
                if report.stopped_reason:
                    break
            collect(block_beyond=0)
        except KeyboardInterrupt:
            report.interrupted = True
            self.say("interrupted: finishing the outputs in flight, then stopping (interrupt again to stop waiting)")
            drain()
        except RuntimeError as err:  # the DataLoader lost a worker (killed, out of memory)
            report.stopped_reason = f"input pipeline failed: {str(err).splitlines()[0]}"
            drain()
        except Exception as err:  # last resort: a defect, not an input's fault; keep what is done
            report.stopped_reason = f"unexpected error: {describe_exception(err)}"
            drain()
        finally:
            if _stop_workers(batches):
                report.interrupted = True
            # after a second interrupt, writes already running finish (atomically) in the background
            pool.shutdown(wait=not report.abandoned, cancel_futures=bool(report.abandoned))
            for s, handler in previous_handlers.items():
                signal.signal(s, handler)
            bar.close()
        if report.stopped_reason:
            self.say(f"stopped: {report.stopped_reason}")
        report.outcomes = [outcomes.get(i, Outcome(task, "not-run")) for i, task in enumerate(tasks)]
        report.seconds = time.perf_counter() - start
        return report
