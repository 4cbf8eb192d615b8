"""Multi-person video parsing: every person of every frame, each keeping one id through the video.

A video is a file (.mp4 .avi .mov .mkv .webm, decoded with OpenCV as the extractor does) or a folder
of frames (`sequences`: each subfolder of the input folder, frames in sorted name order, the VIP
layout `Images/<video>/<frame>.jpg`). Its outputs, in the LIP challenge's video submission layout,
one file per frame named after the frame (`frame_000012` for the 13th frame of a file):
`OUT/<video>/global_parsing/`, `instance_segmentation/` (person id map + one `class score` line per
person present, ascending ids), `instance_parsing/` (part map + `class score` per part), and this
project's `global_tag/`, `instances/`; `OUT/<video>/identities.json` (every id: first and last frame)
and the optional `OUT/<video>/overlay.mp4` appear when the whole video went well.

Each frame is parsed exactly as a still image (the same maps); only the person ids differ: the
tracker (schp.multi_person.tracking) gives the persons the source found in a frame the ids they had
in the frames before. Ids are given in the write stage, which has one thread, so it sees a video's
frames in order; a frame parsed by an earlier run is not parsed again, the tracker reads its person
map instead (so a resumed run goes on from the ids written).
"""
import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from schp.multi_person.tracking import TRACK_MIN_IOU, TRACK_WINDOW, IdentityTracker
from schp.runs.loop import Job, Task, Unit
from schp.runs.tasks import is_video_name

SUBMISSION_FOLDERS = ("global_parsing", "instance_segmentation", "instance_parsing", "global_tag", "instances")
IMAGE_OUTPUT_FOLDERS = ("global_parsing", "instance_parsing", "global_tag", "instances", "overlay")


@dataclass
class VideoTask(Task):
    """One video (file or frame folder) and where its outputs go."""
    source: Path
    name: str  # as messages name it (relative to the input folder)
    video: str  # its output folder's name, and its name in mask folders and image lists
    root: Path  # OUT/<video>
    frame_files: Optional[List[Path]] = None  # a sequence's frames, sorted; None for a video file
    overlay: Optional[Path] = None  # OUT/<video>/overlay.mp4
    every: int = 1
    refusal: Optional[str] = None

    @property
    def record(self) -> Path:
        return self.root / "identities.json"

    @property
    def outputs(self) -> List[Path]:
        return [p for p in (self.overlay, self.record) if p is not None]

    @property
    def paths(self) -> Dict[str, Path]:
        """What the manifest lists."""
        out = {"folder": self.root, "identities": self.record}
        if self.overlay is not None:
            out["overlay_video"] = self.overlay
        return out

    def frame_paths(self, stem: str) -> Dict[str, Path]:
        from schp.multi_person.outputs import output_paths

        paths = output_paths(self.root, stem, overlay=False)
        paths["instance_segmentation"] = self.root / "instance_segmentation" / f"{stem}.png"
        paths["instance_segmentation_txt"] = self.root / "instance_segmentation" / f"{stem}.txt"
        return paths

    def frame_done(self, stem: str) -> bool:
        return all(p.exists() for p in self.frame_paths(stem).values())


def plan_videos(input_dir: Path, output_dir: Path, others: Sequence[Path], sequences: bool, overlay: bool,
                every: int) -> Tuple[List[VideoTask], List[Path]]:
    """(video tasks, the other files left) of an input folder: its video files, and with `sequences`
    each subfolder as a video of frames. `others` are the folder's non-image files (relative)."""
    from schp.data.listing import list_images

    input_dir, output_dir = Path(input_dir), Path(output_dir)
    found: List[Tuple[Path, Optional[List[Path]]]] = [(rel, None) for rel in others if is_video_name(rel.name)]
    rest = [rel for rel in others if not is_video_name(rel.name)]
    if sequences:
        for entry in sorted(os.scandir(input_dir), key=lambda e: e.name):
            if entry.is_dir() and not entry.name.startswith(".") and \
                    os.path.realpath(entry.path) != os.path.realpath(output_dir):
                frames, _ = list_images(Path(entry.path))
                found.append((Path(entry.name), frames))
    tasks, owner = [], {}
    for rel, frames in sorted(found, key=lambda f: str(f[0])):
        key = (rel.with_suffix("") if frames is None else rel).as_posix()
        root = output_dir / key
        task = VideoTask(input_dir / rel, str(rel), key, root, None if frames is None else
                         [input_dir / rel / f for f in frames], root / "overlay.mp4" if overlay else None, every)
        if key in owner:
            task.refusal = f"its outputs would overwrite those of {owner[key]}; rename one of them"
        elif key in IMAGE_OUTPUT_FOLDERS:
            task.refusal = f"its output folder {root} is one the photos' outputs use; rename it"
        elif frames is not None and not frames:
            task.refusal = "no frames in it (images: .jpg .png ...)"
        elif frames is not None and len({f.stem for f in frames}) < len(frames):
            task.refusal = "two frames share a name (e.g. 1.jpg and 1.png) and would write the same outputs"
        owner.setdefault(key, task.source)
        tasks.append(task)
    return tasks, rest


def detection_names(tasks: Sequence) -> List[str]:
    """The names a detectron2 file's default image ids (1..N) follow: photos by file name,
    sequence frames as `<video>/<frame file>`, sorted; video files need an image list."""
    names = []
    for t in tasks:
        if isinstance(t, VideoTask):
            names += [f"{t.video}/{f.name}" for f in t.frame_files or ()]
        else:
            names.append(t.source.name)
    return sorted(names)


@dataclass
class Frame:
    """A video frame in the run."""
    index: int  # position in the video (source frame index)
    stem: str  # its outputs' name
    pixels: np.ndarray
    shown: Path  # how messages name it
    instances: Any = None  # read ahead (file sources), or None (the detector runs in forward)
    done: bool = False  # written by an earlier run


@dataclass
class _Open:
    """A video in progress: its tracker, frame count and overlay encoder."""
    tracker: IdentityTracker
    frames: int = 0
    encoder: Any = None
    size: Optional[Tuple[int, int]] = None
    stack: Any = None
    extra: Dict[str, Any] = field(default_factory=dict)


class MultiPersonVideoJob(Job):
    """Photos through `image_job` (schp.multi_person.run.MultiPersonJob), videos frame by frame through
    its forward pass and fusion, with ids from a tracker per video. One writer thread: ids are given
    in write, which must see a video's frames in order."""
    write_threads = 1
    noun = "inputs"

    def __init__(self, image_job, window: int = TRACK_WINDOW, min_iou: float = TRACK_MIN_IOU,
                 overwrite: bool = False):
        self.image_job, self.overwrite = image_job, overwrite  # overwrite: frames written before are redone
        self.window, self.min_iou = window, min_iou
        self._open: Dict[int, _Open] = {}

    def output_folders(self, tasks: Sequence):
        folders = set()
        for t in tasks:
            if isinstance(t, VideoTask):
                folders |= {t.root} | {t.root / name for name in SUBMISSION_FOLDERS}
            else:
                folders |= {p.parent for p in t.outputs}
        return sorted(folders)

    # -- prepare: the photos as the image job reads them, then each video's frames in order
    def prepare(self, tasks: Sequence) -> Iterator[Unit]:
        images = [k for k, t in enumerate(tasks) if not isinstance(t, VideoTask)]
        if images:
            for unit in self.image_job.prepare([tasks[k] for k in images]):
                unit.index = images[unit.index]
                yield unit
        for k, task in enumerate(tasks):
            if isinstance(task, VideoTask):
                yield from self._video(k, task)

    def _video(self, k: int, task: VideoTask) -> Iterator[Unit]:
        from schp.multi_person.instances import FrameSource, InstanceError

        state = self._open[id(task)] = _Open(IdentityTracker(self.window, self.min_iou))
        source = self.image_job.source
        reads_ahead = source is not None and not self.image_job.source_in_main
        frames = FrameSource(source, task.video) if source is not None else None
        width = height = 0
        try:
            for index, stem, name, pixels in self._decode(task, state):
                height, width = pixels.shape[:2]
                shown = task.source / name
                frame = Frame(index, stem, pixels, shown, done=not self.overwrite and task.frame_done(stem))
                if not frame.done and reads_ahead:
                    try:
                        frame.instances = frames.instances(pixels, Path(name))
                    except InstanceError as err:
                        yield Unit(k, None, f"frame {name}: {err}", width, height, last=True, compute=False)
                        return
                yield Unit(k, frame, None, width, height, last=False, compute=not frame.done)
            yield Unit(k, None, state.extra.pop("reason", None), width, height, last=True, compute=False)
        except Exception as err:  # a frame that cannot be decoded, a video that cannot be opened
            from schp.runs.loop import describe_error
            yield Unit(k, None, describe_error(err), width, height, last=True, compute=False)

    def _decode(self, task: VideoTask, state: _Open) -> Iterator[Tuple[int, str, str, np.ndarray]]:
        """(frame index, output stem, frame name, BGR pixels) of every `every`th frame; the reason a
        video file stopped early goes to state.extra['reason']."""
        from schp.data.decode import read_image
        from schp.runs.parsing import DEFAULT_FPS, EveryNthFrame, VideoError, open_video

        if task.frame_files is not None:
            state.extra["fps"] = DEFAULT_FPS / task.every
            for index, path in enumerate(task.frame_files):
                if index % task.every == 0:
                    try:
                        pixels = read_image(path)
                    except Exception as err:
                        raise VideoError(f"frame {path.name}: {err}") from None
                    yield index, path.stem, path.name, pixels
            return
        capture = open_video(task.source)
        try:
            count = int(capture.get(7))  # CAP_PROP_FRAME_COUNT: from the container, 0 or less if unknown
            fps = capture.get(5)  # CAP_PROP_FPS
            state.extra["fps"] = (fps if np.isfinite(fps) and fps > 0 else DEFAULT_FPS) / task.every
            frames = EveryNthFrame(capture, task.every)
            for index, pixels in frames:
                stem = f"frame_{index:06d}"
                yield index, stem, stem + ".png", pixels
            index = frames.count
            if index == 0:
                state.extra["reason"] = "no frame could be decoded (damaged file, or a codec OpenCV lacks)"
            elif count > 0 and count - index > 1:  # a stated count may be one off when estimated
                parsed = (index + task.every - 1) // task.every
                state.extra["reason"] = (
                    f"decoding stopped at frame {index} of {count} (truncated or damaged); the {parsed} frames "
                    f"before it are in {task.root}, no identities.json or overlay video; run again once the "
                    "file is complete to finish it")
        finally:
            capture.release()

    def stop(self) -> bool:
        return self.image_job.stop()

    # -- forward: the image job's, on each frame as on a photo
    def forward(self, units: List[Unit]) -> List[Any]:
        proxies = []
        for u in units:
            if isinstance(u.payload, Frame):
                f = u.payload
                u = Unit(u.index, (SimpleNamespace(source=f.shown), f.pixels, f.instances), None, u.width, u.height)
            proxies.append(u)
        return self.image_job.forward(proxies)

    # -- write: fusion, ids, files (one writer thread: a video's frames in order)
    def write(self, task, unit: Unit, work):
        if not isinstance(task, VideoTask):
            return self.image_job.write(task, unit, work)
        state = self._open[id(task)]
        frame: Optional[Frame] = unit.payload
        if frame is None:  # the closing unit
            return {"frames": state.frames, "persons": len(state.tracker.identities)}
        if isinstance(work, Exception):
            raise work
        paths = task.frame_paths(frame.stem)
        if frame.done:
            fused = _written(paths)
            state.tracker.observe(frame.index, fused.persons)
        else:
            fused = self._write_frame(task, frame, work, paths, state.tracker)
        state.frames += 1
        if task.overlay is not None:
            self._encode(task, state, frame.pixels, fused)
        return {"frames": state.frames, "persons": len(state.tracker.identities)}

    def _write_frame(self, task: VideoTask, frame: Frame, work, paths: Dict[str, Path], tracker: IdentityTracker):
        from schp.multi_person.outputs import PALETTE, instances_record, save_outputs, save_text
        from schp.utils.outputs import save_label_png

        people, fused = self.image_job.fuse(SimpleNamespace(source=frame.shown), frame.pixels, work)
        ids = tracker.assign(frame.index, [people.ids == k for k in range(1, people.count + 1)])
        fused = relabel(fused, ids)
        height, width = frame.pixels.shape[:2]
        record = instances_record(Path(frame.shown).name, height, width, people, self.image_job.source.describe())
        record["identities"] = ids
        for path in paths.values():
            path.parent.mkdir(parents=True, exist_ok=True)
        save_label_png(fused.persons.astype(np.uint8), PALETTE, paths["instance_segmentation"])
        save_text([f"1 {float(score)}" for _, score, _ in fused.tags], paths["instance_segmentation_txt"])
        save_outputs(paths, frame.pixels, fused, record, self.image_job.label_map)
        return fused

    def _encode(self, task: VideoTask, state: _Open, pixels: np.ndarray, fused) -> None:
        import cv2
        from contextlib import ExitStack

        from schp.multi_person.outputs import overlay_image
        from schp.runs.parsing import VideoError
        from schp.utils.outputs import atomic_path

        if state.encoder is None:
            state.size = (pixels.shape[1], pixels.shape[0])
            state.stack = ExitStack()
            task.root.mkdir(parents=True, exist_ok=True)
            tmp = state.stack.enter_context(atomic_path(task.overlay))
            state.encoder = cv2.VideoWriter(str(tmp), cv2.VideoWriter_fourcc(*"mp4v"), state.extra["fps"], state.size)
            state.stack.callback(state.encoder.release)  # runs before the rename
            if not state.encoder.isOpened():
                raise VideoError("OpenCV cannot write .mp4 video here (no mp4v encoder)")
        image = overlay_image(pixels, fused)
        if (image.shape[1], image.shape[0]) != state.size:  # frames of a sequence may differ in size
            image = cv2.resize(image, state.size, interpolation=cv2.INTER_AREA)
        state.encoder.write(image)

    def finish(self, task, ok: bool) -> None:
        """A video's overlay is renamed into place and its identities.json written only if every
        frame went well; else the overlay's temporary is removed."""
        from schp.utils.outputs import atomic_path

        state = self._open.pop(id(task), None)
        if state is None:
            return
        if state.stack is not None:
            if ok:
                state.stack.close()
            else:
                state.stack.__exit__(RuntimeError, RuntimeError("not finished"), None)
        if ok:
            record = {"video": str(task.source), "frames": state.frames, "every": task.every,
                      "track_window": self.window, "track_iou": self.min_iou,
                      "identities": state.tracker.summary(), "unassigned": state.tracker.unassigned}
            task.root.mkdir(parents=True, exist_ok=True)
            with atomic_path(task.record) as tmp:
                tmp.write_text(json.dumps(record, indent=1) + "\n")


def relabel(fused, ids: Sequence[int]):
    """The fused maps with person k (1-based, the source's order) renamed ids[k - 1] (0: no id);
    parts and classes unchanged, tags in ascending id order."""
    lut = np.zeros(len(ids) + 1, dtype=np.int32)
    lut[1:] = ids
    persons = lut[np.clip(fused.persons, 0, len(ids))]
    tags = sorted((int(lut[k]), score, box) for k, score, box in fused.tags if k <= len(ids) and lut[k])
    return dataclasses.replace(fused, persons=persons, tags=tags)


def _written(paths: Dict[str, Path]):
    """The class and person maps a frame was given by an earlier run (for the tracker and overlay)."""
    from PIL import Image

    with Image.open(paths["instance_segmentation"]) as image:
        persons = np.asarray(image).astype(np.int32)
    with Image.open(paths["global_parsing"]) as image:
        classes = np.asarray(image)
    return SimpleNamespace(classes=classes, persons=persons)
