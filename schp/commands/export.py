#!/usr/bin/env python3
"""Export an SCHP checkpoint to ONNX (the file re-hosting pipelines call), TorchScript or torch.export.

    python export.py --dataset atr --model-restore CKPT --output parsing_atr.onnx

The written file is run with its own runtime (ONNX Runtime for ONNX) on a drawn crop and compared with
PyTorch; a mismatch above tolerance removes it. Exit codes: 0 written and verified, 1 the file did not
verify (nothing written), 2 usage or set-up error, 130 interrupted.
"""
import argparse
import errno
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

from schp.choices import DEFAULT_OPSET, FORMATS, OUTPUTS
from schp.commands import options
from schp.errors import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, EXIT_SETUP, SCHPError, SetupError


def build_parser() -> argparse.ArgumentParser:
    p = options.CommandParser(
        description="Export the SCHP network of a checkpoint to ONNX, TorchScript or a torch.export "
                    "program, verified against PyTorch after writing.")
    options.add_dataset(p, "pascal", custom=True)
    options.add_model_restore(p)
    p.add_argument("--output", required=True, help="file to write (e.g. parsing_atr.onnx)")
    p.add_argument("--format", default="onnx", choices=FORMATS,
                   help="onnx (ONNX Runtime, OpenVINO, ...), torchscript (torch.jit.load), "
                        "exported-program (torch.export.load, .pt2)")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET, help="ONNX opset")
    p.add_argument("--dynamic-batch", action="store_true", help="any batch size N (default: N = 1)")
    p.add_argument("--dynamic-size", action="store_true",
                   help="any input H x W >= 32 (default: the dataset's input size only)")
    options.add_precision(p, help="weights and arithmetic inside the file (the input and outputs stay float32); "
                                  "onnx: fp32, fp16; torchscript and exported-program: all three")
    p.add_argument("--outputs", default="raw", choices=OUTPUTS,
                   help="raw: outputs parsing, fusion, edge logits at 1/4 resolution (the released order); "
                        "labels: N x H x W int64 crop-space labels (upsampling and argmax in the graph)")
    p.add_argument("--no-verify", dest="verify", action="store_false",
                   help="skip running the written file (not recommended)")
    return p


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    return options.parse(build_parser(), argv)


def load_state(args, spec):
    from schp.checkpoint import load_checkpoint

    return load_checkpoint(spec, args.model_restore)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Ctrl-C, SIGTERM and SIGHUP end the export with 130, its temporary removed (as every command)."""
    from schp.runs.loop import stop_signals_as_interrupt

    with stop_signals_as_interrupt():
        try:
            return _main(argv)
        except KeyboardInterrupt:
            print("interrupted; nothing was written", file=sys.stderr)
            return EXIT_INTERRUPTED


def _main(argv: Optional[Sequence[str]] = None) -> int:
    try:
        args = parse_args(argv)
    except SystemExit as stop:  # --help, --version, a usage error: its exit code, for callers of main()
        return stop.code
    from schp.checkpoint import CheckpointError
    from schp.export import ExportError, check_options, export
    from schp.api import dataset_spec

    output = Path(args.output)
    try:
        spec = dataset_spec(args.dataset, args.model_restore)  # custom: the label set in the checkpoint
        check_options(args.format, args.precision, args.outputs, args.opset)
        if output.is_dir():
            raise ExportError(f"--output {output} is a folder; give a file name")
        state, checkpoint = load_state(args, spec)
    except (CheckpointError, ExportError, SetupError) as err:
        print(f"error: {options.flag_message(err)}", file=sys.stderr)
        return EXIT_SETUP
    n = "N" if args.dynamic_batch else "1"
    h, w = ("H", "W") if args.dynamic_size else spec.input_size
    print(f"exporting {spec.name} ({checkpoint.name}) to {output} as {args.format}, {args.precision}, "
          f"input {n} x 3 x {h} x {w}, outputs {args.outputs}"
          + (f", opset {args.opset}" if args.format == "onnx" else ""), file=sys.stderr)
    started = time.perf_counter()
    try:
        result = export(spec, state, output, args.format, args.opset, args.dynamic_batch, args.dynamic_size,
                        args.precision, args.outputs, verify_file=args.verify)
    except SCHPError as err:  # a missing runtime package is a set-up error (2); a file that does not verify, 1
        print(f"error: {options.flag_message(err)}", file=sys.stderr)
        return err.exit_code
    except OSError as err:  # unwritable folder (2), disk full (1): the temporary is already removed
        print(f"error: cannot write {output}: {err.strerror or err}", file=sys.stderr)
        return EXIT_FAILED if err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG) else EXIT_SETUP
    if result is not None:
        print(result.line())
    print(f"wrote {output} ({output.stat().st_size / 2**20:.1f} MiB) in {time.perf_counter() - started:.1f} s",
          file=sys.stderr)
    return EXIT_OK


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("interrupted; nothing was written", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)
