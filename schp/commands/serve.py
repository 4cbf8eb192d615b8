"""`serve.py`: the parsing service on uvicorn. Options as the extractor's where they apply.

Exit codes: 0 after a clean stop (SIGTERM or Ctrl-C: requests in flight are answered, new ones
refused, then the process leaves within --drain-timeout), 2 usage or set-up error (one line
`error: ...`, before torch is imported for bad options).
"""
import argparse
import ipaddress
import signal
import socket
import sys
from typing import Optional, Sequence

from schp.commands import options
from schp.errors import EXIT_OK, EXIT_SETUP, SCHPError, SetupError
from schp.runs.loop import raise_keyboard_interrupt

SERVICE_PACKAGES = (("fastapi", "fastapi"), ("uvicorn", "uvicorn"), ("multipart", "python-multipart"))


def build_parser() -> argparse.ArgumentParser:
    from schp.service import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS
    p = options.CommandParser(prog="serve.py",
                              description="SCHP human parsing over HTTP: one model in memory, concurrent requests "
                                          "batched, the page at /, the API under /v1, OpenAPI at /docs.")
    options.add_dataset(p, "pascal", custom=True)
    options.add_model_restore(p)
    options.add_device(p)
    options.add_precision(p)
    options.add_backend(p)
    options.add_tta(p)
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
    args = options.parse(p, argv)
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
    """(HumanParser, checkpoint path) through the extractor's own loading path."""
    from schp.choices import parse_scales
    from schp.api import dataset_spec
    from schp.runs.extract import ExtractOptions, load_model

    spec = dataset_spec(args.dataset, args.model_restore)
    return load_model(ExtractOptions(dataset=args.dataset, checkpoint=args.model_restore, device=args.device,
                                     gpu=args.gpu, precision=args.precision, backend=args.backend,
                                     flip=args.flip, scales=parse_scales(args.multi_scales)), spec)


def main(argv: Optional[Sequence[str]] = None) -> int:
    try:
        args = parse_args(argv)
    except SystemExit as stop:  # --help, --version, a usage error: its exit code, for callers of main()
        return stop.code
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
    except SCHPError as err:
        if sock is not None:
            sock.close()
        print(f"error: {options.flag_message(err)}", file=sys.stderr)
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
