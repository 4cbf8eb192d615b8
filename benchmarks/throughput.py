#!/usr/bin/env python3
"""Throughput benchmark of simple_extractor.py against the original SCHP pipeline, on the CPU.

What it measures, in one run on this machine:

* the fp32 matmul rate (best 2048x2048 torch.mm over ~3 s, torch's default threads) and from it the
  "floor": the released network's FLOP count (counted by torch's FlopCounterMode on the transliterated
  original, tests/original_pipeline.py: 174.6 GFLOP for pascal at 512x512, 153.0 for lip at 473)
  divided by that rate, i.e. the seconds per image if every FLOP ran at matmul speed; likewise the
  "conv floor" from the rate of a lone 3x3 convolution, the limit the backends are held to. This
  project's graph computes fewer FLOPs for the same result (150.0 GFLOP for pascal: convolutions over
  upsampled maps run at the maps' own size), so the "graph floor" (its own FLOPs at the convolution
  rate) is reported too: how close the backends run to the convolution rate on the work they do;
* the baseline: tests/original_pipeline.run_original, one image at a time in this process (model loaded
  once, load excluded), timing decode + warp + forward + inverse warp + argmax + writing the palette PNG
  with PIL like the original; mean over the images after one warm-up image;
* a cold start-up (empty SCHP_CACHE_DIR: the CLI converts the legacy checkpoint to its cached zip copy)
  and a warm one (cache filled), each on a single image;
* every CLI configuration, as a subprocess
  ``simple_extractor.py --dataset D --model-restore CKPT --input-dir IMGS --output-dir OUT --quiet <config>``
  under ``/usr/bin/time -v`` with the (already filled) cache: wall time, time from process start to the
  first output PNG (output folder polled every 20 ms), steady-state seconds per image, images/s, peak RSS,
  the ratios to the floor and to the baseline, and the share of label pixels equal to those of the
  fp32 batch-1 configuration (and of the baseline).

The machine may be shared: every measurement notes the CPU time other processes used meanwhile
(/proc/stat minus our own and the CLI's rusage), waits first for the CPU to be idle (--wait-idle), re-runs
a disturbed CLI configuration (--retries, the least disturbed run is kept) and flags what stayed disturbed.

Backends: the default configurations run the network with each ``--backend`` (torch, onnxruntime,
openvino) side by side; the one-time ONNX export that the runtime backends make on first use is timed
separately (a one-image run into the cache) so the configurations measure steady-state inference, and
"agree vs ref" is each backend's pixel agreement with the torch backend (fp32, batch 1) in the same run.

Steady state per image: the brief's ``(t_last - t_first) / (N - 1)`` ("naive" column) under-counts
batched runs, whose first output only appears after a whole batch of B forwards; the main column is
``(t[N-1] - t[B-1]) / (N - B)`` with the output times sorted, i.e. from the end of the first batch to the
end of the last one, which equals the naive figure when B = 1.

Inputs are N seeded, render-like 1024x1024 RGB PNGs (a clothed, person-like figure on black, like the
IntegratedPIFu renders) and a synthetic checkpoint (tests/data/synth_checkpoint.py, legacy released
format) unless --checkpoint is given. Everything goes to a temporary folder removed at the end.

Rerun (from the repository root; takes several minutes on 2 cores with the defaults):

    python benchmarks/throughput.py --out results.json
    python benchmarks/throughput.py --network-only --network-rounds 10   # the backends' network alone
    python benchmarks/throughput.py --images 6 --skip-baseline \\
        --configs "fp32 --batch-size 2" "--precision bf16 --batch-size 2 --num-workers 2"

Two studies run on their own (docs/performance.md):

    python benchmarks/throughput.py --first-map --out first_map.json   # time to first map, auto vs torch
    python benchmarks/throughput.py --limits --images 24 --out limits.json  # fp32/bf16 against the conv limit,
                                                                             # end to end and the network alone

A config string is passed to the CLI as-is (shell-split); a leading bare fp32/bf16/fp16 is short for
``--precision fp32`` etc. Exit status: 0 if every run succeeded, 1 if any failed, 2 on a setup error.
"""
import argparse
import datetime
import functools
import importlib.util
import json
import os
import platform
import re
import resource
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
CLI = ROOT / "simple_extractor.py"
SYNTH = ROOT / "tests" / "data" / "synth_checkpoint.py"
ORIGINAL = ROOT / "tests" / "original_pipeline.py"

NUM_CLASSES = {"pascal": 7, "lip": 20, "atr": 18}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}  # the precisions' torch types (conv rates)
DEFAULT_CONFIGS = ["fp32 --batch-size 1 --num-workers 1 --backend torch",
                   "fp32 --batch-size 1 --num-workers 1 --backend onnxruntime",
                   "fp32 --batch-size 1 --num-workers 1 --backend openvino",
                   "fp32 --batch-size 4 --num-workers 2 --backend torch",
                   "fp32 --batch-size 4 --num-workers 2 --backend openvino",
                   "bf16 --batch-size 4 --num-workers 2 --backend torch",
                   "bf16 --batch-size 1 --num-workers 1 --backend openvino"]
LIMIT_CONFIGS = ["fp32 --backend torch", "fp32 --backend onnxruntime", "fp32 --backend openvino", "fp32 --backend auto",
                 "bf16 --backend torch --batch-size 4 --num-workers 2", "bf16 --backend openvino", "bf16 --backend auto"]
POLL = 0.02  # s, output-folder polling period
PSS_EVERY = 0.5  # s, process-tree memory sampling period
GNU_TIME = "/usr/bin/time"
LOAD_WARN = 0.1  # cores of foreign CPU use above which a measurement is flagged


class BenchError(Exception):
    pass


# ----------------------------------------------------------------------------- machine
def machine_info():
    cpu = "unknown"
    try:
        fields = {}
        for line in open("/proc/cpuinfo"):
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
        # the model name alone ("AMD EPYC" on some virtual machines) does not tell the generation
        cpu = f"{fields.get('model name', 'unknown')} (family {fields.get('cpu family', '?')}, " \
              f"model {fields.get('model', '?')})"
        flags = next((line for line in open("/proc/cpuinfo") if line.startswith("flags")), "")
        isa = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f" {f}" in flags]
    except OSError:
        isa = []
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
        commit = (commit + ("+uncommitted changes" if dirty else "")) or "unknown"
    except OSError:
        commit = "unknown"
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "cpu": cpu, "isa": isa, "cores": os.cpu_count(), "usable_cores": len(os.sched_getaffinity(0)),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "python": platform.python_version(), "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(), "opencv": cv2.__version__, "numpy": np.__version__,
        "repo_commit": commit,
    }


def matmul_rate(dtype=torch.float32, seconds=3.0, n=2048):
    """Best-of GFLOP/s of an n x n x n torch.mm repeated for ~`seconds` (torch's default threads)."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    c = torch.empty(n, n, dtype=dtype)
    for _ in range(2):
        torch.mm(a, b, out=c)
    times, end = [], time.perf_counter() + seconds
    while time.perf_counter() < end or len(times) < 3:
        t0 = time.perf_counter()
        torch.mm(a, b, out=c)
        times.append(time.perf_counter() - t0)
    flop = 2.0 * n ** 3
    return {"best_gflops": flop / min(times) / 1e9, "median_gflops": flop / statistics.median(times) / 1e9,
            "calls": len(times)}


def lone_conv_rate(channels, side, dtype=torch.float32, seconds=3.0, min_calls=3):
    """Best-of (and median) GFLOP/s of a lone 3x3 `channels`->`channels` convolution on `side` x `side`,
    channels-last (oneDNN's path), in `dtype`, over about `seconds` after three warm-up calls."""
    x = torch.randn(1, channels, side, side).to(dtype).contiguous(memory_format=torch.channels_last)
    w = (torch.randn(channels, channels, 3, 3) * 0.02).to(dtype).contiguous(memory_format=torch.channels_last)
    times = []
    with torch.inference_mode():
        for _ in range(3):
            torch.nn.functional.conv2d(x, w, padding=1)
        end = time.perf_counter() + seconds
        while time.perf_counter() < end or len(times) < min_calls:
            t0 = time.perf_counter()
            torch.nn.functional.conv2d(x, w, padding=1)
            times.append(time.perf_counter() - t0)
    flop = 2.0 * channels * channels * 9 * side * side
    return {"best_gflops": flop / min(times) / 1e9, "median_gflops": flop / statistics.median(times) / 1e9,
            "calls": len(times)}


def conv_rate(seconds=3.0):
    """Best-of fp32 GFLOP/s of a 3x3 256->256 convolution on 128x128, channels-last (oneDNN's path).

    torch.mm goes through MKL, which may run below what oneDNN's convolutions reach on the same cores
    (on AMD CPUs MKL does not take its AVX-512 path), so the matmul floor can be no floor at all."""
    return lone_conv_rate(256, 128, seconds=seconds)


def cpu_snapshot():
    """(busy CPU seconds of the whole machine, CPU seconds of this process) -- to spot other load."""
    fields = [int(v) for v in open("/proc/stat").readline().split()[1:]]
    busy = sum(fields[:8]) - fields[3] - fields[4]  # all but idle and iowait (guest time is within user)
    me = resource.getrusage(resource.RUSAGE_SELF)
    return busy / os.sysconf("SC_CLK_TCK"), me.ru_utime + me.ru_stime


def other_load(start, seconds, child_cpu=0.0):
    """Mean number of cores kept busy by processes other than this one and its measured child."""
    busy, mine = cpu_snapshot()
    return max(0.0, (busy - start[0]) - (mine - start[1]) - child_cpu) / seconds if seconds > 0 else 0.0


def wait_idle(max_wait, what):
    """Wait (up to `max_wait` s) for a 1-s window in which other processes use < LOAD_WARN cores."""
    deadline, said = time.monotonic() + max_wait, False
    while True:
        snap, t0 = cpu_snapshot(), time.perf_counter()
        time.sleep(1.0)
        load = other_load(snap, time.perf_counter() - t0)
        if load < LOAD_WARN:
            return True
        if time.monotonic() >= deadline:
            print(f"  (machine still busy, {load:.2f} cores used by others; measuring {what} anyway)", flush=True)
            return False
        if not said:
            print(f"  (other processes use {load:.2f} cores; waiting up to {max_wait:.0f} s before {what})",
                  flush=True)
            said = True


@functools.lru_cache(maxsize=None)
def original_pipeline():
    """tests/original_pipeline.py (the transliterated released code), loaded once from its file."""
    spec = importlib.util.spec_from_file_location("original_pipeline", ORIGINAL)
    original = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(original)
    return original


def network_gflop(dataset):
    """(released, ours): GFLOP per image at the dataset's input size, counted by torch's FlopCounterMode
    on meta tensors, for the transliterated original network and for this project's CE2P."""
    from torch.utils.flop_counter import FlopCounterMode

    sys.path.insert(0, str(ROOT))
    from schp.data.catalog import DATASETS
    from schp.networks import build_ce2p

    original = original_pipeline()
    counts = []
    with torch.device("meta"):
        for model in (original.ResNet(num_classes=NUM_CLASSES[dataset]).eval(), build_ce2p(NUM_CLASSES[dataset])):
            with torch.no_grad(), FlopCounterMode(display=False) as counter:
                model(torch.zeros(1, 3, *DATASETS[dataset].input_size))
            counts.append(counter.get_total_flops() / 1e9)
    return tuple(counts)


# ----------------------------------------------------------------------------- inputs
def render_like_image(seed, size=1024):
    """A clothed, person-like figure on black (RGB uint8), shaded and noisy, deterministic per seed."""
    rng = np.random.default_rng([2024, seed])
    s = size / 1024.0
    img = np.zeros((size, size, 3), np.uint8)
    skin = tuple(int(v) for v in rng.integers([150, 110, 80], [240, 190, 160]))
    hair = tuple(int(v) for v in rng.integers(10, 90, 3))
    shirt = tuple(int(v) for v in rng.integers(30, 230, 3))
    pants = tuple(int(v) for v in rng.integers(20, 160, 3))
    shoes = tuple(int(v) for v in rng.integers(0, 60, 3))
    cx = size / 2 + rng.uniform(-60, 60) * s
    top = rng.uniform(40, 90) * s
    P = lambda x, y: (int(round(x)), int(round(y)))  # noqa: E731
    head_y = top + 65 * s
    neck_y, hip_y, knee_y, foot_y = top + 140 * s, top + 480 * s, top + 690 * s, top + 890 * s
    sh_l, sh_r = (cx - 105 * s, top + 165 * s), (cx + 105 * s, top + 165 * s)
    # legs (pants, then shoes), slightly spread
    for side in (-1, 1):
        hip = (cx + side * 55 * s, hip_y)
        knee = (cx + side * rng.uniform(55, 95) * s, knee_y)
        foot = (cx + side * rng.uniform(50, 120) * s, foot_y)
        cv2.line(img, P(*hip), P(*knee), pants, int(80 * s))
        cv2.line(img, P(*knee), P(*foot), pants, int(62 * s))
        cv2.ellipse(img, P(foot[0] + side * 15 * s, foot[1] + 20 * s), P(48 * s, 22 * s), 0, 0, 360, shoes, -1)
    # torso: a trapezoid shirt over the hips
    torso = np.array([P(*sh_l), P(*sh_r), P(cx + 85 * s, hip_y + 20 * s), P(cx - 85 * s, hip_y + 20 * s)])
    cv2.fillConvexPoly(img, torso, shirt)
    # arms: sleeve on the upper arm, skin below, random pose
    for side, shoulder in ((-1, sh_l), (1, sh_r)):
        a1 = np.deg2rad(rng.uniform(10, 60))
        a2 = a1 + np.deg2rad(rng.uniform(-30, 40))
        elbow = (shoulder[0] + side * 170 * s * np.sin(a1), shoulder[1] + 170 * s * np.cos(a1))
        hand = (elbow[0] + side * 160 * s * np.sin(a2), elbow[1] + 160 * s * np.cos(a2))
        cv2.line(img, P(*shoulder), P(*elbow), shirt, int(52 * s))
        cv2.line(img, P(*elbow), P(*hand), skin, int(40 * s))
        cv2.circle(img, P(*hand), int(26 * s), skin, -1)
    # neck, head, hair
    cv2.line(img, P(cx, head_y + 40 * s), P(cx, neck_y + 20 * s), skin, int(46 * s))
    cv2.ellipse(img, P(cx, head_y), P(52 * s, 66 * s), 0, 0, 360, skin, -1)
    cv2.ellipse(img, P(cx, head_y - 12 * s), P(56 * s, 60 * s), 0, 180, 360, hair, -1)
    # shading (a soft light from one side), texture noise, anti-aliased edges; background stays black
    mask = img.any(axis=2)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    light = 0.75 + 0.35 * np.cos(np.pi * (xx - rng.uniform(0.2, 0.8))) - 0.15 * yy
    noisy = img.astype(np.float32) * light[..., None] + rng.normal(0, 8, img.shape)
    noisy[~mask] = 0
    img = cv2.GaussianBlur(np.clip(noisy, 0, 255).astype(np.uint8), (3, 3), 0)
    return img  # RGB


def make_images(folder, n):
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        path = folder / f"rendered_image_{i:03d}.png"
        if not cv2.imwrite(str(path), cv2.cvtColor(render_like_image(i), cv2.COLOR_RGB2BGR)):
            raise BenchError(f"cannot write {path}")
        paths.append(path)
    return paths


def make_checkpoint(path, dataset):
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, str(SYNTH), str(path), "--dataset", dataset], cwd=ROOT,
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise BenchError(f"synth_checkpoint.py failed (exit {done.returncode}):\n{done.stderr}")
    return time.perf_counter() - t0


# ----------------------------------------------------------------------------- baseline
def run_baseline(images, checkpoint, dataset, out_dir):
    """Mean seconds per image of the original pipeline (model loaded once), after one warm-up image."""
    original = original_pipeline()
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    model = original.load_model(str(checkpoint), NUM_CLASSES[dataset])
    load = time.perf_counter() - t0
    palette = original.get_palette(NUM_CLASSES[dataset])
    times = []
    snap, start = cpu_snapshot(), time.perf_counter()
    for path in images:
        t0 = time.perf_counter()
        labels, _ = original.run_original(str(path), str(checkpoint), dataset, model=model)
        out = Image.fromarray(np.asarray(labels, dtype=np.uint8))
        out.putpalette(palette)
        out.save(out_dir / f"{path.stem}.png")
        times.append(time.perf_counter() - t0)
        print(f"  baseline {path.name}: {times[-1]:.2f} s", flush=True)
    load_other = other_load(snap, time.perf_counter() - start)
    del model
    measured = times[1:] if len(times) > 1 else times
    return {"seconds_per_image": statistics.mean(measured), "median_seconds_per_image": statistics.median(measured), "per_image": times, "warmup_excluded": len(times) > 1,
            "model_load_seconds": load, "other_load_cores": load_other}


# ----------------------------------------------------------------------------- backends, network only
def time_networks(image_path, checkpoint, dataset, cache_dir, configs, rounds, between_rounds):
    """The network alone as a run's forward stage calls it (one normalised crop of `image_path` -> crop-space
    logits, HumanParser.logits_normalized: the runtime and the upsampling), for each `configs` entry
    {name: (backend, precision)} that can run here, interleaved round by round (the first one rotating) so
    that load from other processes spreads over all of them; `between_rounds()` runs after each round
    (the lone convolution's rate, under the same load). Returns ({name: {"setup_seconds", "times",
    "median_seconds", "best_seconds"}}, {name: the warm-up pass's logits}, other load)."""
    sys.path.insert(0, str(ROOT))
    from schp.data.catalog import DATASETS
    from schp.data.crop import prepare_image
    from schp.data.decode import read_image
    from schp.backends import BackendError
    from schp.checkpoint import read_state_dict
    from schp.inference import HumanParser

    os.environ["SCHP_CACHE_DIR"] = str(cache_dir)  # exports go to (or come from) this run's cache
    spec, state = DATASETS[dataset], read_state_dict(checkpoint)
    crop = torch.from_numpy(prepare_image(0, read_image(image_path), spec.input_size).image[None])
    parsers, results = {}, {}
    for name, (backend, precision) in configs.items():
        t0 = time.perf_counter()
        try:
            parsers[name] = HumanParser(spec, state, torch.device("cpu"), precision, backend=backend)
        except BackendError as err:
            print(f"  {name}: not measured ({err})", flush=True)
            continue
        results[name] = {"setup_seconds": time.perf_counter() - t0, "times": []}
    x = next(iter(parsers.values())).normalize(crop)
    logits = {name: parser.logits_normalized(x) for name, parser in parsers.items()}  # warm-up: first calls allocate
    snap, start = cpu_snapshot(), time.perf_counter()
    names = list(parsers)
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            t0 = time.perf_counter()
            parsers[name].logits_normalized(x)
            results[name]["times"].append(time.perf_counter() - t0)
        between_rounds()
    load = other_load(snap, time.perf_counter() - start)
    for rec in results.values():
        rec["median_seconds"], rec["best_seconds"] = statistics.median(rec["times"]), min(rec["times"])
    return results, logits, load


def network_by_backend(image_path, checkpoint, dataset, cache_dir, rounds):
    """Seconds per forward of the network alone (batch 1, fp32) for each installed backend (time_networks),
    and each backend's label agreement and logits error against torch on that crop."""
    from schp.backends import BACKENDS

    conv_gflops = []  # the lone 3x3 convolution, timed within the same rounds: the limit under the same load
    results, logits, load = time_networks(image_path, checkpoint, dataset, cache_dir,
                                          {b: (b, "fp32") for b in BACKENDS}, rounds,
                                          lambda: conv_gflops.append(conv_rate(seconds=0.3)["best_gflops"]))
    reference = logits["torch"]
    for backend, rec in results.items():
        rec["agreement_vs_torch"] = float((logits[backend].argmax(1) == reference.argmax(1)).double().mean())
        rec["logits_max_relative_error"] = float((logits[backend] - reference).abs().max() / reference.abs().max())
    results["conv3x3_fp32_best_gflops_in_rounds"] = max(conv_gflops)
    return results, load


def network_alone(image_path, checkpoint, dataset, cache_dir, configs, rounds):
    """The limits study's network-alone timing (time_networks) of each (backend, precision) in `configs`,
    named "backend precision", with the lone 3x3 512 -> 512 convolution timed in each round in each of
    their precisions. Returns (timings by name, best conv GFLOP/s per precision within the rounds, other load)."""
    rates = {p: [] for p in sorted({p for _, p in configs})}

    def time_rates():
        for p in rates:
            rates[p].append(conv_rate_512(DTYPES[p], seconds=0.3)["best_gflops"])

    results, _, load = time_networks(image_path, checkpoint, dataset, cache_dir,
                                     {f"{b} {p}": (b, p) for b, p in configs}, rounds, time_rates)
    return results, {p: max(v) for p, v in rates.items()}, load


# ----------------------------------------------------------------------------- CLI runs
def parse_config(text):
    """Config string -> (CLI args, precision, batch size, backend); a leading bare precision means --precision."""
    args = shlex.split(text)
    if args and args[0] in ("fp32", "bf16", "fp16"):
        args = ["--precision", args[0]] + args[1:]
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--precision", default="fp32")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--num-workers", type=int, default=1)
    p.add_argument("--backend", default="auto")
    known, _ = p.parse_known_args(args)
    return args, known.precision, max(1, known.batch_size), known.backend


def _process_tree(root_pid):
    parents = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                stat = open(f"/proc/{entry.name}/stat").read()
                parents.setdefault(int(stat.rsplit(")", 1)[1].split()[1]), []).append(int(entry.name))
            except (OSError, IndexError, ValueError):
                pass
    tree, todo = [], [root_pid]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(parents.get(pid, []))
    return tree


def tree_pss_kib(root_pid):
    """Sum of the proportional set sizes of a process and its descendants (shared pages split), KiB."""
    total = 0
    for pid in _process_tree(root_pid):
        try:
            for line in open(f"/proc/{pid}/smaps_rollup"):
                if line.startswith("Pss:"):
                    total += int(line.split()[1])
                    break
        except (OSError, ValueError):
            pass
    return total


def _scan(folder, seen, now):
    try:
        for entry in os.scandir(folder):
            # finished outputs only: the CLI writes hidden temporaries, then renames them
            if entry.name.endswith(".png") and not entry.name.startswith(".") and entry.name not in seen:
                seen[entry.name] = now
    except FileNotFoundError:
        pass


def _stop(proc):
    """Terminate a still running CLI (its own session), then kill it if it lingers."""
    for sig, grace in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        end = time.monotonic() + grace
        while time.monotonic() < end:
            pid, status = os.waitpid(proc.pid, os.WNOHANG)
            if pid:
                proc.returncode = os.waitstatus_to_exitcode(status)
                return
            time.sleep(0.05)


def run_cli(label, cli_args, dataset, checkpoint, input_dir, out_dir, cache_dir, logs_dir, n_expected,
            batch_size, timeout, sample_pss=True):
    """One CLI run, polled from here; returns the timing/memory record (raises BenchError on failure).

    `sample_pss`: sample the process tree's PSS every PSS_EVERY s (peak_tree_pss_mib). Each sample reads
    every process's smaps_rollup, about 35 ms of CPU for a 1.5 GiB extractor (0.07 cores at 0.5 s), and
    walks its page tables under its memory map's lock; the studies of time alone leave it out (the peak
    RSS still comes from /usr/bin/time)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, str(CLI), "--dataset", dataset, "--model-restore", str(checkpoint),
           "--input-dir", str(input_dir), "--output-dir", str(out_dir), "--quiet"] + cli_args
    slug = re.sub(r"[^A-Za-z0-9]+", "_", label).strip("_")
    time_file, log_file = logs_dir / f"{slug}.time", logs_dir / f"{slug}.log"
    use_time = os.access(GNU_TIME, os.X_OK)
    full = ([GNU_TIME, "-v", "-o", str(time_file)] if use_time else []) + cmd
    env = dict(os.environ, SCHP_CACHE_DIR=str(cache_dir))
    seen, pss_peak = {}, 0
    with open(log_file, "w+") as log:
        snap = cpu_snapshot()
        t0 = time.perf_counter()
        proc = subprocess.Popen(full, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        next_sample = t0
        try:
            while True:
                pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
                now = time.perf_counter()
                _scan(out_dir, seen, now)
                if pid:
                    proc.returncode = os.waitstatus_to_exitcode(status)
                    break
                if sample_pss and now >= next_sample:
                    pss_peak = max(pss_peak, tree_pss_kib(proc.pid))
                    next_sample = now + PSS_EVERY
                if now - t0 > timeout:
                    _stop(proc)
                    raise BenchError(f"{label}: no exit after {timeout:.0f} s, stopped")
                time.sleep(POLL)
        except BaseException:
            if proc.returncode is None:
                _stop(proc)
            raise
        wall = time.perf_counter() - t0
        log.seek(0)
        output = log.read()
    if proc.returncode != 0:
        raise BenchError(f"{label}: the CLI exited with status {proc.returncode}\n  command: "
                         f"{shlex.join(cmd)}\n  its output:\n" + "\n".join("    " + l for l in output.splitlines()))
    if len(seen) != n_expected:
        raise BenchError(f"{label}: expected {n_expected} output PNGs, found {len(seen)}\n  its output:\n{output}")
    rss_kib, rss_source = None, None
    if use_time and time_file.exists():
        match = re.search(r"Maximum resident set size \(kbytes\): (\d+)", time_file.read_text())
        if match:
            rss_kib, rss_source = int(match.group(1)), "/usr/bin/time -v"
    if rss_kib is None:  # wait4's rusage of this one child: like RUSAGE_CHILDREN, but per run
        rss_kib, rss_source = usage.ru_maxrss, "wait4 rusage"
    times = sorted(t - t0 for t in seen.values())
    n = len(times)
    record = {
        "label": label, "args": cli_args, "batch_size": batch_size, "images": n, "wall_seconds": wall,
        "first_output_seconds": times[0], "output_times": times,
        "per_image_naive": (times[-1] - times[0]) / (n - 1) if n > 1 else None,
        "per_image": (times[-1] - times[batch_size - 1]) / (n - batch_size) if n > batch_size else None,
        "images_per_second_wall": n / wall, "peak_rss_mib": rss_kib / 1024, "peak_rss_source": rss_source,
        "peak_tree_pss_mib": pss_peak / 1024 or None, "cli_output": output.strip(),
        "cpu_seconds": usage.ru_utime + usage.ru_stime,
        "other_load_cores": other_load(snap, wall, usage.ru_utime + usage.ru_stime),
        # this script's own polling of the output folder and memory sampling, beside the run
        "monitor_load_cores": (cpu_snapshot()[1] - snap[1]) / wall if wall > 0 else 0.0,
    }
    if record["per_image"] is None:  # fewer images than a batch: no steady state to speak of
        record["per_image"] = record["per_image_naive"]
    record["images_per_second_steady"] = 1.0 / record["per_image"] if record["per_image"] else None
    return record


def read_ran(rec, summary) -> None:
    """What ran, from the run's summary, into `rec`: one backend, or 'torch>openvino@k' where auto
    started on torch and switched after k crops ('torch>onnxruntime+openvino>openvino@k' where it timed
    both runtimes and kept the second). After a switch the steady time per image is taken over the
    outputs after it, the trial's included (the start-up on torch stays in first_output_seconds and
    wall_seconds)."""
    record = json.loads(Path(summary).read_text())
    crops = record.get("crops_by_backend") or {}
    rec["crops_by_backend"], rec["ran"] = crops, record["backend"]
    first = crops.get("torch", 0) if len(crops) > 1 else 0
    # the forward stage's own time per image (its batch's normalising, network and upsampling, shared out
    # over the batch: the summary's per-input seconds), median over the inputs after the first on the
    # backend that ran last; the rest of the steady time per image is what the run loop adds between passes
    seconds = [i["seconds"] for i in record.get("inputs", []) if i.get("status") == "processed" and i.get("seconds")]
    rec["forward_per_image"] = statistics.median(seconds[first + 1:]) if len(seconds) > first + 1 else None
    if len(crops) > 1:
        timed = [b for b in crops if b != "torch"]
        rec["ran"] = f"torch>{'+'.join(timed) + '>' if len(timed) > 1 else ''}{record['backend']}@{first}"
        times = rec["output_times"]
        if len(times) - 1 - first >= 2:
            rec["per_image_with_start"] = rec["per_image"]
            rec["per_image"] = (times[-1] - times[first]) / (len(times) - 1 - first)


def agreement(dir_a, dir_b, names):
    """Fraction of equal label pixels over all images (PNG palette indices)."""
    equal = total = 0
    for name in names:
        a = np.asarray(Image.open(dir_a / name))
        b = np.asarray(Image.open(dir_b / name))
        if a.shape != b.shape:
            raise BenchError(f"{name}: shapes differ, {a.shape} vs {b.shape}")
        equal += int((a == b).sum())
        total += a.size
    return equal / total


# ----------------------------------------------------------------------------- time to first map
# (cache, --backend, images); 200 images are past AUTO_EXPORT_MIN_FORWARDS, where auto on an empty cache
# starts on torch and exports beside it, against exporting first (openvino) and torch alone
FIRST_MAP_RUNS = [("empty", "auto", 1), ("empty", "auto", 10), ("empty", "auto", 100), ("empty", "auto", 200),
                  ("empty", "torch", 1), ("empty", "openvino", 1), ("empty", "openvino", 200), ("warm", "torch", 1), ("warm", "torch", 10),
                  ("warm", "torch", 200), ("warm", "auto", 1), ("warm", "auto", 10), ("warm", "auto", 100)]


def first_map_study(a, work, checkpoint):
    """Time to the first map and total time of jobs of 1, 10, 100 and 200 images with an empty and a warm
    cache, for the default --backend auto, against torch and against an explicit runtime on an empty
    cache (export first). Each run is a fresh CLI process.

    "empty" is an empty SCHP_CACHE_DIR (the checkpoint conversion and, for a runtime, the ONNX export
    included); "warm" a cache filled beforehand (not timed). The jobs of more than 10 images use smaller
    images (--first-map-side; the network still runs on its full-size crop). Also prints this machine's
    break-even job length, a runtime's one-time start-up from an empty cache / seconds saved per image,
    which sets schp.backends.AUTO_EXPORT_MIN_FORWARDS.
    """
    sys.path.insert(0, str(ROOT))
    from schp.backends import AUTO_EXPORT_MIN_FORWARDS

    runs = [r for r in FIRST_MAP_RUNS if r[2] in a.first_map_sizes]
    sizes = sorted({n for _, _, n in runs})
    folders = {}
    for n in sizes:
        folder = work / f"first-map-{n}"
        folder.mkdir()
        side = a.first_map_side if n > 10 else 1024
        for i in range(n):
            cv2.imwrite(str(folder / f"img_{i:03d}.png"), cv2.cvtColor(render_like_image(i, side), cv2.COLOR_RGB2BGR))
        folders[n] = (folder, side)
    logs = work / "logs-first-map"
    logs.mkdir()
    warm = work / "cache-warm"
    print("filling the warm cache (1 image, --backend openvino; not timed) ...", flush=True)
    run_cli("fill-warm", ["--backend", "openvino"], a.dataset, checkpoint, folders[sizes[0]][0], work / "out-fill",
            warm, logs, sizes[0], 1, a.timeout)
    records, by = [], {}
    for k, (cache_kind, backend, n) in enumerate(runs):
        folder, side = folders[n]
        cache = work / f"cache-empty-{k}" if cache_kind == "empty" else warm
        summary = work / f"first-map-{k}.json"
        wait_idle(a.wait_idle, f"{backend} {n} images")
        rec = run_cli(f"first-{cache_kind}-{backend}-{n}", ["--backend", backend, "--summary", str(summary)],
                      a.dataset, checkpoint, folder, work / f"out-first-{k}", cache, logs, n, 1, a.timeout,
                      sample_pss=False)
        read_ran(rec, summary)
        rec.update(cache=cache_kind, backend=backend, n=n, side=side)
        by[cache_kind, backend, n] = rec
        records.append({k: rec[k] for k in ("cache", "backend", "ran", "n", "side", "first_output_seconds",
                                            "wall_seconds", "per_image", "other_load_cores")})
        print(f"  {cache_kind:5s} cache, --backend {backend:8s} (ran {rec['ran']}), {n:3d} x {side}: first map "
              f"{rec['first_output_seconds']:6.2f} s, total {rec['wall_seconds']:6.2f} s; other load "
              f"{rec['other_load_cores']:.2f} cores", flush=True)
    print("\ntime to first map / total, s (each a fresh process; " +
          ", ".join(f"{n} x {folders[n][1]}x{folders[n][1]}" for n in sizes) + ")")
    headers = ["cache", "--backend"] + [f"{n} img: 1st / total" for n in sizes] + ["ran"]
    rows = []
    for cache_kind, backend in dict.fromkeys((c, b) for c, b, _ in runs):
        cells = [f"{by[cache_kind, backend, n]['first_output_seconds']:.1f} / {by[cache_kind, backend, n]['wall_seconds']:.1f}"
                 if (cache_kind, backend, n) in by else "-" for n in sizes]
        ran = sorted({by[cache_kind, backend, n]["ran"] for n in sizes if (cache_kind, backend, n) in by})
        rows.append([cache_kind, backend] + cells + [",".join(ran)])
    print_table(headers, rows)
    result = {"first_map": records, "auto_export_min_forwards": AUTO_EXPORT_MIN_FORWARDS}
    need = [("empty", "openvino", 1), ("empty", "auto", 1), ("warm", "torch", 200), ("warm", "auto", 100)]
    if all(key in by for key in need) and by["empty", "auto", 1]["ran"] == "torch" \
            and by["warm", "auto", 100]["ran"] != "torch":
        # exporting, loading and compiling, less torch's own start (auto runs 1 image on torch)
        export = by["empty", "openvino", 1]["wall_seconds"] - by["empty", "auto", 1]["wall_seconds"]
        gain = by["warm", "torch", 200]["per_image"] - by["warm", "auto", 100]["per_image"]
        breakeven = export / gain if gain > 0 else float("inf")
        print(f"\none-time runtime start-up from an empty cache (export, load, compile, less torch's start; 1 image): "
              f"{export:.1f} s; saved per image by the runtime over torch (warm, steady): {gain:.3f} s "
              f"-> break-even {breakeven:.0f} images (auto takes the runtime from {AUTO_EXPORT_MIN_FORWARDS['fp32']} "
              "forward passes)")
        result.update(export_seconds=export, gain_per_image=gain, breakeven_images=breakeven)
    return result


# ----------------------------------------------------------------------------- limits and host path
def conv_rate_512(dtype, seconds=3.0):
    """Best-of GFLOP/s of a lone 3x3 512->512 convolution at 64x64, channels-last (oneDNN), in `dtype`."""
    return lone_conv_rate(512, 64, dtype, seconds, min_calls=5)


def host_path_costs(image_path, checkpoint, dataset, out_dir, repeats=5):
    """Milliseconds of one core per image for each host step of the run: decode, crop, inverse warp with
    argmax, PNG as written (schp.utils.outputs.PNG_COMPRESS_LEVEL) and at zlib levels 1, 3, 6; best of `repeats`."""
    sys.path.insert(0, str(ROOT))
    from schp.data.catalog import DATASETS
    from schp.data.crop import prepare_image
    from schp.data.decode import read_image
    from schp.inference import labels_from_logits
    from schp.utils.outputs import save_label_png
    from schp.utils.palette import get_palette

    cv2.setNumThreads(1)  # as the run does: torch owns the cores
    spec = DATASETS[dataset]
    palette = get_palette(spec.num_classes)
    image = read_image(image_path)
    item = prepare_image(0, image, spec.input_size)
    rng = np.random.default_rng(0)
    # smooth logits: a person-like layout of classes (noise would make the PNG and argmax unrealistic)
    h, w = spec.input_size
    small = rng.normal(0, 1, (h // 32, w // 32, spec.num_classes)).astype(np.float32)
    logits = cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)
    logits[..., 0] += 0.5 * (item.image.max(axis=2) < 10)  # background where the crop is black
    labels = labels_from_logits(logits, item.center, item.scale, item.width, item.height, spec.input_size)
    steps = {
        "decode": lambda: read_image(image_path),
        "crop": lambda: prepare_image(0, image, spec.input_size),
        "inverse warp + argmax": lambda: labels_from_logits(logits, item.center, item.scale, item.width,
                                                            item.height, spec.input_size),
        "png (as the run writes it)": lambda: save_label_png(labels, palette, out_dir / "host.png"),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    costs = {}
    for name, step in steps.items():
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            step()
            best = min(best, time.perf_counter() - t0)
        costs[name] = best * 1000
    png = Image.fromarray(labels)
    png.putpalette(palette)
    for level in (1, 3, 6):
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            png.save(out_dir / f"level{level}.png", format="PNG", compress_level=level)
            best = min(best, time.perf_counter() - t0)
        costs[f"png level {level} (PIL)"] = best * 1000
        costs[f"png level {level} bytes"] = (out_dir / f"level{level}.png").stat().st_size
    return costs


def limits_study(a, work, checkpoint, images_dir, images, names):
    """The issue's table in one run: the convolution limit (lone 3x3 512->512 conv rate in fp32 and bf16
    times this graph's GFLOP), end-to-end s/image of --backend auto in fp32 and bf16 and of each backend
    explicitly (so the auto choice is seen to be the fastest), the ratios to the limit, the host-path cost
    per image, and bf16's pixel agreement with fp32."""
    sys.path.insert(0, str(ROOT))
    from schp.backends import resolve_backend
    from schp.utils.cpu import native_bf16
    configs = list(a.limit_configs)
    if not native_bf16() and configs == LIMIT_CONFIGS:
        # emulated bf16 is slower than fp32 (benchmarks/bf16_cpu.py) and warns: its goal is for bf16 units
        configs = [c for c in configs if parse_config(c)[1] != "bf16"]
        print("this CPU has no bf16 units (no avx512_bf16 / amx_bf16 flag): --precision bf16 warns and fp32 is "
              "the faster choice here, so the bf16 rows and their goal are left out (name them in --limit-configs "
              "to time them anyway)", flush=True)
    released_gflop, graph_gflop = network_gflop(a.dataset)
    wait_idle(a.wait_idle, "the convolution rates")
    snap, t0 = cpu_snapshot(), time.perf_counter()
    conv = {p: conv_rate_512(dtype) for p, dtype in DTYPES.items()}
    conv_load = other_load(snap, time.perf_counter() - t0)

    def limits():  # this graph's seconds per image at the study's best rate so far
        return {p: graph_gflop / conv[p]["best_gflops"] for p in conv}

    limit = limits()
    for p in conv:
        print(f"lone 3x3 512->512 64x64 channels-last conv, {p}: best {conv[p]['best_gflops']:.0f} GFLOP/s "
              f"(median {conv[p]['median_gflops']:.0f}) -> limit {graph_gflop:.1f} GFLOP / rate = "
              f"{limit[p]:.3f} s per image", flush=True)
    print(f"  (other processes used {conv_load:.2f} cores meanwhile)", flush=True)
    auto = {p: resolve_backend("auto", torch.device("cpu"), p) for p in ("fp32", "bf16")}
    print(f"auto with a cached export: fp32 -> {auto['fp32']}, bf16 -> {auto['bf16']}\n", flush=True)
    cache, logs = work / "cache-limits", work / "logs-limits"
    logs.mkdir()
    print("filling the export cache (1 image, --backend openvino; not timed) ...", flush=True)
    one = work / "one-limits"
    one.mkdir()
    shutil.copy2(images[0], one / images[0].name)
    run_cli("fill", ["--backend", "openvino"], a.dataset, checkpoint, one, work / "out-fill-limits", cache, logs,
            1, 1, a.timeout)
    records = {}
    runs = {text: [] for text in configs}
    # in rounds, every configuration once per round: a slow spell of a shared machine (this VM's speed
    # drifted by 40% within minutes, with no other process and no steal time to show for it) then falls on
    # all of them, not on the repeats of one. Each run also gets the conv rate timed just before and just
    # after it: its ratio to the limit at the time, beside the strict ratio to the best rate of the study
    for attempt in range(a.limit_repeats):
        for index, text in enumerate(configs):
            args, precision, batch, backend = parse_config(text)
            wait_idle(a.wait_idle, text)
            rate_before = conv_rate_512(DTYPES[precision], seconds=2.0)["best_gflops"]
            out = work / f"out-limits-{index}-{attempt}"
            summary = work / f"limits-{index}-{attempt}.json"
            rec = run_cli(text, args + ["--summary", str(summary)], a.dataset, checkpoint, images_dir, out, cache,
                          logs, len(images), batch, a.timeout, sample_pss=False)
            rate_after = conv_rate_512(DTYPES[precision], seconds=2.0)["best_gflops"]
            rec.update(out_dir=out, precision=precision, backend=backend, conv_gflops_around=[rate_before, rate_after])
            read_ran(rec, summary)
            rec["x_limit_at_the_time"] = rec["per_image"] * max(rate_before, rate_after) / graph_gflop
            forward = rec["forward_per_image"]
            print(f"  round {attempt + 1}, {text}: {rec['per_image']:.3f} s/image steady"
                  + (f" (the forward stage {forward:.3f})" if forward else "") + ", conv rate "
                  f"{rate_before:.0f} / {rate_after:.0f} GFLOP/s before / after: {rec['x_limit_at_the_time']:.2f} x "
                  f"the limit at the time (other load {rec['other_load_cores']:.2f} cores; this script's polling "
                  f"{rec['monitor_load_cores']:.3f})", flush=True)
            runs[text].append(rec)
            conv[precision]["best_gflops"] = max(conv[precision]["best_gflops"], rate_before, rate_after)
    for text, recs in runs.items():
        records[text] = min(recs, key=lambda r: r["per_image"])
        records[text]["per_image_runs"] = [r["per_image"] for r in recs]
        records[text]["x_limit_at_the_time_runs"] = [r["x_limit_at_the_time"] for r in recs]
        records[text]["forward_per_image_runs"] = [r["forward_per_image"] for r in recs]
    # the rates again after the runs: the limit is the best the cores gave in this run (load from other
    # processes only lowers a rate, and it may have come or gone meanwhile)
    wait_idle(a.wait_idle, "the convolution rates, again")
    for p, dtype in DTYPES.items():
        conv[p]["best_gflops_after"] = conv_rate_512(dtype)["best_gflops"]
        conv[p]["best_gflops"] = max(conv[p]["best_gflops"], conv[p]["best_gflops_after"])
    limit = limits()
    for p in conv:
        print(f"conv rate {p}, before / after the runs: {conv[p]['best_gflops']:.0f} best of both "
              f"({conv[p]['best_gflops_after']:.0f} after) -> limit {limit[p]:.3f} s per image", flush=True)
    fp32_ref = next((r for r in records.values() if r["precision"] == "fp32" and r["backend"] == "torch"),
                    next(r for r in records.values() if r["precision"] == "fp32"))
    # the network alone, as the forward stage calls it, against the same limit: how much of the end-to-end
    # time is the network's own, and how much the host work that shares the cores with it adds
    alone_configs = list(dict.fromkeys((backend, precision) for _, precision, _, backend in map(parse_config, configs)
                                       if backend != "auto"))
    wait_idle(a.wait_idle, "the network alone")
    alone, alone_rates, alone_load = network_alone(images[0], checkpoint, a.dataset, cache, alone_configs,
                                                   a.network_rounds_limits)
    for p, rate in alone_rates.items():
        conv[p]["best_gflops"] = max(conv[p]["best_gflops"], rate)
    limit = limits()
    host = host_path_costs(images[0], checkpoint, a.dataset, work / "host")
    print("\n" + "=" * 100)
    m = machine_info()
    print(f"limits and end to end, {len(images)} x 1024x1024, {a.dataset}, {m['date']}; {m['cpu']} "
          f"({' '.join(m['isa'])}), {m['usable_cores']} cores; repo {m['repo_commit']}")
    print(f"conv limit = {graph_gflop:.1f} GFLOP (this graph) / lone 3x3 conv rate: fp32 {conv['fp32']['best_gflops']:.0f} "
          f"GFLOP/s -> {limit['fp32']:.3f} s; bf16 {conv['bf16']['best_gflops']:.0f} GFLOP/s -> {limit['bf16']:.3f} s")
    # the same rate times the released network's GFLOP: issue 13's "conv floor", the measure by which fp32
    # was at 1.12x before the bf16 work; this graph computes fewer FLOPs, so its own limit is the stricter
    released_limit = {p: released_gflop / conv[p]["best_gflops"] for p in conv}
    print(f"released-network limit = {released_gflop:.1f} GFLOP / the same rates: fp32 {released_limit['fp32']:.3f} s; "
          f"bf16 {released_limit['bf16']:.3f} s")
    headers = ["config", "ran", "s/img", "rounds", "forward stage", "x limit", "x released limit", "x limit at the time",
               "goal", "pixels = fp32 torch", "other load"]
    rows = []
    for text, r in records.items():
        ran = r["ran"]
        goal = "<= 1.10" if r["precision"] == "fp32" else "<= 1.5"
        rows.append([text, ran, f"{r['per_image']:.3f}", " ".join(f"{t:.3f}" for t in r["per_image_runs"]),
                     " ".join(f"{t:.3f}" if t else "-" for t in r["forward_per_image_runs"]),
                     f"{r['per_image'] / limit[r['precision']]:.2f}",
                     f"{r['per_image'] / released_limit[r['precision']]:.2f}",
                     f"{statistics.median(r['x_limit_at_the_time_runs']):.2f} (median)", goal,
                     f"{100 * agreement(fp32_ref['out_dir'], r['out_dir'], names):.4f}%",
                     f"{r['other_load_cores']:.2f}"])
    print_table(headers, rows)
    print(f"\nthe network alone (one 512 x 512 crop as the forward stage runs it, upsampling included; "
          f"{a.network_rounds_limits} rounds, the configurations interleaved; other load {alone_load:.2f} cores):")
    for name, rec in alone.items():
        p = name.split()[1]
        print(f"  {name:18s} median {rec['median_seconds']:.3f} s (best {rec['best_seconds']:.3f}) = "
              f"{rec['median_seconds'] / limit[p]:.2f} x the limit (best {rec['best_seconds'] / limit[p]:.2f}), "
              f"{rec['median_seconds'] / released_limit[p]:.2f} x the released network's")
    print("\nhost path per 1024x1024 image, ms of one core (best of 5):")
    for name, value in host.items():
        print(f"  {name:28s} {value:10.1f}" + (" bytes" if "bytes" in name else " ms"))
    total = sum(v for k, v in host.items() if k in ("decode", "crop", "inverse warp + argmax", "png (as the run writes it)"))
    print(f"  {'sum of the run steps':28s} {total:10.1f} ms")
    for p in ("fp32", "bf16"):  # the host path's share of the fastest end-to-end time (the goal: under a third)
        times = [r["per_image"] for r in records.values() if r["precision"] == p]
        if times:
            print(f"  = {total / 1000 / min(times):.2f} of the fastest {p} time end to end ({min(times):.3f} s/image)")
    return {"native_bf16": native_bf16(), "conv_512_64": conv, "conv_other_load_cores": conv_load, "limit_seconds": limit, "graph_gflop": graph_gflop,
            "released_gflop": released_gflop, "released_limit_seconds": released_limit,
            "auto": auto, "host_ms": host, "host_total_ms": total,
            "network_alone": alone | {"conv_gflops_in_rounds": alone_rates, "other_load_cores": alone_load},
            "configs": [{k: (str(v) if isinstance(v, Path) else v) for k, v in r.items() if k not in ("output_times",)}
                        | {"label": t, "x_limit": r["per_image"] / limit[r["precision"]],
                           "x_released_limit": r["per_image"] / released_limit[r["precision"]],
                           "agreement_vs_fp32_torch": agreement(fp32_ref["out_dir"], r["out_dir"], names)}
                        for t, r in records.items()]}


# ----------------------------------------------------------------------------- report
def fmt(value, spec):
    return "-" if value is None else format(value, spec)


def print_table(headers, rows):
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) for i, h in enumerate(headers)]
    line = lambda cells: "  ".join(str(c).rjust(w) if i else str(c).ljust(w)  # noqa: E731
                                   for i, (c, w) in enumerate(zip(cells, widths)))
    print(line(headers))
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print(line(row))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--images", type=int, default=12, help="number of 1024x1024 test images (>= 2)")
    ap.add_argument("--dataset", default="pascal", choices=sorted(NUM_CLASSES))
    ap.add_argument("--checkpoint", type=Path, help="checkpoint to use instead of a fresh synthetic one")
    ap.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS, metavar="ARGS",
                    help="CLI argument strings, one per configuration")
    ap.add_argument("--skip-baseline", action="store_true", help="do not time the original pipeline")
    ap.add_argument("--out", type=Path, help="write every number to this JSON file")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds allowed per CLI run")
    ap.add_argument("--wait-idle", type=float, default=120, metavar="SECONDS",
                    help="before each measurement wait up to this long for other processes to leave the CPU")
    ap.add_argument("--retries", type=int, default=2,
                    help="re-run a CLI configuration up to this many times when other processes used the CPU "
                         "during it; the least disturbed run is kept")
    ap.add_argument("--network-rounds", type=int, default=6,
                    help="rounds of the interleaved network-only comparison of the backends (0 = skip it)")
    ap.add_argument("--network-only", action="store_true",
                    help="stop after the rates and the network-only backend comparison (a quick rerun)")
    ap.add_argument("--keep-temp", action="store_true", help="keep the temporary folder (printed)")
    ap.add_argument("--first-map", action="store_true",
                    help="only the time-to-first-map study: jobs of --first-map-sizes images, empty and warm "
                         "cache, --backend torch / openvino / auto")
    ap.add_argument("--first-map-sizes", type=int, nargs="+", default=[1, 10, 100, 200], metavar="N")
    ap.add_argument("--first-map-side", type=int, default=256,
                    help="side of the images of the jobs of more than 10 images (smaller: shorter; the network "
                         "still runs on its 512 x 512 crop)")
    ap.add_argument("--limits", action="store_true",
                    help="only the limits study: conv limit in fp32 and bf16, end to end against it, the auto "
                         "choice, the host path per image, bf16 agreement")
    ap.add_argument("--limit-configs", nargs="+", metavar="ARGS", default=LIMIT_CONFIGS)
    ap.add_argument("--network-rounds-limits", type=int, default=10,
                    help="rounds of the limits study's network-alone timing (each configuration once per round)")
    ap.add_argument("--limit-repeats", type=int, default=3,
                    help="rounds of the limits configurations, each once per round (best kept)")
    a = ap.parse_args()
    if a.images < 2:
        ap.error("--images must be at least 2")
    if a.checkpoint is not None and not a.checkpoint.is_file():
        ap.error(f"--checkpoint {a.checkpoint}: no such file")

    work = Path(tempfile.mkdtemp(prefix="schp-throughput-"))
    try:
        return run(a, work)
    except BenchError as err:
        print(f"\nerror: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    finally:
        if a.keep_temp:
            print(f"temporary files kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def run(a, work):
    if a.first_map or a.limits:
        return run_studies(a, work)
    released_gflop, graph_gflop = network_gflop(a.dataset)
    results = {"machine": machine_info(), "dataset": a.dataset, "images": a.images,
               "gflop_per_image": released_gflop, "graph_gflop_per_image": graph_gflop}
    m = results["machine"]
    print(f"SCHP simple_extractor throughput -- {m['date']}")
    print(f"machine: {m['cpu']} ({' '.join(m['isa'])}), {m['cores']} cores ({m['usable_cores']} usable), "
          f"{m['memory_gib']} GiB")
    print(f"software: python {m['python']}, torch {m['torch']} ({m['torch_threads']} threads), "
          f"opencv {m['opencv']}, numpy {m['numpy']}; repo {m['repo_commit']}")
    print(f"workload: {a.images} render-like 1024x1024 PNGs, dataset {a.dataset} "
          f"({released_gflop:.1f} GFLOP per image in the released network, {graph_gflop:.1f} in this project's graph)\n",
          flush=True)

    images_dir = work / "images"
    images = make_images(images_dir, a.images)
    names = [p.stem + ".png" for p in images]
    if a.checkpoint:
        checkpoint = a.checkpoint.resolve()
        print(f"checkpoint: {checkpoint}")
    else:
        checkpoint = work / f"synthetic-{a.dataset}.pth"
        print(f"checkpoint: synthetic {a.dataset}, legacy format, made in {make_checkpoint(checkpoint, a.dataset):.1f} s")
    results["checkpoint"] = str(checkpoint) if a.checkpoint else "synthetic (tests/data/synth_checkpoint.py)"

    wait_idle(a.wait_idle, "the matmul/conv rates")
    snap, start = cpu_snapshot(), time.perf_counter()
    rate = matmul_rate(torch.float32)
    rate_bf16 = matmul_rate(torch.bfloat16, seconds=1.5)
    rate_conv = conv_rate()
    results["rates_other_load_cores"] = other_load(snap, time.perf_counter() - start)
    floor = released_gflop / rate["best_gflops"]
    conv_floor = released_gflop / rate_conv["best_gflops"]
    graph_floor = graph_gflop / rate_conv["best_gflops"]
    results.update(matmul_fp32=rate, matmul_bf16=rate_bf16, conv3x3_fp32=rate_conv, floor_seconds_per_image=floor,
                   conv_floor_seconds_per_image=conv_floor, graph_floor_seconds_per_image=graph_floor)
    print(f"matmul 2048^3: fp32 best {rate['best_gflops']:.1f} GFLOP/s (median {rate['median_gflops']:.1f}); "
          f"bf16 best {rate_bf16['best_gflops']:.1f} GFLOP/s (for reference)")
    print(f"conv 3x3 256->256 128x128 channels-last: fp32 best {rate_conv['best_gflops']:.1f} GFLOP/s "
          f"(median {rate_conv['median_gflops']:.1f})")
    print(f"floor = {released_gflop:.1f} GFLOP / {rate['best_gflops']:.1f} GFLOP/s = {floor:.3f} s per image (fp32 matmul); "
          f"conv floor = {conv_floor:.3f} s per image; graph floor ({graph_gflop:.1f} GFLOP at the conv rate) "
          f"= {graph_floor:.3f} s per image\n", flush=True)

    if a.network_rounds > 0:
        print(f"network only, 1 crop of {images[0].name}, backends interleaved over {a.network_rounds} rounds "
              "(exports the ONNX file on first use):", flush=True)
        wait_idle(a.wait_idle, "the network comparison")
        network, load = network_by_backend(images[0], checkpoint, a.dataset, work / "cache-network",
                                           a.network_rounds)
        results["network_by_backend"] = network | {"other_load_cores": load}
        rate_in_rounds = network.pop("conv3x3_fp32_best_gflops_in_rounds")
        floor_in_rounds = released_gflop / max(rate_in_rounds, rate_conv["best_gflops"])
        results["network_conv_floor_seconds"] = floor_in_rounds
        print(f"  lone 3x3 conv timed between the rounds: best {rate_in_rounds:.1f} GFLOP/s; conv floor for "
              f"this comparison (best rate seen) {floor_in_rounds:.3f} s per image", flush=True)
        for backend, rec in network.items():
            print(f"  {backend:12s} median {rec['median_seconds']:.3f} s (best {rec['best_seconds']:.3f}) = "
                  f"{rec['median_seconds'] / floor_in_rounds:.2f} x conv floor "
                  f"({rec['median_seconds'] / floor_in_rounds * released_gflop / graph_gflop:.2f} x graph floor); "
                  f"set-up {rec['setup_seconds']:.1f} s; "
                  f"labels = torch on {100 * rec['agreement_vs_torch']:.4f}%, logits max rel. error "
                  f"{rec['logits_max_relative_error']:.1e}", flush=True)
        print(f"  (other processes used {load:.2f} cores meanwhile)\n", flush=True)
    if a.network_only:
        if a.out:
            a.out.parent.mkdir(parents=True, exist_ok=True)
            a.out.write_text(json.dumps(results, indent=1) + "\n")
        return 0

    baseline = None
    if not a.skip_baseline:
        print("baseline: tests/original_pipeline.run_original, one image at a time", flush=True)
        attempts = []
        for attempt in range(1 + max(0, a.retries)):
            wait_idle(a.wait_idle, "the baseline")
            new = run_baseline(images, checkpoint, a.dataset, work / "out-baseline")
            attempts.append({k: new[k] for k in ("seconds_per_image", "other_load_cores")})
            if baseline is None or new["other_load_cores"] < baseline["other_load_cores"]:
                baseline = new
            if new["other_load_cores"] < LOAD_WARN:
                break
            print(f"  attempt {attempt + 1} disturbed ({new['other_load_cores']:.2f} cores used by others: "
                  f"{new['seconds_per_image']:.3f} s per image)", flush=True)
        baseline["attempts"] = attempts
        results["baseline"] = baseline
        print(f"baseline: {baseline['seconds_per_image']:.3f} s per image (mean of {len(images) - 1} after a "
              f"warm-up; model load {baseline['model_load_seconds']:.1f} s, excluded)\n", flush=True)
    torch.set_num_threads(1)  # this process only polls from here on

    logs, cache = work / "logs", work / "cache"
    logs.mkdir()
    configs = [(text, *parse_config(text)) for text in a.configs]
    for text in a.configs:  # the export cost is measured once below, not inside a configuration
        if not re.search(r"--backend\b", text):
            print(f"note: config {text!r} names no --backend: the CLI's default (auto) runs it", flush=True)
    one_dir = work / "one-image"
    one_dir.mkdir()
    shutil.copy2(images[0], one_dir / images[0].name)
    first_args, _, first_batch = configs[0][1], configs[0][2], configs[0][3]
    startup = {}
    for kind in ("cold", "warm"):
        note = "empty cache: converts the checkpoint" if kind == "cold" else "cache filled"
        print(f"start-up, {kind} ({note}), 1 image, {shlex.join(first_args)} ...", flush=True)
        wait_idle(a.wait_idle, f"the {kind} start-up")
        rec = run_cli(f"startup-{kind}", first_args, a.dataset, checkpoint, one_dir, work / f"out-startup-{kind}",
                      cache, logs, 1, first_batch, a.timeout)
        startup[kind] = {k: rec[k] for k in ("wall_seconds", "first_output_seconds", "peak_rss_mib",
                                             "peak_tree_pss_mib", "other_load_cores")}
        print(f"  first output after {rec['first_output_seconds']:.2f} s, exit after {rec['wall_seconds']:.2f} s, "
              f"peak RSS {rec['peak_rss_mib']:.0f} MiB", flush=True)
    if any(c[4] != "torch" for c in configs):
        # the ONNX export made on first use of a runtime backend (once per checkpoint), then cached
        print("export on first use of a runtime backend, 1 image, --backend onnxruntime ...", flush=True)
        wait_idle(a.wait_idle, "the export")
        try:
            rec = run_cli("export-first-use", ["--backend", "onnxruntime"], a.dataset, checkpoint, one_dir,
                          work / "out-export", cache, logs, 1, 1, a.timeout)
            startup["export_first_use"] = {k: rec[k] for k in ("wall_seconds", "first_output_seconds",
                                                              "other_load_cores")}
            print(f"  first output after {rec['first_output_seconds']:.2f} s (export and verification "
                  f"included)", flush=True)
        except BenchError as err:
            print(f"  FAILED: {err}", file=sys.stderr, flush=True)
    startup["cache_files"] = {p.name: p.stat().st_size for p in cache.iterdir()} if cache.exists() else {}
    results["startup"] = startup
    print()

    runs, failures = [], []
    for i, (text, cli_args, precision, batch, backend) in enumerate(configs):
        print(f"config {i + 1}/{len(configs)}: {shlex.join(cli_args)} ...", flush=True)
        try:
            rec, attempts = None, []
            for attempt in range(1 + max(0, a.retries)):
                wait_idle(a.wait_idle, "this configuration")
                out_dir = work / f"out-{i}-{attempt}"
                new = run_cli(text, cli_args, a.dataset, checkpoint, images_dir, out_dir, cache, logs,
                              len(images), batch, a.timeout)
                new["out_dir"] = out_dir
                attempts.append({k: new[k] for k in ("wall_seconds", "per_image", "other_load_cores")})
                if rec is None or new["other_load_cores"] < rec["other_load_cores"]:
                    rec = new
                if new["other_load_cores"] < LOAD_WARN:
                    break
                print(f"  attempt {attempt + 1} disturbed ({new['other_load_cores']:.2f} cores used by others: "
                      f"{new['per_image']:.3f} s per image)", flush=True)
            rec["attempts"] = attempts
        except BenchError as err:
            print(f"  FAILED: {err}", file=sys.stderr, flush=True)
            failures.append(text)
            runs.append({"label": text, "args": cli_args, "failed": str(err), "out_dir": None})
            continue
        rec.update(precision=precision, backend=backend)
        rec["x_floor"] = rec["per_image"] / floor
        rec["x_conv_floor"] = rec["per_image"] / conv_floor
        rec["x_graph_floor"] = rec["per_image"] / graph_floor
        rec["x_baseline"] = rec["per_image"] / baseline["seconds_per_image"] if baseline else None
        runs.append(rec)
        print(f"  wall {rec['wall_seconds']:.1f} s, first output {rec['first_output_seconds']:.2f} s, "
              f"{rec['per_image']:.3f} s per image steady; other load {rec['other_load_cores']:.2f} cores",
              flush=True)

    ok = [r for r in runs if "failed" not in r]
    reference = next((r for r in ok if r["precision"] == "fp32" and r["batch_size"] == 1 and r["backend"] == "torch"),
                     next((r for r in ok if r["precision"] == "fp32" and r["batch_size"] == 1), ok[0] if ok else None))
    for r in ok:
        r["agreement_vs_reference"] = agreement(reference["out_dir"], r["out_dir"], names)
        r["agreement_vs_baseline"] = agreement(work / "out-baseline", r["out_dir"], names) if baseline else None
    results["reference_config"] = reference["label"] if reference else None

    # ------------------------------------------------------------------ the table
    print("\n" + "=" * 100)
    print(f"SCHP simple_extractor throughput, {a.images} x 1024x1024, {a.dataset}, {m['date']}")
    print(f"{m['cpu']}, {m['usable_cores']} cores, torch {m['torch']}, opencv {m['opencv']}, repo {m['repo_commit']}")
    print(f"fp32 matmul {rate['best_gflops']:.1f} GFLOP/s -> floor {floor:.3f} s/img;  fp32 3x3 conv "
          f"{rate_conv['best_gflops']:.1f} GFLOP/s -> conv floor {conv_floor:.3f} s/img "
          f"(graph floor {graph_floor:.3f});  "
          f"bf16 matmul {rate_bf16['best_gflops']:.1f} GFLOP/s")
    if baseline:
        print(f"baseline (original pipeline, 1 image at a time): {baseline['seconds_per_image']:.3f} s/img "
              f"= {baseline['seconds_per_image'] / floor:.2f} x floor")
    print(f"start-up to first output (1 image): cold {startup['cold']['first_output_seconds']:.2f} s "
          f"(includes checkpoint conversion), warm {startup['warm']['first_output_seconds']:.2f} s"
          + (f"; first use of a runtime backend (ONNX export + verification) "
             f"{startup['export_first_use']['first_output_seconds']:.2f} s" if "export_first_use" in startup else "")
          + "\n")
    headers = ["config", "wall s", "1st out s", "s/img", "naive s/img", "img/s wall", "img/s steady",
               "x floor", "x conv floor", "x graph floor", "x baseline"]
    rows = []
    for r in runs:
        if "failed" in r:
            rows.append([r["label"], "FAILED"] + [""] * (len(headers) - 2))
            continue
        rows.append([r["label"], fmt(r["wall_seconds"], ".1f"), fmt(r["first_output_seconds"], ".2f"),
                     fmt(r["per_image"], ".3f"), fmt(r["per_image_naive"], ".3f"),
                     fmt(r["images_per_second_wall"], ".3f"), fmt(r["images_per_second_steady"], ".3f"),
                     fmt(r["x_floor"], ".2f"), fmt(r["x_conv_floor"], ".2f"), fmt(r["x_graph_floor"], ".2f"),
                     fmt(r["x_baseline"], ".2f")])
    print_table(headers, rows)
    print()
    headers = ["config", "peak RSS MiB", "tree PSS MiB", "agree vs ref", "agree vs baseline", "other load"]
    rows = [[r["label"], "FAILED", "", "", "", ""] if "failed" in r else
            [r["label"], fmt(r["peak_rss_mib"], ".0f"), fmt(r["peak_tree_pss_mib"], ".0f"),
             fmt(100 * r["agreement_vs_reference"], ".4f") + "%",
             fmt(r["agreement_vs_baseline"] and 100 * r["agreement_vs_baseline"], ".4f") + ("%" if baseline else ""),
             fmt(r["other_load_cores"], ".2f")]
            for r in runs]
    print_table(headers, rows)
    print(f"\ns/img = steady state (t[N-1] - t[B-1]) / (N - B) over sorted output times; naive = (last - first) / (N - 1)."
          f"\nagree vs ref = share of label pixels equal to those of ref (the torch backend, fp32, batch 1 when run)."
          f"\n1st out = process start to first PNG, warm cache. peak RSS = largest single process "
          f"({ok[0]['peak_rss_source'] if ok else '-'});\ntree PSS = sampled peak of the CLI and its workers "
          f"together, shared pages split. ref = {results['reference_config']}.\n"
          f"x floor = s/img / matmul floor (the brief's); x conv floor = s/img / (released GFLOP / 3x3-conv rate);\n"
          f"x graph floor = s/img / (this project's graph GFLOP / 3x3-conv rate).\n"
          f"other load = cores kept busy by processes outside the measurement (from /proc/stat), mean over the run.")
    loads = [("matmul/conv rates", results["rates_other_load_cores"])]
    loads += [("baseline", baseline["other_load_cores"])] if baseline else []
    loads += [(f"{kind} start-up", startup[kind]["other_load_cores"]) for kind in ("cold", "warm")]
    loads += [(r["label"], r["other_load_cores"]) for r in ok]
    busy = [f"{name} ({value:.2f} cores)" for name, value in loads if value > LOAD_WARN]
    if busy:
        print(f"\nWARNING: other processes used the CPU during: {'; '.join(busy)} -- those numbers are "
              f"pessimistic; rerun on an idle machine.")
    if failures:
        print(f"\nFAILED configs: {', '.join(failures)} (their output is printed above)")

    if a.out:
        for r in runs:
            r["out_dir"] = str(r["out_dir"]) if r["out_dir"] else None
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(results | {"configs": runs}, indent=1) + "\n")
        print(f"numbers written to {a.out}")
    return 1 if failures else 0


def run_studies(a, work):
    """--first-map and/or --limits: the studies of backend choice and of the limits, on their own."""
    m = machine_info()
    print(f"SCHP studies -- {m['date']}; {m['cpu']} ({' '.join(m['isa'])}), {m['usable_cores']} cores; "
          f"torch {m['torch']}; repo {m['repo_commit']}; load average {os.getloadavg()[0]:.2f}", flush=True)
    results = {"machine": m, "load_average_start": os.getloadavg()}
    if a.checkpoint:
        checkpoint = a.checkpoint.resolve()
    else:
        checkpoint = work / f"synthetic-{a.dataset}.pth"
        make_checkpoint(checkpoint, a.dataset)
    if a.limits:
        sys.path.insert(0, str(ROOT))
        from schp.backends import AUTO_CACHED_MIN_FORWARDS
        if a.images < AUTO_CACHED_MIN_FORWARDS:  # shorter jobs run on torch by design (start-up)
            print(f"note: --images {a.images} is shorter than the {AUTO_CACHED_MIN_FORWARDS} forward passes from which "
                  "`auto` takes a runtime: its rows show the short-job choice (torch)", flush=True)
        images = make_images(work / "images", a.images)
        results["limits"] = limits_study(a, work, checkpoint, work / "images", images, [p.name for p in images])
    if a.first_map:
        results.update(first_map_study(a, work, checkpoint))
    results["load_average_end"] = os.getloadavg()
    print(f"load average at the end: {os.getloadavg()[0]:.2f}")
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(results, indent=1, default=str) + "\n")
        print(f"numbers written to {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
