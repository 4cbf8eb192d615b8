"""The one run loop of every batch job: plan -> prepare -> forward -> write, one outcome per task.

A job (folder images, IntegratedPIFu renders, video frames, multi-person images) supplies the stages:
`prepare` turns the tasks to do into a stream of units (decoded and cropped, in worker processes or
threads as the job chooses), `forward` runs the network on a batch of units in the calling thread,
`write` post-processes and writes one unit in a writer thread, and `collected` (optional) sees each
written unit in order in the calling thread (a video's encoder needs its frames in order). The loop
owns everything else, the same for every job: skip what is done, refuse what cannot be done, one
failed input never stops the others, a full disk stops the run, the stop signals, the report.

Signals: Ctrl-C, SIGTERM and SIGHUP (a closed terminal) stop the run after the outputs in flight are
written (a second one stops the waiting). A signal ignored when the run starts (nohup) stays ignored.
The loop reports through a `Reporter` (silent by default); commands pass one that prints.
"""
import errno
import signal
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Deque, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

from schp.errors import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, SCHPError, describe_exception
from schp.utils.outputs import remove_stale_temporaries

# Errors after which writing anything more is pointless: stop the run instead of failing every file.
FATAL_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS}
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def raise_keyboard_interrupt(signum, frame):
    """Signal handler: a stop signal (SIGTERM, SIGHUP) behaves as Ctrl-C."""
    raise KeyboardInterrupt


def handled_signals(signals=STOP_SIGNALS) -> List[int]:
    """The stop signals this process does not ignore (nohup ignores SIGHUP; a background job SIGINT)."""
    if threading.current_thread() is not threading.main_thread():  # only there can handlers be set
        return []
    return [s for s in signals if signal.getsignal(s) is not signal.SIG_IGN]


class stop_signals_as_interrupt:
    """SIGTERM and SIGHUP behave as Ctrl-C (KeyboardInterrupt) inside the block; restored on leaving."""

    def __enter__(self):
        self.previous = {s: signal.signal(s, raise_keyboard_interrupt)
                         for s in handled_signals((signal.SIGTERM, signal.SIGHUP))}
        return self

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)
        return False


class stop_signals_held:
    """Ctrl-C, SIGTERM and SIGHUP wait while the block runs (milliseconds: a summary, a manifest, a
    worker shutdown), so that a further interrupt cannot lose it. `received` lists what arrived."""

    def __enter__(self):
        self.received: List[int] = []
        self.previous = {s: signal.signal(s, lambda signum, frame: self.received.append(signum))
                         for s in handled_signals()}
        return self

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)
        return False


class Bar:
    """A progress bar that shows nothing (the library's default)."""

    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


class Reporter:
    """Where a run says things: a line per failed input or event, and progress bars. Silent here; the
    commands pass one that prints to the terminal."""

    def line(self, text: str) -> None:
        pass

    def bar(self, total: Optional[int], initial: int = 0, unit: str = "img", desc: Optional[str] = None,
            leave: bool = True) -> Bar:
        return Bar()


class Task:
    """What a job's tasks share: `refusal` (known before the run not to be doable), `outputs` (the
    files it writes) and `is_done` (they exist), from which the run plans it."""
    refusal: Optional[str] = None

    @property
    def outputs(self) -> List[Path]:
        raise NotImplementedError

    def is_done(self) -> bool:
        return all(p.exists() for p in self.outputs)

    def plan(self, overwrite: bool) -> str:
        """What a run does with this task: "fail" (refused), "skip" (outputs exist) or "process"."""
        if self.refusal:
            return "fail"
        return "skip" if not overwrite and self.is_done() else "process"


@dataclass
class Outcome:
    task: Any
    status: str  # processed, skipped, failed, or not-run (interrupted before its turn)
    reason: Optional[str] = None
    width: int = 0
    height: int = 0
    seconds: float = 0.0
    details: Dict[str, Any] = field(default_factory=dict)  # job-specific facts (persons, parts...)


@dataclass
class RunReport:
    outcomes: List[Outcome] = field(default_factory=list)
    interrupted: bool = False
    stopped_reason: Optional[str] = None
    seconds: float = 0.0
    abandoned: int = 0  # outputs in flight not waited for (a second interrupt); counted as not-run
    noun: str = "inputs"
    record: Optional[Dict[str, Any]] = None  # the manifest of the run
    summary_error: Optional[str] = None  # why the manifest could not be written
    late_signals: List[int] = field(default_factory=list)  # stop signals while the record was written

    def count(self, status: str) -> int:
        return sum(o.status == status for o in self.outcomes)

    def summary_line(self) -> str:
        done = self.count("processed")
        rate = f", {done / self.seconds:.2f} images/s" if done and self.seconds > 0 else ""
        head = "interrupted" if self.interrupted else ("stopped" if self.stopped_reason else "done")
        line = (f"{head}: {done} processed, {self.count('skipped')} skipped, {self.count('failed')} failed"
                f" of {len(self.outcomes)} {self.noun} in {self.seconds:.1f} s{rate}")
        not_run = self.count("not-run")
        return line + (f" ({not_run} not reached; run again to resume)" if not_run else "")

    def exit_code(self) -> int:
        """130 interrupted, 1 an input failed, the run stopped or its manifest could not be written, else 0."""
        if self.interrupted or self.late_signals:
            return EXIT_INTERRUPTED
        if self.count("failed") or self.stopped_reason or self.summary_error:
            return EXIT_FAILED
        return EXIT_OK


@dataclass
class Unit:
    """What the prepare stage hands on for one task: the whole input, or one of its parts (a video's
    frame; its last unit ends the task)."""
    index: int  # the task's position in the list given to `prepare`
    payload: Any = None  # what forward and write use
    error: Optional[str] = None  # this input cannot be done: the reason
    width: int = 0
    height: int = 0
    last: bool = True
    compute: bool = True  # False: nothing to run through the network (e.g. a frame parsed before)
    source: Optional[str] = None  # the file an error names, where it is not the task's (a ground truth)


class Job:
    """The stages a batch job supplies; see the module docstring. `batch_size` units per forward pass,
    `write_threads` writers (1 keeps writes in order)."""
    batch_size: int = 1
    write_threads: int = 2
    noun: str = "inputs"

    def output_folders(self, tasks: Sequence) -> Iterable[Path]:
        """Folders whose stale temporaries (of killed runs) are removed before the run."""
        return sorted({p.parent for t in tasks for p in t.outputs})

    def prepare(self, tasks: Sequence) -> Iterator[Unit]:
        raise NotImplementedError

    def forward(self, units: List[Unit]) -> List[Any]:
        """One work item per unit, for `write`; raising fails the whole batch ("inference failed")."""
        raise NotImplementedError

    def write(self, task, unit: Unit, work) -> Any:
        raise NotImplementedError

    def collected(self, task, unit: Unit, result) -> None:
        """A written unit, in stream order, in the calling thread."""

    def finish(self, task, ok: bool) -> None:
        """The task's last unit is done (`ok`: nothing failed) or the task was abandoned; finalise or
        discard what it kept open. Raising fails the task."""

    def stop(self) -> bool:
        """End the prepare stage's workers now; True if a stop signal arrived meanwhile."""
        return False


def describe_error(err: BaseException) -> str:
    if isinstance(err, OSError):
        where = f" {err.filename}" if err.filename else ""
        return f"cannot write{where}: {err.strerror or err}"
    if isinstance(err, SCHPError):
        return str(err)
    if isinstance(err, MemoryError):
        return "out of memory"
    return describe_exception(err)


def inference_failure(err: BaseException) -> str:
    reason = str(err).splitlines()[0] if str(err) else type(err).__name__
    return f"inference failed: {reason}"


@dataclass
class _State:
    """A task in progress: what its units have given so far."""
    error: Optional[str] = None
    source: Optional[str] = None  # the file the error names, where it is not the task's
    width: int = 0
    height: int = 0
    seconds: float = 0.0
    details: Dict[str, Any] = field(default_factory=dict)


def run(job: Job, tasks: Sequence, overwrite: bool = False, reporter: Optional[Reporter] = None) -> RunReport:
    """Run `tasks` through `job`; the report has one outcome per task, in the order given."""
    reporter = reporter or Reporter()
    start = time.perf_counter()
    report = RunReport(noun=job.noun)
    outcomes: Dict[int, Outcome] = {}
    for folder in job.output_folders(tasks):
        remove_stale_temporaries(folder)
    todo: List[Tuple[int, Any]] = []
    refused = []
    for i, task in enumerate(tasks):
        state = task.plan(overwrite)
        if state == "fail":
            refused.append((i, task))
        elif state == "skip":
            outcomes[i] = Outcome(task, "skipped")
        else:
            todo.append((i, task))
    bar = reporter.bar(total=len(tasks), initial=len(outcomes), unit="img")
    states: Dict[int, _State] = {}

    def fail(i: int, task, reason: str, width: int = 0, height: int = 0, source: Optional[str] = None) -> None:
        """`source`: the file at fault where it is not the task's (kept in the outcome's details)."""
        outcomes[i] = Outcome(task, "failed", reason, width, height, details={"source": source} if source else {})
        reporter.line(f"error: {source or task.source}: {reason}")
        bar.update(1)

    def end(k: int) -> None:
        """Task k's last unit is written (or failed): finalise it and record its outcome."""
        i, task = todo[k]
        state = states.pop(k)
        try:
            job.finish(task, state.error is None)
        except Exception as err:
            state.error = state.error or describe_error(err)
            note_fatal(err)
        if state.error is not None:
            fail(i, task, state.error, state.width, state.height, state.source)
        else:
            outcomes[i] = Outcome(task, "processed", None, state.width, state.height, state.seconds, state.details)
            bar.update(1)

    def note_fatal(err: BaseException) -> None:
        if isinstance(err, OSError) and err.errno in FATAL_WRITE_ERRNOS and not report.stopped_reason:
            report.stopped_reason = describe_error(err)

    for i, task in refused:
        fail(i, task, task.refusal)
    signals = stop_signals_as_interrupt().__enter__()
    pool = ThreadPoolExecutor(max_workers=job.write_threads, thread_name_prefix="schp-write")
    pending: Deque[Tuple[Unit, float, Future]] = deque()

    def collect(block_beyond: int) -> None:
        while pending and (len(pending) > block_beyond or pending[0][2].done()):
            err = pending[0][2].exception()  # waits; an interrupt here leaves the entry pending
            unit, seconds, future = pending.popleft()
            state = states[unit.index]
            task = todo[unit.index][1]
            if err is not None and state.error is None:
                state.error = describe_error(err)
                note_fatal(err)
            if err is None and state.error is None:
                state.seconds += seconds
                result = future.result()
                if isinstance(result, dict):
                    state.details.update(result)
                try:
                    job.collected(task, unit, result)
                except Exception as failure:
                    state.error = describe_error(failure)
                    note_fatal(failure)
            if unit.last:
                end(unit.index)

    def done_future(value=None) -> Future:
        future: Future = Future()
        future.set_result(value)
        return future

    def submit(batch: List[Unit], t0: float) -> None:
        """Forward pass of a batch, then each unit to a writer. Whatever fails for the whole batch runs
        before anything is queued, so a failure leaves no unit of it half-reported."""
        live = [u for u in batch if states[u.index].error is None]
        works: List[Any] = []
        if live:
            try:
                works = job.forward(live)
            except Exception as err:  # e.g. CUDA out of memory: this batch only
                reason = inference_failure(err)
                for u in live:
                    states[u.index].error = states[u.index].error or reason
                live, works = [], []
        share = (time.perf_counter() - t0) / max(1, len(batch))
        by_unit = {id(u): w for u, w in zip(live, works)}
        for u in batch:
            if id(u) in by_unit:
                pending.append((u, share, pool.submit(job.write, todo[u.index][1], u, by_unit[id(u)])))
            else:
                pending.append((u, 0.0, done_future()))  # failed meanwhile: ends with its reason

    def drain() -> None:
        """Wait for every output in flight; a (further) interrupt stops the waiting."""
        try:
            collect(block_beyond=0)
        except KeyboardInterrupt:
            report.interrupted = True
            report.abandoned = len(pending)
            pending.clear()
            reporter.line(f"interrupted again: not waiting for the {report.abandoned} output(s) still being "
                          "written (each is completed or removed, never left partial); writing the summary")

    stream = None
    try:
        stream = job.prepare([t for _, t in todo]) if todo else iter(())
        batch: List[Unit] = []
        t0 = time.perf_counter()
        for unit in stream:
            state = states.setdefault(unit.index, _State())
            state.width, state.height = unit.width or state.width, unit.height or state.height
            if unit.error is not None and state.error is None:
                state.error, state.source = unit.error, unit.source
            if state.error is not None or not unit.compute:
                if batch:  # keep the stream's order: what is queued before goes first
                    submit(batch, t0)
                    batch = []
                if state.error is None:
                    pending.append((unit, 0.0, pool.submit(job.write, todo[unit.index][1], unit, None)))
                else:
                    pending.append((unit, 0.0, done_future()))
            else:
                if not batch:
                    t0 = time.perf_counter()
                batch.append(unit)
                if len(batch) >= job.batch_size:
                    submit(batch, t0)
                    batch = []
            collect(block_beyond=2 * job.batch_size)
            if report.stopped_reason:
                break
        if batch and not report.stopped_reason:
            submit(batch, t0)
        collect(block_beyond=0)
    except KeyboardInterrupt:
        report.interrupted = True
        reporter.line("interrupted: finishing the outputs in flight, then stopping (interrupt again to stop waiting)")
        drain()
    except RuntimeError as err:  # the input pipeline lost a worker (killed, out of memory)
        report.stopped_reason = f"input pipeline failed: {str(err).splitlines()[0]}"
        drain()
    except Exception as err:  # last resort: a defect, not an input's fault; keep what is done
        report.stopped_reason = f"unexpected error: {describe_exception(err)}"
        drain()
    finally:
        if job.stop():
            report.interrupted = True
        # after a second interrupt, writes already running finish (atomically) in the background
        pool.shutdown(wait=not report.abandoned, cancel_futures=bool(report.abandoned))
        for k in list(states):  # begun, never ended (interrupted, stopped): discard what is open
            try:
                job.finish(todo[k][1], False)
            except Exception:
                pass
        signals.__exit__(None, None, None)
        bar.close()
    if report.stopped_reason:
        reporter.line(f"stopped: {report.stopped_reason}")
    report.outcomes = [outcomes.get(i, Outcome(task, "not-run")) for i, task in enumerate(tasks)]
    report.seconds = time.perf_counter() - start
    return report
