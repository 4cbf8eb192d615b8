#!/usr/bin/env python3
"""SCHP simple extractor: human parsing maps for a folder of images, or for an IntegratedPIFu tree.

Same command lines as the published extractor and its IntegratedPIFu fork; runs on CPU or GPU.
Exit codes: 0 all good, 1 some input failed (or the run was stopped), 2 usage or set-up error,
130 interrupted.
"""
import argparse
import json
import os
import platform
import signal
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Sequence

from schp.commands import options
from schp.errors import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, EXIT_SETUP, SetupError
from schp.signals import raise_keyboard_interrupt

DEFAULT_MAX_PIXELS = 200_000_000  # = schp.data.decode.DEFAULT_MAX_PIXELS (not imported: heavy)
NOT_IMAGE_LINES = 5  # without --quiet, non-image files named one a line up to this many, then counted


def build_parser() -> argparse.ArgumentParser:
    """The command line's options (the README's options table lists exactly these)."""
    p = options.CommandParser(
        description="Self-Correction Human Parsing extractor: a palette PNG label map per image.")
    options.add_dataset(p, "pascal", custom=True)
    options.add_model_restore(p)
    options.add_device(p)
    p.add_argument("--input-dir", default="", help="folder of images (folder mode)")
    p.add_argument("--output-dir", default="",
                   help="folder for the outputs; in IntegratedPIFu mode, where the .npy tree goes")
    p.add_argument("--logits", action="store_true", help="also write the H x W x C float32 logits (.npy)")
    p.add_argument("--integratedpifu-dir", default=None, help="root of an IntegratedPIFu data tree")
    p.add_argument("--subjects", default="all", choices=["all", "train", "test"],
                   help="IntegratedPIFu subjects to parse, from train_set_list.txt / test_set_list.txt")
    options.add_overwrite(p)
    p.add_argument("--recursive", action="store_true", help="folder mode: walk subfolders, mirror them")
    p.add_argument("--overlay", action="store_true", help="also write <stem>_overlay.jpg, map over image")
    options.add_batch_size(p)
    options.add_num_workers(p)
    options.add_precision(p)
    options.add_backend(p)
    options.add_allow_tf32(p)
    options.add_tta(p)
    p.add_argument("--shard", default=None, metavar="I/N",
                   help="process only shard I of N (1 <= I <= N) of the sorted inputs")
    p.add_argument("--dry-run", action="store_true",
                   help="list what would be processed or skipped and where outputs go; no model")
    options.add_summary(p)
    p.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS, metavar="N",
                   help="refuse (fail) inputs whose header declares more than N pixels, before decoding "
                        "them: a decoded image takes 3 bytes a pixel; 0 = no limit")
    options.add_quiet(p)
    p.add_argument("--every", type=int, default=1, metavar="N",
                   help="video inputs (.mp4 .avi .mov .mkv .webm): parse every Nth frame")
    p.add_argument("--legend", "--list-labels", dest="legend", action="store_true",
                   help="print each class of --dataset with its palette colour, and exit")
    return p


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """The options, checked for consistency here, before anything heavy (torch) is imported."""
    p = build_parser()
    args = options.parse(p, argv)
    if args.integratedpifu_dir is not None and args.input_dir:
        p.error("--input-dir and --integratedpifu-dir are two different modes; give one of them")
    options.require_folders(p, args, "input_dir", "integratedpifu_dir")
    return args


@dataclass
class Plan:
    """What a run will do: the tasks, any notes found while listing them, and the files that are not
    images (skipped; listed in the manifest)."""
    tasks: list
    notes: List[str]
    not_images: List[Path] = field(default_factory=list)


def parse_shard(text: Optional[str]):
    if text is None:
        return None
    try:
        index, count = (int(v) for v in text.split("/"))
    except ValueError:
        raise SetupError(f"--shard {text}: expected I/N, e.g. 1/4") from None
    if not 1 <= index <= count:
        raise SetupError(f"--shard {text}: need 1 <= I <= N")
    return index, count


def plan_folder(args, spec) -> Plan:
    from schp.data.listing import list_images
    from schp.runner import Task
    from schp.video import is_video_name, video_task

    if not args.input_dir or not args.output_dir:
        raise SetupError("folder mode needs --input-dir and --output-dir (or use --integratedpifu-dir)")
    input_dir, output_dir = Path(args.input_dir), Path(args.output_dir)
    if not input_dir.is_dir():
        raise SetupError(f"--input-dir {input_dir}: no such folder")
    if input_dir.resolve() == output_dir.resolve():
        raise SetupError("--output-dir must differ from --input-dir (outputs would be taken for inputs)")
    images, others = list_images(input_dir, args.recursive, exclude=output_dir)
    videos = [o for o in others if is_video_name(o.name)]  # frame by frame, in schp/video.py
    others = [o for o in others if not is_video_name(o.name)]
    notes = not_image_notes([input_dir / o for o in others], args.quiet, args.summary)
    tasks, owner = [], {}
    for rel in sorted(images + videos, key=str):
        stem = rel.with_suffix("")
        if is_video_name(rel.name):
            task = video_task(input_dir, output_dir, rel, args.logits, args.overlay, args.every)
            stem = (stem, "video")  # a.mp4 and a.jpg write different files; a.mp4 and a.avi the same
        else:
            task = Task(source=input_dir / rel, name=str(rel), png=output_dir / f"{stem}.png",
                        logits=output_dir / f"{stem}.npy" if args.logits else None,
                        overlay=output_dir / f"{stem}_overlay.jpg" if args.overlay else None)
        if stem in owner:  # a.jpg and a.png would write the same a.png: the first in order keeps it
            task.refusal = f"its outputs would overwrite those of {owner[stem].source}; rename one of them"
        owner.setdefault(stem, task)
        tasks.append(task)
    return Plan(tasks, notes, [input_dir / o for o in others])


def not_image_notes(others: List[Path], quiet: bool, summary: Optional[str]) -> List[str]:
    """Lines about skipped non-image files: with --quiet one count; else the first few, then a count."""
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


def plan_integratedpifu(args, spec) -> Plan:
    from schp.data import integratedpifu as ipifu
    from schp.runner import Task

    if spec.name != "pascal":
        raise SetupError(f"--integratedpifu-dir needs --dataset pascal: IntegratedPIFu's codes are defined "
                         f"for the 7 Pascal-Person-Part classes, not the {spec.num_classes} of {spec.name}")
    root = Path(args.integratedpifu_dir)
    if not (root / ipifu.RENDERS).is_dir():
        raise SetupError(f"--integratedpifu-dir {root}: no {ipifu.RENDERS} folder in it")
    parse_root = Path(args.output_dir) if args.output_dir else root / ipifu.PARSE_RESULTS
    subjects, note, refused = ipifu.find_subjects(root, args.subjects)
    renders, missing = ipifu.find_renders(root, subjects)
    notes = [note] if note else []
    notes += [f"warning: subject {s} is listed but has no folder {root / ipifu.RENDERS / s}" for s in missing]
    tasks = [Task(source=r.list_file, name=f"{r.list_file.name}:{r.line}",  # failed, counted, no outputs
                  refusal=f"line {r.line}: subject id {r.subject!r} {r.reason}; only plain folder names are "
                          "taken (the other subjects proceed)") for r in refused]
    tasks += [Task(source=r.image, name=f"{r.subject}/{r.image.name}",
                   png=ipifu.preview_path(r), codes=ipifu.parse_map_path(parse_root, r),
                   logits=ipifu.parse_map_path(parse_root, r, "_logits") if args.logits else None,
                   overlay=r.image.with_name(f"rendered_parse_{r.yaw}_overlay.jpg") if args.overlay else None,
                   refusal=f"its outputs would overwrite those of {r.clash}; rename one of them" if r.clash
                   else None)
              for r in renders]
    return Plan(tasks, notes)


def check_folders(args) -> None:
    """The folders named on the command line exist (inputs) and are folders (outputs), said plainly."""
    if args.integratedpifu_dir is not None and not Path(args.integratedpifu_dir).is_dir():
        what = "not a folder" if Path(args.integratedpifu_dir).exists() else "no such folder"
        raise SetupError(f"--integratedpifu-dir {args.integratedpifu_dir}: {what}")
    if args.output_dir:
        out = Path(args.output_dir)
        blocker = next((q for q in (out, *out.parents) if q.exists() or q.is_symlink()), None)
        if blocker is not None and not blocker.is_dir():
            what = "it" if blocker == out else str(blocker)
            raise SetupError(f"cannot write to --output-dir {out}: not a folder ({what} is a file)")


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


def emit(lines) -> None:
    """Print listing lines to stdout; a reader that stops early (`| head`) ends the listing quietly."""
    try:
        for line in lines:
            print(line)
        sys.stdout.flush()
    except BrokenPipeError:
        # nobody reads any more: point stdout at /dev/null so the interpreter's final flush is silent
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


def print_legend(spec) -> None:
    from schp.utils.palette import class_colors
    emit([f"{spec.name}: {spec.num_classes} classes (index  RGB colour  name)"] +
         [f"{i:5d}  #{rgb[0]:02x}{rgb[1]:02x}{rgb[2]:02x} {str(rgb):>16}  {name}"
          for i, (name, rgb) in enumerate(zip(spec.labels, class_colors(spec.num_classes)))])


def dataset_spec(args):
    """The catalog's dataset, or for --dataset custom the label set stored in the checkpoint."""
    from schp.data.catalog import DATASETS
    if args.dataset != "custom":
        return DATASETS[args.dataset]
    from schp.checkpoint import CheckpointError, spec_from_checkpoint
    if args.model_restore is None:
        raise SetupError("--dataset custom needs --model-restore (a checkpoint written by train.py)")
    try:
        return spec_from_checkpoint(Path(args.model_restore))
    except CheckpointError as err:
        raise SetupError(str(err)) from None


def load_parser(args, spec):
    from schp.api import load_parser as load
    from schp.checkpoint import CheckpointError
    from schp.choices import parse_scales

    try:
        scales = parse_scales(args.multi_scales)
        return load(spec, args.model_restore, args.device, args.gpu, args.precision, args.allow_tf32,
                    flip=args.flip, scales=scales, backend=args.backend)
    except (CheckpointError, ValueError) as err:  # ValueError: a device or precision or backend this machine lacks
        raise SetupError(options.flag_message(err)) from None


def setup_message(err: BaseException) -> str:
    """One sentence for a set-up failure: ours as written, the system's with the file it names."""
    if isinstance(err, SetupError):
        return str(err)
    if isinstance(err, OSError) and err.strerror:
        where = f"{err.filename}: " if err.filename else ""
        return f"{where}{err.strerror}"
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__


def write_manifest(path: Path, args, spec, checkpoint, parser, report, started: float,
                   not_images: Sequence[Path] = (), extra=None) -> None:
    import cv2
    import numpy as np
    import torch
    from schp.utils.outputs import atomic_path

    manifest = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "seconds": round(report.seconds, 3),
        "interrupted": report.interrupted,
        "stopped": report.stopped_reason,
        "mode": "integratedpifu" if args.integratedpifu_dir else "folder",
        "checkpoint": str(checkpoint) if checkpoint else None,
        "dataset": spec.name,
        "device": str(parser.device) if parser else None,
        "precision": args.precision,
        "backend": parser.backend if parser else None,
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "opencv": cv2.__version__, "numpy": np.__version__},
        "totals": {s: report.count(s) for s in ("processed", "skipped", "failed", "not-run")},
        "abandoned_in_flight": report.abandoned,
        "not_images": [str(p) for p in not_images],
        "inputs": [{"input": str(o.task.source), "status": o.status, "reason": o.reason,
                    "outputs": [str(p) for p in o.task.outputs], "width": o.width or None,
                    "height": o.height or None, "seconds": round(o.seconds, 4) or None}
                   for o in report.outcomes],
    }
    manifest["totals"]["inputs"] = len(report.outcomes)
    manifest.update(extra or {})
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(manifest, indent=1, ensure_ascii=False) + "\n")


def torchrun_ranks():
    """This process's rank when started by torchrun (RANK, WORLD_SIZE in the environment), else None."""
    if "WORLD_SIZE" not in os.environ:
        return None
    from schp.distributed import from_environment
    try:
        return from_environment()
    except ValueError as err:
        raise SetupError(f"torchrun environment: {err}") from None


def start_ranks(ranks, args, parser) -> None:
    """Meet the other ranks (gloo on the CPU, NCCL on GPUs); waits until every rank is set up."""
    from schp.inference import select_device
    try:
        ranks.start(parser.device if parser else select_device(args.device, args.gpu))
    except (RuntimeError, ValueError) as err:
        raise SetupError(f"torchrun: cannot join the other processes: {str(err).splitlines()[0]}") from None



def _in_main_thread() -> bool:
    import threading
    return threading.current_thread() is threading.main_thread()  # only there can handlers be set


def _not_ignored(signals) -> List[int]:
    """Signals this process does not ignore: one ignored at start (nohup, a background job) stays so."""
    return [s for s in signals if signal.getsignal(s) is not signal.SIG_IGN] if _in_main_thread() else []


@contextmanager
def stop_signals_as_interrupt():
    """SIGTERM and SIGHUP behave as Ctrl-C (KeyboardInterrupt) from the first second on; restored on leaving."""
    previous = {s: signal.signal(s, raise_keyboard_interrupt) for s in _not_ignored((signal.SIGTERM, signal.SIGHUP))}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


@contextmanager
def stop_signals_held():
    """Ctrl-C, SIGTERM and SIGHUP wait while the summary and the manifest are written (milliseconds), so that a
    further interrupt cannot lose the record of the run. Yields the list of signals that arrived."""
    received: List[int] = []
    previous = {s: signal.signal(s, lambda signum, frame: received.append(signum))
                for s in _not_ignored((signal.SIGINT, signal.SIGTERM, signal.SIGHUP))}
    try:
        yield received
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def main(argv: Optional[Sequence[str]] = None) -> int:
    with stop_signals_as_interrupt():
        try:
            return _main(argv)
        except SystemExit as stop:  # --help, --version, a usage error: its exit code, for callers of main()
            return stop.code
        except KeyboardInterrupt:  # during start-up: download, conversion, model build
            print("interrupted before any input was processed", file=sys.stderr)
            return EXIT_INTERRUPTED


def _main(argv: Optional[Sequence[str]]) -> int:
    args = parse_args(argv)
    started = time.time()
    try:
        spec = dataset_spec(args)
    except SetupError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_SETUP
    if args.legend:
        print_legend(spec)
        return EXIT_OK
    created: List[Path] = []  # output folders made by the set-up, removed again if it fails
    try:
        if args.batch_size < 1 or args.num_workers < 0:
            raise SetupError("--batch-size must be >= 1 and --num-workers >= 0")
        if args.every < 1:
            raise SetupError("--every must be >= 1")
        if args.max_pixels < 0:
            raise SetupError("--max-pixels must be >= 0 (0 = no limit)")
        shard = parse_shard(args.shard)
        check_folders(args)
        ranks = torchrun_ranks()
        plan = plan_integratedpifu(args, spec) if args.integratedpifu_dir else plan_folder(args, spec)
        if shard:
            index, count = shard
            plan.tasks = plan.tasks[index - 1::count]
        if ranks:  # under torchrun: this process's share, as --shard RANK+1/WORLD_SIZE (after any --shard)
            plan.tasks = ranks.share(plan.tasks)
            args.device = ranks.device(args.device, args.gpu)
            args.quiet = args.quiet or not ranks.is_main  # one progress bar
            plan.notes = plan.notes if ranks.is_main else []
        for note in plan.notes:
            print(note, file=sys.stderr)
        if args.dry_run:
            emit(f"{task.plan(args.overwrite)}\t{task.source}\t" + "\t".join(str(p) for p in task.outputs)
                 for task in plan.tasks)
            return EXIT_OK
        for folder in sorted({p.parent for task in plan.tasks for p in task.outputs}):
            ensure_writable(folder, created)
        if all(task.plan(args.overwrite) != "process" for task in plan.tasks):
            parser, checkpoint = None, None  # nothing to compute: no need to load the model
        else:
            parser, checkpoint = load_parser(args, spec)
        if ranks:
            start_ranks(ranks, args, parser)
    except (SetupError, OSError, RuntimeError) as err:  # anything before the first input: one line
        remove_empty(created)
        print(f"error: {setup_message(err)}", file=sys.stderr)
        return EXIT_SETUP
    except KeyboardInterrupt:
        remove_empty(created)
        raise

    from schp.runner import Outcome, RunReport, Runner
    from schp.video import run_inputs
    try:
        from schp.utils.palette import get_palette
        import cv2
        cv2.setNumThreads(1)  # torch owns the cores; OpenCV's own pool would only compete with it
        runner = Runner(parser, get_palette(spec.num_classes), args.batch_size, args.num_workers, args.quiet,
                        max_pixels=args.max_pixels or None)
        report = run_inputs(runner, plan.tasks, overwrite=args.overwrite)  # videos frame by frame after the images
    except (KeyboardInterrupt, Exception) as err:  # last resort: the run's own handling was bypassed
        interrupted = isinstance(err, KeyboardInterrupt)
        if not interrupted:
            from schp.errors import describe_exception
            print(f"error: the run failed unexpectedly: {describe_exception(err)}", file=sys.stderr)
        report = RunReport([Outcome(task, "not-run") for task in plan.tasks], interrupted=interrupted,
                           stopped_reason=None if interrupted else "unexpected error",
                           seconds=time.time() - started)
    if not ranks:
        return finish(args, spec, checkpoint, parser, report, started, plan.not_images)
    from schp.distributed import gather_report
    report, devices = gather_report(ranks, report, parser)  # every rank's outcomes, in input order
    code = finish(args, spec, checkpoint, parser, report, started, plan.not_images, {"devices": devices}) \
        if ranks.is_main else exit_code(report)
    ranks.barrier()  # the others exit only once rank 0 has written the manifest (torchrun stops all on a failure)
    ranks.stop()
    return code


def finish(args, spec, checkpoint, parser, report, started, not_images=(), extra=None) -> int:
    """Print the run's summary line, write its manifest, and return its exit code.

    Further interrupts wait while this happens (milliseconds), so the record of the run is never lost.
    """
    with stop_signals_held() as received:
        print(report.summary_line(), file=sys.stderr)
        if args.summary:
            try:
                write_manifest(Path(args.summary), args, spec, checkpoint, parser, report, started,
                               not_images, extra)
                if report.abandoned:
                    print(f"summary written to {args.summary}", file=sys.stderr)
            except OSError as err:
                print(f"error: cannot write --summary {args.summary}: {err.strerror or err}", file=sys.stderr)
                return EXIT_INTERRUPTED if report.interrupted or received else EXIT_FAILED
    return exit_code(report, received)


def exit_code(report, received=()) -> int:
    if report.interrupted or received:
        return EXIT_INTERRUPTED
    if report.count("failed") or report.stopped_reason:
        return EXIT_FAILED
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
