"""The parsing job of the run loop: images and video frames through one crop -> network -> warp path.

An image task gives one unit, a video task one per parsed frame (every Nth) and a closing one; both
are cropped in the prepare stage, run through the same batched forward pass, and inverse-warped in
the write stage, so a frame's map equals that of the frame saved as a PNG and parsed as an image.

A video `<stem>.mp4` (or .avi .mov .mkv .webm) gives `<stem>/frame_000000.png`... (palette maps named
by source frame index, `.npy` logits beside them with logits) and `<stem>_parsing.mp4` (the colour
maps), plus `<stem>_overlay.mp4` with overlay, at the source size and frame rate (divided by every).
Frame maps are written as they are made and a frame whose outputs exist is not parsed again, so a
stopped run resumes where it ended. The two videos are written to temporaries while decoding and
renamed at the end, only when the whole video decoded: a truncated file leaves its frame maps and one
error line, no video.
"""
import os
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
from torch.utils.data import DataLoader

from schp.data.crop import Prepared, SimpleFolderDataset, collate_prepared, prepare_image
from schp.data.decode import DEFAULT_MAX_PIXELS, read_image, size_problem
from schp.data.label_map import LabelMap
from schp.errors import SCHPError
from schp.inference import HumanParser
from schp.runs.loop import Job, Unit
from schp.runs.tasks import ImageTask, VideoTask
from schp.runs.workers import LostInput, stop_workers, surviving_workers, worker_init
from schp.utils.outputs import (atomic_path, blend_overlay, colorize_bgr, integratedpifu_codes, npy_memmap,
                                save_label_png, save_npy, save_overlay)

OUTPUT_FOURCC = "mp4v"  # the MPEG-4 encoder every OpenCV wheel's FFmpeg has (H.264 often is missing)
DEFAULT_FPS = 25.0  # when a file states no frame rate


class VideoError(SCHPError):
    """A video that cannot be (fully) decoded or written; the message is the reason."""


def open_video(path: Path):
    """A cv2.VideoCapture on `path` (FFmpeg's own console messages silenced), or VideoError."""
    os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")  # read once, when FFmpeg is first used
    import cv2

    if not path.is_file():
        raise VideoError("cannot read: no such file")
    if path.stat().st_size == 0:
        raise VideoError("empty file (0 bytes)")
    level = cv2.utils.logging.getLogLevel()
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)  # our line says it, not its WARN
    try:
        capture = cv2.VideoCapture(str(path), cv2.CAP_FFMPEG)
    finally:
        cv2.utils.logging.setLogLevel(level)
    if not capture.isOpened():
        raise VideoError("cannot be opened as a video (damaged, truncated, or a codec OpenCV lacks)")
    return capture


class EveryNthFrame:
    """(index, pixels) of every `every`th frame of a capture, the others skipped undecoded (grab);
    `count` is then the number of frames the file gave, for the truncation check."""

    def __init__(self, capture, every: int):
        self.capture, self.every, self.count = capture, every, 0

    def __iter__(self):
        while True:
            if self.count % self.every:
                if not self.capture.grab():
                    return
                self.count += 1
                continue
            ok, pixels = self.capture.read()
            if not ok:
                return
            yield self.count, pixels
            self.count += 1


def _open_writer(path: Path, fps: float, size: Tuple[int, int]):
    import cv2

    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*OUTPUT_FOURCC), fps, size)
    if not writer.isOpened():
        raise VideoError(f"OpenCV cannot write {path.suffix} video here (no {OUTPUT_FOURCC} encoder)")
    return writer


def _read_map(png: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(png) as image:
        return np.asarray(image)


@dataclass
class Frame:
    """A video frame in the run: its source index, pixels and crop (None when parsed before)."""
    index: int
    pixels: np.ndarray
    item: Optional[Prepared]


class _OpenVideo:
    """A video being parsed: its encoders (temporaries, renamed when the whole video decoded)."""

    def __init__(self):
        self.stack = ExitStack()
        self.writers: Dict[str, Any] = {}


class ParseJob(Job):
    """Label maps (and logits, overlays, IntegratedPIFu codes, videos) with one HumanParser.

    `parser` None: every task is already done (nothing is computed). `label_map` rewrites the maps
    into another label scheme before they are written (logits and IntegratedPIFu codes stay in the
    model's own classes).
    """

    def __init__(self, parser: Optional[HumanParser], palette: Sequence[int], batch_size: int = 1,
                 num_workers: int = 1, write_threads: int = 2, max_pixels: Optional[int] = DEFAULT_MAX_PIXELS,
                 label_map: Optional[LabelMap] = None, overwrite: bool = False, reporter=None):
        self.parser, self.batch_size, self.num_workers = parser, batch_size, num_workers
        self.overwrite = overwrite  # frames whose maps exist are parsed again
        self.write_threads, self.max_pixels = write_threads, max_pixels
        self.label_map = label_map
        self.palette = label_map.palette if label_map is not None else palette
        self.reporter = reporter
        self._batches = None
        self._tasks: Sequence = ()
        self._videos: Dict[int, _OpenVideo] = {}  # by id of the task

    def output_folders(self, tasks: Sequence):
        folders = set(super().output_folders(tasks))
        return sorted(folders | {t.frames for t in tasks if isinstance(t, VideoTask)})

    # -- prepare: images decoded and cropped in worker processes, then the videos' frames in order
    def prepare(self, tasks: Sequence) -> Iterator[Unit]:
        self._tasks = tasks
        images = [(k, t) for k, t in enumerate(tasks) if not isinstance(t, VideoTask)]
        if images:
            def loader(positions):
                return DataLoader(SimpleFolderDataset([images[p][1].source for p in positions],
                                                      self.parser.spec.input_size, self.max_pixels),
                                  batch_size=self.batch_size, num_workers=self.num_workers,
                                  collate_fn=collate_prepared, worker_init_fn=worker_init,
                                  prefetch_factor=2 if self.num_workers else None)

            def started(batches):
                self._batches = batches

            for position, item in surviving_workers(loader, len(images), started):  # a dead worker: one input
                if isinstance(item, LostInput):
                    yield Unit(images[position][0], None, item.reason)
                else:
                    yield Unit(images[position][0], item, item.error, item.width, item.height)
            if self.stop():  # a stop signal held during the workers' shutdown is the run's, not lost
                raise KeyboardInterrupt
        for k, task in enumerate(tasks):
            if isinstance(task, VideoTask):
                yield from self._frames(k, task)

    def _frames(self, k: int, task: VideoTask) -> Iterator[Unit]:
        try:
            capture = open_video(task.source)
        except VideoError as err:
            yield Unit(k, error=str(err))
            return
        bar = None
        try:
            problem = size_problem(int(capture.get(3)), int(capture.get(4)), self.max_pixels)  # before a frame
            if problem:
                raise VideoError(f"frames of {problem}")
            count = int(capture.get(7))  # CAP_PROP_FRAME_COUNT: from the container, 0 or less if unknown
            fps = capture.get(5) or DEFAULT_FPS  # CAP_PROP_FPS
            if not np.isfinite(fps) or fps <= 0:
                fps = DEFAULT_FPS
            if self.reporter is not None:
                bar = self.reporter.bar(total=(count + task.every - 1) // task.every if count > 0 else None,
                                        unit="frame", desc=task.name, leave=False)
            video = self._videos[id(task)] = _OpenVideo()
            width = height = 0
            frames = EveryNthFrame(capture, task.every)
            for index, pixels in frames:
                if not video.writers:
                    height, width = pixels.shape[:2]
                    self._open_writers(task, video, fps / task.every, (width, height))
                done = not self.overwrite and task.frame_done(index)
                item = None if done else prepare_image(0, pixels, self.parser.spec.input_size)
                if bar is not None:
                    bar.update(1)
                yield Unit(k, Frame(index, pixels, item), None, width, height, last=False, compute=not done)
            index = frames.count
            reason = None
            if not video.writers:
                reason = "no frame could be decoded (damaged file, or a codec OpenCV lacks)"
            elif count > 0 and count - index > 1:  # a stated count may be one off when estimated
                parsed = (index + task.every - 1) // task.every
                reason = (f"decoding stopped at frame {index} of {count} (truncated or damaged); the {parsed} "
                          f"frame maps before it are in {task.frames}, no video written; run again once the "
                          "file is complete to finish it")
            yield Unit(k, None, reason, width, height, last=True, compute=False)
        except VideoError as err:
            yield Unit(k, None, str(err), last=True, compute=False)
        finally:
            capture.release()
            if bar is not None:
                bar.close()

    def _open_writers(self, task: VideoTask, video: _OpenVideo, fps: float, size: Tuple[int, int]) -> None:
        task.frames.mkdir(parents=True, exist_ok=True)
        for key, path in (("parsing", task.parsing), ("overlay", task.overlay)):
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = video.stack.enter_context(atomic_path(path))
                video.writers[key] = _open_writer(tmp, fps, size)
                video.stack.callback(video.writers[key].release)  # runs before the rename

    def stop(self) -> bool:
        batches, self._batches = self._batches, None
        return stop_workers(batches) if batches is not None else False

    # -- forward: the network on a batch of crops, in the calling thread
    def forward(self, units: List[Unit]) -> List[Dict[str, Any]]:
        items = [u.payload.item if isinstance(u.payload, Frame) else u.payload for u in units]
        return self.parser.crop_results(items, [self._wants_logits(u) for u in units])

    def _wants_logits(self, unit: Unit) -> bool:
        return bool(self._tasks[unit.index].logits)

    # -- write: inverse warp, argmax and files, in a writer thread
    def write(self, task, unit: Unit, work):
        if isinstance(task, VideoTask):
            return self._write_frame(task, unit, work)
        write_image(task, unit.payload, self.parser, work, self.palette, self.label_map)
        return None

    def _write_frame(self, task: VideoTask, unit: Unit, work) -> Optional[np.ndarray]:
        frame: Optional[Frame] = unit.payload
        if frame is None:  # the closing unit
            return None
        png, npy = task.frame_paths(frame.index)
        if work is None:  # parsed by an earlier run
            return _read_map(png)
        item, full = frame.item, None
        if npy is not None:
            full = np.empty((item.height, item.width, work["logits"].shape[2]), dtype=np.float32)
        labels = self.parser.image_labels(item, work, full)
        if npy is not None:
            save_npy(full, npy)
        labels = self.label_map.apply(labels) if self.label_map is not None else labels
        save_label_png(labels, self.palette, png)
        return labels

    def collected(self, task, unit: Unit, result) -> None:
        """A video's frames reach its encoders in order."""
        if not isinstance(task, VideoTask) or unit.payload is None:
            return
        video = self._videos[id(task)]
        video.writers["parsing"].write(colorize_bgr(result, self.palette))
        if "overlay" in video.writers:
            video.writers["overlay"].write(blend_overlay(unit.payload.pixels, result, self.palette))

    def finish(self, task, ok: bool) -> None:
        """A video's encoders close; its files are renamed into place only if every frame went well."""
        video = self._videos.pop(id(task), None)
        if video is None:
            return
        if ok:
            video.stack.close()
        else:
            failure = VideoError("not finished")
            video.stack.__exit__(VideoError, failure, None)
            try:  # a frames folder this video made and left empty goes too (a set-up, not an output)
                task.frames.rmdir()
            except OSError:
                pass


def write_image(task: ImageTask, item: Prepared, parser: HumanParser, work: Dict[str, Any],
                palette: Sequence[int], label_map: Optional[LabelMap] = None) -> None:
    """Write every asked output of one image from its crop result (HumanParser.crop_results): the CPU
    inverse warp and argmax run here, in a writer thread, the logits going straight to their .npy."""
    for path in task.outputs:
        path.parent.mkdir(parents=True, exist_ok=True)
    if task.logits is not None:
        with npy_memmap(task.logits, (item.height, item.width, work["logits"].shape[2])) as full:
            labels = parser.image_labels(item, work, full)
    else:
        labels = parser.image_labels(item, work)
    if task.codes is not None:
        save_npy(integratedpifu_codes(labels), task.codes)
    shown = label_map.apply(labels) if label_map is not None else labels
    if task.overlay is not None:
        save_overlay(read_image(task.source, None), shown, palette, task.overlay)  # its size was checked
    if task.png is not None:
        save_label_png(shown, palette, task.png)
