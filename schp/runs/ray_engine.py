"""The extractor's Ray engine: a folder (or an object-store URL) parsed on a Ray cluster with Ray Data.

Three stages of one streaming Ray Data pipeline, each reusing the plain engine's functions:

1. decode and crop (`decode_row`, CPU tasks): schp.data.crop.decode_and_crop over read_image (a
   local file) or decode_image (an object's bytes), with the same checks and one-line reasons;
2. the network (`ModelActor`, `map_batches` on an actor pool of `ray_actors` actors, each with
   `ray_gpus_per_actor` GPUs and `ray_cpus_per_actor` CPUs): the model loads once per actor through
   schp.runs.extract.load_model (the one loading path, any backend) and runs HumanParser.crop_results;
3. inverse warp and writing (`write_row`, CPU tasks): schp.runs.parsing.write_image, the plain
   engine's writer, into the output folder, or into a scratch folder whose files are then uploaded
   whole, one object each.

The run itself is the one run loop (schp.runs.loop.run) with `RayJob` as its job: planning (skip what
is done, refuse what cannot be done), the outcomes, the stop signals, the manifest and the exit code
are those of the plain engine. Ray retries a task or restarts an actor whose process died (kill -9,
out of memory), so a lost worker costs a retry; every output is written whole (a temporary renamed,
or one upload), so a retried write leaves one copy and no partial object. Nothing is started when
every input is already done.
"""
import logging
import os
import signal
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence

from schp.errors import SetupError
from schp.runs.extract import Extraction, ExtractOptions, PathLike, Plan, ensure_writable, remove_empty, setup_message
from schp.runs.loop import STOP_SIGNALS, Job, Reporter, RunReport, Unit
from schp.runs.objects import ObjectPath, is_url, list_url_images, local_path, open_url, output_listing

# environment variables a worker needs as the driver has them: object-store credentials and
# endpoints, fsspec settings, the checkpoint cache and backend of this project
FORWARDED_ENV = ("AWS_", "GOOGLE_", "GCS_", "AZURE_", "FSSPEC_", "SCHP_")
# rows per block of the input list: one image streams through alone, up to this many blocks
MAX_BLOCKS = 10_000
# the model's options, all an actor needs to load it
MODEL_OPTIONS = ("checkpoint", "device", "gpu", "precision", "backend", "allow_tf32", "flip", "scales")
# memory a decode or write task reserves on its node (a 24-megapixel photo decodes to 72 MB; the write
# stage holds one image's logits). Stated on the CPU stages and not on the actors, it also keeps Ray
# Data from fusing the decoding into the model actors (it fuses only stages with equal reservations).
# A task whose worker died is retried (Ray's default: 3 times); an actor is restarted (Ray Data's).
STAGE_MEMORY = 256 << 20
PASSED_ON = ("k", "source", "png", "logits", "overlay", "width", "height", "error", "started")


@dataclass
class RayOptions:
    """Where and how wide the Ray engine runs (the command line's --ray-* options)."""
    ray_address: Optional[str] = None  # None: $RAY_ADDRESS, else a local Ray started for the run
    ray_actors: int = 1
    ray_gpus_per_actor: float = 0.0
    ray_cpus_per_actor: float = 1.0

    def check(self) -> None:
        if self.ray_actors < 1:
            raise SetupError("must be >= 1", "ray_actors", self.ray_actors)
        if self.ray_gpus_per_actor < 0:
            raise SetupError("must be >= 0", "ray_gpus_per_actor", self.ray_gpus_per_actor)
        if self.ray_cpus_per_actor < 0 or (self.ray_cpus_per_actor == 0 and self.ray_gpus_per_actor == 0):
            raise SetupError("must be > 0 (or give the actors GPUs)", "ray_cpus_per_actor", self.ray_cpus_per_actor)


def require_ray():
    """The ray module with Ray Data, or a SetupError naming the package."""
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise SetupError("the Ray engine needs the Python package ray[data] "
                         "(pip install -r requirements-ray.txt)") from None
    return ray


# ----------------------------------------------------------------------------- planning
def plan_ray(input_dir: PathLike, output_dir: PathLike, options: ExtractOptions) -> Plan:
    """The folder mode's plan with local folders or URLs on either side: the same listing rule, output
    names, clash refusals and skip rule; videos are refused (the plain engine parses them)."""
    from schp.runs.extract import folder_tasks, plan_folder
    from schp.runs.tasks import VideoTask

    input_dir, output_dir = local_path(input_dir), local_path(output_dir)
    if not is_url(input_dir) and not is_url(output_dir):
        plan = plan_folder(input_dir, output_dir, options)
    else:
        if str(input_dir).rstrip("/") == str(output_dir).rstrip("/"):
            raise SetupError("{output_dir} must differ from {input_dir} (outputs would be taken for inputs)",
                             mentions={"output_dir": ..., "input_dir": ...})
        if is_url(input_dir):
            images, others, found = list_url_images(str(input_dir), options.recursive, exclude=str(output_dir))
            if not found:  # a prefix without objects is no folder
                raise SetupError("no such folder (no objects under it)", "input_dir", str(input_dir))
            in_root = ObjectPath(str(input_dir))
        else:
            from schp.data.listing import list_images
            if not Path(input_dir).is_dir():
                raise SetupError("no such folder", "input_dir", str(input_dir))
            images, others = list_images(Path(input_dir), options.recursive)
            in_root = Path(input_dir)
        out_root = ObjectPath(str(output_dir), listing=output_listing(str(output_dir))) if is_url(output_dir) \
            else Path(output_dir)
        tasks, notes, others = folder_tasks(in_root, out_root, images, others, options)
        plan = Plan("folder", tasks, notes, [in_root / o for o in others])
    for task in plan.tasks:
        if isinstance(task, VideoTask) and not task.refusal:
            task.refusal = "a video: the Ray engine parses images; parse videos with the plain engine"
    return plan


@dataclass
class RayExtraction(Extraction):
    """A planned run on Ray: `run()` starts (or joins) Ray only if something is left to compute."""
    ray_options: RayOptions = None

    def set_up(self, reporter: Reporter):
        from schp.utils.palette import get_palette
        created: List[Path] = []
        try:
            for folder in sorted({p.parent for task in self.plan.tasks for p in task.outputs
                                  if isinstance(p, Path)}):
                ensure_writable(folder, created)
        except (SetupError, OSError) as err:
            remove_empty(created)
            raise SetupError(setup_message(err)) from None
        job = RayJob(self.spec, self.options, self.ray_options, get_palette(self.spec.num_classes),
                     self.label_map)
        if any(task.plan(self.options.overwrite) == "process" for task in self.plan.tasks):
            try:
                job.connect()  # only when something is left to compute, as the plain engine loads its model
            except BaseException:
                remove_empty(created)
                raise
        return job, None, None

    def manifest_extra(self, job: "RayJob") -> Dict[str, Any]:
        checkpoint = self.options.checkpoint
        return {"engine": "ray", "checkpoint": str(checkpoint) if checkpoint else None,
                "device": ", ".join(sorted({d.split("|")[0] for d in job.devices})) or None,
                "backend": ", ".join(sorted({d.split("|")[-1] for d in job.devices})) or None,
                "ray": {"address": job.address, "actors": self.ray_options.ray_actors,
                        "gpus_per_actor": self.ray_options.ray_gpus_per_actor,
                        "cpus_per_actor": self.ray_options.ray_cpus_per_actor}}


def prepare_ray_extraction(input_dir: PathLike, output_dir: PathLike, *, ray_address: Optional[str] = None,
                           ray_actors: int = 1, ray_gpus_per_actor: float = 0.0, ray_cpus_per_actor: float = 1.0,
                           **options) -> RayExtraction:
    """Check the options and plan the run on Ray (nothing started, no model): the dry run's step too."""
    ray_options = RayOptions(ray_address, int(ray_actors), float(ray_gpus_per_actor), float(ray_cpus_per_actor))
    ray_options.check()
    if options.get("integratedpifu_dir") is not None:
        raise SetupError("the Ray engine parses folders (input_dir, output_dir); not {integratedpifu_dir}",
                         mentions={"integratedpifu_dir": ...})
    if "WORLD_SIZE" in os.environ:
        raise SetupError("the Ray engine schedules its own workers: run it without torchrun")
    options.pop("integratedpifu_dir", None)
    import importlib.util
    if importlib.util.find_spec("ray") is None:  # said before any work, not when the first input is due
        require_ray()
    from schp.runs.extract import check_output_dir, check_summary, checked_options
    o, spec, label_map = checked_options(options)
    if input_dir is None or output_dir is None:
        raise SetupError("folder mode needs {input_dir} and {output_dir}",
                         mentions={"input_dir": ..., "output_dir": ...})
    if not is_url(output_dir):
        check_output_dir(local_path(output_dir))
    check_summary(o.summary)
    plan = plan_ray(input_dir, output_dir, o)
    if o.shard:
        index, count = o.shard
        plan.tasks = plan.tasks[index - 1::count]
    return RayExtraction(plan, o, spec, label_map, ray_options=ray_options)


def parse_folder(input_dir: PathLike, output_dir: PathLike, reporter: Optional[Reporter] = None,
                 **options) -> RunReport:
    """schp.runs.extract.parse_folder on Ray: local folders or URLs (s3://, gs://, ...), the options of
    ExtractOptions plus ray_address, ray_actors, ray_gpus_per_actor, ray_cpus_per_actor.

    >>> report = parse_folder("s3://bucket/in", "s3://bucket/out", dataset="lip", ray_actors=4,
    ...                       ray_gpus_per_actor=1, summary="run.json")
    """
    return prepare_ray_extraction(input_dir, output_dir, **options).execute(reporter)


# ----------------------------------------------------------------------------- the stages
def read_object(url: str, max_pixels: Optional[int]):
    """decode_image of an object's bytes, after the size rule a file gets (ImageError with the reason)."""
    from schp.data.decode import ImageError, decode_image, file_size_problem

    fs, path = open_url(url)
    try:
        problem = file_size_problem(fs.size(path), max_pixels)
        if problem:
            raise ImageError(problem)
        data = fs.cat_file(path)
    except FileNotFoundError:
        raise ImageError("cannot read: no such object") from None
    except OSError as err:
        raise ImageError(f"cannot read: {err.strerror or err}") from None
    return decode_image(data, max_pixels)


def decode_row(row: Dict[str, Any], input_size, max_pixels: Optional[int]) -> Dict[str, Any]:
    """Stage 1: an input's pixels, decoded and cropped (or the reason it cannot be)."""
    import numpy as np

    from schp.data.crop import decode_and_crop
    from schp.data.decode import read_image

    started = time.time()
    source = row["source"]
    if is_url(source):
        item = decode_and_crop(0, lambda: read_object(source, max_pixels), input_size)
    else:
        item = decode_and_crop(0, lambda: read_image(Path(source), max_pixels), input_size)
    ok = item.error is None
    return {**row, "crop": item.image if ok else np.zeros((*input_size, 3), np.uint8),
            "center": item.center if ok else np.zeros(2, np.float32),
            "scale": item.scale if ok else np.zeros(2, np.float32),
            "width": item.width, "height": item.height, "error": item.error or "", "started": started}


class ModelActor:
    """Stage 2: the network, in an actor that loads the model once (through load_model)."""

    model_options: Dict[str, Any] = {}
    spec = None

    def __init__(self):
        import cv2

        from schp.runs.extract import load_model
        cv2.setNumThreads(1)
        self.parser, _ = load_model(ExtractOptions(**self.model_options), self.spec)

    def __call__(self, batch: Dict[str, Any]) -> Dict[str, Any]:
        import numpy as np

        from schp.data.crop import Prepared
        from schp.runs.loop import inference_failure

        n = len(batch["k"])
        errors = [str(e) for e in batch["error"]]
        live = [i for i in range(n) if not errors[i]]
        works: List[Optional[Dict[str, Any]]] = [None] * n
        if live:
            items = [Prepared(i, np.asarray(batch["crop"][i]), np.asarray(batch["center"][i]),
                              np.asarray(batch["scale"][i]), int(batch["width"][i]), int(batch["height"][i]))
                     for i in live]
            try:
                results = self.parser.crop_results(items, [bool(batch["logits"][i]) for i in live])
            except Exception as err:  # e.g. out of memory: this batch only
                for i in live:
                    errors[i] = inference_failure(err)
            else:
                for i, work in zip(live, results):
                    works[i] = work
        out = {key: batch[key] for key in PASSED_ON if key in batch}
        out["error"] = np.array(errors, dtype=object)
        out["center"], out["scale"] = batch["center"], batch["scale"]
        out["work"] = np.empty(n, dtype=object)
        out["work"][:] = works
        # the backend as of this batch: with auto it may switch to a runtime prepared in the background
        out["device"] = np.array([f"{self.parser.device}|{self.parser.backend}"] * n, dtype=object)
        return out


class _Warp:
    """The write stage's post-processing: HumanParser.image_labels without the model."""

    def __init__(self, input_size):
        self.input_size = tuple(input_size)

    def image_labels(self, item, result, logits_out=None):
        from schp.inference import crop_labels
        return crop_labels(item, result, self.input_size, logits_out)


def write_outputs(row: Dict[str, Any], work: Dict[str, Any], input_size, palette: Sequence[int], label_map) -> None:
    """The plain engine's write_image for one input; outputs under a URL are written into a scratch
    folder first and then uploaded, each file as one whole object."""
    import numpy as np

    from schp.data.crop import Prepared
    from schp.runs.parsing import write_image
    from schp.runs.tasks import ImageTask

    item = Prepared(0, None, np.asarray(row["center"]), np.asarray(row["scale"]), int(row["width"]),
                    int(row["height"]))
    outputs = {key: row[key] or None for key in ("png", "logits", "overlay")}
    source = row["source"]
    if not is_url(source) and not any(is_url(p) for p in outputs.values() if p):
        task = ImageTask(source=Path(source), name=source, **{k: Path(v) if v else None for k, v in outputs.items()})
        write_image(task, item, _Warp(input_size), work, palette, label_map)
        return
    with tempfile.TemporaryDirectory(prefix="schp-ray-") as scratch:
        uploads = []

        def here(key: str, value: Optional[str]) -> Optional[Path]:
            if not value or not is_url(value):
                return Path(value) if value else None
            path = Path(scratch) / f"{key}{Path(value).suffix}"
            uploads.append((path, value))
            return path

        local_source = Path(source)
        if is_url(source) and outputs["overlay"]:  # the overlay is drawn over the photo: fetch it again
            fs, key = open_url(source)
            local_source = Path(scratch) / f"source{Path(key).suffix}"
            fs.get_file(key, str(local_source))
        task = ImageTask(source=local_source, name=source, **{k: here(k, v) for k, v in outputs.items()})
        write_image(task, item, _Warp(input_size), work, palette, label_map)
        for path, url in uploads:
            fs, key = open_url(url)
            try:
                fs.put_file(str(path), key)
            except OSError as err:
                if not getattr(err, "filename", None):
                    err.filename = url
                raise


def write_row(row: Dict[str, Any], input_size, palette: Sequence[int], label_map) -> Dict[str, Any]:
    """Stage 3: inverse warp, argmax and the outputs of one input; what it reports to the driver."""
    from schp.runs.loop import describe_error

    error = str(row["error"] or "")
    if not error:
        try:
            write_outputs(row, row["work"], input_size, palette, label_map)
        except Exception as err:
            error = describe_error(err)
    return {"k": int(row["k"]), "error": error, "width": int(row["width"]), "height": int(row["height"]),
            "seconds": time.time() - float(row["started"]), "device": str(row.get("device") or "")}


# ----------------------------------------------------------------------------- the job
class RayJob(Job):
    """The run loop's job for the Ray engine: `prepare` streams the pipeline's finished inputs (each
    already written by stage 3); the loop records them as the plain engine's are."""
    batch_size = 1
    write_threads = 1

    def __init__(self, spec, options: ExtractOptions, ray_options: RayOptions, palette, label_map):
        self.spec, self.options, self.ray_options = spec, options, ray_options
        self.palette, self.label_map = list(palette), label_map
        self.address: Optional[str] = None
        self.devices = set()
        self._rows = None
        self._started = False

    def output_folders(self, tasks: Sequence):
        return sorted({p.parent for t in tasks for p in t.outputs if isinstance(p, Path)})

    def connect(self):
        """Join the cluster at ray_address ($RAY_ADDRESS), or start a local Ray for this run."""
        ray = require_ray()
        if self._started:
            return ray
        if ray.is_initialized():  # the caller's own Ray session
            self.address = "the caller's Ray session"
            return ray
        address = self.ray_options.ray_address or os.environ.get("RAY_ADDRESS") or "local"
        import schp
        package_root = str(Path(schp.__file__).resolve().parent.parent)
        env = {k: v for k, v in os.environ.items() if k.startswith(FORWARDED_ENV)}
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH")) if p)
        reachable(address)
        handlers = {s: signal.getsignal(s) for s in STOP_SIGNALS} \
            if signal.getsignal(signal.SIGINT) is not None else {}
        try:
            ray.init(address=address, runtime_env={"env_vars": env}, logging_level=logging.WARNING,
                     log_to_driver=False, **({"include_dashboard": False} if address == "local" else {}))
        except (ConnectionError, RuntimeError, ValueError) as err:
            raise SetupError(f"cannot start or join Ray: {str(err).splitlines()[0]}", "ray_address", address) from None
        finally:
            for s, handler in handlers.items():  # ours, not Ray's: the run loop owns the stop signals
                if handler is not None:
                    signal.signal(s, handler)
        self._started, self.address = True, address
        logging.getLogger("ray").setLevel(logging.WARNING)
        logging.getLogger("ray.data").setLevel(logging.ERROR)  # its execution notes are not the run's
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False  # the run's own bar counts the inputs
        return ray

    def pipeline(self, ray, rows: List[Dict[str, Any]]):
        o, r = self.options, self.ray_options
        input_size = tuple(self.spec.input_size)
        model_options = {k: getattr(o, k) for k in MODEL_OPTIONS}
        if model_options["checkpoint"] and Path(str(model_options["checkpoint"])).exists():
            model_options["checkpoint"] = str(Path(str(model_options["checkpoint"])).resolve())  # workers' cwd differs
        per_block = max(o.batch_size, -(-len(rows) // MAX_BLOCKS))
        ds = ray.data.from_items(rows, override_num_blocks=max(1, -(-len(rows) // per_block)))
        ds = ds.map(decode_row, fn_kwargs={"input_size": input_size, "max_pixels": o.max_pixels or None},
                    num_cpus=1, memory=STAGE_MEMORY)
        # the options as class attributes of a subclass, not constructor arguments: a restarted actor
        # then needs nothing from the object store (whose copy could be gone)
        actor = type("ModelActor", (ModelActor,), {"model_options": model_options, "spec": self.spec})
        ds = ds.map_batches(actor, batch_size=o.batch_size, batch_format="numpy",
                            compute=ray.data.ActorPoolStrategy(size=r.ray_actors),
                            num_cpus=r.ray_cpus_per_actor, num_gpus=r.ray_gpus_per_actor or None)
        return ds.map(write_row, fn_kwargs={"input_size": input_size, "palette": self.palette,
                                            "label_map": self.label_map}, num_cpus=1, memory=STAGE_MEMORY)

    def prepare(self, tasks: Sequence) -> Iterator[Unit]:
        rows = [{"k": k, "source": _resolved(task.source), "png": _resolved(task.png),
                 "logits": _resolved(task.logits), "overlay": _resolved(task.overlay)}
                for k, task in enumerate(tasks)]
        ray = self.connect()  # already joined by set_up
        try:
            self._rows = iter(self.pipeline(ray, rows).iter_rows())
            for row in self._rows:
                if row["device"]:
                    self.devices.add(row["device"])
                yield Unit(int(row["k"]), None, row["error"] or None, int(row["width"]), int(row["height"]),
                           compute=False)
        finally:
            self._close()

    def write(self, task, unit: Unit, work):
        return None  # written by the pipeline's write stage

    def stop(self) -> bool:
        self._close()
        return False

    def _close(self) -> None:
        rows, self._rows = self._rows, None
        close = getattr(rows, "close", None)
        if close is not None:
            try:
                close()
            except Exception:
                pass
        if self._started:
            self._started = False
            import ray
            ray.shutdown()


def reachable(address: str, timeout: float = 10.0) -> None:
    """A host:port address answers (Ray itself would retry for minutes): SetupError naming it if not."""
    import socket
    host, _, port = address.rpartition(":")
    if "://" in address or not host or not port.isdigit():  # local, auto, ray://...: Ray's own rules
        return
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as err:
        raise SetupError(f"no Ray cluster answers there ({err.strerror or err})", "ray_address", address) from None


def _resolved(path) -> str:
    """A row's path: URLs as they are, local paths absolute (the workers' working folder differs)."""
    if path is None:
        return ""
    if isinstance(path, ObjectPath) or is_url(path):
        return str(path)
    return str(Path(path).resolve())
