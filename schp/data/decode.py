"""Decoding an image file as the extractor does, with its checks: header first, then the pixels.

Decoding follows cv2.imread(IMREAD_COLOR) (8-bit BGR, grey and palette expanded, alpha dropped,
16-bit scaled down, EXIF orientation applied), as the original did; what it would silently accept
but is damaged (empty, truncated) is refused here with a reason instead. The pixel size is read from
the file's header before decoding, so an image too large to hold (or to warp) is refused unread.
"""
import io
import os
import stat
import struct
import threading
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Optional, Tuple

import cv2
import numpy as np

from schp.errors import SCHPError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
# Inputs with more pixels are refused before decoding (the decoded image alone takes 3 bytes a pixel).
DEFAULT_MAX_PIXELS = 200_000_000
# OpenCV's warps assert on a side >= SHRT_MAX (32767), for the source and for the destination.
MAX_SIDE = 32766
# The header is looked for in the first bytes (PNG, and every format Pillow sniffs); JPEG is walked.
HEADER_BYTES = 1 << 16
# No image file within the pixel limit is larger than this many bytes a pixel (16-bit RGBA is 8), plus
# 64 MiB of metadata or appended data (a motion photo's video): anything larger is refused unread.
MAX_BYTES_PER_PIXEL = 8
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Start-of-frame markers (they carry the image size): C0-CF except DHT (C4), JPG (C8), DAC (CC).
JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
JPEG_RST = frozenset(range(0xD0, 0xD8))
_PIL_LOCK = threading.Lock()


class ImageError(SCHPError):
    """An input that cannot be parsed; the message is the reason, for one line naming the file."""


class ImageTooLarge(ImageError):
    """An image refused for its size (--max-pixels, OpenCV's side limit): a service answers 413."""


def is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def jpeg_layout(data: bytes) -> Tuple[str, Optional[int], Optional[Tuple[int, int]]]:
    """(state, end, (width, height) or None) of the primary image of JPEG `data` (starting FF D8).

    Walks the marker segments, and the entropy-coded data after each SOS (where FF is followed by
    00 for a stuffed byte or D0-D7 for a restart marker), up to the primary image's EOI. `state` is
    "complete" (`end` = offset just after its EOI; anything after it, e.g. the video a motion photo
    appends, is not part of the image), "truncated" (the data ends first) or "malformed" (a segment
    length below 2: left to the decoder to judge).
    """
    n, i, size = len(data), 2, None
    while True:
        while i < n and data[i] != 0xFF:  # bytes between segments: skipped, as libjpeg does
            i += 1
        while i < n and data[i] == 0xFF:  # fill bytes before a marker
            i += 1
        if i >= n:
            return "truncated", None, size
        marker = data[i]
        i += 1
        if marker == 0xD9:
            return "complete", i, size
        if marker in JPEG_RST or marker in (0x01, 0xD8):  # markers without a length
            continue
        if i + 2 > n:
            return "truncated", None, size
        length = (data[i] << 8) | data[i + 1]
        if length < 2:
            return "malformed", None, size
        if i + length > n:
            return "truncated", None, size
        if marker in JPEG_SOF and size is None and length >= 7:
            height, width = struct.unpack(">HH", data[i + 3:i + 7])
            size = (width, height) if width and height else None  # height 0: given later (DNL)
        i += length
        if marker == 0xDA:  # entropy-coded data up to the next marker that is not RSTn
            while True:
                j = data.find(b"\xff", i)
                if j < 0 or j + 1 >= n:
                    return "truncated", None, size
                following = data[j + 1]
                if following == 0x00 or following in JPEG_RST:
                    i = j + 2
                elif following == 0xFF:
                    i = j + 1
                else:
                    i = j
                    break


def header_size(data: bytes) -> Optional[Tuple[int, int]]:
    """(width, height) declared by an image file's header, without decoding it; None if unknown.

    PNG: the IHDR chunk; JPEG: the first start-of-frame segment; other formats: Pillow, which reads
    only the header when opening.
    """
    if data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR" and len(data) >= 24:
        return struct.unpack(">II", data[16:24])
    if data[:2] == b"\xff\xd8":
        return jpeg_layout(data)[2]
    from PIL import Image
    with _PIL_LOCK:  # the bomb limit is module state; we apply our own
        limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                with Image.open(io.BytesIO(data)) as image:
                    return image.size
        except Exception:  # Pillow cannot read this header: the decoder will judge the file
            return None
        finally:
            Image.MAX_IMAGE_PIXELS = limit


def _jpeg_file_size(f) -> Optional[Tuple[int, int]]:
    """(width, height) of the first start-of-frame of a JPEG file open at offset 2, by seeking from
    segment to segment (a large EXIF block or ICC profile before it is skipped, not read)."""
    while True:
        byte = f.read(1)
        while byte and byte != b"\xff":
            byte = f.read(1)
        while byte == b"\xff":
            byte = f.read(1)
        if not byte:
            return None
        marker = byte[0]
        if marker in (0xD9, 0xDA):  # end of image, or the scan data: no frame header before it
            return None
        if marker in JPEG_RST or marker in (0x01, 0xD8):
            continue
        head = f.read(2)
        if len(head) < 2:
            return None
        length = (head[0] << 8) | head[1]
        if length < 2:
            return None
        if marker in JPEG_SOF:
            body = f.read(5)
            if len(body) < 5:
                return None
            height, width = struct.unpack(">HH", body[1:5])
            return (width, height) if width and height else None
        f.seek(length - 2, os.SEEK_CUR)


def file_header_size(path: Path) -> Optional[Tuple[int, int]]:
    """(width, height) an image file declares, read from its header alone (never the whole file);
    None if unknown. PNG: IHDR; JPEG: the first start-of-frame; others: Pillow's lazy open."""
    with open(path, "rb") as f:
        head = f.read(HEADER_BYTES)
        if head[:8] == PNG_SIGNATURE:
            return header_size(head[:32])
        if head[:2] == b"\xff\xd8":
            f.seek(2)
            return _jpeg_file_size(f)
    from PIL import Image
    with _PIL_LOCK:
        limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                with Image.open(path) as image:  # lazy: reads the header only
                    return image.size
        except Exception:
            return None
        finally:
            Image.MAX_IMAGE_PIXELS = limit


def check_image_file(path: Path, max_pixels: Optional[int] = DEFAULT_MAX_PIXELS) -> Optional[Tuple[int, int]]:
    """The size check every reader of an image, label or mask file applies before reading its pixels:
    ImageError if its header declares too many pixels (`max_pixels`; None or 0: no pixel limit) or a
    side beyond OpenCV's warp, or if the file is larger than any image of that limit could be (so a
    huge file is never read whole). Returns the declared (width, height), or None if unknown."""
    path = Path(path)
    try:
        bytes_ = path.stat().st_size
        size = file_header_size(path)
    except OSError as err:
        raise ImageError(f"cannot read: {err.strerror or err}") from None
    problem = size and size_problem(*size, max_pixels)
    if problem:
        raise ImageError(problem)
    problem = file_size_problem(bytes_, max_pixels)
    if problem:
        raise ImageError(problem)
    return size


def file_size_problem(bytes_: int, max_pixels: Optional[int]) -> Optional[str]:
    """Why a file of this many bytes is refused unread (larger than any image within `max_pixels`
    can be), or None; for files and for objects of a store alike."""
    if max_pixels and bytes_ > MAX_BYTES_PER_PIXEL * max_pixels + (64 << 20):
        return (f"file of {bytes_ / 2**30:.1f} GiB is larger than any image within --max-pixels "
                f"{max_pixels} can be; raise it to parse this file")
    return None


@contextmanager
def open_checked(path: Path, max_pixels: Optional[int] = DEFAULT_MAX_PIXELS):
    """A PIL image of a label or mask file, after the header-first size check; ImageError with the
    reason for anything Pillow refuses (its own bomb limit included), never its traceback."""
    from PIL import Image
    check_image_file(path, max_pixels)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(path)
    except Image.DecompressionBombError as err:
        raise ImageError(f"refused by Pillow's size limit ({err})") from None
    except (OSError, SyntaxError, ValueError) as err:
        raise ImageError(f"not a readable image ({err})") from None
    with image:
        yield image


def size_problem(width: int, height: int, max_pixels: Optional[int]) -> Optional[str]:
    """Why an image of this size is refused, or None."""
    if max_pixels and width * height > max_pixels:
        return (f"{width} x {height} pixels ({width * height / 1e6:.1f} megapixels) is above --max-pixels "
                f"{max_pixels}; raise it to parse this image")
    if max(width, height) > MAX_SIDE:
        return (f"{width} x {height} pixels: a side longer than {MAX_SIDE} pixels is beyond what OpenCV's "
                "warp can handle")
    return None


def read_image(path: Path, max_pixels: Optional[int] = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """H x W x 3 uint8 BGR pixels of an image file, or ImageError with the reason.

    An image declaring more than `max_pixels` pixels (None or 0: no limit) is refused from its header,
    before the file is read; an image with a side beyond OpenCV's warp limit is always refused.
    """
    path = Path(path)
    if path.is_symlink() and not path.exists():
        try:
            path.stat()
        except OSError as err:
            if getattr(err, "errno", None) == 40:  # ELOOP
                raise ImageError("symbolic link loop") from None
        raise ImageError(f"broken symbolic link (to {os.readlink(path)})") from None
    try:
        mode = path.stat().st_mode
        if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) or stat.S_ISSOCK(mode):  # /dev/zero would never end
            raise ImageError("not a regular file (a device or a socket)")
        if mode and stat.S_ISREG(mode):
            check_image_file(path, max_pixels)  # header first: a huge file is refused unread
        data = path.read_bytes()
    except OSError as err:
        raise ImageError(f"cannot read: {err.strerror or err}") from None
    return decode_image(data, max_pixels)


def decode_image(data: bytes, max_pixels: Optional[int] = None) -> np.ndarray:
    """read_image for the bytes of a file already in memory (a request body): the same checks and reasons."""
    if not data:
        raise ImageError("empty file (0 bytes)")
    size = None
    if data[:2] == b"\xff\xd8":
        state, end, size = jpeg_layout(data)
        if state == "truncated":
            # libjpeg decodes a cut JPEG with only a warning, grey-filling the rest: refuse it instead
            raise ImageError("truncated JPEG (the image data ends before its end-of-image marker)")
        if state == "complete":
            data = data[:end]  # trailing data (a motion photo's video, a preview) is not this image
    else:
        size = header_size(data)
    problem = size and size_problem(*size, max_pixels)
    if problem:
        raise ImageTooLarge(problem)
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if image is None:
        head = data[:16].split(b"\n")[0]
        raise ImageError(f"not a decodable image (damaged or another format; starts with {head!r})")
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8 or 0 in image.shape:
        raise ImageError(f"decoded to an unexpected array {image.shape} {image.dtype}")
    problem = size_problem(image.shape[1], image.shape[0], max_pixels)  # for headers we could not read
    if problem:
        raise ImageTooLarge(problem)
    return image
