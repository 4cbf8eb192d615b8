"""Video files in folder mode: every (Nth) frame parsed like an image, then colour and overlay videos.

A video `<stem>.mp4` (or .avi .mov .mkv .webm) gives `<stem>/frame_000000.png`... (palette maps named
by source frame index, `.npy` logits beside them with --logits) and `<stem>_parsing.mp4` (the colour
maps), plus `<stem>_overlay.mp4` with --overlay, at the source size and frame rate (divided by
--every). Frames go through HumanParser.parse, the same crop-model-warp path as images, so a frame's
map equals that of the frame saved as a PNG and parsed as an image.

Frame maps are written as they are made and a frame whose outputs exist is not parsed again, so a
stopped run resumes where it ended. The two videos are written to temporaries while decoding (from
the fresh maps, or the saved ones for frames already done) and renamed at the end, only when the
whole video decoded: a truncated file leaves its frame maps and one error line, no video.
"""
import os
import signal
import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from tqdm import tqdm

from schp.signals import raise_keyboard_interrupt
from schp.errors import SCHPError
from schp.runner import FATAL_WRITE_ERRNOS, Outcome, RunReport, describe_error
from schp.utils.outputs import atomic_path, blend_overlay, colorize_bgr, remove_stale_temporaries, save_label_png, save_npy

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm")
OUTPUT_FOURCC = "mp4v"  # the MPEG-4 encoder every OpenCV wheel's FFmpeg has (H.264 often is missing)
DEFAULT_FPS = 25.0  # when a file states no frame rate


def is_video_name(name: str) -> bool:
    return name.lower().endswith(VIDEO_EXTENSIONS)


class VideoError(SCHPError):
    """A video that cannot be (fully) decoded or written; the message is the reason."""


@dataclass
class VideoTask:
    """One video file and its outputs; `plan` and `outputs` as for an image Task."""
    source: Path
    name: str
    frames: Path  # folder of frame_NNNNNN.png maps (and .npy logits)
    parsing: Path  # colour-map video
    overlay: Optional[Path] = None  # colour maps over the frames
    logits: bool = False
    every: int = 1
    refusal: Optional[str] = None

    @property
    def outputs(self) -> List[Path]:
        return [p for p in (self.frames, self.parsing, self.overlay) if p is not None]

    def frame_paths(self, index: int) -> Tuple[Path, Optional[Path]]:
        png = self.frames / f"frame_{index:06d}.png"
        return png, png.with_suffix(".npy") if self.logits else None

    def frame_done(self, index: int) -> bool:
        return all(p is None or p.exists() for p in self.frame_paths(index))

    def is_done(self) -> bool:
        if not (self.parsing.exists() and (self.overlay is None or self.overlay.exists())):
            return False
        if self.logits:  # --logits asked after a run without it: the frames still need their logits
            names = set(os.listdir(self.frames)) if self.frames.is_dir() else set()
            return all(n[:-4] + ".npy" in names for n in names if n.startswith("frame_") and n.endswith(".png"))
        return True

    def plan(self, overwrite: bool) -> str:
        if self.refusal:
            return "fail"
        return "skip" if not overwrite and self.is_done() else "process"


def video_task(input_dir: Path, output_dir: Path, rel: Path, logits: bool, overlay: bool,
               every: int) -> VideoTask:
    """The outputs of video `rel` (relative to the input folder) under `output_dir`."""
    stem = output_dir / rel.with_suffix("")
    return VideoTask(source=input_dir / rel, name=str(rel), frames=stem,
                     parsing=stem.with_name(stem.name + "_parsing.mp4"),
                     overlay=stem.with_name(stem.name + "_overlay.mp4") if overlay else None,
                     logits=logits, every=every)


def open_video(path: Path):
    """A cv2.VideoCapture on `path` (FFmpeg's own console messages silenced), or VideoError."""
    os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")  # read once, when FFmpeg is first used
    import cv2

    if not path.is_file():
        raise VideoError("cannot read: no such file")
    if path.stat().st_size == 0:
        raise VideoError("empty file (0 bytes)")
    capture = cv2.VideoCapture(str(path), cv2.CAP_FFMPEG)
    if not capture.isOpened():
        raise VideoError("cannot be opened as a video (damaged, truncated, or a codec OpenCV lacks)")
    return capture


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


class VideoRun:
    """Parses videos frame by frame with a HumanParser, `batch_size` frames per forward pass."""

    def __init__(self, parser, palette: Sequence[int], batch_size: int = 1, quiet: bool = False):
        self.parser, self.palette, self.batch_size, self.quiet = parser, palette, batch_size, quiet

    def say(self, line: str) -> None:
        tqdm.write(line, file=sys.stderr)

    def video(self, task: VideoTask, overwrite: bool) -> Outcome:
        """Parse one video; its Outcome (failed with the reason if it did not fully decode)."""
        start = time.perf_counter()
        capture = open_video(task.source)
        try:
            count = int(capture.get(7))  # CAP_PROP_FRAME_COUNT: from the container, 0 or less if unknown
            fps = capture.get(5) or DEFAULT_FPS  # CAP_PROP_FPS
            if not np.isfinite(fps) or fps <= 0:
                fps = DEFAULT_FPS
            task.frames.mkdir(parents=True, exist_ok=True)
            bar = tqdm(total=(count + task.every - 1) // task.every if count > 0 else None, unit="frame",
                       desc=task.name, file=sys.stderr, disable=self.quiet, dynamic_ncols=True, leave=False)
            with ExitStack() as stack:
                stack.callback(bar.close)
                writers: Dict[str, object] = {}
                pending: List[list] = []  # [index, frame, labels or None], in frame order
                index = width = height = 0

                def flush() -> None:
                    todo = [item for item in pending if item[2] is None]
                    if todo:
                        results = self.parser.parse([item[1] for item in todo], with_logits=task.logits)
                        for item, result in zip(todo, results):
                            labels, logits = result if task.logits else (result, None)
                            png, npy = task.frame_paths(item[0])
                            if npy is not None:
                                save_npy(logits, npy)
                            save_label_png(labels, self.palette, png)
                            item[2] = labels
                    for _, frame, labels in pending:
                        writers["parsing"].write(colorize_bgr(labels, self.palette))
                        if "overlay" in writers:
                            writers["overlay"].write(blend_overlay(frame, labels, self.palette))
                    bar.update(len(pending))
                    pending.clear()

                while True:
                    if index % task.every:
                        if not capture.grab():
                            break
                        index += 1
                        continue
                    ok, frame = capture.read()
                    if not ok:
                        break
                    if not writers:
                        height, width = frame.shape[:2]
                        for key, path in (("parsing", task.parsing), ("overlay", task.overlay)):
                            if path is not None:
                                path.parent.mkdir(parents=True, exist_ok=True)
                                tmp = stack.enter_context(atomic_path(path))
                                writers[key] = _open_writer(tmp, fps / task.every, (width, height))
                                stack.callback(writers[key].release)  # runs before the rename
                    done = not overwrite and task.frame_done(index)
                    pending.append([index, frame, _read_map(task.frame_paths(index)[0]) if done else None])
                    waiting = sum(item[2] is None for item in pending)
                    if waiting >= self.batch_size or waiting == 0:  # a full batch, or frames already done
                        flush()
                    index += 1
                flush()
                if not writers:
                    raise VideoError("no frame could be decoded (damaged file, or a codec OpenCV lacks)")
                if count > 0 and count - index > 1:  # a stated count may be one off when estimated
                    parsed = (index + task.every - 1) // task.every
                    raise VideoError(f"decoding stopped at frame {index} of {count} (truncated or damaged); "
                                     f"the {parsed} frame maps before it are in {task.frames}, no video written; "
                                     "run again once the file is complete to finish it")
            return Outcome(task, "processed", None, width, height, time.perf_counter() - start)
        finally:
            capture.release()

    def run(self, tasks: Sequence[VideoTask], overwrite: bool, report: RunReport) -> List[Outcome]:
        """Outcomes of `tasks` in order; a Ctrl-C or SIGTERM marks `report` interrupted and leaves the
        rest not run (frames finished so far stay, for the resume)."""
        outcomes = []
        previous_term = signal.signal(signal.SIGTERM, raise_keyboard_interrupt)
        try:
            for task in tasks:
                if report.interrupted or report.stopped_reason:
                    outcomes.append(Outcome(task, "not-run"))
                    continue
                state = task.plan(overwrite)
                if state != "process":
                    outcomes.append(Outcome(task, "skipped") if state == "skip" else
                                    self._failed(task, task.refusal))
                    continue
                try:
                    outcomes.append(self.video(task, overwrite))
                except KeyboardInterrupt:
                    report.interrupted = True
                    self.say("interrupted: frames finished so far are kept; run again to resume")
                    outcomes.append(Outcome(task, "not-run"))
                except (VideoError, OSError, RuntimeError, MemoryError) as err:
                    reason = str(err) if isinstance(err, VideoError) else describe_error(err)
                    if isinstance(err, RuntimeError):
                        reason = f"inference failed: {str(err).splitlines()[0] if str(err) else 'RuntimeError'}"
                    outcomes.append(self._failed(task, reason))
                    if isinstance(err, OSError) and err.errno in FATAL_WRITE_ERRNOS:
                        report.stopped_reason = reason
        finally:
            signal.signal(signal.SIGTERM, previous_term)
        return outcomes

    def _failed(self, task: VideoTask, reason: str) -> Outcome:
        self.say(f"error: {task.source}: {reason}")
        return Outcome(task, "failed", reason)



def run_inputs(runner, tasks: Sequence, overwrite: bool) -> RunReport:
    """Run a folder's plan: images through `runner` (a schp.runner.Runner), then the videos frame by
    frame with the same model, batch size and palette; one report, outcomes in the plan's order."""
    images = [(i, t) for i, t in enumerate(tasks) if not isinstance(t, VideoTask)]
    videos = [(i, t) for i, t in enumerate(tasks) if isinstance(t, VideoTask)]
    if not videos:
        return runner.run(tasks, overwrite=overwrite)
    # temporaries of killed runs: removed now, at the start, as the runner does for the images, rather
    # than while other processes (torchrun ranks, shards) may be writing beside them
    for folder in sorted({t.parsing.parent for _, t in videos} | {t.frames for _, t in videos}):
        remove_stale_temporaries(folder)
    report = runner.run([t for _, t in images], overwrite=overwrite) if images else RunReport()
    outcomes: Dict[int, Outcome] = {i: o for (i, _), o in zip(images, report.outcomes)}
    start = time.perf_counter()
    run = VideoRun(runner.parser, runner.palette, runner.batch_size, runner.quiet)
    stopped_before = report.stopped_reason
    for (i, _), outcome in zip(videos, run.run([t for _, t in videos], overwrite, report)):
        outcomes[i] = outcome
    report.outcomes = [outcomes[i] for i in range(len(tasks))]
    report.seconds += time.perf_counter() - start
    if report.stopped_reason and not stopped_before:
        run.say(f"stopped: {report.stopped_reason}")
    return report


__all__ = ["VIDEO_EXTENSIONS", "VideoTask", "VideoError", "VideoRun", "is_video_name", "video_task",
           "run_inputs"]
