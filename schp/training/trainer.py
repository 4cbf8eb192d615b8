"""The training job: one process, or one per GPU under torchrun with DistributedDataParallel.

`train(config)` checks the data, starts the models (fresh, ImageNet backbone, --init-from, or a
resume), then per epoch: the closed-form learning rate, `train_one_epoch` on this rank's shard, and
(rank 0 writes) the periodic checkpoint, self-correction at a cycle end, validation, the resumable
`last.pth.tar`, a line of metrics.jsonl and curves.png. Every file is written to a temporary and
renamed. Progress and problems go to the `schp.training` logger (rank 0 only); train.py shows them.
"""
import copy
import json
import logging
import random
import time
from contextlib import contextmanager, nullcontext
from datetime import timedelta
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch.utils.data import DataLoader, DistributedSampler

from schp.checkpoint import (CheckpointError, check_state_dict, checkpoint_kind, expected_state, label_facts,
                             load_checkpoint, module_state, read_checkpoint_file, read_training_file,
                             state_classes, strip_prefix, TRAINING_STATE_KEYS, write_model_checkpoint,
                             write_training_state)
from schp.data.training_set import AUGMENTED_SPLITS, DataError, TrainingSet, check_samples, load_split
from schp.distributed import Rank, from_environment
from schp.errors import SetupError, describe_exception
from schp.networks import CE2P, InPlaceABN
from schp.networks.imagenet import PretrainedWeightsError, load_imagenet
from schp.training.config import TrainConfig, TrainingError
from schp.training.curves import draw_curves
from schp.training.epoch import Models, self_correct, train_one_epoch
from schp.training.losses import SCHPLoss
from schp.training.schedule import is_cycle_end, learning_rate
from schp.training.state import read_metrics, rng_state, seed_everything, set_rng_state, write_metrics
from schp.training.validation import has_split, validate
from schp.runs.extract import ensure_writable, remove_empty
from schp.runs.workers import worker_init
from schp.utils.outputs import atomic_path, remove_stale_temporaries

__all__ = ["LAST", "TrainConfig", "TrainingError", "load_imagenet", "load_init", "train"]

LAST = "last.pth.tar"
WAIT = timedelta(hours=3)  # rank 0 validates while the others wait at the barrier
log = logging.getLogger("schp.training")


def _silent(line: str) -> None:
    pass


def train(cfg: TrainConfig) -> int:
    """Run a training job; returns the exit code (0 done, 1 a non-finite loss or a file that cannot be
    written, e.g. on a full disk; 2 set-up, bad training data included). Ctrl-C raises KeyboardInterrupt: what finished is
    kept (the last.pth.tar of the last finished epoch), no temporary is left."""
    try:
        ranks, device = start_ranks(cfg)
    except TrainingError as err:
        log.error(str(err))
        return err.exit_code
    say, shout = (log.info, log.error) if ranks.is_main else (_silent, _silent)
    try:
        return _run(cfg, ranks, device, say, shout)
    except TrainingError as err:
        shout(str(err))
        return err.exit_code
    except DataError as err:  # a sample that passed the check but fails to decode; from a worker the
        line = str(err).strip().splitlines()[-1]  # message ends with the original "...DataError: <file>: ..."
        shout(line.split("DataError: ", 1)[-1])
        return 1
    except OSError as err:  # a checkpoint, metrics.jsonl or curves.png that cannot be written (a full disk)
        last = Path(cfg.log_dir) / LAST
        kept = f"; {last} is intact: continue with --resume" if last.is_file() else ""
        shout(f"cannot write {err.filename or cfg.log_dir}: {err.strerror or err}; training stopped{kept}")
        return 1
    finally:
        ranks.stop()


def start_ranks(cfg: TrainConfig) -> Tuple[Rank, torch.device]:
    """This process's rank (a world of one without torchrun) and device; joins the others under torchrun,
    each on cuda:LOCAL_RANK when CUDA is used."""
    from schp.inference import select_device

    try:
        ranks = from_environment() or Rank(0, 1, 0)
        device = select_device(cfg.device, cfg.gpu)
    except (ValueError, RuntimeError) as err:
        raise TrainingError(str(err)) from None
    if ranks.world_size > 1:
        if device.type == "cuda":
            device = torch.device("cuda", ranks.local_rank)
        ranks.start(device, timeout=WAIT)
    return ranks, device


def check_data(cfg: TrainConfig, ranks: Rank, shout: Callable[[str], None]):
    """The samples of the training split, every image and label decoded by rank 0 as training will
    decode them (every problem logged, then TrainingError, exit 2)."""
    problems: List[str] = []
    samples = []
    if ranks.is_main:
        try:
            samples = load_split(cfg.data_dir, cfg.split)
            with check_progress(len(samples), cfg) as progress:
                problems = check_samples(samples, cfg.spec.num_classes, max_pixels=cfg.max_pixels,
                                         progress=progress)
        except DataError as err:
            problems = [str(err)]
    problems = ranks.broadcast(problems)
    if problems:
        for line in problems:
            shout(line)
        raise TrainingError(f"{len(problems)} problem(s) in the {cfg.split} split of {cfg.data_dir}; "
                            "nothing was trained")  # a set-up error (exit 2): found before any epoch
    samples = ranks.broadcast(samples)
    needed = cfg.batch_size * ranks.world_size
    if len(samples) < needed:
        raise TrainingError(f"{cfg.data_dir}: the {cfg.split} split has {len(samples)} samples, fewer than "
                            f"one batch ({cfg.batch_size} x {ranks.world_size} process(es))", exit_code=1)
    return samples


@contextmanager
def check_progress(total: int, cfg: TrainConfig):
    """A progress bar over the data check (none with quiet), as a callable told of each sample done."""
    if cfg.quiet:
        yield None
        return
    from tqdm import tqdm

    bar = tqdm(total=total, desc="checking data", unit="sample", leave=False, dynamic_ncols=True, mininterval=1.0)
    try:
        yield bar.update
    finally:
        bar.close()


def read_resume(cfg: TrainConfig) -> Dict:
    """The training state --resume continues from, checked against this run's label set before anything
    else starts; otherwise TrainingError naming the file and what it is."""
    path = Path(cfg.resume)
    if not path.is_file():
        raise TrainingError(f"--resume {path}: no such file (nothing to resume)")
    try:
        state = read_checkpoint_file(path)
    except CheckpointError as err:
        raise TrainingError(f"--resume {path}: " + str(err).removeprefix(f"checkpoint {path}: ")) from None
    kind = checkpoint_kind(state)
    if kind == "model checkpoint":
        raise TrainingError(f"--resume {path} is a model checkpoint, not a training state: pass it as "
                            "--init-from (it holds weights only: no optimizer, SCHP model or random states)")
    if kind != "training state":
        keys = sorted(map(str, state)) if isinstance(state, dict) else []
        missing = [k for k in TRAINING_STATE_KEYS if k not in keys]
        what = f"an incomplete training state (no {', '.join(missing)})" if kind == "partial training state" \
            else f"not a training state ({type(state).__name__}" + (f" of {', '.join(keys[:5])}" if keys else "") + ")"
        raise TrainingError(f"--resume {path} is {what}; resume from a last.pth.tar that train.py wrote")
    classes = state_classes(state) or len(state.get("labels", ()))
    dataset = state.get("dataset") or "SCHP"
    spec = cfg.spec
    if classes != spec.num_classes or dataset not in ("SCHP", spec.name):
        raise TrainingError(f"--resume {path} is a {dataset} training state ({classes} classes), but --dataset "
                            f"{spec.name} ({spec.num_classes} classes)")
    expected = expected_state(spec)
    try:
        for key in ("state_dict", "schp_state_dict"):
            check_state_dict(strip_prefix(state[key]), expected, spec, path)
    except CheckpointError as err:
        raise TrainingError(f"--resume: {err}") from None
    return state


def load_init(model: CE2P, path: Path) -> List[str]:
    """Weights of a released or own checkpoint (--init-from); heads whose class count differs keep their
    fresh init. Returns the re-initialised module names."""
    from schp.data.catalog import custom_spec

    own = model.state_dict()
    spec = custom_spec(model.fushion[3].weight.shape[0])
    try:  # read once, nothing converted into the cache
        state, _ = load_checkpoint(spec, path, allow_download=False, cache_dir=None, classes_may_differ=True)
    except CheckpointError as err:
        raise TrainingError(f"--init-from: {err}") from None
    fresh = [k for k in own if tuple(state[k].shape) != tuple(own[k].shape)]
    own.update({k: v for k, v in state.items() if k not in fresh})
    model.load_state_dict(own, strict=True)
    return sorted({k.rsplit(".", 1)[0] for k in fresh})


def read_file(option: str, path: Path):
    try:
        return read_training_file(path)
    except CheckpointError as err:
        raise TrainingError(f"{option}: {err}") from None


def start_models(cfg: TrainConfig, ranks: Rank, say: Callable[[str], None], resume_state: Optional[Dict] = None):
    """(model, schp_model, optimizer, start_epoch, cycle_n, seed): what the job starts from, on the CPU.

    In order: --resume (all of it: `resume_state`, from read_resume), else the released-style
    --model-restore / --schp-restore files when they exist, on top of --init-from or the ImageNet backbone.
    """
    seed = cfg.seed
    if resume_state is not None:
        seed = int(resume_state["seed"])
    elif seed is None:
        seed = ranks.broadcast(random.SystemRandom().randrange(2 ** 31))
    seed_everything(seed)

    model = CE2P(cfg.spec.num_classes)
    if resume_state is None:
        if cfg.init_from is not None:
            heads = load_init(model, cfg.init_from)
            if heads:
                say(f"re-initialised for {cfg.spec.num_classes} classes (the checkpoint's count differs): "
                    + ", ".join(heads))
        elif cfg.imagenet_pretrain is not None:
            try:
                load_imagenet(model, cfg.imagenet_pretrain)
            except PretrainedWeightsError as err:
                hint = "" if Path(cfg.imagenet_pretrain).is_file() else \
                    " or pass --imagenet-pretrain none to train from scratch"
                raise TrainingError(err.describe("--imagenet-pretrain") + hint) from None
    schp_model = copy.deepcopy(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.learning_rate, momentum=cfg.momentum,
                                weight_decay=cfg.weight_decay)
    start_epoch, cycle_n = 0, 0
    if resume_state is not None:
        try:
            model.load_state_dict(strip_prefix(resume_state["state_dict"]), strict=True)
            schp_model.load_state_dict(strip_prefix(resume_state["schp_state_dict"]), strict=True)
            optimizer.load_state_dict(resume_state["optimizer"])
            start_epoch, cycle_n = int(resume_state["epoch"]), int(resume_state["cycle_n"])
            set_rng_state(resume_state["rng"])
        except (RuntimeError, ValueError, KeyError, TypeError) as err:
            raise TrainingError(f"--resume {cfg.resume}: the training state does not fit this model "
                                f"({describe_exception(err)})") from None
        say(f"resuming {cfg.resume} at epoch {start_epoch} (cycle {cycle_n})")
    else:  # the released resume: explicit files, if they exist
        if cfg.model_restore is not None and Path(cfg.model_restore).is_file():
            restored = read_file("--model-restore", Path(cfg.model_restore))
            model.load_state_dict(strip_prefix(restored["state_dict"]), strict=True)
            start_epoch = int(restored.get("epoch", 0))
            say(f"restored {cfg.model_restore}: starting at epoch {start_epoch}")
        if cfg.schp_restore is not None and Path(cfg.schp_restore).is_file():
            restored = read_file("--schp-restore", Path(cfg.schp_restore))
            schp_model.load_state_dict(strip_prefix(restored["state_dict"]), strict=True)
            cycle_n = int(restored.get("cycle_n", 0))
            say(f"restored {cfg.schp_restore}: cycle {cycle_n}")
    return model, schp_model, optimizer, start_epoch, cycle_n, seed


def place_models(model, schp_model, optimizer, cfg: TrainConfig, ranks: Rank, device: torch.device) -> Models:
    """The models on `device` (momentum buffers too), synchronised batch norm and DDP under torchrun."""
    model.to(device).train()
    schp_model.to(device)
    for state in optimizer.state.values():  # momentum buffers follow the model's device
        for k, v in state.items():
            if isinstance(v, torch.Tensor):
                state[k] = v.to(device)
    if cfg.sync_bn and ranks.started:
        for layer in model.modules():
            if isinstance(layer, InPlaceABN):
                layer.sync_group = "world"
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    net = model
    if ranks.started:
        from torch.nn.parallel import DistributedDataParallel
        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    return Models(model, schp_model, net, optimizer)


def make_loader(dataset: TrainingSet, cfg: TrainConfig, ranks: Rank, device: torch.device, seed: int):
    sampler = DistributedSampler(dataset, num_replicas=ranks.world_size, rank=ranks.rank, shuffle=True, seed=seed)
    loader = DataLoader(dataset, batch_size=cfg.batch_size, sampler=sampler, num_workers=cfg.num_workers,
                        drop_last=True, pin_memory=device.type == "cuda",
                        worker_init_fn=worker_init)  # workers leave the stop signals to the main process
    return sampler, loader


def progress_bar(epoch: int, cfg: TrainConfig):
    from tqdm import tqdm

    return lambda loader: tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False, dynamic_ncols=True,
                               mininterval=1.0)


def _run(cfg: TrainConfig, ranks: Rank, device: torch.device, say, shout) -> int:
    if cfg.batch_size < 2:
        raise TrainingError("--batch-size must be >= 2: batch statistics need more than one value per channel")
    # a file that cannot be resumed fails at once, not after the data check
    resume_state = read_resume(cfg) if cfg.resume is not None and not cfg.check_data_only else None
    samples = check_data(cfg, ranks, shout)
    say(f"{cfg.split}: {len(samples)} samples in {cfg.data_dir}, all usable")
    if cfg.check_data_only:
        return 0
    log_dir = Path(cfg.log_dir)
    created: List[Path] = []  # the folders this set-up made: removed again if it fails
    try:
        if ranks.is_main:
            try:
                ensure_writable(log_dir, created)
            except SetupError as err:
                raise TrainingError(f"--log-dir {log_dir}: {err}") from None
            remove_stale_temporaries(log_dir)  # half-written files of a killed run
        model, schp_model, optimizer, start_epoch, cycle_n, seed = start_models(cfg, ranks, say, resume_state)
        del resume_state  # its tensors are in the models now
        models = place_models(model, schp_model, optimizer, cfg, ranks, device)
        dataset = TrainingSet(samples, cfg.spec.input_size, cfg.flip_pairs, cfg.split in AUGMENTED_SPLITS, seed,
                              max_pixels=cfg.max_pixels)
        sampler, loader = make_loader(dataset, cfg, ranks, device, seed)
        metrics_path = log_dir / "metrics.jsonl"
        rows = [r for r in read_metrics(metrics_path) if r.get("epoch", 0) < start_epoch] if ranks.is_main else []
        if ranks.is_main:
            with atomic_path(log_dir / "args.json") as tmp:
                tmp.write_text(json.dumps({**cfg.args, "seed": seed}, indent=1, default=str) + "\n")
    except OSError as err:  # a system error while setting up: one line, exit 2, nothing left behind
        remove_empty(created)
        raise TrainingError(f"set-up failed: {err.filename + ': ' if err.filename else ''}"
                            f"{err.strerror or err}") from None
    except BaseException:  # any failed set-up (or Ctrl-C during it) leaves no folder it made
        remove_empty(created)
        raise
    criterion = SCHPLoss(cfg.lambda_s, cfg.lambda_e, cfg.lambda_c, cfg.fix_ignore)
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if cfg.precision == "bf16" \
        else nullcontext
    facts = label_facts(cfg.spec, cfg.flip_pairs)
    validating = has_split(cfg.data_dir, "val")
    stop_at = cfg.epochs if cfg.stop_after is None else min(cfg.epochs, start_epoch + cfg.stop_after)

    for epoch in range(start_epoch, stop_at):
        started = time.time()
        lr = learning_rate(epoch, cfg.learning_rate, cfg.warmup_epochs, cfg.schp_start, cfg.cycle_epochs)
        sampler.set_epoch(epoch)
        dataset.set_epoch(epoch, 0)
        row = train_one_epoch(models, criterion, loader, epoch, lr, cycle_n, device=device, autocast=autocast,
                              ranks=ranks, soft_eval_mode=cfg.soft_eval_mode, last=log_dir / LAST,
                              progress=progress_bar(epoch, cfg) if ranks.is_main and not cfg.quiet else None)
        done = epoch + 1
        if done % cfg.eval_epochs == 0 and ranks.is_main:
            write_model_checkpoint(log_dir / f"checkpoint_{done}.pth.tar", facts, epoch=done,
                                   state_dict=module_state(model))
        if is_cycle_end(epoch, cfg.schp_start, cfg.cycle_epochs):
            cycle_n = self_correct(models, cycle_n, epoch, dataset, sampler, loader, device=device,
                                   autocast=autocast, ranks=ranks)
            if ranks.is_main:
                write_model_checkpoint(log_dir / f"schp_{cycle_n}_checkpoint.pth.tar", facts,
                                       state_dict=module_state(schp_model), cycle_n=cycle_n)
            row["schp_saved"] = cycle_n
        if validating and done % cfg.eval_epochs == 0 and ranks.is_main:
            evaluated = schp_model if cycle_n >= 1 else model
            state = {k: v.detach().cpu().clone() for k, v in evaluated.state_dict().items()}
            row.update(validate(cfg.spec, state, cfg.data_dir, device))
            row["val_model"] = "schp" if cycle_n >= 1 else "model"
            model.train()
        row["seconds"] = round(time.time() - started, 3)
        if ranks.is_main:
            write_training_state(log_dir / LAST, facts, epoch=done, cycle_n=cycle_n, model=model,
                                 schp_model=schp_model, optimizer=optimizer, rng=rng_state(), seed=seed,
                                 args=json.loads(json.dumps(cfg.args, default=str)))
            rows.append(row)
            write_metrics(metrics_path, rows)
            draw_curves(rows, log_dir / "curves.png")
            say(f"epoch {epoch}: loss {row['loss']:.4f}  lr {lr:.4g}  cycle {row['cycle_n']}"
                + (f"  val mIoU {row['val_mean_iou']:.2f}%" if "val_mean_iou" in row else "")
                + f"  {row['seconds']:.1f} s")
        ranks.barrier()
    if stop_at < cfg.epochs:
        say(f"stopped after epoch {stop_at - 1} as asked; continue with --resume {log_dir / LAST}")
    return 0
