"""Getting a model's weights, the one way: where they are, downloading, reading safely, checking, label facts.

`load_checkpoint` is what every front door and the trainer call: the default location
(default_checkpoint_dir), the download rule (only the dataset's released file name is fetched),
the safe read (`read_checkpoint_file`: never runs code from the file, weights_only=True, no fallback)
through the converted-zip cache, and one readable error for any key or shape mismatch with the
network. The trainer's files are written here too (`write_checkpoint`, with the label facts that
`spec_from_checkpoint` reads back), so what is written and what is read stay one format.
"""
import hashlib
import os
import pickle
import stat
import zipfile
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch

from schp.data.catalog import DatasetSpec, dataset_for_num_classes
from schp.errors import SetupError
from schp.networks import build_ce2p

PREFIX = "module."  # the released files were saved from nn.DataParallel
CLASSIFIER_KEY = "fushion.3.weight"
CLASSIFIER_HEADS = ("decoder.conv4.", "fushion.3.")  # the layers whose size is the class count


class CheckpointError(SetupError):
    """A checkpoint that cannot be used; the message is one sentence for the user."""


def _content_problem(path: Path) -> Optional[str]:
    """What a file that torch cannot load is, when its first bytes say it is no checkpoint at all.

    A browser or wget that meets Google Drive's warning page saves that page under the checkpoint's
    name; its pickle "opcodes" (`<` = 60) would otherwise read like a hostile file.
    """
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
    except OSError:
        return None
    if not head or head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":  # zip or a binary pickle
        return None
    text = head.lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if text.startswith((b"<!doctype html", b"<html", b"<head", b"<?xml", b"<!--")) or b"<html" in text[:1024]:
        return ("not a PyTorch checkpoint (it looks like an HTML page, such as the warning page Google Drive "
                "shows instead of a large file; download the file itself)")
    if b"\x00" not in head:
        try:
            head.decode("utf-8")
            return "not a PyTorch checkpoint (it is a text file)"
        except UnicodeDecodeError as err:
            if err.start >= len(head) - 3:  # a multi-byte character cut by the 4 KiB window
                return "not a PyTorch checkpoint (it is a text file)"
    return None


def _load_error_reason(err: BaseException, path: Optional[Path] = None) -> str:
    problem = _content_problem(path) if path is not None else None
    if problem:
        return problem
    text = str(err)
    for line in text.splitlines():
        if "unsupported global" in line.lower() or "unsupported operand" in line.lower():
            return ("refused: its pickle asks for code (" + line.strip().rstrip(".") +
                    "); nothing from it was executed")
    if isinstance(err, pickle.UnpicklingError) or "Weights only load failed" in text:
        return "refused: it holds objects other than tensors; nothing from it was executed"
    if isinstance(err, (EOFError, zipfile.BadZipFile)) or "failed finding central directory" in text \
            or "unexpected EOF" in text or "Ran out of input" in text:
        return "the file is truncated or not a PyTorch checkpoint"
    return f"not a readable PyTorch checkpoint ({text.splitlines()[0] if text else type(err).__name__})"


def is_zip_checkpoint(path: Path) -> bool:
    """True for today's zip serialization (memory-mappable), False for the legacy one of the releases."""
    return zipfile.is_zipfile(path)


def read_checkpoint_file(path: Path):
    """What a checkpoint file holds, read safely: weights_only=True (a pickle that would run code is
    refused, never retried unrestricted), map_location='cpu' (the released storages are tagged cuda:0),
    zip files memory-mapped. Raises CheckpointError with one sentence."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path}: no such file")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {path}: the file is empty (0 bytes)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=is_zip_checkpoint(path))
    except Exception as err:  # torch raises many types; every one means "unusable", said once
        raise CheckpointError(f"checkpoint {path}: {_load_error_reason(err, path)}") from None


def read_state_dict(path: Path) -> Dict[str, torch.Tensor]:
    """Tensors of a checkpoint file, with any `module.` prefix stripped.

    Accepts the released container `{'state_dict': {...}, 'cycle_n': n}` or a bare state dict, read
    by read_checkpoint_file.
    """
    obj = read_checkpoint_file(path)
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not obj or \
            not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        raise CheckpointError(f"checkpoint {path}: holds no state dict of tensors "
                              "(expected {'state_dict': {name: tensor}} or {name: tensor})")
    return strip_prefix(obj) if all(k.startswith(PREFIX) for k in obj) else dict(obj)


def strip_prefix(state: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The state dict without nn.DataParallel's `module.` in front of its keys."""
    return {k[len(PREFIX):] if k.startswith(PREFIX) else k: v for k, v in state.items()}


def expected_state(spec: DatasetSpec) -> Dict[str, torch.Tensor]:
    """The network's keys and shapes for `spec` (meta tensors: no memory, no initialisation)."""
    with torch.device("meta"):
        return build_ce2p(spec.num_classes).state_dict()


def check_state_dict(state: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor],
                     spec: DatasetSpec, path: Path, classes_may_differ: bool = False) -> None:
    """Raise one CheckpointError naming missing, unexpected and mis-shaped keys (first few of each).

    `classes_may_differ` (fine-tuning to another label set): the classifier heads may have another
    class count.
    """
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    misshaped = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(v.shape)}"
                 for k, v in expected.items() if k in state and state[k].shape != v.shape
                 and not (classes_may_differ and k.startswith(CLASSIFIER_HEADS))]
    if not (missing or unexpected or misshaped):
        return
    classifier = state.get(CLASSIFIER_KEY)
    if classifier is not None and classifier.dim() == 4 and classifier.shape[0] != spec.num_classes \
            and not missing and not unexpected and not classes_may_differ:
        n = classifier.shape[0]
        raise CheckpointError(
            f"checkpoint {path} has {n} classes, which looks like a {dataset_for_num_classes(n)} "
            f"checkpoint, but --dataset {spec.name} expects {spec.num_classes}; "
            "pass the matching --dataset")

    def first(items):
        return ", ".join(items[:3]) + (f" (+{len(items) - 3} more)" if len(items) > 3 else "")

    parts = [f"{len(items)} {what}: {first(items)}"
             for what, items in (("missing", missing), ("unexpected", unexpected),
                                 ("mis-shaped", misshaped)) if items]
    raise CheckpointError(f"checkpoint {path} is not a {spec.name} SCHP CE2P/ResNet-101 checkpoint: "
                          + "; ".join(parts))


CACHE_SUFFIX = ".zip.pth"
DEFAULT_CACHE_MAX_MIB = 2048  # three released checkpoints (255 MiB each) fit many times over


def cached_zip_copy(path: Path, cache_dir: Optional[Path],
                    check: Optional[Callable[[Dict[str, torch.Tensor]], None]] = None,
                    max_bytes: Optional[int] = None) -> Path:
    """A memory-mappable zip copy of a legacy-format checkpoint, made once; else `path` itself.

    The released files use the pre-1.6 serialization, which cannot be memory-mapped; a converted copy
    in the cache makes later start-ups faster. Keyed by absolute path, size and mtime. `check` sees
    the tensors before anything is written (a CheckpointError from it converts nothing). After a
    conversion the least recently used copies are evicted down to `max_bytes` (default: cache_size_cap()).
    Any failure to write the cache just means no cache.
    """
    if cache_dir is None or is_zip_checkpoint(path):
        return path
    st = path.stat()
    key = hashlib.sha1(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    cached = cache_dir / f"{path.stem}-{key}{CACHE_SUFFIX}"
    if cached.is_file():
        try:
            os.utime(cached)  # recency for the eviction order
        except OSError:
            pass
        return cached
    state = read_state_dict(path)
    if check is not None:
        check(state)
    tmp = cached.with_name(f".{cached.name}.{os.getpid()}.tmp")
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        torch.save(state, tmp)
        os.replace(tmp, cached)
    except (OSError, RuntimeError):  # torch reports a failed write (disk full) as RuntimeError
        return path
    finally:  # also on Ctrl-C / SIGTERM (KeyboardInterrupt): no half-written copy stays behind
        if tmp.exists():
            tmp.unlink()
    evict_cache(cache_dir, cache_size_cap() if max_bytes is None else max_bytes, keep=cached)
    return cached


def cache_size_cap() -> int:
    """Bytes the checkpoint cache may hold: $SCHP_CACHE_MAX_MIB (MiB), default 2048."""
    value = os.environ.get("SCHP_CACHE_MAX_MIB", "").strip()
    try:
        return int(float(value) * 2**20) if value else DEFAULT_CACHE_MAX_MIB * 2**20
    except ValueError:
        return DEFAULT_CACHE_MAX_MIB * 2**20


def evict_cache(cache_dir: Path, max_bytes: int, keep: Optional[Path] = None) -> List[Path]:
    """Delete the least recently used converted copies until the cache holds at most `max_bytes`.

    Recency is the file's mtime, which every use refreshes; `keep` (the copy in use) is never deleted.
    """
    entries = []
    try:
        for entry in os.scandir(cache_dir):
            if entry.name.endswith(CACHE_SUFFIX) and not entry.name.startswith(".") and entry.is_file():
                st = entry.stat()
                entries.append((st.st_mtime_ns, st.st_size, Path(entry.path)))
    except OSError:
        return []
    total = sum(size for _, size, _ in entries)
    removed = []
    for _, size, victim in sorted(entries):
        if total <= max_bytes:
            break
        if keep is not None and victim == keep:
            continue
        try:
            victim.unlink()
        except OSError:
            continue
        total -= size
        removed.append(victim)
    return removed


def default_cache_dir() -> Optional[Path]:
    """$SCHP_CACHE_DIR, else $XDG_CACHE_HOME/schp, else ~/.cache/schp; SCHP_CACHE_DIR='' disables."""
    if "SCHP_CACHE_DIR" in os.environ:
        value = os.environ["SCHP_CACHE_DIR"]
        return Path(value) if value else None
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "schp"


def default_checkpoint_dir() -> Path:
    """Where the released checkpoints are looked for and downloaded to when none is given.

    $SCHP_CHECKPOINT_DIR when set; else, running from a checkout (a checkpoints/ folder beside the
    package), the checkout's checkpoints/ as the original had it; else, installed,
    <user cache>/checkpoints (default_cache_dir's base, ~/.cache/schp).
    """
    if os.environ.get("SCHP_CHECKPOINT_DIR"):
        return Path(os.environ["SCHP_CHECKPOINT_DIR"])
    checkout = Path(__file__).resolve().parents[1]
    if checkout.name not in ("site-packages", "dist-packages") and (checkout / "checkpoints").is_dir():
        return checkout / "checkpoints"
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "schp" / "checkpoints"


def download_checkpoint(spec: DatasetSpec, path: Path, timeout: float = 30.0) -> Path:
    """Fetch the released checkpoint of `spec` from Google Drive to `path`.

    Downloads to a temporary name in the same folder, checks that it reads as a checkpoint, then
    renames; an interrupted or failed download leaves nothing under the final name.
    """
    import gdown  # only needed here

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.download-{os.getpid()}")
    help_text = (f"download it by hand from {spec.url} (or https://drive.google.com/file/d/"
                 f"{spec.drive_id}/view) and put it at {path}")
    try:
        try:
            gdown.download(id=spec.drive_id, output=str(tmp), quiet=False, timeout=timeout)
        except Exception as err:  # requests/gdown errors of every kind: report, do not crash
            import requests  # gdown's own dependency

            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
            if isinstance(err, requests.exceptions.ConnectionError):
                reason = "cannot reach drive.google.com: no network connection or a proxy refused it"
            raise CheckpointError(f"could not download the {spec.name} checkpoint ({reason[:200]}); "
                                  + help_text) from None
        if not tmp.is_file():
            raise CheckpointError(f"the {spec.name} checkpoint download produced no file; " + help_text)
        read_state_dict(tmp)  # raises CheckpointError if what arrived is not a checkpoint
        os.replace(tmp, path)
        return path
    finally:  # also on Ctrl-C / SIGTERM: ours, and gdown's own partial file (<tmp name>XXXXXXXX.part)
        for leftover in [tmp, *path.parent.glob(f"{tmp.name}*.part")]:
            if leftover.exists():
                leftover.unlink()


def resolve_checkpoint(path: Path, spec: DatasetSpec, allow_download: bool) -> Path:
    """`path` if it exists; else download it when it is the dataset's released file name."""
    path = Path(path)
    try:
        if stat.S_ISREG(path.stat().st_mode):
            return path
        raise CheckpointError(f"checkpoint {path}: not a file")
    except (FileNotFoundError, NotADirectoryError):
        pass
    except OSError as err:  # an unreadable folder on the way: say so, not "no such file"
        raise CheckpointError(f"checkpoint {path}: cannot be read ({err.strerror})") from None
    if allow_download and path.name == spec.checkpoint:
        return download_checkpoint(spec, path)
    raise CheckpointError(f"checkpoint {path}: no such file (the released {spec.name} checkpoint is "
                          f"{spec.checkpoint}, at {spec.url})")


_DEFAULT = object()


def load_checkpoint(spec: DatasetSpec, checkpoint: Optional[Union[str, Path]] = None, *,
                    allow_download: Optional[bool] = None, cache_dir=_DEFAULT,
                    classes_may_differ: bool = False) -> Tuple[Dict[str, torch.Tensor], Path]:
    """(state dict without `module.`, the path it was read from): the one way to get a model's weights.

    `checkpoint` None means the released file of `spec` in default_checkpoint_dir(). The download
    rule: a missing file is fetched only when it has the released file name (`allow_download` None;
    False never downloads). The file is read safely, checked against the network of `spec` (every key
    and shape; `classes_may_differ` lets the classifier heads have another class count) before
    anything is converted, then read through its converted zip copy in `cache_dir` (default:
    default_cache_dir(); None: no cache). Raises CheckpointError with one sentence.
    """
    path = Path(checkpoint) if checkpoint is not None else default_checkpoint_dir() / spec.checkpoint
    path = resolve_checkpoint(path, spec, path.name == spec.checkpoint if allow_download is None
                              else allow_download)
    expected = expected_state(spec)

    def check(state):  # before any conversion: a refused checkpoint is never converted or cached
        check_state_dict(state, expected, spec, path, classes_may_differ)

    cache = default_cache_dir() if cache_dir is _DEFAULT else cache_dir
    state = read_state_dict(cached_zip_copy(path, cache, check=check))
    check(state)
    return state, path


# ---------------------------------------------------------------- what train.py writes and reads back

def module_state(model: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """State dict in the released layout: `module.` keys, CPU tensors."""
    return {PREFIX + k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def label_facts(spec: DatasetSpec, flip_pairs: Sequence[Tuple[int, int]]) -> Dict:
    """Extra checkpoint keys that make a custom model usable without other files (read_label_facts)."""
    return {"dataset": spec.name, "labels": list(spec.labels), "input_size": list(spec.input_size),
            "flip_pairs": [list(p) for p in flip_pairs]}


def write_checkpoint(obj: Dict, path: Path) -> None:
    """A model checkpoint or training state, written to a temporary and renamed (never half a file).

    Written through a Python file, so a full disk is an OSError (ENOSPC, raised again as itself when
    torch's zip writer then fails on closing); given a path, torch's own writer reports it only as an
    opaque RuntimeError ("unexpected pos ..."). Stop signals (Ctrl-C, SIGTERM, SIGHUP) wait while the
    file is written: an interrupt raised inside torch's writer would reach its C++ code mid-record.
    One that arrived meanwhile is raised as KeyboardInterrupt once the file is complete."""
    from schp.runs.loop import stop_signals_held
    from schp.utils.outputs import atomic_path

    with stop_signals_held() as held:
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            try:
                torch.save(obj, f)
            except RuntimeError as err:
                cause = err.__context__
                while cause is not None and not isinstance(cause, OSError):
                    cause = cause.__context__
                if cause is None:
                    raise
                raise cause from None
    if held.received:
        raise KeyboardInterrupt


def write_model_checkpoint(path: Path, facts: Dict, **fields) -> None:
    """A released-style model checkpoint: `fields` (epoch or cycle_n, and state_dict from module_state)
    in the order given, then the label facts of label_facts()."""
    write_checkpoint({**fields, **facts}, path)


def write_training_state(path: Path, facts: Dict, *, epoch: int, cycle_n: int, model: torch.nn.Module,
                         schp_model: torch.nn.Module, optimizer, rng: Dict, seed: int, args: Dict) -> None:
    """What --resume continues from: both models, the optimizer, the random states, the seed and the
    command line, with the label facts (so it also loads as a model checkpoint)."""
    write_checkpoint({"epoch": epoch, "cycle_n": cycle_n, "state_dict": module_state(model),
                      "schp_state_dict": module_state(schp_model), "optimizer": optimizer.state_dict(),
                      "rng": rng, "seed": seed, "args": args, **facts}, path)


def read_training_file(path: Path) -> Dict:
    """A file train.py wrote (a training state, or a released-style model checkpoint), read safely;
    CheckpointError unless it holds a 'state_dict'."""
    obj = read_checkpoint_file(path)
    if not isinstance(obj, dict) or "state_dict" not in obj:
        raise CheckpointError(f"checkpoint {path}: not a training checkpoint (no 'state_dict')")
    return obj


# what write_training_state puts in a file and --resume needs, besides the label facts
TRAINING_STATE_KEYS = ("epoch", "cycle_n", "state_dict", "schp_state_dict", "optimizer", "rng", "seed")


def _tensors(value) -> bool:
    return isinstance(value, Mapping) and bool(value) and \
        all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in value.items())


def checkpoint_kind(obj) -> str:
    """What a checkpoint file's container holds, by its keys: 'training state' (everything --resume
    needs), 'model checkpoint' (weights only: a released file, checkpoint_N / schp_N_checkpoint, or a
    bare state dict), 'partial training state' (an optimizer or SCHP model, but not all of it), or
    'other'."""
    if isinstance(obj, Mapping) and all(k in obj for k in TRAINING_STATE_KEYS) and _tensors(obj["state_dict"]):
        return "training state"
    if _tensors(obj) or (isinstance(obj, Mapping) and _tensors(obj.get("state_dict"))
                         and not any(k in obj for k in ("optimizer", "schp_state_dict"))):
        return "model checkpoint"
    if isinstance(obj, Mapping) and _tensors(obj.get("state_dict")):
        return "partial training state"
    return "other"


def state_classes(obj: Mapping) -> Optional[int]:
    """The class count of a checkpoint container's model (its classifier), or None if it has none."""
    state = obj.get("state_dict", obj)
    weight = state.get(PREFIX + CLASSIFIER_KEY, state.get(CLASSIFIER_KEY)) if isinstance(state, Mapping) else None
    return int(weight.shape[0]) if isinstance(weight, torch.Tensor) and weight.dim() == 4 else None


def read_label_facts(path: Path) -> Optional[dict]:
    """The `labels`, `input_size` and `flip_pairs` a trained checkpoint carries (None for released files)."""
    obj = read_checkpoint_file(path)
    if not isinstance(obj, Mapping) or not all(k in obj for k in ("labels", "input_size")):
        return None
    return {"labels": list(obj["labels"]), "input_size": tuple(obj["input_size"]),
            "flip_pairs": tuple(tuple(p) for p in obj.get("flip_pairs", ()))}


def spec_from_checkpoint(path: Path) -> DatasetSpec:
    """The label set of a checkpoint trained with train.py (--dataset custom at inference)."""
    from schp.data.catalog import custom_spec

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path}: no such file")
    facts = read_label_facts(path)
    if facts is None:
        raise CheckpointError(f"checkpoint {path} carries no label set (labels, input_size): "
                              "the dataset 'custom' needs a checkpoint written by train.py")
    try:
        return custom_spec(len(facts["labels"]), facts["labels"], facts["input_size"], facts["flip_pairs"])
    except ValueError as err:
        raise CheckpointError(f"checkpoint {path}: {err}") from None
