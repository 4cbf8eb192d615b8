"""The training loop: one process, or one per GPU under torchrun with DistributedDataParallel.

Per epoch: set the closed-form learning rate, train on this rank's shard, then (rank 0 writes) the
periodic checkpoint, self-correction at a cycle end, validation, the resumable `last.pth.tar`,
a line of metrics.jsonl and curves.png. Every file is written to a temporary and renamed.
"""
import copy
import json
import math
import os
import random
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler

from schp.data.catalog import DatasetSpec
from schp.data.training_set import AUGMENTED_SPLITS, DataError, TrainingSet, check_samples, load_split
from schp.data.augment import edge_target
from schp.networks import CE2P, InPlaceABN
from schp.checkpoint import PREFIX, CheckpointError, read_state_dict
from schp.errors import SCHPError
from schp.training.curves import draw_curves
from schp.training.losses import SCHPLoss
from schp.training.schedule import is_cycle_end, learning_rate
from schp.training.self_correction import aggregate_parameters, reestimate_bn
from schp.utils.outputs import atomic_path, remove_stale_temporaries

IMAGENET_URL = "http://sceneparsing.csail.mit.edu/model/pretrained_resnet/resnet101-imagenet.pth"
BACKBONE = ("conv1.", "conv2.", "conv3.", "bn1.", "bn2.", "bn3.", "layer1.", "layer2.", "layer3.", "layer4.")
LAST = "last.pth.tar"


class TrainingError(SCHPError):
    """A problem that stops training; the message is one line for the user."""

    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(message)
        self.exit_code = exit_code


@dataclass
class TrainConfig:
    spec: DatasetSpec
    data_dir: Path
    log_dir: Path
    split: str = "train"
    flip_pairs: Tuple[Tuple[int, int], ...] = ()
    batch_size: int = 16
    epochs: int = 150
    warmup_epochs: int = 10
    schp_start: int = 100
    cycle_epochs: int = 10
    eval_epochs: int = 10
    learning_rate: float = 7e-3
    momentum: float = 0.9
    weight_decay: float = 5e-4
    lambda_s: float = 1.0
    lambda_e: float = 1.0
    lambda_c: float = 0.1
    fix_ignore: bool = False
    soft_eval_mode: bool = False
    sync_bn: bool = False
    device: str = "auto"
    gpu: Optional[str] = None
    num_workers: int = 4
    seed: Optional[int] = None
    precision: str = "fp32"
    imagenet_pretrain: Optional[Path] = None
    init_from: Optional[Path] = None
    model_restore: Optional[Path] = None
    schp_restore: Optional[Path] = None
    resume: Optional[Path] = None
    stop_after: Optional[int] = None
    check_data_only: bool = False
    quiet: bool = False
    args: Dict = field(default_factory=dict)  # the command line, stored in args.json and last.pth.tar


class Distributed:
    """Rank, world size and device of this process; initialises torch.distributed under torchrun."""

    def __init__(self, device: str, gpu: Optional[str]):
        from schp.inference import select_device

        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        try:
            chosen = select_device(device, gpu)
        except (ValueError, RuntimeError) as err:
            raise TrainingError(str(err)) from None
        if self.world > 1:
            if chosen.type == "cuda":
                chosen = torch.device("cuda", self.local_rank)
                torch.cuda.set_device(chosen)
            dist.init_process_group("nccl" if chosen.type == "cuda" else "gloo",
                                    timeout=timedelta(hours=3))  # rank 0 validates while others wait
        self.device = chosen

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def mean(self, values: torch.Tensor) -> torch.Tensor:
        if self.active:
            values = values.clone()
            dist.all_reduce(values)
            values /= self.world
        return values

    def broadcast_object(self, obj):
        if not self.active:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def close(self) -> None:
        if self.active and dist.is_initialized():
            dist.destroy_process_group()


# ---------------------------------------------------------------- checkpoints

def module_state(model: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """State dict in the released layout: `module.` keys, CPU tensors."""
    return {PREFIX + k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def strip_prefix(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    return {k[len(PREFIX):] if k.startswith(PREFIX) else k: v for k, v in state.items()}


def label_facts(spec: DatasetSpec, flip_pairs) -> Dict:
    """Extra checkpoint keys that make a custom model usable without other files."""
    return {"dataset": spec.name, "labels": list(spec.labels), "input_size": list(spec.input_size),
            "flip_pairs": [list(p) for p in flip_pairs]}


def save(obj: Dict, path: Path) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def load_file(path: Path) -> Dict:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # any reason: the file is not usable
        raise TrainingError(f"{path}: not a readable checkpoint ({str(err).splitlines()[0][:200]})") from None
    if not isinstance(obj, dict) or "state_dict" not in obj:
        raise TrainingError(f"{path}: not a training checkpoint (no 'state_dict')")
    return obj


def load_imagenet(model: CE2P, path: Path) -> None:
    """Backbone from a flat ResNet-101 (deep stem) state dict; `fc.*` and `num_batches_tracked` skipped."""
    path = Path(path)
    if not path.is_file():
        raise TrainingError(f"--imagenet-pretrain {path}: no such file; get the deep-stem ResNet-101 from "
                            f"{IMAGENET_URL} or pass --imagenet-pretrain none to train from scratch")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise TrainingError(f"--imagenet-pretrain {path}: not a readable state dict "
                            f"({str(err).splitlines()[0][:200]})") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    state = {k: v for k, v in strip_prefix(state).items()
             if not k.startswith("fc.") and not k.endswith("num_batches_tracked")}
    own = model.state_dict()
    wanted = [k for k in own if k.startswith(BACKBONE)]
    missing = [k for k in wanted if k not in state]
    unexpected = [k for k in state if k not in own or not k.startswith(BACKBONE)]
    misshaped = [k for k in wanted if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or misshaped:
        parts = [f"{len(v)} {name} ({', '.join(v[:3])})" for name, v in
                 (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)) if v]
        raise TrainingError(f"--imagenet-pretrain {path}: not a deep-stem ResNet-101: " + "; ".join(parts))
    own.update({k: state[k] for k in wanted})
    model.load_state_dict(own, strict=True)


def load_init(model: CE2P, path: Path) -> List[str]:
    """Weights of a released or own checkpoint; heads whose class count differs keep their fresh init.

    Returns the re-initialised module names.
    """
    try:
        state = read_state_dict(Path(path))
    except CheckpointError as err:
        raise TrainingError(f"--init-from: {err}") from None
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        raise TrainingError(f"--init-from {path}: not an SCHP CE2P checkpoint "
                            f"({len(missing)} missing keys, {len(unexpected)} unexpected keys)")
    fresh = [k for k in own if tuple(state[k].shape) != tuple(own[k].shape)]
    heads = sorted({k.rsplit(".", 1)[0] for k in fresh})
    if any(not (h.startswith("decoder.conv4") or h.startswith("fushion.3")) for h in heads):
        raise TrainingError(f"--init-from {path}: shapes differ outside the classifier heads: {', '.join(heads)}")
    own.update({k: v for k, v in state.items() if k not in fresh})
    model.load_state_dict(own, strict=True)
    return heads


def rng_state() -> Dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state["numpy"] = [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)]
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_tuples(state["python"]))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"][:torch.cuda.device_count()])


def _tuples(value):
    return tuple(_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


# ---------------------------------------------------------------- metrics and validation

def read_metrics(path: Path) -> List[Dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_metrics(path: Path, rows: List[Dict]) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))


def has_split(data_dir: Path, split: str) -> bool:
    return (Path(data_dir) / f"{split}_id.txt").is_file()


def validate(spec: DatasetSpec, state: Dict[str, torch.Tensor], data_dir: Path, device: torch.device) -> Dict:
    """Metrics of a model (state dict without `module.`) on the `val` split, with the evaluator's code.

    Returns {"val_mean_iou": ..., "val_pixel_accuracy": ..., "val_mean_accuracy": ..., "val": as_dict()}.
    """
    from schp.evaluation import evaluate
    from schp.inference import HumanParser

    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        parser = HumanParser(spec, state, device)  # sets the TF32 switches for exact inference
        result = evaluate(parser, data_dir, "val", quiet=True)
    finally:  # training goes on with the switches it had
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    return {"val_mean_iou": float(result.mean_iou), "val_pixel_accuracy": float(result.pixel_accuracy),
            "val_mean_accuracy": float(result.mean_accuracy), "val": result.as_dict()}


# ---------------------------------------------------------------- the loop

class NonFiniteLoss(Exception):
    pass


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)


def make_loader(dataset: TrainingSet, cfg: TrainConfig, ctx: Distributed, seed: int):
    sampler = DistributedSampler(dataset, num_replicas=ctx.world, rank=ctx.rank, shuffle=True, seed=seed)
    loader = DataLoader(dataset, batch_size=cfg.batch_size, sampler=sampler, num_workers=cfg.num_workers,
                        drop_last=True, pin_memory=ctx.device.type == "cuda")
    return sampler, loader


def train(cfg: TrainConfig) -> int:
    """Run a training job; returns the exit code (0 done, 1 bad data or a non-finite loss, 2 set-up)."""
    try:
        ctx = Distributed(cfg.device, cfg.gpu)
    except TrainingError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    say = (lambda line: print(line, file=sys.stderr, flush=True)) if ctx.main else (lambda line: None)
    try:
        return _train(cfg, ctx, say)
    except TrainingError as err:
        say(f"error: {err}")
        return err.exit_code
    except DataError as err:  # a sample that passed the check but fails to decode; from a worker the
        line = str(err).strip().splitlines()[-1]  # message ends with the original "...DataError: <file>: ..."
        say(f"error: {line.split('DataError: ', 1)[-1]}")
        return 1
    finally:
        ctx.close()


def _check_data(cfg: TrainConfig, ctx: Distributed, say):
    problems: List[str] = []
    samples = []
    if ctx.main:
        try:
            samples = load_split(cfg.data_dir, cfg.split)
            problems = check_samples(samples, cfg.spec.num_classes, workers=max(1, cfg.num_workers))
        except DataError as err:
            problems = [str(err)]
    problems = ctx.broadcast_object(problems)
    if problems:
        for line in problems:
            say(f"error: {line}")
        raise TrainingError(f"{len(problems)} problem(s) in the {cfg.split} split of {cfg.data_dir}; "
                            "nothing was trained", exit_code=1)
    samples = ctx.broadcast_object(samples)
    needed = cfg.batch_size * ctx.world
    if len(samples) < needed:
        raise TrainingError(f"{cfg.data_dir}: the {cfg.split} split has {len(samples)} samples, fewer than "
                            f"one batch ({cfg.batch_size} x {ctx.world} process(es))", exit_code=1)
    return samples


def _train(cfg: TrainConfig, ctx: Distributed, say) -> int:
    if cfg.batch_size < 2:
        raise TrainingError("--batch-size must be >= 2: batch statistics need more than one value per channel")
    samples = _check_data(cfg, ctx, say)
    say(f"{cfg.split}: {len(samples)} samples in {cfg.data_dir}, all usable")
    if cfg.check_data_only:
        return 0
    log_dir = Path(cfg.log_dir)
    if ctx.main:
        try:
            log_dir.mkdir(parents=True, exist_ok=True)
            remove_stale_temporaries(log_dir)  # half-written files of a killed run
        except OSError as err:
            raise TrainingError(f"--log-dir {log_dir}: {err.strerror or err}") from None

    # models and what they start from
    resume_state = None
    resume_path = cfg.resume
    if resume_path is not None:
        if not Path(resume_path).is_file():
            raise TrainingError(f"--resume {resume_path}: no such file (nothing to resume)")
        resume_state = load_file(Path(resume_path))
    seed = cfg.seed
    if resume_state is not None:
        seed = int(resume_state["seed"])
    elif seed is None:
        seed = ctx.broadcast_object(random.SystemRandom().randrange(2 ** 31))
    seed_everything(seed)

    model = CE2P(cfg.spec.num_classes)
    if resume_state is None:
        if cfg.init_from is not None:
            heads = load_init(model, cfg.init_from)
            if heads:
                say(f"re-initialised for {cfg.spec.num_classes} classes (the checkpoint's count differs): "
                    + ", ".join(heads))
        elif cfg.imagenet_pretrain is not None:
            load_imagenet(model, cfg.imagenet_pretrain)
    schp_model = copy.deepcopy(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.learning_rate, momentum=cfg.momentum,
                                weight_decay=cfg.weight_decay)
    start_epoch, cycle_n = 0, 0
    if resume_state is not None:
        model.load_state_dict(strip_prefix(resume_state["state_dict"]), strict=True)
        schp_model.load_state_dict(strip_prefix(resume_state["schp_state_dict"]), strict=True)
        optimizer.load_state_dict(resume_state["optimizer"])
        start_epoch, cycle_n = int(resume_state["epoch"]), int(resume_state["cycle_n"])
        set_rng_state(resume_state["rng"])
        say(f"resuming {resume_path} at epoch {start_epoch} (cycle {cycle_n})")
    else:  # the released resume: explicit files, if they exist
        if cfg.model_restore is not None and Path(cfg.model_restore).is_file():
            restored = load_file(Path(cfg.model_restore))
            model.load_state_dict(strip_prefix(restored["state_dict"]), strict=True)
            start_epoch = int(restored.get("epoch", 0))
            say(f"restored {cfg.model_restore}: starting at epoch {start_epoch}")
        if cfg.schp_restore is not None and Path(cfg.schp_restore).is_file():
            restored = load_file(Path(cfg.schp_restore))
            schp_model.load_state_dict(strip_prefix(restored["state_dict"]), strict=True)
            cycle_n = int(restored.get("cycle_n", 0))
            say(f"restored {cfg.schp_restore}: cycle {cycle_n}")

    device = ctx.device
    model.to(device).train()
    schp_model.to(device)
    for state in optimizer.state.values():  # momentum buffers follow the model's device
        for k, v in state.items():
            if isinstance(v, torch.Tensor):
                state[k] = v.to(device)
    if cfg.sync_bn and ctx.active:
        for layer in model.modules():
            if isinstance(layer, InPlaceABN):
                layer.sync_group = "world"
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    net = model
    if ctx.active:
        from torch.nn.parallel import DistributedDataParallel
        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    dataset = TrainingSet(samples, cfg.spec.input_size, cfg.flip_pairs, cfg.split in AUGMENTED_SPLITS, seed)
    sampler, loader = make_loader(dataset, cfg, ctx, seed)
    criterion = SCHPLoss(cfg.lambda_s, cfg.lambda_e, cfg.lambda_c, cfg.fix_ignore)
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if cfg.precision == "bf16" \
        else nullcontext
    facts = label_facts(cfg.spec, cfg.flip_pairs)
    metrics_path = log_dir / "metrics.jsonl"
    rows = [r for r in read_metrics(metrics_path) if r.get("epoch", 0) < start_epoch] if ctx.main else []
    if ctx.main:
        with atomic_path(log_dir / "args.json") as tmp:
            tmp.write_text(json.dumps({**cfg.args, "seed": seed}, indent=1, default=str) + "\n")
    validating = has_split(cfg.data_dir, "val")
    stop_at = cfg.epochs if cfg.stop_after is None else min(cfg.epochs, start_epoch + cfg.stop_after)

    for epoch in range(start_epoch, stop_at):
        started = time.time()
        lr = learning_rate(epoch, cfg.learning_rate, cfg.warmup_epochs, cfg.schp_start, cfg.cycle_epochs)
        for group in optimizer.param_groups:
            group["lr"] = lr
        sampler.set_epoch(epoch)
        dataset.set_epoch(epoch, 0)
        model.train()
        schp_model.train(not cfg.soft_eval_mode)
        sums = torch.zeros(1 + len(SCHPLoss.TERMS), dtype=torch.float64)
        iterations = 0
        progress = _progress(loader, epoch, cfg, ctx)
        for iteration, (images, labels) in enumerate(progress):
            images = images.to(device, non_blocking=True)
            labels = labels.to(device, non_blocking=True)
            edges = edge_target(labels)
            with autocast():
                outputs = net(images)
                soft = None
                if cycle_n >= 1:
                    with torch.no_grad():
                        teacher = schp_model(images)
                    soft = (teacher.fusion, teacher.edge)
            loss, terms = criterion(tuple(outputs), labels, edges, cycle_n, soft)
            values = torch.stack([loss.detach()] + [terms[k] for k in SCHPLoss.TERMS]).double()
            values = ctx.mean(values).cpu()  # every rank sees the same value, so all stop together
            if not math.isfinite(float(values[0])):
                last = log_dir / LAST
                kept = f"the last good checkpoint is {last}" if last.is_file() else "no checkpoint was written"
                raise TrainingError(f"the loss is {float(values[0])} at epoch {epoch} iteration {iteration}; "
                                    f"training stopped before that step, {kept}", exit_code=1)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            sums += values
            iterations += 1
            if ctx.main and hasattr(progress, "set_postfix"):
                rate = (iteration + 1) * cfg.batch_size * ctx.world / max(1e-9, time.time() - started)
                progress.set_postfix(loss=f"{float(values[0]):.4f}", lr=f"{lr:.3g}", img_s=f"{rate:.1f}")
        cycle_used = cycle_n
        means = (sums / max(1, iterations)).tolist()
        row = {"epoch": epoch, "lr": lr, "loss": means[0],
               **{f"loss_{k}": v for k, v in zip(SCHPLoss.TERMS, means[1:])},
               "cycle_n": cycle_used, "iterations": iterations}

        done = epoch + 1
        if done % cfg.eval_epochs == 0 and ctx.main:
            save({"epoch": done, "state_dict": module_state(model), **facts}, log_dir / f"checkpoint_{done}.pth.tar")
        if is_cycle_end(epoch, cfg.schp_start, cfg.cycle_epochs):
            aggregate_parameters(schp_model, model, cycle_n)
            cycle_n += 1
            dataset.set_epoch(epoch, 1)
            sampler.set_epoch(epoch + 1_000_000)  # a shuffle of its own, not the next epoch's
            reestimate_bn(schp_model, (images for images, _ in loader), device, autocast)
            if ctx.active:  # rank 0's statistics, as the released single-process run kept GPU 0's
                for buffer in schp_model.buffers():
                    dist.broadcast(buffer, src=0)
            if ctx.main:
                save({"state_dict": module_state(schp_model), "cycle_n": cycle_n, **facts},
                     log_dir / f"schp_{cycle_n}_checkpoint.pth.tar")
            row["schp_saved"] = cycle_n
        if validating and done % cfg.eval_epochs == 0 and ctx.main:
            evaluated = schp_model if cycle_n >= 1 else model
            state = {k: v.detach().cpu().clone() for k, v in evaluated.state_dict().items()}
            row.update(validate(cfg.spec, state, cfg.data_dir, device))
            row["val_model"] = "schp" if cycle_n >= 1 else "model"
            model.train()
        row["seconds"] = round(time.time() - started, 3)
        if ctx.main:
            save({"epoch": done, "cycle_n": cycle_n, "state_dict": module_state(model),
                  "schp_state_dict": module_state(schp_model), "optimizer": optimizer.state_dict(),
                  "rng": rng_state(), "seed": seed, "args": json.loads(json.dumps(cfg.args, default=str)),
                  **facts}, log_dir / LAST)
            rows.append(row)
            write_metrics(metrics_path, rows)
            draw_curves(rows, log_dir / "curves.png")
            say(f"epoch {epoch}: loss {row['loss']:.4f}  lr {lr:.4g}  cycle {cycle_used}"
                + (f"  val mIoU {row['val_mean_iou']:.2f}%" if "val_mean_iou" in row else "")
                + f"  {row['seconds']:.1f} s")
        ctx.barrier()
    if stop_at < cfg.epochs:
        say(f"stopped after epoch {stop_at - 1} as asked; continue with --resume {log_dir / LAST}")
    return 0


def _progress(loader, epoch: int, cfg: TrainConfig, ctx: Distributed):
    if not ctx.main or cfg.quiet:
        return loader
    from tqdm import tqdm
    return tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False, dynamic_ncols=True,
                mininterval=1.0)
