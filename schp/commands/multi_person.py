#!/usr/bin/env python3
"""SCHP multi-person parsing: every person in a photo with their own parts (CIHP global + local models).

Instances come from a folder of person-id masks, a detectron2 predictions file, or torchvision's
Mask R-CNN; the rest follows the released multi-person extension. Runs on CPU or GPU.
Exit codes: 0 all good, 1 some input failed, 2 usage or set-up error, 130 interrupted.
"""
import argparse
import json
import platform
import sys
from pathlib import Path
from typing import List, Optional, Sequence

from schp.cli import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, EXIT_SETUP, SetupError, parse_input_size


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Multi-person human parsing: class, person and part maps per image (CIHP models).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--input-dir", required=True, help="folder of images")
    p.add_argument("--output-dir", required=True,
                   help="where global_parsing/, instance_parsing/, global_tag/, overlay/, instances/ go")
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
    p.add_argument("--flip", action="store_true", help="average with the mirrored image (as the evaluator)")
    p.add_argument("--multi-scales", default="1", help="comma-separated scales averaged, e.g. 0.75,1,1.25")
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
    p.add_argument("--device", default="auto", help="auto (CUDA if available, else CPU), cpu, cuda, cuda:N")
    p.add_argument("--gpu", default=None, help="CUDA device index as in the original; 'None' means CPU")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"],
                   help="fp32 reproduces the original")
    from schp.backends import add_backend_argument
    add_backend_argument(p)
    p.add_argument("--batch-size", type=int, default=1, help="person crops per forward pass")
    p.add_argument("--num-workers", type=int, default=1, help="threads decoding images and reading instances")
    p.add_argument("--overwrite", action="store_true", help="redo images whose outputs already exist")
    p.add_argument("--summary", default=None, metavar="PATH", help="write a JSON manifest of the run")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def make_source(args, names: List[str], device):
    from schp.multi_person.instances import (Detectron2FileSource, MaskFolderSource, SourceError,
                                             TorchvisionSource)
    kind, rest = args.instances[0], args.instances[1:]
    try:
        if kind == "masks" and len(rest) == 1:
            return MaskFolderSource(Path(rest[0]))
        if kind == "detectron2" and len(rest) == 1:
            return Detectron2FileSource(Path(rest[0]), args.image_list, names)
        if kind == "torchvision" and not rest:
            return TorchvisionSource(device, args.detector_weights, args.detector_min_size, args.detector_max_size)
    except SourceError as err:
        raise SetupError(str(err)) from None
    raise SetupError(f"--instances {' '.join(args.instances)}: expected 'masks DIR', 'detectron2 FILE' or "
                     "'torchvision'")


def plan(args):
    from schp.data.listing import list_images
    from schp.multi_person.outputs import output_paths
    from schp.multi_person.pipeline import ImageTask

    input_dir, output_dir = Path(args.input_dir), Path(args.output_dir)
    if not input_dir.is_dir():
        raise SetupError(f"--input-dir {input_dir}: no such folder")
    if input_dir.resolve() == output_dir.resolve():
        raise SetupError("--output-dir must differ from --input-dir")
    images, others = list_images(input_dir)
    for o in others:
        print(f"skipping {input_dir / o}: not an image", file=sys.stderr)
    tasks, owner = [], {}
    for rel in images:
        stem = rel.stem
        if stem in owner:  # a.jpg and a.png would write the same outputs
            print(f"error: {input_dir / rel}: its outputs would overwrite those of {owner[stem]}; "
                  "rename one of them", file=sys.stderr)
            continue
        owner[stem] = input_dir / rel
        tasks.append(ImageTask(input_dir / rel, str(rel), output_paths(output_dir, stem, not args.no_overlay)))
    return tasks, len(images) - len(tasks)


def load_parsers(args, device):
    import dataclasses

    from schp.data.catalog import MULTI_PERSON
    from schp.checkpoint import CheckpointError
    from schp.multi_person.parsing import load_parser

    from schp.inference import parse_scales

    size = parse_input_size(args.input_size, 32)
    try:
        scales = parse_scales(args.multi_scales)
    except ValueError as err:
        raise SetupError(str(err)) from None
    parsers, paths = [], []
    for role, given in (("global", args.global_restore), ("local", args.local_restore)):
        spec = dataclasses.replace(MULTI_PERSON[role], input_size=size)
        try:
            parser, path = load_parser(spec, given or None, allow_download=None, device=device,
                                       precision=args.precision, flip=args.flip, scales=scales,
                                       backend=args.backend)
        except (CheckpointError, ValueError) as err:
            raise SetupError(f"--{role}-restore: {err}") from None
        parsers.append(parser)
        paths.append(path)
    return parsers, paths


def write_manifest(path: Path, args, source, checkpoints, device, report) -> None:
    import torch
    from schp.utils.outputs import atomic_path

    manifest = {
        "seconds": round(report.seconds, 3),
        "interrupted": report.interrupted,
        "instances": source.describe() if source is not None else " ".join(args.instances),
        "checkpoints": {"global": str(checkpoints[0]), "local": str(checkpoints[1])} if checkpoints else None,
        "device": str(device) if device is not None else None,
        "precision": args.precision, "backend": args.backend, "flip": args.flip, "multi_scales": args.multi_scales,
        "input_size": args.input_size, "jpeg_roundtrip": not args.no_jpeg_roundtrip,
        "legacy_person_count": args.legacy_person_count,
        "versions": {"python": platform.python_version(), "torch": torch.__version__},
        "totals": {s: report.count(s) for s in ("processed", "skipped", "failed", "not-run")},
        "images": [{"input": str(o.task.source), "status": o.status, "reason": o.reason, "persons": o.persons,
                    "parts": o.parts, "seconds": round(o.seconds, 3) or None,
                    "outputs": {k: str(v) for k, v in o.task.outputs.items()}} for o in report.outcomes],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(manifest, indent=1, ensure_ascii=False) + "\n")


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    try:
        if args.batch_size < 1 or args.num_workers < 0:
            raise SetupError("--batch-size must be >= 1 and --num-workers >= 0")
        from schp.inference import select_device
        from schp.utils.outputs import check_writable
        try:
            device = select_device(args.device, args.gpu)
        except (ValueError, RuntimeError) as err:
            raise SetupError(str(err)) from None
        tasks, refused = plan(args)
        try:
            check_writable(Path(args.output_dir))
        except OSError as err:
            raise SetupError(f"cannot write to {args.output_dir}: {err.strerror or err}") from None
        todo = [t for t in tasks if args.overwrite or not t.is_done()]
        source, parsers, checkpoints = None, (None, None), None
        if todo:  # nothing to compute: no model, no detector
            source = make_source(args, sorted(t.source.name for t in tasks), device)
            parsers, checkpoints = load_parsers(args, device)
    except SetupError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_SETUP

    import cv2
    from schp.multi_person.pipeline import MultiPersonRunner, Settings
    cv2.setNumThreads(1)
    settings = Settings(args.conf_thres, args.overlap_threshold, args.exp_ratio, not args.no_jpeg_roundtrip,
                        args.legacy_person_count, args.batch_size, args.num_workers, args.quiet)
    report = MultiPersonRunner(parsers[0], parsers[1], source, settings).run(tasks, args.overwrite)
    print(report.summary_line(), file=sys.stderr)
    if args.summary:
        try:
            write_manifest(Path(args.summary), args, source, checkpoints, device, report)
        except OSError as err:
            print(f"error: cannot write --summary {args.summary}: {err.strerror or err}", file=sys.stderr)
            return EXIT_FAILED
    if report.interrupted:
        return EXIT_INTERRUPTED
    if report.count("failed") or refused:
        return EXIT_FAILED
    return EXIT_OK


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("interrupted before any input was processed", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)
