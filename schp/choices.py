"""The values the engine accepts for device, precision, backend and export, named once.

Free of heavy imports so that the commands offer the same choices (and refuse others) before torch
is loaded; the engine modules import their tables from here.
"""
import re
from typing import Tuple

from schp.errors import ParameterError

PRECISIONS = ("fp32", "bf16", "fp16")  # fp32 reproduces the original; fp16 is CUDA only
DEVICES = "auto, cpu, cuda or cuda:N"
DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:\d+)?")
BACKENDS = ("torch", "onnxruntime", "openvino")
DEFAULT_BACKEND = "auto"
# export: file formats, what the graph returns, and the precisions each format can hold and its runtime
# can verify (ONNX Runtime has no bf16 convolution)
FORMATS = ("onnx", "torchscript", "exported-program")
OUTPUTS = ("raw", "labels")
DEFAULT_OPSET = 18  # the lowest opset torch's ONNX exporter writes natively
FORMAT_PRECISIONS = {"onnx": ("fp32", "fp16"), "torchscript": ("fp32", "bf16", "fp16"),
                     "exported-program": ("fp32", "bf16", "fp16")}


def parse_scales(text: str) -> Tuple[float, ...]:
    """'0.75,1.0,1.25' -> (0.75, 1.0, 1.25): the test-time scales; ParameterError about `scales` otherwise."""
    try:
        scales = tuple(float(v) for v in str(text).split(",") if v.strip())
    except ValueError:
        raise ParameterError("expected numbers separated by commas, e.g. 0.75,1.0,1.25", "scales", text) from None
    if not scales or any(not 0 < s <= 4 for s in scales):
        raise ParameterError("each scale must be in (0, 4]", "scales", text)
    return scales
