#!/usr/bin/env python3
"""SCHP simple extractor: human parsing maps for a folder of images, or for an IntegratedPIFu tree.

Same command lines as the published extractor and its IntegratedPIFu fork; runs on CPU or GPU.
Exit codes: 0 all good, 1 some input failed (or the run was stopped), 2 usage or set-up error,
130 interrupted.
"""
import argparse
import sys
from typing import Optional, Sequence

from schp.commands import options
from schp.errors import EXIT_OK, SetupError

DEFAULT_MAX_PIXELS = 200_000_000  # = schp.data.decode.DEFAULT_MAX_PIXELS (not imported: heavy)


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
    p.add_argument("--label-map", default=None, metavar="FILE",
                   help="write the label maps in another label scheme: a JSON file with the target class "
                        "names, the source-to-target class mapping and an optional palette (docs/outputs.md)")
    p.add_argument("--engine", default="plain", choices=["plain", "ray"],
                   help="plain: this machine (or torchrun); ray: a Ray cluster through Ray Data, with folders "
                        "or object-store URLs (s3://, gs://, ...) for --input-dir / --output-dir (docs/ray.md)")
    p.add_argument("--ray-address", default=None, metavar="ADDRESS",
                   help="--engine ray: the cluster to join; default $RAY_ADDRESS, else a local Ray for the run")
    p.add_argument("--ray-actors", type=int, default=1, metavar="N",
                   help="--engine ray: model actors, each loading the model once")
    p.add_argument("--ray-gpus-per-actor", type=float, default=0.0, metavar="G",
                   help="--engine ray: GPUs each model actor reserves (1 for one GPU each; 0: CPU actors)")
    p.add_argument("--ray-cpus-per-actor", type=float, default=1.0, metavar="C",
                   help="--engine ray: CPUs each model actor reserves (decoding and writing take 1 each)")
    p.add_argument("--legend", "--list-labels", dest="legend", action="store_true",
                   help="print each class of --dataset with its palette colour, and exit")
    return p


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """The options, checked for consistency here, before anything heavy (torch) is imported."""
    p = build_parser()
    args = options.parse(p, argv)
    if args.integratedpifu_dir is not None and args.input_dir:
        p.error("--input-dir and --integratedpifu-dir are two different modes; give one of them")
    from schp.runs.objects import is_url
    urls = [f"--{d.replace('_', '-')} {getattr(args, d)}" for d in ("input_dir", "output_dir")
            if is_url(getattr(args, d))]
    if urls and args.engine != "ray":
        p.fail(f"{urls[0]}: a URL; object stores are read and written by --engine ray")
    options.require_folders(p, args, *([] if is_url(args.input_dir) else ["input_dir"]), "integratedpifu_dir")
    return args


# the engine's parameter -> this command's flag, where they differ
FLAGS = {"checkpoint": "--model-restore", "scales": "--multi-scales"}


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


def print_legend(spec) -> None:
    from schp.commands.console import emit
    from schp.utils.palette import class_colors
    emit([f"{spec.name}: {spec.num_classes} classes (index  RGB colour  name)"] +
         [f"{i:5d}  #{rgb[0]:02x}{rgb[1]:02x}{rgb[2]:02x} {str(rgb):>16}  {name}"
          for i, (name, rgb) in enumerate(zip(spec.labels, class_colors(spec.num_classes)))])


def run_options(args) -> dict:
    """The engine's options (schp.runs.extract.ExtractOptions) from the command line's."""
    from schp.choices import parse_scales
    try:
        scales = parse_scales(args.multi_scales)
    except ValueError as err:
        raise SetupError(str(err)) from None
    return dict(dataset=args.dataset, checkpoint=args.model_restore, device=args.device, gpu=args.gpu,
                precision=args.precision, backend=args.backend, allow_tf32=args.allow_tf32, flip=args.flip,
                scales=scales, logits=args.logits, overlay=args.overlay, recursive=args.recursive,
                every=args.every, subjects=args.subjects, overwrite=args.overwrite, batch_size=args.batch_size,
                num_workers=args.num_workers, max_pixels=args.max_pixels, shard=parse_shard(args.shard),
                summary=args.summary, label_map=getattr(args, "label_map", None), quiet=args.quiet)


def main(argv: Optional[Sequence[str]] = None) -> int:
    from schp.commands.console import interruptible
    return interruptible(_main, argv, FLAGS)


def _main(argv: Optional[Sequence[str]]) -> int:
    args = parse_args(argv)
    from schp.commands.console import ConsoleReporter, emit
    if args.legend:
        from schp.api import dataset_spec
        print_legend(dataset_spec(args.dataset, args.model_restore))
        return EXIT_OK
    if args.integratedpifu_dir is None and not (args.input_dir and args.output_dir):
        raise SetupError("folder mode needs --input-dir and --output-dir (or use --integratedpifu-dir)")
    if args.engine == "ray":
        from schp.runs.ray_engine import prepare_ray_extraction
        extraction = prepare_ray_extraction(
            args.input_dir or None, args.output_dir or None, integratedpifu_dir=args.integratedpifu_dir,
            ray_address=args.ray_address, ray_actors=args.ray_actors, ray_gpus_per_actor=args.ray_gpus_per_actor,
            ray_cpus_per_actor=args.ray_cpus_per_actor, **run_options(args))
    else:
        from schp.runs.extract import prepare_extraction
        extraction = prepare_extraction(args.input_dir or None, args.output_dir or None,
                                        integratedpifu_dir=args.integratedpifu_dir, **run_options(args))
    if extraction.ranks and not extraction.ranks.is_main:
        args.quiet = True  # one progress bar
    if args.dry_run:
        for note in extraction.plan.notes:
            print(note, file=sys.stderr)
        emit(extraction.plan.listing(args.overwrite))
        return EXIT_OK
    reporter = ConsoleReporter(args.quiet)
    for note in extraction.plan.notes:  # before the model loads, as the listing found them
        reporter.line(note)
    extraction.plan.notes = []
    return extraction.execute(reporter).exit_code()


if __name__ == "__main__":
    sys.exit(main())
