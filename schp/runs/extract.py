"""The extractor's runs as library calls: a folder of images and videos, or an IntegratedPIFu tree.

`parse_folder(input_dir, output_dir, ...)` and `parse_integratedpifu(root, ...)` plan the tasks
(what to parse, skip or refuse), check the folders, load the model only when something is left to
compute, run the one run loop, write the manifest (`summary`), and return the RunReport. Under
torchrun each process takes its share and rank 0 writes the manifest of the whole run. Errors before
the first input are SetupError naming the parameter; folders made by a failed set-up are removed.
"""
import os
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

from schp.data.decode import DEFAULT_MAX_PIXELS
from schp.errors import SetupError
from schp.runs.loop import Reporter, RunReport, stop_signals_held

NOT_IMAGE_LINES = 5  # unless quiet, non-image files named one a line up to this many, then counted
PathLike = Union[str, os.PathLike]


@dataclass
class ExtractOptions:
    """Every option of an extractor run (the command line's, by their Python names)."""
    dataset: str = "pascal"
    checkpoint: Optional[PathLike] = None
    device: str = "auto"
    gpu: Optional[str] = None
    precision: str = "fp32"
    backend: Optional[str] = None  # None: the default of schp.backends (SCHP_BACKEND or auto)
    allow_tf32: bool = False
    flip: bool = False
    scales: Sequence[float] = (1.0,)
    logits: bool = False
    overlay: bool = False
    recursive: bool = False
    every: int = 1
    subjects: str = "all"
    overwrite: bool = False
    batch_size: int = 1
    num_workers: int = 1
    max_pixels: int = DEFAULT_MAX_PIXELS  # 0 = no limit
    shard: Optional[Tuple[int, int]] = None  # (index, count), 1 <= index <= count
    summary: Optional[PathLike] = None
    label_map: Any = None  # a JSON file, a dict of its structure, or a LabelMap
    quiet: bool = False  # fewer lines about skipped non-image files

    def check(self) -> None:
        if self.batch_size < 1 or self.num_workers < 0:
            raise SetupError("{batch_size} must be >= 1 and {num_workers} >= 0",
                             mentions={"batch_size": ..., "num_workers": ...})
        if self.every < 1:
            raise SetupError("{every} must be >= 1", mentions={"every": ...})
        if self.max_pixels < 0:
            raise SetupError("{max_pixels} must be >= 0 (0 = no limit)", mentions={"max_pixels": ...})
        if self.shard is not None:
            index, count = self.shard
            if not 1 <= index <= count:
                raise SetupError("need 1 <= I <= N", "shard", f"{index}/{count}")


@dataclass
class Plan:
    """What a run will do: the tasks, notes found while listing them, and the files that are not
    images (skipped; listed in the manifest)."""
    mode: str
    tasks: list
    notes: List[str]
    not_images: List[Path] = field(default_factory=list)

    def listing(self, overwrite: bool) -> List[str]:
        """One tab-separated line per task: what a run would do, the input, its outputs."""
        return [f"{task.plan(overwrite)}\t{task.source}\t" + "\t".join(str(p) for p in task.outputs)
                for task in self.tasks]


def not_image_notes(others: List[Path], quiet: bool, summary: Optional[PathLike]) -> List[str]:
    """Lines about skipped non-image files: quiet gives one count; else the first few, then a count."""
    if not others:
        return []
    why = "not images (extension not one of .jpg .jpeg .png .bmp .tif .tiff .webp)"
    where = f"; listed in {summary}" if summary else ""
    if quiet:
        return [f"skipping {len(others)} file(s) that are {why}{where}"]
    lines = [f"skipping {o}: not an image" for o in others[:NOT_IMAGE_LINES]]
    if len(others) > NOT_IMAGE_LINES:
        lines.append(f"skipping {len(others) - NOT_IMAGE_LINES} more file(s) that are not images{where}")
    lines[0] += " (extension not one of .jpg .jpeg .png .bmp .tif .tiff .webp)"
    return lines


def check_output_dir(output_dir: Optional[PathLike]) -> None:
    """An output folder that exists, or can be made, as a folder (no file in the way), said plainly."""
    if not output_dir:
        return
    out = Path(output_dir)
    blocker = next((q for q in (out, *out.parents) if q.exists() or q.is_symlink()), None)
    if blocker is not None and not blocker.is_dir():
        what = "it" if blocker == out else str(blocker)
        raise SetupError(f"cannot write to {{output_dir}}: not a folder ({what} is a file)",
                         mentions={"output_dir": str(out)})


def check_summary(summary: Optional[PathLike]) -> None:
    """A manifest path that can be written: checked with the output folders, before any work, so that
    a file in the way is the same set-up error (exit 2) in every command, not a failure at the end."""
    if not summary:
        return
    path = Path(summary)
    if path.is_dir():
        raise SetupError("cannot write {summary}: it is a folder", mentions={"summary": str(path)})
    blocker = next((q for q in path.parents if q.exists() or q.is_symlink()), None)
    if blocker is not None and not blocker.is_dir():
        raise SetupError(f"cannot write {{summary}}: not a folder ({blocker} is a file)",
                         mentions={"summary": str(path)})


def plan_folder(input_dir: PathLike, output_dir: PathLike, options: ExtractOptions) -> Plan:
    from schp.data.listing import list_images

    input_dir, output_dir = Path(input_dir), Path(output_dir)
    if not input_dir.is_dir():
        raise SetupError("no such folder", "input_dir", str(input_dir))
    if input_dir.resolve() == output_dir.resolve():
        raise SetupError("{output_dir} must differ from {input_dir} (outputs would be taken for inputs)",
                         mentions={"output_dir": ..., "input_dir": ...})
    images, others = list_images(input_dir, options.recursive, exclude=output_dir)
    tasks, notes, others = folder_tasks(input_dir, output_dir, images, others, options)
    return Plan("folder", tasks, notes, [input_dir / o for o in others])


def folder_tasks(input_dir, output_dir, images: list, others: list, options: ExtractOptions):
    """(tasks, notes, non-image files) of a listed folder: the output names, and the refusal of two
    inputs that would write the same outputs. `input_dir` / `output_dir` are Paths, or any root
    with Path's `/` (the Ray engine's object URLs)."""
    from schp.runs.tasks import ImageTask, is_video_name, video_task

    videos = [o for o in others if is_video_name(o.name)]  # frame by frame
    others = [o for o in others if not is_video_name(o.name)]
    notes = not_image_notes([input_dir / o for o in others], options.quiet, options.summary)
    tasks, owner = [], {}
    for rel in sorted(images + videos, key=str):
        stem = rel.with_suffix("")
        if is_video_name(rel.name):
            task = video_task(input_dir, output_dir, rel, options.logits, options.overlay, options.every)
            stem = (stem, "video")  # a.mp4 and a.jpg write different files; a.mp4 and a.avi the same
        else:
            task = ImageTask(source=input_dir / rel, name=str(rel), png=output_dir / f"{stem}.png",
                             logits=output_dir / f"{stem}.npy" if options.logits else None,
                             overlay=output_dir / f"{stem}_overlay.jpg" if options.overlay else None)
        if stem in owner:  # a.jpg and a.png would write the same a.png: the first in order keeps it
            task.refusal = f"its outputs would overwrite those of {owner[stem].source}; rename one of them"
        owner.setdefault(stem, task)
        tasks.append(task)
    return tasks, notes, others


def plan_integratedpifu(root: PathLike, output_dir: Optional[PathLike], options: ExtractOptions, spec) -> Plan:
    from schp.data import integratedpifu as ipifu
    from schp.runs.tasks import ImageTask

    if spec.name != "pascal":
        raise SetupError(f"needs {{dataset}}: IntegratedPIFu's codes are defined for the 7 "
                         f"Pascal-Person-Part classes, not the {spec.num_classes} of {spec.name}",
                         "integratedpifu_dir", str(root), mentions={"dataset": "pascal"})
    root = Path(root)
    if not root.is_dir():
        raise SetupError("not a folder" if root.exists() else "no such folder", "integratedpifu_dir", str(root))
    if not (root / ipifu.RENDERS).is_dir():
        raise SetupError(f"no {ipifu.RENDERS} folder in it", "integratedpifu_dir", str(root))
    parse_root = Path(output_dir) if output_dir else root / ipifu.PARSE_RESULTS
    subjects, note, refused = ipifu.find_subjects(root, options.subjects)
    renders, missing = ipifu.find_renders(root, subjects)
    notes = [note] if note else []
    notes += [f"warning: subject {s} is listed but has no folder {root / ipifu.RENDERS / s}" for s in missing]
    tasks = [ImageTask(source=r.list_file, name=f"{r.list_file.name}:{r.line}",  # failed, counted, no outputs
                       refusal=f"line {r.line}: subject id {r.subject!r} {r.reason}; only plain folder names "
                               "are taken (the other subjects proceed)") for r in refused]
    tasks += [ImageTask(source=r.image, name=f"{r.subject}/{r.image.name}",
                        png=ipifu.preview_path(r), codes=ipifu.parse_map_path(parse_root, r),
                        logits=ipifu.parse_map_path(parse_root, r, "_logits") if options.logits else None,
                        overlay=r.image.with_name(f"rendered_parse_{r.yaw}_overlay.jpg") if options.overlay
                        else None,
                        refusal=f"its outputs would overwrite those of {r.clash}; rename one of them" if r.clash
                        else None)
              for r in renders]
    return Plan("integratedpifu", tasks, notes)


def ensure_writable(folder: Path, created: List[Path]) -> None:
    """Create `folder` if needed and prove it writable; folders made are added to `created`."""
    from schp.utils.outputs import check_writable
    missing = [q for q in (folder, *folder.parents) if not q.exists()]
    try:
        check_writable(folder)
    except OSError as err:
        raise SetupError(f"cannot write to {folder}: {err.strerror or err}") from None
    finally:
        created.extend(q for q in reversed(missing) if q.is_dir() and q not in created)


def remove_empty(folders: List[Path]) -> None:
    """Undo the folders a failed set-up made, deepest first, where they are still empty."""
    for folder in sorted(folders, key=lambda q: len(q.parts), reverse=True):
        try:
            folder.rmdir()
        except OSError:
            pass


def torchrun_ranks():
    """This process's rank when started by torchrun (RANK, WORLD_SIZE in the environment), else None."""
    if "WORLD_SIZE" not in os.environ:
        return None
    from schp.distributed import from_environment
    try:
        return from_environment()
    except ValueError as err:
        raise SetupError(f"torchrun environment: {err}") from None


def shown_path(path: Optional[Path]) -> Optional[str]:
    """A path for the manifest: relative to the working folder when inside it (as the inputs are)."""
    if path is None:
        return None
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def versions() -> Dict[str, str]:
    import platform

    import cv2
    import numpy as np
    import torch

    import schp
    return {"schp": schp.__version__, "python": platform.python_version(), "torch": torch.__version__,
            "opencv": cv2.__version__, "numpy": np.__version__}


def write_manifest(path: Path, record: Dict[str, Any]) -> None:
    """The run's JSON record, written whole or not at all."""
    import json

    from schp.utils.outputs import atomic_path
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(record, indent=1, ensure_ascii=False) + "\n")


def manifest_record(plan: Plan, options: ExtractOptions, spec, checkpoint, parser, report: RunReport,
                    started: float, extra=None) -> Dict[str, Any]:
    manifest = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "seconds": round(report.seconds, 3),
        "interrupted": report.interrupted,
        "stopped": report.stopped_reason,
        "mode": plan.mode,
        "checkpoint": shown_path(checkpoint) if checkpoint else None,
        "dataset": spec.name,
        "device": str(parser.device) if parser else None,
        "precision": options.precision,
        "backend": parser.backend if parser else None,  # the last one (auto may switch from torch once)
        "crops_by_backend": dict(parser.crops_by_backend) if parser else None,
        "label_map": shown_path(Path(options.label_map)) if isinstance(options.label_map, (str, os.PathLike))
        else None,
        "versions": versions(),
        "totals": {s: report.count(s) for s in ("processed", "skipped", "failed", "not-run")},
        "abandoned_in_flight": report.abandoned,
        "not_images": [str(p) for p in plan.not_images],
        "inputs": [{"input": str(o.task.source), "status": o.status, "reason": o.reason,
                    "outputs": [str(p) for p in o.task.outputs], "width": o.width or None,
                    "height": o.height or None, "seconds": round(o.seconds, 4) or None}
                   for o in report.outcomes],
    }
    manifest["totals"]["inputs"] = len(report.outcomes)
    manifest.update(extra or {})
    return manifest


@dataclass
class Extraction:
    """A planned extractor run: `plan` is known, nothing is loaded yet; `run()` does the rest."""
    plan: Plan
    options: ExtractOptions
    spec: Any
    label_map: Any
    ranks: Any = None
    started: float = field(default_factory=time.time)

    def set_up(self, reporter: Reporter):
        """(job, parser, checkpoint): the output folders checked, the model loaded if anything is left
        to compute, the job of the run loop; a failure before the first input is a SetupError."""
        from schp.errors import SCHPError
        from schp.runs.parsing import ParseJob
        from schp.utils.palette import get_palette

        o, created = self.options, []
        try:
            for folder in sorted({p.parent for task in self.plan.tasks for p in task.outputs}):
                ensure_writable(folder, created)
            parser, checkpoint = None, None  # nothing to compute: no need to load the model
            if any(task.plan(o.overwrite) == "process" for task in self.plan.tasks):
                parser, checkpoint = load_model(o, self.spec, images_to_parse(self.plan.tasks, o.overwrite))
            if self.ranks:
                start_ranks(self.ranks, o, parser)
        except (SCHPError, OSError, RuntimeError) as err:  # anything before the first input
            remove_empty(created)
            if isinstance(err, SCHPError) and err.exit_code == 2:
                raise
            raise SetupError(setup_message(err)) from None
        except KeyboardInterrupt:
            remove_empty(created)
            raise
        import cv2
        cv2.setNumThreads(1)  # torch owns the cores; OpenCV's own pool would only compete with it
        job = ParseJob(parser, get_palette(self.spec.num_classes), o.batch_size, o.num_workers,
                       max_pixels=o.max_pixels or None, label_map=self.label_map, overwrite=o.overwrite,
                       reporter=reporter)
        return job, parser, checkpoint

    def manifest_extra(self, job) -> Optional[Dict[str, Any]]:
        """Facts of the run's engine for the manifest (the Ray engine's cluster and actors)."""
        return None

    def run(self, reporter: Optional[Reporter] = None) -> RunReport:
        """Load the model if anything is left to compute, run every task, write the manifest."""
        from schp.errors import describe_exception
        from schp.runs.loop import Outcome, run

        reporter = reporter or Reporter()
        o = self.options
        job, parser, checkpoint = self.set_up(reporter)
        try:
            report = run(job, self.plan.tasks, overwrite=o.overwrite, reporter=reporter)
        except (KeyboardInterrupt, Exception) as err:  # last resort: the run's own handling was bypassed
            interrupted = isinstance(err, KeyboardInterrupt)
            if not interrupted:
                reporter.line(f"error: the run failed unexpectedly: {describe_exception(err)}")
            report = RunReport([Outcome(task, "not-run") for task in self.plan.tasks], interrupted=interrupted,
                               stopped_reason=None if interrupted else "unexpected error",
                               seconds=time.time() - self.started)
        extra = self.manifest_extra(job)
        if self.ranks:
            from schp.distributed import gather_report
            report, devices = gather_report(self.ranks, report, parser)  # every rank's outcomes, in order
            extra = {"devices": devices}
        report.record = manifest_record(self.plan, o, self.spec, checkpoint, parser, report, self.started, extra)
        return report

    def execute(self, reporter: Optional[Reporter] = None) -> RunReport:
        """The whole run: its notes, `run`, then the summary line and the manifest, which stop signals
        wait for (milliseconds) so that the record of the run is never lost."""
        reporter = reporter or Reporter()
        for note in self.plan.notes:
            reporter.line(note)
        report = self.run(reporter)
        main = not self.ranks or self.ranks.is_main
        with stop_signals_held() as held:
            if main:
                reporter.line(report.summary_line())
            if main and self.options.summary:
                try:
                    write_manifest(Path(self.options.summary), report.record)
                    if report.abandoned:
                        reporter.line(f"summary written to {self.options.summary}")
                except OSError as err:
                    report.summary_error = f"cannot write summary {self.options.summary}: {err.strerror or err}"
                    reporter.line(f"error: {report.summary_error}")
            report.late_signals = held.received
        if self.ranks:  # the others leave only once rank 0 has written the manifest
            self.ranks.barrier()
            self.ranks.stop()
        return report


def setup_message(err: BaseException) -> str:
    """One sentence for a set-up failure: ours as written, the system's with the file it names."""
    if isinstance(err, OSError) and err.strerror:
        where = f"{err.filename}: " if err.filename else ""
        return f"{where}{err.strerror}"
    from schp.errors import SCHPError
    if isinstance(err, SCHPError):
        return str(err)
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__


def images_to_parse(tasks, overwrite: bool) -> Optional[int]:
    """How many images this run will parse (the length `--backend auto` weighs against a one-time
    export); None when a video is among them (its frame count is not known before decoding)."""
    from schp.runs.tasks import VideoTask

    todo = [task for task in tasks if task.plan(overwrite) == "process"]
    return None if any(isinstance(task, VideoTask) for task in todo) else len(todo)


def load_model(options: ExtractOptions, spec, expected_images: Optional[int] = None):
    """(HumanParser, checkpoint path) through the one loading path of every front door."""
    from schp.api import load_parser
    from schp.errors import SCHPError

    try:
        return load_parser(spec, options.checkpoint, options.device, options.gpu, options.precision,
                           options.allow_tf32, flip=options.flip, scales=options.scales, backend=options.backend,
                           expected_images=expected_images)
    except SCHPError:  # the checkpoint, or a device, precision or backend this machine lacks
        raise
    except ValueError as err:
        raise SetupError(str(err)) from None


def start_ranks(ranks, options: ExtractOptions, parser) -> None:
    """Meet the other ranks (gloo on the CPU, NCCL on GPUs); waits until every rank is set up."""
    from schp.inference import select_device
    try:
        ranks.start(parser.device if parser else select_device(options.device, options.gpu))
    except (RuntimeError, ValueError) as err:
        raise SetupError(f"torchrun: cannot join the other processes: {str(err).splitlines()[0]}") from None


def checked_options(options: Dict[str, Any]):
    """(ExtractOptions, dataset spec, label map) from keyword options, each checked: what every engine's
    planning starts from."""
    names = {f.name for f in fields(ExtractOptions)}
    unknown = sorted(set(options) - names)
    if unknown:
        raise TypeError(f"unknown option(s): {', '.join(unknown)}")
    o = ExtractOptions(**options)
    o.check()
    from schp.api import dataset_spec
    spec = dataset_spec(o.dataset, o.checkpoint)
    from schp.data.label_map import resolve_label_map
    return o, spec, resolve_label_map(o.label_map, spec.labels)


def prepare_extraction(input_dir: Optional[PathLike] = None, output_dir: Optional[PathLike] = None, *,
                       integratedpifu_dir: Optional[PathLike] = None, **options) -> Extraction:
    """Check the options and plan the run (no model is loaded): the dry run's and the run's first step."""
    o, spec, label_map = checked_options(options)
    check_output_dir(output_dir)
    check_summary(o.summary)
    ranks = torchrun_ranks()
    if integratedpifu_dir is not None:
        plan = plan_integratedpifu(integratedpifu_dir, output_dir, o, spec)
    else:
        if input_dir is None or output_dir is None:
            raise SetupError("folder mode needs {input_dir} and {output_dir} (or use {integratedpifu_dir})",
                             mentions={"input_dir": ..., "output_dir": ..., "integratedpifu_dir": ...})
        plan = plan_folder(input_dir, output_dir, o)
    if o.shard:
        index, count = o.shard
        plan.tasks = plan.tasks[index - 1::count]
    if ranks:  # under torchrun: this process's share, as shard RANK+1/WORLD_SIZE (after any shard)
        plan.tasks = ranks.share(plan.tasks)
        o.device = ranks.device(o.device, o.gpu)
        plan.notes = plan.notes if ranks.is_main else []
    return Extraction(plan, o, spec, label_map, ranks)


def parse_folder(input_dir: PathLike, output_dir: PathLike, reporter: Optional[Reporter] = None,
                 **options) -> RunReport:
    """Parse every image (and video) of `input_dir` into `output_dir`; options as ExtractOptions.

    >>> report = parse_folder("photos", "maps", dataset="lip", overlay=True, summary="maps/run.json")
    >>> report.count("failed"), report.summary_line()
    """
    return prepare_extraction(input_dir, output_dir, **options).execute(reporter)


def parse_integratedpifu(root: PathLike, output_dir: Optional[PathLike] = None,
                         reporter: Optional[Reporter] = None, **options) -> RunReport:
    """Parse the renders of an IntegratedPIFu tree (pascal): previews beside them, code maps under
    `output_dir` (default <root>/rendering_script/parse_maps)."""
    return prepare_extraction(None, output_dir, integratedpifu_dir=root, **options).execute(reporter)
