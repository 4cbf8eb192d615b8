#!/usr/bin/env python3
"""Peak memory of the extractor against image size: what grows with the pixels and what does not.

For each side S (default 1000, 5000, 10000: 1, 25 and 100 megapixels) it writes one S x S JPEG (a
person-like test pattern, quality 80), runs
``simple_extractor.py --num-workers 0 --quiet`` on it (the whole run in one process, so its peak RSS
is the run's peak) with a synthetic pascal checkpoint and a warm checkpoint cache, and reports the
child's peak RSS (getrusage). The growth per megapixel between sizes is what the image-sized buffers
cost: the decoded image (3 bytes per pixel), the label map (1 byte per pixel) and the PNG encoder's
buffers; the float logits are never held whole (the inverse warp runs in bands of rows).

    python benchmarks/memory.py [--sides 1000 5000 10000] [--logits]
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "data"))
from synth_checkpoint import save_checkpoint, synthetic_checkpoint  # noqa: E402

WRAPPER = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
           "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(r.returncode)")


def pattern(side: int) -> np.ndarray:
    small = np.zeros((256, 256, 3), np.uint8)
    cv2.ellipse(small, (128, 60), (22, 28), 0, 0, 360, (90, 120, 200), -1)
    cv2.rectangle(small, (95, 90), (160, 170), (40, 40, 160), -1)
    cv2.rectangle(small, (100, 170), (155, 250), (120, 60, 30), -1)
    return cv2.resize(small, (side, side), interpolation=cv2.INTER_NEAREST)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sides", type=int, nargs="+", default=[1000, 5000, 10000])
    p.add_argument("--logits", action="store_true", help="also write the logits (memory-mapped .npy)")
    a = p.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        checkpoint = work / "pascal.pth"
        save_checkpoint(synthetic_checkpoint("pascal", 0), checkpoint, legacy=True)
        env = dict(os.environ, SCHP_CACHE_DIR=str(work / "cache"))
        for side in a.sides:
            inputs, out = work / f"in{side}", work / f"out{side}"
            inputs.mkdir()
            cv2.imwrite(str(inputs / "image.jpg"), pattern(side), [cv2.IMWRITE_JPEG_QUALITY, 80])
            cmd = [sys.executable, str(ROOT / "simple_extractor.py"), "--model-restore", str(checkpoint),
                   "--input-dir", str(inputs), "--output-dir", str(out), "--num-workers", "0", "--quiet"]
            cmd += ["--logits"] if a.logits else []
            r = subprocess.run([sys.executable, "-c", WRAPPER] + cmd, env=env, capture_output=True, text=True)
            if r.returncode != 0:
                sys.exit(r.stderr)
            peak = int(r.stdout.split()[-1]) / 1024  # KiB -> MiB
            results.append({"side": side, "megapixels": side * side / 1e6, "peak_rss_mib": round(peak)})
            print(f"{side} x {side} ({side * side / 1e6:.0f} MP): peak RSS {peak:.0f} MiB", flush=True)
            for f in out.iterdir():
                f.unlink()
    for a_, b_ in zip(results, results[1:]):
        per_mp = (b_["peak_rss_mib"] - a_["peak_rss_mib"]) / (b_["megapixels"] - a_["megapixels"])
        print(f"{a_['megapixels']:.0f} -> {b_['megapixels']:.0f} MP: {per_mp:.1f} MiB per megapixel "
              f"({per_mp * 2**20 / 1e6:.1f} bytes per pixel)")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
