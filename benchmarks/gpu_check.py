#!/usr/bin/env python3
"""The CUDA-only checks and the GPU throughput benchmark, run by benchmarks/gpu_check.sh (or alone).

On a machine with CUDA, into one folder (--out, JSON and a text summary):

* checks: the GPU inverse warp and argmax (schp.utils.transforms.warp_argmax_torch) against the CPU
  path (OpenCV, schp.inference.labels_from_logits) on the same logits; fp32 on CUDA against the golden
  demo case (>= 99.99% of pixels, as on the CPU); bf16 and fp16 on CUDA against it (reported, and
  held to the CPU bf16 test's 0.85); the extractor's command line on CUDA against the same case; and,
  with --torchrun, the extractor under torchrun with every GPU (NCCL) against a one-process run:
  the same files, maps equal on >= 99.99% of pixels;
* throughput: images/s end to end (the command line, decode and PNG writing included) at batch 1, 8
  and 32 in fp32, bf16 and fp16, and of the model alone (normalised crops in, crop logits out, timed
  with CUDA synchronisation), on synthetic render-like 1024 x 1024 images and a synthetic checkpoint.

Without CUDA it prints one "no CUDA" line and exits 77 (the conventional "skipped"), having checked
nothing: the figures need a GPU.

The figures found so far are written after each part (gpu_check.json with "complete": false until
the end), so a run stopped at its time limit still leaves what it measured.

    python benchmarks/gpu_check.py --out gpu_results [--torchrun] [--images 64]
"""
import argparse
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
DEMO = ROOT / "tests" / "data" / "cases" / "demo"
SKIPPED = 77
PRECISIONS = ["fp32", "bf16", "fp16"]
TIMED_PRECISIONS = PRECISIONS  # the rehearsal times fp32 only: emulated bf16 on a CPU takes minutes
BATCHES = [1, 8, 32]
DEVICE = "cuda"  # --rehearse-on-cpu: every part on the CPU, small, to prove the script runs (no figures)


def sync():
    import torch

    if DEVICE == "cuda":
        torch.cuda.synchronize()


def log(text, lines):
    print(text, flush=True)
    lines.append(text)


def check_warp(lines):
    """GPU inverse warp + argmax against the CPU path on the same logits, several image shapes."""
    import torch

    from schp.inference import labels_from_logits
    from schp.utils.transforms import box_center_scale, output_to_input_map, warp_argmax_torch

    results = []
    rng = np.random.default_rng(3)
    for (w, h), channels, size in (((1024, 1024), 7, (512, 512)), ((640, 480), 20, (473, 473)),
                                   ((333, 777), 18, (512, 512)), ((4000, 3000), 7, (512, 512))):
        small = rng.normal(size=(size[0] // 16, size[1] // 16, channels)).astype(np.float32)
        import cv2
        logits = cv2.resize(small, (size[1], size[0]), interpolation=cv2.INTER_LINEAR) + \
            rng.normal(0, 0.05, size + (channels,)).astype(np.float32)
        center, scale = box_center_scale(w, h, size[1] / size[0])
        cpu = labels_from_logits(logits, center, scale, w, h, size)
        gpu = warp_argmax_torch(torch.from_numpy(logits).permute(2, 0, 1).contiguous().to(DEVICE),
                                output_to_input_map(center, scale, size), w, h).cpu().numpy()
        differ = int((cpu != gpu).sum())
        ok = differ <= max(1, cpu.size // 1_000_000)  # float ties only, as tests/test_transforms.py allows
        results.append({"image": [w, h], "classes": channels, "pixels_differing": differ, "ok": ok})
        log(f"  warp+argmax {w}x{h}, {channels} classes: {differ} of {cpu.size} pixels differ from the CPU path "
            f"({'ok' if ok else 'FAIL'})", lines)
    return results


def check_precisions(checkpoint, lines):
    """The demo case's map on CUDA in each precision against its golden map (the original's output)."""
    import torch
    from PIL import Image

    from schp.checkpoint import read_state_dict
    from schp.data.catalog import DATASETS
    from schp.data.decode import read_image
    from schp.inference import HumanParser

    expected = np.array(Image.open(DEMO / "expected.png"))
    image = read_image(DEMO / "in" / "demo.jpg")
    state = read_state_dict(checkpoint)
    results = {}
    for precision in PRECISIONS:
        parser = HumanParser(DATASETS["pascal"], state, torch.device(DEVICE), precision)
        (labels,) = parser.parse([image])
        agreement = float((labels == expected).mean())
        need = 0.9999 if precision == "fp32" else 0.85
        results[precision] = {"agreement_with_golden": agreement, "required": need, "ok": agreement >= need}
        log(f"  demo on {DEVICE}, {precision}: {100 * agreement:.4f}% of pixels = golden (need >= {100 * need:.2f}%: "
            f"{'ok' if agreement >= need else 'FAIL'})", lines)
        del parser
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
    return results


def run(cmd, timeout, env=None):
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
    return done.returncode, done.stdout + done.stderr


def files(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.suffix != ".json"}


def check_cli_and_torchrun(checkpoint, work, gpus, torchrun, lines):
    """The command line on CUDA on the demo case; under torchrun on every GPU against one process."""
    from PIL import Image

    env = dict(os.environ, SCHP_BACKEND="torch")
    base = [sys.executable, str(ROOT / "simple_extractor.py"), "--dataset", "pascal", "--model-restore",
            str(checkpoint), "--device", DEVICE, "--quiet"]
    results = {}
    code, output = run(base + ["--input-dir", str(DEMO / "in"), "--output-dir", str(work / "cli")], 300, env)
    expected = np.array(Image.open(DEMO / "expected.png"))
    agreement = float((np.array(Image.open(work / "cli" / "demo.png")) == expected).mean()) if code == 0 else 0.0
    results["cli"] = {"exit": code, "agreement_with_golden": agreement, "ok": code == 0 and agreement >= 0.9999}
    log(f"  command line --device {DEVICE} on the demo: exit {code}, {100 * agreement:.4f}% = golden "
        f"({'ok' if results['cli']['ok'] else 'FAIL: ' + output.strip()[-300:]})", lines)
    if not torchrun:
        return results
    inputs = work / "torchrun-in"
    make_images(inputs, 2 * max(1, gpus) + 1)
    code1, out1 = run(base + ["--input-dir", str(inputs), "--output-dir", str(work / "one")], 300, env)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={gpus}",
           str(ROOT / "simple_extractor.py")] + base[2:] + ["--input-dir", str(inputs), "--output-dir",
                                                            str(work / "many"), "--summary", str(work / "many.json")]
    code2, out2 = run(cmd, 300, env)
    # the same files with the same maps; thread counts (CPU) or kernels (per GPU) may move float rounding,
    # so the maps are held to the fidelity bar (>= 99.99% of pixels), not to identical bytes
    one, many = files(work / "one"), files(work / "many")
    agreement = 0.0
    if code1 == 0 and code2 == 0 and one and one.keys() == many.keys():
        import io
        equal = total = 0
        for name in one:
            a_map = np.array(Image.open(io.BytesIO(one[name])))
            b_map = np.array(Image.open(io.BytesIO(many[name])))
            equal, total = equal + int((a_map == b_map).sum()), total + a_map.size
        agreement = equal / total
    same = agreement >= 0.9999
    devices = json.loads((work / "many.json").read_text()).get("devices") if (work / "many.json").is_file() else None
    results["torchrun"] = {"gpus": gpus, "exit_one": code1, "exit_torchrun": code2, "pixel_agreement": agreement,
                           "devices": devices, "ok": same}
    over = "NCCL" if DEVICE == "cuda" else "gloo"
    log(f"  torchrun --nproc-per-node {gpus} ({over}): exit {code2}, maps = one process on {100 * agreement:.4f}% of pixels; "
        f"devices {devices}" + ("" if same else f"\n    {out1.strip()[-300:]}\n    {out2.strip()[-300:]}"), lines)
    return results


def make_images(folder, n):
    from throughput import make_images as render

    return render(Path(folder), n)


def model_alone(checkpoint, seconds, lines):
    """images/s of the network alone on CUDA: normalised 512 x 512 crops in, crop-space logits out."""
    import torch

    from schp.checkpoint import read_state_dict
    from schp.data.catalog import DATASETS
    from schp.inference import HumanParser

    state = read_state_dict(checkpoint)
    out = {}
    for precision in TIMED_PRECISIONS:
        parser = HumanParser(DATASETS["pascal"], state, torch.device(DEVICE), precision)
        for batch in BATCHES:
            x = torch.randn(batch, 3, 512, 512, device=DEVICE)
            for _ in range(3):
                parser.logits_normalized(x)
            sync()
            times, end = [], time.perf_counter() + seconds
            while time.perf_counter() < end or len(times) < 3:
                t0 = time.perf_counter()
                parser.logits_normalized(x)
                sync()
                times.append(time.perf_counter() - t0)
            rate = batch / statistics.median(times)
            out[f"{precision} batch {batch}"] = {"images_per_second": rate, "calls": len(times)}
            log(f"  model alone, {precision}, batch {batch:2d}: {rate:8.1f} images/s", lines)
        del parser
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
    return out


def end_to_end(checkpoint, work, images, timeout, lines):
    """images/s of the command line on CUDA (decode, crop, network, GPU warp, PNG writing) per
    precision and batch size, steady state from the output files' times (throughput.run_cli)."""
    from throughput import run_cli

    folder = work / "e2e-in"
    make_images(folder, images)
    cache, logs = work / "cache", work / "logs"
    logs.mkdir(exist_ok=True)
    out = {}
    for precision in TIMED_PRECISIONS:
        for batch in BATCHES:
            args = ["--device", DEVICE, "--precision", precision, "--batch-size", str(batch), "--num-workers",
                    str(min(8, os.cpu_count() or 1)), "--backend", "torch"]
            label = f"{precision} batch {batch}"
            try:
                rec = run_cli(label, args, "pascal", checkpoint, folder, work / f"e2e-{precision}-{batch}", cache,
                              logs, images, batch, timeout)
            except Exception as err:  # one failing configuration is reported, the others still run
                out[label] = {"failed": str(err)[:500]}
                log(f"  end to end, {label}: FAILED {str(err).splitlines()[0]}", lines)
                continue
            out[label] = {"images_per_second_steady": rec["images_per_second_steady"],
                          "images_per_second_wall": rec["images_per_second_wall"],
                          "first_output_seconds": rec["first_output_seconds"], "wall_seconds": rec["wall_seconds"]}
            log(f"  end to end, {label}: {rec['images_per_second_steady']:8.1f} images/s steady "
                f"({rec['images_per_second_wall']:.1f} over the whole run of {images}, first map "
                f"{rec['first_output_seconds']:.1f} s)", lines)
    return out


def save(out: Path, results, lines) -> None:
    """The figures so far, each file replaced whole (a stop between two parts leaves the earlier ones)."""
    from schp.utils.outputs import atomic_path

    for name, text in (("gpu_check.json", json.dumps(results, indent=1, default=str) + "\n"),
                       ("gpu_check.txt", "\n".join(lines) + "\n")):
        with atomic_path(out / name) as tmp:
            tmp.write_text(text)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("gpu_check_results"), help="folder for the figures")
    ap.add_argument("--images", type=int, default=64, help="images per end-to-end configuration")
    ap.add_argument("--torchrun", action="store_true", help="also the torchrun (NCCL) check on every GPU")
    ap.add_argument("--model-seconds", type=float, default=2.0, help="timing per model-alone configuration")
    ap.add_argument("--timeout", type=float, default=120, help="seconds allowed per command-line run")
    ap.add_argument("--rehearse-on-cpu", action="store_true",
                    help="run every part on the CPU, small (fp32 and bf16, batches 1 and 2, 3 images, torchrun "
                         "with 2 gloo processes): proves the script runs where no GPU is; its figures mean nothing")
    a = ap.parse_args(argv)
    import torch

    global DEVICE, TIMED_PRECISIONS
    if a.rehearse_on_cpu:
        DEVICE = "cpu"
        PRECISIONS[:] = ["fp32", "bf16"]
        TIMED_PRECISIONS = ["fp32"]
        BATCHES[:] = [1, 2]
        a.images, a.model_seconds = 3, 0.1
    elif not torch.cuda.is_available():
        print(f"no CUDA: torch {torch.__version__} sees no CUDA device on this machine (torch.cuda.is_available() "
              "is False); nothing was checked or measured -- run this on a machine with an NVIDIA GPU", flush=True)
        return SKIPPED
    a.out.mkdir(parents=True, exist_ok=True)
    lines, started = [], time.time()
    if DEVICE == "cuda":
        gpus = torch.cuda.device_count()
        props = torch.cuda.get_device_properties(0)
        name = f"{props.name} ({props.total_memory / 2**30:.0f} GiB)"
    else:
        gpus, name = 2, "CPU REHEARSAL (no GPU; figures meaningless)"
    log(f"GPU check: {gpus} x {name}, torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN "
        f"{torch.backends.cudnn.version()}; {time.strftime('%Y-%m-%dT%H:%M:%S%z')}", lines)
    work = Path(tempfile.mkdtemp(prefix="schp-gpu-check-"))
    try:
        from throughput import make_checkpoint

        checkpoint = work / "synthetic-pascal.pth"
        make_checkpoint(checkpoint, "pascal")
        results = {"gpus": gpus, "gpu": name, "torch": torch.__version__, "cuda": torch.version.cuda,
                   "complete": False}
        log("checks:", lines)
        results["warp"] = check_warp(lines)
        save(a.out, results, lines)
        results["precisions"] = check_precisions(checkpoint, lines)
        save(a.out, results, lines)
        results.update(check_cli_and_torchrun(checkpoint, work, gpus, a.torchrun, lines))
        save(a.out, results, lines)
        log("throughput (synthetic pascal checkpoint, render-like 1024 x 1024 PNGs):", lines)
        results["model_alone"] = model_alone(checkpoint, a.model_seconds, lines)
        save(a.out, results, lines)
        results["end_to_end"] = end_to_end(checkpoint, work, a.images, a.timeout, lines)
        results["complete"] = True
        failed = [w for w in results["warp"] if not w["ok"]] + \
            [p for p, r in results["precisions"].items() if not r["ok"]] + \
            [k for k in ("cli", "torchrun") if k in results and not results[k]["ok"]]
        results["ok"] = not failed
        log(f"{'all checks passed' if not failed else f'FAILED: {failed}'}; {time.time() - started:.0f} s", lines)
        save(a.out, results, lines)
        return 0 if not failed else 1
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
