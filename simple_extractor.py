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
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence

HERE = Path(__file__).resolve().parent
EXIT_OK, EXIT_FAILED, EXIT_SETUP, EXIT_INTERRUPTED = 0, 1, 2, 130


class SetupError(Exception):
    """A problem found before any work: bad arguments, missing folders, unusable checkpoint."""


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Self-Correction Human Parsing extractor: a palette PNG label map per image.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--dataset", default="pascal", choices=["lip", "atr", "pascal"],
                   help="which released model: its labels and input size")
    p.add_argument("--model-restore", default=None,
                   help="checkpoint file; default checkpoints/<released file of --dataset>, "
                        "downloaded there when missing")
    p.add_argument("--gpu", default=None,
                   help="CUDA device index as in the original; 'None' means CPU (--device wins)")
    p.add_argument("--device", default="auto", help="auto (CUDA if available, else CPU), cpu, cuda, cuda:N")
    p.add_argument("--input-dir", default="", help="folder of images (folder mode)")
    p.add_argument("--output-dir", default="",
                   help="folder for the outputs; in IntegratedPIFu mode, where the .npy tree goes")
    p.add_argument("--logits", action="store_true", help="also write the H x W x C float32 logits (.npy)")
    p.add_argument("--integratedpifu-dir", default=None, help="root of an IntegratedPIFu data tree")
    p.add_argument("--subjects", default="all", choices=["all", "train", "test"],
                   help="IntegratedPIFu subjects to parse, from train_set_list.txt / test_set_list.txt")
    p.add_argument("--overwrite", action="store_true", help="redo inputs whose outputs already exist")
    p.add_argument("--recursive", action="store_true", help="folder mode: walk subfolders, mirror them")
    p.add_argument("--overlay", action="store_true", help="also write <stem>_overlay.jpg, map over image")
    p.add_argument("--batch-size", type=int, default=1, help="images per forward pass")
    p.add_argument("--num-workers", type=int, default=1, help="processes decoding and cropping inputs")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"],
                   help="fp32 reproduces the original; bf16 is faster on CPUs with bf16 units; fp16 CUDA only")
    from schp.backends import add_backend_argument
    add_backend_argument(p)
    p.add_argument("--allow-tf32", action="store_true", help="let CUDA use TF32 (faster, changes maps)")
    p.add_argument("--shard", default=None, metavar="I/N",
                   help="process only shard I of N (1 <= I <= N) of the sorted inputs")
    p.add_argument("--dry-run", action="store_true",
                   help="list what would be processed or skipped and where outputs go; no model")
    p.add_argument("--summary", default=None, metavar="PATH", help="write a JSON manifest of the run")
    p.add_argument("--quiet", action="store_true", help="no progress bar; errors and the summary still print")
    p.add_argument("--legend", "--list-labels", dest="legend", action="store_true",
                   help="print each class of --dataset with its palette colour, and exit")
    return p.parse_args(argv)


@dataclass
class Plan:
    """What a run will do: the tasks, and any notes found while listing them."""
    tasks: list
    notes: List[str]


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
    from datasets.simple_extractor_dataset import list_images
    from schp.runner import Task

    if not args.input_dir or not args.output_dir:
        raise SetupError("folder mode needs --input-dir and --output-dir (or use --integratedpifu-dir)")
    input_dir, output_dir = Path(args.input_dir), Path(args.output_dir)
    if not input_dir.is_dir():
        raise SetupError(f"--input-dir {input_dir}: no such folder")
    if input_dir.resolve() == output_dir.resolve():
        raise SetupError("--output-dir must differ from --input-dir (outputs would be taken for inputs)")
    images, others = list_images(input_dir, args.recursive, exclude=output_dir)
    notes = [f"skipping {input_dir / o}: not an image (extension not one of .jpg .jpeg .png .bmp "
             ".tif .tiff .webp)" for o in others]
    tasks, owner = [], {}
    for rel in images:
        stem = rel.with_suffix("")
        task = Task(source=input_dir / rel, name=str(rel), png=output_dir / f"{stem}.png",
                    logits=output_dir / f"{stem}.npy" if args.logits else None,
                    overlay=output_dir / f"{stem}_overlay.jpg" if args.overlay else None)
        if stem in owner:  # a.jpg and a.png would write the same a.png: the first in order keeps it
            task.refusal = f"its outputs would overwrite those of {owner[stem].source}; rename one of them"
        owner.setdefault(stem, task)
        tasks.append(task)
    return Plan(tasks, notes)


def plan_integratedpifu(args, spec) -> Plan:
    from datasets import integratedpifu as ipifu
    from schp.runner import Task

    if spec.name != "pascal":
        raise SetupError(f"--integratedpifu-dir needs --dataset pascal: IntegratedPIFu's codes are defined "
                         f"for the 7 Pascal-Person-Part classes, not the {spec.num_classes} of {spec.name}")
    root = Path(args.integratedpifu_dir)
    if not (root / ipifu.RENDERS).is_dir():
        raise SetupError(f"--integratedpifu-dir {root}: no {ipifu.RENDERS} folder in it")
    parse_root = Path(args.output_dir) if args.output_dir else root / ipifu.PARSE_RESULTS
    subjects, note = ipifu.find_subjects(root, args.subjects)
    renders, missing = ipifu.find_renders(root, subjects)
    notes = [note] if note else []
    notes += [f"warning: subject {s} is listed but has no folder {root / ipifu.RENDERS / s}" for s in missing]
    tasks = [Task(source=r.image, name=f"{r.subject}/{r.image.name}",
                  png=ipifu.preview_path(r), codes=ipifu.parse_map_path(parse_root, r),
                  logits=ipifu.parse_map_path(parse_root, r, "_logits") if args.logits else None,
                  overlay=r.image.with_name(f"rendered_parse_{r.yaw}_overlay.jpg") if args.overlay else None)
             for r in renders]
    return Plan(tasks, notes)


def ensure_writable(folder: Path) -> None:
    from utils.outputs import check_writable
    try:
        check_writable(folder)
    except OSError as err:
        raise SetupError(f"cannot write to {folder}: {err.strerror or err}") from None


def print_legend(spec) -> None:
    from utils.palette import class_colors
    print(f"{spec.name}: {spec.num_classes} classes (index  RGB colour  name)")
    for i, (name, rgb) in enumerate(zip(spec.labels, class_colors(spec.num_classes))):
        print(f"{i:5d}  #{rgb[0]:02x}{rgb[1]:02x}{rgb[2]:02x} {str(rgb):>16}  {name}")


def load_parser(args, spec):
    import torch
    from schp.checkpoint import (CheckpointError, cached_zip_copy, check_state_dict, default_cache_dir,
                                  read_state_dict, resolve_checkpoint)
    from schp.inference import HumanParser, select_device
    from networks import build_ce2p

    try:
        device = select_device(args.device, args.gpu)
    except (ValueError, RuntimeError) as err:
        raise SetupError(str(err)) from None
    given = args.model_restore is not None
    path = Path(args.model_restore) if given else HERE / "checkpoints" / spec.checkpoint
    try:
        path = resolve_checkpoint(path, spec, allow_download=not given or path.name == spec.checkpoint)
        state = read_state_dict(cached_zip_copy(path, default_cache_dir()))
        with torch.device("meta"):  # shapes only
            expected = build_ce2p(spec.num_classes).state_dict()
        check_state_dict(state, expected, spec, path)
        return HumanParser(spec, state, device, args.precision, args.allow_tf32, backend=args.backend), path
    except (CheckpointError, ValueError) as err:  # ValueError: a precision or backend the device cannot run
        raise SetupError(str(err)) from None


def write_manifest(path: Path, args, spec, checkpoint, parser, report, started: float) -> None:
    import cv2
    import numpy as np
    import torch
    from utils.outputs import atomic_path

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
        "inputs": [{"input": str(o.task.source), "status": o.status, "reason": o.reason,
                    "outputs": [str(p) for p in o.task.outputs], "width": o.width or None,
                    "height": o.height or None, "seconds": round(o.seconds, 4) or None}
                   for o in report.outcomes],
    }
    manifest["totals"]["inputs"] = len(report.outcomes)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(manifest, indent=1, ensure_ascii=False) + "\n")


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    started = time.time()
    from datasets.catalog import DATASETS
    spec = DATASETS[args.dataset]
    if args.legend:
        print_legend(spec)
        return EXIT_OK
    try:
        if args.batch_size < 1 or args.num_workers < 0:
            raise SetupError("--batch-size must be >= 1 and --num-workers >= 0")
        shard = parse_shard(args.shard)
        plan = plan_integratedpifu(args, spec) if args.integratedpifu_dir else plan_folder(args, spec)
        if shard:
            index, count = shard
            plan.tasks = plan.tasks[index - 1::count]
        for note in plan.notes:
            print(note, file=sys.stderr)
        if args.dry_run:
            for task in plan.tasks:
                print(f"{task.plan(args.overwrite)}\t{task.source}\t" + "\t".join(str(p) for p in task.outputs))
            return EXIT_OK
        for folder in sorted({p.parent for task in plan.tasks for p in task.outputs}):
            ensure_writable(folder)
        if all(task.plan(args.overwrite) != "process" for task in plan.tasks):
            parser, checkpoint = None, None  # nothing to compute: no need to load the model
        else:
            parser, checkpoint = load_parser(args, spec)
    except SetupError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_SETUP

    from utils.palette import get_palette
    from schp.runner import Runner
    import cv2
    cv2.setNumThreads(1)  # torch owns the cores; OpenCV's own pool would only compete with it
    runner = Runner(parser, get_palette(spec.num_classes), args.batch_size, args.num_workers, args.quiet)
    report = runner.run(plan.tasks, overwrite=args.overwrite)
    print(report.summary_line(), file=sys.stderr)
    if args.summary:
        try:
            write_manifest(Path(args.summary), args, spec, checkpoint, parser, report, started)
        except OSError as err:
            print(f"error: cannot write --summary {args.summary}: {err.strerror or err}", file=sys.stderr)
            return EXIT_FAILED
    if report.interrupted:
        return EXIT_INTERRUPTED
    if report.count("failed") or report.stopped_reason:
        return EXIT_FAILED
    return EXIT_OK


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # during start-up; the run itself reports and exits 130 on its own
        print("interrupted before any input was processed", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)
