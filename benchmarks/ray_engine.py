#!/usr/bin/env python3
"""The Ray engine against the plain engine on this machine, and the cost of listing an object store.

1. Throughput: the same folder of images parsed by the plain engine (one process, --num-workers 1;
   with torch's default threads, and with OMP_NUM_THREADS=1 as Ray gives a 1-CPU actor) and by
   --engine ray with 1 and 2 model actors on a local Ray head started here (as many CPUs as
   the machine has); images/s of each and the ratio to the plain engine, measured in the same run.
2. Memory: the driver's peak RSS (each run is a subprocess: its own ru_maxrss), and the peak RSS of
   each Ray stage's worker processes (sampled every 0.2 s from /proc, by process title:
   ray::Map(decode_row), ray::MapWorker(MapBatches(ModelActor)), ray::Map(write_row)).
3. Listing: N empty objects (default 100,000) on a local S3 server (moto's server mode on
   127.0.0.1, in this process, filled directly in its store), listed over HTTP as an input URL
   (list_url_images: what planning does), against
   listing a local folder of N empty files (schp.data.listing.list_images).

    python benchmarks/ray_engine.py                      # all three, synthetic pascal weights at 512 x 512
    python benchmarks/ray_engine.py --images 8 --keys 10000 --input-size 160
    python benchmarks/ray_engine.py --repeat 3 --skip listing      # each engine 3 times, in turn: the median

Prints one JSON object; `uptime` before and after says how loaded the machine was.
"""
import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests" / "data")]
LOOPBACK = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}  # a one-machine cluster on 127.0.0.1
STAGES = {"decode": "ray::Map(decode_row)", "model actor": "ray::MapWorker(MapBatches(ModelActor))",
          "write": "ray::Map(write_row)"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def checkpoint(folder: Path, input_size: int) -> Path:
    """The synthetic pascal weights (tests/data), at the released 512 x 512 or a smaller crop."""
    import torch
    from synth_checkpoint import save_checkpoint, synthetic_checkpoint

    from schp.data.catalog import DATASETS
    path = folder / "synth-pascal.pth"
    save_checkpoint(synthetic_checkpoint("pascal", 0), path, legacy=True)
    if input_size == 512:
        return path
    spec = DATASETS["pascal"]
    obj = torch.load(path, map_location="cpu", weights_only=True)
    obj.update(dataset="custom", labels=list(spec.labels), input_size=[input_size, input_size],
               flip_pairs=[list(p) for p in spec.flip_pairs])
    small = folder / f"synth-pascal-{input_size}.pth"
    torch.save(obj, small)
    return small


def images(folder: Path, count: int) -> None:
    import cv2
    import numpy as np
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(count):
        rng = np.random.default_rng(k)
        cv2.imwrite(str(folder / f"img{k:04d}.jpg"), cv2.GaussianBlur(rng.integers(0, 256, (480, 640, 3), np.uint8),
                                                                       (9, 9), 0))


def descendants(root: int):
    parents, lines = {}, {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                lines[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except (OSError, IndexError, ValueError):
                pass
    found, frontier = [], {root}
    while frontier:
        children = {p for p, q in parents.items() if q in frontier}
        found += [(p, lines.get(p, "")) for p in children]
        frontier = children
    return found


def rss_mib(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


class StageMemory(threading.Thread):
    """Peak RSS per stage among the cluster's worker processes, sampled until stopped."""

    def __init__(self, root: int):
        super().__init__(daemon=True)
        self.root, self.peaks, self.done = root, {k: 0.0 for k in STAGES}, threading.Event()

    def run(self):
        while not self.done.wait(0.2):
            for pid, line in descendants(self.root):
                for stage, title in STAGES.items():
                    if line.startswith(title):
                        self.peaks[stage] = max(self.peaks[stage], rss_mib(pid))


def timed_run(argv, env) -> dict:
    """A run in a subprocess: wall seconds, exit code, the driver's peak RSS (MiB)."""
    with tempfile.TemporaryFile("w+") as log:
        t0 = time.perf_counter()
        proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=log, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            log.seek(0)
            raise SystemExit(f"run failed ({proc.returncode}): {' '.join(map(str, argv))}\n{log.read()[-2000:]}")
    return {"seconds": round(seconds, 2), "driver_peak_rss_mib": round(usage.ru_maxrss / 1024, 1)}


def throughput(args, work: Path) -> dict:
    ckpt = checkpoint(work, args.input_size)
    images(work / "in", args.images)
    model = ["--dataset", "pascal" if args.input_size == 512 else "custom", "--model-restore", str(ckpt),
             "--backend", "torch", "--device", "cpu", "--quiet", "--overwrite", "--input-dir", str(work / "in")]
    env = {**os.environ, **LOOPBACK, "SCHP_BACKEND": "torch", "SCHP_CACHE_DIR": str(work / "cache")}
    extractor = [sys.executable, str(ROOT / "simple_extractor.py")]
    subprocess.run(extractor + model + ["--output-dir", str(work / "warm")], env=env, check=True,
                   stderr=subprocess.DEVNULL)  # the converted-checkpoint cache, made once for every run below
    cores = os.cpu_count() or 1
    port = free_port()
    temp = Path(tempfile.mkdtemp(prefix="schp-ray-"))
    head = subprocess.Popen([str(Path(sys.executable).with_name("ray")), "start", "--head", "--block", "--port",
                             str(port), "--num-cpus", str(cores), "--node-ip-address", "127.0.0.1",
                             "--include-dashboard=false", "--disable-usage-stats", "--temp-dir", str(temp)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    runs = {}
    try:
        deadline = time.monotonic() + 60
        while socket.socket().connect_ex(("127.0.0.1", port)) != 0:
            if time.monotonic() > deadline:
                raise SystemExit("the Ray head did not start")
            time.sleep(0.2)
        time.sleep(2)
        for _ in range(args.repeat):  # the engines in turn, so that a change of machine load hits all of them
            runs.setdefault("plain", []).append(timed_run(extractor + model + ["--output-dir", str(work / "plain")],
                                                          env))
            # the control: Ray gives an actor OMP_NUM_THREADS = its CPUs (1 here); the plain engine with
            # the same one thread tells the engine's effect apart from the thread count's
            runs.setdefault("plain, OMP_NUM_THREADS=1", []).append(
                timed_run(extractor + model + ["--output-dir", str(work / "plain1")], {**env, "OMP_NUM_THREADS": "1"}))
            for actors in (1, 2):
                # the decode and write tasks take 1 CPU each beside the actors: on 2 cores, 2 actors
                # reserve half a core each so that the other stages can run beside them
                cpus = max(0.5, (cores - 1) / actors) if cores > 1 else 0.5
                memory = StageMemory(head.pid)
                memory.start()
                run = timed_run(extractor + model + ["--output-dir", str(work / f"ray{actors}"), "--engine", "ray",
                                                     "--ray-address", f"127.0.0.1:{port}", "--ray-actors",
                                                     str(actors), "--ray-cpus-per-actor", str(cpus)], env)
                memory.done.set()
                memory.join()
                run["stage_peak_rss_mib"] = {k: round(v, 1) for k, v in memory.peaks.items()}
                run["cpus_per_actor"] = cpus
                runs.setdefault(f"ray, {actors} actor{'s' if actors > 1 else ''}", []).append(run)
    finally:
        started = [p for p, _ in descendants(head.pid)]
        head.send_signal(signal.SIGTERM)
        try:
            head.wait(timeout=10)
        except subprocess.TimeoutExpired:
            head.kill()
        for pid in started:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        import shutil
        shutil.rmtree(temp, ignore_errors=True)
    results = {}
    for name, repeats in runs.items():  # the median run of each engine (by time), all times listed
        ordered = sorted(repeats, key=lambda r: r["seconds"])
        results[name] = {**ordered[len(ordered) // 2], "all_seconds": [r["seconds"] for r in repeats]}
    for name, run in results.items():
        run["images_per_s"] = round(args.images / run["seconds"], 3)
        run["time_ratio_to_plain"] = round(run["seconds"] / results["plain"]["seconds"], 2)
    return {"images": args.images, "image_size": "640 x 480", "input_size": args.input_size, "cores": cores,
            "runs": results, "note": "seconds are whole command runs: start-up, model load (once per actor), parsing"}


def listing(args, work: Path) -> dict:
    """The listing goes over HTTP to the server as a run's planning does; the bucket is filled in the
    server's own store (100,000 PUTs over HTTP take about ten minutes on moto, and are not measured)."""
    import moto.backends
    from moto.server import ThreadedMotoServer

    from schp.data.listing import list_images
    from schp.runs.objects import list_url_images
    import logging
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    os.environ.update({"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "bench",
                       "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"})
    try:
        import boto3
        boto3.client("s3").create_bucket(Bucket="bench")
        names = [f"in/{k // 1000:03d}_{k:06d}.jpg" for k in range(args.keys)]
        t0 = time.perf_counter()
        store = moto.backends.get_backend("s3")["123456789012"]["global"]
        for name in names:
            store.put_object("bench", name, b"")
        filled = time.perf_counter() - t0
        t0 = time.perf_counter()
        found, _, _ = list_url_images("s3://bench/in")
        remote = time.perf_counter() - t0
        assert len(found) == args.keys, len(found)
        local_dir = work / "keys"
        local_dir.mkdir()
        for name in names:
            (local_dir / name[3:]).touch()
        t0 = time.perf_counter()
        local, _ = list_images(local_dir)
        local_s = time.perf_counter() - t0
        assert len(local) == args.keys
    finally:
        server.stop()
    return {"keys": args.keys, "s3_listing_s": round(remote, 2), "local_folder_listing_s": round(local_s, 3),
            "ratio_s3_to_local": round(remote / local_s, 1), "keys_per_s": round(args.keys / remote),
            "list_requests": -(-args.keys // 1000), "filling_the_bucket_in_process_s": round(filled, 1)}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=16)
    p.add_argument("--input-size", type=int, default=512, help="512 = the released pascal size; smaller is faster")
    p.add_argument("--keys", type=int, default=100_000)
    p.add_argument("--repeat", type=int, default=1, help="runs of each engine, in turn; the median is reported")
    p.add_argument("--skip", choices=["throughput", "listing"], action="append", default=[])
    args = p.parse_args()
    out = {"uptime_before": uptime()}
    with tempfile.TemporaryDirectory(prefix="schp-bench-ray-") as folder:
        work = Path(folder)
        if "throughput" not in args.skip:
            out["throughput"] = throughput(args, work)
        if "listing" not in args.skip:
            out["listing"] = listing(args, work)
    out["uptime_after"] = uptime()
    with open("/proc/cpuinfo") as info:
        out["cpu"] = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), "unknown")
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    sys.exit(main())
