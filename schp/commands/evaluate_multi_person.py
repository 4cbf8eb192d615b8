"""`evaluate.py --multi-person`: score multi_person.py's outputs on the CIHP / VIP layout.

Prints one line per metric and the per-class IoU table on stdout, one `error: <file>: <reason>` line per
input left out on stderr. With --run-multi-person it first runs multi_person.py on <data-dir>/Images.
Exit codes: 0 all scored, 1 some input left out or not parsed (or none scored), 2 usage or set-up error,
130 interrupted.
"""
import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Optional, Sequence

from schp.errors import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, EXIT_SETUP

MULTI_PERSON = ["-m", "schp.commands.multi_person"]  # the command, installed or in a checkout


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    from schp.commands import options
    p = options.CommandParser(
        prog="evaluate.py --multi-person",
        description="Multi-person evaluation: mIoU of the global parsing, AP^r of the part instances "
                    "(CIHP's protocol), AP^h of the persons, identity switches in videos.", allow_abbrev=False)
    p.add_argument("--multi-person", action="store_true", required=True, help="this mode")
    p.add_argument("--data-dir", required=True,
                   help="ground truth in the CIHP layout: Category_ids/, Human_ids/, Instance_ids/ (VIP: one "
                        "subfolder per video in each)")
    p.add_argument("--pred-dir", required=True,
                   help="multi_person.py's output folder: global_parsing/, instance_parsing/ (+ .txt), "
                        "instance_segmentation/ or global_tag/; for videos one such folder per video")
    p.add_argument("--id-list", default=None, metavar="FILE",
                   help="ids, videos or <video>/<frame> to score, one per line; default the only *_id.txt in "
                        "--data-dir, else everything in Category_ids/")
    p.add_argument("--max-pixels", type=int, default=None, metavar="N",
                   help="refuse maps declaring more pixels than this; default 200000000, 0 = no limit")
    options.add_summary(p, help="write the metrics as JSON")
    options.add_quiet(p, help="no progress bar")
    p.add_argument("--run-multi-person", action="store_true",
                   help="first run multi_person.py on <data-dir>/Images into --pred-dir (images already done "
                        "there are kept); every option this mode does not know goes to multi_person.py, e.g. "
                        "--instances masks DIR --global-restore G --local-restore L")
    args, extra = p.parse_known_args(argv)
    if extra and not args.run_multi_person:
        p.error(f"unrecognized arguments: {' '.join(extra)}")
    args.multi_person_args = extra
    return args


def run_multi_person(args) -> int:
    """multi_person.py in a child process (the command, not its internals), its lines passed through."""
    command = [sys.executable, *MULTI_PERSON, "--input-dir", str(Path(args.data_dir) / "Images"),
               "--output-dir", str(args.pred_dir)] + list(args.multi_person_args)
    if args.quiet:
        command.append("--quiet")
    import os

    import schp
    home = str(Path(schp.__file__).resolve().parents[1])  # where this schp is importable from (checkout or site)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [home, os.environ.get("PYTHONPATH")])))
    try:
        return subprocess.run(command, env=env).returncode
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    from schp.multi_person.evaluation import DEFAULT_MAX_PIXELS, MultiPersonDataError, evaluate_multi_person
    from schp.utils.outputs import atomic_path

    if args.max_pixels is not None and args.max_pixels < 0:
        print("error: --max-pixels must be >= 0", file=sys.stderr)
        return EXIT_SETUP
    max_pixels = DEFAULT_MAX_PIXELS if args.max_pixels is None else (args.max_pixels or None)
    from schp.commands import options
    from schp.errors import SetupError
    from schp.runs.extract import check_summary
    try:
        check_summary(args.summary)  # a file in the way is a set-up error, as in every command
    except SetupError as err:
        print(f"error: {options.flag_message(err)}", file=sys.stderr)
        return EXIT_SETUP
    parsed_ok = True
    if args.run_multi_person:
        code = run_multi_person(args)
        if code in (EXIT_SETUP, EXIT_INTERRUPTED) or code < 0:
            print(f"error: multi_person.py stopped (exit {code}): nothing scored", file=sys.stderr)
            return EXIT_INTERRUPTED if code in (EXIT_INTERRUPTED, -2) else EXIT_SETUP
        parsed_ok = code == EXIT_OK  # 1: some images failed; what was written is scored

    from tqdm import tqdm
    bar = tqdm(unit="img", file=sys.stderr, disable=args.quiet, dynamic_ncols=True)

    def say(path: str, reason: str) -> None:
        tqdm.write(f"error: {path}: {reason}", file=sys.stderr)
        bar.update(1)

    try:
        result = evaluate_multi_person(args.data_dir, args.pred_dir, args.id_list, max_pixels=max_pixels,
                                       on_error=say, on_item=lambda item: bar.update(1))
    except MultiPersonDataError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_SETUP
    except KeyboardInterrupt:
        print("interrupted: no metrics written", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        bar.close()
    print("\n".join(result.lines()))
    print(f"{result.images} images scored, {len(result.failed)} left out", file=sys.stderr)
    if result.images == 0:
        print("error: no image could be scored", file=sys.stderr)
    if args.summary:
        fields = {**result.as_dict(), "mode": "multi-person", "data_dir": str(args.data_dir),
                  "pred_dir": str(args.pred_dir), "id_list": args.id_list}
        try:
            path = Path(args.summary)
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(path) as tmp:
                tmp.write_text(json.dumps(fields, indent=1, ensure_ascii=False) + "\n")
        except OSError as err:
            print(f"error: cannot write --summary {args.summary}: {err.strerror or err}", file=sys.stderr)
            return EXIT_FAILED
    return EXIT_FAILED if result.failed or result.images == 0 or not parsed_ok else EXIT_OK
