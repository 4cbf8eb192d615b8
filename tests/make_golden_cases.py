#!/usr/bin/env python3
"""Write golden test cases with the test oracle (original_pipeline.py) and seed-0 synthetic checkpoints.

Each case goes to tests/data/cases/<name>/ in the same layout as the demo case:
    in/<image>                  the input (made here from group.jpg or the demo image; small files)
    dataset                     the dataset name
    expected.png                labels, mode 'P', pixel = class index, Pascal-VOC palette
    expected_logits_sample.npz  y, x (int64), logits (float32): full-resolution logits at 4096 seeded
                                random pixels (drawn with replacement, like the demo case)

usage: python tests/make_golden_cases.py [--checkpoint-dir DIR]   (default: a temporary directory)
"""
import argparse
import os
import sys
import tempfile
import time
import zlib

import numpy as np
from PIL import Image

TESTS = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.join(TESTS, "data")
sys.path.insert(0, TESTS)
sys.path.insert(0, DATA)
from original_pipeline import DATASETS, get_palette, load_model, run_original  # noqa: E402
from synth_checkpoint import save_checkpoint, synthetic_checkpoint  # noqa: E402

GROUP = os.path.join(DATA, "group.jpg")  # 1200 x 900, four people standing
DEMO = os.path.join(DATA, "cases", "demo", "in", "demo.jpg")


def lip_portrait():  # ~400 x 640 portrait crop around the second person, JPEG
    return Image.open(GROUP).convert("RGB").crop((270, 210, 670, 850)), "portrait.jpg", {"quality": 90}


def atr_landscape_grey():  # landscape crop of the two people on the right, 8-bit greyscale PNG
    return Image.open(GROUP).convert("L").crop((600, 200, 1080, 520)), "landscape_grey.png", {}


def pascal_small_odd():  # the demo image shrunk to 97 x 61, RGB PNG
    return Image.open(DEMO).convert("RGB").resize((97, 61), Image.BICUBIC), "small_odd.png", {}


def lip_tiny_strip():  # 1 x 40 (w x h): a vertical strip through a person, averaged across
    return Image.open(GROUP).convert("RGB").crop((460, 100, 480, 900)).resize((1, 40), Image.BOX), "strip.png", {}


CASES = {"lip_portrait": ("lip", lip_portrait), "atr_landscape_grey": ("atr", atr_landscape_grey),
         "pascal_small_odd": ("pascal", pascal_small_odd), "lip_tiny_strip": ("lip", lip_tiny_strip)}


def write_case(name, dataset, make_image, checkpoint, model):
    case = os.path.join(DATA, "cases", name)
    os.makedirs(os.path.join(case, "in"), exist_ok=True)
    image, filename, save_args = make_image()
    image_path = os.path.join(case, "in", filename)
    image.save(image_path, **save_args)
    with open(os.path.join(case, "dataset"), "w") as f:
        f.write(dataset + "\n")

    t = time.time()
    labels, logits = run_original(image_path, checkpoint, dataset, model=model)
    seconds = time.time() - t

    png = Image.fromarray(labels)
    png.putpalette(get_palette(DATASETS[dataset][1]))
    png.save(os.path.join(case, "expected.png"))
    h, w = labels.shape
    rng = np.random.default_rng(zlib.crc32(name.encode()))  # seeded per case
    y = rng.integers(0, h, 4096, dtype=np.int64)
    x = rng.integers(0, w, 4096, dtype=np.int64)
    np.savez_compressed(os.path.join(case, "expected_logits_sample.npz"), y=y, x=x,
                        logits=logits[y, x].astype(np.float32))
    classes, counts = np.unique(labels, return_counts=True)
    print(f"{name}: {dataset}, {w}x{h} {image.mode} {filename} ({os.path.getsize(image_path)} B), "
          f"{len(classes)} classes {dict(zip(classes.tolist(), counts.tolist()))}, {seconds:.1f} s")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint-dir", help="where to write/reuse the seed-0 synthetic checkpoints")
    p.add_argument("cases", nargs="*", help="some of %s (default: all)" % ", ".join(CASES))
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        ckpt_dir = a.checkpoint_dir or tmp
        models = {}
        for name in a.cases or CASES:
            dataset, make_image = CASES[name]
            checkpoint = os.path.join(ckpt_dir, f"{dataset}.pth")
            if not os.path.exists(checkpoint):
                save_checkpoint(synthetic_checkpoint(dataset, seed=0), checkpoint)  # legacy format
            if dataset not in models:
                models[dataset] = load_model(checkpoint, DATASETS[dataset][1])
            write_case(name, dataset, make_image, checkpoint, models[dataset])


if __name__ == "__main__":
    main()
