"""The multi-person run: a job of the one run loop, and the library call the command is thin over.

For each image: instances -> persons -> global and local logits -> fusion -> files. Decoding and
reading instances run ahead in threads (the prepare stage), the networks (parsers, torchvision
detector) in the calling thread (forward), fusion and writing in one writer thread (write).
"""
import dataclasses
import os
from concurrent.futures import ThreadPoolExecutor
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

from schp.data.decode import ImageError, read_image
from schp.errors import SetupError
from schp.multi_person.instances import InstanceError
from schp.multi_person.video import MultiPersonVideoJob, VideoTask, detection_names, plan_videos
from schp.multi_person.nms import EXPAND_RATIO, MAX_PERSONS, OVERLAP_THRESHOLD, SCORE_THRESHOLD, select_people
from schp.runs.loop import Job, Reporter, RunReport, Task, Unit, stop_signals_held

PathLike = Union[str, os.PathLike]


@dataclass
class ImageTask(Task):
    source: Path
    name: str
    paths: Dict[str, Path]  # kind of output -> file (schp.multi_person.outputs.output_paths)
    refusal: Optional[str] = None

    @property
    def outputs(self) -> List[Path]:
        return list(self.paths.values())


@dataclass
class Settings:
    score_threshold: float = SCORE_THRESHOLD
    overlap_threshold: float = OVERLAP_THRESHOLD
    expand: float = EXPAND_RATIO
    jpeg_roundtrip: bool = True
    legacy_person_count: bool = False
    batch_size: int = 1  # person crops per forward pass
    num_workers: int = 1  # threads decoding images and reading instances


def _decode(task: ImageTask, source, in_main: bool):
    """(image, instances or None) of a task; instances now unless the source needs the calling thread."""
    image = read_image(task.source)
    return image, (None if in_main else source.instances(image, task.source))


class MultiPersonJob(Job):
    write_threads = 1
    noun = "images"

    def __init__(self, global_parser, local_parser, source, settings: Settings, reporter: Optional[Reporter] = None,
                 label_map=None):
        self.global_parser, self.local_parser = global_parser, local_parser
        self.source, self.settings = source, settings
        self.reporter = reporter or Reporter()
        self.label_map = label_map
        # a detector network runs in the calling thread, beside the parsers; file sources run ahead
        self.source_in_main = hasattr(source, "model")
        self._readers: Optional[ThreadPoolExecutor] = None

    def prepare(self, tasks: Sequence[ImageTask]) -> Iterator[Unit]:
        workers = max(1, self.settings.num_workers)
        self._readers = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="mp-read")
        ahead = deque()
        queue = deque(range(len(tasks)))
        while queue or ahead:
            while queue and len(ahead) < workers + 1:
                k = queue.popleft()
                ahead.append((k, self._readers.submit(_decode, tasks[k], self.source, self.source_in_main)))
            k, future = ahead.popleft()
            try:
                image, instances = future.result()
            except (ImageError, InstanceError) as err:
                yield Unit(k, error=str(err))
                continue
            except Exception as err:  # anything else about this image: reported, the run goes on
                from schp.runs.loop import describe_error
                yield Unit(k, error=describe_error(err))
                continue
            yield Unit(k, (tasks[k], image, instances), None, image.shape[1], image.shape[0])
        self.stop()

    def stop(self) -> bool:
        readers, self._readers = self._readers, None
        if readers is not None:
            readers.shutdown(wait=True, cancel_futures=True)
        return False

    def forward(self, units: List[Unit]) -> List[Any]:
        """Persons and logits of each image; an image whose instances fail gets its reason."""
        from schp.multi_person.parsing import crop_images, image_logits

        works = []
        s = self.settings
        for unit in units:
            task, image, instances = unit.payload
            try:
                if instances is None:
                    instances = self.source.instances(image, task.source)
            except InstanceError as err:
                works.append(err)
                continue
            height, width = image.shape[:2]
            people = select_people(instances, height, width, s.score_threshold, s.overlap_threshold, s.expand)
            if people.dropped_over_cap:
                self.reporter.line(f"warning: {task.source}: {people.dropped_over_cap} persons past the first "
                                   f"{MAX_PERSONS} dropped (the person map is 8-bit)")
            if people.count == 0:
                works.append((people, None, None))
                continue
            crops = crop_images(image, people.crop_boxes, s.jpeg_roundtrip)
            global_logits = image_logits(self.global_parser, [image])[0]
            crop_logits = image_logits(self.local_parser, crops, s.batch_size)
            works.append((people, global_logits, crop_logits))
        return works

    def write(self, task: ImageTask, unit: Unit, work) -> Dict[str, int]:
        """Fusion and every output of one image (writer thread)."""
        from schp.multi_person.outputs import instances_record, save_outputs

        if isinstance(work, Exception):
            raise work
        _, image, _ = unit.payload
        people, fused = self.fuse(task, image, work)
        record = instances_record(task.source.name, image.shape[0], image.shape[1], people, self.source.describe())
        save_outputs(task.paths, image, fused, record, self.label_map)
        return {"persons": len(fused.tags), "parts": len(fused.confidences)}

    def fuse(self, task, image, work):
        """(persons kept, fused maps) of one image from its forward pass's work."""
        from schp.multi_person.fusion import fuse, nobody

        people, global_logits, crop_logits = work
        height, width = image.shape[:2]
        if people.count == 0:
            fused = nobody(height, width)
        else:
            fused = fuse(global_logits, crop_logits, people.ids, people.scores, people.crop_boxes,
                         self.settings.legacy_person_count)
        if fused.parts_capped:
            self.reporter.line(f"warning: {task.source}: more than 255 (person, class) parts; the rest have no "
                               "part id (the part map is 8-bit, as in the original)")
        return people, fused


@dataclass
class MultiPersonOptions:
    """Every option of a multi-person run (the command line's, by their Python names)."""
    instances: Tuple = ("torchvision",)  # ("masks", DIR) | ("detectron2", FILE) | ("torchvision",)
    image_list: Optional[PathLike] = None
    detector_weights: Optional[PathLike] = None
    detector_min_size: int = 800
    detector_max_size: int = 1333
    global_checkpoint: Optional[PathLike] = None
    local_checkpoint: Optional[PathLike] = None
    flip: bool = False
    scales: Sequence[float] = (1.0,)
    input_size: Tuple[int, int] = (473, 473)
    score_threshold: float = SCORE_THRESHOLD
    overlap_threshold: float = OVERLAP_THRESHOLD
    expand: float = EXPAND_RATIO
    jpeg_roundtrip: bool = True
    legacy_person_count: bool = False
    overlay: bool = True
    device: str = "auto"
    gpu: Optional[str] = None
    precision: str = "fp32"
    backend: Optional[str] = None
    batch_size: int = 1
    num_workers: int = 1
    overwrite: bool = False
    summary: Optional[PathLike] = None
    label_map: Any = None  # a JSON file, a dict of its structure, or a LabelMap (for the class map)
    sequences: bool = False  # each subfolder of the input folder is a video of frames
    every: int = 1  # videos: parse every Nth frame
    track_window: int = 30  # videos: frames an id waits for its person to come back
    track_iou: float = 0.3  # videos: the least mask IoU of the same person in two frames

    def settings(self) -> Settings:
        return Settings(self.score_threshold, self.overlap_threshold, self.expand, self.jpeg_roundtrip,
                        self.legacy_person_count, self.batch_size, self.num_workers)


def plan_images(input_dir: PathLike, output_dir: PathLike, overlay: bool = True) -> Tuple[List[ImageTask], List[Path]]:
    """(tasks, files that are not images) of a folder of photos."""
    from schp.data.listing import list_images
    from schp.multi_person.outputs import output_paths

    input_dir, output_dir = Path(input_dir), Path(output_dir)
    if not input_dir.is_dir():
        raise SetupError("no such folder", "input_dir", str(input_dir))
    if input_dir.resolve() == output_dir.resolve():
        raise SetupError("{output_dir} must differ from {input_dir}", mentions={"output_dir": ..., "input_dir": ...})
    images, others = list_images(input_dir)
    tasks, owner = [], {}
    for rel in images:
        task = ImageTask(input_dir / rel, str(rel), output_paths(output_dir, rel.stem, overlay))
        if rel.stem in owner:  # a.jpg and a.png would write the same outputs
            task.refusal = f"its outputs would overwrite those of {owner[rel.stem]}; rename one of them"
        owner.setdefault(rel.stem, input_dir / rel)
        tasks.append(task)
    return tasks, [input_dir / o for o in others]


def make_source(options: MultiPersonOptions, names: List[str], device):
    from schp.multi_person.instances import (Detectron2FileSource, MaskFolderSource, SourceError,
                                             TorchvisionSource)
    kind, rest = options.instances[0], list(options.instances[1:])
    try:
        if kind == "masks" and len(rest) == 1:
            return MaskFolderSource(Path(rest[0]))
        if kind == "detectron2" and len(rest) == 1:
            return Detectron2FileSource(Path(rest[0]), options.image_list, names)
        if kind == "torchvision" and not rest:
            return TorchvisionSource(device, options.detector_weights, options.detector_min_size,
                                     options.detector_max_size)
    except SourceError as err:
        raise SetupError(str(err)) from None
    raise SetupError("expected 'masks DIR', 'detectron2 FILE' or 'torchvision'", "instances",
                     " ".join(map(str, options.instances)))


def load_parsers(options: MultiPersonOptions, device):
    """((global, local) HumanParsers, their checkpoint paths). Both checkpoints are read first, through
    the one loading path (checkpoint.load_checkpoint), so that the local network's export can start
    beside the global one's from the weights already in memory (each file is read once)."""
    from schp.backends import needs_any_size
    from schp.checkpoint import CheckpointError, default_cache_dir, load_checkpoint
    from schp.data.catalog import MULTI_PERSON
    from schp.inference import HumanParser

    roles = ("global", "local")
    specs = {role: dataclasses.replace(MULTI_PERSON[role], input_size=tuple(options.input_size)) for role in roles}
    states, paths = {}, []
    for role, given in zip(roles, (options.global_checkpoint, options.local_checkpoint)):
        try:
            states[role], path = load_checkpoint(specs[role], given or None, allow_download=None,
                                                 cache_dir=default_cache_dir())
        except CheckpointError as err:
            raise SetupError(str(err), f"{role}_checkpoint") from None
        paths.append(path)
    beside, local_digest = export_local_beside(specs["local"], states["local"], options.backend, device,
                                               any_size=needs_any_size(options.scales))
    digests = {"global": None, "local": local_digest}
    parsers = []
    try:
        for role in roles:
            if role == "local" and beside is not None:
                beside.join()  # its file is in the cache now, unless it failed: the local parser then exports
            parsers.append(HumanParser(specs[role], states.pop(role), device, options.precision, flip=options.flip,
                                       scales=options.scales, backend=options.backend,
                                       state_digest=digests[role]))
    finally:
        if beside is not None:
            beside.stop()
    return parsers, paths


def export_local_beside(spec, state, backend: str, device, any_size: bool = False):
    """(export, digest): with a runtime backend named and the local network's export not cached yet, its
    export started in a child process, so that it runs beside the global network's (about half the wait
    on two cores), else None; and the weights' digest where it was computed to find the file, else None
    (the local parser finds its file by it without reading every weight again)."""
    from schp.backends import export_path, missing_packages, state_dict_digest
    from schp.background_runtime import ChildExport

    if backend not in ("onnxruntime", "openvino") or getattr(device, "type", None) != "cpu" \
            or missing_packages(backend, import_them=False):
        return None, None  # torch exports nothing, auto prepares its runtimes beside torch already, and
        # a backend that cannot run here is the global parser's error to report
    digest = state_dict_digest(state)
    path = export_path(spec, state, None, digest, any_size)  # the file the local parser will look for
    if path is None or path.is_file():
        return None, digest
    return ChildExport(spec, state, path, any_size).start(), digest


def manifest_record(options: MultiPersonOptions, source, checkpoints, device, report: RunReport) -> Dict[str, Any]:
    from schp.runs.extract import shown_path, versions

    return {
        "seconds": round(report.seconds, 3),
        "interrupted": report.interrupted,
        "stopped": report.stopped_reason,
        "instances": source.describe() if source is not None else " ".join(map(str, options.instances)),
        "checkpoints": {"global": shown_path(checkpoints[0]), "local": shown_path(checkpoints[1])}
        if checkpoints else None,
        "device": str(device) if device is not None else None,
        "precision": options.precision, "backend": options.backend, "flip": options.flip,
        "multi_scales": ",".join(f"{s:g}" for s in options.scales),
        "input_size": ",".join(str(v) for v in options.input_size), "jpeg_roundtrip": options.jpeg_roundtrip,
        "legacy_person_count": options.legacy_person_count,
        "versions": versions(),
        "totals": {s: report.count(s) for s in ("processed", "skipped", "failed", "not-run")},
        "images": [{"input": str(o.task.source), "status": o.status, "reason": o.reason,
                    "persons": o.details.get("persons"), "parts": o.details.get("parts"),
                    "seconds": round(o.seconds, 3) or None,
                    **({"frames": o.details["frames"]} if "frames" in o.details else {}),
                    "outputs": {k: str(v) for k, v in o.task.paths.items()}} for o in report.outcomes],
    }


@dataclass
class MultiPersonRun:
    """A planned multi-person run (nothing loaded yet); `execute()` does the rest."""
    tasks: List[ImageTask]
    not_images: List[Path]
    output_dir: Path
    options: MultiPersonOptions
    label_map: Any = None
    notes: List[str] = field(default_factory=list)

    def execute(self, reporter: Optional[Reporter] = None) -> RunReport:
        import cv2

        from schp.inference import select_device
        from schp.runs.extract import remove_empty, write_manifest
        from schp.runs.loop import run
        from schp.utils.outputs import check_writable

        reporter = reporter or Reporter()
        o = self.options
        for note in self.notes:
            reporter.line(note)
        device = select_device(o.device, o.gpu)
        made = [q for q in (self.output_dir, *self.output_dir.parents) if not q.exists()]
        try:
            check_writable(self.output_dir)
        except OSError as err:
            remove_empty(made)
            raise SetupError(f"cannot write there: {err.strerror or err}", "output_dir", str(self.output_dir)) from None
        source, parsers, checkpoints = None, (None, None), None
        try:
            if any(t.plan(o.overwrite) == "process" for t in self.tasks):  # else: no model, no detector
                source = make_source(o, detection_names(self.tasks), device)
                parsers, checkpoints = load_parsers(o, device)
        except BaseException:  # any failed set-up leaves no folder it made
            remove_empty(made)
            raise
        cv2.setNumThreads(1)
        job = MultiPersonJob(parsers[0], parsers[1], source, o.settings(), reporter, self.label_map)
        if any(isinstance(t, VideoTask) for t in self.tasks):
            job = MultiPersonVideoJob(job, o.track_window, o.track_iou, o.overwrite)
        report = run(job, self.tasks, overwrite=o.overwrite, reporter=reporter)
        report.record = manifest_record(o, source, checkpoints, device, report)
        with stop_signals_held() as held:
            reporter.line(report.summary_line())
            if o.summary:
                try:
                    write_manifest(Path(o.summary), report.record)
                except OSError as err:
                    report.summary_error = f"cannot write summary {o.summary}: {err.strerror or err}"
                    reporter.line(f"error: {report.summary_error}")
            report.late_signals = held.received
        return report


def prepare_multi_person(input_dir: PathLike, output_dir: PathLike, **options) -> MultiPersonRun:
    """Check the options and plan the run (no model loaded)."""
    o = MultiPersonOptions(**options)
    if o.batch_size < 1 or o.num_workers < 0:
        raise SetupError("{batch_size} must be >= 1 and {num_workers} >= 0",
                         mentions={"batch_size": ..., "num_workers": ...})
    from schp.data.catalog import MULTI_PERSON
    from schp.data.label_map import resolve_label_map
    label_map = resolve_label_map(o.label_map, MULTI_PERSON["global"].labels)
    if o.every < 1 or o.track_window < 0 or not 0 < o.track_iou <= 1:
        raise SetupError("{every} must be >= 1, {track_window} >= 0 and 0 < {track_iou} <= 1",
                         mentions={"every": ..., "track_window": ..., "track_iou": ...})
    tasks, others = plan_images(input_dir, output_dir, o.overlay)
    from schp.runs.extract import check_summary
    check_summary(o.summary)
    videos, others = plan_videos(input_dir, output_dir, [p.relative_to(input_dir) for p in others], o.sequences,
                                 o.overlay, o.every)
    tasks += videos
    others = [Path(input_dir) / p for p in others]
    notes = [f"skipping {p}: not an image or a video" for p in others]
    return MultiPersonRun(tasks, others, Path(output_dir), o, label_map, notes)


def parse_multi_person(input_dir: PathLike, output_dir: PathLike, reporter: Optional[Reporter] = None,
                       **options) -> RunReport:
    """Every person of every photo in `input_dir`, with their parts; options as MultiPersonOptions.

    >>> report = parse_multi_person("photos", "out", instances=("masks", "photos_masks"))
    """
    return prepare_multi_person(input_dir, output_dir, **options).execute(reporter)


__all__ = ["ImageTask", "MultiPersonJob", "MultiPersonOptions", "Settings", "parse_multi_person",
           "prepare_multi_person"]
