"""Bad and edge-case image files, made on demand in a folder (pytest's ``tmp_path``); nothing binary is committed.

Every ``make_*`` function writes one case and returns its path; ``make_mixed_folder`` writes them all
into one folder and returns ``{file name: "ok" | "fail" | "not-an-image"}``. The pixels come from
``tests/data/group.jpg`` shrunk to 64x48, so each file is a few KB and cheap to parse.

Findings (OpenCV 4.14.0: libjpeg-turbo 3.1.2, libpng 1.6.58, libwebp, libtiff 4.7.1; Linux).
"imread" is ``cv2.imread(str(p), cv2.IMREAD_COLOR)``, "imdecode" is
``cv2.imdecode(np.fromfile(p, np.uint8), cv2.IMREAD_COLOR)``.

* The two agree, pixel for pixel, on every readable file here, EXIF orientation included: imdecode
  applies EXIF Orientation 3/6/8 exactly as imread does (stored 64x48, Orientation 6 -> shape
  (64, 48, 3), equal to ``cv2.rotate(stored, ROTATE_90_CLOCKWISE)``). Only ``IMREAD_IGNORE_ORIENTATION``
  or ``IMREAD_UNCHANGED`` skip it.
* They DISAGREE on truncated JPEGs. imread reads files through libjpeg's stdio source, which on early
  EOF prints the warning "Premature end of JPEG file" on stderr, inserts a fake EOI and returns the full
  size image with the missing rows grey/smeared: no error, no None. This holds for every cut point
  after the last SOS header (baseline and progressive alike, even when only the final 0xD9 byte is
  missing). Cuts inside the headers give None. imdecode reads from memory and returns None for EVERY
  truncation point (checked cut by cut). So an imread-based extractor needs its own check; an
  imdecode-based one already fails these files.
* Proposed check (``jpeg_is_truncated``): the file starts with SOI 0xFFD8 and the last EOI 0xFFD9 comes
  after the last SOS 0xFFDA. It is cheap: two ``bytes.rfind`` calls on data you must read anyway.
  It is reliable because inside entropy-coded data a 0xFF byte is always followed by 0x00 (byte
  stuffing) or a marker, so 0xFFD9 after the last scan can only be the real EOI. Checked on
  baseline, progressive (10 scans), grey, CMYK, restart markers, ICC profile, EXIF with an embedded
  JPEG thumbnail (the thumbnail's SOS/EOI sit before the main SOS, so they do not matter) and trailing
  bytes after EOI: no false alarm on any valid file. Every cut point at which imread still returns an
  image is flagged. Blind spot: trailing data after EOI that contains 0xFFDA, as in an Android motion
  photo (``make_motion_photo_jpg``: an MP4 appended after the EOI) or an appended second JPEG (MPF):
  the byte search calls those truncated although imread and imdecode decode them fine. Only a walk of
  the primary image's marker structure up to its EOI (``jpeg_primary_end``) tells them apart.
* Truncated PNG: imread and imdecode both return None at every cut point, even when only the last
  byte of the IEND CRC is missing (libpng reports an error; imdecode also logs "PNG input buffer is
  incomplete"). Nothing to add.
* Zero-byte files, HTML in ``.jpg``, text in ``.png``: None from both, no exception. OpenCV picks the
  decoder from the file's first bytes, never from its extension, so a real PNG named ``.jpg`` decodes.
  ``np.fromfile`` on a zero-byte file gives an empty array, and ``cv2.imdecode`` of an empty buffer
  raises ``cv2.error`` (``!buf.empty()``) instead of returning None: guard for it or catch it.
* Depth and channels, IMREAD_COLOR: grey, grey+alpha and palette PNGs (with or without tRNS) and grey
  JPEGs come back as 3 equal channels (BGR of the palette colour). Alpha is dropped without
  compositing: an RGBA pixel with alpha 0 keeps its RGB. 16-bit PNGs (RGB and grey) come back as
  uint8 equal to ``v >> 8`` (low byte dropped, no rounding). A CMYK JPEG (Adobe, inverted, as Pillow
  writes it) decodes to BGR close to the RGB it came from (mean abs error ~1.5 levels here).
* Sizes: 1x1, 1x37 and 37x1 PNGs decode normally. Note for the pipeline: for a 1x1 image the SPEC's box
  is (0, 0, 0, 0), so the affine scale is 0 and ``k = (in_w-1)/scale[0]`` divides by zero; 1xN and Nx1
  are fine (the aspect fix-up makes the scale non-zero). The corpus still expects "ok" for 1x1.
* Names: paths with spaces and non-ASCII (``my photo é 人.jpg``) work with both on Linux (cv2 takes
  UTF-8). ``.JPG``, ``.jpeg``, ``.webp``, ``.bmp``, ``.tif`` all decode.
* Symlinks: both follow a link to a good file. A dangling link and a link loop give None from imread
  (with a warning); ``np.fromfile`` raises FileNotFoundError / OSError(ELOOP). Careful when listing:
  ``Path.is_file()`` and ``Path.exists()`` are False for both (Python swallows ELOOP), so a listing that
  filters with them silently drops these files instead of reporting them; ``os.listdir`` /
  ``Path.iterdir`` do list them.
"""
from __future__ import annotations

import functools
import io
import os
import struct
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

GROUP_JPG = Path(__file__).resolve().parent / "data" / "group.jpg"
SIZE = (64, 48)  # (w, h) of the base image: non-square, so a rotation shows in the shape
EXIF_ORIENTATION_TAG = 0x0112
# What an EXIF orientation means for the stored pixels (as cv2.imread applies it).
EXIF_ROTATION = {3: cv2.ROTATE_180, 6: cv2.ROTATE_90_CLOCKWISE, 8: cv2.ROTATE_90_COUNTERCLOCKWISE}
# Sub-folder entries made by make_mixed_folder, for a recursive mode; top-level "sub" is ignored.
MIXED_SUB_ENTRIES = {"sub/inner.jpg": "ok"}


# ---------------------------------------------------------------- helpers

@functools.lru_cache(maxsize=None)
def _base_bgr(w: int = SIZE[0], h: int = SIZE[1]) -> np.ndarray:
    src = cv2.imread(str(GROUP_JPG), cv2.IMREAD_COLOR)
    if src is None:
        raise FileNotFoundError(GROUP_JPG)
    return cv2.resize(src, (w, h), interpolation=cv2.INTER_AREA)


def base_bgr(w: int = SIZE[0], h: int = SIZE[1]) -> np.ndarray:
    """The photo shrunk to ``h x w x 3`` uint8 BGR (a fresh copy)."""
    return _base_bgr(w, h).copy()


def _base_rgb_image(w: int = SIZE[0], h: int = SIZE[1]) -> Image.Image:
    return Image.fromarray(np.ascontiguousarray(_base_bgr(w, h)[:, :, ::-1]))


def _jpeg_bytes(img: Image.Image, **save_args) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", **save_args)
    return buf.getvalue()


def imread_reference(path: Path) -> np.ndarray | None:
    """What ``cv2.imread(path, IMREAD_COLOR)`` gives: the reference decoding (EXIF orientation applied)."""
    return cv2.imread(str(path), cv2.IMREAD_COLOR)


def imdecode_reference(path: Path) -> np.ndarray | None:
    """``cv2.imdecode`` of the file's bytes, IMREAD_COLOR; None if unreadable or empty (no exception)."""
    try:
        buf = np.fromfile(str(path), np.uint8)
    except OSError:
        return None
    if buf.size == 0:
        return None  # cv2.imdecode raises on an empty buffer
    return cv2.imdecode(buf, cv2.IMREAD_COLOR)


def stored_pixels(path: Path) -> np.ndarray | None:
    """The pixels as stored, EXIF orientation NOT applied (``IMREAD_COLOR | IMREAD_IGNORE_ORIENTATION``)."""
    return cv2.imread(str(path), cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)


def apply_exif_orientation(stored: np.ndarray, orientation: int) -> np.ndarray:
    """Rotate stored pixels the way EXIF ``orientation`` (1, 3, 6 or 8) asks."""
    if orientation == 1:
        return stored
    return cv2.rotate(stored, EXIF_ROTATION[orientation])


def jpeg_is_truncated(data: bytes) -> bool:
    """True if JPEG ``data`` lacks its end: no SOS marker, or no EOI after the last SOS.

    Cheap check for the case where ``cv2.imread`` silently returns a partial image (see the module
    docstring). Inside entropy-coded data 0xFF is always followed by 0x00 or a marker, so an 0xFFD9
    after the last 0xFFDA is the real end of image. Only meaningful for data starting with 0xFFD8.
    """
    last_sos = data.rfind(b"\xff\xda")
    return last_sos < 0 or data.rfind(b"\xff\xd9") < last_sos


def jpeg_primary_end(data: bytes) -> int | None:
    """Offset just after the EOI of the primary image of JPEG ``data``, or None if the data ends first.

    Walks the segments by their lengths; after each SOS, the entropy-coded data runs to the first
    0xFF followed by neither 0x00 (stuffing), 0xD0-0xD7 (restart) nor 0xFF (fill). Independent of the
    project's reader; written from the JPEG standard (ITU T.81, annex B).
    """
    pos = 2
    while pos < len(data):
        if data[pos] != 0xFF:
            pos += 1
            continue
        while pos < len(data) and data[pos] == 0xFF:
            pos += 1
        if pos >= len(data):
            return None
        marker = data[pos]
        pos += 1
        if marker == 0xD9:
            return pos
        if 0xD0 <= marker <= 0xD7 or marker in (0x01, 0xD8):
            continue
        if pos + 2 > len(data):
            return None
        pos += int.from_bytes(data[pos:pos + 2], "big")
        if pos > len(data):
            return None
        if marker == 0xDA:
            while True:
                pos = data.find(b"\xff", pos)
                if pos < 0 or pos + 1 >= len(data):
                    return None
                if data[pos + 1] == 0 or 0xD0 <= data[pos + 1] <= 0xD7:
                    pos += 2
                elif data[pos + 1] == 0xFF:
                    pos += 1
                else:
                    break
    return None


def _exif_with_thumbnail(orientation: int, thumbnail: bytes) -> bytes:
    """Raw APP1 payload: IFD0 with Orientation, IFD1 pointing at an embedded JPEG thumbnail."""
    # little-endian TIFF: header (8) | IFD0: 1 entry (2+12+4) | IFD1: 3 entries (2+36+4) | thumbnail
    ifd0 = 8
    ifd1 = ifd0 + 2 + 12 + 4
    thumb_at = ifd1 + 2 + 3 * 12 + 4
    tiff = b"II*\x00" + struct.pack("<I", ifd0)
    tiff += struct.pack("<H", 1) + struct.pack("<HHIHH", EXIF_ORIENTATION_TAG, 3, 1, orientation, 0)
    tiff += struct.pack("<I", ifd1)
    tiff += struct.pack("<H", 3)
    tiff += struct.pack("<HHIHH", 0x0103, 3, 1, 6, 0)  # Compression = 6 (JPEG)
    tiff += struct.pack("<HHII", 0x0201, 4, 1, thumb_at)  # JPEGInterchangeFormat
    tiff += struct.pack("<HHII", 0x0202, 4, 1, len(thumbnail))  # JPEGInterchangeFormatLength
    tiff += struct.pack("<I", 0)
    assert len(tiff) == thumb_at
    return b"Exif\x00\x00" + tiff + thumbnail


# ---------------------------------------------------------------- broken files ("fail")

def make_empty_jpg(folder: Path, name: str = "empty.jpg") -> Path:
    """Zero bytes. imread: None. imdecode: None, but ``cv2.imdecode`` of the empty array from
    ``np.fromfile`` RAISES cv2.error (``!buf.empty()``) rather than returning None. Expected: fail."""
    p = Path(folder) / name
    p.write_bytes(b"")
    return p


def make_truncated_jpg(folder: Path, name: str = "truncated.jpg") -> Path:
    """A valid 64x48 baseline JPEG cut at half its bytes (inside the scan data).
    imread: a (48, 64, 3) image, bottom part grey, plus "Premature end of JPEG file" on stderr, no error.
    imdecode: None. They disagree; ``jpeg_is_truncated`` flags it. Expected: fail."""
    data = _jpeg_bytes(_base_rgb_image(), quality=90)
    p = Path(folder) / name
    p.write_bytes(data[: len(data) // 2])
    return p


def make_truncated_png(folder: Path, name: str = "truncated.png") -> Path:
    """A valid 64x48 RGB PNG cut at half its bytes. imread: None; imdecode: None (both at every cut
    point, even with only the last CRC byte missing). Expected: fail."""
    data = cv2.imencode(".png", base_bgr())[1].tobytes()
    p = Path(folder) / name
    p.write_bytes(data[: len(data) // 2])
    return p


def make_html_as_jpg(folder: Path, name: str = "page.jpg") -> Path:
    """An HTML page saved as .jpg (a typical failed download). imread: None; imdecode: None. Expected: fail."""
    p = Path(folder) / name
    p.write_text("<!DOCTYPE html>\n<html><head><title>404 Not Found</title></head>\n"
                 "<body><h1>Not Found</h1></body></html>\n", encoding="utf-8")
    return p


def make_text_as_png(folder: Path, name: str = "data.png") -> Path:
    """CSV text saved as .png. imread: None; imdecode: None. Expected: fail."""
    p = Path(folder) / name
    p.write_text("x,y,label\n1,2,head\n3,4,torso\n", encoding="utf-8")
    return p


# ---------------------------------------------------------------- PNG variants ("ok")

def make_grey_png(folder: Path, name: str = "grey.png") -> Path:
    """8-bit grey PNG (mode L). imread/imdecode: (48, 64, 3), three equal channels, agree."""
    p = Path(folder) / name
    _base_rgb_image().convert("L").save(p)
    return p


def make_grey_alpha_png(folder: Path, name: str = "grey_alpha.png") -> Path:
    """Grey + alpha PNG (mode LA, alpha a left-to-right ramp 0..255). imread/imdecode: (48, 64, 3),
    three equal channels = the grey values, alpha dropped without compositing; agree."""
    p = Path(folder) / name
    grey = _base_rgb_image().convert("L")
    alpha = Image.fromarray(np.tile(np.linspace(0, 255, SIZE[0]).astype(np.uint8), (SIZE[1], 1)))
    Image.merge("LA", (grey, alpha)).save(p)
    return p


def make_palette_png(folder: Path, name: str = "palette.png") -> Path:
    """Palette PNG (mode P, 16 colours). imread/imdecode: (48, 64, 3) BGR of the palette colours; agree."""
    p = Path(folder) / name
    _base_rgb_image().quantize(colors=16).save(p)
    return p


def make_palette_trns_png(folder: Path, name: str = "palette_trns.png") -> Path:
    """Palette PNG whose colour index 0 is fully transparent (tRNS chunk). imread/imdecode:
    (48, 64, 3), transparent entries keep their palette colour (no compositing); agree."""
    p = Path(folder) / name
    _base_rgb_image().quantize(colors=16).save(p, transparency=0)
    return p


def make_rgba_png(folder: Path, name: str = "rgba.png") -> Path:
    """RGBA PNG, alpha 0 on the left half, 255 on the right. imread/imdecode: (48, 64, 3) equal to the
    RGB (as BGR) everywhere, including under alpha 0: alpha dropped, not composited; agree."""
    p = Path(folder) / name
    bgra = cv2.cvtColor(base_bgr(), cv2.COLOR_BGR2BGRA)
    bgra[:, : SIZE[0] // 2, 3] = 0
    cv2.imwrite(str(p), bgra)
    return p


def make_rgb16_png(folder: Path, name: str = "rgb16.png") -> Path:
    """16-bit RGB PNG (cv2.imwrite of uint16 = 8-bit values * 257 + a low-byte pattern).
    imread/imdecode: uint8 (48, 64, 3) equal to ``v16 >> 8`` (the 8-bit photo); agree."""
    p = Path(folder) / name
    cv2.imwrite(str(p), _sixteen_bit(base_bgr()))
    return p


def make_grey16_png(folder: Path, name: str = "grey16.png") -> Path:
    """16-bit grey PNG. imread/imdecode: uint8 (48, 64, 3), three equal channels = ``v16 >> 8``; agree."""
    p = Path(folder) / name
    cv2.imwrite(str(p), _sixteen_bit(cv2.cvtColor(base_bgr(), cv2.COLOR_BGR2GRAY)))
    return p


def _sixteen_bit(u8: np.ndarray) -> np.ndarray:
    # high byte = the photo; low byte = 0..255 varying, so that rounding (v/257) and >>8 differ
    low = (np.arange(u8.size, dtype=np.uint32) * 37 % 256).reshape(u8.shape)
    return (u8.astype(np.uint16) << 8 | low.astype(np.uint16)).astype(np.uint16)


def sixteen_bit_source(grey: bool = False) -> np.ndarray:
    """The uint16 array written by make_rgb16_png (or make_grey16_png with ``grey=True``)."""
    u8 = base_bgr()
    return _sixteen_bit(cv2.cvtColor(u8, cv2.COLOR_BGR2GRAY) if grey else u8)


def make_misnamed_png_as_jpg(folder: Path, name: str = "png_inside.jpg") -> Path:
    """A real PNG with a .jpg name. imread/imdecode: (48, 64, 3); OpenCV sniffs the signature,
    the extension does not matter; agree."""
    p = Path(folder) / name
    p.write_bytes(cv2.imencode(".png", base_bgr())[1].tobytes())
    return p


# ---------------------------------------------------------------- JPEG variants ("ok")

def make_good_jpg(folder: Path, name: str = "good.jpg") -> Path:
    """Plain baseline 64x48 JPEG, the reference good file. imread/imdecode: (48, 64, 3); agree."""
    p = Path(folder) / name
    _base_rgb_image().save(p, quality=90)
    return p


def make_grey_jpg(folder: Path, name: str = "grey.jpg") -> Path:
    """Single-component (grey) JPEG. imread/imdecode: (48, 64, 3), three equal channels; agree."""
    p = Path(folder) / name
    _base_rgb_image().convert("L").save(p, quality=90)
    return p


def make_cmyk_jpg(folder: Path, name: str = "cmyk.jpg") -> Path:
    """4-component CMYK JPEG as Pillow writes it (Adobe APP14, inverted values). imread/imdecode:
    (48, 64, 3) BGR, close to the source photo (mean abs diff ~1.5); agree."""
    p = Path(folder) / name
    _base_rgb_image().convert("CMYK").save(p, quality=95)
    return p


def make_progressive_jpg(folder: Path, name: str = "progressive.jpg") -> Path:
    """Progressive JPEG (several SOS scans). imread/imdecode: (48, 64, 3); agree."""
    p = Path(folder) / name
    _base_rgb_image().save(p, quality=90, progressive=True)
    return p


def make_restart_jpg(folder: Path, name: str = "restart.jpg") -> Path:
    """Baseline JPEG with restart markers (0xFFD0-0xFFD7 inside the scan) every MCU row.
    imread/imdecode: (48, 64, 3); agree."""
    p = Path(folder) / name
    _base_rgb_image().save(p, quality=90, restart_marker_rows=1)
    return p


def make_icc_jpg(folder: Path, name: str = "icc.jpg") -> Path:
    """JPEG with an sRGB ICC profile in APP2. OpenCV ignores the profile.
    imread/imdecode: (48, 64, 3); agree."""
    from PIL import ImageCms
    p = Path(folder) / name
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    _base_rgb_image().save(p, quality=90, icc_profile=icc)
    return p


def make_trailing_bytes_jpg(folder: Path, name: str = "trailing.jpg") -> Path:
    """Valid JPEG followed by 100 junk bytes after its EOI (as some cameras and editors leave).
    imread/imdecode: (48, 64, 3), junk ignored; agree. ``jpeg_is_truncated``: False."""
    p = Path(folder) / name
    p.write_bytes(_jpeg_bytes(_base_rgb_image(), quality=90) + bytes(range(100)))
    return p


def make_motion_photo_jpg(folder: Path, name: str = "motion.jpg") -> Path:
    """Android "motion photo" layout: a complete JPEG, then an MP4 (ftyp + mdat boxes) after its EOI.
    The video's bytes hold 0xFFDA and 0xFFD8 but no final 0xFFD9, so a byte search over the whole
    file (``jpeg_is_truncated``) calls it truncated. imread/imdecode: (48, 64, 3), the photo; agree.
    Expected: ok."""
    p = Path(folder) / name
    rng = np.random.default_rng(7)
    payload = bytearray(rng.integers(0, 256, 4000, dtype=np.uint8).tobytes().replace(b"\xff\xd9", b"\xff\x00"))
    payload[100:104] = b"\xff\xda\x00\x0c"  # looks like a start of scan
    payload[2000:2004] = b"\xff\xd8\xff\xe0"  # looks like another JPEG
    ftyp = struct.pack(">I", 24) + b"ftypmp42" + struct.pack(">I", 0) + b"isommp42"
    mdat = struct.pack(">I", 8 + len(payload)) + b"mdat" + bytes(payload)
    p.write_bytes(_jpeg_bytes(_base_rgb_image(), quality=90) + ftyp + mdat)
    return p


def make_wide_png(folder: Path, name: str = "wide_40000x8.png", width: int = 40000) -> Path:
    """40000 x 8 PNG: decodes, but a side >= 32767 makes OpenCV's warpAffine assert (SHRT_MAX).
    imread/imdecode: (8, 40000, 3); agree. Expected: fail (one line), never a crash."""
    p = Path(folder) / name
    cv2.imwrite(str(p), np.tile(base_bgr(64, 8), (1, width // 64 + 1, 1))[:, :width])
    return p


def make_png_header_bomb(folder: Path, name: str = "bomb_50000x50000.png", side: int = 50000) -> Path:
    """A 100-byte PNG whose IHDR declares ``side`` x ``side`` RGB pixels (7.5 GB decoded for 50000),
    followed by a tiny IDAT and IEND. Expected: fail before decoding (pixel limit)."""
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    p = Path(folder) / name
    p.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0))
                  + chunk(b"IDAT", zlib.compress(bytes(64))) + chunk(b"IEND", b""))
    return p


def make_exif_jpg(folder: Path, orientation: int, name: str | None = None) -> Path:
    """64x48 stored JPEG with EXIF Orientation ``orientation`` (Pillow's Exif). imread and imdecode
    both rotate it (identical pixels): 3 -> (48, 64, 3) turned 180 degrees; 6 -> (64, 48, 3) turned 90
    clockwise; 8 -> (64, 48, 3) turned 90 counter-clockwise. ``imread_reference`` gives that result,
    ``stored_pixels`` + ``apply_exif_orientation`` rebuild it."""
    p = Path(folder) / (name or f"exif_rot{orientation}.jpg")
    exif = Image.Exif()
    exif[EXIF_ORIENTATION_TAG] = orientation
    _base_rgb_image().save(p, quality=90, exif=exif.tobytes())
    return p


def make_exif_thumbnail_jpg(folder: Path, name: str = "exif_thumb.jpg", orientation: int = 6) -> Path:
    """Camera-like JPEG: EXIF with Orientation 6 in IFD0 and a 16x12 JPEG thumbnail in IFD1, so the
    file holds two SOI/SOS/EOI sets. imread/imdecode: (64, 48, 3), rotated, the main image (not the
    thumbnail); agree. ``jpeg_is_truncated``: False (the thumbnail's markers precede the main SOS)."""
    p = Path(folder) / name
    thumb = _jpeg_bytes(_base_rgb_image(16, 12), quality=75)
    _base_rgb_image().save(p, quality=90, exif=_exif_with_thumbnail(orientation, thumb))
    return p


# ---------------------------------------------------------------- sizes ("ok")

def make_1x1_png(folder: Path, name: str = "one_pixel.png") -> Path:
    """1x1 RGB PNG. imread/imdecode: (1, 1, 3); agree. The SPEC affine degenerates (scale 0)."""
    p = Path(folder) / name
    cv2.imwrite(str(p), base_bgr(1, 1))
    return p


def make_1xN_png(folder: Path, name: str = "tall_1x37.png", height: int = 37) -> Path:
    """1 pixel wide, 37 high. imread/imdecode: (37, 1, 3); agree."""
    p = Path(folder) / name
    cv2.imwrite(str(p), base_bgr(1, height))
    return p


def make_Nx1_png(folder: Path, name: str = "wide_37x1.png", width: int = 37) -> Path:
    """37 pixels wide, 1 high. imread/imdecode: (1, 37, 3); agree."""
    p = Path(folder) / name
    cv2.imwrite(str(p), base_bgr(width, 1))
    return p


# ---------------------------------------------------------------- names and formats ("ok")

def make_unicode_name_jpg(folder: Path, name: str = "my photo é 人.jpg") -> Path:
    """Spaces and non-ASCII in the name. imread (UTF-8 path) and imdecode: (48, 64, 3); agree."""
    p = Path(folder) / name
    p.write_bytes(_jpeg_bytes(_base_rgb_image(), quality=90))
    return p


def make_upper_ext_jpg(folder: Path, name: str = "SHOUT.JPG") -> Path:
    """Upper-case extension. imread/imdecode: (48, 64, 3); agree (the extension is never looked at)."""
    p = Path(folder) / name
    p.write_bytes(_jpeg_bytes(_base_rgb_image(), quality=90))
    return p


def make_jpeg_ext(folder: Path, name: str = "photo.jpeg") -> Path:
    """``.jpeg`` extension. imread/imdecode: (48, 64, 3); agree."""
    p = Path(folder) / name
    p.write_bytes(_jpeg_bytes(_base_rgb_image(), quality=90))
    return p


def make_webp(folder: Path, name: str = "photo.webp") -> Path:
    """Lossless WebP. imread/imdecode: (48, 64, 3), equal to the source pixels; agree."""
    p = Path(folder) / name
    cv2.imwrite(str(p), base_bgr(), [cv2.IMWRITE_WEBP_QUALITY, 101])  # > 100 = lossless
    return p


def make_bmp(folder: Path, name: str = "photo.bmp") -> Path:
    """24-bit BMP. imread/imdecode: (48, 64, 3), exact; agree."""
    p = Path(folder) / name
    cv2.imwrite(str(p), base_bgr())
    return p


def make_tif(folder: Path, name: str = "photo.tif") -> Path:
    """8-bit RGB TIFF. imread/imdecode: (48, 64, 3), exact; agree."""
    p = Path(folder) / name
    cv2.imwrite(str(p), base_bgr())
    return p


# ---------------------------------------------------------------- symlinks

def make_symlink_to_good(folder: Path, name: str = "link_to_good.jpg", target: str = "good.jpg") -> Path:
    """Relative symlink to a good JPEG (made if missing). imread/imdecode follow it: (48, 64, 3). ok."""
    folder = Path(folder)
    if not (folder / target).exists():
        make_good_jpg(folder, target)
    p = folder / name
    os.symlink(target, p)
    return p


def make_dangling_symlink(folder: Path, name: str = "gone.jpg") -> Path:
    """Symlink to a file that does not exist. imread: None (warning); np.fromfile: FileNotFoundError.
    ``Path.is_file()``/``exists()``: False (``is_symlink()``: True). Expected: fail."""
    p = Path(folder) / name
    os.symlink("no_such_file.jpg", p)
    return p


def make_symlink_loop(folder: Path, names: tuple[str, str] = ("loop_a.jpg", "loop_b.jpg")) -> Path:
    """``loop_a.jpg -> loop_b.jpg -> loop_a.jpg``; returns loop_a. imread: None; np.fromfile:
    OSError (ELOOP); ``Path.is_file()``/``exists()``: False. Both links expected: fail."""
    a, b = (Path(folder) / n for n in names)
    os.symlink(names[1], a)
    os.symlink(names[0], b)
    return a


# ---------------------------------------------------------------- not images

def make_notes_txt(folder: Path, name: str = "notes.txt") -> Path:
    """A text file without an image extension: must be skipped silently. Expected: not-an-image."""
    p = Path(folder) / name
    p.write_text("photos from the 2019 trip; parse them all\n", encoding="utf-8")
    return p


def make_subfolder(folder: Path, name: str = "sub") -> Path:
    """A sub-folder holding ``inner.jpg`` (a good JPEG); returns the folder. Folder mode is
    non-recursive, so ``sub`` is ignored at the top level (see MIXED_SUB_ENTRIES)."""
    sub = Path(folder) / name
    sub.mkdir()
    make_good_jpg(sub, "inner.jpg")
    return sub


# ---------------------------------------------------------------- all together

def make_valid_jpegs(folder: Path) -> list[Path]:
    """Every structurally valid JPEG flavour here (for checking ``jpeg_is_truncated`` has no false alarm)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    return [make_good_jpg(folder), make_grey_jpg(folder), make_cmyk_jpg(folder),
            make_progressive_jpg(folder), make_restart_jpg(folder), make_icc_jpg(folder),
            make_trailing_bytes_jpg(folder), make_exif_jpg(folder, 3), make_exif_jpg(folder, 6),
            make_exif_jpg(folder, 8), make_exif_thumbnail_jpg(folder)]


def make_mixed_folder(root: Path) -> dict[str, str]:
    """Fill ``root`` with every case; return ``{name relative to root: expected outcome}``.

    Outcomes: "ok" (decodes, gets a parsing map), "fail" (reported as a failure), "not-an-image"
    (skipped silently: ``notes.txt`` and the sub-folder ``sub``, whose own entries are listed in
    MIXED_SUB_ENTRIES for a recursive mode). Every file with an image extension is either "ok" or
    "fail". The image extensions assumed: .jpg .jpeg .png .bmp .tif .webp, in any case.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    expected: dict[str, str] = {}

    def add(path: Path, outcome: str) -> None:
        expected[path.relative_to(root).as_posix()] = outcome

    for make in (make_empty_jpg, make_truncated_jpg, make_truncated_png, make_html_as_jpg,
                 make_text_as_png, make_dangling_symlink):
        add(make(root), "fail")
    add(make_symlink_loop(root), "fail")
    expected["loop_b.jpg"] = "fail"

    for make in (make_good_jpg, make_grey_png, make_grey_alpha_png, make_palette_png,
                 make_palette_trns_png, make_rgba_png, make_rgb16_png, make_grey16_png,
                 make_misnamed_png_as_jpg, make_grey_jpg, make_cmyk_jpg, make_progressive_jpg,
                 make_restart_jpg, make_icc_jpg, make_trailing_bytes_jpg, make_exif_thumbnail_jpg,
                 make_1x1_png, make_1xN_png, make_Nx1_png, make_unicode_name_jpg,
                 make_upper_ext_jpg, make_jpeg_ext, make_webp, make_bmp, make_tif,
                 make_symlink_to_good):
        add(make(root), "ok")
    for orientation in (3, 6, 8):
        add(make_exif_jpg(root, orientation), "ok")

    add(make_notes_txt(root), "not-an-image")
    add(make_subfolder(root), "not-an-image")
    return expected
