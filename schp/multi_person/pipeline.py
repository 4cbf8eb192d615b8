"""The multi-person run: for each image, instances -> persons -> global and local logits -> fusion -> files.

Each image ends processed, skipped (its outputs exist) or failed (one line naming the file and the
reason); a failure never stops the others. Decoding and reading instances run ahead in threads, the
networks (parsers, torchvision detector) in the main thread, fusion and writing in a writer thread.
"""
import signal
import sys
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Deque, Dict, List, Optional, Sequence, Tuple

import numpy as np
from tqdm import tqdm

from schp.data.decode import ImageError, read_image
from schp.inference import HumanParser
from schp.multi_person.fusion import fuse, nobody
from schp.multi_person.instances import InstanceError
from schp.multi_person.nms import EXPAND_RATIO, OVERLAP_THRESHOLD, SCORE_THRESHOLD, MAX_PERSONS, select_people
from schp.multi_person.outputs import instances_record, save_outputs
from schp.multi_person.parsing import crop_images, image_logits
from schp.signals import raise_keyboard_interrupt
from schp.runner import describe_error
from schp.utils.outputs import remove_stale_temporaries


@dataclass
class ImageTask:
    source: Path
    name: str
    outputs: Dict[str, Path]

    def is_done(self) -> bool:
        return all(p.exists() for p in self.outputs.values())


@dataclass
class Settings:
    score_threshold: float = SCORE_THRESHOLD
    overlap_threshold: float = OVERLAP_THRESHOLD
    expand: float = EXPAND_RATIO
    jpeg_roundtrip: bool = True
    legacy_person_count: bool = False
    batch_size: int = 1
    num_workers: int = 1
    quiet: bool = False


@dataclass
class Outcome:
    task: ImageTask
    status: str  # processed, skipped, failed, not-run
    reason: Optional[str] = None
    persons: Optional[int] = None
    parts: Optional[int] = None
    seconds: float = 0.0


@dataclass
class Report:
    outcomes: List[Outcome] = field(default_factory=list)
    interrupted: bool = False
    seconds: float = 0.0

    def count(self, status: str) -> int:
        return sum(o.status == status for o in self.outcomes)

    def summary_line(self) -> str:
        head = "interrupted" if self.interrupted else "done"
        line = (f"{head}: {self.count('processed')} processed, {self.count('skipped')} skipped, "
                f"{self.count('failed')} failed of {len(self.outcomes)} images in {self.seconds:.1f} s")
        not_run = self.count("not-run")
        return line + (f" ({not_run} not reached; run again to resume)" if not_run else "")


def _decode(task: ImageTask, source, in_main: bool):
    """(image, instances or None) of a task; instances now unless the source needs the main thread."""
    image = read_image(task.source)
    return image, (None if in_main else source.instances(image, task.source))


class MultiPersonRunner:
    def __init__(self, global_parser: Optional[HumanParser], local_parser: Optional[HumanParser], source,
                 settings: Settings):
        self.global_parser, self.local_parser = global_parser, local_parser
        self.source, self.settings = source, settings
        # a detector network runs in the main thread, beside the parsers; file sources run ahead
        self.source_in_main = hasattr(source, "model")

    def say(self, line: str) -> None:
        tqdm.write(line, file=sys.stderr)

    def compute(self, task: ImageTask, image: np.ndarray, instances):
        """Persons and logits of one image (main thread); returns the work for the writer thread."""
        s = self.settings
        height, width = image.shape[:2]
        people = select_people(instances, height, width, s.score_threshold, s.overlap_threshold, s.expand)
        if people.dropped_over_cap:
            self.say(f"warning: {task.source}: {people.dropped_over_cap} persons past the first {MAX_PERSONS} "
                     "dropped (the person map is 8-bit)")
        if people.count == 0:
            return people, None, None
        crops = crop_images(image, people.crop_boxes, s.jpeg_roundtrip)
        global_logits = image_logits(self.global_parser, [image])[0]
        crop_logits = image_logits(self.local_parser, crops, s.batch_size)
        return people, global_logits, crop_logits

    def finish(self, task: ImageTask, image: np.ndarray, people, global_logits, crop_logits) -> Tuple[int, int]:
        """Fusion and every output of one image (writer thread)."""
        height, width = image.shape[:2]
        if people.count == 0:
            fused = nobody(height, width)
        else:
            fused = fuse(global_logits, crop_logits, people.ids, people.scores, people.crop_boxes,
                         self.settings.legacy_person_count)
        if fused.parts_capped:
            self.say(f"warning: {task.source}: more than 255 (person, class) parts; the rest have no part id "
                     "(the part map is 8-bit, as in the original)")
        record = instances_record(task.source.name, height, width, people, self.source.describe())
        save_outputs(task.outputs, image, fused, record)
        return len(fused.tags), len(fused.confidences)

    def run(self, tasks: Sequence[ImageTask], overwrite: bool = False) -> Report:
        start = time.perf_counter()
        report = Report()
        outcomes: Dict[int, Outcome] = {}
        for folder in sorted({p.parent for t in tasks for p in t.outputs.values()}):
            remove_stale_temporaries(folder)
        todo = []
        for i, task in enumerate(tasks):
            if not overwrite and task.is_done():
                outcomes[i] = Outcome(task, "skipped")
            else:
                todo.append(i)
        bar = tqdm(total=len(tasks), initial=len(outcomes), unit="img", file=sys.stderr,
                   disable=self.settings.quiet, dynamic_ncols=True)

        def fail(i: int, reason: str) -> None:
            outcomes[i] = Outcome(tasks[i], "failed", reason)
            self.say(f"error: {tasks[i].source}: {reason}")
            bar.update(1)

        previous_term = signal.signal(signal.SIGTERM, raise_keyboard_interrupt)
        readers = ThreadPoolExecutor(max_workers=max(1, self.settings.num_workers), thread_name_prefix="mp-read")
        writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mp-write")
        ahead: Deque[Tuple[int, Future]] = deque()
        pending: Deque[Tuple[int, float, Future]] = deque()
        queue = deque(todo)

        def refill() -> None:
            while queue and len(ahead) < max(1, self.settings.num_workers) + 1:
                i = queue.popleft()
                ahead.append((i, readers.submit(_decode, tasks[i], self.source, self.source_in_main)))

        def collect(block_beyond: int) -> None:
            while pending and (len(pending) > block_beyond or pending[0][2].done()):
                i, t0, future = pending.popleft()
                err = future.exception()
                if err is None:
                    persons, parts = future.result()
                    outcomes[i] = Outcome(tasks[i], "processed", None, persons, parts, time.perf_counter() - t0)
                    bar.update(1)
                else:
                    fail(i, describe_error(err))

        try:
            refill()
            while ahead:
                i, future = ahead.popleft()
                refill()
                t0 = time.perf_counter()
                try:
                    image, instances = future.result()
                    if instances is None:
                        instances = self.source.instances(image, tasks[i].source)
                    work = self.compute(tasks[i], image, instances)
                except (ImageError, InstanceError) as err:
                    fail(i, str(err))
                    continue
                except (RuntimeError, MemoryError) as err:  # e.g. CUDA out of memory
                    reason = str(err).splitlines()[0] if str(err) else type(err).__name__
                    fail(i, f"inference failed: {reason}")
                    continue
                except Exception as err:  # anything else about this image: reported, the run goes on
                    fail(i, describe_error(err))
                    continue
                pending.append((i, t0, writer.submit(self.finish, tasks[i], image, *work)))
                collect(block_beyond=1)
            collect(block_beyond=0)
        except KeyboardInterrupt:
            report.interrupted = True
            self.say("interrupted: finishing the outputs in flight, then stopping")
            for _, future in ahead:
                future.cancel()
            collect(block_beyond=0)
        finally:
            readers.shutdown(wait=True, cancel_futures=True)
            writer.shutdown(wait=True)
            signal.signal(signal.SIGTERM, previous_term)
            bar.close()
        report.outcomes = [outcomes.get(i, Outcome(task, "not-run")) for i, task in enumerate(tasks)]
        report.seconds = time.perf_counter() - start
        return report
