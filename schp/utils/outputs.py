"""Writing results so that no partial file ever carries a final name.

Every output is written to a hidden temporary name in its destination folder, flushed to disk, then
renamed; temporaries left by a killed run are recognised by name and removed once their process is gone.
The name holds the host as well as the process id: on storage shared by several machines, a process id
says nothing about another host's processes, so only this host's temporaries are ever removed.
"""
import os
import re
import socket
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, List, Sequence

import cv2
import numpy as np
from PIL import Image

TEMP_MARK = ".schp-tmp-"
TEMP_NAME = re.compile(r"^\..+" + re.escape(TEMP_MARK) + r"(?P<host>[A-Za-z0-9_-]+)-(?P<pid>\d+)(\.\w+)?$")
# IntegratedPIFu's loaders compare the parse maps against exactly these float32 codes (pascal labels).
INTEGRATEDPIFU_CODES = np.array([0.0, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0], dtype=np.float32)


def host_tag() -> str:
    """This machine's name as it appears in temporary names (characters other than A-Z a-z 0-9 _ -
    become _)."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname()) or "unknown-host"


def temp_path(final: Path) -> Path:
    """Hidden sibling of `final` naming this host and process; keeps the suffix so writers recognise
    the format."""
    return final.with_name(f".{final.stem}{TEMP_MARK}{host_tag()}-{os.getpid()}{final.suffix}")


@contextmanager
def atomic_path(final: Path) -> Iterator[Path]:
    """Yield a temporary path to write; on success it is fsynced and renamed to `final`, else removed."""
    tmp = temp_path(final)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, final)
    except OSError as err:
        if not err.filename:  # some writers (memmap, PIL) raise without naming the file
            err.filename = str(final)
        raise
    finally:
        if tmp.exists():
            tmp.unlink()


def check_writable(folder: Path) -> None:
    """Create `folder` if needed and prove a file can be written there (OSError if not)."""
    folder.mkdir(parents=True, exist_ok=True)
    probe = temp_path(folder / "write-probe")
    probe.write_bytes(b"")
    probe.unlink()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(folder: Path) -> List[Path]:
    """Delete temporaries in `folder` written on this host by a process that no longer runs (a crash or
    kill -9). Other hosts' temporaries are left alone: their processes cannot be checked from here."""
    removed = []
    host = host_tag()
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        match = TEMP_NAME.match(entry.name)
        if match and match.group("host") == host and entry.is_file(follow_symlinks=False) \
                and not _pid_alive(int(match.group("pid"))):
            try:
                os.unlink(entry.path)
                removed.append(Path(entry.path))
            except OSError:
                pass
    return removed


# zlib level of the label PNGs: the same pixels as PIL's default (6) in about half the encoding time, for
# about 16% more bytes (4.5 against 8.3 ms, 34 against 29 KB for a 1024 x 1024 map; benchmarks/throughput.py
# --limits measures it)
PNG_COMPRESS_LEVEL = 3


def save_label_png(labels: np.ndarray, palette: Sequence[int], path: Path) -> None:
    """H x W uint8 class indices -> mode 'P' PNG with the dataset palette, atomically."""
    image = Image.fromarray(np.ascontiguousarray(labels, dtype=np.uint8))
    image.putpalette(list(palette))  # turns the 'L' image into 'P', as the original did
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG", compress_level=PNG_COMPRESS_LEVEL)


def save_npy(array: np.ndarray, path: Path) -> None:
    with atomic_path(path) as tmp:
        np.save(tmp, array)


@contextmanager
def npy_memmap(path: Path, shape, dtype=np.float32) -> Iterator[np.ndarray]:
    """A writable memory-mapped .npy to fill in place (bounded memory for any size), atomically.

    The file's blocks are reserved before any page is written: pages of a sparse file that find the
    disk full fail with SIGBUS, which kills the process; reserved, a full disk is an ENOSPC here.
    """
    with atomic_path(path) as tmp:
        array = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=tuple(shape))
        try:
            with open(tmp, "rb+") as f:
                size = os.fstat(f.fileno()).st_size
                if size:
                    os.posix_fallocate(f.fileno(), 0, size)
            yield array
            array.flush()
        finally:
            del array


def integratedpifu_codes(labels: np.ndarray) -> np.ndarray:
    """H x W pascal labels -> H x W float32 codes 0, 0.5, ..., 1.0 read by IntegratedPIFu."""
    return INTEGRATEDPIFU_CODES[labels]


def colorize_bgr(labels: np.ndarray, palette: Sequence[int]) -> np.ndarray:
    """H x W x 3 uint8 BGR picture of a label map in the palette's colours."""
    colors = np.array(palette, dtype=np.uint8).reshape(-1, 3)[:, ::-1]  # RGB palette -> BGR
    return colors[labels]


def blend_overlay(image_bgr: np.ndarray, labels: np.ndarray, palette: Sequence[int],
                  alpha: float = 0.5) -> np.ndarray:
    """The colour map blended over a BGR image, background pixels left as they are."""
    blended = cv2.addWeighted(image_bgr, 1.0 - alpha, colorize_bgr(labels, palette), alpha, 0.0)
    blended[labels == 0] = image_bgr[labels == 0]
    return blended


def save_overlay(image_bgr: np.ndarray, labels: np.ndarray, palette: Sequence[int], path: Path,
                 alpha: float = 0.5) -> None:
    """JPEG of the colour map blended over the image (background pixels left as they are)."""
    blended = blend_overlay(image_bgr, labels, palette, alpha)
    ok, data = cv2.imencode(".jpg", blended, [cv2.IMWRITE_JPEG_QUALITY, 90])
    if not ok:
        raise OSError(f"cannot encode {path.name} as JPEG")
    with atomic_path(path) as tmp:
        tmp.write_bytes(data.tobytes())
