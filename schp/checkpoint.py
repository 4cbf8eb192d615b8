"""Reading SCHP checkpoints safely, checking them against the network, and fetching the released ones.

Three separate steps: `read_state_dict` (never runs code from the file: weights_only=True, no
fallback), `check_state_dict` (one readable error for any key or shape mismatch), `download_checkpoint`
(gdown to a temporary name, verified, then renamed).
"""
import hashlib
import os
import pickle
import zipfile
from pathlib import Path
from typing import Dict, Mapping, Optional

import torch

from datasets.catalog import DATASETS, DatasetSpec, dataset_for_num_classes

PREFIX = "module."  # the released files were saved from nn.DataParallel
CLASSIFIER_KEY = "fushion.3.weight"


class CheckpointError(Exception):
    """A checkpoint that cannot be used; the message is one sentence for the user."""


def _load_error_reason(err: BaseException) -> str:
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


def read_state_dict(path: Path) -> Dict[str, torch.Tensor]:
    """Tensors of a checkpoint file, with any `module.` prefix stripped.

    Accepts the released container `{'state_dict': {...}, 'cycle_n': n}` or a bare state dict. Loads
    with weights_only=True (a pickle that would run code is refused, never retried unrestricted) and
    map_location='cpu' (the released storages are tagged cuda:0). Zip files are memory-mapped.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path}: no such file")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {path}: the file is empty (0 bytes)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=is_zip_checkpoint(path))
    except Exception as err:  # torch raises many types; every one means "unusable", said once
        raise CheckpointError(f"checkpoint {path}: {_load_error_reason(err)}") from None
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not obj or \
            not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        raise CheckpointError(f"checkpoint {path}: holds no state dict of tensors "
                              "(expected {'state_dict': {name: tensor}} or {name: tensor})")
    if all(k.startswith(PREFIX) for k in obj):
        obj = {k[len(PREFIX):]: v for k, v in obj.items()}
    return dict(obj)


def check_state_dict(state: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor],
                     spec: DatasetSpec, path: Path) -> None:
    """Raise one CheckpointError naming missing, unexpected and mis-shaped keys (first few of each)."""
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    misshaped = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(v.shape)}"
                 for k, v in expected.items() if k in state and state[k].shape != v.shape]
    if not (missing or unexpected or misshaped):
        return
    classifier = state.get(CLASSIFIER_KEY)
    if classifier is not None and classifier.dim() == 4 and classifier.shape[0] != spec.num_classes \
            and not missing and not unexpected:
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


def cached_zip_copy(path: Path, cache_dir: Optional[Path]) -> Path:
    """A memory-mappable zip copy of a legacy-format checkpoint, made once; else `path` itself.

    The released files use the pre-1.6 serialization, which cannot be memory-mapped; a converted copy
    in the cache makes later start-ups faster. Keyed by absolute path, size and mtime; any failure to
    write the cache just means no cache.
    """
    if cache_dir is None or is_zip_checkpoint(path):
        return path
    st = path.stat()
    key = hashlib.sha1(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    cached = cache_dir / f"{path.stem}-{key}.zip.pth"
    if cached.is_file():
        return cached
    tmp = cached.with_name(f".{cached.name}.{os.getpid()}.tmp")
    try:
        state = read_state_dict(path)
        cache_dir.mkdir(parents=True, exist_ok=True)
        torch.save(state, tmp)
        os.replace(tmp, cached)
        return cached
    except (OSError, RuntimeError):  # torch reports a failed write (disk full) as RuntimeError
        return path
    finally:  # also on Ctrl-C / SIGTERM (KeyboardInterrupt): no half-written copy stays behind
        if tmp.exists():
            tmp.unlink()


def default_cache_dir() -> Optional[Path]:
    """$SCHP_CACHE_DIR, else $XDG_CACHE_HOME/schp, else ~/.cache/schp; SCHP_CACHE_DIR='' disables."""
    if "SCHP_CACHE_DIR" in os.environ:
        value = os.environ["SCHP_CACHE_DIR"]
        return Path(value) if value else None
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "schp"


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
    if path.is_file():
        return path
    if allow_download and path.name == spec.checkpoint:
        return download_checkpoint(spec, path)
    raise CheckpointError(f"checkpoint {path}: no such file (the released {spec.name} checkpoint is "
                          f"{spec.checkpoint}, at {spec.url})")


