"""Concurrent requests gathered into one forward pass: a bounded queue in front of one model thread.

The model runs in a single thread (one network, one set of torch threads, no interleaved forward
passes); each batch is HumanParser.parse of up to `max_batch` images, gathered for at most
`max_wait_ms` after the first arrives. Decoding and encoding are the callers' business and happen
in their own threads, outside this one. A full queue refuses at once (QueueFull), so a burst
cannot pile up memory or latency without bound.
"""
import logging
import math
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable, Deque, List, Optional, Sequence

import numpy as np

log = logging.getLogger("schp.service")


class QueueFull(Exception):
    """The queue holds max_queue images already; `retry_after` is a guess in whole seconds."""

    def __init__(self, retry_after: int):
        super().__init__(f"the queue is full; retry in {retry_after} s")
        self.retry_after = retry_after


class Closed(Exception):
    """The batcher is shutting down and takes no new images."""


@dataclass
class _Job:
    image: np.ndarray  # H x W x 3 uint8 BGR
    with_logits: bool
    future: Future = field(default_factory=Future)


class Batcher:
    """`submit(bgr)` -> Future of the label map (or (labels, logits) with `with_logits`).

    `parse(images, with_logits)` is the model call (HumanParser.parse); it runs in this batcher's
    one thread only. A batch in which any image wants logits is parsed with logits and the others
    get the labels alone (the same labels: the argmax is the same computation either way).
    """

    def __init__(self, parse: Callable[..., List], max_batch: int = 4, max_wait_ms: float = 10.0,
                 max_queue: int = 32):
        if max_batch < 1 or max_queue < 1 or max_wait_ms < 0:
            raise ValueError("max_batch and max_queue must be >= 1 and max_wait_ms >= 0")
        self._parse = parse
        self.max_batch, self.max_wait, self.max_queue = max_batch, max_wait_ms / 1000.0, max_queue
        self._queue: Deque[_Job] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._busy = 0  # images in the forward pass now
        self.batches = self.images = 0
        self.batch_sizes: List[int] = []  # of the last 1000 batches, for /healthz and the benchmark
        self._seconds_per_image = None  # running mean of the model's time per image
        self._thread = threading.Thread(target=self._run, name="schp-model", daemon=True)
        self._thread.start()

    @property
    def queued(self) -> int:
        return len(self._queue)

    @property
    def busy(self) -> int:
        return self._busy

    def retry_after(self) -> int:
        """Seconds until the queue has room again, from the measured time per image (at least 1)."""
        per_image = self._seconds_per_image or 1.0
        return max(1, math.ceil(per_image * (len(self._queue) + self._busy)))

    def check_room(self) -> None:
        """QueueFull now if the queue is full: lets a request be refused before its body is read."""
        if len(self._queue) >= self.max_queue:
            raise QueueFull(self.retry_after())

    def submit(self, image: np.ndarray, with_logits: bool = False) -> Future:
        job = _Job(image, with_logits)
        with self._cond:
            if self._closed:
                raise Closed("the service is shutting down")
            if len(self._queue) >= self.max_queue:
                raise QueueFull(self.retry_after())
            self._queue.append(job)
            self._cond.notify_all()
        return job.future

    def close(self, timeout: Optional[float] = None) -> bool:
        """Take no new images, finish the queued ones, stop the thread; False if it outlived `timeout`."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _take(self) -> Optional[List[_Job]]:
        """The next batch: waits for a first image, then up to max_wait for more (None once closed and empty)."""
        with self._cond:
            while not self._queue:
                if self._closed:
                    return None
                self._cond.wait()
            deadline = time.monotonic() + self.max_wait
            while len(self._queue) < self.max_batch and not self._closed:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            jobs = [self._queue.popleft() for _ in range(min(self.max_batch, len(self._queue)))]
            self._busy = len(jobs)
            return jobs

    def _run(self) -> None:
        while True:
            jobs = self._take()
            if jobs is None:
                return
            jobs = [job for job in jobs if job.future.set_running_or_notify_cancel()]
            if jobs:
                self._forward(jobs)
            with self._cond:
                self._busy = 0

    def _forward(self, jobs: Sequence[_Job]) -> None:
        logits = any(job.with_logits for job in jobs)
        start = time.perf_counter()
        try:
            results = self._parse([job.image for job in jobs], with_logits=logits)
        except Exception as err:  # never the thread; and one image's failure is never its batch-mates'
            if len(jobs) > 1:
                log.warning("a batch of %d failed (%s); parsing its images one by one", len(jobs), err)
                for job in jobs:
                    self._forward([job])
                return
            log.warning("an image failed in the forward pass: %r", err)
            jobs[0].future.set_exception(err)
            return
        seconds = (time.perf_counter() - start) / len(jobs)
        self._seconds_per_image = seconds if self._seconds_per_image is None else \
            0.8 * self._seconds_per_image + 0.2 * seconds
        self.batches += 1
        self.images += len(jobs)
        self.batch_sizes = (self.batch_sizes + [len(jobs)])[-1000:]
        for job, result in zip(jobs, results):
            if logits and not job.with_logits:
                result = result[0]
            job.future.set_result(result)
