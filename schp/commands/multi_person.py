#!/usr/bin/env python3
"""SCHP multi-person parsing: every person in a photo with their own parts (CIHP global + local models).

Instances come from a folder of person-id masks, a detectron2 predictions file, or torchvision's
Mask R-CNN; the rest follows the released multi-person extension. Runs on CPU or GPU.
Exit codes: 0 all good, 1 some input failed, 2 usage or set-up error, 130 interrupted.
"""
import argparse
import sys
from typing import Optional, Sequence

from schp.commands import options
from schp.commands.options import parse_input_size
from schp.errors import SetupError

# the engine's parameter -> this command's flag, where they differ
FLAGS = {"checkpoint": "--global-restore / --local-restore", "global_checkpoint": "--global-restore",
         "local_checkpoint": "--local-restore", "scales": "--multi-scales", "score_threshold": "--conf-thres",
         "expand": "--exp-ratio"}


def build_parser() -> argparse.ArgumentParser:
    p = options.CommandParser(
        description="Multi-person human parsing: class, person and part maps per image (CIHP models).")
    p.add_argument("--input-dir", required=True, help="folder of images and videos (.mp4 .avi .mov .mkv .webm)")
    p.add_argument("--output-dir", required=True,
                   help="where global_parsing/, instance_parsing/, global_tag/, overlay/, instances/ go; "
                        "a video's in <video>/ (with instance_segmentation/)")
    p.add_argument("--sequences", action="store_true",
                   help="each subfolder of --input-dir is a video: its frames in sorted name order (VIP layout)")
    p.add_argument("--every", type=int, default=1, metavar="N", help="videos: parse every Nth frame")
    p.add_argument("--track-window", type=int, default=30, metavar="FRAMES",
                   help="videos: a person who is gone for up to this many frames keeps their id")
    p.add_argument("--track-iou", type=float, default=0.3,
                   help="videos: the least mask IoU for a person to keep the id of the previous frames")
    p.add_argument("--instances", nargs="+", metavar="SOURCE", default=["torchvision"],
                   help="who is in each image: 'masks DIR' (DIR/<stem>.png person ids, optional "
                        "DIR/<stem>.json scores), 'detectron2 FILE' (instances_predictions.pth), or "
                        "'torchvision' (Mask R-CNN)")
    p.add_argument("--image-list", default=None,
                   help="detectron2 source: the COCO image list the detections were made for (file_name -> "
                        "image_id); default ids 1..N in sorted input order")
    p.add_argument("--detector-weights", default=None,
                   help="torchvision source: maskrcnn_resnet50_fpn_v2 COCO weights file; default "
                        "torchvision's own download")
    p.add_argument("--detector-min-size", type=int, default=800, help="torchvision source: shortest side")
    p.add_argument("--detector-max-size", type=int, default=1333, help="torchvision source: longest side cap")
    p.add_argument("--global-restore", default=None,
                   help="global parser checkpoint; default checkpoints/exp_schp_multi_cihp_global.pth, "
                        "downloaded when missing")
    p.add_argument("--local-restore", default=None,
                   help="local parser checkpoint; default checkpoints/exp_schp_multi_cihp_local.pth, "
                        "downloaded when missing")
    options.add_tta(p)
    p.add_argument("--input-size", default="473,473", help="network input H,W (the released models: 473,473)")
    p.add_argument("--conf-thres", type=float, default=0.5, help="instances scored lower are not persons")
    p.add_argument("--overlap-threshold", type=float, default=0.5,
                   help="an instance whose mask is more than this share taken by persons already kept is dropped")
    p.add_argument("--exp-ratio", type=float, default=1.2, help="crop box = instance box widened by this")
    p.add_argument("--no-jpeg-roundtrip", action="store_true",
                   help="parse crops straight from memory instead of through a JPEG (quality 95) as the "
                        "original did (changes results slightly)")
    p.add_argument("--legacy-person-count", action="store_true",
                   help="count persons as the original (ids past the number of persons get no parts)")
    p.add_argument("--no-overlay", action="store_true", help="do not write overlay/<stem>.jpg")
    options.add_device(p)
    options.add_precision(p)
    options.add_backend(p)
    options.add_batch_size(p, help="person crops per forward pass")
    options.add_num_workers(p, help="threads decoding images and reading instances")
    options.add_overwrite(p, help="redo images whose outputs already exist")
    options.add_summary(p)
    options.add_quiet(p, help="no progress bar")
    p.add_argument("--label-map", default=None, metavar="FILE",
                   help="write the class maps (global_parsing) in another label scheme: a JSON file with the "
                        "target class names, the CIHP-to-target class mapping and an optional palette")
    return p


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """The options, checked (choices, device, the input folder) before torch is imported."""
    p = build_parser()
    args = options.parse(p, argv, FLAGS)
    options.require_folders(p, args, "input_dir")
    return args


def run_options(args) -> dict:
    """The engine's options (schp.multi_person.run.MultiPersonOptions) from the command line's."""
    from schp.choices import parse_scales

    size = parse_input_size(args.input_size, 32)
    try:
        scales = parse_scales(args.multi_scales)
    except ValueError as err:
        raise SetupError(str(err)) from None
    return dict(instances=tuple(args.instances), image_list=args.image_list, detector_weights=args.detector_weights,
                detector_min_size=args.detector_min_size, detector_max_size=args.detector_max_size,
                global_checkpoint=args.global_restore, local_checkpoint=args.local_restore, flip=args.flip,
                scales=scales, input_size=size, score_threshold=args.conf_thres,
                overlap_threshold=args.overlap_threshold, expand=args.exp_ratio,
                jpeg_roundtrip=not args.no_jpeg_roundtrip, legacy_person_count=args.legacy_person_count,
                overlay=not args.no_overlay, device=args.device, gpu=args.gpu, precision=args.precision,
                backend=args.backend, batch_size=args.batch_size, num_workers=args.num_workers,
                overwrite=args.overwrite, summary=args.summary, label_map=args.label_map,
                sequences=args.sequences, every=args.every, track_window=args.track_window,
                track_iou=args.track_iou)


def main(argv: Optional[Sequence[str]] = None) -> int:
    from schp.commands.console import interruptible
    return interruptible(_main, argv, FLAGS)


def _main(argv: Optional[Sequence[str]]) -> int:
    args = parse_args(argv)
    from schp.commands.console import ConsoleReporter
    from schp.multi_person.run import prepare_multi_person
    run = prepare_multi_person(args.input_dir, args.output_dir, **run_options(args))
    return run.execute(ConsoleReporter(args.quiet)).exit_code()


if __name__ == "__main__":
    sys.exit(main())
