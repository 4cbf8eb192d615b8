"""Export of the folded network to ONNX, TorchScript or a torch.export program, verified after writing.

The `raw` graph is the contract that pipelines re-hosting SCHP already call: one input `input.1`,
N x 3 x H x W float32 (BGR, normalised), outputs `parsing`, `fusion`, `edge` at 1/4 resolution in the
released order. The `labels` graph adds the extractor's network-side post-processing (upsampling to
the input size with align_corners=True, argmax) and returns N x H x W int64 crop-space labels.
Every file is written to a temporary name, run with its own runtime on a drawn figure's crop, compared
with PyTorch, and only then renamed into place.
"""
import contextlib
import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from schp.choices import DEFAULT_OPSET, FORMAT_PRECISIONS, FORMATS, OUTPUTS  # noqa: F401  (re-exported)
from schp.data.catalog import DatasetSpec
from schp.errors import SCHPError, SetupError
from schp.networks import folded_ce2p
from schp.utils.outputs import remove_stale_temporaries, temp_path

INPUT_NAME = "input.1"  # what the re-hosting pipelines feed
RAW_OUTPUT_NAMES = ("parsing", "fusion", "edge")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# Verification against PyTorch fp32: (max relative error of the fusion logits, least argmax agreement).
# Reduced precisions are approximate by nature (their maps differ from fp32 by more than 0.01% of the
# pixels): only their logits error is bounded; the agreement is printed.
TOLERANCES = {"fp32": (1e-4, 0.9999), "fp16": (5e-2, 0.0), "bf16": (5e-2, 0.0)}


class ExportError(SCHPError):
    """An export that cannot be made or did not verify; the message is one sentence for the user."""


class MissingPackageError(ExportError, SetupError):
    """The package a format or its runtime needs is not installed: a set-up error, not a failed export."""


class ExportGraph(nn.Module):
    """The folded CE2P with the exported interface: float32 in, float32 logits or int64 labels out.

    `precision` other than fp32 casts the weights and the input inside the graph, and the outputs back
    to float32, so callers keep the float32 contract.
    """

    def __init__(self, model: nn.Module, outputs: str = "raw", precision: str = "fp32"):
        super().__init__()
        if outputs not in OUTPUTS:
            raise ValueError(f"unknown outputs {outputs!r}")
        self.model, self.outputs, self.dtype = model.to(DTYPES[precision]).eval(), outputs, DTYPES[precision]

    def forward(self, x: torch.Tensor):
        out = self.model(x.to(self.dtype))
        if self.outputs == "labels":
            fusion = F.interpolate(out.fusion.float(), size=x.shape[2:], mode="bilinear", align_corners=True)
            return fusion.argmax(1)
        return out.parsing.float(), out.fusion.float(), out.edge.float()


def check_options(fmt: str, precision: str, outputs: str, opset: int) -> None:
    if fmt not in FORMATS:
        raise ExportError(f"unknown format {fmt!r} (one of {', '.join(FORMATS)})")
    if outputs not in OUTPUTS:
        raise ExportError(f"unknown outputs {outputs!r} (one of {', '.join(OUTPUTS)})")
    if precision not in FORMAT_PRECISIONS[fmt]:
        raise ExportError(f"--precision {precision} is not available for --format {fmt} "
                          f"(it supports {', '.join(FORMAT_PRECISIONS[fmt])})")
    if fmt == "onnx" and opset < DEFAULT_OPSET:
        raise ExportError(f"--opset {opset}: torch's ONNX exporter writes opset {DEFAULT_OPSET} or newer")


def drawn_figure(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A deterministic H x W x 3 uint8 BGR picture to verify exports on: a figure of a head, a torso,
    arms and legs in flat colours on a gradient, with a little seeded noise (edges and texture for
    every part of the network; no file is needed, so an installed package verifies too)."""
    import cv2

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    img = np.stack([30 + 90 * xx / width, 70 + 50 * yy / height, np.full((height, width), 110.0)], -1)
    cx = width // 2
    colour = lambda: tuple(int(v) for v in rng.integers(20, 235, 3))  # noqa: E731
    cv2.ellipse(img, (cx, int(0.14 * height)), (int(0.08 * width), int(0.09 * height)), 0, 0, 360, colour(), -1)
    cv2.rectangle(img, (int(cx - 0.15 * width), int(0.24 * height)), (int(cx + 0.15 * width), int(0.58 * height)),
                  colour(), -1)
    for side in (-1, 1):
        cv2.line(img, (int(cx + side * 0.15 * width), int(0.26 * height)),
                 (int(cx + side * 0.32 * width), int(0.56 * height)), colour(), max(2, width // 18))
        cv2.line(img, (int(cx + side * 0.07 * width), int(0.58 * height)),
                 (int(cx + side * 0.11 * width), int(0.96 * height)), colour(), max(2, width // 12))
    img += rng.normal(0, 6, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def sample_crop(spec: DatasetSpec) -> torch.Tensor:
    """1 x 3 x in_h x in_w normalised crop of a drawn portrait (3:4), as the extractor feeds the network."""
    from schp.data.crop import prepare_image
    from schp.utils.transforms import MEAN_BGR, STD_BGR

    in_h, in_w = spec.input_size
    crop = prepare_image(0, drawn_figure(in_h, max(1, in_w * 3 // 4)), spec.input_size).image
    x = torch.from_numpy(crop).permute(2, 0, 1).float().div(255)[None]
    return (x - torch.tensor(MEAN_BGR)[:, None, None]) / torch.tensor(STD_BGR)[:, None, None]


def _dynamic_shapes(dynamic_batch: bool, dynamic_size: bool):
    dims = {}
    if dynamic_batch:
        dims[0] = torch.export.Dim("N", min=1, max=1024)
    if dynamic_size:
        dims[2] = torch.export.Dim("H", min=32, max=4096)
        dims[3] = torch.export.Dim("W", min=32, max=4096)
    return ({**dims},) if dims else None


def _write(graph: ExportGraph, example: torch.Tensor, fmt: str, path: Path, opset: int, dynamic_batch: bool,
           dynamic_size: bool) -> None:
    import warnings

    dynamic = _dynamic_shapes(dynamic_batch, dynamic_size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporters' deprecation and tracer chatter
        if fmt == "onnx":
            names = list(RAW_OUTPUT_NAMES) if graph.outputs == "raw" else ["labels"]
            try:
                import onnxscript  # noqa: F401  torch's ONNX exporter is built on it
            except ImportError:
                raise MissingPackageError("--format onnx needs the package 'onnxscript' "
                                  "(pip install -r requirements-runtimes.txt)") from None
            torch.onnx.export(graph, (example,), str(path), dynamo=True, input_names=[INPUT_NAME],
                              output_names=names, opset_version=opset, dynamic_shapes=dynamic,
                              external_data=False, verbose=False, report=False)
        elif fmt == "torchscript":
            with torch.no_grad(), torchscript_asked_for():
                traced = torch.jit.trace(graph, (example,), check_trace=False)
                buffer = io.BytesIO()  # torch's C++ file writer aborts the process on a full disk
                torch.jit.save(traced, buffer)
            _write_bytes(buffer, path)
        else:
            with torch.no_grad():
                program = torch.export.export(graph, (example,), dynamic_shapes=dynamic)
            buffer = io.BytesIO()
            torch.export.save(program, buffer)
            _write_bytes(buffer, path)


def _write_bytes(buffer: "io.BytesIO", path: Path) -> None:
    """Write a serialised file through Python's I/O, where a full disk is an OSError, not an abort."""
    with open(path, "wb") as f:
        f.write(buffer.getbuffer())
        f.flush()
        os.fsync(f.fileno())


@contextlib.contextmanager
def torchscript_asked_for():
    """torch 2.9+ says on every TorchScript save and load that the format is deprecated; a user who asked
    for --format torchscript chose it (docs/export.md says torch.export is the newer one)."""
    import warnings
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.\w+` is deprecated", category=FutureWarning)
        yield


def run_file(path: Path, fmt: str, x: torch.Tensor, threads: Optional[int] = None):
    """Outputs (a tuple of CPU tensors) of an exported file on `x`, run by the format's own runtime."""
    if fmt == "onnx":
        ort = require("onnxruntime")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        return tuple(torch.from_numpy(o) for o in session.run(None, {INPUT_NAME: x.numpy()}))
    with torch.inference_mode():
        if fmt == "torchscript":
            with torchscript_asked_for():
                out = torch.jit.load(str(path), map_location="cpu")(x)
        else:
            out = torch.export.load(str(path)).module()(x)
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


@dataclass
class Verification:
    relative_error: float  # max |file - torch| / max |torch| over the fusion logits (nan for labels)
    agreement: float  # share of crop pixels whose label is the same
    max_relative_error: float
    min_agreement: float

    @property
    def ok(self) -> bool:
        return self.agreement >= self.min_agreement and not self.relative_error > self.max_relative_error

    def line(self) -> str:
        rel = "n/a (labels output)" if np.isnan(self.relative_error) else f"{self.relative_error:.2e}"
        return (f"verification: fusion logits max relative error {rel} (tolerance {self.max_relative_error:g}), "
                f"argmax agreement {100 * self.agreement:.4f}% " +
                (f"(tolerance {100 * self.min_agreement:g}%)" if self.min_agreement else "(approximate precision)"))


def verify(path: Path, fmt: str, reference: torch.Tensor, x: torch.Tensor, outputs: str,
           precision: str) -> Verification:
    """Run the written file with its runtime on `x` and compare with `reference`, PyTorch's fp32 fusion
    logits of the same crops."""
    got = run_file(path, fmt, x)
    expected_labels = F.interpolate(reference, size=x.shape[2:], mode="bilinear", align_corners=True).argmax(1)
    if outputs == "labels":
        labels, rel = got[0], float("nan")
    else:
        fusion = got[1]
        if fusion.shape != reference.shape:
            raise ExportError(f"the exported file returns fusion logits of shape {tuple(fusion.shape)}, "
                              f"PyTorch {tuple(reference.shape)}")
        rel = float((fusion - reference).abs().max() / reference.abs().max().clamp_min(1e-12))
        labels = F.interpolate(fusion, size=x.shape[2:], mode="bilinear", align_corners=True).argmax(1)
    if labels.shape != expected_labels.shape:
        raise ExportError(f"the exported file returns labels of shape {tuple(labels.shape)}, "
                          f"expected {tuple(expected_labels.shape)}")
    agreement = float((labels == expected_labels).double().mean())
    max_rel, min_agree = TOLERANCES[precision]
    return Verification(rel, agreement, max_rel, min_agree)


def export(spec: DatasetSpec, state_dict: Dict[str, torch.Tensor], path: Path, fmt: str = "onnx",
           opset: int = DEFAULT_OPSET, dynamic_batch: bool = False, dynamic_size: bool = False,
           precision: str = "fp32", outputs: str = "raw", verify_file: bool = True) -> Optional[Verification]:
    """Write `path` (atomically) and verify it; raise ExportError (and leave no file) if it does not match.

    The example input is the dataset's input size; with `dynamic_size` the file takes any H x W >= 32.
    """
    check_options(fmt, precision, outputs, opset)
    if fmt == "onnx":
        require("onnxruntime" if verify_file else "onnx")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    network = folded_ce2p(spec.num_classes, state_dict)
    example = sample_crop(spec)
    if dynamic_batch:  # a batch of 2 so the exporter cannot specialise the batch dimension to 1
        example = example.repeat(2, 1, 1, 1)
    if verify_file:
        with torch.inference_mode():
            reference = network(example).fusion
    graph = ExportGraph(network, outputs, precision)  # casts the network to `precision`
    # same suffix as the final name: torch.export.save insists on .pt2
    remove_stale_temporaries(path.parent)  # of an export killed before it could remove its own
    tmp = temp_path(path)
    try:
        _write(graph, example, fmt, tmp, opset, dynamic_batch, dynamic_size)
        result = verify(tmp, fmt, reference, example, outputs, precision) if verify_file else None
        if result is not None and not result.ok:
            raise ExportError(f"{path}: the exported file does not reproduce PyTorch ({result.line()}); "
                              "nothing was written")
        os.replace(tmp, path)
        return result
    finally:
        for leftover in (tmp, tmp.with_name(tmp.name + ".data")):
            if leftover.exists():
                leftover.unlink()


def require(package: str):
    """Import an optional runtime package, or raise ExportError naming it."""
    import importlib

    try:
        return importlib.import_module(package)
    except ImportError:
        raise MissingPackageError(f"the package '{package}' is not installed "
                          "(pip install -r requirements-runtimes.txt)") from None
