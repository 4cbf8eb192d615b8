"""The parsing model at inference: checkpoint -> folded network on a device -> logits -> label maps.

Normalisation, network, optional test-time augmentation (flip and multi-scale, averaged in crop
space as the released evaluator does), upsampling, and the inverse warp with argmax. Every front door
(extractor, evaluator, training's validation, Python API, multi-person parser) goes through
HumanParser.logits, so they all compute the same thing. Speed comes from folding InPlace-ABN into the
convolutions, the channels-last layout and batching; results stay those of the released code in fp32.
"""
from contextlib import nullcontext
from typing import Dict, Optional, Sequence, Tuple

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
    logits upsampled to the input size (align_corners=True), on the model's device. With `flip` and
    `scales` the logits are the test-time-augmented average of the released evaluator.
    """

    def __init__(self, spec: DatasetSpec, state_dict: Dict[str, torch.Tensor], device: torch.device,
                 precision: str = "fp32", allow_tf32: bool = False,
                 postprocess_on_device: Optional[bool] = None, flip: bool = False,
                 scales: Sequence[float] = (1.0,), backend: str = "torch"):
        if precision not in PRECISIONS:
            raise ValueError(f"unknown precision {precision!r}")
        scales = tuple(float(s) for s in scales)
        if not scales or any(not 0 < s <= 4 for s in scales):
            raise ValueError(f"scales must be in (0, 4], got {scales}")
        self.flip, self.scales = bool(flip), scales
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
        # backend: who runs the network (schp.backends); "torch" = self.model, others an exported file
        from schp.backends import network_runner
        self.backend, self.runner = network_runner(backend, device, spec, state_dict, precision)
        self.mean = torch.tensor(MEAN_BGR, dtype=torch.float32, device=device)[:, None, None]
        self.std = torch.tensor(STD_BGR, dtype=torch.float32, device=device)[:, None, None]

    def _autocast(self):
        if self.precision == "fp32":
            return nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    def normalize(self, batch: torch.Tensor) -> torch.Tensor:
        """N x in_h x in_w x 3 uint8 BGR -> N x 3 x in_h x in_w float32 (ToTensor + Normalize, same order)."""
        if self.device.type == "cuda":
            batch = batch.pin_memory().to(self.device, non_blocking=True)
        return batch.permute(0, 3, 1, 2).float().div(255).sub_(self.mean).div_(self.std)

    @torch.inference_mode()
    def logits(self, batch: torch.Tensor) -> torch.Tensor:
        return self.logits_normalized(self.normalize(batch))

    @torch.inference_mode()
    def logits_normalized(self, x: torch.Tensor) -> torch.Tensor:
        """Crop-space fusion logits of normalised crops, with this parser's test-time augmentation.

        For each scale s: the crops are resized to floor(in * s) (bilinear, align_corners=True; s = 1 is
        skipped, being an identity), the mirrored copies run in the same batch, their fusion logits get
        the left/right channels exchanged, are mirrored back and averaged with the plain ones at network
        resolution; then upsampled to the input size. The scales' results are averaged.
        """
        n = x.shape[0]
        in_h, in_w = self.spec.input_size
        if self.flip:
            x = torch.cat([x, x.flip(-1)])
        outputs = []
        for s in self.scales:
            xs = x if s == 1.0 else F.interpolate(x, size=(int(in_h * s), int(in_w * s)), mode="bilinear",
                                                  align_corners=True)
            if self.runner is not None:
                fusion = self.runner(xs)
            else:
                with self._autocast():
                    fusion = self.model(xs.contiguous(memory_format=torch.channels_last)).fusion
            fusion = fusion.float()
            out = fusion[:n]
            if self.flip:
                mirrored = fusion[n:][:, list(self.spec.flip_permutation)].flip(-1)
                out = (out + mirrored) * 0.5
            outputs.append(F.interpolate(out, size=(in_h, in_w), mode="bilinear", align_corners=True))
        return outputs[0] if len(outputs) == 1 else torch.stack(outputs).mean(0)

    def parse(self, images: Sequence[np.ndarray], with_logits: bool = False):
        """Label maps (H x W uint8, one per image) of H x W x 3 uint8 BGR images, as the extractor makes them.

        With `with_logits`, (labels, logits) pairs where logits are H x W x C float32.
        """
        from datasets.simple_extractor_dataset import prepare_image

        items = [prepare_image(i, image, self.spec.input_size) for i, image in enumerate(images)]
        if not items:
            return []
        logits = self.logits(torch.from_numpy(np.stack([item.image for item in items])))
        results = []
        host = None
        for k, item in enumerate(items):
            if self.postprocess_on_device and not with_logits:
                results.append(self.labels(logits[k], item.center, item.scale, item.width, item.height))
                continue
            if host is None:
                host = logits.permute(0, 2, 3, 1).cpu().numpy()
            if with_logits:
                full = np.empty((item.height, item.width, host.shape[3]), dtype=np.float32)
                labels = labels_from_logits(host[k], item.center, item.scale, item.width, item.height,
                                            self.spec.input_size, full)
                results.append((labels, full))
            else:
                results.append(labels_from_logits(host[k], item.center, item.scale, item.width, item.height,
                                                  self.spec.input_size))
        return results

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
