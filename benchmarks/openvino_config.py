#!/usr/bin/env python3
"""The network alone in OpenVINO under two CPU configurations, in one run: the latency hint (one request
using every core, what `--backend openvino` compiles) and the throughput hint with two streams and two
requests in flight (each stream on its own core). It answers whether running two images at once would
beat the latency hint on this machine, in fp32 and bf16.

    python benchmarks/openvino_config.py [--rounds 8] [--dataset pascal]

Synthetic checkpoint in the released format; the export goes to a temporary folder. Seconds per image
are the mean over `--rounds` images after one warm-up request per configuration.
"""
import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from schp.data.catalog import DATASETS  # noqa: E402  (no torch: --help stays fast)

CONFIGS = {  # name -> (OpenVINO CPU properties over those --backend openvino compiles with, requests in flight)
    "latency (as --backend openvino)": ({}, 1),
    "throughput, 2 streams, 2 requests": ({"PERFORMANCE_HINT": "THROUGHPUT", "NUM_STREAMS": 2}, 2),
}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=8, help="images timed per configuration (even)")
    p.add_argument("--dataset", default="pascal", choices=sorted(DATASETS))
    a = p.parse_args()
    import openvino as ov
    import torch
    from schp.backends import OpenVinoRunner, cached_onnx
    from schp.checkpoint import read_state_dict
    from throughput import make_checkpoint

    spec = DATASETS[a.dataset]
    with tempfile.TemporaryDirectory(prefix="schp-ovcfg-") as tmp:
        ckpt = Path(tmp) / "synthetic.pth"
        make_checkpoint(ckpt, a.dataset)
        path = cached_onnx(spec, read_state_dict(ckpt), Path(tmp) / "cache", True)
        h, w = spec.input_size
        x = np.random.default_rng(0).random((1, 3, h, w), dtype=np.float32)
        print(f"{os.cpu_count()} cores, torch threads {torch.get_num_threads()}, OpenVINO {ov.__version__}, "
              f"{a.dataset} {h}x{w}, {a.rounds} images per row")
        for precision in ("fp32", "bf16"):
            runner = OpenVinoRunner(path, precision)  # its model and compile properties, as the run uses them
            for name, (props, in_flight) in CONFIGS.items():
                model = runner.model.clone()
                model.reshape([1, 3, h, w])
                compiled = runner.core.compile_model(model, "CPU", dict(runner.config, **props))
                requests = [compiled.create_infer_request() for _ in range(in_flight)]
                for r in requests:
                    r.infer({0: x})
                t0 = time.perf_counter()
                for _ in range(a.rounds // in_flight):
                    for r in requests:
                        r.start_async({0: x})
                    for r in requests:
                        r.wait()
                seconds = (time.perf_counter() - t0) / (a.rounds // in_flight * in_flight)
                print(f"  {precision:4} {name:36} {seconds:.3f} s/image", flush=True)


if __name__ == "__main__":
    main()
