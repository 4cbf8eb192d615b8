"""The parsing model at inference: checkpoint -> folded network on a device -> logits -> label maps.

Normalisation, network, optional test-time augmentation (flip and multi-scale, averaged in crop
space as the released evaluator does), upsampling, and the inverse warp with argmax. Every front door
(extractor, evaluator, training's validation, Python API, multi-person parser) goes through
HumanParser.logits, so they all compute the same thing. Speed comes from folding InPlace-ABN into the
convolutions, the channels-last layout and batching; results stay those of the released code in fp32.
"""
import logging
import time
import warnings
import weakref
from contextlib import nullcontext
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from schp.choices import DEVICES, PRECISIONS, parse_scales  # noqa: F401  (parse_scales: re-exported)
from schp.data.catalog import DatasetSpec
from schp.errors import ParameterError, SCHPWarning
from schp.networks import folded_ce2p
from schp.utils.cpu import BF16_CPU_FLAGS, cpu_flags  # noqa: F401  (re-exported)
from schp.utils.transforms import MEAN_BGR, STD_BGR, output_to_input_map, row_bands, warp_argmax_torch, warp_channel_rows

log = logging.getLogger(__name__)
BAND_BYTES = 32 << 20  # inverse warp in row bands of at most this many bytes of float logits


def select_device(device: str, gpu: Optional[str] = None, cuda_count: Optional[int] = None) -> torch.device:
    """`device` auto|cpu|cuda|cuda:N, with the original's `gpu` index kept (`gpu='None'` means CPU).

    A device index the machine does not have is a ParameterError (a ValueError; one sentence naming
    the parameter), never a CUDA error later. `gpu` N on a machine without CUDA runs on the CPU, as the
    original's users expect, with an SCHPWarning. `cuda_count` defaults to torch.cuda.device_count().
    """
    count = torch.cuda.device_count() if cuda_count is None else cuda_count
    plural = "s" if count != 1 else ""
    if gpu is not None and device == "auto":
        text = str(gpu).strip()
        if text.lower() in ("none", "", "-1", "cpu"):
            return torch.device("cpu")
        try:
            index = int(text.split(",")[0])
        except ValueError:
            raise ParameterError("expected a CUDA device index such as 0, or None for the CPU", "gpu", gpu) \
                from None
        if count == 0:
            warnings.warn(SCHPWarning("this machine has no CUDA device; running on the CPU", "gpu", gpu),
                          stacklevel=2)
            return torch.device("cpu")
        if not 0 <= index < count:
            raise ParameterError(f"this machine has {count} CUDA device{plural} (indices 0 to {count - 1})",
                                 "gpu", gpu)
        return torch.device(f"cuda:{index}")
    if device == "auto":
        return torch.device("cuda" if count else "cpu")
    if device == "cpu":
        return torch.device("cpu")
    if device == "cuda" or (device.startswith("cuda:") and device[5:].isdigit()):
        if count == 0:
            raise ParameterError("CUDA is not available on this machine", "device", device)
        chosen = torch.device(device)
        if chosen.index is not None and chosen.index >= count:
            raise ParameterError(f"this machine has {count} CUDA device{plural} (cuda:0 to cuda:{count - 1})",
                                 "device", device)
        return chosen
    raise ParameterError(f"expected {DEVICES}", "device", device)


def slow_bf16_warning(device: torch.device, precision: str,
                      flags: Optional[frozenset] = None) -> Optional[SCHPWarning]:
    """The warning to give when bf16 is asked for on a CPU without bf16 units, where it is slower than fp32.

    Without native bf16 every bf16 convolution is emulated (converted to and from fp32): a 512 x 512 forward
    pass took 7.1 x its fp32 time on an AVX2-only CPU (benchmarks/bf16_cpu.py, AMD EPYC of family 25).
    `flags` defaults to those of this machine; unknown flags (no /proc/cpuinfo) give no warning.
    """
    if precision != "bf16" or device.type != "cpu":
        return None
    flags = cpu_flags() if flags is None else flags
    if flags is None or flags & BF16_CPU_FLAGS:
        return None
    return SCHPWarning("this CPU has no bf16 units (no avx512_bf16 or amx_bf16 flag), where bf16 is several "
                       "times slower than fp32; fp32 is faster here, and exact", "precision", precision)


class HumanParser:
    """A loaded SCHP model on one device and precision.

    `logits(batch)` maps N x in_h x in_w x 3 uint8 BGR crops to N x C x in_h x in_w float32 fusion
    logits upsampled to the input size (align_corners=True), on the model's device. With `flip` and
    `scales` the logits are the test-time-augmented average of the released evaluator. `state_digest`: the
    weights' `schp.backends.state_dict_digest` where the caller has it already (a runtime backend finds
    its exported file by it; computing it reads every weight).
    """

    def __init__(self, spec: DatasetSpec, state_dict: Dict[str, torch.Tensor], device: torch.device,
                 precision: str = "fp32", allow_tf32: bool = False,
                 postprocess_on_device: Optional[bool] = None, flip: bool = False,
                 scales: Sequence[float] = (1.0,), backend: str = "torch", expected_images: Optional[int] = None,
                 state_digest: Optional[str] = None):
        if precision not in PRECISIONS:
            raise ParameterError(f"expected {', '.join(PRECISIONS)}", "precision", precision)
        scales = tuple(float(s) for s in scales)
        if not scales or any(not 0 < s <= 4 for s in scales):
            raise ParameterError("each scale must be in (0, 4]", "scales", scales)
        self.flip, self.scales = bool(flip), scales
        if precision == "fp16" and device.type != "cuda":
            raise ParameterError("fp16 needs a CUDA device; use bf16 on the CPU", "precision", precision)
        self.spec, self.device, self.precision = spec, device, precision
        # On a GPU the inverse warp and argmax run there (only the uint8 map comes back); on the CPU
        # they run in cv2 in writer threads. Tests force the device path on the CPU to cover it.
        self.postprocess_on_device = device.type == "cuda" if postprocess_on_device is None \
            else postprocess_on_device
        if device.type == "cuda":
            # TF32 changes the maps; keep full fp32 unless asked
            torch.backends.cuda.matmul.allow_tf32 = allow_tf32
            torch.backends.cudnn.allow_tf32 = allow_tf32
        # backend: who runs the network (schp.backends); "torch" = self.model, others an exported file,
        # in which case no torch copy of the network is kept (it would only hold memory). 'auto' starts on
        # torch and, for a long job, switches to the runtime prepared beside it (self.background)
        from schp.backends import needs_any_size, network_runner
        from schp.background_runtime import BackgroundRuntime
        # expected_images: how many images the job will parse (None: unknown), for auto's export choice
        forwards = None if expected_images is None else expected_images * len(scales) * (2 if flip else 1)
        # a runtime's file takes the input size only (faster to export and to run) unless scales need more
        self.backend, self.runner, upgrade = network_runner(backend, device, spec, state_dict, precision,
                                                            forwards=forwards, digest=state_digest,
                                                            any_size=needs_any_size(scales))
        self.threads = torch.get_num_threads()  # torch's, and the prepared runtime's once it runs
        self.background = None if upgrade is None else BackgroundRuntime(upgrade, spec, state_dict, precision,
                                                                         threads=self.threads)
        if self.background is not None:
            # a parser dropped without close() stops its background work too: an export in flight, or the
            # thread that waits for the switch to load the other runtimes (it holds a loaded runtime)
            weakref.finalize(self, self.background.close)
        self.crops_by_backend: Dict[str, int] = {}  # crops each backend parsed (auto may switch once)
        self.rivals = None  # after the switch: the BackgroundRuntime loading the other installed runtimes
        self.trial = None  # then auto's timing of the runtimes (a RuntimeTrial), until decided
        # whether a forward pass may switch to the prepared runtime; a caller that must know the backend
        # of a whole batch beforehand (the service) clears it and switches with wait_for_backend(0)
        self.switch_on_forward = True
        self.model = None
        if self.runner is None:
            self.model = folded_ce2p(spec.num_classes, state_dict).to(device, memory_format=torch.channels_last)
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
        if tuple(x.shape[2:]) != (in_h, in_w):  # a runtime's file takes only these (and so would the maps)
            raise ParameterError(f"expected crops of the input size {in_h} x {in_w}", "batch",
                                 f"crops of {x.shape[2]} x {x.shape[3]}")
        if self.switch_on_forward:
            self.wait_for_backend(0)
        self.crops_by_backend[self.backend] = self.crops_by_backend.get(self.backend, 0) + n
        if self.flip:
            x = torch.cat([x, x.flip(-1)])
        outputs = []
        for s in self.scales:
            xs = x if s == 1.0 else F.interpolate(x, size=(int(in_h * s), int(in_w * s)), mode="bilinear",
                                                  align_corners=True)
            fusion = self._network(xs).float()
            out = fusion[:n]
            if self.flip:
                mirrored = fusion[n:][:, list(self.spec.flip_permutation)].flip(-1)
                out = (out + mirrored) * 0.5
            outputs.append(F.interpolate(out, size=(in_h, in_w), mode="bilinear", align_corners=True))
        return outputs[0] if len(outputs) == 1 else torch.stack(outputs).mean(0)

    def _network(self, xs: torch.Tensor) -> torch.Tensor:
        """Fusion logits of one batch of normalised (scaled, flipped) crops, by the current backend."""
        if self.trial is not None:
            t0 = time.perf_counter()
            fusion = self.runner(xs)
            self.trial.record(time.perf_counter() - t0, xs.numel())
            return fusion
        if self.runner is not None:
            return self.runner(xs)
        if self.background is not None:
            # while the child export takes a core, torch leaves it that core: more threads than cores
            # make its OpenMP threads wait on each other (about 2.5 x slower forward passes on 2 cores)
            threads = max(1, self.threads - 1) if self.background.exporting else self.threads
            if torch.get_num_threads() != threads:
                torch.set_num_threads(threads)
        with self._autocast():
            fusion = self.model(xs.contiguous(memory_format=torch.channels_last)).fusion
        if self.background is not None and not self.background.started:
            self.background.start(tuple(xs.shape))  # after the first map's forward pass: it comes first
        return fusion

    def _switch(self) -> None:
        """Take the runtime prepared in the background (between two forward passes), or stay on torch."""
        background, self.background = self.background, None
        if torch.get_num_threads() != self.threads:
            torch.set_num_threads(self.threads)
        ready = background.ready()
        if ready is None:
            warnings.warn(SCHPWarning(f"{background.backend} unusable ({background.error}); running the network "
                                      "with torch", "backend", "auto"), stacklevel=3)
            return
        log.info("switched the network from torch to %s after %d crops (%s ready in %.1f s)", ready[0],
                 sum(self.crops_by_backend.values()), "exported and" if background.exported else "cached,",
                 background.seconds)
        (self.backend, self.runner), self.model = ready, None
        self.rivals = background
        background.switched()  # the other runtimes load now, without torch's network beside them

    def _begin_trial(self, rivals: Dict[str, object]) -> None:
        """Time the running runtime and the rivals that loaded on the next forward passes."""
        self.rivals = None
        if not rivals:
            return
        from schp.background_runtime import RuntimeTrial
        in_h, in_w = self.spec.input_size
        self.trial = RuntimeTrial({self.backend: self.runner, **rivals}, 3 * in_h * in_w)
        self._take_turn()

    def _take_turn(self) -> None:
        """The next turn of auto's trial of the runtimes, or its end: the fastest runs from then on."""
        trial = self.trial
        name = trial.next_turn()
        if name is None:
            name, self.trial = trial.fastest(), None  # the other runtimes go with the trial
            log.info("timed on this job's forward passes, per %d x %d crop (best of %d turns): %s; the network "
                     "runs on %s from now on", *self.spec.input_size, trial.ROUNDS, trial.describe(), name)
        self.runner, self.backend = trial.runners[name], name

    def wait_for_backend(self, timeout: Optional[float] = None) -> str:
        """Wait (at most `timeout` s) for a runtime being prepared, switch to it, and return the backend that
        runs the network from now on. Where nothing is prepared, or it has not begun (it begins after the
        first forward pass), this returns at once. Where other runtimes are installed, they load after the
        switch; this waits for them too (within the same `timeout`) and then auto times them all: each
        call after a forward pass begins the trial's next turn, and returns the backend of that turn."""
        if self.trial is not None:
            self._take_turn()
            return self.backend
        t0 = time.monotonic()
        if self.background is not None and self.background.started and self.background.wait(timeout):
            self._switch()
        if self.rivals is not None:
            rivals = self.rivals.rivals(None if timeout is None else max(0.0, timeout - (time.monotonic() - t0)))
            if rivals is not None:
                self._begin_trial(rivals)
        return self.backend

    def close(self) -> None:
        """Stop preparing runtimes in the background (an export in flight leaves no file); the backend
        running now goes on."""
        if self.rivals is not None:
            self.rivals.close()
            self.rivals = None
        if self.background is not None:
            self.background.close()
            self.background = None
            if torch.get_num_threads() != self.threads:
                torch.set_num_threads(self.threads)

    def parse(self, images: Sequence[np.ndarray], with_logits: bool = False):
        """Label maps (H x W uint8, one per image) of H x W x 3 uint8 BGR images, as the extractor makes them.

        With `with_logits`, (labels, logits) pairs where logits are H x W x C float32.
        """
        from schp.data.crop import prepare_image

        items = [prepare_image(i, image, self.spec.input_size) for i, image in enumerate(images)]
        if not items:
            return []
        results = []
        for item, work in zip(items, self.crop_results(items, [with_logits] * len(items))):
            if with_logits:
                full = np.empty((item.height, item.width, work["logits"].shape[2]), dtype=np.float32)
                results.append((self.image_labels(item, work, full), full))
            else:
                results.append(self.image_labels(item, work))
        return results

    def crop_results(self, items: Sequence, host_logits: Sequence[bool]) -> List[Dict[str, object]]:
        """The network on a batch of prepared crops (schp.data.crop.Prepared); per crop either its label
        map warped on the device (`labels`) or its in_h x in_w x C logits on the host (`logits`: for the
        CPU warp, or where `host_logits` asks for them to be written). The post-processing of every front
        door: HumanParser.parse here, the run loop's write stage with image_labels."""
        logits = self.logits(torch.from_numpy(np.stack([item.image for item in items])))
        host = None
        out: List[Dict[str, object]] = []
        for k, (item, want) in enumerate(zip(items, host_logits)):
            if self.postprocess_on_device and not want:
                out.append({"labels": self.labels(logits[k], item.center, item.scale, item.width, item.height)})
                continue
            if host is None:
                host = logits.permute(0, 2, 3, 1).cpu().numpy()  # N x in_h x in_w x C
            out.append({"logits": host[k]})
        return out

    def image_labels(self, item, result: Dict[str, object], logits_out: Optional[np.ndarray] = None) -> np.ndarray:
        """The image's label map from its crop result: as warped on the device, or the CPU inverse warp
        and argmax of its host logits (filling `logits_out`, H x W x C, when given)."""
        return crop_labels(item, result, self.spec.input_size, logits_out)

    def labels(self, logits: torch.Tensor, center: np.ndarray, scale: np.ndarray, width: int,
               height: int) -> np.ndarray:
        """height x width uint8 label map from one image's C x in_h x in_w logits, on the device."""
        out_to_in = output_to_input_map(center, scale, self.spec.input_size)
        return warp_argmax_torch(logits, out_to_in, width, height).cpu().numpy()


def load_human_parser(spec: DatasetSpec, checkpoint: Optional[Path], device: torch.device, precision: str = "fp32",
                      *, allow_tf32: bool = False, allow_download: Optional[bool] = None,
                      cache_dir: Optional[Path] = None, **options) -> Tuple[HumanParser, Path]:
    """A HumanParser for a checkpoint file, and the path it was read from (after any download).

    The one loading path of every front door: checkpoint.load_checkpoint (None = the released file in
    the default folder; downloaded only under its released name, unless `allow_download` says; read
    safely, checked against the network, through the converted zip cache: `cache_dir`, default
    checkpoint.default_cache_dir). `options` go to HumanParser (flip, scales, ...). Raises
    CheckpointError, or ValueError for a precision or augmentation setting the device cannot run.
    """
    from schp.checkpoint import default_cache_dir, load_checkpoint

    state, path = load_checkpoint(spec, checkpoint, allow_download=allow_download,
                                  cache_dir=cache_dir if cache_dir is not None else default_cache_dir())
    return HumanParser(spec, state, device, precision, allow_tf32, **options), path


def crop_labels(item, result: Dict[str, object], input_size: Tuple[int, int],
                logits_out: Optional[np.ndarray] = None) -> np.ndarray:
    """HumanParser.image_labels without the model: for a write stage that runs apart from it (the
    Ray engine's CPU workers); the crop result of HumanParser.crop_results, made anywhere."""
    if result.get("labels") is not None:
        return result["labels"]
    return labels_from_logits(result["logits"], item.center, item.scale, item.width, item.height,
                              input_size, logits_out)


def labels_from_logits(logits: np.ndarray, center: np.ndarray, scale: np.ndarray, width: int, height: int,
                       input_size: Tuple[int, int], logits_out: Optional[np.ndarray] = None) -> np.ndarray:
    """Label map (height x width uint8, argmax, ties to the lowest class) from in_h x in_w x C logits.

    The inverse warp runs in bands of rows so memory stays bounded for any image size, one channel
    at a time with a running maximum (a strict `>` keeps the lowest class on ties); when `logits_out`
    (height x width x C float32, e.g. a memory-mapped .npy) is given, it is filled too. The running
    maximum uses OpenCV's compare, masked copy and max, about 6x faster than NumPy's masked copyto
    (2.8 against 16.5 ms for 7 channels of 1024 x 1024 on one core), with the same labels.
    """
    out_to_in = output_to_input_map(center, scale, input_size)
    channels = [np.ascontiguousarray(logits[:, :, c]) for c in range(logits.shape[2])]
    labels = np.zeros((height, width), dtype=np.uint8)
    # per pixel: best and current channel (float32), comparison mask and class plane (uint8)
    rows = max(1, BAND_BYTES // max(1, width * 4 * 3))
    for start, stop in row_bands(height, rows):
        band_labels = labels[start:stop]
        plane = np.empty_like(band_labels)  # filled with class c: the source of the masked copy
        best = None
        for c, channel in enumerate(channels):
            value = warp_channel_rows(channel, out_to_in, width, start, stop)
            if logits_out is not None:
                logits_out[start:stop, :, c] = value
            if best is None:
                best = value
                continue
            higher = cv2.compare(value, best, cv2.CMP_GT)
            plane.fill(c)
            cv2.copyTo(plane, higher, band_labels)  # in place: labels where value > best become c
            cv2.max(best, value, dst=best)
    return labels
