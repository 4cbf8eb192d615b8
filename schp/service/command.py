"""`serve.py`: the parsing service on uvicorn. Options as the extractor's where they apply.

Exit codes: 0 after a clean stop (SIGTERM or Ctrl-C: requests in flight are answered, new ones
refused, then the process leaves within --drain-timeout), 2 usage or set-up error (one line
`error: ...`, before torch is imported for bad options).
"""
import argparse
import ipaddress
import re
import signal
import socket
import sys
from typing import Optional, Sequence

from schp.cli import EXIT_OK, EXIT_SETUP, SetupError, raise_keyboard_interrupt

DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:\d+)?")
SERVICE_PACKAGES = (("fastapi", "fastapi"), ("uvicorn", "uvicorn"), ("multipart", "python-multipart"))


class OneLineParser(argparse.ArgumentParser):
    def error(self, message: str):
        self.exit(EXIT_SETUP, f"error: {message} (--help lists the options)\n")


def build_parser() -> argparse.ArgumentParser:
    from schp.service import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS
    p = OneLineParser(prog="serve.py", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                      description="SCHP human parsing over HTTP: one model in memory, concurrent requests "
                                  "batched, the page at /, the API under /v1, OpenAPI at /docs.")
    p.add_argument("--dataset", default="pascal", choices=["lip", "atr", "pascal", "custom"],
                   help="which released model (labels, input size); custom: those stored in --model-restore")
    p.add_argument("--model-restore", default=None,
                   help="checkpoint file; default checkpoints/<released file of --dataset>, downloaded when missing")
    p.add_argument("--device", default="auto", help="auto (CUDA if available, else CPU), cpu, cuda, cuda:N")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"],
                   help="fp32 reproduces the original; bf16 approximate; fp16 CUDA only")
    from schp.backends import add_backend_argument
    add_backend_argument(p)
    p.add_argument("--flip", action="store_true", help="test-time augmentation: average with the mirrored image")
    p.add_argument("--multi-scales", default="1", metavar="S1,S2,...",
                   help="test-time augmentation: average the logits over these input scales")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on; anything but loopback without --token prints a warning")
    p.add_argument("--port", type=int, default=8000, help="TCP port (0 = any free one, printed)")
    p.add_argument("--max-batch", type=int, default=4, help="images per forward pass at most")
    p.add_argument("--max-wait-ms", type=float, default=10.0,
                   help="how long a first request waits for others to join its forward pass")
    p.add_argument("--max-queue", type=int, default=32,
                   help="images waiting for the model at most; beyond, 503 with Retry-After")
    p.add_argument("--max-bytes", type=int, default=DEFAULT_MAX_BYTES,
                   help="largest request body in bytes (413 beyond, before it is read whole)")
    p.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS, metavar="N",
                   help="refuse (413) images whose header declares more than N pixels, before decoding; 0 = no limit")
    p.add_argument("--token", default=None,
                   help="require 'Authorization: Bearer TOKEN' on /v1 (default: $SCHP_TOKEN if set)")
    p.add_argument("--logits", action="store_true", help="allow ?output=npy (H x W x C float32 logits)")
    p.add_argument("--drain-timeout", type=float, default=30.0,
                   help="on SIGTERM / Ctrl-C, seconds to let requests in flight finish before leaving")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                   help="uvicorn's log level (access lines at info)")
    return p


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    import os
    p = build_parser()
    args = p.parse_args(argv)
    if not DEVICE_PATTERN.fullmatch(args.device):
        p.error(f"--device {args.device}: expected auto, cpu, cuda or cuda:N")
    if not 0 <= args.port <= 65535:
        p.error(f"--port {args.port}: expected 0..65535")
    for name in ("max_batch", "max_queue", "max_bytes"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.max_wait_ms < 0 or args.max_pixels < 0 or args.drain_timeout < 0:
        p.error("--max-wait-ms, --max-pixels and --drain-timeout must be >= 0")
    if args.token is None:
        args.token = os.environ.get("SCHP_TOKEN") or None
    if args.token is not None and not args.token.strip():
        p.error("--token is empty")
    return args


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def missing_service_package() -> Optional[str]:
    import importlib
    for module, package in SERVICE_PACKAGES:
        try:
            importlib.import_module(module)
        except ImportError:
            return package
    return None


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound now so that a busy port fails before the model is loaded."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as err:
        raise SetupError(f"--host {host}: {err.strerror or err}") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as err:
        sock.close()
        raise SetupError(f"cannot listen on {host}:{port}: {err.strerror or err}") from None
    sock.set_inheritable(True)
    return sock


def load(args):
    """(HumanParser, checkpoint path) as the extractor loads them; SetupError with one sentence."""
    from pathlib import Path

    from schp.api import load_parser
    from schp.checkpoint import CheckpointError
    from schp.inference import parse_scales

    if args.dataset == "custom":
        from schp.checkpoint import spec_from_checkpoint
        if args.model_restore is None:
            raise SetupError("--dataset custom needs --model-restore (a checkpoint written by train.py)")
        try:
            spec = spec_from_checkpoint(Path(args.model_restore))
        except CheckpointError as err:
            raise SetupError(str(err)) from None
    else:
        from datasets.catalog import DATASETS
        spec = DATASETS[args.dataset]
    try:
        return load_parser(spec, args.model_restore, args.device, None, args.precision,
                           flip=args.flip, scales=parse_scales(args.multi_scales), backend=args.backend)
    except (CheckpointError, ValueError, RuntimeError, OSError) as err:
        text = str(err).strip().splitlines()
        raise SetupError(text[0] if text else type(err).__name__) from None


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    missing = missing_service_package()
    if missing:
        print(f"error: the service needs the package '{missing}', which is not installed "
              "(pip install fastapi uvicorn python-multipart)", file=sys.stderr)
        return EXIT_SETUP
    if not is_loopback(args.host) and not args.token:
        print(f"warning: --host {args.host} is reachable from other machines and there is no --token: "
              "anyone who can reach it can use the model", file=sys.stderr)
    # SIGTERM and Ctrl-C during start-up (model load): leave at once, quietly, with 0
    previous = {s: signal.signal(s, raise_keyboard_interrupt) for s in (signal.SIGTERM, signal.SIGINT)}
    sock = None
    try:
        sock = bind(args.host, args.port)
        host, port = sock.getsockname()[:2]
        print(f"loading the model; then serving on http://{host if ':' not in host else f'[{host}]'}:{port}",
              file=sys.stderr, flush=True)
        parser, checkpoint = load(args)
        import cv2
        cv2.setNumThreads(1)  # torch owns the cores; the decode/encode threads run cv2 single-threaded each
    except SetupError as err:
        if sock is not None:
            sock.close()
        print(f"error: {err}", file=sys.stderr)
        return EXIT_SETUP
    except KeyboardInterrupt:
        if sock is not None:
            sock.close()
        print("stopped before the model was loaded", file=sys.stderr)
        return EXIT_OK
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    return serve(args, parser, checkpoint, sock)


def serve(args, parser, checkpoint, sock: socket.socket) -> int:
    import uvicorn

    from schp.service.app import Settings, create_app

    settings = Settings(max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, max_queue=args.max_queue,
                        max_bytes=args.max_bytes, max_pixels=args.max_pixels, token=args.token,
                        logits=args.logits, checkpoint_name=checkpoint.name,
                        drain_timeout=args.drain_timeout)
    app = create_app(parser, settings)
    service = app.state.service

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):  # SIGTERM / Ctrl-C: /healthz says draining from now on
            service.draining = True
            super().handle_exit(sig, frame)

    config = uvicorn.Config(app, log_level=args.log_level, timeout_graceful_shutdown=args.drain_timeout,
                            lifespan="on", server_header=False)
    # uvicorn raises a caught stop signal again once it has shut down; with these no-op handlers in
    # place that re-raise ends nothing, and the process exits 0 (a clean, drained stop).
    previous = {s: signal.signal(s, lambda signum, frame: None) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        Server(config).run(sockets=[sock])
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        sock.close()
    if not service.batcher.close(timeout=1):
        print("warning: the model was still busy after --drain-timeout", file=sys.stderr)
    print("stopped", file=sys.stderr)
    return EXIT_OK
