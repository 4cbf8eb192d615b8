"""A runtime backend made ready while torch already parses, so that `--backend auto` never delays the
first map.

For a job long enough to repay a runtime (schp.backends.export_repays), `auto` starts on torch and
prepares the runtime beside it: the ONNX export, when the file is not cached yet, in a child process
(the exporter's tracing is not known to be safe beside a forward pass in the same process, and its
memory goes back when the child ends), then the load and compile in a thread. The parser switches
between two forward passes once the runtime is ready; if the export fails, the job stays on torch.
Where more than one runtime is installed for the precision, the others (rivals) are loaded from the
same file once the parser has switched and let torch's network go (so that the two runtimes and torch's
network are never held at once), and the parser times them all on its next forward passes
(`RuntimeTrial`) and keeps the fastest.
Run as `python -m schp.background_runtime SPEC STATE OUT any-size|input-size`, this module is that child.
"""
from __future__ import annotations

import atexit
import dataclasses
import json
import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Dict, List, Optional, Tuple

from schp.backends import RuntimePlan, export_for_runtimes, load_runner, runtime_file
from schp.data.catalog import DatasetSpec

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)
STOP_WAIT_S = 10  # how long close() waits for a stopped child before killing it


class BackgroundRuntime:
    """The runtimes of `plan` for this checkpoint, prepared in the background from `start(shape)` on.

    `ready()` is the first of the plan's runtimes that can run, as (backend, runner), once it is (None
    before, and for good after a failure of all: `error` then says why, of the plan's first). Where the
    plan has more, `switched()` (the parser no longer holds torch's network) lets the rest load, and
    `rivals(timeout)` is {backend: runner} of those that could, once they are. `close()` stops a child
    export still running, leaving no file of it behind.
    """

    def __init__(self, plan: RuntimePlan, spec: DatasetSpec, state_dict: Dict[str, torch.Tensor],
                 precision: str = "fp32", cache_dir: Optional[Path] = None, threads: Optional[int] = None):
        import torch

        self.backend, self.backends, self._digest = plan.backend, plan.backends, plan.digest
        self.any_size = plan.any_size
        self.spec, self.precision, self.cache_dir = spec, precision, cache_dir
        self.threads = threads or torch.get_num_threads()  # the runtime's, once it runs (as torch's now)
        self._state_dict = state_dict
        self._done = threading.Event()
        self._lock = threading.Lock()
        self._runner: Optional[Tuple[str, Callable]] = None
        self._switched = threading.Event()
        self._rivals_done = threading.Event()
        self._rivals: Dict[str, Callable] = {}
        self._child: Optional[ChildExport] = None
        self._closed = False
        self.thread: Optional[threading.Thread] = None
        self.error: Optional[str] = None
        self.exported = False  # whether this run made the export (else it was cached)
        self.seconds: Optional[float] = None  # from start() to ready

    @property
    def started(self) -> bool:
        return self.thread is not None

    @property
    def exporting(self) -> bool:
        """Whether the child export runs now (it takes one core)."""
        child = self._child
        return child is not None and child.running

    def start(self, shape: Tuple[int, ...]) -> None:
        """Begin: export if needed, load, and compile for input `shape` (N x 3 x h x w)."""
        if self.thread is not None:
            return
        atexit.register(self.close)
        self.thread = threading.Thread(target=self._prepare, args=(tuple(shape),), daemon=True,
                                       name=f"schp-{self.backend}-setup")
        self.thread.start()

    def ready(self) -> Optional[Tuple[str, Callable]]:
        return self._runner if self._done.is_set() else None

    def wait(self, timeout: Optional[float] = None) -> bool:
        """Block until the runtime is ready or has failed (True), or `timeout` seconds pass (False)."""
        return self._done.wait(timeout)

    def switched(self) -> None:
        """The parser runs the ready runtime now and has let torch's network go: the rivals may load."""
        self._switched.set()

    def rivals(self, timeout: Optional[float] = None) -> Optional[Dict[str, Callable]]:
        """{backend: runner} of the rivals that loaded, once all have been tried (None while they load,
        after waiting at most `timeout` s)."""
        return self._rivals if self._rivals_done.wait(timeout) else None

    def _prepare(self, shape: Tuple[int, ...]) -> None:
        t0 = time.perf_counter()
        try:
            with runtime_file(self.spec, self._state_dict, self.cache_dir, self._digest, self.any_size) as path:
                if not path.is_file():
                    log.info("exporting the %s network for %s in the background (once per checkpoint); "
                             "torch runs meanwhile", self.spec.name, self.backend)
                    self._export_in_child(path)
                    self.exported = True
                self._state_dict = None  # the parser keeps its own reference while it needs one
                left, first_error = list(self.backends), None
                while left and self._runner is None:  # the first of them that loads runs first
                    backend = left.pop(0)
                    try:
                        self._runner = (backend, self._load(backend, path, shape))
                    except Exception as err:
                        first_error = first_error or err
                        log.info("%s cannot run the exported network: %s", backend, err)
                if self._runner is None:
                    raise first_error
                self.seconds = time.perf_counter() - t0
                self._done.set()
                if left:
                    self._switched.wait()  # torch's network is gone (or close() was called)
                for backend in left:
                    if self._closed:
                        break
                    try:
                        self._rivals[backend] = self._load(backend, path, shape)
                    except Exception as err:  # left out of the trial
                        log.info("%s cannot run the exported network: %s", backend, err)
        except Exception as err:  # the job goes on with torch; the parser reports why
            self.error = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
        finally:
            self._state_dict = None
            atexit.unregister(self.close)
            self._done.set()
            self._rivals_done.set()

    def _load(self, backend: str, path: Path, shape: Tuple[int, ...]):
        runner = load_runner(backend, path, self.precision, self.threads)
        runner.prepare(shape)
        return runner

    def _export_in_child(self, path: Path) -> None:
        with self._lock:
            if self._closed:
                raise RuntimeError("closed before the export began")
            self._child = ChildExport(self.spec, self._state_dict, path, self.any_size)
        self._child.run()

    def close(self) -> None:
        """Stop preparing: a child export still running is stopped (it removes its partial file)."""
        with self._lock:
            self._closed = True
            child = self._child
        self._switched.set()  # a thread waiting to load the rivals ends
        if child is not None:
            child.stop()
        if self.thread is not None and self.thread is not threading.current_thread():
            self.thread.join(STOP_WAIT_S)


class RuntimeTrial:
    """Which of several loaded runtimes is fastest here, measured on the job's own forward passes.

    The runtimes take turns (a turn: the forward passes between two switch points, i.e. one batch),
    `ROUNDS` turns each, in the plan's order; a turn's time is per crop of the input size (3 x h x w
    values), so batches and test-time scales of any size compare; each runtime's best turn counts (the
    first call of a runtime may still allocate its buffers). The trial's forward passes are the job's
    own, so it costs only the slower runtimes' extra time on a few of them.
    """

    ROUNDS = 2

    def __init__(self, runners: Dict[str, Callable], crop_values: int):
        self.runners = dict(runners)
        self.crop_values = crop_values
        self.turns: List[str] = [name for _ in range(self.ROUNDS) for name in self.runners]
        self.seconds: Dict[str, List[float]] = {name: [] for name in self.runners}  # per crop, each turn
        self.current: Optional[str] = None
        self._spent = 0.0
        self._values = 0

    def next_turn(self) -> Optional[str]:
        """End the turn in progress (where it ran a forward pass; else it goes on) and name the runtime of
        the next one; None once every turn is done."""
        if self.current is not None:
            if not self._values:
                return self.current
            self.seconds[self.current].append(self._spent * self.crop_values / self._values)
            self._spent, self._values = 0.0, 0
        self.current = self.turns.pop(0) if self.turns else None
        return self.current

    def record(self, seconds: float, values: int) -> None:
        """One forward pass of the current turn: its time and its input's size (N x 3 x h x w values)."""
        self._spent += seconds
        self._values += values

    def fastest(self) -> str:
        best = {name: min(times) for name, times in self.seconds.items() if times}
        return min(best, key=best.get)

    def describe(self) -> str:
        return ", ".join(f"{name} {min(times):.3f} s" for name, times in self.seconds.items() if times)


class ChildExport:
    """The runtimes' ONNX export of one checkpoint to `path`, made by a child process on one thread
    (`python -m schp.background_runtime`): beside a forward pass, or beside another export.

    `run()` blocks until the file is written (RuntimeError with the child's last line if not); `start()`
    runs it in a thread instead, which `join()` waits for (a failure is then kept in `error`). `stop()`
    ends a child still running, which removes its partial file.
    """

    def __init__(self, spec: DatasetSpec, state_dict: Dict[str, torch.Tensor], path: Path, any_size: bool = False):
        self.spec, self.path, self.any_size = spec, path, any_size
        self._state_dict = state_dict
        self._lock = threading.Lock()
        self._process: Optional[subprocess.Popen] = None
        self._stopped = False
        self._thread: Optional[threading.Thread] = None
        self.error: Optional[str] = None

    @property
    def running(self) -> bool:
        process = self._process
        return process is not None and process.poll() is None

    def run(self) -> None:
        import torch

        from schp.utils.outputs import temp_path

        path = self.path
        path.parent.mkdir(parents=True, exist_ok=True)
        # the weights travel by file (memory-mapped by the child, which unlinks it once loaded); a
        # temporary name of this process, so a later run removes it should this process be killed
        state_file = temp_path(path.with_name(path.stem + ".state.pt"))
        try:
            torch.save(self._state_dict, state_file)
            self._state_dict = None
            spec = json.dumps(dataclasses.asdict(self.spec))
            package_root = str(Path(__file__).resolve().parent.parent)  # importable from a checkout too
            env = dict(os.environ, OMP_NUM_THREADS="1",
                       PYTHONPATH=os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH")) if p))
            with self._lock:
                if self._stopped:
                    raise RuntimeError("stopped before the export began")
                self._process = subprocess.Popen(
                    [sys.executable, "-m", "schp.background_runtime", spec, str(state_file), str(path),
                     "any-size" if self.any_size else "input-size"],
                    env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            _, err = self._process.communicate()
            if self._process.returncode != 0:
                lines = [line for line in err.decode(errors="replace").splitlines() if line.strip()]
                reason = lines[-1] if lines else f"exit code {self._process.returncode}"
                raise RuntimeError(f"the background export failed: {reason}")
        finally:
            if state_file.exists():
                state_file.unlink()

    def start(self) -> "ChildExport":
        def run():
            try:
                self.run()
            except Exception as err:  # the caller exports in-process instead, and reports that one's error
                self.error = str(err)

        self._thread = threading.Thread(target=run, daemon=True, name="schp-export")
        self._thread.start()
        return self

    def join(self) -> None:
        if self._thread is not None:
            self._thread.join()

    def stop(self) -> None:
        with self._lock:
            self._stopped = True
            process = self._process
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(STOP_WAIT_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(STOP_WAIT_S)


def _export_child(spec_json: str, state_file: str, out: str, sizes: str) -> int:
    """The child: export and verify `out` from the weights in `state_file`, as schp.backends.cached_onnx does."""
    import signal

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a stop runs the export's own clean-up
    import torch

    torch.set_num_threads(1)  # the parent's forward keeps the other core(s)
    fields = json.loads(spec_json)
    spec = DatasetSpec(**{**fields, "input_size": tuple(fields["input_size"]), "labels": tuple(fields["labels"]),
                          "flip_pairs": tuple(tuple(p) for p in fields["flip_pairs"])})
    state = torch.load(state_file, map_location="cpu", weights_only=True, mmap=True)
    os.unlink(state_file)  # mapped: the data stays readable, and no copy outlives this process
    try:
        export_for_runtimes(spec, state, Path(out), any_size=sizes == "any-size")
    except Exception as err:  # the reason, as the last line the parent reads from this process's stderr
        logging.basicConfig(format="%(message)s")
        log.error("%s: %s", type(err).__name__, err)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(_export_child(*sys.argv[1:5]))
