"""The FastAPI app: /healthz, /v1/labels, /v1/parse, the page at /, OpenAPI at /docs.

Every map comes from HumanParser.parse (through the batcher) on pixels decoded by the extractor's
own reader, and is encoded as the extractor writes it, so a PNG from /v1/parse is byte for byte the
PNG the command line writes for the same file and options. Limits are checked as early as they can
be: the token before the body, the body's size from Content-Length and then while it streams, the
pixel count from the image header before decoding.
"""
import asyncio
import base64
import hmac
import io
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartParser
from starlette.requests import ClientDisconnect

from schp.data.decode import ImageError, ImageTooLarge, decode_image
from schp.errors import describe_exception
from schp.service import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS
from schp.service.batcher import Batcher, Closed, QueueFull

log = logging.getLogger("schp.service")
STATIC = Path(__file__).resolve().parent / "static"
OUTPUTS = ("png", "overlay", "json", "npy")
MEDIA = {"png": "image/png", "overlay": "image/jpeg", "json": "application/json", "npy": "application/octet-stream"}


@dataclass
class Settings:
    """What the app needs besides the parser; the command line's options of the same names."""
    max_batch: int = 4
    max_wait_ms: float = 10.0
    max_queue: int = 32
    max_bytes: int = DEFAULT_MAX_BYTES
    max_pixels: int = DEFAULT_MAX_PIXELS  # 0 = no limit
    token: Optional[str] = None
    logits: bool = False  # ?output=npy allowed
    checkpoint_name: str = ""
    drain_timeout: float = 30.0  # at shutdown, how long the model may take for the queued images


class HTTPError(Exception):
    def __init__(self, status: int, detail: str, headers: Optional[dict] = None):
        super().__init__(detail)
        self.status, self.detail, self.headers = status, detail, headers or {}


def label_png(labels: np.ndarray, palette) -> bytes:
    """The palette PNG utils.outputs.save_label_png writes, as bytes (the same encoder and settings)."""
    from PIL import Image
    from schp.utils.outputs import PNG_COMPRESS_LEVEL

    image = Image.fromarray(np.ascontiguousarray(labels, dtype=np.uint8))
    image.putpalette(list(palette))
    out = io.BytesIO()
    image.save(out, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return out.getvalue()


def overlay_jpeg(image_bgr: np.ndarray, labels: np.ndarray, palette) -> bytes:
    """The JPEG utils.outputs.save_overlay writes (--overlay), as bytes."""
    import cv2
    from schp.utils.outputs import blend_overlay

    ok, data = cv2.imencode(".jpg", blend_overlay(image_bgr, labels, palette), [cv2.IMWRITE_JPEG_QUALITY, 90])
    if not ok:
        raise RuntimeError("cannot encode the overlay as JPEG")
    return data.tobytes()


def class_table(labels: np.ndarray, names) -> list:
    """Per present class: index, name, pixel count and box [left, top, right, bottom) in pixels."""
    counts = np.bincount(labels.ravel(), minlength=len(names))
    table = []
    for index in np.flatnonzero(counts):
        mask = labels == index
        rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
        table.append({"index": int(index), "name": names[index], "pixels": int(counts[index]),
                      "box": [int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1]})
    return table


def npy_bytes(logits: np.ndarray) -> bytes:
    out = io.BytesIO()
    np.save(out, logits)
    return out.getvalue()


class Service:
    """The parser, its batcher and the settings: the state the routes share."""

    def __init__(self, parser, settings: Settings):
        from schp.utils.palette import class_colors, get_palette

        self.parser, self.settings, self.spec = parser, settings, parser.spec
        self.palette = get_palette(self.spec.num_classes)
        self.colors = class_colors(self.spec.num_classes)
        from schp.service.engine import batch_invariant_parse
        self.batcher = Batcher(batch_invariant_parse(parser), settings.max_batch, settings.max_wait_ms, settings.max_queue)
        self.draining = False

    def labels_json(self) -> dict:
        return {"dataset": self.spec.name, "num_classes": self.spec.num_classes,
                "labels": [{"index": i, "name": name, "rgb": list(rgb), "color": "#%02x%02x%02x" % tuple(rgb)}
                           for i, (name, rgb) in enumerate(zip(self.spec.labels, self.colors))]}

    def check_token(self, request: Request) -> None:
        token = self.settings.token
        if not token:
            return
        given = request.headers.get("authorization", "")
        scheme, _, value = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip().encode(), token.encode()):
            raise HTTPError(401, "missing or wrong token: send 'Authorization: Bearer <token>'",
                            {"WWW-Authenticate": "Bearer"})

    async def read_body(self, request: Request) -> bytes:
        """The whole body, refused (413) as soon as it is known to exceed max_bytes."""
        limit = self.settings.max_bytes
        too_big = f"the body is larger than --max-bytes {limit}"
        length = request.headers.get("content-length")
        if length is not None:
            if not length.strip().isdigit():
                raise HTTPError(400, f"Content-Length {length!r} is not a number")
            if int(length) > limit:
                raise HTTPError(413, f"{too_big} (Content-Length {int(length)})")
        chunks, total = [], 0
        try:
            async for chunk in request.stream():
                total += len(chunk)
                if total > limit:
                    raise HTTPError(413, too_big)
                chunks.append(chunk)
        except ClientDisconnect:  # nobody to answer; nothing was queued
            raise HTTPError(400, "the client disconnected before the end of its body") from None
        return b"".join(chunks)

    async def image_bytes(self, request: Request) -> bytes:
        """The image: the raw body, or the `image` field of a multipart/form-data body."""
        body = await self.read_body(request)
        if not request.headers.get("content-type", "").lower().startswith("multipart/form-data"):
            return body

        async def stream():
            yield body

        parser = MultiPartParser(request.headers, stream(), max_files=1, max_fields=16)
        try:
            form = await parser.parse()
        except Exception as err:  # starlette's MultiPartException and python-multipart's own errors
            raise HTTPError(400, f"malformed multipart body: {err}") from None
        try:
            field = form.get("image")
            if not isinstance(field, UploadFile):
                raise HTTPError(400, "a multipart body needs the image in a file field named 'image'")
            return await field.read()
        finally:
            await form.close()

    def decode(self, data: bytes) -> np.ndarray:
        try:
            return decode_image(data, self.settings.max_pixels or None)
        except ImageTooLarge as err:
            raise HTTPError(413, str(err)) from None
        except ImageError as err:
            raise HTTPError(422, str(err)) from None
        except MemoryError:
            raise HTTPError(413, "out of memory while decoding") from None

    def encode(self, output: str, image: np.ndarray, result) -> bytes:
        labels, logits = result if isinstance(result, tuple) else (result, None)
        if output == "png":
            return label_png(labels, self.palette)
        if output == "overlay":
            return overlay_jpeg(image, labels, self.palette)
        if output == "npy":
            return npy_bytes(logits)
        import json
        body = {"dataset": self.spec.name, "width": int(labels.shape[1]), "height": int(labels.shape[0]),
                "labels": list(self.spec.labels), "classes": class_table(labels, self.spec.labels),
                "png_base64": base64.b64encode(label_png(labels, self.palette)).decode("ascii")}
        return json.dumps(body).encode()

    async def parse(self, request: Request, output: str) -> Response:
        self.check_token(request)
        if output not in OUTPUTS:
            raise HTTPError(400, f"output={output}: expected one of {', '.join(OUTPUTS)}")
        if output == "npy" and not self.settings.logits:
            raise HTTPError(403, "output=npy (logits) is disabled: start the server with --logits")
        try:
            self.batcher.check_room()  # a full queue refuses before the body is read and decoded
            data = await self.image_bytes(request)
            image = await run_in_threadpool(self.decode, data)
            del data
            future = self.batcher.submit(image, with_logits=output == "npy")
        except QueueFull as err:
            raise HTTPError(503, str(err), {"Retry-After": str(err.retry_after)}) from None
        except Closed as err:
            raise HTTPError(503, str(err), {"Retry-After": "5"}) from None
        try:
            result = await asyncio.wrap_future(future)
        except MemoryError:
            raise HTTPError(507, "out of memory while parsing this image") from None
        except Exception as err:  # this image alone (the batcher retries batch-mates one by one)
            raise HTTPError(500, f"inference failed: {describe_exception(err)}") from None
        body = await run_in_threadpool(self.encode, output, image, result)
        return Response(body, media_type=MEDIA[output])


PARSE_BODY = {"requestBody": {"required": True, "content": {
    "image/*": {"schema": {"type": "string", "format": "binary"}},
    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
    "multipart/form-data": {"schema": {"type": "object", "required": ["image"],
                                       "properties": {"image": {"type": "string", "format": "binary"}}}}}},
    "responses": {"200": {"description": "png: palette PNG (the command line's bytes); overlay: JPEG; json: "
                                         "classes with pixel counts and boxes, the map as PNG base64; npy: "
                                         "H x W x C float32 logits",
                          "content": {m: {} for m in ("image/png", "image/jpeg", "application/octet-stream")}},
                  "401": {"description": "missing or wrong token"}, "413": {"description": "body or image too large"},
                  "422": {"description": "not a decodable image (the command line's reason)"},
                  "503": {"description": "queue full (Retry-After) or shutting down"}}}


def create_app(parser, settings: Optional[Settings] = None) -> FastAPI:
    """The app over a loaded HumanParser; its batcher thread stops at the app's shutdown, after the
    last queued image is answered."""
    from contextlib import asynccontextmanager

    service = Service(parser, settings or Settings())

    @asynccontextmanager
    async def lifespan(app):
        yield
        service.draining = True
        await run_in_threadpool(service.batcher.close, service.settings.drain_timeout)

    app = FastAPI(title="SCHP human parsing", version="1", lifespan=lifespan,
                  description="Human parsing maps from one SCHP model in memory; the same maps as "
                              "simple_extractor.py. Send the token as 'Authorization: Bearer <token>' "
                              "when the server has one.")
    app.state.service = service

    @app.exception_handler(HTTPError)
    async def http_error(request: Request, err: HTTPError):
        # the body may be unread (a refusal before it): this connection takes no further request
        return JSONResponse({"detail": err.detail}, status_code=err.status,
                            headers={**err.headers, "Connection": "close"})

    @app.get("/healthz", summary="Liveness and queue state")
    async def healthz():
        b = service.batcher
        body = {"status": "draining" if service.draining else "ok", "dataset": service.spec.name,
                "checkpoint": service.settings.checkpoint_name, "device": str(parser.device),
                "backend": parser.backend,
                "backend_preparing": parser.background.backend if parser.background is not None else None,
                "queued": b.queued, "in_forward_pass": b.busy,
                "max_queue": b.max_queue, "max_batch": b.max_batch, "batches": b.batches, "images": b.images,
                "token_required": bool(service.settings.token), "logits": service.settings.logits}
        return JSONResponse(body, status_code=503 if service.draining else 200)

    @app.get("/v1/labels", summary="Class names and palette colours of the model")
    async def labels(request: Request):
        service.check_token(request)
        return service.labels_json()

    @app.post("/v1/parse", summary="Parse one image", openapi_extra=PARSE_BODY,
              response_class=Response)
    async def parse(request: Request, output: str = "png"):
        """Body: the image file itself (any Content-Type), or multipart/form-data with the file in `image`.
        `output`: png, overlay, json or npy (with --logits)."""
        return await service.parse(request, output)

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.get("/static/{name}", include_in_schema=False)
    async def static(name: str):
        path = STATIC / name
        if "/" in name or name.startswith(".") or not path.is_file():
            raise HTTPError(404, "not found")
        return FileResponse(path)

    return app
