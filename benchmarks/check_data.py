#!/usr/bin/env python3
"""How long train.py's data check takes: every image and label of a split decoded, 1 thread against
one per core (what train.py uses), on synthetic LIP-sized samples.

    python benchmarks/check_data.py [--samples 600] [--size 400x300]

Prints the machine (cores, load average before and after) and samples/s for each thread count, with
the ratio to one thread measured in the same run. The samples are noisy JPEGs (quality 90) with
8-bit label PNGs of 20 classes, made in a temporary folder.
"""
import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def make_split(root: Path, count: int, width: int, height: int) -> None:
    import cv2
    import numpy as np

    rng = np.random.default_rng(0)
    (root / "train_images").mkdir(parents=True)
    (root / "train_segmentations").mkdir()
    ids = []
    for i in range(count):
        base = rng.integers(0, 255, (height // 8, width // 8, 3), dtype=np.uint8)
        image = cv2.resize(base, (width, height), interpolation=cv2.INTER_LINEAR)  # smooth, like photos
        label = cv2.resize(rng.integers(0, 20, (height // 16, width // 16), dtype=np.uint8), (width, height),
                           interpolation=cv2.INTER_NEAREST)
        cv2.imwrite(str(root / "train_images" / f"{i:05d}.jpg"), image, [cv2.IMWRITE_JPEG_QUALITY, 90])
        cv2.imwrite(str(root / "train_segmentations" / f"{i:05d}.png"), label)
        ids.append(f"{i:05d}")
    (root / "train_id.txt").write_text("\n".join(ids) + "\n")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=600)
    p.add_argument("--size", default="400x300", help="WxH of the images")
    p.add_argument("--repeat", type=int, default=3, help="timed passes per thread count (best kept)")
    args = p.parse_args()
    width, height = (int(v) for v in args.size.split("x"))
    from schp.data.training_set import check_samples, check_workers, load_split

    print(f"cores usable: {check_workers()}, load average before: {os.getloadavg()}")
    with tempfile.TemporaryDirectory(prefix="schp-check-") as folder:
        make_split(Path(folder), args.samples, width, height)
        samples = load_split(Path(folder), "train")
        check_samples(samples[:20], 20, workers=1)  # warm the imports and the file cache
        best = {}
        for workers in sorted({1, check_workers()}):
            times = []
            for _ in range(args.repeat):
                start = time.perf_counter()
                problems = check_samples(samples, 20, workers=workers)
                times.append(time.perf_counter() - start)
                assert not problems, problems[:3]
            best[workers] = min(times)
        for workers, seconds in best.items():
            print(f"{workers} thread(s): {args.samples} samples of {width}x{height} in {seconds:.2f} s, "
                  f"{args.samples / seconds:.0f} samples/s, {best[1] / seconds:.2f}x one thread")
    print(f"load average after: {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
