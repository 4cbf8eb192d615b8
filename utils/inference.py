"""The parsing model at inference: checkpoint -> folded network on a device -> logits -> label maps.

Steps 5-9 of SPEC.md section 1. Speed comes from folding InPlace-ABN into the convolutions, the
channels-last layout and batching; results stay those of the released pipeline in fp32.
"""
from contextlib import nullcontext
from typing import Dict, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from datasets.catalog import DatasetSpec
from networks import build_ce2p, fold_abn
from utils.transforms import output_to_input_map, row_bands, warp_argmax_torch, warp_channel_rows

# The input contract of the released models: BGR order, x/255, then per-channel mean/std (B, G, R).
MEAN_BGR = (0.406, 0.456, 0.485)
STD_BGR = (0.225, 0.224, 0.229)
PRECISIONS = ("fp32", "bf16", "fp16")
BAND_BYTES = 32 << 20  # inverse warp in row bands of at most this many bytes of float logits


def select_device(device: str, gpu: Optional[str]) -> torch.device:
    """`--device` auto|cpu|cuda|cuda:N, with the original `--gpu N` kept (`--gpu None` means CPU)."""
    if gpu is not None and device == "auto":
        if str(gpu).strip().lower() in ("none", "", "-1", "cpu"):
            return torch.device("cpu")
        if torch.cuda.is_available():
            return torch.device(f"cuda:{int(str(gpu).split(',')[0])}")
        return torch.device("cpu")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    chosen = torch.device(device)
    if chosen.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: CUDA is not available on this machine")
    return chosen


class HumanParser:
    """A loaded SCHP model on one device and precision.

    `logits(batch)` maps N x in_h x in_w x 3 uint8 BGR crops to N x C x in_h x in_w float32 fusion
    logits upsampled to the input size (align_corners=True), on the model's device.
    """

    def __init__(self, spec: DatasetSpec, state_dict: Dict[str, torch.Tensor], device: torch.device,
                 precision: str = "fp32", allow_tf32: bool = False,
                 postprocess_on_device: Optional[bool] = None):
        if precision not in PRECISIONS:
            raise ValueError(f"unknown precision {precision!r}")
        if precision == "fp16" and device.type != "cuda":
            raise ValueError("--precision fp16 needs a CUDA device; use bf16 on the CPU")
        self.spec, self.device, self.precision = spec, device, precision
        # On a GPU the inverse warp and argmax run there (only the uint8 map comes back); on the CPU
        # they run in cv2 in writer threads. Tests force the device path on the CPU to cover it.
        self.postprocess_on_device = device.type == "cuda" if postprocess_on_device is None \
            else postprocess_on_device
        if device.type == "cuda":
            # TF32 changes the maps; keep full fp32 unless asked
            torch.backends.cuda.matmul.allow_tf32 = allow_tf32
            torch.backends.cudnn.allow_tf32 = allow_tf32
        with torch.device("meta"):  # skip the random init of 66.8 M values (0.27 s): all are loaded
            model = build_ce2p(spec.num_classes)
        model = model.to_empty(device="cpu")
        model.load_state_dict(state_dict, strict=True)
        self.model = fold_abn(model).to(device, memory_format=torch.channels_last).eval()
        self.mean = torch.tensor(MEAN_BGR, dtype=torch.float32, device=device)[:, None, None]
        self.std = torch.tensor(STD_BGR, dtype=torch.float32, device=device)[:, None, None]

    def _autocast(self):
        if self.precision == "fp32":
            return nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    @torch.inference_mode()
    def logits(self, batch: torch.Tensor) -> torch.Tensor:
        if self.device.type == "cuda":
            batch = batch.pin_memory().to(self.device, non_blocking=True)
        # ToTensor + Normalize of the original, same operations in the same order
        x = batch.permute(0, 3, 1, 2).float().div(255).sub_(self.mean).div_(self.std)
        x = x.contiguous(memory_format=torch.channels_last)
        with self._autocast():
            fusion = self.model(x).fusion
        return F.interpolate(fusion.float(), size=self.spec.input_size, mode="bilinear", align_corners=True)

    def labels(self, logits: torch.Tensor, center: np.ndarray, scale: np.ndarray, width: int,
               height: int) -> np.ndarray:
        """height x width uint8 label map from one image's C x in_h x in_w logits, on the device."""
        out_to_in = output_to_input_map(center, scale, self.spec.input_size)
        return warp_argmax_torch(logits, out_to_in, width, height).cpu().numpy()


def labels_from_logits(logits: np.ndarray, center: np.ndarray, scale: np.ndarray, width: int, height: int,
                       input_size: Tuple[int, int], logits_out: Optional[np.ndarray] = None) -> np.ndarray:
    """Label map (height x width uint8, argmax, ties to the lowest class) from in_h x in_w x C logits.

    The inverse warp runs in bands of rows so memory stays bounded for any image size, one channel
    at a time with a running maximum (a strict `>` keeps the lowest class on ties); when `logits_out`
    (height x width x C float32, e.g. a memory-mapped .npy) is given, it is filled too.
    """
    out_to_in = output_to_input_map(center, scale, input_size)
    channels = [np.ascontiguousarray(logits[:, :, c]) for c in range(logits.shape[2])]
    labels = np.zeros((height, width), dtype=np.uint8)
    rows = max(1, BAND_BYTES // max(1, width * 4 * 3))  # best, current channel, comparison mask
    for start, stop in row_bands(height, rows):
        band_labels = labels[start:stop]
        best = None
        for c, channel in enumerate(channels):
            value = warp_channel_rows(channel, out_to_in, width, start, stop)
            if logits_out is not None:
                logits_out[start:stop, :, c] = value
            if best is None:
                best = value
                continue
            higher = value > best
            np.copyto(band_labels, c, where=higher)
            np.maximum(best, value, out=best)
    return labels
