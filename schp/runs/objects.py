"""Inputs and outputs named by URL (s3://, gs://, az://, any fsspec file system) for the Ray engine.

A folder URL is listed once (one paginated listing, not a request per object), and its images are
told apart from the other files by the same extension rule as a local folder. Output existence for
skip-and-resume is read from one listing of the output URL, so planning a run of a million inputs
costs a thousand listing pages, not a million HEAD requests. An object is written with one whole
upload (`put_file`): object stores show an object only once its upload has completed, so a reader
never sees part of one, and a killed writer leaves nothing behind. Imports nothing heavy: fsspec
only when a URL is opened.
"""
import re
from pathlib import PurePosixPath
from typing import Dict, List, Optional, Set, Tuple

URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def is_url(text) -> bool:
    """A URL of a file system other than the local one (file:// is the local file system)."""
    return bool(text) and bool(URL.match(str(text))) and not str(text).lower().startswith("file://")


def local_path(text) -> str:
    """file:///a/b -> /a/b; anything else unchanged."""
    text = str(text)
    return text[len("file://"):] if text.lower().startswith("file://") else text


def open_url(url: str):
    """(file system, path inside it) of a URL, through fsspec; SetupError naming a missing package."""
    from schp.errors import SetupError
    try:
        import fsspec
    except ImportError:
        raise SetupError("URLs need the Python package fsspec (pip install -r requirements-ray.txt)") from None
    try:
        return fsspec.core.url_to_fs(url)
    except ImportError as err:  # e.g. s3:// without s3fs: fsspec names the package in its message
        raise SetupError(f"{url}: {str(err).splitlines()[0]}") from None
    except ValueError as err:
        raise SetupError(f"{url}: {err}") from None


class Listing:
    """The keys (paths relative to the URL) that exist under a URL, read once; `exists(key)` answers
    from it."""

    def __init__(self, keys: Optional[Set[str]] = None):
        self.keys: Set[str] = set(keys or ())

    def exists(self, rel: str) -> bool:
        return rel in self.keys


class ObjectPath:
    """A path under a URL root, with the part of pathlib's interface that the planner uses (`/`,
    `name`, `parent`, `with_suffix`, `with_name`, `exists`); `str()` gives the full URL."""

    def __init__(self, root: str, rel: str = "", listing: Optional[Listing] = None):
        self.root, self.rel, self.listing = root.rstrip("/"), rel.strip("/"), listing

    def _at(self, rel: str) -> "ObjectPath":
        return ObjectPath(self.root, rel, self.listing)

    def __truediv__(self, other) -> "ObjectPath":
        return self._at(str(PurePosixPath(self.rel, str(other)) if self.rel else PurePosixPath(str(other))))

    @property
    def name(self) -> str:
        return PurePosixPath(self.rel).name

    @property
    def parent(self) -> "ObjectPath":
        parent = str(PurePosixPath(self.rel).parent)
        return self._at("" if parent == "." else parent)

    def with_suffix(self, suffix: str) -> "ObjectPath":
        return self._at(str(PurePosixPath(self.rel).with_suffix(suffix)))

    def with_name(self, name: str) -> "ObjectPath":
        return self._at(str(PurePosixPath(self.rel).with_name(name)))

    def exists(self) -> bool:
        return self.listing is not None and self.listing.exists(self.rel)

    def is_dir(self) -> bool:
        return False

    def __str__(self) -> str:
        return f"{self.root}/{self.rel}" if self.rel else self.root

    def __repr__(self) -> str:
        return f"ObjectPath({str(self)!r})"

    def __eq__(self, other) -> bool:
        return isinstance(other, ObjectPath) and str(self) == str(other)

    def __lt__(self, other) -> bool:
        return str(self) < str(other)

    def __hash__(self) -> int:
        return hash(str(self))


def list_keys(fs, root: str, recursive: bool = True) -> Dict[str, int]:
    """{key relative to root: size} of the objects under `root` (one paginated listing)."""
    from schp.errors import SetupError, describe_exception
    root = root.rstrip("/")
    try:
        found = fs.find(root, maxdepth=None if recursive else 1, detail=True, withdirs=False)
    except FileNotFoundError:
        return {}
    except Exception as err:  # credentials, a missing bucket, an endpoint that does not answer
        raise SetupError(f"cannot list {fs.unstrip_protocol(root)}: {describe_exception(err)}") from None
    keys = {}
    for path, info in found.items():
        if info.get("type", "file") != "file":
            continue
        path = path.rstrip("/")
        if path == root or not path.startswith(root + "/"):
            continue
        keys[path[len(root) + 1:]] = int(info.get("size") or 0)
    return keys


def list_url_images(url: str, recursive: bool = False,
                    exclude: Optional[str] = None) -> Tuple[List[PurePosixPath], List[PurePosixPath], Dict[str, int]]:
    """(images, others, sizes) under a folder URL, relative to it, sorted, as schp.data.listing does
    for a local folder: extensions in any case, subfolders only with `recursive`, hidden subfolders
    and the `exclude` URL (an output folder inside the input one) not walked."""
    from schp.data.decode import is_image_name

    fs, root = open_url(url)
    skip = None
    if exclude and is_url(exclude):
        _, out_root = open_url(exclude)
        out_root = out_root.rstrip("/")
        if out_root.startswith(root.rstrip("/") + "/"):
            skip = out_root[len(root.rstrip("/")) + 1:] + "/"
    sizes = list_keys(fs, root, recursive)
    images, others = [], []
    for rel in sorted(sizes):
        parts = rel.split("/")
        if any(p.startswith(".") for p in parts[:-1]) or (skip and rel.startswith(skip)):
            continue
        (images if is_image_name(parts[-1]) else others).append(PurePosixPath(rel))
    return images, others, sizes


def output_listing(url: str) -> Listing:
    fs, root = open_url(url)
    return Listing(set(list_keys(fs, root, recursive=True)))
