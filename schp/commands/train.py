#!/usr/bin/env python3
"""Train SCHP (CE2P, ResNet-101) with self-correction, on a CPU, one GPU, or many with torchrun.

    python train.py --dataset lip --data-dir data/LIP                    # one process
    torchrun --nproc-per-node 8 train.py --dataset lip --data-dir ...    # DistributedDataParallel

The released command lines keep working. Exit codes: 0 done, 1 a non-finite loss or a full disk,
2 usage or set-up error (unusable training data included), 130 interrupted by Ctrl-C, SIGTERM or
SIGHUP (continue with --resume).
"""
import argparse
import logging
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Optional, Sequence

from schp.commands import options
from schp.commands.options import parse_input_size
from schp.errors import EXIT_INTERRUPTED, EXIT_SETUP, SetupError

DEFAULT_MAX_PIXELS = 200_000_000  # = schp.data.decode.DEFAULT_MAX_PIXELS (not imported: OpenCV is heavy)


def build_parser() -> argparse.ArgumentParser:
    p = options.CommandParser(description="Self-Correction for Human Parsing: training")
    # the released options, as written
    p.add_argument("--arch", default="resnet101", choices=["resnet101"], help="backbone (only ResNet-101)")
    p.add_argument("--data-dir", default="./data/LIP", help="root of <split>_id.txt, <split>_images/, "
                   "<split>_segmentations/")
    options.add_batch_size(p, 16, help="images per process (per GPU)")
    p.add_argument("--input-size", default=None, help="H,W of the crops; default the dataset's")
    p.add_argument("--num-classes", type=int, default=None, help="classes; required with --dataset custom")
    p.add_argument("--ignore-label", type=int, default=255, help="fixed at 255 (as released)")
    p.add_argument("--random-mirror", action="store_true", help="accepted, no effect: augmentation is "
                   "always on for the train/trainval splits (as released)")
    p.add_argument("--random-scale", action="store_true", help="accepted, no effect (as released)")
    p.add_argument("--learning-rate", type=float, default=7e-3, help="base learning rate")
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--start-epoch", type=int, default=0, help="accepted, ignored (as released); "
                   "use --resume")
    p.add_argument("--epochs", type=int, default=150)
    p.add_argument("--eval-epochs", type=int, default=10,
                   help="save checkpoint_E and validate (when a val split exists) every this many epochs")
    p.add_argument("--imagenet-pretrain", default="./pretrain_model/resnet101-imagenet.pth",
                   help="deep-stem ResNet-101 ImageNet weights, or 'none' to train from scratch")
    p.add_argument("--log-dir", default="./log", help="where checkpoints, metrics.jsonl and curves.png go")
    options.add_model_restore(p, "./log/checkpoint.pth.tar",
                              help="released-style resume: model weights and epoch, used if the file exists")
    p.add_argument("--schp-start", type=int, default=100, help="epoch where self-correction cycles begin")
    p.add_argument("--cycle-epochs", type=int, default=10, help="epochs per self-correction cycle")
    p.add_argument("--schp-restore", default="./log/schp_checkpoint.pth.tar",
                   help="released-style resume: SCHP model and cycle_n, used if the file exists")
    p.add_argument("--lambda-s", type=float, default=1.0, help="weight of the parsing terms")
    p.add_argument("--lambda-e", type=float, default=1.0, help="weight of the edge term")
    p.add_argument("--lambda-c", type=float, default=0.1, help="weight of the consistency term")
    # added
    options.add_dataset(p, None, custom=True,
                        help="input size, classes and left/right pairs of the catalog; custom: --num-classes. "
                             "Default: the catalog dataset with --num-classes classes (lip for 20), else custom")
    p.add_argument("--flip-pairs", default=None, metavar="L:R,...",
                   help="left:right class pairs swapped when mirroring (custom; default the dataset's)")
    p.add_argument("--labels", default=None, metavar="NAME,...", help="class names of a custom label set")
    p.add_argument("--legacy-lip-pairs", action="store_true",
                   help="swap LIP's pairs 14:15,16:17,18:19 for every dataset, as the released code did")
    p.add_argument("--fix-ignore", action="store_true",
                   help="keep 255 ignored in the self-correction terms (released: becomes background)")
    p.add_argument("--soft-eval-mode", action="store_true",
                   help="run the SCHP teacher in eval mode (released: train mode, dropout on)")
    p.add_argument("--sync-bn", action="store_true",
                   help="under torchrun, batch statistics over all processes (released: per GPU)")
    p.add_argument("--warmup-epochs", type=int, default=10)
    p.add_argument("--split", default="train", help="split to train on (augmented if train/trainval)")
    options.add_device(p, device_help=" (under torchrun: each process takes cuda:LOCAL_RANK)",
                       gpu_help="CUDA device of a single process (the first of a list; several GPUs: launch "
                                "with torchrun); 'None' = CPU")
    options.add_num_workers(p, min(4, os.cpu_count() or 1),
                            help="data loading processes per training process (4, or fewer on a machine with "
                                 "fewer cores)")
    p.add_argument("--seed", type=int, default=None, help="fixed seed (default: a random one, recorded)")
    options.add_precision(p, ("fp32", "bf16"), help="bf16 = autocast (fp16 is not offered for training)")
    p.add_argument("--init-from", default=None, metavar="CKPT",
                   help="start from a released or own checkpoint (fine-tuning); heads of another "
                        "class count are re-initialised")
    p.add_argument("--resume", nargs="?", const="", default=None, metavar="LAST",
                   help="continue from <log-dir>/last.pth.tar (or the file given)")
    p.add_argument("--stop-after", type=int, default=None, metavar="N",
                   help="stop after N epochs of this run (time-boxed jobs); continue with --resume")
    p.add_argument("--check-data", action="store_true",
                   help="only check the training split (every image and label decoded), then exit")
    p.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS, metavar="N",
                   help="refuse images and labels whose header declares more than N pixels (as the extractor); "
                        "0 = no limit")
    options.add_quiet(p, help="no progress bar")
    return p


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    return options.parse(build_parser(), argv)


def build_config(args):
    from schp.data.augment import LEGACY_LIP_PAIRS
    from schp.data.catalog import DATASETS, custom_spec, parse_flip_pairs
    from schp.training.trainer import TrainConfig

    input_size = parse_input_size(args.input_size, 32) if args.input_size else None
    if args.ignore_label != 255:
        raise SetupError("--ignore-label: only 255 is supported (labels are 8-bit, 255 = ignore)")
    if args.dataset is None:  # a released command line: only --num-classes says which set
        count = 20 if args.num_classes is None else args.num_classes
        args.dataset = next((d.name for d in DATASETS.values() if d.num_classes == count), "custom")
        args.num_classes = count
    try:
        pairs = parse_flip_pairs(args.flip_pairs) if args.flip_pairs is not None else None
        if args.dataset == "custom":
            if args.num_classes is None:
                raise SetupError("--dataset custom needs --num-classes")
            labels = [n.strip() for n in args.labels.split(",")] if args.labels else None
            spec = custom_spec(args.num_classes, labels, input_size or (473, 473), pairs or ())
        else:
            base = DATASETS[args.dataset]
            if args.num_classes is not None and args.num_classes != base.num_classes:
                raise SetupError(f"--num-classes {args.num_classes}: {args.dataset} has "
                                 f"{base.num_classes} classes (use --dataset custom for another set)")
            spec = custom_spec(base.num_classes, base.labels, input_size or base.input_size,
                               base.flip_pairs if pairs is None else pairs)
            from dataclasses import replace
            spec = replace(spec, name=base.name, checkpoint=base.checkpoint, drive_id=base.drive_id,
                           miou=base.miou)
    except ValueError as err:
        raise SetupError(str(err)) from None
    flip_pairs = LEGACY_LIP_PAIRS if args.legacy_lip_pairs else spec.flip_pairs
    for name in ("batch_size", "epochs", "eval_epochs", "cycle_epochs"):
        if getattr(args, name) < 1:
            raise SetupError(f"--{name.replace('_', '-')} must be >= 1")
    if args.warmup_epochs < 0 or args.schp_start < 0 or args.num_workers < 0 or args.max_pixels < 0:
        raise SetupError("--warmup-epochs, --schp-start, --num-workers and --max-pixels must be >= 0")
    pretrain = None if str(args.imagenet_pretrain).lower() in ("none", "") else Path(args.imagenet_pretrain)
    resume = None
    if args.resume is not None:
        resume = Path(args.resume) if args.resume else Path(args.log_dir) / "last.pth.tar"
    return TrainConfig(
        spec=spec, data_dir=Path(args.data_dir), log_dir=Path(args.log_dir), split=args.split,
        flip_pairs=tuple(flip_pairs), batch_size=args.batch_size, epochs=args.epochs,
        warmup_epochs=args.warmup_epochs, schp_start=args.schp_start, cycle_epochs=args.cycle_epochs,
        eval_epochs=args.eval_epochs, learning_rate=args.learning_rate, momentum=args.momentum,
        weight_decay=args.weight_decay, lambda_s=args.lambda_s, lambda_e=args.lambda_e,
        lambda_c=args.lambda_c, fix_ignore=args.fix_ignore, soft_eval_mode=args.soft_eval_mode,
        sync_bn=args.sync_bn, device=args.device, gpu=args.gpu, num_workers=args.num_workers,
        seed=args.seed, precision=args.precision, imagenet_pretrain=pretrain,
        init_from=Path(args.init_from) if args.init_from else None,
        model_restore=Path(args.model_restore) if args.model_restore else None,
        schp_restore=Path(args.schp_restore) if args.schp_restore else None,
        resume=resume, stop_after=args.stop_after, check_data_only=args.check_data, quiet=args.quiet,
        max_pixels=args.max_pixels or None,
        args=vars(args))


def main(argv: Optional[Sequence[str]] = None) -> int:
    try:
        args = parse_args(argv)
    except SystemExit as stop:  # --help, --version, a usage error: its exit code, for callers of main()
        return stop.code
    try:
        config = build_config(args)
    except SetupError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_SETUP
    if args.gpu and "," in str(args.gpu):
        print(f"note: --gpu {args.gpu}: one process uses the first; for several GPUs launch "
              "torchrun --nproc-per-node N train.py ...", file=sys.stderr)
    from schp.runs.loop import stop_signals_as_interrupt
    from schp.training.trainer import LAST, train
    with show_training_log(), stop_signals_as_interrupt():  # SIGTERM and SIGHUP stop it as Ctrl-C does
        try:
            return train(config)
        except KeyboardInterrupt:
            last = Path(args.log_dir) / LAST
            if last.is_file():
                print(f"interrupted; continue with --resume (from {last}, the last finished epoch)", file=sys.stderr)
            else:
                print("interrupted before the first epoch finished; nothing to resume", file=sys.stderr)
            return EXIT_INTERRUPTED


class _Lines(logging.Formatter):
    """The trainer's log as this command's lines: `error: ...` / `warning: ...`, progress as it is."""

    def format(self, record: logging.LogRecord) -> str:
        prefix = {logging.ERROR: "error: ", logging.WARNING: "warning: "}.get(record.levelno, "")
        return prefix + record.getMessage()


@contextmanager
def show_training_log():
    """The `schp.training` logger on stderr, one line per message, while the job runs (through this
    handler only: not also as the plain engine log that options.parse shows)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Lines())
    logger = logging.getLogger("schp.training")
    level, propagate = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        logger.propagate = propagate


if __name__ == "__main__":
    sys.exit(main())
