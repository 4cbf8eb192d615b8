"""Who runs the network: PyTorch itself, or ONNX Runtime / OpenVINO on a file exported on the fly.

Everything around the network (decoding, crop, normalisation, test-time augmentation, upsampling,
inverse warp) stays the one pipeline of schp.inference; a runner only replaces the call
`fusion = network(x)`. The ONNX file is exported once per checkpoint content, dataset and input size
into the checkpoint cache (dynamic batch and H x W, so the test-time scales need no more exports),
verified like `export.py` does, and written atomically.
"""
from __future__ import annotations

import hashlib
import logging
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Dict, Iterator, Optional, Sequence

import numpy as np

from schp.choices import BACKENDS, DEFAULT_BACKEND  # noqa: F401  (re-exported)
from schp.data.catalog import DatasetSpec
from schp.errors import ParameterError
from schp.utils.cpu import avx2_without_avx512, native_bf16

if TYPE_CHECKING:  # torch is imported where it is used: `--help` and `--legend` stay quick
    import torch

# Part of the cached export's name: raised whenever the network's graph changes (same maps, other
# operations), so that a cache filled by an older version is exported anew instead of reused.
# 2: convolutions over upsampled maps computed at the maps' own size (networks.ce2p).
# 3: the file takes the input size only (any batch), unless the job needs other sizes (test-time scales).
GRAPH_REVISION = 3
# "auto" on the CPU: the first installed one of these for the precision, fastest first as measured
# end to end by benchmarks/throughput.py (docs/performance.md). ONNX Runtime has no bf16 convolution; bf16
# is taken off torch only on CPUs with bf16 units (elsewhere OpenVINO would compute in fp32 anyway).
AUTO_ORDER = {"fp32": ("openvino", "onnxruntime", "torch"), "bf16": ("openvino", "torch")}
# x86 CPUs with AVX2 and no AVX-512: there ONNX Runtime ran ahead of OpenVINO in fp32 (an AMD EPYC of
# family 25: 11 of 12 end-to-end rounds, median 0.92 x OpenVINO's time), where AVX-512 CPUs put it behind
AUTO_ORDER_AVX2 = {"fp32": ("onnxruntime", "openvino", "torch")}
# "auto" takes a runtime only for a job that repays its one-time costs (forward passes = crops x flips x
# scales; None = not known, e.g. a service: long); a shorter job runs on torch, so its first map comes as
# early as torch's. Measured on the idle 2-core development machine (benchmarks/throughput.py --first-map,
# which prints the break-even of the machine it runs on): the export costs about 31 s and OpenVINO then
# saves 0.24 s per image, a break-even of 132 images; loading and compiling a cached file costs about 3 s
# more than torch's start, a break-even of about 12 images.
AUTO_EXPORT_MIN_FORWARDS = {"fp32": 150, "bf16": 150}  # the file is not cached yet: export first
AUTO_CACHED_MIN_FORWARDS = 20  # the file is cached
# ...and times the other installed runtime against the first only for a job this long (or of unknown
# length). The trial costs the second runtime's load and compile (0.7-1.8 s of CPU for a 512 x 512
# pascal file, benchmarks/runtime_file.py) and two turns on the slower one; picking the faster saves
# 0.07-0.09 s per forward pass on the AVX2 development VM, and only where the table's order is wrong
# for this CPU: a break-even of 11-29 forward passes then, doubled as the table is often right
AUTO_TRIAL_MIN_FORWARDS = 50
PACKAGES = {"onnxruntime": ("onnxruntime", "onnxscript"), "openvino": ("openvino", "onnxscript")}
log = logging.getLogger(__name__)


class BackendError(ParameterError):
    """A backend that cannot run here (missing package, unsupported device or precision): one sentence,
    about the parameter `backend` where it is the backend's own limit (a set-up error, and a ValueError)."""


def missing_packages(backend: str, import_them: bool = True):
    """The packages `backend` needs that cannot be imported here. Without `import_them` they are only
    looked up (openvino alone takes about a second to import, which 'auto' would add to a torch job's
    first map; a package found but broken then fails where the runtime is loaded, and auto stays on torch)."""
    import importlib
    import importlib.util
    import sys

    missing = []
    for package in PACKAGES.get(backend, ()):
        try:
            if import_them:
                importlib.import_module(package)
            elif sys.modules.get(package, ...) is None or importlib.util.find_spec(package) is None:
                missing.append(package)
        except (ImportError, ValueError):
            missing.append(package)
    return missing


def resolve_backend(name: str, device: torch.device, precision: str = "fp32",
                    flags: Optional[frozenset] = None) -> str:
    """The concrete backend for `name` ('auto' or one of BACKENDS); BackendError if it cannot run here.

    For 'auto' this is the fastest installed runtime for the device and precision (AUTO_ORDER; `flags`:
    the CPU's, default this machine's), before the cache question of `network_runner`."""
    if name == "auto":
        if device.type != "cpu" or precision not in AUTO_ORDER:
            return "torch"
        if precision == "bf16" and not native_bf16(flags):
            return "torch"  # emulated bf16: the precision's own warning says fp32 is faster
        return next(b for b in auto_order(precision, flags)
                    if b == "torch" or not missing_packages(b, import_them=False))
    if name not in BACKENDS:
        raise BackendError(f"unknown (one of auto, {', '.join(BACKENDS)})", "backend", name)
    if name == "torch":
        return name
    missing = missing_packages(name)
    if missing:
        raise BackendError(f"needs the package '{missing[0]}', which is not installed "
                           "(pip install -r requirements-runtimes.txt)", "backend", name)
    if device.type != "cpu":
        raise BackendError(f"runs on the CPU only; use the torch backend on {device}", "backend", name)
    allowed = ("fp32", "bf16") if name == "openvino" else ("fp32",)
    if precision not in allowed:
        raise BackendError(f"supports the precision {' or '.join(allowed)}, not {precision}", "backend", name)
    return name


def auto_order(precision: str, flags: Optional[frozenset] = None) -> tuple:
    """The backends 'auto' tries on the CPU for `precision`, fastest first on a CPU with `flags` (default
    this machine's; unknown flags: the AVX-512 order, the one measured first)."""
    if avx2_without_avx512(flags):
        return AUTO_ORDER_AVX2.get(precision, AUTO_ORDER[precision])
    return AUTO_ORDER[precision]


def state_dict_digest(state_dict: Dict[str, torch.Tensor]) -> str:
    """Content hash of a checkpoint's tensors (names, shapes, values): the cache key of its exports."""
    import torch

    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}|".encode())
        digest.update(tensor.view(torch.uint8).numpy().data if tensor.numel() else b"")
    return digest.hexdigest()[:20]


def needs_any_size(scales: Sequence[float]) -> bool:
    """Whether a job with these test-time `scales` runs the network on crops of other sizes than the input
    size, and so needs the runtimes' file that takes any size (`export_path`)."""
    return tuple(float(s) for s in scales) != (1.0,)


def export_path(spec: DatasetSpec, state_dict: Dict[str, torch.Tensor], cache_dir: Optional[Path],
                digest: Optional[str] = None, any_size: bool = False) -> Optional[Path]:
    """Where the cache keeps this checkpoint's ONNX export (whether or not it is there yet); None when
    the cache is disabled. `digest`: the state dict's `state_dict_digest`, where already computed (it
    reads every weight: about 0.3 s of one core). `any_size`: the file that takes any crop size (for
    test-time scales) instead of the input size only (see `export_for_runtimes`)."""
    import torch
    from schp.checkpoint import default_cache_dir
    from schp.export import DEFAULT_OPSET

    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if cache_dir is None:
        return None
    h, w = spec.input_size
    digest = digest or state_dict_digest(state_dict)
    size = f"{h}x{w}" + ("-anysize" if any_size else "")
    return cache_dir / "exports" / (f"{spec.name}-{size}-{digest}-g{GRAPH_REVISION}"
                                    f"-opset{DEFAULT_OPSET}-torch{torch.__version__.split('+')[0]}.onnx")


@contextmanager
def runtime_file(spec: DatasetSpec, state_dict: Dict[str, torch.Tensor], cache_dir: Optional[Path],
                 digest: Optional[str] = None, any_size: bool = False) -> Iterator[Path]:
    """Where a runtime finds this checkpoint's export, present or not: the cache's file, or, with the cache
    disabled (SCHP_CACHE_DIR=''), one in a temporary folder removed on leaving (every run then exports)."""
    path = export_path(spec, state_dict, cache_dir, digest, any_size)
    if path is not None:
        yield path
        return
    temporary = Path(tempfile.mkdtemp(prefix="schp-export-"))
    try:
        yield export_path(spec, state_dict, temporary, digest, any_size)
    finally:
        shutil.rmtree(temporary, ignore_errors=True)


def cached_onnx(spec: DatasetSpec, state_dict: Dict[str, torch.Tensor], cache_dir: Optional[Path],
                quiet: bool = False, any_size: bool = False) -> Path:
    """The verified raw ONNX export of this checkpoint for the runtimes, exported on first use."""
    path = export_path(spec, state_dict, cache_dir, any_size=any_size)
    if path is None:
        raise BackendError("the checkpoint cache is disabled (SCHP_CACHE_DIR is empty)")
    return exported(spec, state_dict, path, quiet, any_size)


def exported(spec: DatasetSpec, state_dict: Dict[str, torch.Tensor], path: Path, quiet: bool = False,
             any_size: bool = False) -> Path:
    """`path`, after exporting the checkpoint there unless it is already."""
    if not path.is_file():
        if not quiet:
            log.info("exporting the %s network to %s (once per checkpoint; takes a while)", spec.name, path)
        export_for_runtimes(spec, state_dict, path, any_size)
    return path


def export_for_runtimes(spec: DatasetSpec, state_dict: Dict[str, torch.Tensor], path: Path,
                        any_size: bool = False) -> None:
    """Export and verify the raw ONNX file the runtimes load to `path`, atomically: any batch size, and
    the input size only unless `any_size`, which a job with test-time scales needs. A fixed height and
    width export in 0.73-0.93 x the time (torch's exporter reasons about every symbolic size) and run
    2-4% faster in ONNX Runtime, whose graph optimiser folds what the sizes fix; OpenVINO compiles
    each input shape anyway (benchmarks/runtime_file.py)."""
    from schp.export import DEFAULT_OPSET, ExportError, export

    try:
        export(spec, state_dict, path, "onnx", DEFAULT_OPSET, dynamic_batch=True, dynamic_size=any_size)
    except ExportError as err:
        raise BackendError(str(err)) from None
    except OSError as err:
        raise BackendError(f"cannot write the exported network to {path.parent}: {err.strerror or err}") from None


def onnxruntime_options(threads: Optional[int] = None):
    """The ONNX Runtime session options of `--backend onnxruntime` (`threads`: default torch's), for its
    runner and for whatever measures that runner (benchmarks/onnxruntime_profile.py)."""
    import onnxruntime as ort
    import torch

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return options


class OnnxRuntimeRunner:
    """fusion logits of normalised crops, by ONNX Runtime's CPU provider on the raw ONNX export."""

    def __init__(self, path: Path, threads: Optional[int] = None):
        import onnxruntime as ort
        from schp.export import INPUT_NAME

        self.session = ort.InferenceSession(str(path), onnxruntime_options(threads),
                                            providers=["CPUExecutionProvider"])
        self.input_name = INPUT_NAME

    def prepare(self, shape) -> None:
        """Nothing to do per input shape: the session takes any."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        import torch

        x = np.ascontiguousarray(x.detach().float().cpu().numpy())
        return torch.from_numpy(self.session.run(["fusion"], {self.input_name: x})[0])


class OpenVinoRunner:
    """fusion logits by OpenVINO's CPU plugin on the raw ONNX export, compiled once per input shape.

    The precision hint is set explicitly: on CPUs with bf16 units OpenVINO would otherwise compute in
    bf16 by default, which changes the maps.
    """

    def __init__(self, path: Path, precision: str = "fp32", threads: Optional[int] = None):
        import openvino as ov
        import torch

        self.core = ov.Core()
        self.model = self.core.read_model(str(path))
        self.config = {"INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" else "f32",
                       "INFERENCE_NUM_THREADS": int(threads or torch.get_num_threads()),
                       "PERFORMANCE_HINT": "LATENCY"}
        self.compiled = {}

    def _compiled(self, shape):
        if shape not in self.compiled:
            model = self.model.clone()
            model.reshape({model.inputs[0].any_name: list(shape)})
            compiled = self.core.compile_model(model, "CPU", self.config)
            self.compiled[shape] = (compiled.create_infer_request(), compiled.output("fusion"))
        return self.compiled[shape]

    def prepare(self, shape) -> None:
        """Compile for input `shape` now (otherwise the first call of that shape does)."""
        self._compiled(tuple(shape))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        import torch

        x = np.ascontiguousarray(x.detach().float().cpu().numpy())
        request, output = self._compiled(tuple(x.shape))
        request.infer({0: x})
        return torch.from_numpy(np.array(request.get_tensor(output).data, copy=True))


def network_runner(name: str, device: torch.device, spec: DatasetSpec, state_dict: Dict[str, torch.Tensor],
                   precision: str = "fp32", cache_dir: Optional[Path] = None, quiet: bool = False,
                   forwards: Optional[int] = None, digest: Optional[str] = None, any_size: bool = False):
    """(backend name, runner or None for torch, runtime to prepare beside torch or None) for `--backend name`.

    An explicit backend that cannot run raises BackendError, and is made ready before this returns.
    'auto' never waits for a runtime: it runs torch, and for a job long enough to repay the runtime's
    one-time costs (`forwards`, the forward passes it will make; None = unknown, taken as long) also
    names the runtime to prepare beside it (a `RuntimePlan` for schp.background_runtime), which the
    parser switches to. `digest`: the state dict's `state_dict_digest`, where the caller computed it.
    `any_size`: the job runs the network on crops of other sizes than the input size (test-time scales).
    """
    backend = resolve_backend(name, device, precision)
    if backend == "torch":
        return backend, None, None
    if name == "auto":
        # the other installed runtimes, timed against the first; a job too short to repay that trial
        # keeps the table's first
        trial = forwards is None or forwards >= AUTO_TRIAL_MIN_FORWARDS
        rivals = tuple(b for b in auto_order(precision) if b not in ("torch", backend)
                       and not missing_packages(b, import_them=False)) if trial else ()
        plan = RuntimePlan(backend, digest, rivals, any_size)
        if not export_repays(spec, state_dict, precision, cache_dir, forwards, plan):
            log.info("running the network with torch: %s forward passes do not repay %s's set-up (from %d, or %d "
                     "with its file cached)", forwards, backend, AUTO_EXPORT_MIN_FORWARDS[precision],
                     AUTO_CACHED_MIN_FORWARDS)
            return "torch", None, None
        return "torch", None, plan
    return backend, make_runner(backend, spec, state_dict, precision, cache_dir, quiet, digest, any_size), None


class RuntimePlan:
    """The runtime 'auto' prepares beside torch, the checkpoint's digest once computed (so the background
    does not read every weight again to find the file), and the other installed runtimes for the
    precision (`rivals`), prepared too and timed against it on the job's own forward passes (the table
    of `auto_order` was measured on a few CPUs; this CPU may rank them otherwise). `any_size`: whether
    they load the file that takes any crop size (`export_path`)."""

    def __init__(self, backend: str, digest: Optional[str] = None, rivals: tuple = (), any_size: bool = False):
        self.backend, self.digest, self.rivals, self.any_size = backend, digest, tuple(rivals), any_size

    @property
    def backends(self) -> tuple:
        return (self.backend,) + self.rivals

    def __repr__(self) -> str:
        return (f"RuntimePlan({self.backend!r}, digest={self.digest!r}, rivals={self.rivals!r}, "
                f"any_size={self.any_size!r})")


def export_repays(spec: DatasetSpec, state_dict: Dict[str, torch.Tensor], precision: str,
                  cache_dir: Optional[Path], forwards: Optional[int], plan: Optional[RuntimePlan] = None) -> bool:
    """Whether 'auto' should use a runtime backend: the job is long enough that the runtime saves more
    than its one-time costs (the export unless cached, and loading the file). Where the checkpoint's
    digest had to be computed for the answer, it is kept in `plan`."""
    if forwards is None or forwards >= AUTO_EXPORT_MIN_FORWARDS.get(precision, 0):
        return True
    if forwards < AUTO_CACHED_MIN_FORWARDS:
        return False
    digest = (plan.digest if plan is not None else None) or state_dict_digest(state_dict)
    if plan is not None:
        plan.digest = digest
    path = export_path(spec, state_dict, cache_dir, digest, plan is not None and plan.any_size)
    return path is not None and path.is_file()


def load_runner(backend: str, path: Path, precision: str = "fp32", threads: Optional[int] = None):
    """The runner of `backend` on the exported file at `path` (`threads`: default torch's)."""
    if backend == "onnxruntime":
        return OnnxRuntimeRunner(path, threads)
    if backend == "openvino":
        return OpenVinoRunner(path, precision, threads)
    raise BackendError(f"no runner for backend {backend!r}")


def make_runner(backend: str, spec: DatasetSpec, state_dict: Dict[str, torch.Tensor], precision: str = "fp32",
                cache_dir: Optional[Path] = None, quiet: bool = False, digest: Optional[str] = None,
                any_size: bool = False):
    """A callable N x 3 x h x w float32 -> N x C x h/4 x w/4 float32 fusion logits, for a non-torch backend
    (h x w the input size, or any with `any_size`).

    With the cache disabled (SCHP_CACHE_DIR='') the file is exported to a temporary folder, loaded, and
    removed: every run then pays the export. `digest`: the state dict's `state_dict_digest`, where known.
    """
    if backend not in ("onnxruntime", "openvino"):
        raise BackendError(f"no runner for backend {backend!r}")
    with runtime_file(spec, state_dict, cache_dir, digest, any_size) as path:
        return load_runner(backend, exported(spec, state_dict, path, quiet, any_size), precision)
