#!/usr/bin/env python3
"""SCHP evaluation: pixel accuracy, mean accuracy and per-class / mean IoU of a checkpoint on a labelled split.

The command lines of the released evaluate.py keep working; the protocol and its numbers are the
released ones by default (see schp/evaluation.py). With --pred-dir it scores a folder of predicted
label PNGs instead, without loading a network.
Exit codes: 0 all scored, 1 some image left out (each named on stderr), 2 usage or set-up error,
130 interrupted.
"""
import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import Optional, Sequence

from schp.commands import options
from schp.commands.options import parse_input_size
from schp.errors import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, EXIT_SETUP, SCHPError, SetupError


def build_parser() -> argparse.ArgumentParser:
    p = options.CommandParser(description="Self-Correction Human Parsing evaluation: the released mIoU protocol.")
    options.add_dataset(p, None, custom=True,
                        help="sets input size, classes, label names and flip pairs; default: the one with "
                             "--num-classes classes, else lip (the original's defaults); custom: those stored "
                             "in --model-restore by train.py")
    p.add_argument("--data-dir", default="./data/LIP",
                   help="dataset root with <split>_id.txt, <split>_images/, <split>_segmentations/")
    p.add_argument("--split", default="val", help="which split: ids from <split>_id.txt")
    options.add_model_restore(p, "./log/checkpoint.pth.tar", help="checkpoint file")
    options.add_device(p, gpu_help="CUDA device index as in the original; 'None' means CPU (--device wins); "
                                   "default: 0 where CUDA is available, as the original's")
    p.add_argument("--input-size", default=None, metavar="H,W", help="network input size; default the dataset's")
    p.add_argument("--num-classes", type=int, default=None, help="number of classes; default the dataset's")
    options.add_tta(p)
    options.add_batch_size(p)
    options.add_precision(p)
    options.add_backend(p)
    options.add_allow_tf32(p)
    p.add_argument("--float-centers", action="store_true",
                   help="warp the scored maps back with the true crop centres; by default the released "
                        "int32-truncated centres are used so published numbers reproduce")
    p.add_argument("--save-results", action="store_true", help="write palette PNGs to <log-dir>/sp_results/")
    p.add_argument("--log-dir", default="./log", help="where sp_results/ goes")
    options.add_summary(p, help="write the metrics and settings as JSON")
    p.add_argument("--pred-dir", default=None, metavar="DIR",
                   help="files mode: score the label PNGs <DIR>/<id>.png (at ground-truth size); no network")
    p.add_argument("--label-dir", default=None, metavar="NAME",
                   help="ground-truth folder under --data-dir (or absolute); default <split>_segmentations")
    options.add_quiet(p, help="no progress bar")
    p.add_argument("--multi-person", action="store_true", help="score multi_person.py outputs on the CIHP/VIP "
                   "layout (options: evaluate.py --multi-person --help)")
    # parsed and unused by the original too
    p.add_argument("--arch", default="resnet101", choices=["resnet101"], help=argparse.SUPPRESS)
    p.add_argument("--ignore-label", type=int, default=255, help=argparse.SUPPRESS)
    p.add_argument("--random-mirror", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--random-scale", action="store_true", help=argparse.SUPPRESS)
    return p


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """The options, checked (choices, device, the folders) before torch is imported."""
    from schp.data.labelled import id_file  # no torch in it

    p = build_parser()
    args = options.parse(p, argv)
    ids = id_file(Path(args.data_dir), args.split)
    if not ids.is_file():
        p.fail(f"{ids}: no such id file (expected one id per line)")
    options.require_folders(p, args, "pred_dir")
    return args


def choose_spec(args):
    from schp.api import dataset_spec
    from schp.data.catalog import DATASETS, dataset_for_num_classes

    name = args.dataset
    if name is None:
        matches = [d for d in DATASETS.values() if d.num_classes == args.num_classes]
        name = matches[0].name if args.num_classes is not None and len(matches) == 1 else "lip"
    spec = dataset_spec(name, args.model_restore)  # custom: the label set train.py stored, in either mode
    if args.num_classes is not None and args.num_classes != spec.num_classes:
        raise SetupError(f"--num-classes {args.num_classes} does not match --dataset {name} "
                         f"({spec.num_classes} classes); {args.num_classes} classes is "
                         f"{dataset_for_num_classes(args.num_classes)}")
    if args.ignore_label != 255:
        print(f"warning: --ignore-label {args.ignore_label} is not used: 255 is the ignore label "
              "(as in the original, which parsed the option and hard-coded 255)", file=sys.stderr)
    if args.input_size:
        spec = replace(spec, input_size=parse_input_size(args.input_size, 16))
    return spec


def write_summary(path: Path, fields: dict) -> None:
    from schp.utils.outputs import atomic_path

    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(fields, indent=1, ensure_ascii=False) + "\n")


def main(argv: Optional[Sequence[str]] = None) -> int:
    if "--multi-person" in (sys.argv[1:] if argv is None else argv):  # a mode with options of its own
        from schp.commands.evaluate_multi_person import main as multi_person_main
        return multi_person_main(argv)
    try:
        args = parse_args(argv)
    except SystemExit as stop:  # --help, --version, a usage error: its exit code, for callers of main()
        return stop.code
    from schp.data.labelled import LabelledDataError, id_file
    from schp.checkpoint import CheckpointError
    from schp.evaluation import evaluate, score_files
    from schp.api import load_parser
    from schp.choices import parse_scales
    from tqdm import tqdm

    data_dir = Path(args.data_dir)

    def say(line: str) -> None:  # a left-out image, printed above the progress bar
        tqdm.write(line, file=sys.stderr)

    try:
        spec = choose_spec(args)
        from schp.runs.extract import check_summary
        check_summary(args.summary)  # a file in the way is a set-up error, as in every command
        if args.batch_size < 1:
            raise SetupError("--batch-size must be >= 1")
        if not id_file(data_dir, args.split).is_file():
            raise SetupError(f"{id_file(data_dir, args.split)}: no such id file (expected one id per line)")
        settings = {"dataset": spec.name, "split": args.split, "data_dir": str(data_dir)}
        if args.pred_dir:
            if not Path(args.pred_dir).is_dir():
                raise SetupError(f"--pred-dir {args.pred_dir}: no such folder")
            parser = None
            settings.update(mode="files", pred_dir=str(args.pred_dir))
        else:
            try:
                import torch
                scales = parse_scales(args.multi_scales)
                # the original's default --gpu 0: CUDA device 0 where there is one, else (silently) the CPU
                gpu = args.gpu if args.gpu is not None else ("0" if torch.cuda.is_available() else None)
                parser, checkpoint = load_parser(  # the extractor's path: device, bf16 warning, TF32
                    spec, args.model_restore, args.device, gpu, args.precision, args.allow_tf32, flip=args.flip,
                    scales=scales, backend=args.backend)
            except (CheckpointError, ValueError, RuntimeError) as err:
                raise SetupError(options.flag_message(err)) from None
            settings.update(mode="model", checkpoint=str(checkpoint), input_size=list(spec.input_size),
                            device=str(parser.device), precision=args.precision, backend=parser.backend,
                            tta={"flip": args.flip, "scales": list(scales)},
                            legacy_int_centers=not args.float_centers)
    except SetupError as err:
        print(f"error: {options.flag_message(err)}", file=sys.stderr)
        return EXIT_SETUP

    try:
        if parser is None:
            result = score_files(args.pred_dir, data_dir, args.split, spec.num_classes, labels=spec.labels,
                                 label_dir=args.label_dir, quiet=args.quiet, say=say)
        else:
            import cv2
            cv2.setNumThreads(1)  # torch owns the cores
            save_dir = Path(args.log_dir) / "sp_results" if args.save_results else None
            from schp.commands.console import ConsoleReporter
            result = evaluate(parser, data_dir, args.split, legacy_int_centers=not args.float_centers,
                              batch_size=args.batch_size, save_dir=save_dir, label_dir=args.label_dir,
                              reporter=ConsoleReporter(args.quiet))
    except LabelledDataError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_SETUP
    except SCHPError as err:  # the run stopped: a full disk under --log-dir
        print(f"error: {options.flag_message(err)}", file=sys.stderr)
        return err.exit_code
    except OSError as err:
        print(f"error: cannot write {err.filename or ''}: {err.strerror or err}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("interrupted: no metrics written", file=sys.stderr)
        return EXIT_INTERRUPTED

    print(result.table())
    note = "" if parser is None else (
        f"; centres {'int32 as released' if not args.float_centers else 'float'}; flip "
        f"{'on' if args.flip else 'off'}; scales {','.join(f'{s:g}' for s in parser.scales)}")
    print(f"{result.images} images scored, {len(result.failed)} left out{note}", file=sys.stderr)
    if result.images == 0:
        print("error: no image could be scored", file=sys.stderr)
    if parser is not None:  # with auto the network may have switched from torch to a runtime meanwhile
        settings.update(backend=parser.backend, crops_by_backend=dict(parser.crops_by_backend))
    if args.summary:
        try:
            write_summary(Path(args.summary), {**result.as_dict(), **settings})
        except OSError as err:
            print(f"error: cannot write --summary {args.summary}: {err.strerror or err}", file=sys.stderr)
            return EXIT_FAILED
    return EXIT_FAILED if result.failed or result.images == 0 else EXIT_OK


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)
